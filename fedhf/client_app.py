"""Flower ClientApp: records in, local training/evaluation, records out.

The run config comes from the server inside each message (the server parsed it once
from its run_config); the node config says which data this node holds: either its own
silo (``data-path=<file or folder on this machine>``) or one partition of a shared
dataset (``partition-id``/``num-partitions``, for simulations and demos), plus the data
owner's privacy budget (``max-epsilon``). With ``strategy.secure-aggregation`` the train
messages arrive through Flower's SecAgg+ mod in the legacy FitIns/FitRes format.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedhf.config import SPEC_BY_KEY, FedHFConfig, parse_config, parse_node_budgets
from fedhf.data import label_histogram, load_partition, load_silo
from fedhf.errors import FedHFConfigError
from fedhf.model import adapter_nbytes, build_model, get_adapter_state, load_tokenizer, set_adapter_state
from fedhf.privacy import SampleAccount, default_delta, plan_noise_multiplier, private_train, sampling
from fedhf.secagg import fitins_arrays, fitres_content, is_secure_round, secure_aggregation_mod
from fedhf.train import evaluate, make_loader, train_local

app = ClientApp(mods=[secure_aggregation_mod])

PRIVACY_STATE = "fedhf.privacy"  # this node's accountant history, kept in context.state across rounds
LABEL_NAMES_KEY = "fedhf.label-names"  # the federation's label names (JSON list), sent by the server


@dataclass(frozen=True)
class Node:
    """What this node holds: its id in the records, and where its rows come from."""

    pid: int
    num_partitions: int | None  # None: a silo with its own data at data_path
    data_path: str | None

    def data(self, cfg: FedHFConfig, config: ConfigRecord):
        if self.data_path is not None:
            names = json.loads(str(config.get(LABEL_NAMES_KEY, "[]")))
            if not names:
                raise FedHFConfigError("node config 'data-path' needs the federation's label names from the server; "
                                       "update the server's fedhf to this version.")
            return load_silo(cfg.data, self.data_path, tuple(names), cfg.seed)
        return load_partition(cfg.data, cfg.seed, self.pid, self.num_partitions)


def node_of(context: Context) -> Node:
    """Read and check the node config (errors name the key and the fix, on the node where they happen)."""
    node = context.node_config
    path = node.get("data-path")
    if path is not None and str(path).strip():
        raw_pid = node.get("partition-id")
        try:
            pid = int(raw_pid) if raw_pid not in (None, "") else int(context.node_id)
        except (TypeError, ValueError):
            raise FedHFConfigError(f"node config 'partition-id': got {raw_pid!r}; give an integer or leave it out "
                                   "with data-path (the node id is used).") from None
        return Node(pid, None, str(path))
    try:
        pid, n = int(node["partition-id"]), int(node["num-partitions"])
    except (KeyError, ValueError, TypeError):
        raise FedHFConfigError(
            f"node config needs 'data-path' (this silo's data) or integer 'partition-id' and 'num-partitions' "
            f"(got {dict(node)}); start the SuperNode with --node-config \"data-path=/data/silo\" or "
            "--node-config \"partition-id=0 num-partitions=2\"."
        ) from None
    return Node(pid, n, None)


def _setup(config: ConfigRecord, context: Context) -> tuple[FedHFConfig, Node, int]:
    cfg = parse_config({k: v for k, v in config.items() if k in SPEC_BY_KEY})
    torch.set_num_threads(cfg.train.num_threads)
    return cfg, node_of(context), int(config["server-round"])


def round_seed(cfg: FedHFConfig, server_round: int, pid: int) -> int:
    """Seed of a client's shuffling and dropout in a round (recorded in run.json's seeds)."""
    return cfg.seed * 100_003 + server_round * 1_009 + pid


@app.train()
def train(msg: Message, context: Context) -> Message:
    if is_secure_round(msg):  # SecAgg+: legacy FitIns in, masked FitRes out (secaggplus_mod masks it)
        arrays, config = fitins_arrays(msg)
        cfg = parse_config({k: v for k, v in config.items() if k in SPEC_BY_KEY})
        return Message(fitres_content(_train(arrays, config, context), arrays, cfg), reply_to=msg)
    return Message(_train(msg.content["arrays"], msg.content["config"], context), reply_to=msg)


def _train(arrays: ArrayRecord, config: ConfigRecord, context: Context) -> RecordDict:
    t0 = time.perf_counter()
    cfg, node, server_round = _setup(config, context)
    pid = node.pid
    train_ds, _, label_names = node.data(cfg, config)
    info: dict = {"partition-id": pid, "label-histogram": label_histogram(train_ds["label"], len(label_names))}

    account = None
    if cfg.privacy.sample_level:
        account, sample_rate, steps = _sample_account(cfg, context, len(train_ds))
        budget = node_budget(cfg, context, pid)
        projected = account.epsilon_after(sample_rate, steps)
        if budget is not None and projected > budget:
            # Training this round would exceed the owner's budget: no update, a clear status.
            info.update(_privacy_info(account, sample_rate, budget))
            info.update({"status": "budget-exhausted", "projected-epsilon": projected,
                         "handler-seconds": time.perf_counter() - t0})
            return RecordDict({"metrics": MetricRecord({"train-loss": 0.0, "num-examples": 0, "uniform-weight": 0.0}),
                               "client-info": ConfigRecord(info)})

    tokenizer = load_tokenizer(cfg.model.name)
    model = build_model(cfg, label_names)
    set_adapter_state(model, arrays.to_torch_state_dict())
    loader = make_loader(train_ds, tokenizer, cfg.data.max_length, cfg.train.batch_size, shuffle=True,
                         seed=round_seed(cfg, server_round, pid))
    if account is not None:
        # DP noise and Poisson sampling come from fresh randomness inside private_train, never from the seed.
        private = private_train(model, loader, account, epochs=cfg.train.local_epochs, lr=cfg.train.lr,
                                weight_decay=cfg.train.weight_decay, grad_sample_mode=cfg.privacy.grad_sample_mode)
        result = private.train
        context.state[PRIVACY_STATE] = ConfigRecord(private.account.to_state())
        info.update(_privacy_info(private.account, private.account.history[-1][1], budget))
        info["empty-batches"] = private.empty_batches
    else:
        mu = float(config.get("proximal-mu", 0.0)) if cfg.strategy.name == "fedprox" else 0.0
        # Dropout draws from torch's RNG: seed it per (run seed, round, partition) for reproducible
        # non-private training, inside a forked RNG so the process's own stream is left alone.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(round_seed(cfg, server_round, pid))
            result = train_local(model, loader, epochs=cfg.train.local_epochs, lr=cfg.train.lr,
                                 weight_decay=cfg.train.weight_decay, proximal_mu=mu)
    state = get_adapter_state(model)
    metrics = MetricRecord({
        "train-loss": result.loss,
        "num-examples": result.num_examples,
        "uniform-weight": 1.0,  # client-level DP averages updates with equal weights
    })
    info.update({
        "status": "trained",
        "train-seconds": result.seconds,
        "handler-seconds": time.perf_counter() - t0,  # data, model build and (de)serialisation included
        "train-steps": result.steps,
        "train-tokens": result.tokens,
        "bytes-up": adapter_nbytes(state),
    })
    return RecordDict({"arrays": ArrayRecord(state), "metrics": metrics, "client-info": ConfigRecord(info)})


def _sample_account(cfg: FedHFConfig, context: Context, num_examples: int) -> tuple[SampleAccount, float, int]:
    """This client's accountant for the whole run: restored from context.state, or created (sigma planned) in its first round."""
    sample_rate, steps = sampling(num_examples, cfg.train.batch_size, cfg.train.local_epochs)
    if PRIVACY_STATE in context.state:
        return SampleAccount.from_state(dict(context.state[PRIVACY_STATE])), sample_rate, steps
    p = cfg.privacy
    delta = p.delta if p.delta is not None else default_delta(num_examples)
    sigma = p.noise_multiplier
    if p.target_epsilon is not None:
        sigma = plan_noise_multiplier(p.target_epsilon, delta, sample_rate, steps * cfg.num_server_rounds, p.accountant)
    account = SampleAccount(p.accountant, delta, sigma, p.max_grad_norm)
    context.state[PRIVACY_STATE] = ConfigRecord(account.to_state())
    return account, sample_rate, steps


