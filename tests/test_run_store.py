"""run.json has one owner (fedhf.run.store), one key style, a version and a JSON Schema that real records meet."""

from __future__ import annotations

import json

import jsonschema
import pytest

from fedhf.config.schema import parse_config
from fedhf.errors import FedHFRunError
from fedhf.run.record import RunRecorder
from fedhf.run.store import SCHEMA_VERSION, Dataset, Model, RunStore, schema, upgrade

FREE = {"config", "versions", "source", "data"}  # maps whose keys are not the record's own (config keys, file names)


def bad_keys(obj, path="") -> list[str]:
    """Every key of the record that is not snake_case (ids are allowed where maps are keyed by client)."""
    out = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not (k.isdigit() or (k[:1].isalpha() and k == k.lower() and "-" not in k and " " not in k)):
                out.append(f"{path}/{k}")
            if k not in FREE:
                out += bad_keys(v, f"{path}/{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += bad_keys(v, f"{path}[{i}]")
    return out


def recorded_run(tmp_path) -> dict:
    """A record made by the RunRecorder from replies as the strategy hands them over (Flower's kebab-case words)."""
    cfg = parse_config({"output-dir": str(tmp_path), "run-name": "r", "privacy.mode": "sample"})
    rec = RunRecorder(cfg)
    rec.set_dataset(
        Dataset(
            name="x",
            source={"files": {"train": [{"name": "train.tsv", "sha256": "0" * 64}]}},
            label_names=["a", "b"],
            train_rows=20,
            central_eval_rows=10,
        )
    )
    rec.set_model(Model(name="m", trainable_params=1, total_params=2, adapter_bytes=4, model_bytes=8))
    rec.set_partitions([{"partition-id": 0, "train-examples": 10, "eval-examples": 0, "label-histogram": [5, 5]}])
    rec.set_privacy({"mode": "sample", "accountant": "rdp"})
    rec.end_round(0, {"loss": 0.7, "accuracy": 0.5, "f1": 0.5}, 0.1)
    rec.start_round(1, 100, 2)
    dp = {
        "epsilon": 4.0,
        "delta": 1e-3,
        "noise-multiplier": 1.0,
        "max-grad-norm": 1.0,
        "sample-rate": 0.5,
        "steps": 2,
        "accountant": "rdp",
        "accountant-id": "ab",
        "max-epsilon": 0.0,
    }
    rec.train_replies(
        [
            {
                "node-id": 7,
                "partition-id": 0,
                "status": "trained",
                "shared": ["num-examples", "train-loss"],
                "weight": 10.0,
                "num-examples": 10,
                "train-loss": 0.6,
                "train-steps": 2,
                "transport": "fp32",
                "bytes-up": 100,
                "privacy": dp,
            }
        ],
        [{"node-id": 8, "reason": "no reply within strategy.round-timeout=1 s"}],
        [],
        refused=[{"node-id": 9, "partition-id": 1, "rule": "min-privacy", "reason": "no"}],
    )
    rec.end_round(1, {"loss": 0.6, "accuracy": 0.6, "f1": 0.6}, 0.1)
    rec.set_final(None)
    rec.finish(hub_folder="hub")
    return json.loads((rec.dir / "run.json").read_text())


def test_a_recorded_run_meets_the_schema_in_one_key_style(tmp_path):
    run = recorded_run(tmp_path)
    assert run["schema_version"] == SCHEMA_VERSION
    jsonschema.validate(run, schema())
    assert bad_keys(run) == []
    client = run["rounds"][1]["clients"][0]
    assert client["partition_id"] == 0 and client["num_examples"] == 10 and client["privacy"]["noise_multiplier"] == 1.0
    assert run["rounds"][1]["failures"][0]["node_id"] == 8 and run["refusals"][0]["partition_id"] == 1
    assert run["partitions"][0]["label_histogram"] == [5, 5]
    assert run["privacy"]["clients"]["0"]["epsilon"] == 4.0 and run["rounds"][1]["train_loss"] == 0.6


def test_the_schema_catches_a_kebab_key_and_a_wrong_type(tmp_path):
    run = recorded_run(tmp_path)
    bad = json.loads(json.dumps(run))
    bad["rounds"][1]["clients"][0]["num-examples"] = 10
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema())
    bad = json.loads(json.dumps(run))
    bad["rounds"][1]["eval_accuracy"] = "high"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema())


def test_a_schema_1_record_is_upgraded_and_a_newer_one_refused(tmp_path):
    run = recorded_run(tmp_path)
    old = json.loads(json.dumps(run))  # as fedhf 0.1 wrote it: no version, Flower's words in the per-client entries
    del old["schema_version"]
    kebab = {
        "partition_id": "partition-id",
        "num_examples": "num-examples",
        "train_loss": "train-loss",
        "node_id": "node-id",
        "bytes_up": "bytes-up",
        "train_steps": "train-steps",
        "noise_multiplier": "noise-multiplier",
    }
    for entry in old["rounds"][1]["clients"] + old["rounds"][1]["failures"] + old["partitions"] + old["refusals"]:
        for new_key, old_key in kebab.items():
            if new_key in entry:
                entry[old_key] = entry.pop(new_key)
    old["rounds"][1]["clients"][0]["privacy"]["noise-multiplier"] = old["rounds"][1]["clients"][0]["privacy"].pop(
        "noise_multiplier"
    )
    folder = tmp_path / "old"
    folder.mkdir()
    (folder / "run.json").write_text(json.dumps(old))
    got = RunStore(folder).read().to_dict()
    jsonschema.validate(got, schema())
    assert got == run
    assert upgrade(json.loads(json.dumps(run))) == run  # the current layout passes through unchanged
    (folder / "run.json").write_text(json.dumps({**run, "schema_version": SCHEMA_VERSION + 1}))
    with pytest.raises(FedHFRunError, match=f"schema_version {SCHEMA_VERSION + 1}, newer than this fedhf reads"):
        RunStore(folder).read()
    (folder / "run.json").write_text("{not json")
    with pytest.raises(FedHFRunError, match="cannot be read .*damaged"):
        RunStore(folder).read("report")


