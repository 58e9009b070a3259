#!/usr/bin/env python
"""Figures for differential privacy (issue 3). Prints, does not assert.

1. DP-SGD step time / non-DP step time for the default model (LoRA r=8, batch 32, sequence 64),
   and the peak-memory ratio (training memory above the loaded model, measured as peak RSS in a
   fresh process per variant), for Opacus' hooks, functorch and ghost modes.
2. SST-2, 5 IID clients: final central accuracy and epsilon for sigma in {0.6, 1.0} and for
   target epsilon 8, next to the non-DP run (same data, rounds and seed).

Usage: python scripts/bench_dp.py [--out DIR] [--skip-accuracy] [--skip-steps] [--steps N]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from fedhf.run.store import RunRecord, load_run

ROOT = Path(__file__).resolve().parent.parent

STEP_CODE = r"""
import json, resource, statistics, sys, time, torch
from fedhf.config.schema import parse_config
from fedhf.tasks.model import build_model, load_tokenizer
from fedhf.privacy.dp import check_opacus_compatible
mode, steps, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(threads)
cfg = parse_config({})
model = build_model(cfg, ["negative", "positive"])
tok = load_tokenizer(cfg.model.name)
texts = [f"the film number {i} was " + ("good and " * 20) for i in range(32)]
enc = tok(texts, truncation=True, max_length=64, padding="max_length", return_tensors="pt")
labels = torch.tensor([i % 2 for i in range(32)])
params = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=1e-3)
criterion = torch.nn.CrossEntropyLoss()
model.train()
if mode != "plain":
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer
    check_opacus_compatible(model)
    if mode == "ghost":
        from opacus.grad_sample import GradSampleModuleFastGradientClipping
        from opacus.optimizers import DPOptimizerFastGradientClipping
        from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
        model = GradSampleModuleFastGradientClipping(model, max_grad_norm=1.0, use_ghost_clipping=True)
        opt = DPOptimizerFastGradientClipping(opt, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=32)
        criterion = DPLossFastGradientClipping(model, opt, criterion)
    else:
        model = GradSampleModule(model, force_functorch=(mode == "functorch"))
        opt = DPOptimizer(opt, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=32)
base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
times = []
for i in range(steps + 3):
    t = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss = criterion(model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits, labels)
    loss.backward()
    opt.step()
    if i >= 3:
        times.append(time.perf_counter() - t)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"mode": mode, "step_seconds": statistics.median(times), "mean_step_seconds": statistics.mean(times),
                  "base_rss_kb": base_rss, "peak_rss_kb": peak}))
