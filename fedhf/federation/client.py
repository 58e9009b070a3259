"""What a client does in a round, without Flower: check its owner's policy, train (DP-SGD or not), evaluate.

``client_app.py`` turns Flower messages into these calls and back. This module holds the
heavy imports (torch, transformers, peft, opacus, datasets): the ClientApp imports it only
inside the handlers that train or evaluate, because in a deployment every message starts a
fresh ClientApp process, and the SecAgg+ key-exchange messages need none of it.

What leaves the node (:func:`reply_fields`): the update, the privacy accounting (under DP), and
of the optional fields (:data:`fedhf.privacy.policy.SHAREABLE`) only those the owner's policy shares.
A refusal (:class:`fedhf.privacy.policy.Refusal`) carries the rule and a sentence, nothing computed from
the data.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedhf.config.schema import FedHFConfig, check_secagg_weight
from fedhf.data.canaries import canary_format, canary_rows, run_canaries
from fedhf.data.fingerprint import partition_fingerprint, silo_fingerprint
from fedhf.data.partitions import label_histogram
from fedhf.data.records import record_format
from fedhf.federation import faults
from fedhf.federation.lora_ranks import truncate
from fedhf.federation.node import Node, node_allows_canaries, node_lora_rank, node_of  # noqa: F401  (node_of: the ClientApp's entry)
from fedhf.federation.node_state import SpendStore, legacy_key, new_accountant_id
from fedhf.federation.reuse import SHELF
from fedhf.federation.updates import encode
from fedhf.privacy.dp import (
    SampleAccount,
    _merge,
    default_delta,
    dp_epochs,
    epsilon_of,
    plan_for,
    private_train,
    sampling,
)
from fedhf.privacy.policy import (
    NodePolicy,
    Refusal,
    check_delta,
    check_request,
    parse_policy,
)
from fedhf.tasks.base import get_task
from fedhf.tasks.model import (
    get_adapter_state,
    load_tokenizer,
    set_adapter_state,
    train_only,
)
from fedhf.train.loop import Pull, TrainResult, round_lr, train_local

log = logging.getLogger("fedhf")

REFUSED = "refused"


def round_seed(cfg: FedHFConfig, server_round: int, pid: int) -> int:
    """Seed of a client's shuffling and dropout in a round (recorded in run.json's seeds)."""
    return cfg.seed * 100_003 + server_round * 1_009 + pid


@dataclass
class TrainOutcome:
    state: dict[str, np.ndarray] | None  # the reply payload (transport.dtype); None when the client did not train
    metrics: dict[str, float | int]  # the reply's MetricRecord
    info: dict[str, Any]  # the reply's client-info ConfigRecord
    refusal: Refusal | None = None
    replayed: bool = False


@dataclass
class RoundRequest:
    """A train request as the node sees it: the run's parsed config and what the message says about the round."""

    cfg: FedHFConfig
    server_round: int
    run_uid: str
    global_digest: str
    secure: bool  # the message came through the SecAgg+ protocol
    label_names: list[str] | None
    proximal_mu: float = 0.0


def refusal_outcome(pid: int, refusal: Refusal) -> TrainOutcome:
    log.warning("round refused: %s", refusal.text())
    info = {"partition-id": pid, "status": REFUSED, "rule": refusal.rule, "reason": refusal.reason}
    return TrainOutcome(None, {}, info, refusal)


def data_key(cfg: FedHFConfig, node: Node) -> str:
    """The name of the node's spend folder: a fingerprint of its data, never of the run."""
    if node.data_path is not None:
        fp = silo_fingerprint(node.data_path)
    else:
        fp = partition_fingerprint(cfg.data, node.pid)
    return "data-" + fp[:24]


def _request_refusal(policy: NodePolicy, req: RoundRequest) -> Refusal | None:
    """The rules that need no data: the owner's privacy level and secure aggregation, and the run's own claim."""
    p = req.cfg.privacy
    refusal = check_request(
        policy,
        mode=p.mode,
        secure=req.secure,
        noise_multiplier=None if p.target_epsilon is not None else p.noise_multiplier,
    )
    if refusal is None and req.cfg.strategy.secure_aggregation and not req.secure:
        refusal = Refusal(
            "strategy.secure-aggregation",
            "the run asks for secure aggregation but this train message is "
            "not part of the SecAgg+ protocol; the update is not sent in the clear.",
        )
    return refusal


