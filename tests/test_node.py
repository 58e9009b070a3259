"""A SuperNode's own data: node config data-path (a real silo) or partition-id/num-partitions."""

from __future__ import annotations

import os

import pytest

from fedhf.config.schema import parse_config
from fedhf.data.silos import load_silo
from fedhf.errors import FedHFConfigError, FedHFDataError
from fedhf.federation.node import node_of

from .conftest import synthetic_rows, write_jsonl, write_tsv

LABELS = ("negative", "positive")


def _node(node_config: dict, node_id: int = 987654321):
    return node_of(node_config, node_id)


def test_a_silo_folder_with_train_and_test_files(synthetic_dir):
    cfg = parse_config({})
    train, local_eval, names = load_silo(cfg.data, str(synthetic_dir), LABELS, cfg.seed)
    assert names == list(LABELS)
    assert len(train) == 200 and len(local_eval) == 60  # the silo's own test file is its local eval set
    assert set(train["label"]) == {0, 1}
    # label ids follow the federation's names, whatever order the silo's rows come in
    rows = {t: lab for t, lab in zip(train["text"], train["label"], strict=True)}
    assert all(rows[r["text"]] == LABELS.index(r["label"]) for r in synthetic_rows(200, seed=1))


def test_a_single_file_silo_holds_out_a_local_eval_split(tmp_path):
    cfg = parse_config({"data.local-eval-fraction": 0.2})
    path = write_jsonl(tmp_path / "mine.jsonl", synthetic_rows(50, seed=4))
    train, local_eval, _ = load_silo(cfg.data, str(path), LABELS, cfg.seed)
    assert (len(train), len(local_eval)) == (40, 10)


def test_a_silo_whose_labels_are_a_subset_keeps_the_federation_ids(tmp_path):
    cfg = parse_config({})
    rows = [r for r in synthetic_rows(40, seed=5) if r["label"] == "positive"]
    path = write_tsv(tmp_path / "pos" / "train.tsv", rows, ["text", "label"])
    train, _, _ = load_silo(cfg.data, str(path.parent), LABELS, cfg.seed)
    assert set(train["label"]) == {1}


