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
from fedhf.config import FedHFConfig, check_secagg_weight
from fedhf.data import label_histogram
from fedhf.node import Node, node_budget, node_of  # noqa: F401  (node_of: the ClientApp's entry to node configs)
from fedhf.model import build_model, get_adapter_state, load_tokenizer, set_adapter_state
from fedhf.privacy import SampleAccount, default_delta, plan_noise_multiplier, private_train, sampling
from fedhf.train import evaluate, make_loader, train_local
from fedhf.updates import encode, payload_nbytes


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
