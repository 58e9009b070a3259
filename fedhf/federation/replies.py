"""Every field of a client's reply, checked in one place before the server uses any of it. No Flower here.

A reply is untrusted input: a client may be buggy, out of date or hostile. :func:`screen_train`
and :func:`screen_evaluate` take a reply's metrics and client info as plain mappings and return
either the record the server keeps (only known fields, each of the right type and range) or the
reason the reply is malformed; a malformed reply is that client's failure for the round and
nothing of it is used. The update's tensors are checked separately (``fedhf.federation.updates``).

Schema of a train reply (what ``fedhf.federation.client`` sends):

- metrics: ``weight`` (the averaging weight, > 0, at most ``strategy.max-weight``); when shared,
  ``num-examples`` (equal to the weight) and ``train-loss``.
- client info: ``partition-id``, ``status`` (``trained``, ``refused`` with ``rule`` and ``reason``,
  or ``not-aggregated`` from secure aggregation), ``shared`` (the optional fields the node's policy
  lets out), ``transport`` and ``int8-scales``, ``train-steps``, ``lora-rank`` (under svd aggregation);
  under sample-level DP the accounting (:data:`PRIVACY_FIELDS`); when shared, ``label-histogram``, ``train-tokens``,
  ``train-seconds``, ``handler-seconds``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fedhf.errors import Malformed
from fedhf.privacy.policy import SHAREABLE

STATUSES = ("trained", "refused", "not-aggregated")
EVAL_STATUSES = ("evaluated", "not-shared", "refused")
TRANSPORTS = ("fp32", "fp16", "int8")
ACCOUNTANTS = ("rdp", "prv")
MAX_TEXT = 500
MAX_ID = 2**64 - 1  # Flower node ids (a silo's default partition id) are unsigned 64-bit

# (field, required in the group, kind, check) for the sample-level accounting a DP client reports.
PRIVACY_FIELDS = {
    "epsilon": (True, "nonneg"),
    "delta": (True, "unit-open"),
    "noise-multiplier": (True, "nonneg"),
    "max-grad-norm": (True, "pos"),
    "sample-rate": (True, "unit-half-open"),
    "steps": (True, "count"),
    "accountant": (True, "accountant"),
    "accountant-id": (True, "text"),
    "max-epsilon": (True, "nonneg"),
    "lifetime-epsilon": (False, "nonneg"),
    "lifetime-delta": (False, "unit-open"),
}
INFO_FIELDS = {
    "partition-id": "id",
    "status": "text",
    "rule": "text",
    "reason": "text",
    "shared": "shared",
    "transport": "transport",
    "int8-scales": "scales",
    "train-steps": "count",
    "train-tokens": "count",
    "train-seconds": "nonneg",
    "handler-seconds": "nonneg",
    "label-histogram": "histogram",
    "replayed": "bool",
    "lora-rank": "count",
    "secagg-bytes-up": "count",
    "secagg-clipped-values": "count",
    "secagg-withheld": "text",
    **{k: kind for k, (_, kind) in PRIVACY_FIELDS.items()},
}
METRIC_FIELDS = {"weight": "pos", "num-examples": "count", "train-loss": "finite"}
EVAL_METRIC_FIELDS = {
    "weight": "nonneg",
    "num-examples": "count",
    "eval-loss": "nonneg",
    "eval-accuracy": "unit",
    "eval-f1": "unit",
}
EVAL_INFO_FIELDS = {
    "partition-id": "id",
    "status": "text",
    "rule": "text",
    "reason": "text",
    "handler-seconds": "nonneg",
}


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check(name: str, value: Any, kind: str, num_labels: int | None) -> Any:
    """The value, normalised, or Malformed naming the field."""

    def bad(why: str) -> Malformed:
        shown = repr(value)
        return Malformed(f"field '{name}' {why} (got {shown[:60]}{'...' if len(shown) > 60 else ''})")

    if kind in ("id", "count"):
        if (
            not isinstance(value, int)
            or isinstance(value, bool)
            or value < 0
            or value > (MAX_ID if kind == "id" else 2**53)
        ):
            raise bad("must be a whole number >= 0")
        return int(value)
    if kind in ("nonneg", "pos", "finite", "unit", "unit-open", "unit-half-open"):
        if not _is_number(value) or not math.isfinite(float(value)):
            raise bad("must be a finite number")
        v = float(value)
        ok = {
            "nonneg": v >= 0,
            "pos": v > 0,
            "finite": True,
            "unit": 0 <= v <= 1,
            "unit-open": 0 < v < 1,
            "unit-half-open": 0 < v <= 1,
        }[kind]
        if not ok:
            raise bad(
                {
                    "nonneg": "must be >= 0",
                    "pos": "must be > 0",
                    "unit": "must be in [0, 1]",
                    "unit-open": "must be in (0, 1)",
                    "unit-half-open": "must be in (0, 1]",
                }[kind]
            )
        return v
    if kind == "text":
        if not isinstance(value, str) or len(value) > MAX_TEXT:
            raise bad(f"must be text of at most {MAX_TEXT} characters")
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise bad("must be true or false")
        return value
    if kind == "transport":
        if value not in TRANSPORTS:
            raise bad(f"must be one of {', '.join(TRANSPORTS)}")
        return value
    if kind == "accountant":
        if value not in ACCOUNTANTS:
            raise bad(f"must be one of {', '.join(ACCOUNTANTS)}")
        return value
    if kind == "shared":
        if not isinstance(value, list) or not all(isinstance(x, str) and x in SHAREABLE for x in value):
            raise bad(f"must list names among {', '.join(SHAREABLE)}")
        return sorted(set(value))
    if kind == "scales":
        if not isinstance(value, list) or len(value) > 100_000 or not all(_is_number(x) for x in value):
            raise bad("must be a list of numbers")
        return [float(x) for x in value]  # finiteness is the decoder's to judge (a NaN scale: a non-finite update)
    if kind == "histogram":
        if not isinstance(value, list) or not all(
            isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in value
        ):
            raise bad("must be a list of whole numbers >= 0")
        if num_labels is not None and len(value) != num_labels:
            raise bad(f"must have one count per label ({num_labels})")
        return [int(x) for x in value]
    raise AssertionError(f"unknown field kind {kind}")  # a bug in this table, not input


def _fields(where: str, record: Mapping[str, Any], schema: Mapping[str, str], num_labels: int | None) -> dict[str, Any]:
    unknown = sorted(set(record) - set(schema))
    if unknown:
        raise Malformed(
            f"unexpected field '{unknown[0]}' in {where}" + (f" (+{len(unknown) - 1} more)" if len(unknown) > 1 else "")
        )
    return {k: _check(k, v, schema[k], num_labels) for k, v in record.items()}


def _head(
    metrics: Mapping[str, Any],
    info: Mapping[str, Any],
    metric_schema: Mapping[str, str],
    info_schema: Mapping[str, str],
    statuses: tuple[str, ...],
    node_id: int,
    num_labels: int | None,
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(metrics, client info, the record's head) of any reply: known fields only, a partition id, a known status
    (the first of ``statuses`` when absent)."""
    m = _fields("metrics", metrics, metric_schema, num_labels)
    i = _fields("client-info", info, info_schema, num_labels)
    if "partition-id" not in i:
        raise Malformed("field 'partition-id' is missing from client-info")
    status = i.get("status", statuses[0])
    if status not in statuses:
        raise Malformed(f"field 'status' must be one of {', '.join(statuses)} (got {status!r})")
    return m, i, {"node-id": node_id, "partition-id": i["partition-id"], "status": status}


