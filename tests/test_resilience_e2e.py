"""End to end, on a tiny BERT and our synthetic rows: kill and resume, failing and poisoned clients (slow)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from .conftest import REPO, cli_env

pytestmark = pytest.mark.slow


def _args(model: Path, data: Path, out: Path, name: str, *sets: str) -> list[str]:
    base = [
        f"model.name={model}",
        f"data.dataset={data}",
        f"output-dir={out}",
        f"run-name={name}",
        "train.batch-size=8",
        "data.max-length=24",
        *sets,
    ]
    return [x for s in base for x in ("--set", s)]


def fedhf(*args: str, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedhf.cli", *args], capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO
    )


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the server process, then whatever it started (Ray), by process group."""
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    deadline = time.time() + 30
    while time.time() < deadline:
        left = [p for p in psutil.process_iter(["pid"]) if _pgid(p.info["pid"]) == proc.pid]
        if not left:
            return
        time.sleep(0.5)
    raise AssertionError(f"processes of the killed run are still alive: {left}")


def _actor_pids() -> set[int]:
    return {
        p.info["pid"]
        for p in psutil.process_iter(["pid", "cmdline"])
        if "ClientAppActor" in " ".join(p.info["cmdline"] or []) or "raylet" in " ".join(p.info["cmdline"] or [])
    }


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def test_a_killed_dp_run_resumes_without_losing_or_double_counting_privacy(tiny_model_dir, synthetic_dir, tmp_path):
    """SIGKILL the server mid-round 3 of a 4-round DP run (client 0 hangs in round 3, the others have replied),
    resume it: the same rounds, the same per-client epsilon as an uninterrupted run, an adapter that loads."""
    out = tmp_path / "out"
    dp = ("num-server-rounds=4", "privacy.mode=sample", "privacy.noise-multiplier=1.0", "strategy.name=fedadam")
    ref = fedhf("run", "-n", "3", *_args(tiny_model_dir, synthetic_dir, out, "straight", *dp), env=cli_env(tmp_path))
    assert ref.returncode == 0, ref.stderr[-3000:]
    straight = json.loads((out / "straight" / "run.json").read_text())

    run_dir = out / "cut"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedhf.cli", "run", "-n", "3", *_args(tiny_model_dir, synthetic_dir, out, "cut", *dp)],
        env=cli_env(tmp_path, FEDHF_TEST_FAULTS="0:3:hang"),
        cwd=REPO,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            pointer = run_dir / "checkpoint.json"
            if pointer.is_file() and json.loads(pointer.read_text())["round"] == 2:
                uid = json.loads((run_dir / "run.json").read_text())["run_uid"]
                replied = [
                    p
                    for p in (run_dir / "client-state").glob(f"*/replies/{uid}.json")
                    if json.loads(p.read_text()).get("round") == 3
                ]
                if len(replied) == 2:  # clients 1 and 2 have trained round 3 and sent their replies
                    break
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            time.sleep(0.5)
        else:
            raise AssertionError("the run never reached round 3")
    finally:
        _kill_group(proc)
    cut = json.loads((run_dir / "run.json").read_text())
    assert cut["status"] == "running"  # a killed server could not write anything else

    resumed = fedhf("run", "--resume", str(run_dir), env=cli_env(tmp_path))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stderr and "after round 2 of 4" in resumed.stderr
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "complete" and run["run_uid"] == cut["run_uid"]
    assert [r["round"] for r in run["rounds"]] == [0, 1, 2, 3, 4]  # none lost, none twice
    assert [(r["from_round"], r["interrupted_attempt"]["status"]) for r in run["resumes"]] == [(2, "running")]
    r3 = run["rounds"][3]
    assert sorted(c["partition_id"] for c in r3["clients"] if c.get("replayed")) == [1, 2]
    assert all(c["status"] == "trained" for r in run["rounds"][1:] for c in r["clients"])
    for pid, entry in straight["privacy"]["clients"].items():
        got = run["privacy"]["clients"][pid]
        assert got["epsilon"] == pytest.approx(entry["epsilon"], rel=1e-6), pid
        assert got["steps"] == entry["steps"] and "accountant_resets" not in got
        assert [r["round"] for r in got["rounds"]] == [1, 2, 3, 4]
    # each client's own saved spend agrees with the ledger (the killed attempt's round 3 counted once)
    stores = list((run_dir / "client-state").glob("data-*/spend.json"))
    assert len(stores) == 3
    for f in stores:
        entries = [e for e in json.loads(f.read_text())["entries"] if e["run_uid"] == run["run_uid"]]
        (pid,) = {e["partition_id"] for e in entries}
        assert sum(e["steps"] for e in entries) == run["privacy"]["clients"][str(pid)]["steps"]
        assert sorted(e["round"] for e in entries) == [1, 2, 3, 4]
    assert not list((run_dir / "client-state").rglob("*.safetensors"))  # individual updates: gone once complete
    pred = fedhf("predict", "--model", str(run_dir), "--text", "the film was great number 3", env=cli_env(tmp_path))
    assert pred.returncode == 0 and pred.stdout.split("\t")[0] in ("negative", "positive"), pred.stderr[-2000:]
    again = fedhf("run", "--resume", str(run_dir), env=cli_env(tmp_path))
    assert again.returncode == 2 and "already complete" in again.stderr


