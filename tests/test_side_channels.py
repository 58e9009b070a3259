"""What leaves a DP client, field by field, is what the model card says it is; errors leave without row values."""

from __future__ import annotations

import json

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType

from fedhf.config.schema import LABEL_NAMES_KEY, parse_config
from fedhf.federation.node_state import RUN_UID_KEY
from fedhf.federation.replies import ACCOUNTING, BOOKKEEPING, COVERED, SHARED_FIELDS
from fedhf.privacy.ledger import Privacy
from fedhf.release.card import build_hub_folder, disclosure_text
from fedhf.run.store import Partition, RunRecord, Seeds
from fedhf.tasks.model import build_model, get_adapter_state

from .conftest import synthetic_rows, write_tsv
from .test_card import fake_run

LABELS = ["negative", "positive"]
pytestmark = pytest.mark.usefixtures("server_identity")


def _dp_round(tiny_model_dir, silo, tmp_path, **node):
    from fedhf.flower.client_app import make_client_app

    cfg = parse_config(
        {
            "model.name": str(tiny_model_dir),
            "privacy.mode": "sample",
            "train.batch-size": 8,
            "train.local-epochs": 1,
            "data.max-length": 16,
            "strategy.fraction-evaluate": 0.0,
        }
    )
    initial = ArrayRecord(get_adapter_state(build_model(cfg, LABELS)))
    config = ConfigRecord(
        {**cfg.to_flat(), LABEL_NAMES_KEY: json.dumps(LABELS), RUN_UID_KEY: "run1", "server-round": 1}
    )
    msg = Message(
        RecordDict({"arrays": initial, "config": config}), dst_node_id=7, message_type=MessageType.TRAIN, group_id="1"
    )
    ctx = Context(
        run_id=1,
        node_id=7,
        node_config={"data-path": str(silo), "state-dir": str(tmp_path / "state"), **node},
        state=RecordDict(),
        run_config={},
    )
    return make_client_app()(msg, ctx)


def sent_fields(reply: Message) -> set[str]:
    names = set(reply.content.keys()) - {"metrics", "client-info"}
    for record in ("metrics", "client-info"):
        names |= set(reply.content[record].keys())
    return names


@pytest.fixture()
def silo(tmp_path):
    return write_tsv(tmp_path / "silo" / "train.tsv", synthetic_rows(60, seed=3), ["text", "label"]).parent


def test_a_dp_client_sends_the_update_the_accounting_and_nothing_else_by_default(tiny_model_dir, silo, tmp_path):
    reply = _dp_round(tiny_model_dir, silo, tmp_path)
    assert not reply.has_error(), reply.error if reply.has_error() else None
    sent = sent_fields(reply)
    assert sent == {
        "arrays",
        "weight",
        "partition-id",
        "status",
        "shared",
        "transport",
        "train-steps",
        "epsilon",
        "delta",
        "noise-multiplier",
        "max-grad-norm",
        "sample-rate",
        "steps",
        "accountant",
        "accountant-id",
        "max-epsilon",
        "lifetime-epsilon",
        "lifetime-delta",
    }
    assert sent <= set(COVERED) | set(ACCOUNTING) | set(BOOKKEEPING)  # every field in one of the card's lists
    assert reply.content["metrics"]["weight"] == 1.0 and list(reply.content["client-info"]["shared"]) == []

    # The card lists every one of these fields by name, in its category, and says the client shared nothing.
    run_dir, run = fake_run(
        tmp_path / "card",
        privacy={
            "mode": "sample",
            "label": "sample-level (per example)",
            "accountant": "rdp",
            "rng": "x",
            "clients": {
                "0": {"epsilon": 1.0, "delta": 1e-3, "noise_multiplier": 1.0, "max_grad_norm": 1.0, "rounds": []}
            },
        },
    )
    run["partitions"] = run["partitions"][:1]
    run["shared"] = {"0": []}
    text = (build_hub_folder(run_dir, RunRecord.from_dict(run), "apache-2.0") / "README.md").read_text()
    for field in sent:
        assert f"`{field}`" in text, field
    assert "client 0: nothing" in text and "| training rows per client | not shared |" in text
    assert "label_histogram" not in json.dumps(
        json.loads((run_dir / "hub" / "provenance.json").read_text())["partitions"]
    )


def test_what_the_owner_shares_by_name_is_sent_and_stated(tiny_model_dir, silo, tmp_path):
    reply = _dp_round(tiny_model_dir, silo, tmp_path, share="num-examples,train-loss,timings")
    sent = sent_fields(reply)
    extra = sent - set(COVERED) - set(ACCOUNTING) - set(BOOKKEEPING)
    assert extra == {"num-examples", "train-loss", "train-seconds", "handler-seconds"}
    assert reply.content["metrics"]["weight"] == reply.content["metrics"]["num-examples"] == 54  # 60 rows, 10% held out
    run = RunRecord(
        run_id="r",
        run_uid="u",
        status="complete",
        started="",
        config={},
        config_sha256="",
        seeds=Seeds(seed=0),
        versions={},
        python="",
        privacy=Privacy(mode="sample"),
        partitions=[Partition(partition_id=0)],
        shared={"0": ["num-examples", "timings", "train-loss"]},
    )
    text = disclosure_text(run)
    for group in ("num-examples", "timings", "train-loss"):
        for field in SHARED_FIELDS[group]:
            assert f"`{field}`" in text.split("client 0:")[1]


def test_under_dp_local_evaluation_is_not_sent_unless_shared(tiny_model_dir, silo, tmp_path):
    from fedhf.federation.client import evaluate_round
    from fedhf.federation.node import node_of

    cfg = parse_config({"model.name": str(tiny_model_dir), "privacy.mode": "sample", "data.max-length": 16})
    state = get_adapter_state(build_model(cfg, LABELS))
    node_config = {"data-path": str(silo)}
    metrics, info = evaluate_round(cfg, node_of(node_config, 1), state, LABELS, node_config)
    assert metrics == {} and info == {"partition-id": 1, "status": "not-shared"}
    shared = {**node_config, "share": "local-eval"}
    metrics, info = evaluate_round(cfg, node_of(shared, 1), state, LABELS, shared)
    assert info["status"] == "evaluated" and metrics["num-examples"] == 6 and "handler-seconds" not in info


def test_errors_leave_the_node_without_row_values_or_paths(tiny_model_dir, tmp_path):
    rows = synthetic_rows(40, seed=5)
    rows[3]["label"] = "SECRET-LABEL-VALUE"
    bad = write_tsv(tmp_path / "private-silo-path" / "train.tsv", rows, ["text", "label"]).parent
    reply = _dp_round(tiny_model_dir, bad, tmp_path)
    assert reply.has_error()
    reason = reply.error.reason
    assert "SECRET-LABEL-VALUE" not in reason and "private-silo-path" not in reason
    assert "1 label value(s) in column 'label'" in reason and "federation's 2 labels" in reason
    missing = _dp_round(tiny_model_dir, tmp_path / "no-such-silo", tmp_path)
    assert missing.error.reason == "node config 'data-path' does not exist on this node."


def test_a_refusal_carries_the_rule_and_nothing_computed_from_the_data(tiny_model_dir, silo, tmp_path):
    reply = _dp_round(tiny_model_dir, silo, tmp_path, **{"max-delta": 1e-9})
    assert sent_fields(reply) == {"partition-id", "status", "rule", "reason"}
    info = reply.content["client-info"]
    assert (info["status"], info["rule"]) == ("refused", "max-delta")
    assert not (tmp_path / "state").exists() or not list((tmp_path / "state").rglob("spend.json"))  # nothing spent
