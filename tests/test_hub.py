"""Publishing to a Hub: a local server on 127.0.0.1 that speaks the Hub's HTTP API, and the unmodified client."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from fedhf.config.schema import parse_config
from fedhf.release.card import build_hub_folder
from fedhf.run.store import RunRecord, RunStore
from fedhf.tasks.adapters import save_adapter
from fedhf.tasks.model import build_model

from .conftest import REPO
from .test_card import fake_run

TOKEN = "hf_fedhf-test-token_must-never-be-printed_0042"


def start_server(tmp_path: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    port_file = tmp_path / f"port-{time.time_ns()}"
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "hubserver.py"), "--port-file", str(port_file), *extra]
    )
    deadline = time.time() + 30
    while not port_file.exists():
        if time.time() > deadline or proc.poll() is not None:
            proc.kill()
            raise RuntimeError("the test Hub server did not start")
        time.sleep(0.05)
    return proc, f"http://127.0.0.1:{port_file.read_text()}"


def stop(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture()
def hub(tmp_path):
    proc, endpoint = start_server(tmp_path, "--token", TOKEN)
    yield endpoint
    stop(proc)


def env_for(endpoint: str, tmp_path: Path, token: str | None = TOKEN) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(
        HF_ENDPOINT=endpoint,
        HF_HUB_DISABLE_XET="1",
        HF_HOME=str(tmp_path / "hf-home"),
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
    )
    if token:
        env["HF_TOKEN"] = token
    return env


def cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedhf.cli", *args], capture_output=True, text=True, env=env, timeout=300
    )


@pytest.fixture()
def finished_run(tmp_path, tiny_model_dir):
    """A finished run folder with a real (tiny) trained adapter and its hub/ folder."""
    privacy = {
        "mode": "sample",
        "label": "sample-level (per example)",
        "accountant": "rdp",
        "rng": "not secure",
        "clients": {
            "0": {"epsilon": 3.25, "delta": 2.5e-4, "noise_multiplier": 1.1, "max_grad_norm": 1.0, "rounds": []},
            "1": {"epsilon": 2.75, "delta": 2.5e-4, "noise_multiplier": 1.1, "max_grad_norm": 1.0, "rounds": []},
        },
    }
    run_dir, run = fake_run(tmp_path, privacy=privacy)
    cfg = parse_config({"model.name": str(tiny_model_dir)})
    run["config"] = cfg.to_flat()
    run["model"]["name"] = str(tiny_model_dir)
    model = build_model(cfg, ["negative", "positive"])
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)
    for f in (run_dir / "adapter").iterdir():
        f.unlink()
    save_adapter(
        model, AutoTokenizer.from_pretrained(tiny_model_dir), cfg, ["negative", "positive"], run_dir / "adapter"
    )
    (run_dir / "run.json").write_text(json.dumps(run))
    build_hub_folder(run_dir, RunRecord.from_dict(run), "apache-2.0")
    return run_dir, run


def test_push_then_download_gives_the_same_predictions_and_card(hub, finished_run, tmp_path):
    run_dir, run = finished_run
    env = env_for(hub, tmp_path)
    res = cli(["push", str(run_dir), "--repo-id", "fedhf-test/sst2-adapter"], env)
    assert res.returncode == 0, res.stderr
    assert "uploaded 7 files to fedhf-test/sst2-adapter" in res.stdout
    for line in ("README.md", "adapter_model.safetensors", "provenance.json"):
        assert line in res.stdout
    texts = ["a wonderful film", "dull and boring", "the plot was fine"]
    args = [a for t in texts for a in ("--text", t)]
    local = cli(["predict", "--model", str(run_dir), *args], env)
    no_base = cli(["predict", "--model", "fedhf-test/sst2-adapter", *args], env)
    assert no_base.returncode == 2 and "give --base-model" in no_base.stderr  # trained from a local folder: not named
    remote = cli(
        ["predict", "--model", "fedhf-test/sst2-adapter", "--base-model", run["config"]["model.name"], *args], env
    )
    assert local.returncode == remote.returncode == 0, remote.stderr
    assert local.stdout == remote.stdout and len(local.stdout.splitlines()) == 3
    # A calm console: no load report, progress bar or library warning around the predictions, only fedhf's lines.
    for proc in (local, remote):
        noise = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("INFO fedhf:")]
        assert noise == [], proc.stderr[-2000:]
    # The card, downloaded with the unmodified client, parses, and states the run's facts.
    code = (
        "import json; from huggingface_hub import ModelCard, snapshot_download; "
        "p = snapshot_download('fedhf-test/sst2-adapter', local_dir='" + str(tmp_path / "dl") + "'); "
        "c = ModelCard.load('fedhf-test/sst2-adapter'); "
        "print(json.dumps({'meta': c.data.to_dict(), 'text': c.text}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    card = json.loads(out.stdout.strip().splitlines()[-1])
    meta = card["meta"]
    assert "base_model" not in meta and meta["library_name"] == "peft"  # a local folder is never published
    assert {"federated-learning", "differential-privacy", "opacus"} <= set(meta["tags"])
    results = {m["type"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}
    assert results == {"accuracy": run["final"]["eval_accuracy"], "f1": run["final"]["eval_f1"]}
    assert "| sample-level (per example) | 3.250 | 3.000 | 2.50e-04 | 1.1 | 1 | rdp |" in card["text"]
    downloaded = sorted(p.name for p in (tmp_path / "dl").iterdir() if not p.name.startswith("."))
    assert downloaded == sorted(p.name for p in (run_dir / "hub").iterdir())
    prov = (tmp_path / "dl" / "provenance.json").read_text()
    assert str(tmp_path) not in prov and TOKEN not in prov and "/root" not in prov and "/home" not in prov
    published = "".join(p.read_text(errors="ignore") for p in (tmp_path / "dl").rglob("*") if p.is_file())
    assert str(run["config"]["model.name"]) not in published  # the base model's local path, nowhere
    assert "loaded from a local folder" in card["text"]


def test_branch_and_pull_request(hub, finished_run, tmp_path):
    run_dir, _ = finished_run
    env = env_for(hub, tmp_path)
    assert cli(["push", str(run_dir), "--repo-id", "fedhf-test/a", "--revision", "dev"], env).returncode == 0
    pr = cli(["push", str(run_dir), "--repo-id", "fedhf-test/a", "--create-pr"], env)
    assert pr.returncode == 0 and "pull request: " in pr.stdout and "/discussions/1" in pr.stdout
    both = cli(["push", str(run_dir), "--repo-id", "fedhf-test/a", "--create-pr", "--revision", "dev"], env)
    assert both.returncode == 2 and "drop --revision" in both.stderr


def test_token_never_appears_in_output(tmp_path, finished_run):
    run_dir, _ = finished_run
    ok_proc, ok_endpoint = start_server(tmp_path)
    bad_proc, bad_endpoint = start_server(tmp_path, "--refuse-commits")
    try:
        good = cli(["push", str(run_dir), "--repo-id", "fedhf-test/b"], env_for(ok_endpoint, tmp_path))
        refused = cli(["push", str(run_dir), "--repo-id", "fedhf-test/b"], env_for(bad_endpoint, tmp_path))
    finally:
        stop(ok_proc)
        stop(bad_proc)
    assert good.returncode == 0
    assert refused.returncode == 2 and "the Hub refused the upload to 'fedhf-test/b' (HTTP 403)" in refused.stderr
    for res in (good, refused):
        assert TOKEN not in res.stdout + res.stderr
    assert TOKEN not in "".join(p.read_text(errors="ignore") for p in run_dir.rglob("*") if p.is_file())


def test_bad_input(hub, finished_run, tmp_path):
    run_dir, run = finished_run
    env = env_for(hub, tmp_path)
    before = sorted((p.relative_to(run_dir).as_posix(), p.stat().st_mtime_ns) for p in run_dir.rglob("*"))

    def error(res, needle):
        assert res.returncode == 2, res.stdout + res.stderr
        lines = [line for line in res.stderr.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and needle in lines[0], res.stderr

    error(
        cli(["push", str(run_dir), "--repo-id", "fedhf-test/c"], env_for(hub, tmp_path, token=None)),
        "no Hugging Face token: set HF_TOKEN",
    )
    error(cli(["push", str(run_dir), "--repo-id", "not a repo"], env), "is not a valid Hub repo id")
    error(
        cli(["push", str(run_dir), "--repo-id", "fedhf-test/c"], env_for(hub, tmp_path, token="hf_wrong")),
        "the Hub refused the upload to 'fedhf-test/c' (HTTP 401)",
    )
    running = tmp_path / "running"
    running.mkdir()
    (running / "run.json").write_text(json.dumps({**run, "status": "running"}))
    error(cli(["push", str(running), "--repo-id", "fedhf-test/c"], env), "is not a finished run (status 'running')")
    no_adapter = tmp_path / "no-adapter"
    no_adapter.mkdir()
    (no_adapter / "run.json").write_text(json.dumps(run))
    error(cli(["push", str(no_adapter), "--repo-id", "fedhf-test/c"], env), "lacks adapter_config.json")
    error(cli(["predict", "--model", str(no_adapter), "--text", "hi"], env), "no adapter there")
    error(
        cli(["predict", "--model", "fedhf-test/does-not-exist", "--text", "hi"], env), "cannot download it from the Hub"
    )
    closed = _closed_port()
    error(
        cli(["push", str(run_dir), "--repo-id", "fedhf-test/c"], env_for(f"http://127.0.0.1:{closed}", tmp_path)),
        f"cannot reach the Hub at http://127.0.0.1:{closed} to push 'fedhf-test/c' (ConnectError)",
    )
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "run.json").write_text('{"status": "comp')
    error(cli(["push", str(damaged), "--repo-id", "fedhf-test/c"], env), "cannot be read (JSONDecodeError")
    error(cli(["privacy", "ledger", str(damaged)], env), "cannot be read (JSONDecodeError")
    after = sorted((p.relative_to(run_dir).as_posix(), p.stat().st_mtime_ns) for p in run_dir.rglob("*"))
    assert after == before  # failed pushes leave nothing behind locally


def _closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_run_whose_push_fails_records_it_and_stays_complete(finished_run, tmp_path, monkeypatch):
    """hub.push at the end of a run: an unreachable Hub is a recorded failure in run.json, not a crash."""
    from fedhf.apps import _push

    run_dir, run = finished_run
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", f"http://127.0.0.1:{_closed_port()}")

    class Recorder:
        dir = run_dir
        record = RunRecord.from_dict(run)

        def pushed(self, push):
            self.record.hub_push = push
            RunStore(run_dir).write(self.record)

    cfg = parse_config({"hub.push": True, "hub.repo-id": "fedhf-test/unreachable"})
    rec = Recorder()
    _push(cfg, rec)  # no exception
    saved = json.loads((run_dir / "run.json").read_text())
    assert saved["status"] == "complete" and saved["hub_push"]["ok"] is False
    assert "cannot reach the Hub" in saved["hub_push"]["error"]
