"""SecAgg+ under the Message-API strategies: Flower's protocol code end to end, in process.

The in-process Grid below delivers copies of every message to a real ClientApp with its own
Context per node (as a SuperNode would), so the four protocol stages, the masking and the
unmasking all run for real; only the transport is short-circuited.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid

from fedhf.config.schema import parse_config
from fedhf.errors import FedHFConfigError
from fedhf.flower.client_app import PolicyRefusal, guard_mod
from fedhf.flower.secagg import (
    SecAggSettings,
    SecureAggregationGrid,
    fitins_arrays,
    fitres_content,
    quantization_tolerance,
    secure_aggregation_mod,
)
from fedhf.flower.strategy import build_strategy
from fedhf.run.record import RunRecorder

pytestmark = pytest.mark.usefixtures("server_identity")


SHAPES = {
    "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight": (4, 12),
    "base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.weight": (12, 4),
    "base_model.model.classifier.modules_to_save.default.bias": (2,),
}


class InProcessGrid(Grid):
    """Delivers deep copies of messages to a ClientApp, one Context per node; a raising app is an error reply."""

    def __init__(self, app: ClientApp, node_configs: dict[int, dict]) -> None:
        self.app = app
        self.contexts = {
            nid: Context(run_id=1, node_id=nid, node_config=nc, state=RecordDict(), run_config={})
            for nid, nc in node_configs.items()
        }
        self.sent: list[Message] = []

    def set_run(self, run):  # pragma: no cover - not used
        pass

    @property
    def run(self):  # pragma: no cover - not used
        return None

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):  # pragma: no cover - not used
        raise NotImplementedError

    def pull_messages(self, message_ids):  # pragma: no cover - not used
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for m in messages:
            self.sent.append(m)
            delivered = Message(
                copy.deepcopy(m.content),
                dst_node_id=m.metadata.dst_node_id,
                message_type=m.metadata.message_type,
                group_id=m.metadata.group_id,
            )
            try:
                out = self.app(delivered, self.contexts[m.metadata.dst_node_id])
            except Exception as exc:  # noqa: BLE001 - a client crash is an error reply, as on a SuperNode
                replies.append(Message(Error(code=1, reason=f"{type(exc).__name__}: {exc}"), reply_to=m))
                continue
            if out.has_error():  # a ClientApp's own error reply (fedhf's guard_mod), as a SuperNode sends it
                replies.append(Message(out.error, reply_to=m))
                continue
            replies.append(Message(copy.deepcopy(out.content), reply_to=m))
        return replies


def client_update(node_config: dict) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(int(node_config["seed"]))
    return {name: rng.normal(0.0, 0.3, size=shape).astype(np.float32) for name, shape in SHAPES.items()}


def toy_app(cfg, extra_mods=()) -> ClientApp:
    """A client that 'trains' to a known, node-specific adapter (so the exact FedAvg is known)."""
    app = ClientApp(mods=[guard_mod, *extra_mods, secure_aggregation_mod])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        arrays, config = fitins_arrays(msg)
        assert list(arrays.keys()) == list(SHAPES)  # names restored on the client
        node = context.node_config
        if int(node.get("fail-at-stage2", 0)):
            raise RuntimeError("simulated crash while training")
        n = int(node["n"])
        if not n:  # this node's policy refuses the round: it drops out of the protocol, naming the rule
            raise PolicyRefusal(int(node["seed"]), "max-epsilon", "the node's budget would be exceeded")
        content = RecordDict(
            {
                "metrics": MetricRecord({"weight": float(n), "train-loss": 0.5, "num-examples": n}),
                "client-info": ConfigRecord(
                    {
                        "partition-id": int(node["seed"]),
                        "label-histogram": [n, 0],
                        "handler-seconds": 0.1,
                        "status": "trained",
                        "train-seconds": 0.1,
                        "train-steps": 1,
                        "train-tokens": 10,
                        "shared": ["label-histogram", "num-examples", "timings", "train-loss", "train-tokens"],
                    }
                ),
            }
        )
        content["arrays"] = ArrayRecord(array_dict={k: Array(v) for k, v in client_update(node).items()})
        return Message(fitres_content(content, arrays, cfg), reply_to=msg)

    return app


def _train_messages(grid: Grid, server_round: int = 1) -> list[Message]:
    initial = ArrayRecord(array_dict={k: Array(np.zeros(s, np.float32)) for k, s in SHAPES.items()})
    config = ConfigRecord({"server-round": server_round})
    return [
        Message(
            RecordDict({"arrays": initial, "config": config}),
            dst_node_id=nid,
            message_type=MessageType.TRAIN,
            group_id=str(server_round),
        )
        for nid in grid.get_node_ids()
    ]


def _cfg(**overrides):
    flat = {"strategy.secure-aggregation": True, **overrides}
    return parse_config(flat)


def _weighted_fedavg(nodes: dict[int, dict]) -> dict[str, np.ndarray]:
    total = sum(int(nc["n"]) for nc in nodes.values())
    out = {k: np.zeros(s, np.float64) for k, s in SHAPES.items()}
    for nc in nodes.values():
        for k, v in client_update(nc).items():
            out[k] += int(nc["n"]) / total * v.astype(np.float64)
    return out


def _check_equals_fedavg(replies, nodes, settings):
    arrays = [r.content["arrays"] for r in replies if not r.has_error() and "arrays" in r.content.array_records]
    assert arrays, "no aggregate came back"
    expected = _weighted_fedavg(nodes)
    max_abs = max(float(np.abs(v).max()) for v in expected.values())
    tol = quantization_tolerance([int(nc["n"]) for nc in nodes.values()], settings, max_abs)
    for rec in arrays:
        for name, arr in rec.items():
            got = arr.numpy()
            assert got.dtype == np.float32 and got.shape == SHAPES[name]
            err = float(np.abs(got.astype(np.float64) - expected[name]).max())
            assert err <= tol, (name, err, tol)
    # every participant gets the same aggregate, never its own update
    first = arrays[0]
    for rec in arrays[1:]:
        for name in SHAPES:
            np.testing.assert_array_equal(rec[name].numpy(), first[name].numpy())
    return tol


def test_secagg_aggregate_equals_weighted_fedavg_within_quantization_tolerance():
    cfg = _cfg()
    nodes = {101: {"seed": 1, "n": 120}, 202: {"seed": 2, "n": 300}, 303: {"seed": 3, "n": 45}}
    inner = InProcessGrid(toy_app(cfg), nodes)
    settings = SecAggSettings.from_config(cfg)
    rounds = []
    grid = SecureAggregationGrid(inner, settings, rounds.append)
    replies = list(grid.send_and_receive(_train_messages(grid)))
    assert len(replies) == 3 and not any(r.has_error() for r in replies)
    tol = _check_equals_fedavg(replies, nodes, settings)
    assert 0 < tol < 1e-3  # the documented bound is tight enough to matter for LoRA updates
    # the individual updates never reached the server: no reply of any stage carried one client's values
    (rec,) = rounds
    assert rec["participants"] == 3 and rec["dropped"] == 0 and rec["completed"]
    assert rec["num_shares"] == 3 and rec["reconstruction_threshold"] == 2
    assert rec["bytes_up"] > 0 and rec["bytes_down"] > 0
    # each masked vector travels as uint32: about the size of the fp32 adapter, not twice it
    values = sum(int(np.prod(s)) for s in SHAPES.values())
    for r in replies:
        assert (
            4 * values < int(r.content["client-info"]["secagg-bytes-up"]) < 4 * values + 200 * (len(SHAPES) + 1) + 2000
        )
    # metrics still arrive per client, in the clear
    assert sorted(int(r.content["metrics"]["num-examples"]) for r in replies) == [45, 120, 300]


def test_the_server_never_sees_an_individual_update():
    cfg = _cfg()
    nodes = {1: {"seed": 11, "n": 50}, 2: {"seed": 12, "n": 70}, 3: {"seed": 13, "n": 90}}
    seen: list[RecordDict] = []

    class Spy(InProcessGrid):
        def send_and_receive(self, messages, *, timeout=None):
            replies = super().send_and_receive(messages, timeout=timeout)
            seen.extend(copy.deepcopy(r.content) for r in replies if not r.has_error())  # as they arrived
            return replies

    inner = Spy(toy_app(cfg), nodes)
    grid = SecureAggregationGrid(inner, SecAggSettings.from_config(cfg))
    list(grid.send_and_receive(_train_messages(grid)))
    updates = [client_update(nc) for nc in nodes.values()]
    from flwr.common import bytes_to_ndarray
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

    masked = [
        bytes_to_ndarray(b)
        for content in seen
        for b in content.config_records[RECORD_KEY_CONFIGS].get(Key.MASKED_PARAMETERS, [])
    ]
    assert masked and all(m.dtype == np.uint32 for m in masked)  # on the wire: uint32
    values = np.concatenate([m.ravel() for m in masked]).astype(np.float64)
    # masked values are uniform over [0, 2^32); quantized but unmasked ones would all sit below clients x 2^22
    assert values.max() > 2**31 and 0.4 < values.mean() / 2**32 < 0.6
    for content in seen:
        for record in content.array_records.values():
            assert len(record) == 0  # secaggplus_mod cleared the plain adapter before the reply left
        for record in content.config_records.values():
            for value in record.values():
                for v in value if isinstance(value, list) else [value]:
                    if isinstance(v, bytes):
                        for upd in updates:
                            for arr in upd.values():
                                assert arr.tobytes() not in v


def test_a_dropped_client_below_the_threshold_does_not_stop_the_round():
    cfg = _cfg(**{"strategy.secagg-reconstruction-threshold": 2})
    nodes = {
        1: {"seed": 1, "n": 100},
        2: {"seed": 2, "n": 200},
        3: {"seed": 3, "n": 150},
        4: {"seed": 4, "n": 80, "fail-at-stage2": 1},
    }
    settings = SecAggSettings.from_config(cfg)
    rounds = []
    grid = SecureAggregationGrid(InProcessGrid(toy_app(cfg), nodes), settings, rounds.append)
    replies = list(grid.send_and_receive(_train_messages(grid)))
    errors = [r for r in replies if r.has_error()]
    assert len(errors) == 1 and errors[0].metadata.src_node_id == 4
    # the kind of failure reaches the server; the exception's text (which could quote data) stays on the node
    assert "RuntimeError on the node" in errors[0].error.reason and "simulated crash" not in errors[0].error.reason
    survivors = {k: v for k, v in nodes.items() if k != 4}
    _check_equals_fedavg(replies, survivors, settings)  # the dropped client's masks were removed
    assert rounds[0]["dropped"] == 1 and rounds[0]["participants"] == 3 and rounds[0]["completed"]


def test_a_refusing_node_drops_out_and_the_server_sees_a_refusal_not_a_failure():
    cfg = _cfg()
    nodes = {1: {"seed": 1, "n": 100}, 2: {"seed": 2, "n": 0}, 3: {"seed": 3, "n": 60}}
    settings = SecAggSettings.from_config(cfg)
    rounds = []
    grid = SecureAggregationGrid(InProcessGrid(toy_app(cfg), nodes), settings, rounds.append)
    replies = list(grid.send_and_receive(_train_messages(grid)))
    (refused,) = [r for r in replies if r.metadata.src_node_id == 2]
    assert not refused.has_error() and "arrays" not in refused.content.array_records  # no update from it
    info = refused.content["client-info"]
    assert (info["status"], info["rule"], info["partition-id"]) == ("refused", "max-epsilon", 2)
    assert set(refused.content.keys()) == {"client-info"}  # nothing computed from its data
    _check_equals_fedavg(replies, {k: v for k, v in nodes.items() if k != 2}, settings)
    assert rounds[0]["dropped"] == 1 and rounds[0]["completed"]


def test_the_strategy_aggregates_the_secure_sum_like_plain_fedavg(tmp_path):
    """FedAvg over the replies SecureAggregationGrid returns == the protocol's weighted average."""
    cfg = parse_config({"strategy.secure-aggregation": True, "output-dir": str(tmp_path), "run-name": "s"})
    nodes = {1: {"seed": 1, "n": 100}, 2: {"seed": 2, "n": 200}, 3: {"seed": 3, "n": 300}}
    settings = SecAggSettings.from_config(cfg)
    recorder = RunRecorder(cfg)
    recorder.set_partitions([])
    recorder.set_secure_aggregation(settings.describe())
    strategy = build_strategy(cfg, recorder, 3)
    grid = SecureAggregationGrid(InProcessGrid(toy_app(cfg), nodes), settings, recorder.secure_aggregation_round)
    initial = ArrayRecord(array_dict={k: Array(np.zeros(s, np.float32)) for k, s in SHAPES.items()})
    messages = list(strategy.configure_train(1, initial, ConfigRecord({"server-round": 1}), grid))
    replies = grid.send_and_receive(messages)
    arrays, metrics = strategy.aggregate_train(1, replies)
    expected = _weighted_fedavg(nodes)
    tol = quantization_tolerance([100, 200, 300], settings, max(float(np.abs(v).max()) for v in expected.values()))
    for name, arr in arrays.items():
        assert float(np.abs(arr.numpy() - expected[name]).max()) <= tol + 1e-7
    assert int(metrics["weight"]) == 600
    saved = json.loads((tmp_path / "s" / "run.json").read_text())["secure_aggregation"]
    assert saved["quantization_range"] == 4194304 and saved["quantization_bits"] == 22
    assert saved["rounds"][0]["participants"] == 3