def _privacy_report(info: Mapping[str, Any]) -> dict[str, Any] | None:
    """The sample-level accounting of a reply (all required fields, within the node's own budget), or None."""
    present = [k for k in PRIVACY_FIELDS if k in info]
    if not present:
        return None
    missing = [k for k, (required, _) in PRIVACY_FIELDS.items() if required and k not in info]
    if missing:
        raise Malformed(f"privacy accounting without '{missing[0]}'")
    privacy = {k: info[k] for k in present}
    if privacy["max-epsilon"] and privacy["epsilon"] > privacy["max-epsilon"] * (1 + 1e-9):
        raise Malformed(f"epsilon {privacy['epsilon']:.4g} is above the node's own budget {privacy['max-epsilon']:g}")
    return privacy


@dataclass
class Screened:
    """A reply that passed the schema: what the server records, and what aggregation may use."""

    status: str
    record: dict[str, Any]
    weight: float = 0.0
    privacy: dict[str, Any] | None = None
    shared: list[str] = field(default_factory=list)


def screen_train(
    metrics: Mapping[str, Any],
    info: Mapping[str, Any],
    *,
    node_id: int,
    has_arrays: bool,
    num_labels: int | None,
    sample_level: bool,
    max_weight: float,
) -> Screened:
    """Check a train reply's metrics and client info; Malformed with the reason when it breaks the schema."""
    m, i, rec = _head(metrics, info, METRIC_FIELDS, INFO_FIELDS, STATUSES, node_id, num_labels)
    status = rec["status"]
    if status == "refused":
        if "rule" not in i or "reason" not in i:
            raise Malformed("a refusal must name its 'rule' and 'reason'")
        if has_arrays:
            raise Malformed("a refusal must not carry an update")
        rec.update(rule=i["rule"], reason=i["reason"])
        return Screened(status, rec)
    shared = i.get("shared", [])
    rec["shared"] = shared
    if "num-examples" in m and "num-examples" not in shared:
        raise Malformed("field 'num-examples' is sent but not listed in 'shared'")
    for name, group in (
        ("train-loss", "train-loss"),
        ("label-histogram", "label-histogram"),
        ("train-tokens", "train-tokens"),
        ("train-seconds", "timings"),
        ("handler-seconds", "timings"),
    ):
        present = name in m or name in i
        if present and group not in shared:
            raise Malformed(f"field '{name}' is sent but '{group}' is not listed in 'shared'")
    weight = 0.0
    if status == "trained":
        if not has_arrays:
            raise Malformed("status 'trained' without an update")
        if "weight" not in m:
            raise Malformed("field 'weight' is missing from metrics")
        weight = m["weight"]
        if max_weight > 0 and weight > max_weight:
            raise Malformed(f"weight {weight:g} is above strategy.max-weight={max_weight:g}")
        if "num-examples" in m and float(m["num-examples"]) != weight:
            raise Malformed(f"weight {weight:g} differs from num-examples {m['num-examples']}")
    elif has_arrays:
        raise Malformed(f"status '{status}' must not carry an update")
    rec["weight"] = weight
    for name in ("num-examples", "train-loss"):
        if name in m:
            rec[name] = m[name]
    for name in (
        "label-histogram",
        "train-tokens",
        "train-seconds",
        "handler-seconds",
        "train-steps",
        "transport",
        "replayed",
        "secagg-bytes-up",
        "secagg-clipped-values",
        "secagg-withheld",
        "lora-rank",
    ):
        if name in i:
            rec[name] = i[name]
    if "int8-scales" in i:
        rec["int8-scales"] = i["int8-scales"]
    privacy = _privacy_report(i)
    if privacy is None and sample_level and status == "trained":
        raise Malformed("a sample-level DP run needs the client's privacy accounting (epsilon, delta, sigma, ...)")
    return Screened(status, rec, weight, privacy, shared)