@dataclass
class Projection:
    """What training this round would spend, before it is spent."""

    account: SampleAccount
    accountant_id: str
    entry: dict[str, Any]
    run_epsilon: float
    lifetime: dict[str, Any]


def _project(req: RoundRequest, spend: Any, pid: int, n: int, delta: float, epochs: int | None = None) -> Projection:
    """``epochs``: what this request trains (default: a round's, personal epochs included)."""
    cfg = req.cfg
    account, accountant_id = _run_account(cfg, spend.run_account(req.run_uid), n, delta)
    q, _ = sampling(n, cfg.train.batch_size, 1)
    steps = sampling(n, cfg.train.batch_size, epochs if epochs is not None else dp_epochs(cfg)[0])[1]
    entry = {
        "run_uid": req.run_uid,
        "round": req.server_round,
        "partition_id": pid,
        "accountant": account.accountant,
        "accountant_id": accountant_id,
        "delta": account.delta,
        "noise_multiplier": account.noise_multiplier,
        "max_grad_norm": account.max_grad_norm,
        "sample_rate": q,
        "steps": steps,
    }
    run_eps = epsilon_of(
        account.accountant, _merge(account.history, (account.noise_multiplier, q, steps)), account.delta
    )
    kind, life_delta, life_history = spend.lifetime(extra=entry)
    lifetime = {
        "epsilon": epsilon_of(kind, life_history, life_delta),
        "delta": life_delta,
        "accountant": kind,
        "runs": len(set(spend.runs()) | {req.run_uid}),
    }
    return Projection(account, accountant_id, entry, run_eps, lifetime)


def canary_records(
    cfg: FedHFConfig, node: Node, client_rows: int, node_config: Mapping[str, Any], data_format: str = "instruction"
) -> list[dict[str, Any]] | Refusal:
    """The audit's canary records this node trains on (``audit.canaries``): all of them on the canary client, none
    elsewhere. Records the run config wrote join a node's training rows only when its owner says so
    (``allow-canaries = true``; ``fedhf run`` says so for its own simulated canary client), and never a silo's."""
    a = cfg.audit
    if not a.canaries or node.pid != a.canary_client:
        return []
    if node.num_partitions is None:
        return Refusal(
            "audit.canaries",
            "the run asks this node to train on canary records; a node with its own data (data-path) does not take "
            "training records from the run config (canary audits run in simulations).",
        )
    if not node_allows_canaries(node_config):
        return Refusal(
            "allow-canaries",
            "the run asks this node to train on canary records it did not write; its owner allows that only with "
            "node config allow-canaries=true.",
        )
    return canary_rows(run_canaries(a.canaries, canary_format(data_format), cfg.seed), a.canary_repeats, client_rows)


def preflight(req: RoundRequest, node: Node, *, node_config: Mapping[str, Any], state_root: Any) -> Refusal | None:
    """Every rule of the owner's policy, checked without spending: SecAgg+'s set-up stage asks before any key is sent.
    The binding check is the one :func:`train_round` makes when it reserves the spend."""
    policy = parse_policy(node_config)
    refusal = _request_refusal(policy, req) or rank_refusal(req.cfg, node_config)
    if refusal is not None:
        return refusal
    if req.cfg.audit.canaries and node.pid == req.cfg.audit.canary_client:  # the owner's word on canaries first
        consent = canary_records(req.cfg, node, req.cfg.audit.canaries, node_config)
        if isinstance(consent, Refusal):
            return consent
    if not req.cfg.privacy.sample_level:
        return None
    train_ds, _, _ = node.data(req.cfg, req.label_names)
    extra = canary_records(req.cfg, node, len(train_ds), node_config, record_format(train_ds.column_names))
    if isinstance(extra, Refusal):
        return extra
    n = len(train_ds) + len(extra)
    p = req.cfg.privacy
    delta = p.delta if p.delta is not None else default_delta(n)
    refusal = check_delta(policy, delta, n)
    if refusal is not None:
        return refusal
    store = SpendStore(state_root, data_key(req.cfg, node))
    with store.transaction(legacy=legacy_key(node.pid, node.data_path)) as spend:
        if store.replay(req.run_uid, req.server_round, req.global_digest) is not None:
            return None
        proj = _project(req, spend, node.pid, n, delta)
    return _budget_refusal(policy, req.cfg, proj.run_epsilon, proj.lifetime["epsilon"])


