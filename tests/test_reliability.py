"""Reliability without a federation: wire formats, reply checks, checkpoints, the clients' saved state."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, Metadata, MetricRecord, RecordDict

from fedhf.config.schema import parse_config
from fedhf.errors import FedHFConfigError, FedHFRunError
from fedhf.federation import faults
from fedhf.federation.node_state import FedHFNodeStateError, SpendStore, arrays_digest, legacy_key
from fedhf.federation.updates import (
    FP16_ABSOLUTE_ERROR,
    FP16_RELATIVE_ERROR,
    check_update,
    decode,
    encode,
    payload_nbytes,
)
from fedhf.flower.strategy import build_strategy, restore_strategy_state, strategy_state
from fedhf.run.checkpoint import FedHFCheckpointError, load_checkpoint, save_checkpoint
from fedhf.run.record import RunRecorder
from fedhf.run.store import Round

pytestmark = pytest.mark.usefixtures("server_identity")


def adapter_like(seed: int = 0) -> dict[str, np.ndarray]:
    """Shapes of a LoRA r 8 adapter on a 384-wide BERT (query/value A and B, the head)."""
    rng = np.random.default_rng(seed)
    return {
        "q.lora_A.weight": rng.uniform(-0.1, 0.1, (8, 384)).astype(np.float32),
        "q.lora_B.weight": np.zeros((384, 8), np.float32),
        "classifier.weight": rng.normal(0, 0.02, (2, 384)).astype(np.float32),
        "classifier.bias": np.zeros(2, np.float32),
    }


def trained_from(base: dict[str, np.ndarray], scale: float, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (v + rng.normal(0, scale, v.shape)).astype(np.float32) for k, v in base.items()}


# ----------------------------------------------------------------------------- transport


@pytest.mark.parametrize("dtype", ["fp16", "int8"])
def test_compressed_updates_decode_within_the_documented_tolerance(dtype):
    base = adapter_like()
    trained = trained_from(base, 0.003, seed=1)
    enc = encode(trained, base, dtype)
    decoded = decode(enc.arrays, base, dtype, enc.scales or None)
    for k, v in trained.items():
        delta = v - base[k]
        err = np.abs(decoded[k] - v)
        if dtype == "fp16":
            bound = np.abs(delta) * FP16_RELATIVE_ERROR + FP16_ABSOLUTE_ERROR + np.abs(v) * 2**-23
        else:
            bound = np.full(v.shape, np.max(np.abs(delta)) / 127 / 2 + np.abs(v).max() * 2**-23)
        assert (err <= bound).all(), (k, float(err.max()))
        assert decoded[k].dtype == np.float32
    fp32 = payload_nbytes(encode(trained, base, "fp32").arrays)
    assert payload_nbytes(enc.arrays) == fp32 // (2 if dtype == "fp16" else 4)


def test_fp32_transport_sends_the_adapter_itself():
    base = adapter_like()
    trained = trained_from(base, 0.01, seed=2)
    enc = encode(trained, base, "fp32")
    assert all(np.array_equal(enc.arrays[k], trained[k]) for k in trained) and enc.scales == []
    assert all(np.array_equal(decode(enc.arrays, base, "fp32", None)[k], trained[k]) for k in trained)


def test_int8_keeps_a_non_finite_update_visible_to_the_server():
    base = adapter_like()
    trained = trained_from(base, 0.01, seed=3)
    trained["classifier.weight"][0, 0] = np.nan
    enc = encode(trained, base, "int8")
    with pytest.raises(ValueError, match="classifier.weight.*int8 scale nan"):
        decode(enc.arrays, base, "int8", enc.scales)


def test_check_update_names_every_problem():
    ref = adapter_like()
    ok = trained_from(ref, 0.01, seed=4)
    assert check_update(ok, ref, 100.0)[0] is None
    cases = {
        "NaN": faults.poison_values("nan", ok),
        "Inf": faults.poison_values("inf", ok),
        "shape": faults.poison_structure("shape", ok),
        "unexpected tensor": faults.poison_structure("extra", ok),
        "missing tensor": faults.poison_structure("missing", ok),
        "dtype float64": faults.poison_structure("dtype", ok),
        "above strategy.max-update-norm": faults.poison_values("norm", ok),
    }
    for words, bad in cases.items():
        reason, _ = check_update(bad, ref, 100.0)
        assert reason is not None and words in reason, (words, reason)
    assert check_update(faults.poison_values("norm", ok), ref, 0.0)[0] is None  # 0 = no bound


# ----------------------------------------------------------------------------- the server's door


def _meta(node: int) -> Metadata:
    return Metadata(
        run_id=1,
        message_id=f"m{node}",
        src_node_id=node,
        dst_node_id=0,
        reply_to_message_id="x",
        group_id="1",
        created_at=time.time(),
        ttl=60.0,
        message_type=MessageType.TRAIN,
    )


def reply(
    node: int,
    trained: dict[str, np.ndarray],
    base: dict[str, np.ndarray],
    n: int,
    *,
    dtype: str = "fp32",
    poison: str | None = None,
) -> Message:
    enc = encode(faults.poison_values(poison, trained), base, dtype)
    payload = faults.poison_structure(poison, enc.arrays)
    info = {
        "partition-id": node,
        "train-seconds": 1.0,
        "handler-seconds": 1.5,
        "train-steps": 3,
        "train-tokens": 40,
        "label-histogram": [n // 2, n - n // 2],
        "transport": dtype,
        "status": "trained",
        "shared": ["label-histogram", "num-examples", "timings", "train-loss", "train-tokens"],
    }
    if enc.scales:
        info["int8-scales"] = enc.scales
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in payload.items()}),
            "metrics": MetricRecord({"weight": float(n), "train-loss": 0.5, "num-examples": n}),
            "client-info": ConfigRecord(info),
        }
    )
    return Message(content=content, metadata=_meta(node))


class FakeGrid:
    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return self.nodes


def start(tmp_path, nodes: list[int], base: dict[str, np.ndarray], **keys):
    cfg = parse_config(
        {
            "output-dir": str(tmp_path),
            "run-name": "r",
            "strategy.min-train-nodes": 2,
            "strategy.min-available-nodes": 2,
            **keys,
        }
    )
    rec = RunRecorder(cfg)
    s = build_strategy(cfg, rec)
    msgs = list(
        s.configure_train(1, ArrayRecord({k: Array(v) for k, v in base.items()}), ConfigRecord({}), FakeGrid(nodes))
    )
    assert sorted(m.metadata.dst_node_id for m in msgs) == sorted(nodes)
    return s, rec


def fedavg(states: list[dict[str, np.ndarray]], weights: list[int]) -> dict[str, np.ndarray]:
    total = sum(weights)
    return {
        k: sum(s[k].astype(np.float64) * w for s, w in zip(states, weights, strict=True)) / total for k in states[0]
    }


def test_malformed_and_poisoned_replies_are_dropped_and_the_rest_averaged(tmp_path):
    base = adapter_like()
    good = {1: (trained_from(base, 0.01, 11), 30), 2: (trained_from(base, 0.01, 12), 10)}
    poisons = {3: "nan", 4: "inf", 5: "shape", 6: "extra", 7: "norm", 8: "missing", 9: "dtype"}
    s, rec = start(tmp_path, list(good) + list(poisons), base)
    replies = [reply(n, t, base, w) for n, (t, w) in good.items()]
    replies += [reply(n, trained_from(base, 0.01, n), base, 20, poison=p) for n, p in poisons.items()]
    arrays, metrics = s.aggregate_train(1, replies)
    expected = fedavg([t for t, _ in good.values()], [w for _, w in good.values()])
    got = {k: a.numpy() for k, a in arrays.items()}
    assert all(np.allclose(got[k], expected[k], atol=1e-7) for k in expected)
    assert metrics["weight"] == 40
    row = rec._round
    assert {r["node_id"]: r["reason"] for r in row.rejected}.keys() == set(poisons)
    reasons = {r["node_id"]: r["reason"] for r in row.rejected}
    for node, words in {
        3: "NaN",
        4: "Inf",
        5: "shape",
        6: "unexpected tensor",
        7: "max-update-norm",
        8: "missing tensor",
        9: "float64",
    }.items():
        assert words in reasons[node], (node, reasons[node])
    statuses = {c["partition_id"]: c["status"] for c in row.clients}
    assert statuses == {1: "trained", 2: "trained", **{n: "rejected" for n in poisons}}
    assert all(c["update_norm"] > 0 for c in row.clients if c["status"] == "trained")


@pytest.mark.parametrize("dtype", ["fp16", "int8"])
def test_compressed_replies_are_decoded_before_aggregation(tmp_path, dtype):
    base = adapter_like()
    states = [trained_from(base, 0.01, 21), trained_from(base, 0.01, 22)]
    s, rec = start(tmp_path, [1, 2], base, **{"transport.dtype": dtype})
    arrays, _ = s.aggregate_train(
        1, [reply(1, states[0], base, 10, dtype=dtype), reply(2, states[1], base, 30, dtype=dtype)]
    )
    expected = fedavg(states, [10, 30])
    worst = max(float(np.abs(arrays[k].numpy() - expected[k]).max()) for k in expected)
    assert worst < (2e-5 if dtype == "fp16" else 0.05 * 4 / 127)  # int8: half a step of the largest update, with margin
    assert arrays["q.lora_A.weight"].numpy().dtype == np.float32
    # bytes on the wire, serialisation headers (128 B per tensor) included, against the same reply in fp32
    fp32_bytes = sum(len(a.data) for a in reply(1, states[0], base, 10).content["arrays"].values())
    got = rec._round.clients[0]["bytes_up"]
    headers = 128 * len(base)
    assert got - headers == (fp32_bytes - headers) // (2 if dtype == "fp16" else 4)


def test_a_silent_client_is_a_failure_and_too_few_updates_stop_the_round(tmp_path):
    base = adapter_like()
    s, rec = start(tmp_path, [1, 2, 3], base)
    s.aggregate_train(
        1, [reply(1, trained_from(base, 0.01, 1), base, 10), reply(2, trained_from(base, 0.01, 2), base, 10)]
    )
    assert [f["node_id"] for f in rec._round.failures] == [3]
    assert "no reply within strategy.round-timeout" in rec._round.failures[0]["reason"]
    s2, _ = start(tmp_path / "b", [1, 2, 3], base)
    with pytest.raises(FedHFRunError, match="only 1 valid update.*strategy.min-train-nodes=2.*--resume"):
        s2.aggregate_train(
            1,
            [
                reply(1, trained_from(base, 0.01, 1), base, 10),
                reply(2, trained_from(base, 0.01, 2), base, 10, poison="nan"),
            ],
        )


def test_median_ignores_a_bounded_outlier_that_fedavg_would_follow(tmp_path):
    base = adapter_like()
    honest = [trained_from(base, 0.001, 30 + i) for i in range(4)]
    outlier = {k: v + 0.5 for k, v in base.items()}  # inside the norm bound, far from the others
    results = {}
    for name in ("fedavg", "fedmedian", "fedtrimmedavg"):
        s, _ = start(tmp_path / name, [1, 2, 3, 4, 5], base, **{"strategy.name": name})
        arrays, _ = s.aggregate_train(1, [reply(i + 1, t, base, 10) for i, t in enumerate(honest + [outlier])])
        results[name] = max(float(np.abs(arrays[k].numpy() - base[k]).max()) for k in base)
    assert results["fedavg"] > 0.09  # pulled a fifth of the way to the outlier
    assert results["fedmedian"] < 0.01 and results["fedtrimmedavg"] < 0.01


# ----------------------------------------------------------------------------- checkpoints


def _checkpoint(tmp_path, rnd: int = 2, uid: str = "u1"):
    (tmp_path / ".fedhf-run").write_text(json.dumps({"run_uid": uid}))  # a run folder fedhf made
    arrays = adapter_like()
    save_checkpoint(
        tmp_path,
        rnd,
        run_uid=uid,
        config_sha256="c",
        arrays=arrays,
        strategy_arrays={"m_t/x": np.ones(3)},
        strategy_state={"class": "FedAvg"},
        run_record={"rounds": [{"round": r} for r in range(rnd + 1)]},
    )
    return arrays


def test_checkpoint_round_trip_keeps_only_the_latest(tmp_path):
    _checkpoint(tmp_path, 1)
    arrays = _checkpoint(tmp_path, 2)
    ck = load_checkpoint(tmp_path, run_uid="u1", config_sha256="c")
    assert ck.round == 2 and [r["round"] for r in ck.run["rounds"]] == [0, 1, 2]
    assert all(np.array_equal(ck.arrays[k], arrays[k]) for k in arrays)
    assert np.array_equal(ck.strategy_arrays["m_t/x"], np.ones(3))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["round-0002"]
    (tmp_path / "checkpoints" / "notes").mkdir()  # something fedhf did not write: never deleted
    _checkpoint(tmp_path, 3)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["notes", "round-0003"]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    with pytest.raises(FedHFRunError, match="was not created by fedhf as a run folder"):
        save_checkpoint(
            foreign,
            1,
            run_uid="u1",
            config_sha256="c",
            arrays=adapter_like(),
            strategy_arrays={},
            strategy_state={},
            run_record={},
        )
    assert list(foreign.iterdir()) == []


def test_a_truncated_or_foreign_checkpoint_is_refused(tmp_path):
    _checkpoint(tmp_path)
    with pytest.raises(FedHFCheckpointError, match="another run"):
        load_checkpoint(tmp_path, run_uid="other", config_sha256="c")
    f = tmp_path / "checkpoints" / "round-0002" / "adapter.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(FedHFCheckpointError, match="truncated or altered"):
        load_checkpoint(tmp_path, run_uid="u1")
    (tmp_path / "checkpoint.json").write_text("{not json")
    with pytest.raises(FedHFCheckpointError, match="damaged"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("name", ["fedadam", "fedyogi"])
def test_server_optimizer_moments_survive_a_restart(tmp_path, name):
    """Rounds 1-2, checkpoint, a fresh strategy restored from it, round 3: the same adapter as without the restart."""
    base = adapter_like()
    updates = {r: [trained_from(base, 0.01, 100 * r + i) for i in range(2)] for r in (1, 2, 3)}

    def play(s, rnd, arrays):
        s.configure_train(rnd, arrays, ConfigRecord({}), FakeGrid([1, 2]))
        out, _ = s.aggregate_train(rnd, [reply(i + 1, t, base, 10) for i, t in enumerate(updates[rnd])])
        s.recorder._round = None
        return out

    keys = {"strategy.name": name}
    cfg = parse_config({"output-dir": str(tmp_path), "run-name": "a", **keys})
    a = build_strategy(cfg, RunRecorder(cfg))
    arrays = ArrayRecord({k: Array(v) for k, v in base.items()})
    for rnd in (1, 2):
        arrays = play(a, rnd, arrays)
    saved_arrays, saved_state = strategy_state(a)
    assert any(k.startswith("v_t/") for k in saved_arrays)
    straight = play(a, 3, arrays)

    cfg_b = parse_config({"output-dir": str(tmp_path), "run-name": "b", **keys})
    b = build_strategy(cfg_b, RunRecorder(cfg_b))
    restore_strategy_state(b, saved_arrays, saved_state)
    resumed = play(b, 3, arrays)
    assert all(np.array_equal(resumed[k].numpy(), straight[k].numpy()) for k in base)
    fresh = build_strategy(
        parse_config({"output-dir": str(tmp_path), "run-name": "c", **keys}),
        RunRecorder(parse_config({"output-dir": str(tmp_path), "run-name": "c2"})),
    )
    not_restored = play(fresh, 3, arrays)
    assert not all(np.allclose(not_restored[k].numpy(), straight[k].numpy()) for k in base)
    with pytest.raises(FedHFRunError, match="strategy 'FedAvg'"):
        restore_strategy_state(b, {}, {"class": "FedAvg"})


def test_a_resumed_recorder_keeps_the_ledger_and_records_the_resume(tmp_path):
    cfg = parse_config({"output-dir": str(tmp_path), "run-name": "r", "privacy.mode": "sample"})
    rec = RunRecorder(cfg)
    rec.set_privacy({"mode": "sample", "label": "x"})
    rec.record.privacy.clients["0"] = {"epsilon": 1.5}
    rec.record.rounds = [Round(round=0), Round(round=1)]
    snapshot = rec.record.to_dict()
    rec.fail("killed")
    again = RunRecorder(cfg, rec.dir, resume_from=snapshot)
    again.set_privacy({"mode": "sample", "label": "x"})
    data = json.loads((rec.dir / "run.json").read_text())
    assert data["status"] == "running" and "error" not in data and data["run_uid"] == rec.record.run_uid
    assert data["privacy"]["clients"]["0"]["epsilon"] == 1.5
    assert data["resumes"][0]["from_round"] == 1


# ----------------------------------------------------------------------------- a client's own disk


def _entry(
    run_uid: str,
    rnd: int,
    steps: int,
    *,
    sigma: float = 1.0,
    q: float = 0.1,
    delta: float = 1e-3,
    pid: int = 0,
    acc: str = "rdp",
    acc_id: str = "a1",
) -> dict:
    return {
        "run_uid": run_uid,
        "round": rnd,
        "partition_id": pid,
        "accountant": acc,
        "accountant_id": acc_id,
        "delta": delta,
        "noise_multiplier": sigma,
        "max_grad_norm": 1.0,
        "sample_rate": q,
        "steps": steps,
    }


def test_the_spend_store_keeps_every_run_on_the_data_and_replays_the_same_reply(tmp_path):
    from fedhf.privacy.dp import epsilon_of

    store = SpendStore(tmp_path, "data-abc")
    with store.transaction() as spend:
        assert spend.entries == [] and spend.run_account("uid1") is None
        spend.add(_entry("uid1", 1, 10))
        spend.add(_entry("uid1", 2, 10))
        spend.add(_entry("uid2", 1, 5, sigma=2.0, delta=1e-4, acc_id="b2"))
    again = SpendStore(tmp_path, "data-abc")  # a new process finds it
    with again.transaction() as spend:
        run1 = spend.run_account("uid1")
        assert run1.history == [(1.0, 0.1, 20)] and run1.accountant_id == "a1" and run1.steps == 20
        kind, delta, history = spend.lifetime()
        assert kind == "rdp" and delta == 1e-4 and history == [(1.0, 0.1, 20), (2.0, 0.1, 5)]
        assert epsilon_of(kind, history, delta) > epsilon_of("rdp", run1.history, 1e-3)
        assert spend.lifetime(extra=_entry("uid3", 1, 1, acc="prv"))[0] == "rdp"  # mixed accountants: RDP
    assert again.replay("uid1", 1, "d") is None
    payload = adapter_like()
    again.save_reply(
        "uid1", {"round": 2, "global_digest": "abc", "metrics": {"weight": 1.0}, "info": {"x": 1}}, payload
    )
    assert again.replay("uid1", 2, "other") is None and again.replay("uid1", 3, "abc") is None
    arrays, meta = again.replay("uid1", 2, "abc")
    assert all(np.array_equal(arrays[k], payload[k]) for k in payload) and meta["metrics"] == {"weight": 1.0}
    (again.dir / "replies" / "uid1.safetensors").write_bytes(b"garbage")  # a damaged copy is never sent
    assert again.replay("uid1", 2, "abc") is None
    again.file.write_text("{broken")
    with pytest.raises(FedHFNodeStateError, match="holds what earlier runs spent"):
        with again.transaction():
            pass
    assert FedHFNodeStateError("x").public.startswith("the node's saved privacy state")  # no path leaves the node


def test_two_processes_of_one_node_take_turns_and_both_spends_count(tmp_path):
    """Two ClientApp processes of one node (a hung round and the next) reserve under one lock: neither is lost."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    start_evt = ctx.Event()
    procs = [ctx.Process(target=_reserve_many, args=(str(tmp_path), f"run{i}", 25, start_evt)) for i in range(2)]
    for p in procs:
        p.start()
    start_evt.set()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    with SpendStore(tmp_path, "data-x").transaction() as spend:
        assert len(spend.entries) == 50
        assert sorted({e["run_uid"] for e in spend.entries}) == ["run0", "run1"]