def screen_evaluate(metrics: Mapping[str, Any], info: Mapping[str, Any], *, node_id: int) -> Screened:
    """Check a local-evaluation reply; Malformed with the reason when it breaks the schema."""
    m, i, rec = _head(metrics, info, EVAL_METRIC_FIELDS, EVAL_INFO_FIELDS, EVAL_STATUSES, node_id, None)
    status = rec["status"]
    if status != "evaluated":
        if m:
            raise Malformed(f"status '{status}' must not carry metrics")
        return Screened(status, rec)
    missing = [k for k in EVAL_METRIC_FIELDS if k not in m]
    if missing:
        raise Malformed(f"field '{missing[0]}' is missing from metrics")
    if m["weight"] != float(m["num-examples"]):
        raise Malformed(f"weight {m['weight']:g} differs from num-examples {m['num-examples']}")
    rec.update(m)
    if "handler-seconds" in i:
        rec["handler-seconds"] = i["handler-seconds"]
    return Screened(status, rec, m["weight"])


PERSONAL_STATUSES = ("personalized", "not-shared", "refused", "no-personal-state")
PERSONAL_METRIC_FIELDS = {
    "num-examples": "count",
    **{
        f"{stage}-{name}": kind
        for stage in ("federated", "personalized", "local-only")
        for name, kind in (("accuracy", "unit"), ("f1", "unit"), ("loss", "nonneg"))
    },
}
PERSONAL_INFO_FIELDS = {
    "partition-id": "id",
    "status": "text",
    "rule": "text",
    "reason": "text",
    "handler-seconds": "nonneg",
    "train-steps": "count",
    **{k: kind for k, (_, kind) in PRIVACY_FIELDS.items()},
}