@pytest.mark.parametrize(
    "make, fragment",
    [
        (lambda d: d / "nope", "does not exist on this node"),
        (
            lambda d: write_tsv(d / "odd" / "train.tsv", [{"text": "x", "label": "neutral"}], ["text", "label"]).parent,
            "not among the federation's labels",
        ),
        (
            lambda d: write_tsv(d / "cols" / "train.tsv", [{"words": "x", "y": "positive"}], ["words", "y"]).parent,
            "no text column found",
        ),
        (lambda d: (d / "empty").mkdir() or d / "empty", "holds no"),
    ],
)
def test_bad_silos_name_the_node_config_key(tmp_path, make, fragment):
    cfg = parse_config({})
    with pytest.raises(FedHFDataError, match=fragment) as info:
        load_silo(cfg.data, str(make(tmp_path)), LABELS, cfg.seed)
    assert "data-path" in str(info.value) or "data.text-column" in str(info.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file: permissions cannot be tested")
def test_an_unreadable_silo_says_so(tmp_path):
    path = write_tsv(tmp_path / "locked" / "train.tsv", synthetic_rows(10), ["text", "label"])
    path.chmod(0)
    try:
        with pytest.raises(FedHFDataError, match="not readable"):
            load_silo(parse_config({}).data, str(path), LABELS, 0)
    finally:
        path.chmod(0o600)


def test_an_unreadable_silo_says_so_even_for_root(tmp_path, monkeypatch):
    """Root reads every file, so the permission check is exercised with os.access answering as for another user."""
    path = write_tsv(tmp_path / "locked" / "train.tsv", synthetic_rows(10), ["text", "label"])
    monkeypatch.setattr("fedhf.data.load.os.access", lambda p, mode: False)
    with pytest.raises(FedHFDataError, match="is not readable by this SuperNode's user; fix its permissions"):
        load_silo(parse_config({}).data, str(path), LABELS, 1)


def test_node_config_forms():
    silo = _node({"data-path": "/data/silo"})
    assert (silo.data_path, silo.num_partitions, silo.pid) == ("/data/silo", None, 987654321)
    named = _node({"data-path": "/data/silo", "partition-id": 3})
    assert named.pid == 3
    part = _node({"partition-id": 1, "num-partitions": 4})
    assert (part.pid, part.num_partitions, part.data_path) == (1, 4, None)
    with pytest.raises(FedHFConfigError, match="data-path"):
        _node({})
    with pytest.raises(FedHFConfigError, match="partition-id"):
        _node({"data-path": "/x", "partition-id": "first"})


def test_a_silo_gets_the_label_names_from_the_server(synthetic_dir):
    cfg = parse_config({})
    node = _node({"data-path": str(synthetic_dir)})
    train, _, names = node.data(cfg, list(LABELS))
    assert names == list(LABELS) and len(train) == 200
    with pytest.raises(FedHFConfigError, match="label names"):
        node.data(cfg, None)


def test_the_client_app_module_stays_light():
    """Every message in a deployment imports the ClientApp afresh: torch & co. load only to train or evaluate."""
    import subprocess
    import sys

    code = (
        "import sys, fedhf.flower.client_app; "
        "print(sorted(m for m in ('torch', 'transformers', 'peft', 'opacus', 'datasets') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_simulated_nodes_take_their_policy_from_the_owners_file(tmp_path):
    from fedhf.federation.node import load_node_config_file
    from fedhf.privacy.policy import parse_policy

    from .conftest import REPO

    f = tmp_path / "nodes.toml"
    f.write_text(
        '[default]\nmin-privacy = "sample"\nshare = "num-examples"\n[nodes.1]\nmax-epsilon = 2.0\n'
        "require-secure-aggregation = true\n"
    )
    nodes = load_node_config_file(f, 3)
    assert sorted(nodes) == [0, 1, 2]
    assert parse_policy(nodes[0]).max_epsilon is None and parse_policy(nodes[1]).max_epsilon == 2.0
    assert parse_policy(nodes[1]).require_secure_aggregation and parse_policy(nodes[2]).shared(dp=True) == {
        "num-examples"
    }
    for shipped in (REPO / "experiments" / "node-configs").glob("*.toml"):
        assert load_node_config_file(shipped, 3), shipped.name


def test_canary_records_join_a_node_only_with_its_owners_word():
    """A run config that names canaries cannot edit a node's training rows: a partition node takes them only with
    allow-canaries=true, a silo never; only the canary client gets any."""
    from fedhf.federation.client import canary_records
    from fedhf.privacy.policy import Refusal

    cfg = parse_config({"model.task": "causal-lm", "audit.canaries": 3, "audit.canary-repeats": 4})
    partition, silo = _node({"partition-id": 0, "num-partitions": 2}), _node({"data-path": "/silo"}, node_id=0)
    refused = canary_records(cfg, partition, 100, {"partition-id": 0, "num-partitions": 2})
    assert isinstance(refused, Refusal) and refused.rule == "allow-canaries"
    records = canary_records(cfg, partition, 100, {"allow-canaries": True})
    assert isinstance(records, list) and len(records) == 12 and len({str(r) for r in records}) == 3
    assert canary_records(cfg, _node({"partition-id": 1, "num-partitions": 2}), 100, {"allow-canaries": True}) == []
    refused = canary_records(cfg, silo, 100, {"allow-canaries": "true"})
    assert isinstance(refused, Refusal) and refused.rule == "audit.canaries"
    with pytest.raises(FedHFConfigError, match="node config 'allow-canaries'"):
        canary_records(cfg, partition, 100, {"allow-canaries": "yes"})