def test_evaluate_messages_pass_through_untouched():
    cfg = _cfg()
    calls = []

    class Counting(InProcessGrid):
        def send_and_receive(self, messages, *, timeout=None):
            messages = list(messages)
            calls.append([m.metadata.message_type for m in messages])
            return []

    grid = SecureAggregationGrid(Counting(toy_app(cfg), {1: {"seed": 1, "n": 1}}), SecAggSettings.from_config(cfg))
    msg = Message(
        RecordDict({"config": ConfigRecord({"server-round": 1})}),
        dst_node_id=1,
        message_type=MessageType.EVALUATE,
        group_id="1",
    )
    grid.send_and_receive([msg])
    assert calls == [[MessageType.EVALUATE]]


@pytest.mark.parametrize(
    "overrides, sampled, fragment",
    [
        ({"strategy.secagg-reconstruction-threshold": 5}, 3, "secagg-reconstruction-threshold': got 5"),
        ({"strategy.secagg-num-shares": 5}, 3, "secagg-num-shares': got 5"),
        ({}, 1, "at least 2"),
        ({"strategy.secagg-quantization-range": 2**31 - 1}, 3, "secagg-quantization-range"),
    ],
)
def test_rounds_the_protocol_cannot_complete_are_refused_before_any_message(overrides, sampled, fragment):
    settings = SecAggSettings.from_config(_cfg(**overrides))
    with pytest.raises(FedHFConfigError, match=fragment.replace("'", ".")):
        settings.check_round(sampled)


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"privacy.mode": "client"}, "strategy.secure-aggregation"),
        ({"privacy.mode": "both"}, "strategy.secure-aggregation"),
        ({"strategy.secagg-num-shares": 2}, "strategy.secagg-num-shares"),
        ({"strategy.secagg-reconstruction-threshold": 1}, "strategy.secagg-reconstruction-threshold"),
        ({"strategy.secagg-num-shares": 3, "strategy.secagg-reconstruction-threshold": 3}, "not below"),
        ({"strategy.min-train-nodes": 1}, "strategy.min-train-nodes"),
    ],
)
def test_bad_secagg_config_names_the_key(overrides, fragment):
    with pytest.raises(FedHFConfigError, match=fragment):
        _cfg(**overrides)