def screen_personalize(
    metrics: Mapping[str, Any], info: Mapping[str, Any], *, node_id: int, sample_level: bool
) -> Screened:
    """Check a personalization reply (``fedhf.federation.personal``); Malformed with the reason when it breaks the
    schema. Metrics come only with status 'personalized', and a DP node that trained reports its accounting."""
    m, i, rec = _head(metrics, info, PERSONAL_METRIC_FIELDS, PERSONAL_INFO_FIELDS, PERSONAL_STATUSES, node_id, None)
    status = rec["status"]
    if status == "refused":
        if "rule" not in i or "reason" not in i:
            raise Malformed("a refusal must name its 'rule' and 'reason'")
        rec.update(rule=i["rule"], reason=i["reason"])
    if status != "personalized" and m:
        raise Malformed(f"status '{status}' must not carry metrics")
    if status == "personalized" and "num-examples" not in m:
        raise Malformed("field 'num-examples' is missing from metrics")
    rec.update(m)
    for name in ("handler-seconds", "train-steps"):
        if name in i:
            rec[name] = i[name]
    privacy = _privacy_report(i)
    if privacy is None and sample_level and i.get("train-steps", 0) > 0:
        raise Malformed("a sample-level DP client that trained must report its privacy accounting")
    return Screened(status, rec, 0.0, privacy)


# ----------------------------------------------------------------------------- what a DP client discloses
# The model card, the README and docs/threat-model.md describe a sample-level DP client's reply with these
# lists; a test checks them against what a DP client really sends, field by field.
COVERED = {
    "arrays": "the adapter (or its update), the output of DP-SGD",
    "int8-scales": "one scale per tensor of an int8 update, computed from the update alone",
}
ACCOUNTING = {
    "epsilon": "the run's epsilon on this node",
    "delta": "its delta",
    "noise-multiplier": "sigma",
    "max-grad-norm": "the clipping norm C",
    "sample-rate": "q = 1 / ceil(n / B)",
    "steps": "DP-SGD steps so far",
    "train-steps": "DP-SGD steps this round",
    "accountant": "rdp or prv",
    "accountant-id": "a random id of this run's accountant",
    "max-epsilon": "the owner's budget (0 = none)",
    "lifetime-epsilon": "the node's spend on its data over every run",
    "lifetime-delta": "the delta of that lifetime figure",
}
BOOKKEEPING = {
    "partition-id": "the node's id in the records",
    "status": "trained / refused / not-aggregated",
    "shared": "which optional fields the owner's policy lets out",
    "transport": "fp32 / fp16 / int8",
    "weight": "the averaging weight: 1, or num-examples when shared",
    "lora-rank": "the LoRA rank the node trains (its owner's node config), under strategy.lora-aggregation = svd",
}
SHARED_FIELDS = {
    "num-examples": ("num-examples",),
    "label-histogram": ("label-histogram",),
    "train-loss": ("train-loss",),
    "train-tokens": ("train-tokens",),
    "timings": ("train-seconds", "handler-seconds"),
    "local-eval": ("eval-loss", "eval-accuracy", "eval-f1"),
}