def _reserve_many(root: str, run_uid: str, n: int, start_evt) -> None:
    start_evt.wait(10)
    store = SpendStore(Path(root), "data-x")
    for i in range(n):
        with store.transaction() as spend:
            spend.add(_entry(run_uid, i, 1))


def test_spend_saved_by_an_older_fedhf_is_imported_once(tmp_path):
    old = tmp_path / "olduid" / f"{legacy_key(3, None)}.json"
    old.parent.mkdir()
    old.write_text(
        json.dumps(
            {
                "privacy": {
                    "accountant": "rdp",
                    "delta": 1e-3,
                    "noise-multiplier": 1.0,
                    "max-grad-norm": 1.0,
                    "history-sigma": [1.0],
                    "history-q": [0.1],
                    "history-steps": [30],
                }
            }
        )
    )
    store = SpendStore(tmp_path, "data-abc")
    for _ in range(2):
        with store.transaction(legacy=legacy_key(3, None)) as spend:
            pass
    with store.transaction() as spend:
        assert [(e["run_uid"], e["steps"]) for e in spend.entries] == [("olduid", 30)]


def test_legacy_keys_and_digests(tmp_path):
    silo = tmp_path / "silo"
    silo.mkdir()
    assert legacy_key(7, str(silo)) == legacy_key(99, str(silo)) != legacy_key(7, str(tmp_path))
    assert legacy_key(7, None) == "partition-7"
    assert (
        arrays_digest({"a": b"1", "b": b"2"})
        == arrays_digest({"b": b"2", "a": b"1"})
        != arrays_digest({"a": b"2", "b": b"1"})
    )


