"""Strategy construction and the recording hooks, with hand-made reply messages."""

import time

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MessageType, Metadata, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, FedYogi

from fedhf.config.schema import parse_config
from fedhf.errors import FedHFRunError
from fedhf.flower.strategy import build_strategy, train_metrics_aggr
from fedhf.run.record import RunRecorder


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


ALL_SHARED = ["label-histogram", "num-examples", "timings", "train-loss", "train-tokens"]


def train_reply(node: int, pid: int, value: float, n: int, loss: float, shared: list[str] | None = None) -> Message:
    shared = ALL_SHARED if shared is None else shared
    metrics = {"weight": float(n) if "num-examples" in shared else 1.0}
    if "num-examples" in shared:
        metrics["num-examples"] = n
    if "train-loss" in shared:
        metrics["train-loss"] = loss
    info = {"partition-id": pid, "status": "trained", "train-steps": 3, "shared": shared}
    if "timings" in shared:
        info.update({"train-seconds": 1.5, "handler-seconds": 2.0})
    if "train-tokens" in shared:
        info["train-tokens"] = 40
    if "label-histogram" in shared:
        info["label-histogram"] = [n // 2, n - n // 2]
    content = RecordDict(
        {
            "arrays": ArrayRecord({"w": torch.full((2, 2), value)}),
            "metrics": MetricRecord(metrics),
            "client-info": ConfigRecord(info),
        }
    )
    return Message(content=content, metadata=_meta(node))


def begin(s, rec: RunRecorder, rnd: int, sampled: int, nodes: list[int] | None = None) -> None:
    """What configure_train leaves behind: the round started, the global adapter the replies are checked against."""
    inner = getattr(s, "screened", s)
    inner.latest_arrays = ArrayRecord({"w": torch.zeros(2, 2)})
    inner.dtypes = {"w": np.dtype(np.float32)}
    inner.sampled = list(nodes or [])
    rec.start_round(rnd, 16, sampled)


def error_reply(node: int, reason: str) -> Message:
    return Message(error=Error(code=1, reason=reason), metadata=_meta(node))


@pytest.mark.parametrize(
    ("name", "cls"), [("fedavg", FedAvg), ("fedprox", FedProx), ("fedadam", FedAdam), ("fedyogi", FedYogi)]
)
def test_build_strategy_from_config(tmp_path, name, cls):
    cfg = parse_config(
        {
            "strategy.name": name,
            "output-dir": str(tmp_path),
            "strategy.fraction-train": 0.5,
            "strategy.proximal-mu": 0.3,
            "strategy.server-lr": 0.05,
            "strategy.min-available-nodes": 3,
        }
    )
    s = build_strategy(cfg, RunRecorder(cfg)).inner  # fedhf's wrapper holds Flower's strategy
    assert type(s) is cls and s.fraction_train == 0.5 and s.min_available_nodes == 3
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
    assert metrics["weight"] == 40
    row = rec.end_round(1, {"loss": 0.4, "accuracy": 0.8, "f1": 0.79}, 0.1)
    assert row.weighting == "examples"
    assert [c["partition_id"] for c in row.clients] == [0, 1]
    assert row.failures == [{"node_id": 13, "reason": "client crashed"}]
    assert row.client_train_seconds == {"0": 1.5, "1": 1.5}
    wire = len(ArrayRecord({"w": torch.zeros(2, 2)})["w"].data)  # serialised bytes: 16 B of data + the array header
    assert abs(row.train_loss - 0.6) < 1e-12 and row.bytes_up == wire


def test_round_with_no_update_fails_the_run(tmp_path):
    cfg = parse_config({"output-dir": str(tmp_path), "run-name": "r"})
    rec = RunRecorder(cfg)
    s = build_strategy(cfg, rec)
    begin(s, rec, 1, 2)
    with pytest.raises(FedHFRunError, match="round 1: no client returned an update \\(out of memory; disk full\\)"):
        s.aggregate_train(1, [error_reply(1, "Traceback...\nout of memory"), error_reply(2, "disk full")])


def test_train_metrics_aggregation_sums_the_weights():
    records = [RecordDict({"m": MetricRecord({"weight": 1.0})}), RecordDict({"m": MetricRecord({"weight": 3.0})})]
    assert dict(train_metrics_aggr(records, "weight")) == {"weight": 4.0}


def test_a_client_that_keeps_its_count_private_gets_equal_weights_for_everyone(tmp_path):
    """DP clients share nothing by default: the server averages uniformly rather than mix 1s with counts, and
    records no train loss it was not given."""
    cfg = parse_config({"output-dir": str(tmp_path), "run-name": "u"})
    rec = RunRecorder(cfg)
    s = build_strategy(cfg, rec)
    begin(s, rec, 1, 2)
    arrays, _ = s.aggregate_train(1, [train_reply(11, 0, 1.0, 30, 0.5), train_reply(12, 1, 4.0, 10, 0.9, shared=[])])
    assert torch.allclose(arrays.to_torch_state_dict()["w"], torch.full((2, 2), 2.5))  # (1 + 4) / 2
    row = rec.end_round(1, {"loss": 0.4, "accuracy": 0.8, "f1": 0.79}, 0.1)
    assert row.weighting == "uniform" and row.train_loss is None
    assert rec.record.shared == {"0": ALL_SHARED, "1": []}
    assert [c.get("label_histogram") for c in row.clients] == [[15, 15], None]


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
    assert json.loads((tmp_path / "r" / ".fedhf-run").read_text())["run_uid"] == data["run_uid"]
    foreign = tmp_path / "theirs"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    (foreign / "checkpoints").mkdir()
    with pytest.raises(FileExistsError, match="will not adopt another one"):
        RunRecorder(parse_config({"output-dir": str(tmp_path), "run-name": "theirs"}))
    assert sorted(p.name for p in foreign.iterdir()) == ["checkpoints", "thesis.tex"]  # untouched


def test_client_level_dp_averages_uniformly_and_accounts_each_round(tmp_path):
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    from fedhf.privacy.dp import ClientLevelAccount

    cfg = parse_config(
        {
            "output-dir": str(tmp_path),
            "run-name": "cl",
            "privacy.mode": "client",
            "privacy.client-noise-multiplier": 1e-6,
            "privacy.client-clipping-norm": 100.0,
        }
    )
    rec = RunRecorder(cfg)
    rec.set_privacy({"mode": "client"})
    s = build_strategy(cfg, rec, population=4)
    s.dp.current_arrays = ArrayRecord({"w": torch.zeros(2, 2)})
    s.screened.population = 4
    begin(s, rec, 1, 3, nodes=[11, 12, 13])
    replies = [train_reply(11, 0, 1.0, 30, 0.5), train_reply(12, 1, 4.0, 10, 0.9), error_reply(13, "lost")]
    arrays, _ = s.aggregate_train(1, replies)
    w = arrays.to_torch_state_dict()["w"]
    assert torch.allclose(w, torch.full((2, 2), 2.5), atol=1e-3)  # (1 + 4) / 2: equal weights, not 30:10
    assert s.dp.num_sampled_clients == 2  # noise scaled to the updates actually averaged
    cl = rec.record.privacy.client_level
    # q = clients sampled / population: the client that failed after being sampled does not lower it
    assert cl["rounds"][0]["sample_rate"] == 0.75 and cl["rounds"][0]["clients_aggregated"] == 2
    assert cl["rounds"][0]["clients_sampled"] == 3
    assert cl["delta"] == 1e-5  # min(1e-5, 0.1 / 4)
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    eps, _ = get_privacy_spent(
        orders=orders, rdp=compute_rdp(q=0.75, noise_multiplier=1e-6, steps=1, orders=orders), delta=cl["delta"]
    )
    assert cl["epsilon"] == pytest.approx(eps, rel=1e-6)
    acc = ClientLevelAccount(1.0, 1e-3)
    acc.add_round(0.5)
    acc.add_round(0.5)
    acc.add_round(1.0)
    rdp = compute_rdp(q=0.5, noise_multiplier=1.0, steps=2, orders=orders) + compute_rdp(
        q=1.0, noise_multiplier=1.0, steps=1, orders=orders
    )
    assert acc.epsilon == pytest.approx(get_privacy_spent(orders=orders, rdp=rdp, delta=1e-3)[0], rel=1e-6)
    assert acc.epsilon < acc.epsilon_no_amplification


def test_client_level_dp_needs_fedavg_and_a_sane_count_noise(tmp_path):
    from fedhf.errors import FedHFConfigError

    with pytest.raises(FedHFConfigError, match="client-level DP .* needs fedavg"):
        parse_config({"privacy.mode": "client", "strategy.name": "fedadam"})
    cfg = parse_config(
        {"output-dir": str(tmp_path), "privacy.mode": "client", "privacy.client-clipping": "server-adaptive"}
    )
    rec = RunRecorder(cfg)
    rec.set_privacy({"mode": "client"})
    with pytest.raises(FedHFConfigError, match="client-clipped-count-stddev.*too small"):
        build_strategy(cfg, rec, population=3)


def test_adaptive_clipping_accounts_the_count_release(tmp_path):
    from fedhf.privacy.dp import effective_client_sigma

    cfg = parse_config(
        {
            "output-dir": str(tmp_path),
            "privacy.mode": "client",
            "privacy.client-clipping": "server-adaptive",
            "privacy.client-clipped-count-stddev": 2.0,
        }
    )
    rec = RunRecorder(cfg)
    rec.set_privacy({"mode": "client"})
    s = build_strategy(cfg, rec, population=3)
    cl = rec.record.privacy.client_level
    # Flower raises the update noise; the count is a second Gaussian release (sensitivity 1).
    assert s.dp.noise_multiplier > 1.0
    assert cl["effective_noise_multiplier"] == pytest.approx((s.dp.noise_multiplier**-2 + 2.0**-2) ** -0.5)
    assert cl["effective_noise_multiplier"] < 1.0 == effective_client_sigma(1.0, None)


def dp_strategy(tmp_path, name: str):
    """A sample-level DP run's strategy and recorder, as the ServerApp builds them."""
    cfg = parse_config({"output-dir": str(tmp_path), "run-name": name, "privacy.mode": "sample"})
    rec = RunRecorder(cfg)
    rec.set_privacy({"mode": "sample", "label": "sample-level (per example)", "accountant": "rdp"})
    return build_strategy(cfg, rec), rec


def refused_reply(node: int, pid: int, rule: str = "max-epsilon") -> Message:
    content = RecordDict(
        {
            "client-info": ConfigRecord(
                {
                    "partition-id": pid,
                    "status": "refused",
                    "rule": rule,
                    "reason": "the node's budget would be exceeded",
                }
            )
        }
    )
    return Message(content=content, metadata=_meta(node))


def test_refusing_clients_are_left_out_and_the_run_stops_cleanly(tmp_path):
    from fedhf.flower.strategy import RunStopped

    s, rec = dp_strategy(tmp_path, "b")
    begin(s, rec, 1, 3)
    s.aggregate_train(1, [dp_reply(11, 0, 1.0, 10), dp_reply(12, 1, 1.0, 10), dp_reply(13, 2, 1.0, 10)])
    rec.end_round(1, {"loss": 0.5, "accuracy": 0.7, "f1": 0.7}, 0.1)
    begin(s, rec, 2, 3)
    arrays, _ = s.aggregate_train(2, [train_dp(11, 0, 1.0), train_dp(12, 1, 3.0), refused_reply(13, 2)])
    assert torch.allclose(
        arrays.to_torch_state_dict()["w"], torch.full((2, 2), 2.0)
    )  # the refusing client is not averaged
    assert s.exhausted == {13} and "max-epsilon" in s.excluded[13]
    row = rec.end_round(2, {"loss": 0.5, "accuracy": 0.7, "f1": 0.7}, 0.1)
    assert row.privacy.exhausted == [2] and row.refused == [
        {"node_id": 13, "partition_id": 2, "rule": "max-epsilon", "reason": "the node's budget would be exceeded"}
    ]
    entry = rec.record.privacy.clients["2"]
    assert entry["stopped"]["round"] == 2 and entry["stopped"]["reason"] == "max-epsilon"
    begin(s, rec, 3, 2)
    with pytest.raises(RunStopped, match="every sampled client refused \\(max-epsilon: the node's budget"):
        s.aggregate_train(3, [refused_reply(11, 0), refused_reply(12, 1)])


def test_too_few_nodes_left_after_refusals_end_the_run_before_the_round(tmp_path):
    from fedhf.flower.strategy import RunStopped

    class Grid3:
        def get_node_ids(self):
            return [11, 12, 13]

    cfg = parse_config({"output-dir": str(tmp_path), "run-name": "few", "strategy.min-available-nodes": 2})
    rec = RunRecorder(cfg)
    s = build_strategy(cfg, rec)
    begin(s, rec, 1, 3)
    s.aggregate_train(
        1,
        [
            train_reply(11, 0, 1.0, 10, 0.5),
            refused_reply(12, 1, "min-privacy"),
            refused_reply(13, 2, "require-secure-aggregation"),
        ],
    )
    with pytest.raises(
        RunStopped, match="only 1 client\\(s\\) can still train.*min-privacy.*require-secure-aggregation"
    ):
        s.configure_train(2, ArrayRecord({"w": torch.zeros(2, 2)}), ConfigRecord({}), Grid3())


def dp_reply(
    node: int, pid: int, epsilon: float, steps: int, budget: float = 0.0, acc_id: str = "acc", sigma: float = 20.0
) -> Message:
    msg = train_reply(node, pid, 1.0, 10, 0.5, shared=[])
    info = msg.content["client-info"]
    info.update(
        {
            "epsilon": epsilon,
            "delta": 1e-3,
            "noise-multiplier": sigma,
            "max-grad-norm": 1.0,
            "sample-rate": 0.1,
            "steps": steps,
            "accountant": "rdp",
            "accountant-id": f"{acc_id}-{pid}",
            "max-epsilon": budget,
        }
    )
    return msg


def train_dp(node: int, pid: int, value: float) -> Message:
    msg = dp_reply(node, pid, 1.5, 20)
    msg.content["arrays"] = ArrayRecord({"w": torch.full((2, 2), value)})
    return msg


def test_a_restarted_accountant_never_lowers_the_ledger_and_counts_against_the_budget(tmp_path):
    """A node that lost its state reports from zero again, under a new accountant id: the ledger composes (sums)."""
    s, rec = dp_strategy(tmp_path, "r")
    plan = [(5.0, 10, "acc"), (7.5, 20, "acc"), (5.0, 10, "new")]  # round 3: client 0's accountant is new
    for rnd, (eps0, steps0, acc) in enumerate(plan, start=1):
        begin(s, rec, rnd, 2)
        s.aggregate_train(
            rnd, [dp_reply(11, 0, eps0, steps0, budget=15.0, acc_id=acc), dp_reply(12, 1, 2.5 * rnd, 10 * rnd)]
        )
        rec.end_round(rnd, {"loss": 0.5, "accuracy": 0.7, "f1": 0.7}, 0.1)
    e = rec.record.privacy.clients["0"]
    assert [r["epsilon"] for r in e["rounds"]] == [5.0, 7.5, 12.5]  # 7.5 spent before the restart + 5.0 after
    assert (
        e["epsilon"] == 12.5 and e["steps"] == 30 and e["delta"] == pytest.approx(2e-3) and e["accountant_resets"] == 1
    )
    assert (
        rec.record.privacy.clients["1"]["epsilon"] == 7.5 and "accountant_resets" not in rec.record.privacy.clients["1"]
    )
    assert s.exhausted == set()
    # a new id with *more* steps than before is a restart too (step counts alone would miss it)
    begin(s, rec, 4, 2)
    s.aggregate_train(4, [dp_reply(11, 0, 7.5, 20, budget=15.0, acc_id="third"), dp_reply(12, 1, 10.0, 40)])
    assert rec.record.privacy.clients["0"]["accountant_resets"] == 2
    assert rec.record.privacy.clients["0"]["epsilon"] == 20.0  # 7.5 + 5.0 + 7.5 reached the budget 15
    assert s.exhausted == {11}  # the server stops sampling it, whatever its fresh accountant says


def test_the_ledger_never_takes_less_than_the_reported_sigma_q_and_steps_give(tmp_path):
    from fedhf.privacy.dp import epsilon_of

    s, rec = dp_strategy(tmp_path, "f")
    begin(s, rec, 1, 2)
    s.aggregate_train(1, [dp_reply(11, 0, 0.01, 10, sigma=0.2), dp_reply(12, 1, 0.01, 10, sigma=0.2)])  # far below
    want = epsilon_of("rdp", [(0.2, 0.1, 10)], 1e-3)
    assert rec.record.privacy.clients["0"]["epsilon"] == pytest.approx(want) and want > 1.0


def test_a_round_secure_aggregation_withheld_keeps_the_adapter_and_the_privacy_spend(tmp_path):
    s, rec = dp_strategy(tmp_path, "w")
    begin(s, rec, 1, 2)
    withheld = dp_reply(11, 0, 5.0, 10)
    del withheld.content.array_records["arrays"]
    withheld.content["client-info"]["status"] = "not-aggregated"
    withheld.content["metrics"]["weight"] = 1.0
    arrays, metrics = s.aggregate_train(1, [withheld, refused_reply(12, 1)])
    assert arrays is None and metrics is None  # Flower keeps the previous global adapter
    assert rec.record.privacy.clients["0"]["epsilon"] == 5.0  # spent, recorded, though not released
    assert "stopped" not in rec.record.privacy.clients["0"] and s.exhausted == {12}
