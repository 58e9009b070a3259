"""Secure aggregation (SecAgg+) of the LoRA adapters, with Flower's own protocol code.

Flower 1.42 implements SecAgg+ as a workflow for its legacy strategies
(``SecAggPlusWorkflow``) and a client mod (``secaggplus_mod``); its Message-API strategies
do not speak it (``FedAvg.start`` fails on the missing ``secaggplus_configs`` record, an
``@app.train`` handler on the missing ``arrays``). fedhf keeps the Message-API strategies
and runs the protocol underneath them, unchanged:

- Server: :class:`SecureAggregationGrid` wraps the ``Grid``. A round's train messages go
  through the four stages of Flower's ``SecAggPlusWorkflow`` (setup, share keys, collect
  masked vectors, unmask). The strategy then receives, for every client that took part,
  a reply with that client's own metrics and the *aggregate* adapter (the weighted average
  the protocol reconstructed), never an individual adapter. A weighted average of
  identical arrays is that array, so FedAvg, FedProx, FedAdam and FedYogi aggregate as
  usual. Evaluate messages pass through untouched.
- Client: :func:`secure_aggregation_mod` hands messages that carry the protocol's records
  to Flower's ``secaggplus_mod``; the train handler reads and writes the legacy
  FitIns/FitRes records there (:func:`fitins_arrays`, :func:`fitres_content`).

What the server sees per client: its public keys, encrypted key shares for other clients,
its masked (uniformly random-looking) vector, and in the clear its averaging weight (its number
of training examples when its policy shares them, else 1) and the client info its policy lets
out (under DP: the privacy accounting only; see ``fedhf.privacy.policy``).
A round in which fewer than two clients would contribute is never unmasked. Masks are
expanded with SHAKE-256 instead of Flower 1.42's 32-bit-seeded generator (see below).

Precision: each client sends ``round(w * Q) / Q``-weighted values (``w = n / max_weight``),
clipped to ``[-c, c]`` and stochastically rounded to the grid ``2c / Q``. The reconstructed
average differs from exact example-weighted FedAvg by at most
``k * (2c / Q) / sum(w)`` per value for k clients (plus the float rounding of the weights),
see :func:`quantization_tolerance`.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import (
    Code,
    FitIns,
    FitRes,
    Parameters,
    Status,
    bytes_to_ndarray,
    ndarray_to_bytes,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS,
    Key,
    Stage,
)
from flwr.compat.common import recorddict_compat as compat
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp import Grid

from fedhf.config.schema import FedHFConfig, check_secagg_weight
from fedhf.errors import FedHFConfigError, FedHFRunError

log = logging.getLogger("fedhf")

MODULUS_RANGE = 2**32  # Flower's default and maximum: masks and sums live in Z_(2^32)
NAMES_KEY = "fedhf.secagg-arrays"  # the adapter's tensor names, in order (legacy Parameters have none)
RUN_CONFIG_KEY = "fedhf.run-config"  # the run config, added to the set-up stage so a node can refuse before any key
REFUSED_PREFIX = "fedhf-refused "  # a node's policy refusal inside the protocol: an error reason, then JSON
PROTOCOL = "SecAgg+ (Bell et al. 2020) as implemented by Flower 1.42: SecAggPlusWorkflow + secaggplus_mod"


@dataclass(frozen=True)
class SecAggSettings:
    num_shares: int  # 0 = every sampled client
    reconstruction_threshold: int  # 0 = two thirds of the shares, at least 2
    clipping_range: float
    quantization_range: int
    max_weight: float
    timeout: float | None = None

    @classmethod
    def from_config(cls, cfg: FedHFConfig) -> SecAggSettings:
        s = cfg.strategy
        return cls(
            s.secagg_num_shares,
            s.secagg_reconstruction_threshold,
            s.secagg_clipping_range,
            s.secagg_quantization_range,
            s.secagg_max_weight,
            s.round_timeout,
        )

    def workflow(self) -> SecAggPlusWorkflow:
        return SecAggPlusWorkflow(
            num_shares=self.num_shares if self.num_shares else 1.0,  # Flower: the float 1.0 = all sampled clients
            reconstruction_threshold=self.reconstruction_threshold if self.reconstruction_threshold else 2 / 3,
            max_weight=self.max_weight,
            clipping_range=self.clipping_range,
            quantization_range=self.quantization_range,
            modulus_range=MODULUS_RANGE,
            timeout=self.timeout,
        )

    @property
    def step(self) -> float:
        return 2 * self.clipping_range / self.quantization_range

    def check_round(self, sampled: int) -> None:
        """Refuse, before any message goes out, a round the protocol cannot complete."""
        if sampled < 2:
            raise FedHFConfigError(
                f"secure aggregation: {sampled} client(s) sampled this round; it needs at least 2 (clients out of "
                "privacy budget are no longer sampled; otherwise raise strategy.min-train-nodes / "
                "strategy.fraction-train or connect more nodes)."
            )
        shares = self.num_shares or sampled
        if self.num_shares > sampled:
            raise FedHFConfigError(
                f"config key 'strategy.secagg-num-shares': got {self.num_shares}, more than the {sampled} clients "
                "sampled this round; lower it (0 = every sampled client)."
            )
        if self.reconstruction_threshold > shares:
            raise FedHFConfigError(
                f"config key 'strategy.secagg-reconstruction-threshold': got {self.reconstruction_threshold}, "
                f"more than "
                f"the {shares} shares of each secret ({sampled} clients sampled this round); the round could never "
                f"unmask. Use at most {shares} (0 = two thirds of the shares)."
            )
        if sampled * self.quantization_range >= MODULUS_RANGE:
            raise FedHFConfigError(
                f"config key 'strategy.secagg-quantization-range': {self.quantization_range} levels "
                f"x {sampled} clients "
                f"overflow the 2^32 modulus; use at most {MODULUS_RANGE // sampled - 1}."
            )

    def describe(self) -> dict[str, Any]:
        return {
            "protocol": PROTOCOL,
            "num_shares": self.num_shares or "all sampled clients",
            "reconstruction_threshold": self.reconstruction_threshold or "2/3 of the shares (at least 2)",
            "clipping_range": self.clipping_range,
            "quantization_range": self.quantization_range,
            "quantization_bits": int(np.log2(self.quantization_range)),
            "modulus_range": MODULUS_RANGE,
            "max_weight": self.max_weight,
            "quantization_step": self.step,
            "tolerance": "per value: clients x quantization_step / sum(num_examples / max_weight)",
            "server_sees": (
                "masked vectors; in the clear, each client's averaging weight (its number of examples "
                "when its policy shares them, else 1) and the client info its policy lets out; never one "
                "client's adapter"
            ),
            "mask_prg": f"{MASK_PRG} (replaces Flower 1.42's 32-bit-seeded mask generator, flwrlabs/flower#7522)",
        }


def quantization_tolerance(num_examples: list[int], settings: SecAggSettings, max_abs: float) -> float:
    """Largest difference per value between the SecAgg+ aggregate and exact example-weighted FedAvg.

    Each client's weighted values are stochastically rounded to the grid ``2c/Q`` (error < one
    step each); the weights themselves are rounded to ``1/Q`` (relative error < 1/(Q w)).
    """
    q = settings.quantization_range
    weights = [round(n / settings.max_weight * q) / q for n in num_examples]
    total = sum(weights)
    value_error = len(weights) * settings.step / total
    weight_error = max_abs * sum(1 / q for _ in weights) / total * 2
    return value_error + weight_error


# --------------------------------------------------------------------------- mask generator

# Flower 1.42 expands every SecAgg+ mask from a 32-bit seed: its ``pseudo_rand_gen`` XORs the
# 32-byte secret down to 32 bits and seeds numpy's Mersenne Twister (flwrlabs/flower#7522), so
# a server could try all 2^32 seeds. While fedhf runs the protocol (the server's stages and the
# client mod), masks come instead from SHAKE-256 of the whole secret, an extendable-output
# function. Clients announce it in the set-up stage; the server refuses a client that does not.
MASK_PRG = "shake256-v1"
MASK_PRG_KEY = "fedhf.mask-prg"


def shake_rand_gen(seed: bytes, num_range: int, dimensions_list: list[tuple[int, ...]]) -> list[np.ndarray]:
    """Uniform integers in [0, num_range) (a power of two, at most 2^32) from SHAKE-256(seed), shaped as asked."""
    if num_range < 2 or num_range > 2**32 or num_range & (num_range - 1):
        raise ValueError(f"secure aggregation: the mask range must be a power of two up to 2^32, got {num_range}")
    sizes = [int(np.prod(d)) if len(d) else 1 for d in dimensions_list]
    stream = np.frombuffer(hashlib.shake_256(b"fedhf-secagg-mask/" + seed).digest(4 * sum(sizes)), dtype="<u4")
    stream = stream.astype(np.int64) % num_range
    out, start = [], 0
    for dims, n in zip(dimensions_list, sizes, strict=True):
        chunk = stream[start : start + n]
        start += n
        out.append(np.array(chunk[0], dtype=np.int64) if len(dims) == 0 else chunk.reshape(dims))
    return out


@contextlib.contextmanager
def _fedhf_masks() -> Iterator[None]:
    """Use :func:`shake_rand_gen` in Flower's SecAgg+ code for the duration of the block (nesting restores)."""
    # (the packages re-export functions under the modules' names: fetch the modules themselves)
    mod_module = importlib.import_module("flwr.client.mod.secure_aggregation.secaggplus_mod")
    workflow_module = importlib.import_module("flwr.server.workflow.secure_aggregation.secaggplus_workflow")

    saved = (mod_module.pseudo_rand_gen, workflow_module.pseudo_rand_gen)
    mod_module.pseudo_rand_gen = workflow_module.pseudo_rand_gen = shake_rand_gen
    try:
        yield
    finally:
        mod_module.pseudo_rand_gen, workflow_module.pseudo_rand_gen = saved