def train_round(
    req: RoundRequest,
    node: Node,
    global_state: dict[str, torch.Tensor],
    *,
    node_config: Mapping[str, Any],
    state_root: Any,
) -> TrainOutcome:
    """One round of local training under the owner's policy; refusals and replays included."""
    t0 = time.perf_counter()
    cfg, server_round, pid = req.cfg, req.server_round, node.pid
    torch.set_num_threads(cfg.train.num_threads)
    policy = parse_policy(node_config)
    p = cfg.privacy
    refusal = _request_refusal(policy, req) or rank_refusal(cfg, node_config)
    if refusal is not None:
        return refusal_outcome(pid, refusal)
    fault = faults.planned(node_config, pid, server_round)
    faults.before_training(fault, node_config)
    train_ds, _, names = node.data(cfg, req.label_names)
    extra = canary_records(cfg, node, len(train_ds), node_config, record_format(train_ds.column_names))
    if isinstance(extra, Refusal):
        return refusal_outcome(pid, extra)
    n = len(train_ds) + len(extra)  # the rows trained on (and sampled from, under DP): canaries included
    dp = p.mode != "none"
    shared = policy.shared(dp)
    weight = n if "num-examples" in shared and not p.client_level else 1
    if req.secure:
        check_secagg_weight(cfg, weight)  # before any DP step: a refused round spends no budget

    account: SampleAccount | None = None
    store: SpendStore | None = None
    accountant_id = ""
    lifetime = None
    if p.sample_level:
        delta = p.delta if p.delta is not None else default_delta(n)
        refusal = check_delta(policy, delta, n)
        if refusal is not None:
            return refusal_outcome(pid, refusal)
        store = SpendStore(state_root, data_key(cfg, node))
        with store.transaction(legacy=legacy_key(pid, node.data_path)) as spend:
            if not req.secure:
                cached = store.replay(req.run_uid, server_round, req.global_digest)
                if cached is not None:  # this round was cut off at the server: resend the reply already released
                    payload, meta = cached
                    return TrainOutcome(payload, meta["metrics"], {**meta["info"], "replayed": True}, replayed=True)
            proj = _project(req, spend, pid, n, delta)
            refusal = _budget_refusal(policy, cfg, proj.run_epsilon, proj.lifetime["epsilon"])
            if refusal is not None:
                return refusal_outcome(pid, refusal)
            spend.add(proj.entry)  # reserved before training: a spend is counted even if the round dies
            account, accountant_id, lifetime = proj.account, proj.accountant_id, proj.lifetime

    tokenizer = load_tokenizer(cfg.model.name)
    rank = node_rank(cfg, node_config)
    model = SHELF.take(cfg, names, rank)  # built once per process and key, reset to its initial state
    global_state = start_state(global_state, rank)  # at this node's rank: the truncation of the global product
    set_adapter_state(model, global_state)
    fit = Fit(cfg, model, train_ds, tokenizer, account, round_seed(cfg, server_round, pid), server_round, names, extra)
    pers = cfg.personalization
    personal = SpendStore(state_root, data_key(cfg, node)) if pers.mode in ("fedrep", "ditto") else None
    if personal is not None and pers.mode == "fedrep":
        # FedRep: the local parts (the head, and B when asked) train first with the rest frozen, then the rest with
        # them frozen; only the rest is sent. The local parts never leave this node.
        saved = personal.load_personal(req.run_uid, "local")
        if saved is not None:
            set_adapter_state(model, _tensors(saved), part="local")
        train_only(model, "local")
        fit(pers.epochs, lr=pers.lr)
        train_only(model, "travels")
        result = fit(cfg.train.local_epochs, proximal_mu=req.proximal_mu)
        train_only(model, "trained")
        personal.save_personal(req.run_uid, "local", _arrays(get_adapter_state(model, "local")))
    else:
        anchors = _trainable_copy(model) if pers.mode == "ditto" else None
        result = fit(cfg.train.local_epochs, proximal_mu=req.proximal_mu)
        if personal is not None and anchors is not None:
            # Ditto: the update to send is taken; then this node's personal adapter trains, pulled toward the
            # global adapter of this round, and stays here.
            update = get_adapter_state(model)
            saved = personal.load_personal(req.run_uid, "ditto")
            set_adapter_state(model, _tensors(saved) if saved is not None else global_state)
            fit(pers.epochs, pull=ditto_pull(cfg, model, anchors), lr=pers.lr)
            personal.save_personal(req.run_uid, "ditto", _arrays(get_adapter_state(model)))
            set_adapter_state(model, update)
    result = fit.total(result)
    account = fit.account
    trained = faults.poison_values(fault, {k: v.numpy() for k, v in get_adapter_state(model).items()})
    encoded = encode(trained, {k: v.numpy() for k, v in global_state.items()}, cfg.transport.dtype)
    state = faults.poison_structure(fault, encoded.arrays)
    metrics, info = reply_fields(
        shared,
        pid=pid,
        weight=weight,
        num_examples=n,
        loss=result.loss,
        histogram=label_histogram(train_ds["label"], len(names)) if "label" in train_ds.column_names else None,
        tokens=result.tokens,
        train_seconds=result.seconds,
        handler_seconds=time.perf_counter() - t0,
    )
    info.update({"status": "trained", "transport": encoded.dtype, "train-steps": result.steps})
    if cfg.strategy.lora_aggregation == "svd":
        info["lora-rank"] = rank or cfg.model.lora.r
    if encoded.scales:
        info["int8-scales"] = encoded.scales
    if account is not None:
        info.update(privacy_info(account, accountant_id, policy, lifetime))
    outcome = TrainOutcome(state, metrics, info)
    SHELF.give_back(model)  # the round succeeded: the next one may reuse the model
    if store is not None and not req.secure:  # before the reply leaves: a resumed server gets the same reply
        store.save_reply(
            req.run_uid,
            {"round": server_round, "global_digest": req.global_digest, "metrics": metrics, "info": info},
            state,
        )
    return outcome


