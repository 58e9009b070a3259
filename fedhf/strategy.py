"""Strategy construction from the config, and the recording hooks around it.

The Flower strategies run unchanged: fedhf only observes their messages (what was
sent, which clients replied, how long they trained) by overriding the configure /
aggregate methods and calling the parent. It does not replace ``start()``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, FedYogi, Strategy

from fedhf.artifacts import RunRecorder
from fedhf.config import FedHFConfig
from fedhf.errors import FedHFRunError

log = logging.getLogger("fedhf")

BASES: dict[str, type[FedAvg]] = {"fedavg": FedAvg, "fedprox": FedProx, "fedadam": FedAdam, "fedyogi": FedYogi}


def train_metrics_aggr(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Example-weighted mean train loss, and the total number of examples."""
    metrics = [next(iter(r.metric_records.values())) for r in records]
    total = sum(float(m[weight_key]) for m in metrics)
    loss = sum(float(m["train-loss"]) * float(m[weight_key]) for m in metrics) / total if total else 0.0
    return MetricRecord({"train-loss": loss, "num-examples": int(total)})


def eval_metrics_aggr(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Example-weighted means of local eval metrics; clients without a local split weigh zero."""
    metrics = [next(iter(r.metric_records.values())) for r in records]
    total = sum(float(m[weight_key]) for m in metrics)
    out: dict[str, Any] = {"num-examples": int(total)}
    for key in ("eval-loss", "eval-accuracy", "eval-f1"):
        out[key] = sum(float(m[key]) * float(m[weight_key]) for m in metrics) / total if total else 0.0
    return MetricRecord(out)


def _payload_bytes(arrays: ArrayRecord) -> int:
    return sum(len(a.data) for a in arrays.values())


def _recording(base: type[FedAvg]) -> type[FedAvg]:
    class Recording(base):  # type: ignore[valid-type, misc]
        recorder: RunRecorder

        def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                            grid: Grid) -> Iterable[Message]:
            messages = list(super().configure_train(server_round, arrays, config, grid))
            self.recorder.start_round(server_round, _payload_bytes(arrays), len(messages))
            return messages

        def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
            replies = list(replies)
            clients, failures = [], []
            for msg in replies:
                if msg.has_error():
                    failures.append({"node-id": msg.metadata.src_node_id, "reason": msg.error.reason})
                    continue
                info = msg.content["client-info"]
                metrics = msg.content["metrics"]
                clients.append({
                    "node-id": msg.metadata.src_node_id,
                    "partition-id": int(info["partition-id"]),
                    "num-examples": int(metrics["num-examples"]),
                    "train-loss": float(metrics["train-loss"]),
                    "train-seconds": float(info["train-seconds"]),
                    "handler-seconds": float(info["handler-seconds"]),
                    "train-steps": int(info["train-steps"]),
                    "train-tokens": int(info["train-tokens"]),
                    "bytes-up": _payload_bytes(msg.content["arrays"]),
                    "label-histogram": list(info["label-histogram"]),
                })
            clients.sort(key=lambda c: c["partition-id"])
            self.recorder.train_replies(clients, failures)
            if not clients:
                reasons = "; ".join(f["reason"].strip().splitlines()[-1] for f in failures if f["reason"]) or "no replies"
                raise FedHFRunError(f"round {server_round}: no client returned an update ({reasons[:500]}).")
            return super().aggregate_train(server_round, replies)

        def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
            replies = list(replies)
            agg = super().aggregate_evaluate(server_round, replies)
            seconds = [float(m.content["client-info"]["handler-seconds"]) for m in replies if not m.has_error()]
            if agg is not None and int(agg["num-examples"]) > 0:
                self.recorder.local_eval(float(agg["eval-loss"]), float(agg["eval-accuracy"]), seconds)
            else:
                self.recorder.local_eval(None, None, seconds)
            return agg

    Recording.__name__ = base.__name__
    Recording.__qualname__ = base.__qualname__
    return Recording


def build_strategy(cfg: FedHFConfig, recorder: RunRecorder) -> Strategy:
    s = cfg.strategy
    common: dict[str, Any] = dict(
        fraction_train=s.fraction_train,
        fraction_evaluate=s.fraction_evaluate,
        min_train_nodes=s.min_train_nodes,
        min_evaluate_nodes=s.min_evaluate_nodes if s.fraction_evaluate > 0 else 0,
        min_available_nodes=s.min_available_nodes,
        train_metrics_aggr_fn=train_metrics_aggr,
        evaluate_metrics_aggr_fn=eval_metrics_aggr,
    )
    if s.name == "fedprox":
        common["proximal_mu"] = s.proximal_mu
    elif s.name in ("fedadam", "fedyogi"):
        common.update(eta=s.server_lr, eta_l=cfg.train.lr, beta_1=s.beta_1, beta_2=s.beta_2, tau=s.tau)
    strategy = _recording(BASES[s.name])(**common)
    strategy.recorder = recorder
    return strategy
