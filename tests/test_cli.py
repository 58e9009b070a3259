"""Bad input through the real CLI: one clear line on stderr, a non-zero exit, nothing marked complete."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedhf.cli import app

from .conftest import synthetic_rows, write_jsonl


@pytest.fixture()
def runner():
    return CliRunner()


def invoke(runner, args, out_dir):
    result = runner.invoke(app, [*args, "--set", f"output-dir={out_dir}"])
    return result


def assert_clean_error(result, needle, out_dir: Path):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    assert needle in lines[0], lines[0]
    for run_json in out_dir.glob("*/run.json"):
        assert json.loads(run_json.read_text())["status"] != "complete"


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--set", "num-server-round=2"], "unknown config key 'num-server-round'. Did you mean 'num-server-rounds'?"),
        (["--set", "train.batch-size=big"], "config key 'train.batch-size': got 'big'"),
        (["--set", "strategy.name=fedsgd"], "config key 'strategy.name': got 'fedsgd'; allowed"),
        (["--set", "data.partitioner=random"], "config key 'data.partitioner': got 'random'; allowed"),
        (
            ["--set", "data.partitioner=dirichlet", "--set", "data.dirichlet-alpha=0"],
            "'data.dirichlet-alpha': got 0.0; it must be > 0",
        ),
        (["--num-clients", "0"], "num-partitions must be >= 1"),
        (["--num-clients", "1"], "config key 'strategy.min-available-nodes': got 2, more than --num-clients 1"),
        (["--set", "data.dataset=./missing/train.csv"], "does not exist"),
        (
            ["--set", "data.dataset=nobody/no-such-dataset"],
            "cannot reach the Hugging Face Hub for dataset 'nobody/no-such-dataset'",
        ),
        (
            ["--set", "privacy.mode=sample", "--set", "privacy.noise-multiplier=-0.5"],
            "'privacy.noise-multiplier': got -0.5; it must be >= 0",
        ),
        (["--set", "privacy.max-grad-norm=0"], "'privacy.max-grad-norm': got 0.0; it must be > 0"),
        (["--set", "privacy.delta=1"], "'privacy.delta': got 1.0; it must be < 1"),
        (["--set", "privacy.target-epsilon=0"], "'privacy.target-epsilon': got 0.0; it must be > 0"),
        (["--set", "privacy.accountant=gdp"], "'privacy.accountant': got 'gdp'; allowed: rdp, prv"),
        (["--set", "privacy.mode=local"], "'privacy.mode': got 'local'; allowed"),
        (
            ["--set", "privacy.node-max-epsilon=0:2"],
            "'privacy.node-max-epsilon' was removed: a node's budget is its owner's word",
        ),
        (["--set", "strategy.max-weight=0"], "'strategy.max-weight': got 0.0; it must be > 0"),
        (["--set", "model.hub-id=not a repo id"], "config key 'model.hub-id': got 'not a repo id'"),
        (
            ["--set", "privacy.mode=sample", "--set", "strategy.name=fedprox"],
            "fedprox cannot be combined with privacy.mode='sample'",
        ),
        (["--set", "hub.push=true"], "config key 'hub.repo-id': got ''; hub.push=true needs a Hub repo id"),
        (["--set", "hub.push=true", "--set", "hub.repo-id=no spaces/x"], "config key 'hub.repo-id': got 'no spaces/x'"),
        (
            ["--set", "strategy.secure-aggregation=true", "--set", "strategy.secagg-reconstruction-threshold=5"],
            "config key 'strategy.secagg-reconstruction-threshold': got 5, more than the 3 shares",
        ),
        (
            ["--set", "strategy.secure-aggregation=true", "--set", "strategy.secagg-max-weight=10"],
            "config key 'strategy.secagg-max-weight': this client trains on",
        ),
        (
            ["--set", "strategy.secure-aggregation=true", "--set", "strategy.secagg-max-weight=1e12"],
            "rounds to zero in SecAgg+",
        ),
        (
            ["--set", "strategy.secure-aggregation=true", "--set", "privacy.mode=client"],
            "config key 'strategy.secure-aggregation': true cannot be combined with privacy.mode='client'",
        ),
        (
            ["--set", "strategy.secure-aggregation=yes please"],
            "config key 'strategy.secure-aggregation': got 'yes please'",
        ),
    ],
)
def test_bad_config_and_sources(runner, tmp_path, args, needle):
    assert_clean_error(invoke(runner, ["run", *args], tmp_path / "out"), needle, tmp_path / "out")


def test_missing_columns_and_empty_partitions(runner, tmp_path):
    f = write_jsonl(tmp_path / "d" / "train.jsonl", synthetic_rows(4))
    out = tmp_path / "out"
    assert_clean_error(
        invoke(runner, ["run", "--set", f"data.dataset={f}", "--set", "data.text-column=review"], out),
        "column 'review' not found",
        out,
    )
    assert_clean_error(
        invoke(runner, ["run", "--set", f"data.dataset={f}", "--set", "data.label-column=stars"], out),
        "column 'stars' not found",
        out,
    )
    assert_clean_error(
        invoke(
            runner,
            ["run", "--set", f"data.dataset={f}", "--num-clients", "6", "--set", "strategy.min-available-nodes=2"],
            out,
        ),
        "4 training rows cannot fill 6 partitions",
        out,
    )


def test_unreachable_model_id(runner, tmp_path, synthetic_dir):
    out = tmp_path / "out"
    assert_clean_error(
        invoke(
            runner, ["run", "--set", f"data.dataset={synthetic_dir}", "--set", "model.name=nobody/no-such-model"], out
        ),
        "model.name: cannot load 'nobody/no-such-model': the Hub is unreachable",
        out,
    )


def test_config_file_errors(runner, tmp_path):
    out = tmp_path / "out"
    assert_clean_error(invoke(runner, ["run", "--config", str(tmp_path / "none.toml")], out), "no such file", out)
    exp = tmp_path / "exp.toml"
    exp.write_text("[train]\nlearning-rate = 0.1\n")
    assert_clean_error(
        invoke(runner, ["run", "--config", str(exp)], out), "unknown config key 'train.learning-rate'", out
    )


def test_partitions_command_prints_statistics(runner, synthetic_dir):
    result = runner.invoke(
        app,
        [
            "partitions",
            "--num-clients",
            "4",
            "--set",
            f"data.dataset={synthetic_dir}",
            "--set",
            "data.partitioner=dirichlet",
            "--set",
            "data.dirichlet-alpha=0.3",
            "--set",
            "data.min-partition-size=5",
        ],
    )
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert "200 training rows" in lines[0] and "dirichlet, 4 clients" in lines[0]
    rows = [line.split() for line in lines[2:]]
    assert [r[0] for r in rows] == ["0", "1", "2", "3"]
    assert sum(int(r[1]) + int(r[2]) for r in rows) == 200
    assert all(int(r[3]) + int(r[4]) == int(r[1]) for r in rows)


def test_config_command_lists_every_key(runner):
    result = runner.invoke(app, ["config", "--set", "model.lora.r=4"])
    assert result.exit_code == 0
    assert "model.lora.r = 4" in result.stdout and "strategy.name = 'fedavg'" in result.stdout


def test_help_on_every_command(runner):
    for cmd in ([], ["run"], ["partitions"], ["config"]):
        result = runner.invoke(app, [*cmd, "--help"])
        assert result.exit_code == 0 and "Usage" in result.stdout


def test_real_process_exit_code(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-m", "fedhf.cli", "run", "--set", "seed=-1"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "error: config key 'seed': got -1; it must be >= 0."


def test_unreachable_target_epsilon_fails_before_training(runner, tmp_path, synthetic_dir):
    out = tmp_path / "out"
    result = invoke(
        runner,
        [
            "run",
            "--set",
            f"data.dataset={synthetic_dir}",
            "--set",
            "privacy.mode=sample",
            "--set",
            "privacy.target-epsilon=0.0001",
            "--set",
            "num-server-rounds=50",
        ],
        out,
    )
    assert_clean_error(result, "privacy.target-epsilon=0.0001 is unreachable", out)
    assert not list(out.glob("*/run.json"))  # nothing started


def test_privacy_plan_command(runner):
    result = runner.invoke(app, ["privacy", "plan", "--target-epsilon", "8", "--num-examples", "400", "--rounds", "3"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    sigma = float(lines[0].split("sigma = ")[1].split()[0])
    eps = [float(line.split()[-1]) for line in lines[2:]]
    assert len(eps) == 3 and eps[0] < eps[1] < eps[2] <= 8.0 and eps[2] >= 7.2 and 0.3 < sigma < 3
    # Its defaults are a sample-level DP run's (4 local epochs of Poisson batches of 64 when those keys are unset):
    # a plan left at its defaults is the plan such a run's client makes for the same rows, not one for the non-DP
    # batch of 16.
    from fedhf.config.schema import parse_config
    from fedhf.privacy.dp import plan_for

    run = plan_for(parse_config({"privacy.mode": "sample", "privacy.target-epsilon": 8.0}), 400)
    assert lines[0].startswith(f"noise multiplier sigma = {run.noise_multiplier:.4f} ")
    assert f"q = {run.sample_rate:.4f}, {run.steps_per_round} steps per round, 3 rounds" in lines[0]
    assert run.steps_per_round == 28  # 400 rows in 7 batches of about 64, 4 epochs
    bad = runner.invoke(app, ["privacy", "plan", "--target-epsilon", "-1", "--num-examples", "400"])
    assert bad.exit_code == 2 and "--target-epsilon: got -1.0" in bad.stderr
