"""Personalization after the last round, on the node: what the federation gave this client, measured on its own rows.

The server sends the final global adapter once more (a Flower ``evaluate.personalize`` message). The node,
under its owner's policy, evaluates on its held-out rows:

- ``federated``: the global adapter as released (not under fedrep, whose global adapter has no trained head);
- ``personalized``: finetune: the global adapter fine-tuned here for ``personalization.epochs``; fedrep: the
  global adapter with this node's local parts; ditto: this node's personal adapter;
- ``local_only`` (``personalization.local-only``): an adapter trained on this node's rows alone, from the seed's
  initial adapter, for as many epochs as a client trains in the federation's rounds.

Personal adapters stay on the node (``STATE_DIR/data-<fingerprint>/personal/``); the reply carries only the metrics,
and only when the owner shares ``local-eval``. Under sample-level DP the fine-tuning and the local-only training are
DP-SGD from the run's accountant on this node: the spend is reserved first (refused past a budget) and reported
like a round's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import torch

from fedhf.federation.client import (
    REFUSED,
    Fit,
    RoundRequest,
    _arrays,
    _budget_refusal,
    _project,
    _tensors,
    data_key,
    node_rank,
    privacy_info,
    rank_refusal,
    round_seed,
    start_state,
)
from fedhf.federation.node import Node
from fedhf.federation.node_state import SpendStore, legacy_key
from fedhf.privacy.dp import default_delta, dp_epochs
from fedhf.privacy.policy import check_delta, check_request, parse_policy
from fedhf.tasks.base import get_task
from fedhf.tasks.model import build_model, get_adapter_state, load_tokenizer, set_adapter_state

log = logging.getLogger("fedhf")


def final_round(
    req: RoundRequest,
    node: Node,
    global_state: dict[str, torch.Tensor],
    *,
    node_config: Mapping[str, Any],
    state_root: Any,
) -> tuple[dict[str, float | int], dict[str, Any]]:
    """(metrics, client-info) of this node's personalization reply."""
    t0 = time.perf_counter()
    cfg = req.cfg
    pers = cfg.personalization
    p = cfg.privacy
    policy = parse_policy(node_config)
    info: dict[str, Any] = {"partition-id": node.pid}
    # Nothing is aggregated here: the secure-aggregation rule does not apply, the privacy level does.
    refusal = check_request(
        policy, mode=p.mode, secure=True, noise_multiplier=None if p.target_epsilon is not None else p.noise_multiplier
    ) or rank_refusal(cfg, node_config)
    if refusal is not None:
        return {}, {**info, "status": REFUSED, "rule": refusal.rule, "reason": refusal.reason}
    torch.set_num_threads(cfg.train.num_threads)
    train_ds, eval_ds, names = node.data(cfg, req.label_names)
    n = len(train_ds)
    store = SpendStore(state_root, data_key(cfg, node))
    kind = {"finetune": None, "fedrep": "local", "ditto": "ditto"}[pers.mode]
    saved = store.load_personal(req.run_uid, kind) if kind else None
    if kind and saved is None:
        return {}, {**info, "status": "no-personal-state"}  # this node never trained in the run: nothing to measure
    account, accountant_id, lifetime = None, "", None
    _, final_epochs = dp_epochs(cfg)
    if p.sample_level and final_epochs:
        delta = p.delta if p.delta is not None else default_delta(n)
        refusal = check_delta(policy, delta, n)
        if refusal is not None:
            return {}, {**info, "status": REFUSED, "rule": refusal.rule, "reason": refusal.reason}
        with store.transaction(legacy=legacy_key(node.pid, node.data_path)) as spend:
            proj = _project(req, spend, node.pid, n, delta, epochs=final_epochs)
            refusal = _budget_refusal(policy, cfg, proj.run_epsilon, proj.lifetime["epsilon"])
            if refusal is not None:
                log.warning("personalization refused: %s", refusal.text())
                return {}, {**info, "status": REFUSED, "rule": refusal.rule, "reason": refusal.reason}
            spend.add(proj.entry)  # reserved before training, as a round's
            account, accountant_id, lifetime = proj.account, proj.accountant_id, proj.lifetime

    tokenizer = load_tokenizer(cfg.model.name)
    task = get_task(cfg.model.task, names)
    model = build_model(cfg, names)
    set_adapter_state(model, global_state)
    seed = round_seed(cfg, cfg.num_server_rounds + 1, node.pid)
    results: dict[str, Any] = {}

    def evaluate(stage: str) -> None:
        if eval_ds is None or len(eval_ds) == 0:
            return
        loader = task.make_loader(eval_ds, tokenizer, cfg.data.max_length, 64, shuffle=False, sort_by_length=True)
        res = task.evaluate(model, loader, len(names))
        results.update({f"{stage}-accuracy": res.accuracy, f"{stage}-f1": res.macro_f1, f"{stage}-loss": res.loss})

    if pers.mode != "fedrep":
        evaluate("federated")  # the global adapter as released, at the run's rank
    rank = node_rank(cfg, node_config)
    if rank is not None:
        model = build_model(cfg, names, rank=rank)
        set_adapter_state(model, start_state(global_state, rank))
    steps = 0
    if pers.mode == "finetune":
        fit = Fit(cfg, model, train_ds, tokenizer, account, seed, label_names=names)
        fit(pers.epochs, lr=pers.lr)
        account, steps = fit.account, steps + sum(r.steps for r in fit.results)
        store.save_personal(req.run_uid, "finetune", _arrays(get_adapter_state(model, "trained")))
    elif saved is not None:
        set_adapter_state(model, _tensors(saved), part="local" if kind == "local" else "travels")
    evaluate("personalized")
    if pers.local_only:
        alone = build_model(cfg, names, rank=rank)  # the seed's initial adapter, as round 1 starts from
        fit = Fit(cfg, alone, train_ds, tokenizer, account, seed + 1, label_names=names)
        fit(cfg.num_server_rounds * cfg.train.local_epochs)
        account, steps = fit.account, steps + sum(r.steps for r in fit.results)
        model = alone
        evaluate("local-only")
    shared = policy.shared(p.mode != "none")
    info["status"] = "personalized"
    info["train-steps"] = steps
    metrics: dict[str, float | int] = {}
    if "local-eval" in shared:
        metrics = {**results, "num-examples": len(eval_ds) if eval_ds is not None else 0}
    else:
        info["status"] = "not-shared"
    if "timings" in shared:
        info["handler-seconds"] = time.perf_counter() - t0
    if account is not None:
        info.update(privacy_info(account, accountant_id, policy, lifetime))
    return metrics, info