# --------------------------------------------------------------------------- server


class _Proxy:
    """What Flower's workflow needs of a legacy ClientProxy: its node id."""

    def __init__(self, node_id: int) -> None:
        self.node_id = node_id


class _LegacyStrategy:
    """The two legacy-strategy calls SecAggPlusWorkflow makes: hand out the FitIns, take the aggregate."""

    def __init__(self, fitins: dict[int, FitIns]) -> None:
        self.fitins = fitins
        self.aggregate: list[np.ndarray] | None = None

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: Any
    ) -> list[tuple[_Proxy, FitIns]]:
        return [(_Proxy(nid), ins) for nid, ins in self.fitins.items()]

    def aggregate_fit(
        self, server_round: int, results: list[tuple[_Proxy, FitRes]], failures: list
    ) -> tuple[Parameters | None, dict]:
        if results:
            self.aggregate = parameters_to_ndarrays(results[0][1].parameters)
            return results[0][1].parameters, {}
        return None, {}


class _WorkflowContext:
    """The parts of a LegacyContext that the SecAgg+ stages read."""

    def __init__(self, server_round: int, fitins: dict[int, FitIns], first: ArrayRecord) -> None:
        self.state = RecordDict(
            {
                MAIN_CONFIGS_RECORD: ConfigRecord({WorkflowKey.CURRENT_ROUND: server_round}),
                MAIN_PARAMS_RECORD: first,
            }
        )
        self.strategy = _LegacyStrategy(fitins)
        self.client_manager = _NodeCount(len(fitins))
        self.history = self  # the workflow logs the aggregated fit metrics; fedhf records its own

    def add_metrics_distributed_fit(self, server_round: int, metrics: dict) -> None:
        pass


