"""What a client does in a round, without Flower: find its data, train (DP-SGD or not), evaluate.

``client_app.py`` turns Flower messages into these calls and back. This module holds the
heavy imports (torch, transformers, peft, opacus, datasets): the ClientApp imports it only
inside the handlers that train or evaluate, because in a deployment every message starts a
fresh ClientApp process, and the SecAgg+ key-exchange messages need none of it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedhf import faults
from fedhf.config import FedHFConfig, check_secagg_weight, parse_node_budgets
from fedhf.data import label_histogram, load_partition, load_silo
from fedhf.errors import FedHFConfigError
from fedhf.model import build_model, get_adapter_state, load_tokenizer, set_adapter_state
from fedhf.privacy import SampleAccount, default_delta, plan_noise_multiplier, private_train, sampling
from fedhf.train import evaluate, make_loader, train_local
from fedhf.updates import encode, payload_nbytes


@dataclass(frozen=True)
class Node:
    """What this node holds: its id in the records, and where its rows come from."""

    pid: int
    num_partitions: int | None  # None: a silo with its own data at data_path
    data_path: str | None

    def data(self, cfg: FedHFConfig, label_names: list[str] | None) -> tuple[Any, Any, list[str]]:
        """(train rows, local eval rows or None, label names)."""
        if self.data_path is not None:
            if not label_names:
                raise FedHFConfigError("node config 'data-path' needs the federation's label names from the server; "
                                       "run the same fedhf version on the server and the nodes.")
            return load_silo(cfg.data, self.data_path, tuple(label_names), cfg.seed)
        return load_partition(cfg.data, cfg.seed, self.pid, self.num_partitions)


def node_of(node_config: Mapping[str, Any], node_id: int) -> Node:
    """Read and check a SuperNode's node config (errors name the key and the fix, on the node where they happen)."""
    path = node_config.get("data-path")
    if path is not None and str(path).strip():
        raw_pid = node_config.get("partition-id")
        try:
            pid = int(raw_pid) if raw_pid not in (None, "") else int(node_id)
        except (TypeError, ValueError):
            raise FedHFConfigError(f"node config 'partition-id': got {raw_pid!r}; give an integer or leave it out "
                                   "with data-path (the node id is used).") from None
        return Node(pid, None, str(path))
    try:
        pid, n = int(node_config["partition-id"]), int(node_config["num-partitions"])
    except (KeyError, ValueError, TypeError):
        raise FedHFConfigError(
            f"node config needs 'data-path' (this silo's data) or integer 'partition-id' and 'num-partitions' "
            f"(got {dict(node_config)}); start the SuperNode with --node-config 'data-path=\"/data/silo\"' or "
            "--node-config \"partition-id=0 num-partitions=2\"."
        ) from None
    return Node(pid, n, None)


def node_budget(cfg: FedHFConfig, node_config: Mapping[str, Any], pid: int) -> float | None:
    """The data owner's budget: node config 'max-epsilon', else privacy.node-max-epsilon, else privacy.max-epsilon."""
    raw = node_config.get("max-epsilon")
    if raw is not None and raw != "":
        try:
            value = float(raw)
        except (TypeError, ValueError):
            value = float("nan")
        if not value > 0 or value == float("inf"):
            raise FedHFConfigError(f"node config 'max-epsilon': got {raw!r}; give a positive number, e.g. max-epsilon=4.0.")
        return value
    per_node = parse_node_budgets(cfg.privacy.node_max_epsilon)
    return per_node.get(pid, cfg.privacy.max_epsilon)


def round_seed(cfg: FedHFConfig, server_round: int, pid: int) -> int:
    """Seed of a client's shuffling and dropout in a round (recorded in run.json's seeds)."""
    return cfg.seed * 100_003 + server_round * 1_009 + pid


@dataclass
class TrainOutcome:
    state: dict[str, np.ndarray] | None  # the reply payload (transport.dtype); None when the client did not train
    metrics: dict[str, float | int]
    info: dict[str, Any]
    privacy_state: dict[str, Any] | None  # the accountant's history to keep for the next round


