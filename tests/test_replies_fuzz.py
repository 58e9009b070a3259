"""No reply can stop a run: malformed replies of every kind through the real aggregation path.

Each case starts from a valid DP reply and breaks one thing (a wrong type, NaN/inf/huge values, a missing or
extra key, an oversized array, a lie about the weight). The strategy must record each as that client's failure
(or a rejected update) with its reason, and aggregate exactly what the good replies give.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedhf.config.schema import parse_config
from fedhf.flower.strategy import build_strategy
from fedhf.run.record import RunRecorder

from .test_reliability import FakeGrid, _meta, adapter_like, fedavg, trained_from

pytestmark = pytest.mark.usefixtures("server_identity")

SHARED = ["label-histogram", "num-examples", "train-loss"]


def good_reply(node: int, trained: dict[str, np.ndarray], n: int) -> Message:
    info = {
        "partition-id": node,
        "status": "trained",
        "shared": SHARED,
        "transport": "fp32",
        "train-steps": 4,
        "label-histogram": [n // 2, n - n // 2],
        "epsilon": 0.8,
        "delta": 1e-3,
        "noise-multiplier": 20.0,
        "max-grad-norm": 1.0,
        "sample-rate": 0.25,
        "steps": 4,
        "accountant": "rdp",
        "accountant-id": f"id{node}",
        "max-epsilon": 0.0,
    }
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in trained.items()}),
            "metrics": MetricRecord({"weight": float(n), "num-examples": n, "train-loss": 0.5}),
            "client-info": ConfigRecord(info),
        }
    )
    return Message(content=content, metadata=_meta(node))


def _set(record: str, key: str, value):
    def mutate(msg: Message) -> None:
        msg.content[record][key] = value

    return mutate


def _drop(record: str, key: str):
    def mutate(msg: Message) -> None:
        del msg.content[record][key]

    return mutate


def _arrays(fn):
    def mutate(msg: Message) -> None:
        arrays = {k: a.numpy().copy() for k, a in msg.content["arrays"].items()}
        fn(arrays)
        msg.content["arrays"] = ArrayRecord({k: Array(v) for k, v in arrays.items()})

    return mutate


def _first(arrays, value):
    k = sorted(arrays)[0]
    arrays[k] = arrays[k].copy()
    arrays[k].flat[0] = value


def _refusal_with_arrays(msg: Message) -> None:
    info = msg.content["client-info"]
    info["status"], info["rule"], info["reason"] = "refused", "max-epsilon", "budget"


def _no_arrays(msg: Message) -> None:
    del msg.content.array_records["arrays"]


def _extra_record(msg: Message) -> None:
    msg.content["evil"] = ArrayRecord({"x": Array(np.zeros(3, np.float32))})


def _info_as_metrics(msg: Message) -> None:
    msg.content["client-info"] = MetricRecord({"partition-id": 1})


CASES = {
    "weight is a list": (_set("metrics", "weight", [10.0, 10.0]), "field 'weight' must be a finite number"),
    "weight NaN": (_set("metrics", "weight", float("nan")), "field 'weight' must be a finite number"),
    "weight inf": (_set("metrics", "weight", float("inf")), "field 'weight' must be a finite number"),
    "weight negative": (_set("metrics", "weight", -1.0), "field 'weight' must be > 0"),
    "weight zero": (_set("metrics", "weight", 0.0), "field 'weight' must be > 0"),
    "weight huge": (_set("metrics", "weight", 1e12), "above strategy.max-weight"),
    "weight just above the ceiling": (_set("metrics", "weight", 1e5 + 1), "above strategy.max-weight"),
    "weight missing": (_drop("metrics", "weight"), "field 'weight' is missing"),
    "num-examples inf": (_set("metrics", "num-examples", float("inf")), "field 'num-examples' must be a whole number"),
    "lie about weight": (_set("metrics", "num-examples", 3), "differs from num-examples"),
    "train-loss NaN": (_set("metrics", "train-loss", float("nan")), "field 'train-loss' must be a finite number"),
    "train-loss a list": (_set("metrics", "train-loss", [0.1]), "field 'train-loss' must be a finite number"),
    "extra metric": (_set("metrics", "accuracy", 0.9), "unexpected field 'accuracy' in metrics"),
    "no partition-id": (_drop("client-info", "partition-id"), "'partition-id' is missing"),
    "negative partition-id": (_set("client-info", "partition-id", -4), "field 'partition-id' must be a whole number"),
    "partition-id text": (_set("client-info", "partition-id", "3"), "field 'partition-id' must be a whole number"),
    "unknown status": (_set("client-info", "status", "hacked"), "field 'status' must be one of"),
    "histogram as text": (_set("client-info", "label-histogram", "[1, 2]"), "field 'label-histogram' must be a list"),
    "histogram too long": (_set("client-info", "label-histogram", [1, 2, 3]), "one count per label (2)"),
    "histogram negative": (_set("client-info", "label-histogram", [-5, 20]), "field 'label-histogram' must be a list"),
    "histogram not shared": (
        _set("client-info", "shared", ["num-examples", "train-loss"]),
        "'label-histogram' is not listed",
    ),
    "epsilon without sigma": (
        _drop("client-info", "noise-multiplier"),
        "privacy accounting without 'noise-multiplier'",
    ),
    "epsilon NaN": (_set("client-info", "epsilon", float("nan")), "field 'epsilon' must be a finite number"),
    "delta above one": (_set("client-info", "delta", 2.0), "field 'delta' must be in (0, 1)"),
    "sample-rate zero": (_set("client-info", "sample-rate", 0.0), "field 'sample-rate' must be in (0, 1]"),
    "unknown accountant": (_set("client-info", "accountant", "gdp"), "field 'accountant' must be one of"),
    "negative steps": (_set("client-info", "steps", -1), "field 'steps' must be a whole number"),
    "no accounting under DP": (
        lambda m: [
            m.content["client-info"].pop(k)
            for k in (
                "epsilon",
                "delta",
                "noise-multiplier",
                "max-grad-norm",
                "sample-rate",
                "steps",
                "accountant",
                "accountant-id",
                "max-epsilon",
            )
        ],
        "needs the client's privacy accounting",
    ),
    "epsilon above its own budget": (_set("client-info", "max-epsilon", 0.5), "above the node's own budget"),
    "extra info key": (_set("client-info", "password", "hunter2"), "unexpected field 'password' in client-info"),
    "unknown transport": (_set("client-info", "transport", "bf16"), "field 'transport' must be one of"),
    "scales as text": (_set("client-info", "int8-scales", "0.1"), "field 'int8-scales' must be a list"),
    "unknown shared name": (_set("client-info", "shared", ["num-examples", "secrets"]), "field 'shared' must list"),
    "huge reason text": (_set("client-info", "reason", "x" * 10_000), "at most 500 characters"),
    "negative seconds": (_set("client-info", "handler-seconds", -1.0), "field 'handler-seconds' must be >= 0"),
    "replayed as text": (_set("client-info", "replayed", "yes"), "field 'replayed' must be true or false"),
    "refusal with an update": (_refusal_with_arrays, "a refusal must not carry an update"),
    "refusal without a rule": (
        lambda m: m.content["client-info"].__setitem__("status", "refused"),
        "a refusal must name its 'rule'",
    ),
    "trained without arrays": (_no_arrays, "status 'trained' without an update"),
    "an extra record": (_extra_record, "unexpected record 'evil'"),
    "info is not a ConfigRecord": (_info_as_metrics, "no ConfigRecord 'client-info'"),
    "oversized array": (
        _arrays(lambda a: a.__setitem__("q.lora_A.weight", np.zeros((8, 384 * 50), np.float32))),
        "has shape",
    ),
    "NaN in the update": (_arrays(lambda a: _first(a, np.nan)), "non-finite"),
    "float64 update": (_arrays(lambda a: a.__setitem__("classifier.bias", np.zeros(2, np.float64))), "dtype"),
    "missing tensor": (_arrays(lambda a: a.pop("classifier.bias")), "missing tensor"),
    "extra tensor": (_arrays(lambda a: a.__setitem__("evil.weight", np.zeros(3, np.float32))), "unexpected tensor"),
}


def test_malformed_replies_are_that_clients_failure_and_the_aggregate_is_the_good_ones(tmp_path):
    assert len(CASES) >= 30
    base = adapter_like()
    cfg = parse_config(
        {
            "output-dir": str(tmp_path),
            "run-name": "fuzz",
            "privacy.mode": "sample",
            "strategy.min-train-nodes": 2,
            "strategy.min-available-nodes": 2,
        }
    )
    rec = RunRecorder(cfg)
    rec.set_privacy({"mode": "sample", "label": "sample-level (per example)", "accountant": "rdp"})
    s = build_strategy(cfg, rec, num_labels=2)
    bad_nodes = {100 + i: name for i, name in enumerate(CASES)}
    nodes = [1, 2, *bad_nodes]
    for rnd in (1, 2):  # two rounds: the run goes on after a round full of garbage
        arrays0 = {k: Array(v) for k, v in base.items()}
        list(s.configure_train(rnd, ArrayRecord(arrays0), ConfigRecord({}), FakeGrid(nodes)))
        good = {1: (trained_from(base, 0.01, 10 * rnd + 1), 30), 2: (trained_from(base, 0.01, 10 * rnd + 2), 10)}
        replies = [good_reply(n, t, w) for n, (t, w) in good.items()]
        for node, name in bad_nodes.items():
            msg = good_reply(node, trained_from(base, 0.01, node), 20)
            msg = Message(content=copy.deepcopy(msg.content), metadata=_meta(node))
            CASES[name][0](msg)
            replies.append(msg)
        arrays, _ = s.aggregate_train(rnd, replies)
        expected = fedavg([t for t, _ in good.values()], [w for _, w in good.values()])
        got = {k: a.numpy() for k, a in arrays.items()}
        assert all(np.allclose(got[k], expected[k], atol=1e-7) for k in expected)
        row = rec.end_round(rnd, {"loss": 0.5, "accuracy": 0.5, "f1": 0.5}, 0.1)
        reasons = {f["node_id"]: f["reason"] for f in row.failures}
        reasons.update({r["node_id"]: r["reason"] for r in row.rejected})
        for node, name in bad_nodes.items():
            assert node in reasons, name
            assert CASES[name][1] in reasons[node], (name, reasons[node])
        assert sorted(c["partition_id"] for c in row.clients if c["status"] == "trained") == [1, 2]
        assert row.weighting == "examples"
        base = {k: v.astype(np.float32) for k, v in got.items()}
    # the ledger holds only what passed the schema
    assert sorted(rec.record.privacy.clients) == sorted(
        [
            "1",
            "2",
            *[
                str(n)
                for n, c in bad_nodes.items()
                if c in ("oversized array", "NaN in the update", "float64 update", "missing tensor", "extra tensor")
            ],
        ]
    )


def test_malformed_evaluation_replies_are_dropped_and_the_rest_averaged(tmp_path):
    cfg = parse_config({"output-dir": str(tmp_path), "run-name": "ev"})
    rec = RunRecorder(cfg)
    s = build_strategy(cfg, rec)
    rec.start_round(1, 0, 0)

    def ev(node, loss, acc, n, **extra):
        metrics = {"eval-loss": loss, "eval-accuracy": acc, "eval-f1": acc, "num-examples": n, "weight": float(n)}
        metrics.update(extra.pop("metrics", {}))
        info = {"partition-id": node, "status": "evaluated", **extra}
        return Message(
            content=RecordDict({"metrics": MetricRecord(metrics), "client-info": ConfigRecord(info)}),
            metadata=_meta(node),
        )

    replies = [
        ev(1, 0.4, 0.8, 30),
        ev(2, 0.6, 0.6, 10),
        ev(3, float("nan"), 0.5, 10),
        ev(4, 0.5, 1.5, 10),
        ev(5, 0.5, 0.5, 10, metrics={"weight": 99.0}),
        ev(6, 0.5, 0.5, 10, secret="x"),
        Message(
            content=RecordDict({"client-info": ConfigRecord({"partition-id": 7, "status": "not-shared"})}),
            metadata=_meta(7),
        ),
    ]
    agg = s.aggregate_evaluate(1, replies)
    assert agg["num-examples"] == 40
    assert agg["eval-loss"] == pytest.approx((0.4 * 30 + 0.6 * 10) / 40)
    assert agg["eval-accuracy"] == pytest.approx((0.8 * 30 + 0.6 * 10) / 40)