def test_a_client_above_max_weight_stops_with_the_key_to_raise():
    cfg = _cfg(**{"strategy.secagg-max-weight": 50.0})
    received = ArrayRecord(array_dict={k: Array(np.zeros(s, np.float32)) for k, s in SHAPES.items()})
    content = RecordDict(
        {"metrics": MetricRecord({"weight": 51.0}), "client-info": ConfigRecord({}), "arrays": received}
    )
    with pytest.raises(FedHFConfigError, match="raise strategy.secagg-max-weight to at least 51"):
        fitres_content(content, received, cfg)


def test_one_contributor_is_never_unmasked():
    """Client 2 refuses the round: a 'sum' of client 1 alone would be client 1's update."""
    cfg = _cfg()
    nodes = {1: {"seed": 1, "n": 100}, 2: {"seed": 2, "n": 0}}
    rounds = []
    grid = SecureAggregationGrid(InProcessGrid(toy_app(cfg), nodes), SecAggSettings.from_config(cfg), rounds.append)
    replies = list(grid.send_and_receive(_train_messages(grid)))
    assert not any("arrays" in r.content.array_records for r in replies if not r.has_error())
    lone = next(r for r in replies if r.metadata.src_node_id == 1)
    assert lone.content["client-info"]["status"] == "not-aggregated"
    assert "too many clients dropped out" in lone.content["client-info"]["secagg-withheld"]
    assert rounds[0]["completed"] is False and rounds[0]["contributors"] == 0