class _NodeCount:
    def __init__(self, n: int) -> None:
        self.n = n

    def num_available(self) -> int:
        return self.n


def content_nbytes(content: RecordDict) -> int:
    """Payload bytes of a message: array data plus bytes/str values of config records."""
    total = 0
    for record in content.array_records.values():
        total += sum(len(a.data) for a in record.values())
    for record in content.config_records.values():
        for value in record.values():
            for v in value if isinstance(value, list) else [value]:
                if isinstance(v, (bytes, str)):
                    total += len(v)
                else:
                    total += 8
    return total


class _Tap:
    """Passes the stages' messages to the real Grid, counting bytes and keeping the last replies."""

    def __init__(self, grid: Grid, run_config: ConfigRecord | None = None) -> None:
        self.grid = grid
        self.run_config = run_config
        self.bytes_down = 0
        self.bytes_up = 0
        self.last: list[Message] = []
        self.errors: dict[int, str] = {}  # node id -> the reason its reply carried (first error wins)
        self.wire: dict[int, int] = {}  # node id -> bytes of its last reply as sent (before widening)
        self.stage2_bytes: dict[int, int] = {}  # node id -> bytes of its masked-vector upload

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        if self.run_config is not None:
            for m in messages:  # the set-up stage carries the run config: a node can refuse before sending keys
                configs = m.content.config_records.get(RECORD_KEY_CONFIGS)
                if configs is not None and configs.get(Key.STAGE) == Stage.SETUP:
                    m.content[RUN_CONFIG_KEY] = ConfigRecord(dict(self.run_config))
        self.bytes_down += sum(content_nbytes(m.content) for m in messages)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        self.bytes_up += sum(content_nbytes(r.content) for r in replies if not r.has_error())
        for r in replies:
            if not r.has_error():
                self.wire[r.metadata.src_node_id] = content_nbytes(r.content)
            _widen_masked_vector(r)
        for r in replies:
            if r.has_error():
                self.errors.setdefault(r.metadata.src_node_id, str(r.error.reason or f"error code {r.error.code}"))
        self.last = replies
        return replies