def node_rank(cfg: FedHFConfig, node_config: Mapping[str, Any]) -> int | None:
    """The LoRA rank this node trains when it is not the run's (node config lora-rank), else None."""
    rank = node_lora_rank(node_config)
    return rank if rank is not None and rank != cfg.model.lora.r else None


def rank_refusal(cfg: FedHFConfig, node_config: Mapping[str, Any]) -> Refusal | None:
    """A node whose owner set a LoRA rank the run cannot take says so before it trains (or spends)."""
    rank, r = node_lora_rank(node_config), cfg.model.lora.r
    if rank is None or rank == r:
        return None
    if cfg.strategy.lora_aggregation != "svd":
        return Refusal(
            "lora-rank",
            f"this node trains LoRA rank {rank} (its node config lora-rank) and the run averages A and B "
            f"separately (strategy.lora-aggregation=mean), which needs every node at model.lora.r={r}; run with "
            "strategy.lora-aggregation=svd, or drop lora-rank on this node.",
        )
    if rank > r:
        return Refusal(
            "lora-rank",
            f"this node's lora-rank {rank} is above the run's global rank model.lora.r={r}, which the server keeps; "
            f"set lora-rank to at most {r}, or run with model.lora.r >= {rank}.",
        )
    return None


def start_state(global_state: dict[str, torch.Tensor], rank: int | None) -> dict[str, torch.Tensor]:
    """The adapter a node at ``rank`` starts from (``fedhf.federation.lora_ranks.truncate``); the global one when
    the node trains at the run's rank."""
    if rank is None:
        return global_state
    return _tensors(truncate(_arrays(global_state), rank))