def test_fault_plans(monkeypatch):
    assert faults.planned({"fail-at-round": "2", "fail-mode": "nan"}, 0, 2) == "nan"
    assert faults.planned({"fail-at-round": "2"}, 0, 3) is None
    monkeypatch.setenv(faults.ENV, "1:2:raise,0:3:inf")
    assert (
        faults.planned({}, 1, 2) == "raise" and faults.planned({}, 0, 3) == "inf" and faults.planned({}, 0, 2) is None
    )
    with pytest.raises(FedHFConfigError, match="fail-mode"):
        faults.planned({"fail-at-round": "1", "fail-mode": "explode"}, 0, 1)
    with pytest.raises(faults.InjectedFault):
        faults.before_training("raise", {})


# ----------------------------------------------------------------------------- a SuperNode restarted mid-run


def test_a_restarted_supernode_continues_its_epsilon_from_its_state_dir(tiny_model_dir, synthetic_dir, tmp_path):
    """The ClientApp handler, as a SuperNode runs it: round 1 on one node, round 2 after a restart (new node
    id, empty context.state); then round 2 asked again from the same global adapter (a resumed server); then a
    second run on the same data, which starts from the first one's spend."""
    from flwr.app import Context

    from fedhf.config.schema import LABEL_NAMES_KEY
    from fedhf.federation.node_state import RUN_UID_KEY
    from fedhf.flower.client_app import _train
    from fedhf.privacy.dp import epsilon_of
    from fedhf.tasks.model import build_model, get_adapter_state

    cfg = parse_config(
        {
            "model.name": str(tiny_model_dir),
            "data.dataset": str(synthetic_dir),
            "privacy.mode": "sample",
            "train.batch-size": 8,
            "train.local-epochs": 1,
            "data.max-length": 16,
        }
    )
    initial = ArrayRecord(get_adapter_state(build_model(cfg, ["negative", "positive"])))
    node_config = {"data-path": str(synthetic_dir), "state-dir": str(tmp_path / "state")}

    def message_config(rnd: int, uid: str = "run1") -> ConfigRecord:
        return ConfigRecord(
            {**cfg.to_flat(), LABEL_NAMES_KEY: '["negative", "positive"]', RUN_UID_KEY: uid, "server-round": rnd}
        )

    def context(node_id: int) -> Context:
        return Context(run_id=1, node_id=node_id, node_config=node_config, state=RecordDict(), run_config={})

    r1 = _train(initial, message_config(1), context(101), secure=False)
    steps_1 = int(r1["client-info"]["steps"])
    assert steps_1 > 0
    r2 = _train(r1["arrays"], message_config(2), context(202), secure=False)  # a new node id, an empty context
    info = r2["client-info"]
    assert int(info["steps"]) == 2 * steps_1  # continued, not started again
    assert info["accountant-id"] == r1["client-info"]["accountant-id"]
    q = float(info["sample-rate"])
    assert float(info["epsilon"]) == pytest.approx(
        epsilon_of("rdp", [(1.0, q, 2 * steps_1)], float(info["delta"])), rel=1e-9
    )

    again = _train(r1["arrays"], message_config(2), context(303), secure=False)  # the server resumed, repeats round 2
    assert again["client-info"]["replayed"] is True and int(again["client-info"]["steps"]) == 2 * steps_1
    assert all(np.array_equal(again["arrays"][k].numpy(), r2["arrays"][k].numpy()) for k in r2["arrays"].keys())
    fresh = _train(initial, message_config(2), context(404), secure=False)  # another global adapter: trains again
    assert "replayed" not in fresh["client-info"] and int(fresh["client-info"]["steps"]) == 3 * steps_1

    other = _train(initial, message_config(1, uid="run2"), context(505), secure=False)  # a new run on the same data
    o = other["client-info"]
    assert int(o["steps"]) == steps_1 and o["accountant-id"] != info["accountant-id"]  # the run's own accounting
    lifetime = epsilon_of("rdp", [(1.0, q, 4 * steps_1)], float(o["delta"]))
    assert float(o["lifetime-epsilon"]) == pytest.approx(lifetime, rel=1e-9)
    assert float(o["lifetime-epsilon"]) > float(o["epsilon"])


