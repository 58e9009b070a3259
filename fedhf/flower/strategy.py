"""Strategies from the config: Flower's own, held by fedhf's wrappers (as Flower's DP wrappers hold theirs).

``Screened`` holds the aggregating Flower strategy (FedAvg, FedProx, FedAdam, ...): it sees every
message (what was sent, which clients replied, what they reported) and hands the inner strategy
only what passed. Every reply is screened first (``fedhf.federation.replies`` for its fields,
``fedhf.federation.updates`` for its tensors): a malformed reply is that client's failure for
the round, a refusal stops the node being sampled, and Flower aggregates only the validated
update and weight of the rest. ``ClientLevel`` holds Flower's central-DP wrapper (which holds
``Screened``) and accounts each round as one release. Neither replaces ``Strategy.start()``.
What is seen goes to a ``RoundObserver`` (the run record, in practice).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

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

from fedhf.config.schema import FedHFConfig
from fedhf.errors import FedHFConfigError, FedHFRunError, RunStopped
from fedhf.federation.events import RoundObserver
from fedhf.federation.lora_ranks import aggregate_products, pad, truncate
from fedhf.federation.replies import Malformed, screen_evaluate, screen_train
from fedhf.federation.updates import DecodeError, check_update, decode
from fedhf.privacy.dp import ClientLevelAccount, effective_client_sigma
from fedhf.privacy.ledger import CLIENT as CLIENT_LEVEL

log = logging.getLogger("fedhf")

BASES: dict[str, type[FedAvg]] = {
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedmedian": FedMedian,
    "fedtrimmedavg": FedTrimmedAvg,
}


def train_metrics_aggr(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """The total averaging weight (fedhf records the clients' shared train losses itself)."""
    metrics = [next(iter(r.metric_records.values())) for r in records]
    return MetricRecord({weight_key: float(sum(float(m[weight_key]) for m in metrics))})


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


def _records(msg: Message) -> tuple[dict[str, Any], dict[str, Any], ArrayRecord | None]:
    "(metrics, client info, arrays) of a reply, as plain dicts; Malformed when the records are not as sent by fedhf."
    content = msg.content
    extra = sorted(set(content.keys()) - {"arrays", "metrics", "client-info"})
    if extra:
        raise Malformed(f"unexpected record '{extra[0]}' in the reply")
    info = content.get("client-info")
    if not isinstance(info, ConfigRecord):
        raise Malformed("the reply has no ConfigRecord 'client-info'")
    metrics = content.get("metrics", MetricRecord())
    if not isinstance(metrics, MetricRecord):
        raise Malformed("'metrics' is not a MetricRecord")
    arrays = content.get("arrays")
    if arrays is not None and not isinstance(arrays, ArrayRecord):
        raise Malformed("'arrays' is not an ArrayRecord")
    return dict(metrics), dict(info), arrays


@dataclass
class _Round:
    """What the replies of one round came to, as they are screened."""

    records: list[dict[str, Any]] = field(default_factory=list)  # one per client that replied validly
    failures: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    refused: list[dict[str, Any]] = field(default_factory=list)
    trained: list[Message] = field(default_factory=list)  # rebuilt to the validated update and weight
    shared_counts: list[bool] = field(default_factory=list)


class Screened(Strategy):
    """The fedhf side of a strategy: what it sends, which replies it accepts, what it records.

    Holds the aggregating Flower strategy (``inner``); that strategy only ever sees replies that
    passed :meth:`record_replies`, rebuilt to exactly the validated update and weight.
    """

    latest_arrays: ArrayRecord | None = None
    recorded_round: int = -1
    population: int = 0

    def __init__(self, inner: FedAvg, cfg: FedHFConfig, recorder: RoundObserver, num_labels: int | None = None) -> None:
        self.inner = inner
        self.name = cfg.strategy.name  # what a checkpoint names (the config's word, not a class name)
        self.recorder = recorder
        self.excluded: dict[int, str] = {}  # node id -> why it is no longer sampled (a policy refusal, a budget)
        self.announced: set[int] = set()
        self.sampled: list[int] = []
        self.dtypes: dict[str, np.dtype] = {}
        self.timeout = cfg.strategy.round_timeout
        self.max_update_norm = cfg.strategy.max_update_norm
        self.max_weight = cfg.strategy.max_weight
        self.uniform_weights = cfg.privacy.client_level  # client-level DP: the server imposes equal weights
        self.sample_level = cfg.privacy.sample_level
        self.num_labels = num_labels
        self.svd_rank = cfg.model.lora.r if cfg.strategy.lora_aggregation == "svd" else None

    @property
    def min_train_nodes(self) -> int:
        return self.inner.min_train_nodes

    @property
    def weighted_by_key(self) -> str:  # read by Flower's DP wrappers
        return self.inner.weighted_by_key

    def summary(self) -> None:
        self.inner.summary()

    @property
    def exhausted(self) -> set[int]:
        return set(self.excluded)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.latest_arrays = arrays
        nodes = list(grid.get_node_ids())
        self.population = len(nodes)
        able = [n for n in nodes if n not in self.excluded]
        if self.excluded and len(able) < self.min_train_nodes:
            reasons = "; ".join(sorted(set(self.excluded.values())))[:500]
            raise RunStopped(
                f"before round {server_round}: only {len(able)} client(s) can still train "
                f"(strategy.min-train-nodes={self.min_train_nodes}); the others refused or ran out of "
                f"budget: {reasons}"
            )
        messages = [
            m
            for m in self.inner.configure_train(server_round, arrays, config, grid)
            if m.metadata.dst_node_id not in self.excluded
        ]
        self.sampled = [m.metadata.dst_node_id for m in messages]
        if not self.dtypes:  # the adapter's own dtypes (float32), from the initial / resumed adapter
            self.dtypes = {k: a.numpy().dtype for k, a in arrays.items()}
        self.recorder.start_round(server_round, _payload_bytes(arrays), len(messages))
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        if self.recorded_round != server_round:  # a client-level DP wrapper may have recorded them already
            replies = self.record_replies(server_round, replies)
        arrays, metrics = self.inner.aggregate_train(server_round, replies)
        return as_dtypes(arrays, self.dtypes), metrics

    def record_replies(self, server_round: int, replies: list[Message]) -> list[Message]:
        """Screen and record every reply of a round; return those that carry a valid update (rebuilt to the
        validated update and weight, nothing else). Raises when no update is left."""
        self.recorded_round = server_round
        reference = (
            {k: a.numpy().astype(self.dtypes.get(k), copy=False) for k, a in self.latest_arrays.items()}
            if self.latest_arrays is not None
            else {}
        )
        seen = _Round()
        for msg in replies:
            self._screen_reply(server_round, msg, reference, seen)
        # FedAvg weights by examples only when every client of the round shares its count; otherwise (and always
        # under client-level DP) the server imposes equal weights: a weight a client chose is never mixed with counts.
        uniform = self.uniform_weights or not all(seen.shared_counts)
        if uniform:
            for msg in seen.trained:
                msg.content["metrics"] = MetricRecord({self.weighted_by_key: 1.0})
        replied = {m.metadata.src_node_id for m in replies}
        for node in self.sampled:
            if node not in replied:
                seen.failures.append(
                    {"node-id": node, "reason": f"no reply within strategy.round-timeout={self.timeout:g} s"}
                )
        for f in seen.failures:
            last = (f["reason"] or "").strip().splitlines()[-1][:300] if f["reason"] else "no reason given"
            log.warning("round %d: node %d failed: %s", server_round, f["node-id"], last)
        seen.records.sort(key=lambda c: c["partition-id"])
        self.recorder.train_replies(
            seen.records,
            seen.failures,
            seen.rejected,
            refused=seen.refused,
            weighting="uniform" if uniform else "examples",
        )
        for rec in seen.records:  # a client whose accountant restarted may have passed its budget in truth
            if rec["partition-id"] in self.recorder.over_budget():
                self.excluded[rec["node-id"]] = "max-epsilon: the ledger's composed epsilon reached the node's budget"
        return self._enough_updates(server_round, seen)

    def _screen_reply(self, server_round: int, msg: Message, reference: dict[str, np.ndarray], seen: _Round) -> None:
        """One reply: a failure, a refusal, a rejected update, or a valid update rebuilt for Flower's aggregation."""
        node = msg.metadata.src_node_id
        if msg.has_error():
            seen.failures.append({"node-id": node, "reason": _reason(msg.error.reason)})
            return
        try:
            metrics, info, arrays = _records(msg)
            screened = screen_train(
                metrics,
                info,
                node_id=node,
                has_arrays=arrays is not None,
                num_labels=self.num_labels,
                sample_level=self.sample_level,
                max_weight=self.max_weight,
            )
        except Malformed as exc:
            seen.failures.append({"node-id": node, "reason": f"malformed reply: {exc}"})
            return
        rec = screened.record
        pid = rec["partition-id"]
        if screened.privacy is not None:
            rec["privacy"] = screened.privacy
        if screened.status == "trained":
            reason, decoded = self.screen_update(arrays, rec, reference)
            if reason is not None:
                rec["status"], rec["reason"] = "rejected", reason
                seen.rejected.append({"node-id": node, "partition-id": pid, "reason": reason})
                log.warning("round %d: dropped the update of client %d (node %d): %s", server_round, pid, node, reason)
            else:
                rec["bytes-up"] = int(rec["secagg-bytes-up"]) if "secagg-bytes-up" in rec else _payload_bytes(arrays)
                # Flower aggregates exactly the validated update and weight, nothing else of the reply.
                msg.content = RecordDict(
                    {"arrays": decoded, "metrics": MetricRecord({self.weighted_by_key: screened.weight})}
                )
                seen.shared_counts.append("num-examples" in screened.shared)
                seen.trained.append(msg)
        elif screened.status == "refused":
            self.excluded[node] = f"{rec['rule']}: {rec['reason']}"
            seen.refused.append({"node-id": node, "partition-id": pid, "rule": rec["rule"], "reason": rec["reason"]})
            log.warning(
                "round %d: client %d (node %d) refused: %s (%s); it is no longer sampled",
                server_round,
                pid,
                node,
                rec["reason"],
                rec["rule"],
            )
        else:
            rec["bytes-up"] = 0
        seen.records.append(rec)
        if "privacy" in rec and pid not in self.announced:
            self.announced.add(pid)
            p = rec["privacy"]
            log.info(
                "client %d: sample-level DP with sigma %.4f, C %g, sampling rate %.4f, delta %.3g, %s accountant, "
                "budget %s",
                pid,
                p["noise-multiplier"],
                p["max-grad-norm"],
                p["sample-rate"],
                p["delta"],
                p["accountant"],
                p["max-epsilon"] or "none",
            )

    def _enough_updates(self, server_round: int, seen: _Round) -> list[Message]:
        """The round's valid updates; raises (stopping or failing the run) when too few are left to aggregate."""
        trained, failures, rejected, refused = seen.trained, seen.failures, seen.rejected, seen.refused
        if trained and len(trained) < self.min_train_nodes and (failures or rejected):
            raise FedHFRunError(
                f"round {server_round}: only {len(trained)} valid update(s) ({len(failures)} client(s) failed, "
                f"{len(rejected)} update(s) rejected); strategy.min-train-nodes={self.min_train_nodes}. The last "
                f"checkpoint is kept: continue with fedhf run --resume {self.recorder.dir} once the clients are back."
            )
        if not trained and rejected and not failures:
            raise FedHFRunError(f"round {server_round}: every update was rejected ({rejected[0]['reason']}).")
        if not trained:
            if any(r["status"] == "not-aggregated" for r in seen.records):
                log.warning(
                    "round %d: no update released (secure aggregation withheld the round); the global "
                    "adapter is unchanged",
                    server_round,
                )
                return []
            if refused and not failures:
                rules = "; ".join(sorted({f"{r['rule']}: {r['reason']}" for r in refused}))
                raise RunStopped(f"round {server_round}: every sampled client refused ({rules[:600]})")
            reasons = "; ".join(f["reason"].strip().splitlines()[-1] for f in failures if f["reason"]) or "no replies"
            raise FedHFRunError(f"round {server_round}: no client returned an update ({reasons[:500]}).")
        return trained

    def screen_update(
        self, arrays: ArrayRecord, rec: dict[str, Any], reference: dict[str, np.ndarray]
    ) -> tuple[str | None, ArrayRecord | None]:
        """Decode the update (transport.dtype) and check it: (reason to drop it or None, the decoded adapter)."""
        rank = rec.get("lora-rank")
        if self.svd_rank is not None and rank is not None:
            # A node at its own rank started from the truncation of the global product to that rank.
            if not 1 <= rank <= self.svd_rank:
                return f"lora-rank {rank} is outside 1..model.lora.r={self.svd_rank}", None
            reference = truncate(reference, rank)
        try:
            payload = {k: a.numpy() for k, a in arrays.items()}
            trained = decode(payload, reference, str(rec.get("transport", "fp32")), rec.get("int8-scales"))
        except (DecodeError, ValueError, TypeError) as exc:
            return f"cannot decode the update: {exc}", None
        reason, norm = check_update(trained, reference, self.max_update_norm)
        if norm is not None:
            rec["update-norm"] = norm
        if reason is not None:
            return reason, None
        if self.svd_rank is not None:
            trained = pad(trained, self.svd_rank)  # the same products, at the global rank
        return None, ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in trained.items()})

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        good, seconds = [], []
        for msg in replies:
            if msg.has_error():
                continue
            try:
                metrics, info, arrays = _records(msg)
                if arrays is not None:
                    raise Malformed("an evaluation reply must not carry arrays")
                screened = screen_evaluate(metrics, info, node_id=msg.metadata.src_node_id)
            except Malformed as exc:
                log.warning(
                    "round %d: dropped a malformed evaluation reply of node %d: %s",
                    server_round,
                    msg.metadata.src_node_id,
                    exc,
                )
                continue
            if "handler-seconds" in screened.record:
                seconds.append(screened.record["handler-seconds"])
            if screened.status == "evaluated":
                m = screened.record
                msg.content = RecordDict(
                    {
                        "metrics": MetricRecord(
                            {k: m[k] for k in ("eval-loss", "eval-accuracy", "eval-f1", "num-examples", "weight")}
                        )
                    }
                )
                good.append(msg)
        agg = self.inner.aggregate_evaluate(server_round, good) if good else None
        if agg is not None and int(agg["num-examples"]) > 0:
            self.recorder.local_eval(float(agg["eval-loss"]), float(agg["eval-accuracy"]), seconds)
        else:
            self.recorder.local_eval(None, None, seconds)
        return agg