def test_post_run_commands_write_through_the_store(tmp_path):
    run = recorded_run(tmp_path)
    store = RunStore(tmp_path / "r")
    store.update("evaluate", lambda record: record.evaluations.append({"data": {}, "rows": 3}))
    again = store.read().to_dict()
    assert again["evaluations"] == [{"data": {}, "rows": 3}] and again["rounds"] == run["rounds"]
    jsonschema.validate(again, schema())


def _schema_objects():
    """(dataclass, the schema object that describes it) for every typed part of the record."""
    import dataclasses

    from fedhf.privacy.ledger import Privacy, RoundPrivacy
    from fedhf.run import store

    top = schema()
    p = top["properties"]
    pairs = [
        (store.RunRecord, top),
        (store.Seeds, p["seeds"]),
        (store.Dataset, p["dataset"]),
        (store.Model, p["model"]),
        (store.Partition, p["partitions"]["items"]),
        (store.Round, p["rounds"]["items"]),
        (RoundPrivacy, p["rounds"]["items"]["properties"]["privacy"]),
        (store.Federation, p["federation"]),
        (Privacy, p["privacy"]),
        (store.Refusal, p["refusals"]["items"]),
        (store.Resume, p["resumes"]["items"]),
        (store.Final, p["final"]),
        (store.StoppedEarly, p["stopped_early"]),
        (store.HubPush, p["hub_push"]),
    ]
    return [(cls, node, dataclasses.fields(cls)) for cls, node in pairs]


def test_the_schema_names_exactly_the_dataclasses_fields_and_requires_those_always_written():
    for cls, node, fields in _schema_objects():
        assert list(node["properties"]) == [f.name for f in fields], cls.__name__
        always = [f.name for f in fields if not f.metadata.get("omit_empty")]
        assert node.get("required", []) == always, cls.__name__


def test_a_record_reads_back_as_the_same_typed_record(tmp_path):
    from fedhf.run.store import Round, RunRecord

    run = recorded_run(tmp_path)
    record = RunStore(tmp_path / "r").read()
    assert isinstance(record, RunRecord) and all(isinstance(r, Round) for r in record.rounds)
    assert record.rounds[1].trained[0]["partition_id"] == 0 and record.final.eval_accuracy == 0.6
    assert record.privacy.clients["0"]["epsilon"] == 4.0 and record.refusals[0].rule == "min-privacy"
    assert record.to_dict() == run and RunRecord.from_dict(record.to_dict()) == record
    assert "audit" not in run and "stopped_early" not in run  # empty optional parts are left out, not null


def test_a_record_with_an_unknown_or_a_missing_key_is_refused_by_name(tmp_path):
    run = recorded_run(tmp_path)
    folder = tmp_path / "odd"
    folder.mkdir()
    (folder / "run.json").write_text(json.dumps({**run, "colour": "blue"}))
    with pytest.raises(FedHFRunError, match=r"has /colour, which schema 2 does not have.*upgrade fedhf"):
        RunStore(folder).read()
    bad = json.loads(json.dumps(run))
    bad["rounds"][1]["clients_trained"] = 1
    (folder / "run.json").write_text(json.dumps(bad))
    with pytest.raises(FedHFRunError, match=r"/rounds\[1\]/clients_trained"):
        RunStore(folder).read("report")
    del bad["rounds"][1]["clients_trained"]
    del bad["run_uid"]
    (folder / "run.json").write_text(json.dumps(bad))
    with pytest.raises(FedHFRunError, match="report: .*lacks '/run_uid'"):
        RunStore(folder).read("report")


def test_an_old_record_reads_with_the_config_keys_added_since_at_the_values_it_used(tmp_path):
    from fedhf.run.store import CONFIG_BEFORE_KEY

    run = recorded_run(tmp_path)
    old = json.loads(json.dumps(run))
    del old["schema_version"]
    for key in CONFIG_BEFORE_KEY:
        del old["config"][key]
    folder = tmp_path / "old"
    folder.mkdir()
    (folder / "run.json").write_text(json.dumps(old))
    record = RunStore(folder).read()
    assert record.config == old["config"]  # as recorded: what config_sha256 hashes
    config = record.settings
    assert {k: config[k] for k in CONFIG_BEFORE_KEY} == {
        "data.format": "labels",
        "model.task": "text-classification",
        "model.pooling": "cls",
        "model.adapter": "lora",
        "model.hub-id": "",
        "model.sample-prompts": 0,
        "train.optimizer": "adamw",
        "train.momentum": 0.0,
        "train.lr-schedule": "constant",
        "train.loss-on": "response",
        "transport.dtype": "fp32",
        "strategy.lora-aggregation": "mean",
        "strategy.central-eval-every": 1,
        "personalization.mode": "none",
        "personalization.epochs": 1,
        "personalization.lr": "",
        "personalization.keep-local": "head",
        "personalization.ditto-lambda": 0.1,
        "personalization.local-only": True,
        "audit.canaries": 0,
        "audit.canary-repeats": 10,
        "audit.canary-client": 0,
    }
    assert {k: v for k, v in config.items() if k not in CONFIG_BEFORE_KEY} == {
        k: v for k, v in run["config"].items() if k not in CONFIG_BEFORE_KEY
    }
