"""resume is a run-config key: fedhf run --resume and flwr run --run-config resume=... continue the same run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedhf.config.schema import parse_config
from fedhf.errors import FedHFConfigError
from fedhf.run.checkpoint import save_checkpoint
from fedhf.run.record import RunRecorder
from fedhf.run.resume import changed_keys, resume_target
from fedhf.run.store import Federation


def interrupted(tmp_path, engine="simulation", **keys):
    """A run that recorded round 1 of 3 and its checkpoint, then stopped (status running)."""
    cfg = parse_config({"output-dir": str(tmp_path), "run-name": "r", **keys})
    rec = RunRecorder(cfg)
    rec.set_federation(Federation(engine=engine, num_clients=3))
    rec.end_round(0, {"loss": 0.7, "accuracy": 0.5, "f1": 0.5}, 0.1)
    save_checkpoint(
        rec.dir,
        1,
        run_uid=rec.record.run_uid,
        config_sha256=rec.record.config_sha256,
        arrays={"w": np.zeros(2, dtype=np.float32)},
        strategy_arrays={},
        strategy_state={"strategy": "fedavg"},
        run_record=rec.record.to_dict(),
    )
    return rec.dir


def test_a_run_folder_resumes_with_its_own_config(tmp_path):
    run_dir = interrupted(tmp_path, **{"train.lr": 0.01})
    target = resume_target(run_dir)
    assert target.checkpoint.round == 1 and target.num_clients == 3 and target.cfg.train.lr == 0.01
    assert target.cfg.resume == ""  # the run's own config: the resume request is not part of it
    # flwr run hands the app its whole run config: defaults plus the user's overrides
    asked = {**parse_config({}).to_flat(), "resume": str(run_dir)}
    assert changed_keys(asked, target) == []
    assert changed_keys({**asked, "train.lr": 0.01}, target) == []  # the run's own value: not a change
    assert changed_keys({**asked, "train.lr": 0.5, "seed": 7}, target) == ["seed", "train.lr"]


def test_what_cannot_be_resumed_is_refused_naming_the_key(tmp_path):
    with pytest.raises(FedHFConfigError, match="config key 'resume' .*not a folder"):
        resume_target(tmp_path / "nothing", "config key 'resume'")
    run_dir = interrupted(tmp_path)
    record = json.loads((run_dir / "run.json").read_text())
    (run_dir / "run.json").write_text(json.dumps({**record, "status": "complete"}))
    with pytest.raises(FedHFConfigError, match="already complete"):
        resume_target(run_dir)
    assert parse_config({"resume": str(run_dir)}).resume == str(run_dir)


def test_the_server_app_refuses_a_changed_configuration(tmp_path):
    from fedhf.apps import _main

    simulated = interrupted(tmp_path / "sim")
    with pytest.raises(FedHFConfigError, match="was started with fedhf run.*fedhf run --resume"):
        _main(None, {**parse_config({}).to_flat(), "resume": str(simulated)})
    run_dir = interrupted(tmp_path, engine="flower")
    asked = {**parse_config({}).to_flat(), "resume": str(run_dir), "num-server-rounds": 9}
    with pytest.raises(FedHFConfigError, match="config key 'resume': .* changes num-server-rounds"):
        _main(None, asked)