def train_round(cfg: FedHFConfig, node: Node, global_state: dict[str, torch.Tensor], server_round: int, *,
                label_names: list[str] | None, node_config: Mapping[str, Any], privacy_state: dict[str, Any] | None,
                proximal_mu: float = 0.0) -> TrainOutcome:
    t0 = time.perf_counter()
    torch.set_num_threads(cfg.train.num_threads)
    pid = node.pid
    fault = faults.planned(node_config, pid, server_round)
    faults.before_training(fault, node_config)
    train_ds, _, names = node.data(cfg, label_names)
    info: dict[str, Any] = {"partition-id": pid, "label-histogram": label_histogram(train_ds["label"], len(names))}
    if cfg.strategy.secure_aggregation:
        check_secagg_weight(cfg, len(train_ds))  # before any DP step: a refused round spends no budget

    account = None
    budget = None
    if cfg.privacy.sample_level:
        account, sample_rate, steps = _sample_account(cfg, privacy_state, len(train_ds))
        privacy_state = account.to_state()
        budget = node_budget(cfg, node_config, pid)
        projected = account.epsilon_after(sample_rate, steps)
        if budget is not None and projected > budget:
            # Training this round would exceed the owner's budget: no update, a clear status.
            info.update(_privacy_info(account, sample_rate, budget))
            info.update({"status": "budget-exhausted", "projected-epsilon": projected,
                         "handler-seconds": time.perf_counter() - t0})
            return TrainOutcome(None, {"train-loss": 0.0, "num-examples": 0, "uniform-weight": 0.0}, info, privacy_state)

    tokenizer = load_tokenizer(cfg.model.name)
    model = build_model(cfg, names)
    set_adapter_state(model, global_state)
    loader = make_loader(train_ds, tokenizer, cfg.data.max_length, cfg.train.batch_size, shuffle=True,
                         seed=round_seed(cfg, server_round, pid))
    if account is not None:
        # DP noise and Poisson sampling come from fresh randomness inside private_train, never from the seed.
        private = private_train(model, loader, account, epochs=cfg.train.local_epochs, lr=cfg.train.lr,
                                weight_decay=cfg.train.weight_decay, grad_sample_mode=cfg.privacy.grad_sample_mode,
                                optimizer_name=cfg.train.optimizer, momentum=cfg.train.momentum)
        result = private.train
        privacy_state = private.account.to_state()
        info.update(_privacy_info(private.account, private.account.history[-1][1], budget))
        info["empty-batches"] = private.empty_batches
    else:
        # Dropout draws from torch's RNG: seed it per (run seed, round, partition) for reproducible
        # non-private training, inside a forked RNG so the process's own stream is left alone.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(round_seed(cfg, server_round, pid))
            result = train_local(model, loader, epochs=cfg.train.local_epochs, lr=cfg.train.lr,
                                 weight_decay=cfg.train.weight_decay, proximal_mu=proximal_mu,
                                 optimizer_name=cfg.train.optimizer, momentum=cfg.train.momentum)
    trained = faults.poison_values(fault, {k: v.numpy() for k, v in get_adapter_state(model).items()})
    encoded = encode(trained, {k: v.numpy() for k, v in global_state.items()}, cfg.transport.dtype)
    state = faults.poison_structure(fault, encoded.arrays)
    info.update({
        "status": "trained",
        "train-seconds": result.seconds,
        "handler-seconds": time.perf_counter() - t0,  # data, model build and (de)serialisation included
        "train-steps": result.steps,
        "train-tokens": result.tokens,
        "bytes-up": payload_nbytes(state),
        "transport": encoded.dtype,
    })
    if encoded.scales:
        info["int8-scales"] = encoded.scales
    metrics = {"train-loss": result.loss, "num-examples": result.num_examples,
               "uniform-weight": 1.0}  # client-level DP averages updates with equal weights
    return TrainOutcome(state, metrics, info, privacy_state)


def evaluate_round(cfg: FedHFConfig, node: Node, global_state: dict[str, torch.Tensor],
                   label_names: list[str] | None) -> tuple[dict[str, float | int], dict[str, Any]]:
    t0 = time.perf_counter()
    torch.set_num_threads(cfg.train.num_threads)
    _, eval_ds, names = node.data(cfg, label_names)
    if eval_ds is None or len(eval_ds) == 0:
        metrics = {"eval-loss": 0.0, "eval-accuracy": 0.0, "eval-f1": 0.0, "num-examples": 0, "uniform-weight": 1.0}
    else:
        tokenizer = load_tokenizer(cfg.model.name)
        model = build_model(cfg, names)
        set_adapter_state(model, global_state)
        loader = make_loader(eval_ds, tokenizer, cfg.data.max_length, 64, shuffle=False, sort_by_length=True)
        res = evaluate(model, loader, len(names))
        metrics = {"eval-loss": res.loss, "eval-accuracy": res.accuracy, "eval-f1": res.macro_f1,
                   "num-examples": res.num_examples, "uniform-weight": 1.0}
    return metrics, {"partition-id": node.pid, "handler-seconds": time.perf_counter() - t0}


def _sample_account(cfg: FedHFConfig, privacy_state: dict[str, Any] | None, num_examples: int) -> tuple[SampleAccount, float, int]:
    """This client's accountant for the whole run: restored from its saved state, or created (sigma planned) in its first round."""
    sample_rate, steps = sampling(num_examples, cfg.train.batch_size, cfg.train.local_epochs)
    if privacy_state:
        return SampleAccount.from_state(privacy_state), sample_rate, steps
    p = cfg.privacy
    delta = p.delta if p.delta is not None else default_delta(num_examples)
    sigma = p.noise_multiplier
    if p.target_epsilon is not None:
        sigma = plan_noise_multiplier(p.target_epsilon, delta, sample_rate, steps * cfg.num_server_rounds, p.accountant)
    return SampleAccount(p.accountant, delta, sigma, p.max_grad_norm), sample_rate, steps


def _privacy_info(account: SampleAccount, sample_rate: float, budget: float | None) -> dict[str, Any]:
    return {
        "epsilon": account.epsilon,
        "delta": account.delta,
        "noise-multiplier": account.noise_multiplier,
        "max-grad-norm": account.max_grad_norm,
        "sample-rate": sample_rate,
        "steps": account.steps,
        "accountant": account.accountant,
        "max-epsilon": budget if budget is not None else 0.0,
    }
