#!/usr/bin/env python
"""Figures for deployment and secure aggregation (issue 5). Prints, does not assert.

The same 2-client run (SST-2, 300 rows, 3 rounds, 1 local epoch, max length 48, no local
evaluation) four ways:

1. simulation (``fedhf run``), plain FedAvg;
2. simulation with SecAgg+;
3. Deployment Engine on 127.0.0.1 (``scripts/deploy/local_federation.sh``: SuperLink with TLS
   and node authentication, 2 SuperNodes), plain, started with ``flwr run . fedhf-local``;
4. the same deployment with SecAgg+.

Reported: round wall time (round 1, which includes start-up, and the mean of rounds 2-3),
the ratio deployment / simulation, SecAgg+ / plain, and the bytes each client uploads per
round (plain: its fp32 adapter; SecAgg+: its masked vector plus the protocol's keys and shares),
with the bytes the server sends.

Usage: python scripts/bench_deploy.py [--out DIR] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedhf.run.store import RunRecord, load_run

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "scripts" / "deploy"


def settings(rounds: int) -> dict[str, str]:
    return {
        "num-server-rounds": str(rounds),
        "data.max-train-examples": "300",
        "data.max-eval-examples": "400",
        "data.max-length": "48",
        "train.local-epochs": "1",
        "strategy.fraction-evaluate": "0.0",
        "strategy.secagg-max-weight": "200.0",
    }


def env() -> dict[str, str]:
    e = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    )
    e.setdefault("FEDHF_DATA_DIR", str((ROOT.parent / "shared" / "data").resolve()))
    return e


def wait_for(run_json: Path, timeout: float = 1200) -> RunRecord:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if run_json.is_file():
            run = load_run(run_json.parent)
            if run.status != "running":
                if run.status != "complete":
                    sys.exit(f"{run_json}: {run.status}: {run.error}")
                return run
        time.sleep(2)
    sys.exit(f"{run_json} did not finish")


def simulate(out: Path, name: str, rounds: int, secagg: bool) -> dict:
    sets = {
        **settings(rounds),
        "output-dir": str(out),
        "run-name": name,
        "strategy.secure-aggregation": str(secagg).lower(),
    }
    cmd = [sys.executable, "-m", "fedhf.cli", "run", "--num-clients", "2"]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    print(f"$ fedhf run --num-clients 2 ... secure-aggregation={secagg}", flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env())
    if proc.returncode:
        sys.exit(proc.stderr[-3000:])
    return wait_for(out / name / "run.json")


def deploy(fed: Path, out: Path, name: str, rounds: int, secagg: bool) -> dict:
    sets = {**settings(rounds), "strategy.secure-aggregation": str(secagg).lower()}
    run_config = " ".join(f"{k}={v}" for k, v in sets.items()) + f' output-dir="{out}" run-name="{name}"'
    print(f"$ flwr run . fedhf-local ... secure-aggregation={secagg}", flush=True)
    e = {**env(), "FLWR_HOME": str(fed / "flwr-home")}
    proc = subprocess.run(
        [
            str(Path(sys.executable).with_name("flwr")),
            "run",
            ".",
            "fedhf-local",
            "--stream",
            "--run-config",
            run_config,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=e,
    )
    if proc.returncode:
        sys.exit(proc.stdout[-3000:] + proc.stderr[-3000:])
    return wait_for(out / name / "run.json")


def summarize(run: RunRecord) -> dict:
    walls = [r.wall_seconds for r in run.trained_rounds]
    clients = [c for r in run.trained_rounds for c in r.clients]
    row = {
        "round1": walls[0],
        "steady": statistics.mean(walls[1:]) if len(walls) > 1 else walls[0],
        "up_per_client": statistics.mean(c["bytes_up"] for c in clients),
        "down_per_client": run.rounds[1].bytes_down,
    }
    sa = run.secure_aggregation
    if sa:
        rounds = sa["rounds"]
        n = rounds[0]["sampled"]
        row["protocol_up_per_client"] = statistics.mean(r["bytes_up"] for r in rounds) / n
        row["protocol_down_per_client"] = statistics.mean(r["bytes_down"] for r in rounds) / n
        row["protocol_seconds"] = statistics.mean(r["seconds"] for r in rounds[1:] or rounds)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    base = args.out or Path(tempfile.mkdtemp(prefix="fedhf-bench-deploy-"))
    out, fed = base / "runs", base / "federation"
    results = {}
    results["sim"] = summarize(simulate(out, "sim", args.rounds, False))
    results["sim+secagg"] = summarize(simulate(out, "sim-secagg", args.rounds, True))
    start = subprocess.run(
        [str(DEPLOY / "local_federation.sh"), "start", "--nodes", "2", "--dir", str(fed)],
        capture_output=True,
        text=True,
        env=env(),
    )
    if start.returncode:
        sys.exit(start.stderr[-3000:])
    try:
        results["deploy"] = summarize(deploy(fed, out, "deploy", args.rounds, False))
        results["deploy+secagg"] = summarize(deploy(fed, out, "deploy-secagg", args.rounds, True))
    finally:
        subprocess.run([str(DEPLOY / "local_federation.sh"), "stop", "--dir", str(fed)], capture_output=True, env=env())

    print(f"\n2 clients, {args.rounds} rounds, SST-2 300 rows, 1 local epoch; {os.cpu_count()} CPU cores\n")
    print(f"{'setting':<15} {'round 1 s':>10} {'rounds 2+ s':>12} {'up/client B':>13} {'down/client B':>14}")
    for k, r in results.items():
        up = r.get("protocol_up_per_client", r["up_per_client"])
        down = r.get("protocol_down_per_client", r["down_per_client"])
        print(f"{k:<15} {r['round1']:>10.1f} {r['steady']:>12.1f} {up:>13,.0f} {down:>14,.0f}")
    s, d = results["sim"], results["deploy"]
    print(
        f"\ndeployment / simulation, steady round: {d['steady'] / s['steady']:.2f}x "
        f"(round 1: {d['round1'] / s['round1']:.2f}x)"
    )
    for kind in ("sim", "deploy"):
        p, q = results[kind], results[f"{kind}+secagg"]
        print(
            f"SecAgg+ / plain ({kind}): round time {q['steady'] / p['steady']:.2f}x, "
            f"bytes up per client {q['protocol_up_per_client'] / p['up_per_client']:.2f}x "
            f"(masked vector alone {q['up_per_client'] / p['up_per_client']:.2f}x), "
            f"bytes down per client {q['protocol_down_per_client'] / p['down_per_client']:.2f}x, "
            f"protocol {q['protocol_seconds']:.1f} s of the round"
        )
    print(f"\nruns under {base}")


if __name__ == "__main__":
    main()