class Fit:
    """Local training of one model on this node's rows, DP-SGD when an account is given; calls add up (their steps,
    tokens, time) and the account carries every call's spend."""

    def __init__(
        self,
        cfg: FedHFConfig,
        model: torch.nn.Module,
        train_ds: Any,
        tokenizer: Any,
        account: SampleAccount | None,
        seed: int,
        server_round: int | None = None,
        label_names: list[str] | None = None,
        extra_records: list[dict[str, Any]] | None = None,
    ) -> None:
        """``server_round``: the federated round this training is part of (train.lr-schedule decays train.lr by it);
        None for training outside the rounds (the personalization stage), which runs at train.lr. ``label_names``: the
        run's labels (the causal-LM task phrases each example with them). ``extra_records``: records trained on with
        the rows (the audit's canaries; causal-LM only)."""
        self.cfg, self.model, self.train_ds, self.tokenizer = cfg, model, train_ds, tokenizer
        self.extra = list(extra_records or [])
        self.account, self.seed, self.server_round = account, seed, server_round
        self.task = get_task(cfg.model.task, label_names)
        self.results: list[TrainResult] = []

    def __call__(
        self, epochs: int, *, proximal_mu: float = 0.0, pull: Pull | None = None, lr: float | None = None
    ) -> TrainResult:
        """``lr``: this call's learning rate (personal epochs: personalization.lr), else the round's train.lr."""
        cfg, t = self.cfg, self.cfg.train
        if lr is None:
            lr = (
                t.lr
                if self.server_round is None
                else round_lr(t.lr, t.lr_schedule, self.server_round, cfg.num_server_rounds)
            )
        seed = self.seed + 7_919 * len(self.results)  # each call of a round shuffles differently, reproducibly
        extra: dict[str, Any] = {"extra_records": self.extra} if self.extra else {}
        if cfg.model.task == "causal-lm":
            extra["response_only"] = cfg.train.loss_on == "response"
        buckets = t.length_buckets if self.account is None else 1  # DP-SGD draws its own Poisson batches
        loader = self.task.make_loader(
            self.train_ds,
            self.tokenizer,
            cfg.data.max_length,
            t.batch_size,
            shuffle=True,
            seed=seed,
            length_buckets=buckets,
            **extra,
        )
        if self.account is not None:
            # DP noise and Poisson sampling come from fresh randomness inside private_train, never from the seed.
            private = private_train(
                self.model,
                loader,
                self.account,
                task=self.task,
                epochs=epochs,
                lr=lr,
                weight_decay=t.weight_decay,
                grad_sample_mode=cfg.privacy.grad_sample_mode,
                optimizer_name=t.optimizer,
                momentum=t.momentum,
                pull=pull,
            )
            self.account = private.account
            log.info("%d empty Poisson batches (noise only)", private.empty_batches)
            result = private.train
        else:
            # Dropout draws from torch's RNG: seed it per (run seed, round, partition) for reproducible
            # non-private training, inside a forked RNG so the process's own stream is left alone.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                result = train_local(
                    self.model,
                    loader,
                    task=self.task,
                    epochs=epochs,
                    lr=lr,
                    weight_decay=t.weight_decay,
                    proximal_mu=proximal_mu,
                    optimizer_name=t.optimizer,
                    momentum=t.momentum,
                    pull=pull,
                    precision=t.precision,
                )
        self.results.append(result)
        return result

    def total(self, main: TrainResult) -> TrainResult:
        """The reply's figures: ``main``'s loss (the training whose update is sent), every call's steps and time."""
        return TrainResult(
            loss=main.loss,
            num_examples=main.num_examples,
            steps=sum(r.steps for r in self.results),
            tokens=sum(r.tokens for r in self.results),
            seconds=sum(r.seconds for r in self.results),
        )


def _trainable_copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def ditto_pull(cfg: FedHFConfig, model: torch.nn.Module, anchors: dict[str, torch.Tensor]) -> Pull:
    """Ditto's pull of the personal adapter toward the round's global adapter (``anchors``, by parameter name)."""
    lr = cfg.personalization.lr if cfg.personalization.lr is not None else cfg.train.lr
    rate = min(1.0, lr * cfg.personalization.ditto_lambda)
    pairs = [(p, anchors[n]) for n, p in model.named_parameters() if p.requires_grad]
    return Pull(pairs, rate)


def _tensors(arrays: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}


def _arrays(state: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in state.items()}


def _run_account(cfg: FedHFConfig, saved: Any, n: int, delta: float) -> tuple[SampleAccount, str]:
    """This run's accountant on this node: continued from its saved entries, or created (sigma planned) now."""
    p = cfg.privacy
    if saved is not None:
        return SampleAccount(
            saved.accountant, saved.delta, saved.noise_multiplier, saved.max_grad_norm, list(saved.history)
        ), saved.accountant_id
    plan = plan_for(cfg, n, delta)
    return SampleAccount(p.accountant, plan.delta, plan.noise_multiplier, p.max_grad_norm), new_accountant_id()


def _budget_refusal(policy: NodePolicy, cfg: FedHFConfig, run_eps: float, life_eps: float) -> Refusal | None:
    if not math.isfinite(run_eps):
        return Refusal(
            "min-privacy", "this round's epsilon would be infinite (no noise): that is not differential privacy."
        )
    if policy.max_epsilon is not None and life_eps > policy.max_epsilon:
        return Refusal(
            "max-epsilon",
            f"this round would take the node's lifetime privacy spend on its data above its "
            f"budget (max-epsilon={policy.max_epsilon:g}, over every run on this data).",
        )
    budget = cfg.privacy.max_epsilon
    if budget is not None and run_eps > budget:
        return Refusal(
            "privacy.max-epsilon",
            f"this round would take the run's epsilon above the run's own budget (privacy.max-epsilon={budget:g}).",
        )
    return None


