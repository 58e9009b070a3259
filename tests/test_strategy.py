"""Strategy construction and the recording hooks, with hand-made reply messages."""

import time

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MessageType, Metadata, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, FedYogi

from fedhf.artifacts import RunRecorder
from fedhf.config import parse_config
from fedhf.errors import FedHFRunError
from fedhf.strategy import build_strategy, train_metrics_aggr


def _meta(node: int) -> Metadata:
    return Metadata(run_id=1, message_id=f"m{node}", src_node_id=node, dst_node_id=0, reply_to_message_id="x",
                    group_id="1", created_at=time.time(), ttl=60.0, message_type=MessageType.TRAIN)


def train_reply(node: int, pid: int, value: float, n: int, loss: float) -> Message:
    content = RecordDict({
        "arrays": ArrayRecord({"w": torch.full((2, 2), value)}),
        "metrics": MetricRecord({"train-loss": loss, "num-examples": n}),
        "client-info": ConfigRecord({"partition-id": pid, "train-seconds": 1.5, "handler-seconds": 2.0, "train-steps": 3,
                                     "train-tokens": 40, "label-histogram": [n // 2, n - n // 2]}),
    })
    return Message(content=content, metadata=_meta(node))


def begin(s, rec: RunRecorder, rnd: int, sampled: int) -> None:
    """What configure_train leaves behind: the round started, the global adapter the replies are checked against."""
    inner = getattr(s, "strategy", s)
    inner.latest_arrays = ArrayRecord({"w": torch.zeros(2, 2)})
    inner.dtypes = {"w": np.dtype(np.float32)}
    rec.start_round(rnd, 16, sampled)


def error_reply(node: int, reason: str) -> Message:
    return Message(error=Error(code=1, reason=reason), metadata=_meta(node))


@pytest.mark.parametrize(("name", "cls"), [("fedavg", FedAvg), ("fedprox", FedProx), ("fedadam", FedAdam), ("fedyogi", FedYogi)])
def test_build_strategy_from_config(tmp_path, name, cls):
    cfg = parse_config({"strategy.name": name, "output-dir": str(tmp_path), "strategy.fraction-train": 0.5,
                        "strategy.proximal-mu": 0.3, "strategy.server-lr": 0.05, "strategy.min-available-nodes": 3})
    s = build_strategy(cfg, RunRecorder(cfg))
    assert isinstance(s, cls) and s.fraction_train == 0.5 and s.min_available_nodes == 3
    if name == "fedprox":
        assert s.proximal_mu == 0.3
    if name in ("fedadam", "fedyogi"):
        assert s.eta == 0.05 and s.beta_1 == 0.9 and s.tau == 0.001


def test_fedavg_weights_by_examples_and_records_clients(tmp_path):
    cfg = parse_config({"output-dir": str(tmp_path), "run-name": "r"})
    rec = RunRecorder(cfg)
    s = build_strategy(cfg, rec)
    begin(s, rec, 1, 3)
    replies = [train_reply(11, 0, 1.0, 30, 0.5), train_reply(12, 1, 4.0, 10, 0.9), error_reply(13, "client crashed")]
    arrays, metrics = s.aggregate_train(1, replies)
    w = arrays.to_torch_state_dict()["w"]
    assert torch.allclose(w, torch.full((2, 2), (1.0 * 30 + 4.0 * 10) / 40))
    assert metrics["num-examples"] == 40 and abs(metrics["train-loss"] - (0.5 * 30 + 0.9 * 10) / 40) < 1e-12
    row = rec.end_round(1, {"loss": 0.4, "accuracy": 0.8, "f1": 0.79}, 0.1)
    assert [c["partition-id"] for c in row["clients"]] == [0, 1]
    assert row["failures"] == [{"node-id": 13, "reason": "client crashed"}]
    assert row["client_train_seconds"] == {"0": 1.5, "1": 1.5}
    wire = len(ArrayRecord({"w": torch.zeros(2, 2)})["w"].data)  # serialised bytes: 16 B of data + the array header
    assert abs(row["train_loss"] - 0.6) < 1e-12 and row["bytes_up"] == wire


def test_round_with_no_update_fails_the_run(tmp_path):
    cfg = parse_config({"output-dir": str(tmp_path), "run-name": "r"})
    rec = RunRecorder(cfg)
    s = build_strategy(cfg, rec)
    begin(s, rec, 1, 2)
    with pytest.raises(FedHFRunError, match="round 1: no client returned an update \\(out of memory; disk full\\)"):
        s.aggregate_train(1, [error_reply(1, "Traceback...\nout of memory"), error_reply(2, "disk full")])


def test_train_metrics_aggregation_ignores_bookkeeping():
    records = [RecordDict({"m": MetricRecord({"train-loss": 1.0, "num-examples": 1})}),
               RecordDict({"m": MetricRecord({"train-loss": 2.0, "num-examples": 3})})]
    agg = train_metrics_aggr(records, "num-examples")
    assert dict(agg) == {"train-loss": 1.75, "num-examples": 4}
    assert np.isclose(agg["train-loss"], 1.75)


def test_run_json_status_and_atomic_rewrites(tmp_path):
    cfg = parse_config({"output-dir": str(tmp_path), "run-name": "r"})
    rec = RunRecorder(cfg)
    import json

    assert json.loads((tmp_path / "r" / "run.json").read_text())["status"] == "running"
    rec.fail("RuntimeError: boom")
    data = json.loads((tmp_path / "r" / "run.json").read_text())
    assert data["status"] == "failed" and data["error"] == "RuntimeError: boom"
    assert not list((tmp_path / "r").glob("*.tmp"))
    with pytest.raises(FileExistsError, match="already holds a run"):
        RunRecorder(cfg)


def test_client_level_dp_averages_uniformly_and_accounts_each_round(tmp_path):
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    from fedhf.privacy import ClientLevelAccount

    cfg = parse_config({"output-dir": str(tmp_path), "run-name": "cl", "privacy.mode": "client",
                        "privacy.client-noise-multiplier": 1e-6, "privacy.client-clipping-norm": 100.0})
    rec = RunRecorder(cfg)
    rec.set_privacy({"mode": "client"})
    s = build_strategy(cfg, rec, population=4)
    s.current_arrays = ArrayRecord({"w": torch.zeros(2, 2)})
    s.strategy.population = 4
    begin(s, rec, 1, 3)
    replies = [train_reply(11, 0, 1.0, 30, 0.5), train_reply(12, 1, 4.0, 10, 0.9), error_reply(13, "lost")]
    for r in replies[:2]:
        r.content["metrics"]["uniform-weight"] = 1.0
    arrays, _ = s.aggregate_train(1, replies)
    w = arrays.to_torch_state_dict()["w"]
    assert torch.allclose(w, torch.full((2, 2), 2.5), atol=1e-3)  # (1 + 4) / 2: equal weights, not 30:10
    assert s.num_sampled_clients == 2  # noise scaled to the updates actually averaged
    cl = rec.data["privacy"]["client_level"]
    assert cl["rounds"][0]["sample_rate"] == 0.5 and cl["rounds"][0]["clients_aggregated"] == 2
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    eps, _ = get_privacy_spent(orders=orders, rdp=compute_rdp(q=0.5, noise_multiplier=1e-6, steps=1, orders=orders),
                               delta=cl["delta"])
    assert cl["epsilon"] == pytest.approx(eps, rel=1e-6)
    acc = ClientLevelAccount(1.0, 1e-3)
    acc.add_round(0.5)
    acc.add_round(0.5)
    acc.add_round(1.0)
    rdp = compute_rdp(q=0.5, noise_multiplier=1.0, steps=2, orders=orders) + compute_rdp(q=1.0, noise_multiplier=1.0, steps=1, orders=orders)
    assert acc.epsilon == pytest.approx(get_privacy_spent(orders=orders, rdp=rdp, delta=1e-3)[0], rel=1e-6)
    assert acc.epsilon < acc.epsilon_no_amplification


def test_client_level_dp_needs_fedavg_and_a_sane_count_noise(tmp_path):
    from fedhf.errors import FedHFConfigError

    with pytest.raises(FedHFConfigError, match="client-level DP .* needs fedavg"):
        parse_config({"privacy.mode": "client", "strategy.name": "fedadam"})
    cfg = parse_config({"output-dir": str(tmp_path), "privacy.mode": "client", "privacy.client-clipping": "server-adaptive"})
    rec = RunRecorder(cfg)
    rec.set_privacy({"mode": "client"})
    with pytest.raises(FedHFConfigError, match="client-clipped-count-stddev.*too small"):
        build_strategy(cfg, rec, population=3)


def test_adaptive_clipping_accounts_the_count_release(tmp_path):
    from fedhf.privacy import effective_client_sigma

    cfg = parse_config({"output-dir": str(tmp_path), "privacy.mode": "client", "privacy.client-clipping": "server-adaptive",
                        "privacy.client-clipped-count-stddev": 2.0})
    rec = RunRecorder(cfg)
    rec.set_privacy({"mode": "client"})
    s = build_strategy(cfg, rec, population=3)
    cl = rec.data["privacy"]["client_level"]
    # Flower raises the update noise; the count is a second Gaussian release (sensitivity 1).
    assert s.noise_multiplier > 1.0
    assert cl["effective_noise_multiplier"] == pytest.approx((s.noise_multiplier ** -2 + 2.0 ** -2) ** -0.5)
    assert cl["effective_noise_multiplier"] < 1.0 == effective_client_sigma(1.0, None)


def exhausted_reply(node: int, pid: int, eps: float, projected: float, budget: float) -> Message:
    content = RecordDict({
        "metrics": MetricRecord({"train-loss": 0.0, "num-examples": 0, "uniform-weight": 0.0}),
        "client-info": ConfigRecord({"partition-id": pid, "status": "budget-exhausted", "handler-seconds": 0.1,
                                     "label-histogram": [5, 5], "epsilon": eps, "projected-epsilon": projected,
                                     "delta": 1e-3, "noise-multiplier": 1.0, "max-grad-norm": 1.0, "sample-rate": 0.1,
                                     "steps": 10, "accountant": "rdp", "max-epsilon": budget}),
    })
    return Message(content=content, metadata=_meta(node))


def test_budget_exhausted_clients_are_left_out_and_the_run_stops_cleanly(tmp_path):
    from fedhf.strategy import RunStopped

    cfg = parse_config({"output-dir": str(tmp_path), "run-name": "b", "privacy.mode": "sample"})
    rec = RunRecorder(cfg)
    rec.set_privacy({"mode": "sample", "label": "sample-level (per example)", "accountant": "rdp"})
    s = build_strategy(cfg, rec)
    begin(s, rec, 2, 3)
    arrays, _ = s.aggregate_train(2, [train_reply(11, 0, 1.0, 10, 0.5), train_reply(12, 1, 3.0, 10, 0.5),
                                      exhausted_reply(13, 2, 2.9, 3.4, 3.0)])
    assert torch.allclose(arrays.to_torch_state_dict()["w"], torch.full((2, 2), 2.0))  # the exhausted client is not averaged
    assert s.exhausted == {13}
    row = rec.end_round(2, {"loss": 0.5, "accuracy": 0.7, "f1": 0.7}, 0.1)
    assert row["privacy"]["exhausted"] == [2]
    entry = rec.data["privacy"]["clients"]["2"]
    assert entry["stopped"] == {"round": 2, "reason": "budget-exhausted", "projected_epsilon": 3.4}
    begin(s, rec, 3, 2)
    with pytest.raises(RunStopped, match="every sampled client has exhausted its privacy budget"):
        s.aggregate_train(3, [exhausted_reply(11, 0, 2.9, 3.5, 3.0), exhausted_reply(12, 1, 2.9, 3.5, 3.0)])


def dp_reply(node: int, pid: int, epsilon: float, steps: int, budget: float = 0.0) -> Message:
    msg = train_reply(node, pid, 1.0, 10, 0.5)
    info = msg.content["client-info"]
    info.update({"status": "trained", "epsilon": epsilon, "delta": 1e-3, "noise-multiplier": 1.0, "max-grad-norm": 1.0,
                 "sample-rate": 0.1, "steps": steps, "accountant": "rdp", "max-epsilon": budget})
    return msg


def test_a_restarted_accountant_never_lowers_the_ledger_and_counts_against_the_budget(tmp_path):
    """A SuperNode that lost its context reports epsilon from zero again: the ledger composes (sums) instead."""
    cfg = parse_config({"output-dir": str(tmp_path), "run-name": "r", "privacy.mode": "sample"})
    rec = RunRecorder(cfg)
    rec.set_privacy({"mode": "sample", "label": "sample-level (per example)", "accountant": "rdp"})
    s = build_strategy(cfg, rec)
    for rnd, (eps0, steps0) in enumerate([(1.0, 10), (1.5, 20), (1.0, 10)], start=1):  # round 3: client 0 restarted
        begin(s, rec, rnd, 2)
        s.aggregate_train(rnd, [dp_reply(11, 0, eps0, steps0, budget=3.0), dp_reply(12, 1, 0.5 * rnd, 10 * rnd)])
        rec.end_round(rnd, {"loss": 0.5, "accuracy": 0.7, "f1": 0.7}, 0.1)
    e = rec.data["privacy"]["clients"]["0"]
    assert [r["epsilon"] for r in e["rounds"]] == [1.0, 1.5, 2.5]  # 1.5 spent before the restart + 1.0 after
    assert e["epsilon"] == 2.5 and e["steps"] == 30 and e["delta"] == pytest.approx(2e-3) and e["accountant_resets"] == 1
    assert rec.data["privacy"]["clients"]["1"]["epsilon"] == 1.5 and "accountant_resets" not in rec.data["privacy"]["clients"]["1"]
    assert s.exhausted == set()
    begin(s, rec, 4, 2)
    s.aggregate_train(4, [dp_reply(11, 0, 1.5, 20, budget=3.0), dp_reply(12, 1, 2.0, 40)])  # composed 3.0 reaches the budget
    assert s.exhausted == {11}  # the server stops sampling it, whatever its fresh accountant says


def test_a_round_secure_aggregation_withheld_keeps_the_adapter_and_the_privacy_spend(tmp_path):
    cfg = parse_config({"output-dir": str(tmp_path), "run-name": "w", "privacy.mode": "sample"})
    rec = RunRecorder(cfg)
    rec.set_privacy({"mode": "sample", "label": "sample-level (per example)", "accountant": "rdp"})
    s = build_strategy(cfg, rec)
    begin(s, rec, 1, 2)
    withheld = dp_reply(11, 0, 0.8, 10)
    del withheld.content.array_records["arrays"]
    withheld.content["client-info"]["status"] = "not-aggregated"
    arrays, metrics = s.aggregate_train(1, [withheld, exhausted_reply(12, 1, 2.9, 3.4, 3.0)])
    assert arrays is None and metrics is None  # Flower keeps the previous global adapter
    assert rec.data["privacy"]["clients"]["0"]["epsilon"] == 0.8  # spent, recorded, though not released
    assert "stopped" not in rec.data["privacy"]["clients"]["0"] and s.exhausted == {12}
