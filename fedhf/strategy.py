"""Strategy construction from the config, and the recording hooks around it.

The Flower strategies run unchanged: fedhf only observes their messages (what was
sent, which clients replied, how long they trained) by overriding the configure /
aggregate methods and calling the parent. It does not replace ``start()``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import math

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Strategy,
)

from fedhf.artifacts import RunRecorder
from fedhf.config import FedHFConfig
from fedhf.errors import FedHFConfigError
from fedhf.errors import FedHFRunError
from fedhf.ledger import CLIENT as CLIENT_LEVEL
from fedhf.privacy import ClientLevelAccount, effective_client_sigma
from fedhf.updates import DecodeError, check_update, decode

log = logging.getLogger("fedhf")

BASES: dict[str, type[FedAvg]] = {"fedavg": FedAvg, "fedprox": FedProx, "fedadam": FedAdam, "fedyogi": FedYogi,
                                   "fedmedian": FedMedian, "fedtrimmedavg": FedTrimmedAvg}


def train_metrics_aggr(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Example-weighted mean train loss, and the total number of examples (whatever weights the arrays)."""
    metrics = [next(iter(r.metric_records.values())) for r in records]
    total = sum(float(m["num-examples"]) for m in metrics)
    loss = sum(float(m["train-loss"]) * float(m["num-examples"]) for m in metrics) / total if total else 0.0
    return MetricRecord({"train-loss": loss, "num-examples": int(total)})