def test_masks_come_from_shake256_of_the_whole_secret():
    from fedhf.flower.secagg import shake_rand_gen

    a = shake_rand_gen(b"k" * 32, 2**32, [(3, 4), (), (5,)])
    assert [x.shape for x in a] == [(3, 4), (), (5,)]
    assert all(x.dtype == np.int64 and x.min() >= 0 and x.max() < 2**32 for x in a)
    again = shake_rand_gen(b"k" * 32, 2**32, [(3, 4), (), (5,)])
    assert all(np.array_equal(x, y) for x, y in zip(a, again, strict=True))
    # seeds that Flower 1.42 folds to the same 32 bits (XOR of 4-byte words) give different masks here
    s1, s2 = bytes(32), b"\x01\x00\x00\x00" * 2 + bytes(24)
    assert not np.array_equal(shake_rand_gen(s1, 2**32, [(8,)])[0], shake_rand_gen(s2, 2**32, [(8,)])[0])
    with pytest.raises(ValueError, match="power of two"):
        shake_rand_gen(b"k", 1000, [(2,)])


def test_a_client_without_fedhf_masks_is_refused():
    """A plain Flower SecAgg+ client would mask with 32-bit seeds: its masks cannot cancel with fedhf's."""
    from flwr.client.mod import secaggplus_mod

    from fedhf.errors import FedHFRunError

    cfg = _cfg()
    plain = ClientApp(mods=[secaggplus_mod])

    @plain.train()
    def train(msg, context):  # pragma: no cover - the protocol stops before it trains
        raise AssertionError("must not be reached")

    grid = SecureAggregationGrid(InProcessGrid(plain, {1: {}, 2: {}}), SecAggSettings.from_config(cfg))
    with pytest.raises(FedHFRunError, match="masks with Flower 1.42 default"):
        grid.send_and_receive(_train_messages(grid))