def test_the_ledger_counts_spend_a_client_saved_but_the_server_never_used(tmp_path):
    """Simulation: client 0 trained a round whose reply the server did not use (cut off by a restart, or too late),
    client 1 only ever trained in such a round. The ledger takes their own saved spend."""
    from fedhf.apps import _count_saved_spend
    from fedhf.privacy.dp import SampleAccount
    from fedhf.privacy.ledger import ledger_table

    cfg = parse_config({"output-dir": str(tmp_path), "run-name": "r", "privacy.mode": "sample"})
    rec = RunRecorder(cfg)
    rec.set_privacy({"mode": "sample", "label": "sample-level (per example)", "accountant": "rdp"})
    uid = rec.record.run_uid
    reported = SampleAccount("rdp", 1e-3, 1.0, 1.0, [(1.0, 0.1, 10)])
    rec.record.privacy.clients["0"] = {
        "delta": 1e-3,
        "noise_multiplier": 1.0,
        "max_grad_norm": 1.0,
        "sample_rate": 0.1,
        "accountant": "rdp",
        "max_epsilon": None,
        "rounds": [{"round": 1, "epsilon": reported.epsilon, "steps": 10, "status": "trained"}],
        "reported_epsilon": reported.epsilon,
        "reported_steps": 10,
        "reported_delta": 1e-3,
        "epsilon": reported.epsilon,
        "steps": 10,
    }
    state = tmp_path / "client-state"
    with SpendStore(state, "data-0").transaction() as spend:
        spend.add(_entry(uid, 1, 10, pid=0))
        spend.add(_entry(uid, 2, 10, pid=0))
        spend.add(_entry("another-run", 1, 10, pid=0))  # not this run's
    with SpendStore(state, "data-1").transaction() as spend:
        spend.add(_entry(uid, 1, 5, pid=1, sigma=1.5, q=0.2, delta=2e-3))
    more = SampleAccount("rdp", 1e-3, 1.0, 1.0, [(1.0, 0.1, 20)])
    only = SampleAccount("rdp", 2e-3, 1.5, 1.0, [(1.5, 0.2, 5)])
    _count_saved_spend(rec, state)
    ledger = json.loads((rec.dir / "run.json").read_text())["privacy"]["clients"]
    assert ledger["0"]["steps"] == 20 and ledger["0"]["epsilon"] == pytest.approx(more.epsilon, rel=1e-12)
    assert ledger["0"]["epsilon"] > reported.epsilon and ledger["0"]["unreported_steps"] == 10
    assert ledger["1"]["epsilon"] == pytest.approx(only.epsilon, rel=1e-12) and ledger["1"]["sample_rate"] == 0.2
    assert set(ledger) == {"0", "1"}
    assert "epsilon max" in ledger_table(rec.record.privacy)
    _count_saved_spend(rec, state)  # nothing more to count: unchanged
    assert json.loads((rec.dir / "run.json").read_text())["privacy"]["clients"]["0"]["steps"] == 20