class SecureAggregationGrid(Grid):
    """A Grid whose train rounds run SecAgg+; everything else goes straight to the wrapped Grid.

    ``on_round`` receives one record per round: clients sampled, clients whose masked
    update made it into the sum, dropped clients and why, the shares and threshold used,
    bytes each way and seconds.
    """

    def __init__(
        self, grid: Grid, settings: SecAggSettings, on_round: Callable[[dict[str, Any]], None] | None = None
    ) -> None:
        self._grid = grid
        self.settings = settings
        self.on_round = on_round

    # -- plain delegation
    def set_run(self, run: Any) -> None:
        self._grid.set_run(run)

    @property
    def run(self) -> Any:
        return self._grid.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        return self._grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        train = [m.metadata.message_type == MessageType.TRAIN for m in messages]
        if not any(train):
            return self._grid.send_and_receive(messages, timeout=timeout)
        if not all(train):
            raise RuntimeError(
                "secure aggregation: a batch mixes train messages with others; refusing to send "
                "any adapter outside the protocol"
            )
        return self._secure_round(messages)

    # -- one SecAgg+ round
    def _secure_round(self, messages: list[Message]) -> list[Message]:
        t0 = time.perf_counter()
        self.settings.check_round(len(messages))
        first = messages[0].content["arrays"]
        names = list(first.keys())
        specs = {name: (arr.dtype, tuple(arr.shape)) for name, arr in first.items()}
        server_round = int(messages[0].content["config"]["server-round"])
        by_node = {m.metadata.dst_node_id: m for m in messages}
        fitins = {}
        for nid, m in by_node.items():
            config = {k: v for k, v in m.content["config"].items()}
            config[NAMES_KEY] = "\n".join(names)
            fitins[nid] = FitIns(compat.arrayrecord_to_parameters(m.content["arrays"], keep_input=True), config)
        context = _WorkflowContext(server_round, fitins, first)
        workflow = self.settings.workflow()
        state = WorkflowState()
        tap = _Tap(self._grid, messages[0].content["config"])
        record: dict[str, Any] = {"round": server_round, "sampled": len(messages)}

        # Flower's stages return False when too few clients are left for the reconstruction threshold.
        withheld = None  # why nothing is released this round
        collected: dict[int, Message] = {}
        aggregate: ArrayRecord | None = None
        with _fedhf_masks():
            if not workflow.setup_stage(tap, context, state):  # type: ignore[arg-type]
                withheld = "too few clients answered the key set-up for the reconstruction threshold"
            # Flower 1.42 keeps a node that failed the set-up stage among the sampled ones, and at the unmask stage
            # asks the others for the shares of that "dead" node, which it never sent them: every client then
            # fails (KeyError in secaggplus_mod._unmask). A node that never set up never shared: it is not sampled.
            state.sampled_node_ids = set(state.active_node_ids)
            record.update({"num_shares": state.num_shares, "reconstruction_threshold": state.threshold})
            _require_fedhf_masks(tap.last)
            if withheld is None and not workflow.share_keys_stage(tap, context, state):  # type: ignore[arg-type]
                withheld = "too few clients shared their keys for the reconstruction threshold"
            if withheld is None:
                stage2_ok = workflow.collect_masked_vectors_stage(tap, context, state)  # type: ignore[arg-type]
                collected = {r.metadata.src_node_id: r for r in tap.last if not r.has_error()}
                tap.stage2_bytes = {nid: tap.wire[nid] for nid in collected}
                if not stage2_ok:
                    withheld = "too many clients dropped out for the reconstruction threshold"
            contributors = [nid for nid, r in collected.items() if _weight(r) > 0]
            if withheld is None and len(contributors) == 1:
                # The weights travel in the clear: a "sum" of one update is that client's update.
                withheld = (
                    "only one client's update would be in the sum (the others dropped out or are out of "
                    "privacy budget); a single update is never unmasked"
                )
            if withheld is None and contributors:
                if not workflow.unmask_stage(tap, context, state) or context.strategy.aggregate is None:  # type: ignore[arg-type]
                    withheld = "too few key shares came back to unmask the sum"
                else:
                    aggregate = _rebuild(context.strategy.aggregate, names, specs)
        stage = "no reply (the protocol stopped before this client's turn, or strategy.round-timeout passed)"
        dropped = {nid: tap.errors.get(nid, stage) for nid in by_node if nid not in collected}
        for nid, reason in dropped.items():
            log.warning("secure aggregation, round %d: node %d dropped out: %s", server_round, nid, reason[-300:])
        record.update(
            {
                "participants": len(collected),
                "contributors": len(contributors) if withheld is None else 0,
                "dropped": len(dropped),
                "completed": withheld is None,
                "bytes_down": tap.bytes_down,
                "bytes_up": tap.bytes_up,
                "seconds": time.perf_counter() - t0,
            }
        )
        if withheld:
            record["withheld"] = withheld
            log.warning(
                "secure aggregation, round %d: nothing released: %s; the global adapter stays as it was",
                server_round,
                withheld,
            )
        if self.on_round:
            self.on_round(record)
        log.info(
            "secure aggregation, round %d: %d sampled, %d in the sum, %d dropped (shares %d, threshold %d)",
            server_round,
            len(messages),
            record["contributors"],
            len(dropped),
            state.num_shares,
            state.threshold,
        )

        replies = []
        for nid, original in by_node.items():
            if nid not in collected:
                refusal = parse_refusal(dropped[nid])
                if refusal is not None:  # the node's policy refused the round: a refusal, not a failure
                    replies.append(
                        Message(
                            RecordDict({"client-info": ConfigRecord({**refusal, "status": "refused"})}),
                            reply_to=original,
                        )
                    )
                    continue
                replies.append(
                    Message(
                        Error(
                            code=0,
                            reason="secure aggregation: the client dropped out of the protocol, "
                            f"its update is not in the sum: {dropped[nid]}",
                        ),
                        reply_to=original,
                    )
                )
                continue
            reply = collected[nid]
            info = reply.content["client-info"]
            info["secagg-bytes-up"] = tap.stage2_bytes[nid]  # what this client really uploaded in stage 2
            content = RecordDict({"metrics": reply.content["metrics"], "client-info": info})
            if withheld is not None:
                # Its metrics and privacy spend are still recorded; its update is not released.
                if str(info.get("status", "trained")) == "trained":
                    info["status"] = "not-aggregated"
                info["secagg-withheld"] = withheld
            elif aggregate is not None and _weight(reply) > 0:
                content["arrays"] = aggregate
            replies.append(Message(content, reply_to=original))
        return replies