def _reason(text: str | None) -> str:
    """An error reason as recorded: a refusal inside SecAgg+ is shown as such; long texts are cut."""
    return (text or "no reason given")[:2000]


class _AdaptiveClipping(DifferentialPrivacyServerSideAdaptiveClipping):
    """Flower's adaptive-clipping wrapper, noising with the norm that clipped *this* round's updates.

    Flower's wrapper moves C to next round's value before it adds the noise; ``noise_norm`` (set by
    ``ClientLevel`` for the duration of one aggregation) is put back for the noise. Overrides the private
    ``_add_noise_to_aggregated_arrays``: pinned by tests/contract/test_flower_strategy.py.
    """

    noise_norm: float | None = None

    def _add_noise_to_aggregated_arrays(self, aggregated: ArrayRecord) -> ArrayRecord:
        if self.noise_norm is None:
            return super()._add_noise_to_aggregated_arrays(aggregated)
        next_norm, self.clipping_norm = self.clipping_norm, self.noise_norm
        try:
            return super()._add_noise_to_aggregated_arrays(aggregated)
        finally:
            self.clipping_norm = next_norm


class ClientLevel(Strategy):
    """Client-level DP: holds Flower's central-DP wrapper (which holds ``Screened``), one release per round.

    - Weights: ``Screened`` imposes equal weights (a client's own weight is ignored).
    - Noise: sigma * C / m with m the number of updates actually averaged, so the sensitivity C / m
      always matches; with adaptive clipping C is the norm that clipped *this* round's updates.
    - Sampling: q = clients sampled / clients connected, so a client that fails after being sampled
      does not lower q.
    """

    def __init__(
        self,
        dp: DifferentialPrivacyServerSideFixedClipping | _AdaptiveClipping,
        screened: Screened,
        account: ClientLevelAccount,
        recorder: RoundObserver,
        delta_given: bool,
    ) -> None:
        self.dp = dp
        self.screened = screened
        self.account = account
        self.recorder = recorder
        self.delta_given = delta_given

    @property
    def clipping_norm(self) -> float:
        return float(self.dp.clipping_norm)

    @clipping_norm.setter
    def clipping_norm(self, value: float) -> None:
        self.dp.clipping_norm = float(value)

    def summary(self) -> None:
        self.dp.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(self.dp.configure_train(server_round, arrays, config, grid))
        self.fix_delta(self.screened.population)
        return messages

    def fix_delta(self, population: int) -> None:
        """The default delta once the population is known; a delta of 1 / N or more is refused."""
        if population < 1:
            return
        if not self.delta_given and not self.account.history:
            self.account.delta = default_client_delta(population)
            self.recorder.set_client_level({"delta": self.account.delta})
        if self.account.delta >= 1 / population:
            raise FedHFConfigError(
                f"config key 'privacy.client-delta': {self.account.delta:g} is not below 1 / {population} clients; "
                f"such "
                f"a delta allows releasing one client's update outright. Use at most {0.1 / population:.3g}."
            )

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        s = self.screened
        trained = s.record_replies(server_round, list(replies))
        self.dp.num_sampled_clients = len(trained)
        clip_used = self.clipping_norm
        adaptive = isinstance(self.dp, _AdaptiveClipping)
        if adaptive:
            self.dp.noise_norm = clip_used
        try:
            arrays, metrics = self.dp.aggregate_train(server_round, trained)
        finally:
            if adaptive:
                self.dp.noise_norm = None
        if arrays is None:  # Flower skipped the release: nothing is accounted, and nothing changes
            raise FedHFRunError(f"round {server_round}: the client-level DP wrapper did not aggregate the updates")
        arrays = as_dtypes(arrays, s.dtypes)
        population = max(s.population, len(s.sampled), 1)
        q = len(s.sampled) / population
        self.account.add_round(q)
        self.recorder.client_level_round(
            {
                "clients_sampled": len(s.sampled),
                "clients_aggregated": len(trained),
                "population": population,
                "sample_rate": q,
                "epsilon": self.account.epsilon,
                "epsilon_no_amplification": self.account.epsilon_no_amplification,
                "clipping_norm": clip_used,
            }
        )
        return arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.dp.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.dp.aggregate_evaluate(server_round, replies)