def eval_metrics_aggr(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Example-weighted means of local eval metrics; clients without a local split weigh zero."""
    metrics = [next(iter(r.metric_records.values())) for r in records]
    total = sum(float(m["num-examples"]) for m in metrics)
    out: dict[str, Any] = {"num-examples": int(total)}
    for key in ("eval-loss", "eval-accuracy", "eval-f1"):
        out[key] = sum(float(m[key]) * float(m["num-examples"]) for m in metrics) / total if total else 0.0
    return MetricRecord(out)


def as_dtypes(arrays: ArrayRecord | None, dtypes: dict[str, np.dtype]) -> ArrayRecord | None:
    """The global adapter kept in the adapter's own dtypes: Flower's server optimizers compute in float64,
    which would double the bytes sent down and make every client's float32 reply look mistyped."""
    if arrays is None or all(a.numpy().dtype == dtypes.get(k) for k, a in arrays.items()):
        return arrays
    return ArrayRecord({k: Array(a.numpy().astype(dtypes.get(k, a.numpy().dtype))) for k, a in arrays.items()})


def _payload_bytes(arrays: ArrayRecord) -> int:
    return sum(len(a.data) for a in arrays.values())


class RunStopped(Exception):
    """Too few clients can still train (e.g. privacy budgets exhausted): end the run cleanly."""


def _client_record(msg: Message) -> dict[str, Any]:
    info = msg.content["client-info"]
    metrics = msg.content["metrics"]
    rec: dict[str, Any] = {
        "node-id": msg.metadata.src_node_id,
        "partition-id": int(info["partition-id"]),
        "status": str(info.get("status", "trained")),
        "num-examples": int(metrics["num-examples"]),
        "train-loss": float(metrics["train-loss"]),
        "label-histogram": list(info["label-histogram"]),
        "handler-seconds": float(info["handler-seconds"]),
    }
    if info.get("replayed"):  # the reply this client already sent for the round, before the server restarted
        rec["replayed"] = True
    if rec["status"] == "trained":
        rec.update({
            "train-seconds": float(info["train-seconds"]),
            "train-steps": int(info["train-steps"]),
            "train-tokens": int(info["train-tokens"]),
            # under secure aggregation the upload is the masked vector, not the (aggregate) arrays in the reply
            "bytes-up": int(info["secagg-bytes-up"]) if "secagg-bytes-up" in info else _payload_bytes(msg.content["arrays"]),
        })
    if "epsilon" in info:
        rec["privacy"] = {k: info[k] for k in ("epsilon", "delta", "noise-multiplier", "max-grad-norm", "sample-rate",
                                               "steps", "accountant", "max-epsilon") if k in info}
        if "projected-epsilon" in info:
            rec["privacy"]["projected-epsilon"] = float(info["projected-epsilon"])
    return rec


def _recording(base: type[FedAvg]) -> type[FedAvg]:
    class Recording(base):  # type: ignore[valid-type, misc]
        recorder: RunRecorder
        exhausted: set[int]
        latest_arrays: ArrayRecord | None = None
        recorded_round: int = -1
        population: int = 0
        announced: set[int]
        sampled: list[int] = []
        dtypes: dict[str, np.dtype]
        timeout: float = 0.0
        max_update_norm: float = 0.0

        def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                            grid: Grid) -> Iterable[Message]:
            self.latest_arrays = arrays
            nodes = list(grid.get_node_ids())
            self.population = len(nodes)
            able = [n for n in nodes if n not in self.exhausted]
            if self.exhausted and len(able) < self.min_train_nodes:
                raise RunStopped(
                    f"before round {server_round}: only {len(able)} client(s) can still train within their privacy "
                    f"budget; strategy.min-train-nodes={self.min_train_nodes}"
                )
            messages = [m for m in super().configure_train(server_round, arrays, config, grid)
                        if m.metadata.dst_node_id not in self.exhausted]
            self.sampled = [m.metadata.dst_node_id for m in messages]
            if not self.dtypes:  # the adapter's own dtypes (float32), from the initial / resumed adapter
                self.dtypes = {k: a.numpy().dtype for k, a in arrays.items()}
            self.recorder.start_round(server_round, _payload_bytes(arrays), len(messages))
            return messages

        def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
            replies = list(replies)
            if self.recorded_round != server_round:  # a client-level DP wrapper may have recorded them already
                replies = self.record_replies(server_round, replies)
            arrays, metrics = super().aggregate_train(server_round, replies)
            return as_dtypes(arrays, self.dtypes), metrics

        def record_replies(self, server_round: int, replies: list[Message]) -> list[Message]:
            """Record every reply of a round; return those that carry an update. Raises when none does."""
            self.recorded_round = server_round
            records, failures, trained, rejected = [], [], [], []
            reference = {k: a.numpy().astype(self.dtypes.get(k), copy=False) for k, a in self.latest_arrays.items()} \
                if self.latest_arrays is not None else {}
            for msg in replies:
                if msg.has_error():
                    failures.append({"node-id": msg.metadata.src_node_id, "reason": msg.error.reason})
                    continue
                try:
                    rec = _client_record(msg)
                except (KeyError, TypeError, ValueError) as exc:
                    failures.append({"node-id": msg.metadata.src_node_id,
                                     "reason": f"malformed reply ({type(exc).__name__}: {exc})"})
                    continue
                if rec["status"] == "trained":
                    reason = self.check_reply(msg, rec, reference)
                    if reason is not None:
                        rec["status"], rec["reason"] = "rejected", reason
                        rejected.append({"node-id": rec["node-id"], "partition-id": rec["partition-id"], "reason": reason})
                        log.warning("round %d: dropped the update of client %d (node %d): %s", server_round,
                                    rec["partition-id"], rec["node-id"], reason)
                records.append(rec)
                if "privacy" in rec and rec["partition-id"] not in self.announced:
                    self.announced.add(rec["partition-id"])
                    p, n = rec["privacy"], sum(rec["label-histogram"])
                    log.info("client %d: sample-level DP with sigma %.4f, C %g, sampling rate %.4f, delta %.3g "
                             "(below 1/n = %.3g for its %d training rows), %s accountant, budget %s",
                             rec["partition-id"], p["noise-multiplier"], p["max-grad-norm"], p["sample-rate"], p["delta"],
                             1 / max(n, 1), n, p["accountant"], p["max-epsilon"] or "none")
                if rec["status"] == "trained":
                    trained.append(msg)
                elif rec["status"] in ("not-aggregated", "rejected"):  # withheld by secure aggregation / dropped
                    continue
                else:
                    self.exhausted.add(msg.metadata.src_node_id)
                    log.warning("round %d: client %d (node %d) did not train: %s (epsilon %.3f, projected %.3f > budget %.3f)",
                                server_round, rec["partition-id"], rec["node-id"], rec["status"],
                                rec["privacy"]["epsilon"], rec["privacy"].get("projected-epsilon", float("nan")),
                                rec["privacy"]["max-epsilon"])
            replied = {m.metadata.src_node_id for m in replies}
            for node in self.sampled:
                if node not in replied:
                    failures.append({"node-id": node, "reason": f"no reply within strategy.round-timeout={self.timeout:g} s"})
            for f in failures:
                log.warning("round %d: node %d failed: %s", server_round, f["node-id"],
                            (f["reason"] or "").strip().splitlines()[-1][:300] if f["reason"] else "no reason given")
            records.sort(key=lambda c: c["partition-id"])
            self.recorder.train_replies(records, failures, rejected)
            for rec in records:  # a client whose accountant restarted may have passed its budget in truth
                if rec["partition-id"] in self.recorder.over_budget():
                    self.exhausted.add(rec["node-id"])
            if trained and len(trained) < self.min_train_nodes and (failures or rejected):
                raise FedHFRunError(
                    f"round {server_round}: only {len(trained)} valid update(s) ({len(failures)} client(s) failed, "
                    f"{len(rejected)} update(s) rejected); strategy.min-train-nodes={self.min_train_nodes}. The last "
                    f"checkpoint is kept: continue with fedhf run --resume {self.recorder.dir} once the clients are back.")
            if not trained and rejected and not failures:
                raise FedHFRunError(f"round {server_round}: every update was rejected ({rejected[0]['reason']}).")
            if not trained:
                if any(r["status"] == "not-aggregated" for r in records):
                    log.warning("round %d: no update released (secure aggregation withheld the round); the global "
                                "adapter is unchanged", server_round)
                    return []
                if records and not failures:
                    raise RunStopped(f"round {server_round}: every sampled client has exhausted its privacy budget")
                reasons = "; ".join(f["reason"].strip().splitlines()[-1] for f in failures if f["reason"]) or "no replies"
                raise FedHFRunError(f"round {server_round}: no client returned an update ({reasons[:500]}).")
            return trained

        def check_reply(self, msg: Message, rec: dict[str, Any], reference: dict[str, np.ndarray]) -> str | None:
            """Decode the reply's update (transport.dtype) in place and check it; the reason to drop it, or None."""
            content = msg.content
            if "arrays" not in content.array_records or len(content.array_records) != 1:
                return f"expected one ArrayRecord 'arrays', got {sorted(content.array_records)}"
            weight = content["metrics"].get(self.weighted_by_key)
            if not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
                return f"weight '{self.weighted_by_key}' is {weight!r}; it must be a finite number >= 0"
            info = content["client-info"]
            try:
                payload = {k: a.numpy() for k, a in content["arrays"].items()}
                scales = [float(x) for x in info["int8-scales"]] if "int8-scales" in info else None
                trained = decode(payload, reference, str(info.get("transport", "fp32")), scales)
            except (DecodeError, ValueError, TypeError) as exc:
                return f"cannot decode the update: {exc}"
            reason, norm = check_update(trained, reference, self.max_update_norm)
            if norm is not None:
                rec["update-norm"] = norm
            if reason is None and info.get("transport", "fp32") != "fp32":
                content["arrays"] = ArrayRecord({k: Array(v) for k, v in trained.items()})
            return reason

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