def reply_fields(
    shared: frozenset[str],
    *,
    pid: int,
    weight: float,
    num_examples: int,
    loss: float,
    histogram: list[int] | None,
    tokens: int,
    train_seconds: float,
    handler_seconds: float,
) -> tuple[dict[str, float | int], dict[str, Any]]:
    """(metrics, client-info) of a train reply: the averaging weight always, the optional fields only when shared."""
    metrics: dict[str, float | int] = {"weight": float(weight)}
    info: dict[str, Any] = {"partition-id": pid, "shared": sorted(shared)}
    if "num-examples" in shared:
        metrics["num-examples"] = int(num_examples)
    if "train-loss" in shared:
        metrics["train-loss"] = float(loss)
    if "label-histogram" in shared and histogram is not None:  # records have no labels to count
        info["label-histogram"] = list(histogram)
    if "train-tokens" in shared:
        info["train-tokens"] = int(tokens)
    if "timings" in shared:
        info["train-seconds"] = float(train_seconds)
        info["handler-seconds"] = float(handler_seconds)
    return metrics, info


def privacy_info(
    account: SampleAccount, accountant_id: str, policy: NodePolicy, lifetime: dict[str, Any] | None
) -> dict[str, Any]:
    """The privacy accounting a DP client reports (computed from the run's parameters and its batch count)."""
    out = {
        "epsilon": account.epsilon,
        "delta": account.delta,
        "noise-multiplier": account.noise_multiplier,
        "max-grad-norm": account.max_grad_norm,
        "sample-rate": account.history[-1][1],
        "steps": account.steps,
        "accountant": account.accountant,
        "accountant-id": accountant_id,
        "max-epsilon": policy.max_epsilon if policy.max_epsilon is not None else 0.0,
    }
    if lifetime is not None:
        out["lifetime-epsilon"] = float(lifetime["epsilon"])
        out["lifetime-delta"] = float(lifetime["delta"])
    return out


def evaluate_round(
    cfg: FedHFConfig,
    node: Node,
    global_state: dict[str, torch.Tensor],
    label_names: list[str] | None,
    node_config: Mapping[str, Any],
    state_root: Any = None,
    run_uid: str = "",
) -> tuple[dict[str, float | int], dict[str, Any]]:
    """Local evaluation on the node's held-out rows; under DP only when its owner shares 'local-eval'.
    Under fedrep the node evaluates with its own local part (``state_root``: where it keeps it), once it has one."""
    t0 = time.perf_counter()
    policy = parse_policy(node_config)
    p = cfg.privacy
    refusal = check_request(
        policy, mode=p.mode, secure=True, noise_multiplier=None if p.target_epsilon is not None else p.noise_multiplier
    )
    if refusal is not None:  # a run this node does not train for learns nothing from its data either
        return {}, {"partition-id": node.pid, "status": REFUSED, "rule": refusal.rule, "reason": refusal.reason}
    if "local-eval" not in policy.shared(p.mode != "none"):
        return {}, {"partition-id": node.pid, "status": "not-shared"}
    torch.set_num_threads(cfg.train.num_threads)
    _, eval_ds, names = node.data(cfg, label_names)
    if eval_ds is None or len(eval_ds) == 0:
        metrics = {"eval-loss": 0.0, "eval-accuracy": 0.0, "eval-f1": 0.0, "num-examples": 0, "weight": 0.0}
    else:
        tokenizer = load_tokenizer(cfg.model.name)
        model = SHELF.take(cfg, names)
        set_adapter_state(model, global_state)
        if cfg.personalization.mode == "fedrep" and state_root is not None and run_uid:
            local = SpendStore(state_root, data_key(cfg, node)).load_personal(run_uid, "local")
            if local is not None:  # FedRep's global adapter has no trained head: the node's own head reads it
                set_adapter_state(model, _tensors(local), part="local")
        task = get_task(cfg.model.task, names)
        loader = task.make_loader(eval_ds, tokenizer, cfg.data.max_length, 64, shuffle=False, sort_by_length=True)
        res = task.evaluate(model, loader, len(names))
        SHELF.give_back(model)
        metrics = {
            "eval-loss": res.loss,
            "eval-accuracy": res.accuracy,
            "eval-f1": res.macro_f1,
            "num-examples": res.num_examples,
            "weight": float(res.num_examples),
        }
    info: dict[str, Any] = {"partition-id": node.pid, "status": "evaluated"}
    if "timings" in policy.shared(p.mode != "none"):
        info["handler-seconds"] = time.perf_counter() - t0
    return metrics, info