"""


def step_figures(steps: int, threads: int) -> dict:
    out = {}
    for mode in ("plain", "hooks", "functorch", "ghost", "plain"):
        proc = subprocess.run(
            [sys.executable, "-c", STEP_CODE, mode, str(steps), str(threads)], capture_output=True, text=True, cwd=ROOT
        )
        if proc.returncode != 0:
            out[mode] = {"error": proc.stderr.strip().splitlines()[-1]}
            continue
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        # plain runs twice (first and last) to show the machine's drift; keep the faster
        if mode in out and out[mode].get("step_seconds", 1e9) < res["step_seconds"]:
            continue
        out[mode] = res
    plain = out["plain"]
    print(
        f"\n[1] step time, default model, LoRA r=8, batch 32, sequence 64, {threads} threads (median of {steps} steps):"
    )
    print(
        f"    no DP: {plain['step_seconds'] * 1000:.0f} ms, peak training memory "
        f"{(plain['peak_rss_kb'] - plain['base_rss_kb']) / 1024:.0f} MB above the loaded model"
    )
    for mode in ("hooks", "functorch", "ghost"):
        r = out.get(mode, {})
        if "error" in r or not r:
            print(f"    {mode}: failed: {r.get('error')}")
            continue
        mem = (r["peak_rss_kb"] - r["base_rss_kb"]) / max(plain["peak_rss_kb"] - plain["base_rss_kb"], 1)
        r["time_ratio"] = r["step_seconds"] / plain["step_seconds"]
        r["memory_ratio"] = mem
        print(
            f"    DP {mode}: {r['step_seconds'] * 1000:.0f} ms = {r['time_ratio']:.2f}x time; "
            f"training memory {mem:.2f}x (targets <= 1.10x time, <= 1.2x memory)"
        )
    return out


def run_fedhf(out: Path, name: str, extra: list[str]) -> tuple[RunRecord, float | None]:
    cmd = [
        sys.executable,
        "-m",
        "fedhf.cli",
        "run",
        "--num-clients",
        "5",
        "--set",
        "data.max-train-examples=2000",
        "--set",
        f"output-dir={out}",
        "--set",
        f"run-name={name}",
        "--set",
        "strategy.fraction-evaluate=0",
        *extra,
    ]
    run_json = out / name / "run.json"
    if run_json.is_file() and load_run(run_json.parent).status == "complete":
        return load_run(run_json.parent), None  # finished earlier: reuse
    print(f"$ {' '.join(cmd[2:])}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"run {name} failed:\n{proc.stderr[-3000:]}")
    return load_run(run_json.parent), time.perf_counter() - t0


def accuracy_figures(out: Path) -> list[dict]:
    settings = [
        ("no DP", "nodp", []),
        ("sigma 0.6", "sigma06", ["--set", "privacy.mode=sample", "--set", "privacy.noise-multiplier=0.6"]),
        ("sigma 1.0", "sigma10", ["--set", "privacy.mode=sample", "--set", "privacy.noise-multiplier=1.0"]),
        ("target epsilon 8", "eps8", ["--set", "privacy.mode=sample", "--set", "privacy.target-epsilon=8"]),
    ]
    rows = []
    for label, name, extra in settings:
        run, wall = run_fedhf(out, name, extra)
        clients = run.privacy.clients if run.privacy else {}
        eps = [e["epsilon"] for e in clients.values()]
        sig = sorted({round(e["noise_multiplier"], 4) for e in clients.values()})
        delta = max((e["delta"] for e in clients.values()), default=None)
        rows.append(
            {
                "setting": label,
                "accuracy": run.final.eval_accuracy,
                "f1": run.final.eval_f1,
                "epsilon_max": max(eps) if eps else None,
                "sigma": sig,
                "delta_max": delta,
                "wall_seconds": wall,
            }
        )
    print("\n[2] SST-2, 5 IID clients x 360 training rows, 3 rounds x 2 local epochs, batch 16, C = 1, seed 42:")
    print(
        f"    {'setting':<18} {'accuracy':>8} {'macro-F1':>8} {'epsilon (max over clients)':>27} "
        f"{'sigma':>14} {'delta':>9}"
    )
    for r in rows:
        eps = "-" if r["epsilon_max"] is None else f"{r['epsilon_max']:.2f}"
        sig = "-" if not r["sigma"] else ",".join(f"{s:g}" for s in r["sigma"])
        d = "-" if r["delta_max"] is None else f"{r['delta_max']:.2e}"
        print(f"    {r['setting']:<18} {r['accuracy']:>8.4f} {r['f1']:>8.4f} {eps:>27} {sig:>14} {d:>9}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench-dp")
    ap.add_argument("--skip-accuracy", action="store_true")
    ap.add_argument("--skip-steps", action="store_true")
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    figures: dict = {"machine": f"{os.cpu_count()} CPU cores"}
    if not args.skip_steps:
        figures["steps"] = step_figures(args.steps, args.threads)
    if not args.skip_accuracy:
        figures["accuracy"] = accuracy_figures(args.out)
    (args.out / "figures.json").write_text(json.dumps(figures, indent=2) + "\n")
    print(f"\nfigures written to {args.out / 'figures.json'}")


if __name__ == "__main__":
    main()