def _client_level(base: type[Strategy]) -> type[Strategy]:
    """Flower's central-DP wrapper, accounting each round as one release of the clients that sent an update.

    The noise on the uniform average is sigma * C / m with m the number of updates actually
    aggregated (a client out of budget sends none), so the sensitivity C/m always matches.
    """

    class ClientLevel(base):  # type: ignore[valid-type, misc]
        account: ClientLevelAccount
        recorder: RunRecorder

        def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
            trained = self.strategy.record_replies(server_round, list(replies))
            self.num_sampled_clients = len(trained)
            arrays, metrics = super().aggregate_train(server_round, trained)
            if arrays is None:  # Flower skipped the release: nothing is accounted, and nothing changes
                raise FedHFRunError(f"round {server_round}: the client-level DP wrapper did not aggregate the updates")
            arrays = as_dtypes(arrays, self.strategy.dtypes)
            population = max(self.strategy.population, len(trained))
            self.account.add_round(len(trained) / population)
            self.recorder.client_level_round({
                "clients_aggregated": len(trained), "population": population,
                "sample_rate": len(trained) / population, "epsilon": self.account.epsilon,
                "epsilon_no_amplification": self.account.epsilon_no_amplification,
                "clipping_norm": float(getattr(self, "clipping_norm", 0.0)),
            })
            return arrays, metrics

    ClientLevel.__name__ = base.__name__
    return ClientLevel