def default_client_delta(population: int) -> float:
    """min(1e-5, 0.1 / N): well below 1 / N, and no larger than the usual 1e-5."""
    return min(1e-5, 0.1 / max(population, 1))


def _product_averaging(base: type[FedAvg], rank: int) -> type[FedAvg]:
    """``base`` (FedAvg or FedProx) aggregating LoRA by the products B·A (``fedhf.federation.lora_ranks``)."""

    class ProductAveraging(base):  # type: ignore[misc, valid-type]
        def aggregate_train(
            self, server_round: int, replies: Iterable[Message]
        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
            replies = [m for m in replies if not m.has_error()]
            if not replies:
                return None, None
            states = [{k: a.numpy() for k, a in m.content["arrays"].items()} for m in replies]
            weights = [float(m.content["metrics"][self.weighted_by_key]) for m in replies]
            merged = aggregate_products(states, weights, rank)
            metrics = self.train_metrics_aggr_fn([m.content for m in replies], self.weighted_by_key)
            return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in merged.items()}), metrics

    ProductAveraging.__name__ = f"{base.__name__}OfProducts"
    return ProductAveraging


def build_strategy(
    cfg: FedHFConfig, recorder: RoundObserver, population: int | None = None, num_labels: int | None = None
) -> Screened | ClientLevel:
    s = cfg.strategy
    common: dict[str, Any] = dict(
        fraction_train=s.fraction_train,
        fraction_evaluate=s.fraction_evaluate,
        min_train_nodes=s.min_train_nodes,
        min_evaluate_nodes=s.min_evaluate_nodes if s.fraction_evaluate > 0 else 0,
        min_available_nodes=s.min_available_nodes,
        weighted_by_key="weight",
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
    base = BASES[s.name]
    if s.lora_aggregation == "svd":
        base = _product_averaging(base, cfg.model.lora.r)
    strategy = Screened(base(**common), cfg, recorder, num_labels)
    if not p.client_level:
        return strategy
    m = max(1, min_sampled(cfg, population))
    if p.client_clipping == "server-fixed":
        dp: DifferentialPrivacyServerSideFixedClipping | _AdaptiveClipping = DifferentialPrivacyServerSideFixedClipping(
            strategy,
            noise_multiplier=p.client_noise_multiplier,
            clipping_norm=p.client_clipping_norm,
            num_sampled_clients=m,
        )
        count_std = None
    else:
        count_std = p.client_clipped_count_stddev if p.client_clipped_count_stddev is not None else m / 20
        if p.client_noise_multiplier >= 2 * count_std:
            raise FedHFConfigError(
                f"config key 'privacy.client-clipped-count-stddev': {count_std:g} is too small for "
                f"privacy.client-noise-multiplier={p.client_noise_multiplier:g} with adaptive clipping; set it above "
                f"{p.client_noise_multiplier / 2:g} (the count noise must be at least half the update noise) "
                f"or use server-fixed."
            )
        dp = _AdaptiveClipping(
            strategy,
            noise_multiplier=p.client_noise_multiplier,
            num_sampled_clients=m,
            initial_clipping_norm=p.client_clipping_norm,
            clipped_count_stddev=count_std,
        )
    # Flower raises the update noise under adaptive clipping (wrapper.noise_multiplier); the noisy
    # clipped count is a second Gaussian release, composed conservatively (sensitivity 1).
    sigma_eff = effective_client_sigma(dp.noise_multiplier, count_std)
    delta = p.client_delta if p.client_delta is not None else default_client_delta(population or 1)
    wrapper = ClientLevel(dp, strategy, ClientLevelAccount(sigma_eff, delta), recorder, p.client_delta is not None)
    recorder.set_client_level(
        {
            "label": CLIENT_LEVEL,
            "clipping": p.client_clipping,
            "noise_multiplier": p.client_noise_multiplier,
            "clipped_count_stddev": count_std,
            "effective_noise_multiplier": sigma_eff,
            "delta": delta,
            "accountant": "rdp",
            "sampling": (
                "q = clients sampled / clients in the federation, accounted as Poisson subsampling (Flower "
                "samples a fixed number of clients: an approximation); epsilon_no_amplification (q = 1) holds "
                "for any way of picking clients"
            ),
            "aggregation": (
                "uniform average of updates clipped to C (L2; equal weights imposed by the server), Gaussian "
                "noise sigma * C / clients aggregated, C being the norm that clipped that round"
            ),
        }
    )
    if population:
        wrapper.fix_delta(population)
    return wrapper


def min_sampled(cfg: FedHFConfig, population: int | None) -> int:
    """Clients sampled per round, as FedAvg computes it (for the wrapper's initial noise scale)."""
    s = cfg.strategy
    if population is None:
        return s.min_train_nodes
    return max(int(population * s.fraction_train), s.min_train_nodes)


# ----------------------------------------------------------------------------- checkpoint and resume


def screened_of(strategy: Strategy) -> Screened:
    """The ``Screened`` wrapper of a built strategy (itself, or the one a ``ClientLevel`` wrapper holds)."""
    return strategy.screened if isinstance(strategy, ClientLevel) else strategy


def strategy_state(strategy: Screened | ClientLevel) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """What a restart needs from the strategy: server-optimizer moments (FedAdam/FedYogi), the adaptive
    clipping norm and the client-level accountant's history."""
    screened = screened_of(strategy)
    arrays: dict[str, np.ndarray] = {}
    for name in ("m_t", "v_t"):
        moments = getattr(screened.inner, name, None)
        if moments:
            arrays.update({f"{name}/{k}": np.asarray(v) for k, v in moments.items()})
    state: dict[str, Any] = {"strategy": screened.name}
    if isinstance(strategy, ClientLevel):
        state["clipping_norm"] = strategy.clipping_norm
        state["client_level_history"] = [[float(s), float(q), int(n)] for s, q, n in strategy.account.history]
    return arrays, state


def restore_strategy_state(
    strategy: Screened | ClientLevel, arrays: dict[str, np.ndarray], state: dict[str, Any]
) -> None:
    screened = screened_of(strategy)
    # Checkpoints of fedhf 0.1 named the Flower class ("FedAdam"); later ones the config's strategy.name.
    written = state.get("strategy", state.get("class"))
    if written not in (screened.name, type(screened.inner).__name__):
        raise FedHFRunError(
            f"the checkpoint was written by strategy {written!r}, this run builds "
            f"{screened.name!r}; resume with the run's own configuration."
        )
    for name in ("m_t", "v_t"):
        moments = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith(name + "/")}
        if moments:
            setattr(screened.inner, name, moments)
    if isinstance(strategy, ClientLevel):
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

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_train(server_round + self.offset, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.strategy.aggregate_train(server_round + self.offset, replies)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round + self.offset, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round + self.offset, replies)