def test_a_weight_that_rounds_to_zero_is_refused_before_training():
    from fedhf.config.schema import check_secagg_weight

    cfg = _cfg(**{"strategy.secagg-max-weight": 1e9})
    with pytest.raises(FedHFConfigError, match="rounds to zero in SecAgg"):
        check_secagg_weight(cfg, 100)
    check_secagg_weight(_cfg(), 100)  # the default max-weight is fine


def test_a_plain_train_message_is_refused_when_the_run_asks_for_secure_aggregation():
    from fedhf.flower.client_app import app

    msg = Message(
        RecordDict(
            {
                "arrays": ArrayRecord(array_dict={"w": Array(np.zeros(2, np.float32))}),
                "config": ConfigRecord({**_cfg().to_flat(), "server-round": 1}),
            }
        ),
        dst_node_id=1,
        message_type=MessageType.TRAIN,
        group_id="1",
    )
    ctx = Context(
        run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 2}, state=RecordDict(), run_config={}
    )
    reply = app(msg, ctx)
    info = reply.content["client-info"]
    assert (info["status"], info["rule"]) == ("refused", "strategy.secure-aggregation")
    assert "not sent in the clear" in info["reason"] and set(reply.content.keys()) == {"client-info", "metrics"}
    assert len(reply.content["metrics"]) == 0