def _weight(reply: Message) -> float:
    try:
        value = reply.content["metrics"]["weight"]
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0
    except (KeyError, TypeError):
        return 0.0


def parse_refusal(reason: str) -> dict[str, Any] | None:
    """A node's policy refusal carried in an error reason (REFUSED_PREFIX + JSON), or None."""
    if not reason.startswith(REFUSED_PREFIX):
        return None
    try:
        data = json.loads(reason[len(REFUSED_PREFIX) :])
        return {
            "partition-id": int(data["partition-id"]),
            "rule": str(data["rule"])[:100],
            "reason": str(data["reason"])[:500],
        }
    except (ValueError, KeyError, TypeError):
        return None


def _require_fedhf_masks(setup_replies: list[Message]) -> None:
    for r in setup_replies:
        if r.has_error():
            continue
        prg = r.content.config_records[RECORD_KEY_CONFIGS].get(MASK_PRG_KEY)
        if prg != MASK_PRG:
            raise FedHFRunError(
                f"secure aggregation: node {r.metadata.src_node_id} masks with "
                f"{prg or 'Flower 1.42 default (32-bit seeds)'}, "
                f"not fedhf's {MASK_PRG}; its masks would not cancel. Run this fedhf version on every SuperNode."
            )


def _rebuild(
    ndarrays: list[np.ndarray], names: list[str], specs: dict[str, tuple[str, tuple[int, ...]]]
) -> ArrayRecord:
    if len(ndarrays) != len(names):
        raise RuntimeError(f"secure aggregation returned {len(ndarrays)} arrays for {len(names)} adapter tensors")
    if not all(np.isfinite(a).all() for a in ndarrays):
        raise RuntimeError(
            "secure aggregation reconstructed non-finite values; the round is not released "
            "(check strategy.secagg-max-weight and strategy.secagg-quantization-range)"
        )
    arrays = {}
    for name, arr in zip(names, ndarrays, strict=True):
        dtype, shape = specs[name]
        arr = np.asarray(arr).reshape(shape).astype(dtype)
        arrays[name] = Array(arr)
    return ArrayRecord(array_dict=arrays)


