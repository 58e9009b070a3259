"""After a run: plots, `fedhf report`, `fedhf evaluate` and `fedhf audit` on a real (tiny) federated run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO, synthetic_rows, write_tsv

PNG = b"\x89PNG\r\n\x1a\n"
pytestmark = pytest.mark.slow  # one real simulation (module fixture), then CLI processes


def subprocess_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", FLWR_TELEMETRY_ENABLED="0", RAY_USAGE_STATS_ENABLED="0")
    return subprocess.run(
        [sys.executable, "-m", "fedhf.cli", *args], capture_output=True, text=True, env=env, timeout=600, cwd=REPO
    )


class Result:
    """What a test reads of a CLI call: exit code, stdout, stderr."""

    def __init__(self, returncode: int, stdout: str, stderr: str) -> None:
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def cli(*args: str) -> Result:
    """The real `fedhf` command, in this process (the heavy imports are paid once, not per call)."""
    from typer.testing import CliRunner

    from fedhf.cli import app

    res = CliRunner().invoke(app, list(args))
    return Result(res.exit_code, res.stdout, res.stderr)


def one_error_line(proc: Result) -> str:
    assert proc.returncode == 2, (proc.stdout, proc.stderr[-2000:])
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-2000:]
    return lines[0]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model_dir) -> Path:
    """2 clients, 2 rounds, sample-level DP, on all 300 rows of our own synthetic dataset (tiny BERT); the server
    evaluates before round 1 and after round 2 only (strategy.central-eval-every=2)."""
    root = tmp_path_factory.mktemp("tiny-run")
    data = root / "data"
    write_tsv(data / "train.tsv", synthetic_rows(300, seed=11), ["text", "label"])
    write_tsv(data / "test.tsv", synthetic_rows(80, seed=12), ["text", "label"])
    proc = subprocess_cli(
        "run",
        "-n",
        "2",
        "--set",
        f"data.dataset={data}",
        "--set",
        f"model.name={tiny_model_dir}",
        "--set",
        "num-server-rounds=2",
        "--set",
        "strategy.central-eval-every=2",
        "--set",
        "data.max-train-examples=0",
        "--set",
        "data.local-eval-fraction=0.0",
        "--set",
        "train.local-epochs=1",
        "--set",
        "privacy.mode=sample",
        "--set",
        "privacy.noise-multiplier=0.8",
        "--set",
        "data.max-length=24",
        "--set",
        "train.lr=0.01",
        "--set",
        f"output-dir={root / 'out'}",
        "--set",
        "run-name=tiny",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "out" / "tiny"


def held_out_rows(n: int, seed: int) -> list[dict]:
    """Synthetic rows that cannot equal a training row ("item" instead of "number")."""
    return [dict(r, text=r["text"].replace("number", "item")) for r in synthetic_rows(n, seed=seed)]


def run_json(run_dir: Path) -> dict:
    return json.loads((run_dir / "run.json").read_text())


def copy_run(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    run = run_json(dst)
    for key, value in changes.items():
        run[key] = value
    (dst / "run.json").write_text(json.dumps(run))
    return dst


def test_a_real_run_meets_the_run_json_schema(tiny_run):
    import jsonschema

    from fedhf.run.store import SCHEMA_VERSION, schema

    run = run_json(tiny_run)
    assert run["schema_version"] == SCHEMA_VERSION
    jsonschema.validate(run, schema())
    assert run["privacy"]["clients"] and all("partition_id" in c for r in run["rounds"][1:] for c in r["clients"])


def test_a_round_the_schedule_skips_records_no_central_metrics(tiny_run):
    """strategy.central-eval-every=2 over 2 rounds: round 0 and round 2 evaluated, round 1 not; the record, the CSV,
    the console and the card say so and the run's results are round 2's."""
    import csv

    from fedhf.run.progress import round_line
    from fedhf.run.store import load_run

    run = run_json(tiny_run)
    keys = ("eval_loss", "eval_accuracy", "eval_f1", "central_eval_seconds")
    assert [[r.get(k) is None for k in keys] for r in run["rounds"]] == [[False] * 4, [True] * 4, [False] * 4]
    assert run["final"] == {k: run["rounds"][2][k] for k in keys[:3]}
    assert len(run["rounds"][1]["clients"]) == 2
    with open(tiny_run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["round"], r["eval_accuracy"] == "") for r in rows] == [("0", False), ("1", True), ("2", False)]
    line = round_line(load_run(tiny_run).rounds[1], 2)
    assert "central eval skipped (strategy.central-eval-every)" in line and "clients 2/2" in line
    card = (tiny_run / "hub" / "README.md").read_text()
    assert "before training (round 0) and after round 2 (strategy.central-eval-every = 2):" in card
    assert "after every round" not in card
    assert any(r.startswith("| 1 | ") and r.endswith(" | - | - | - | 2 |") for r in card.splitlines()), card


def test_run_draws_its_plots_and_the_card_shows_them(tiny_run):
    for name in ("metrics.png", "epsilon.png"):
        for folder in (tiny_run / "plots", tiny_run / "hub" / "plots"):
            data = (folder / name).read_bytes()
            assert data.startswith(PNG) and len(data) > 5_000, (folder, name)
        assert f"![{name}](plots/{name})" in (tiny_run / "hub" / "README.md").read_text()
    # A DP run whose clients shared no label histograms publishes none: no label-distribution plot either.
    assert not (tiny_run / "plots" / "label_distribution.png").exists()
    assert "label_distribution" not in (tiny_run / "hub" / "README.md").read_text()


def test_plots_skip_what_a_run_does_not_have(tmp_path, tiny_run):
    from fedhf.analysis.plots import plot_epsilon, run_plots
    from fedhf.run.store import RunRecord

    raw = run_json(tiny_run)
    raw.pop("privacy")
    run = RunRecord.from_dict(raw)
    assert plot_epsilon(run, tmp_path / "e.png") is None
    assert sorted(p.name for p in run_plots(run, tmp_path)) == ["label_distribution.png", "metrics.png"]


def test_report_tables_and_plots(tiny_run, tmp_path):
    run = run_json(tiny_run)
    other = copy_run(tiny_run, tmp_path / "nodp", run_id="nodp", privacy={"mode": "none"})
    out = tmp_path / "report"
    proc = cli("report", str(tiny_run), str(other), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    md = (out / "report.md").read_text()
    eps = max(c["epsilon"] for c in run["privacy"]["clients"].values())
    assert "| tiny | " in md and f"{eps:.3f}" in md and f"{run['final']['eval_accuracy']:.4f}" in md
    assert "![privacy-utility](privacy_utility.png)" in md
    for rel in ("privacy_utility.png", "tiny/metrics.png", "tiny/epsilon.png", "nodp/metrics.png"):
        assert (out / rel).read_bytes().startswith(PNG), rel
        assert f"({rel})" in md
    assert not (out / "nodp" / "epsilon.png").exists()  # no DP, no epsilon plot


def test_report_refuses_mixed_datasets_and_unfinished_runs(tiny_run, tmp_path):
    ds = dict(run_json(tiny_run)["dataset"], name="ag_news", preset="ag_news")
    other = copy_run(tiny_run, tmp_path / "agnews", run_id="agnews", dataset=ds)
    line = one_error_line(cli("report", str(tiny_run), str(other), "--out", str(tmp_path / "r")))
    assert "different datasets" in line and "--no-privacy-utility" in line
    assert (
        cli("report", str(tiny_run), str(other), "--out", str(tmp_path / "r"), "--no-privacy-utility").returncode == 0
    )
    running = copy_run(tiny_run, tmp_path / "running", status="running")
    assert "is not a finished run (status 'running')" in one_error_line(cli("report", str(running)))
    assert "no run.json" in one_error_line(cli("report", str(tmp_path)))
    assert "not a folder" in one_error_line(cli("audit", str(tmp_path / "nothing-here")))


def test_evaluate_reproduces_the_servers_central_evaluation(tiny_run, tmp_path):
    from fedhf.analysis.evaluation import evaluate_run

    work = copy_run(tiny_run, tmp_path / "ev")
    run = run_json(work)
    res = evaluate_run(work, {})
    assert res["rows"] == run["dataset"]["central_eval_rows"]
    assert res["accuracy"] == pytest.approx(run["final"]["eval_accuracy"], abs=1e-9)
    assert res["loss"] == pytest.approx(run["final"]["eval_loss"], rel=1e-4)
    assert run_json(work)["evaluations"] == [res]
    proc = cli("evaluate", str(work), "--set", "data.max-eval-examples=20")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "data.max-eval-examples=20: 20 rows" in proc.stdout
    assert len(run_json(work)["evaluations"]) == 2
    assert "cannot change train.lr after training" in one_error_line(
        cli("evaluate", str(work), "--set", "train.lr=0.1")
    )


def test_evaluate_maps_integer_label_ids_onto_the_adapters_names(tiny_run, tmp_path):
    """GLUE's files hold labels as ids 0..K-1: they map onto the run's label names by id (issue 16, item 8)."""
    from fedhf.analysis.evaluation import evaluate_run

    work = copy_run(tiny_run, tmp_path / "ids")
    by_name = evaluate_run(work, {}, record=False)
    ids = tmp_path / "glue-like"
    to_id = {"negative": 0, "positive": 1}
    for split, seed, n in (("train", 11, 300), ("test", 12, 80)):
        write_tsv(
            ids / f"{split}.tsv",
            [dict(r, label=to_id[r["label"]]) for r in synthetic_rows(n, seed=seed)],
            ["text", "label"],
        )
    by_id = evaluate_run(work, {"data.dataset": str(ids)}, record=False)
    assert by_id["rows"] == by_name["rows"] == 80
    assert by_id["accuracy"] == by_name["accuracy"] and by_id["loss"] == pytest.approx(by_name["loss"], rel=1e-6)
    proc = cli("evaluate", str(work), "--set", f"data.dataset={ids}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    three = tmp_path / "three-ids"
    for split in ("train", "test"):
        write_tsv(three / f"{split}.tsv", [{"text": f"row {i}", "label": i % 3} for i in range(30)], ["text", "label"])
    msg = one_error_line(cli("evaluate", str(work), "--set", f"data.dataset={three}"))
    assert "the data's labels ['0', '1', '2'] are not among the adapter's ['negative', 'positive']" in msg


def test_audit_needs_held_out_data_then_uses_the_file_given(tiny_run, tmp_path):
    work = copy_run(tiny_run, tmp_path / "au")
    line = one_error_line(cli("audit", str(work)))
    assert "no held-out data" in line and "--non-members FILE" in line and "300 of its 300" in line
    assert "audit" not in run_json(work)

    non = write_tsv(tmp_path / "held-out" / "train.tsv", held_out_rows(200, seed=99), ["text", "label"])
    proc = cli("audit", str(work), "--non-members", str(non), "--max-examples", "150")
    assert proc.returncode == 0, proc.stderr[-2000:]
    audit = run_json(work)["audit"]
    assert audit["members"] == audit["non_members"] == 150
    assert audit["non_member_source"] == "file train.tsv"
    run = run_json(work)
    assert audit["claimed_epsilon"] == pytest.approx(max(c["epsilon"] for c in run["privacy"]["clients"].values()))
    for attack in ("loss", "calibrated"):
        assert 0.0 <= audit[attack]["auc"] <= 1.0
        assert 0.0 <= audit[attack]["epsilon_lower_bound"] <= audit["claimed_epsilon"]
        assert f"{audit[attack]['auc']:.3f}" in proc.stdout
    card = (work / "hub" / "README.md").read_text()
    assert "## Privacy audit" in card and f"| {audit['loss']['auc']:.3f} |" in card
    assert "Not audited" not in card


def test_audit_members_are_exactly_the_clients_training_rows(tiny_run, tmp_path):
    from fedhf.analysis.audit import audit_sets
    from fedhf.analysis.evaluation import run_config
    from fedhf.data.load import load_data
    from fedhf.run.store import load_finished_run

    run = load_finished_run(tiny_run, "test")
    non = write_tsv(tmp_path / "nm.tsv", held_out_rows(120, seed=5) + synthetic_rows(30, seed=11), ["text", "label"])
    members, non_members, _ = audit_sets(run, non)
    data = load_data(run_config(run).data)
    assert sorted(members["text"]) == sorted(data.train["text"])  # all 300 rows were trained on, none twice
    assert sum(p.train_examples for p in run.partitions) == len(members)
    assert not set(members["text"]) & set(non_members["text"])  # seed-11 rows are members: dropped from non-members
    assert len(non_members) == 120


def test_audit_refuses_members_it_cannot_rebuild(tiny_run, tmp_path):
    parts = run_json(tiny_run)["partitions"]
    parts[0] = dict(parts[0], **{"train_examples": parts[0]["train_examples"] + 1})
    work = copy_run(tiny_run, tmp_path / "silo", partitions=parts)
    assert "cannot be rebuilt" in one_error_line(cli("audit", str(work)))
    line = one_error_line(cli("audit", str(tiny_run), "--max-examples", "10"))
    assert "--max-examples 10 is too few" in line