def test_a_node_that_requires_secure_aggregation_refuses_before_sending_any_key():
    """The set-up stage carries the run config: a node whose policy refuses the run leaves before the key exchange."""
    from fedhf.flower.client_app import make_client_app

    cfg = _cfg(**{"privacy.mode": "none"})
    nodes = {
        1: {"partition-id": 0, "num-partitions": 2, "min-privacy": "sample"},
        2: {"partition-id": 1, "num-partitions": 2, "min-privacy": "sample"},
    }
    inner = InProcessGrid(make_client_app(), nodes)
    grid = SecureAggregationGrid(inner, SecAggSettings.from_config(cfg))
    replies = list(grid.send_and_receive(_train_messages(grid)))
    assert [r.content["client-info"]["rule"] for r in replies] == ["min-privacy", "min-privacy"]
    # only the set-up stage went out; every node answered it with its refusal (no public key, no share)
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

    assert {m.content.config_records[RECORD_KEY_CONFIGS][Key.STAGE] for m in inner.sent} == {Stage.SETUP}


def test_a_node_refusing_at_set_up_does_not_break_the_others_round():
    """Flower 1.42 would count a node that failed the set-up stage as 'dead' at unmasking and ask the others for its
    shares, which they never got (KeyError on every client): fedhf drops it from the sampled nodes instead."""
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

    cfg = _cfg()

    def refuse_setup(msg, context, call_next):
        configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        if context.node_config.get("refuse") and configs is not None and configs.get(Key.STAGE) == Stage.SETUP:
            raise PolicyRefusal(int(context.node_config["seed"]), "min-privacy", "no DP in this run")
        return call_next(msg, context)

    app = toy_app(cfg, extra_mods=[refuse_setup])  # after guard_mod, before the SecAgg+ mod
    nodes = {
        1: {"seed": 1, "n": 100},
        2: {"seed": 2, "n": 50},
        3: {"seed": 3, "n": 80},
        4: {"seed": 4, "n": 10, "refuse": 1},
    }
    settings = SecAggSettings.from_config(cfg)
    rounds = []
    grid = SecureAggregationGrid(InProcessGrid(app, nodes), settings, rounds.append)
    replies = list(grid.send_and_receive(_train_messages(grid)))
    (refused,) = [r for r in replies if r.metadata.src_node_id == 4]
    assert refused.content["client-info"]["rule"] == "min-privacy"
    _check_equals_fedavg(replies, {k: v for k, v in nodes.items() if k != 4}, settings)
    assert rounds[0]["completed"] and rounds[0]["participants"] == 3 and rounds[0]["dropped"] == 1