def test_failing_and_poisoned_clients_do_not_end_the_run(tiny_model_dir, synthetic_dir, tmp_path):
    """4 clients, int8 transport: in round 2 one client raises and one sends NaN, in round 3 one hangs past
    strategy.round-timeout; the run completes with the others, run.json says who failed, who was dropped and
    why, and no process is left behind."""
    out = tmp_path / "out"
    before = _actor_pids()
    proc = fedhf(
        "run",
        "-n",
        "4",
        *_args(
            tiny_model_dir,
            synthetic_dir,
            out,
            "faulty",
            "num-server-rounds=3",
            "transport.dtype=int8",
            "strategy.round-timeout=20",
        ),
        env=cli_env(tmp_path, FEDHF_TEST_FAULTS="1:2:raise,2:2:nan,3:3:hang"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _actor_pids() - before == set()  # the hung client's actor was stopped when the run ended
    run = json.loads((out / "faulty" / "run.json").read_text())
    assert run["status"] == "complete"
    r1, r2, r3 = run["rounds"][1:]
    assert len(r2["failures"]) == 1 and "injected fault" in r2["failures"][0]["reason"]
    assert [(r["partition_id"], "NaN" in r["reason"] or "non-finite" in r["reason"]) for r in r2["rejected"]] == [
        (2, True)
    ]
    assert sorted(c["partition_id"] for c in r2["clients"] if c["status"] == "trained") == [0, 3]
    assert r1["failures"] == [] and r1["rejected"] == []
    assert sorted(c["partition_id"] for c in r1["clients"] if c["status"] == "trained") == [0, 1, 2, 3]
    assert [f["reason"] for f in r3["failures"]] == ["no reply within strategy.round-timeout=20 s"]
    assert sorted(c["partition_id"] for c in r3["clients"] if c["status"] == "trained") == [0, 1, 2]
    trained = [c for c in r1["clients"] if c["status"] == "trained"]
    # int8 on the wire: a quarter of the fp32 adapter's bytes, plus the 128-byte header of each tensor
    m = run["model"]
    assert {c["bytes_up"] for c in trained} == {m["adapter_bytes"] // 4 + 128 * m["adapter_tensors"]}
    csv_rows = (out / "faulty" / "metrics.csv").read_text().splitlines()  # header, rounds 0, 1, 2, 3
    header = csv_rows[0].split(",")
    row2 = dict(zip(header, csv_rows[3].split(","), strict=True))
    assert (row2["clients_trained"], row2["clients_failed"], row2["clients_rejected"]) == ("2", "1", "1")