def build_strategy(cfg: FedHFConfig, recorder: RunRecorder, population: int | None = None) -> Strategy:
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
    elif s.name == "fedtrimmedavg":
        common["beta"] = s.trim_beta
    elif s.name in ("fedadam", "fedyogi"):
        common.update(eta=s.server_lr, eta_l=cfg.train.lr, beta_1=s.beta_1, beta_2=s.beta_2, tau=s.tau)
    p = cfg.privacy
    if p.client_level:
        common["weighted_by_key"] = "uniform-weight"  # DP-FedAvg averages the clipped updates with equal weights
    strategy = _recording(BASES[s.name])(**common)
    strategy.recorder = recorder
    strategy.exhausted = set()
    strategy.announced = set()
    strategy.sampled = []
    strategy.dtypes = {}
    strategy.timeout = s.round_timeout
    strategy.max_update_norm = s.max_update_norm
    if not p.client_level:
        return strategy
    m = max(1, min_sampled(cfg, population))
    if p.client_clipping == "server-fixed":
        wrapper = _client_level(DifferentialPrivacyServerSideFixedClipping)(
            strategy, noise_multiplier=p.client_noise_multiplier, clipping_norm=p.client_clipping_norm, num_sampled_clients=m)
        count_std = None
    else:
        count_std = p.client_clipped_count_stddev if p.client_clipped_count_stddev is not None else m / 20
        if p.client_noise_multiplier >= 2 * count_std:
            raise FedHFConfigError(
                f"config key 'privacy.client-clipped-count-stddev': {count_std:g} is too small for "
                f"privacy.client-noise-multiplier={p.client_noise_multiplier:g} with adaptive clipping; set it above "
                f"{p.client_noise_multiplier / 2:g} (the count noise must be at least half the update noise) or use server-fixed."
            )
        wrapper = _client_level(DifferentialPrivacyServerSideAdaptiveClipping)(
            strategy, noise_multiplier=p.client_noise_multiplier, num_sampled_clients=m,
            initial_clipping_norm=p.client_clipping_norm, clipped_count_stddev=count_std)
    # Flower raises the update noise under adaptive clipping (wrapper.noise_multiplier); the noisy
    # clipped count is a second Gaussian release, composed conservatively (sensitivity 1).
    sigma_eff = effective_client_sigma(wrapper.noise_multiplier, count_std)
    delta = p.client_delta if p.client_delta is not None else 0.1 / max(population or m, 1)
    wrapper.account = ClientLevelAccount(sigma_eff, delta)
    wrapper.recorder = recorder
    recorder.set_client_level({
        "label": CLIENT_LEVEL, "clipping": p.client_clipping, "noise_multiplier": p.client_noise_multiplier,
        "clipped_count_stddev": count_std, "effective_noise_multiplier": sigma_eff, "delta": delta,
        "accountant": "rdp",
        "sampling": ("q = clients aggregated / clients in the federation, accounted as Poisson subsampling (Flower "
                     "samples a fixed number of clients: an approximation); epsilon_no_amplification (q = 1) holds "
                     "for any way of picking clients"),
        "aggregation": "uniform average of updates clipped to C (L2), Gaussian noise sigma * C / clients aggregated",
    })
    return wrapper


def min_sampled(cfg: FedHFConfig, population: int | None) -> int:
    """Clients sampled per round, as FedAvg computes it (for the wrapper's initial noise scale)."""
    s = cfg.strategy
    if population is None:
        return s.min_train_nodes
    return max(int(population * s.fraction_train), s.min_train_nodes)


# ----------------------------------------------------------------------------- checkpoint and resume


def _inner(strategy: Strategy) -> Strategy:
    return getattr(strategy, "strategy", strategy)  # the client-level DP wrapper holds the aggregating strategy


def strategy_state(strategy: Strategy) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """What a restart needs from the strategy: server-optimizer moments (FedAdam/FedYogi), the adaptive
    clipping norm and the client-level accountant's history."""
    arrays: dict[str, np.ndarray] = {}
    for name in ("m_t", "v_t"):
        moments = getattr(_inner(strategy), name, None)
        if moments:
            arrays.update({f"{name}/{k}": np.asarray(v) for k, v in moments.items()})
    state: dict[str, Any] = {"class": type(_inner(strategy)).__name__}
    if hasattr(strategy, "clipping_norm"):
        state["clipping_norm"] = float(strategy.clipping_norm)
    account = getattr(strategy, "account", None)
    if isinstance(account, ClientLevelAccount):
        state["client_level_history"] = [[float(s), float(q), int(n)] for s, q, n in account.history]
    return arrays, state


def restore_strategy_state(strategy: Strategy, arrays: dict[str, np.ndarray], state: dict[str, Any]) -> None:
    inner = _inner(strategy)
    if state.get("class") != type(inner).__name__:
        raise FedHFRunError(f"the checkpoint was written by strategy {state.get('class')!r}, this run builds "
                            f"{type(inner).__name__!r}; resume with the run's own configuration.")
    for name in ("m_t", "v_t"):
        moments = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith(name + "/")}
        if moments:
            setattr(inner, name, moments)
    if "clipping_norm" in state:
        strategy.clipping_norm = float(state["clipping_norm"])
    if "client_level_history" in state:
        strategy.account.history = [(float(s), float(q), int(n)) for s, q, n in state["client_level_history"]]


class Resumed(Strategy):
    """Runs the remaining rounds of a resumed run through Flower's own ``Strategy.start``.

    ``start`` counts rounds from 1; this shim hands the wrapped strategy the run's real round
    numbers (``offset`` + 1, ...), which FedAdam's bias correction and the clients' seeds use.
    """

    def __init__(self, strategy: Strategy, offset: int) -> None:
        self.strategy = strategy
        self.offset = offset

    def summary(self) -> None:
        self.strategy.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_train(server_round + self.offset, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.strategy.aggregate_train(server_round + self.offset, replies)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round + self.offset, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round + self.offset, replies)