# --------------------------------------------------------------------------- client


def secure_aggregation_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's ``secaggplus_mod`` for the messages of the SecAgg+ protocol; others go straight through."""
    if msg.metadata.message_type == MessageType.TRAIN and RECORD_KEY_CONFIGS in msg.content.config_records:
        with _fedhf_masks():
            reply = secaggplus_mod(msg, context, call_next)
        if not reply.has_error() and RECORD_KEY_CONFIGS in reply.content.config_records:
            reply.content.config_records[RECORD_KEY_CONFIGS][MASK_PRG_KEY] = MASK_PRG
        _narrow_masked_vector(reply)
        return reply
    return call_next(msg, context)


# Flower's mod sends the masked vector as int64 although every value is already reduced
# mod 2^32: fedhf sends it as uint32 (half the bytes, exactly the same values) and the
# server widens it back before Flower's workflow sums the vectors.


def _masked(msg: Message) -> ConfigRecord | None:
    if msg.has_error() or RECORD_KEY_CONFIGS not in msg.content.config_records:
        return None
    configs = msg.content.config_records[RECORD_KEY_CONFIGS]
    return configs if Key.MASKED_PARAMETERS in configs else None


def _narrow_masked_vector(reply: Message) -> None:
    configs = _masked(reply)
    if configs is None:
        return
    narrowed = []
    for raw in configs[Key.MASKED_PARAMETERS]:
        arr = bytes_to_ndarray(raw)
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= MODULUS_RANGE):
            raise ValueError("secure aggregation: a masked value lies outside [0, 2^32); refusing to send it")
        narrowed.append(ndarray_to_bytes(arr.astype(np.uint32)))
    configs[Key.MASKED_PARAMETERS] = narrowed