def node_budget(cfg: FedHFConfig, context: Context, pid: int) -> float | None:
    """The data owner's budget: node config 'max-epsilon', else privacy.node-max-epsilon, else privacy.max-epsilon."""
    raw = context.node_config.get("max-epsilon")
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


def _privacy_info(account: SampleAccount, sample_rate: float, budget: float | None) -> dict:
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


@app.evaluate()
def evaluate_local(msg: Message, context: Context) -> Message:
    t0 = time.perf_counter()
    config = msg.content["config"]
    cfg, node, _ = _setup(config, context)
    _, eval_ds, label_names = node.data(cfg, config)
    if eval_ds is None or len(eval_ds) == 0:
        metrics = MetricRecord({"eval-loss": 0.0, "eval-accuracy": 0.0, "eval-f1": 0.0, "num-examples": 0,
                                "uniform-weight": 1.0})
    else:
        tokenizer = load_tokenizer(cfg.model.name)
        model = build_model(cfg, label_names)
        set_adapter_state(model, msg.content["arrays"].to_torch_state_dict())
        loader = make_loader(eval_ds, tokenizer, cfg.data.max_length, 64, shuffle=False, sort_by_length=True)
        res = evaluate(model, loader, len(label_names))
        metrics = MetricRecord({"eval-loss": res.loss, "eval-accuracy": res.accuracy, "eval-f1": res.macro_f1,
                                "num-examples": res.num_examples, "uniform-weight": 1.0})
    info = ConfigRecord({"partition-id": node.pid, "handler-seconds": time.perf_counter() - t0})
    content = RecordDict({"metrics": metrics, "client-info": info})
    return Message(content=content, reply_to=msg)