def _widen_masked_vector(reply: Message) -> None:
    configs = _masked(reply)
    if configs is None:
        return
    widened = []
    for raw in configs[Key.MASKED_PARAMETERS]:
        arr = bytes_to_ndarray(raw)
        if arr.dtype not in (np.uint32, np.int64) or (
            arr.size and (int(arr.min()) < 0 or int(arr.max()) >= MODULUS_RANGE)
        ):
            raise FedHFRunError(
                f"secure aggregation: node {reply.metadata.src_node_id} sent a masked vector that is not "
                f"integers in [0, 2^32) (dtype {arr.dtype}); refusing the round"
            )
        widened.append(ndarray_to_bytes(arr.astype(np.int64)))
    configs[Key.MASKED_PARAMETERS] = widened


def is_secure_round(msg: Message) -> bool:
    return "fitins.config" in msg.content.config_records


def fitins_arrays(msg: Message) -> tuple[ArrayRecord, ConfigRecord]:
    """The global adapter (with its tensor names restored) and the config of a SecAgg+ train message."""
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    names = str(fitins.config.get(NAMES_KEY, "")).split("\n")
    ndarrays = parameters_to_ndarrays(fitins.parameters)
    if len(names) != len(ndarrays):
        raise ValueError(f"secure aggregation: {len(ndarrays)} arrays arrived with {len(names)} names")
    arrays = ArrayRecord(array_dict={n: Array(a) for n, a in zip(names, ndarrays, strict=True)})
    config = ConfigRecord({k: v for k, v in fitins.config.items() if k != NAMES_KEY})
    return arrays, config


def fitres_content(content: RecordDict, received: ArrayRecord, cfg: FedHFConfig) -> RecordDict:
    """The legacy FitRes records that ``secaggplus_mod`` masks, plus fedhf's metrics and client info.

    A node whose policy refuses the round never gets here: it drops out of the protocol with the
    refusal as its error reason (:func:`parse_refusal`), before it sends a masked vector.
    """
    metrics: MetricRecord = content["metrics"]
    num_examples = int(metrics["weight"])  # the averaging weight: the rows when shared, else 1
    s = cfg.strategy
    check_secagg_weight(cfg, num_examples)
    arrays: ArrayRecord = content["arrays"] if "arrays" in content.array_records else received
    names = list(received.keys())  # the masked vector follows the global adapter's order
    if set(arrays.keys()) != set(names):
        raise ValueError("secure aggregation: the trained adapter's tensors differ from the global adapter's")
    ndarrays = [arrays[n].numpy() for n in names]
    scale = num_examples / s.secagg_max_weight
    clipped = int(sum(int(np.count_nonzero(np.abs(a) * scale > s.secagg_clipping_range)) for a in ndarrays))
    info: ConfigRecord = content["client-info"]
    info["secagg-clipped-values"] = clipped
    if clipped:
        log.warning(
            "secure aggregation: %d weighted adapter values exceed strategy.secagg-clipping-range=%g and are "
            "clipped; raise it",
            clipped,
            s.secagg_clipping_range,
        )
    fitres = FitRes(Status(Code.OK, "ok"), ndarrays_to_parameters(ndarrays), num_examples, {})
    out = compat.fitres_to_recorddict(fitres, keep_input=False)
    out["metrics"] = metrics
    out["client-info"] = info
    return out
