#!/usr/bin/env python
"""fedhf's performance figures, measured in one run of this script. Prints ratios; asserts nothing.

1. DP-SGD step time / non-DP step time (default model, LoRA r 8, batch 32, sequence 64,
   Opacus hooks; median of --steps steps, each variant in a fresh process).
2. Round time outside client training / client training: steady-state rounds of a 3-client run with
   the clients one at a time (--cpus-per-client 2): round wall time minus the clients' train seconds,
   against the train seconds; split into local evaluation, central evaluation and the rest. The target
   (<= 5%) is judged on the rest, the framework's own time: what the round costs beyond the training and
   the evaluation the run asks for (the quickstart evaluates 872 central rows after every round; how
   often is the run's to choose, strategy.central-eval-every and strategy.fraction-evaluate). The share
   with evaluation is printed beside it, and the central evaluation's rate against the layer-shape
   matmul at its own tokens per batch. Ray's start-up is reported apart.
3. Achieved training FLOP/s (4 x non-embedding params x non-padding tokens / train seconds) against
   torch's fp32 matmul at the model's own linear-layer shapes and the run's tokens per batch (forward and
   input gradient), and beside it the 1024^3 peak; same thread count, same run. This machine's speed drifts
   within minutes, so the target is judged on a second measure that the drift falls on alike: client 0's
   training loop (fedhf.train.loop.train_local on its own rows and model) and that matmul, one after the
   other, 7 times in one process; the median of the 7 ratios.
4. Bytes sent up per client per round with transport.dtype fp32, fp16 and int8, against the full
   model, and the final accuracy of each (the same run, seed and data).
5. Peak memory (PSS of the whole process tree: the server, Ray and its actors, sampled every
   0.5 s) of a 10-client and a 100-client simulation with 10 clients per round.
6. fedhf's default job (`fedhf run --num-clients 3`, the quickstart) against the same job written the
   plain way (scripts/bench_baselines.py): a minimal Flower + transformers app in the style of Flower's
   quickstart-huggingface example, and one centralized PEFT training loop over the same rows; wall
   time of each process and its final central accuracy, fedhf's time as a ratio to each.

Usage: python scripts/benchmark.py [--out DIR] [--steps N] [--only 1,2,...]
(inside the venv, FEDHF_DATA_DIR set; 12 to 25 minutes on 2 cores). Runs that finished in
--out earlier are reused.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

from fedhf.run.store import RunRecord, load_run

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from bench_dp import STEP_CODE  # noqa: E402  (the step-time harness of scripts/bench_dp.py)
from bench_round import (  # noqa: E402
    interleaved_eval_rate,
    interleaved_train_rate,
    layer_matmul_flops,
    matmul_flops,
    non_embedding_params,
    ray_startup_seconds,
)

QUICK = ["--set", "data.max-train-examples=1200", "--set", "num-server-rounds=3"]


class TreeMemory:
    """Peak proportional set size (PSS) of a process and all its descendants, sampled in a thread."""

    def __init__(self, pid: int, every: float = 0.5) -> None:
        self.root = psutil.Process(pid)
        self.every = every
        self.peak = 0
        self.peak_procs = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            total, n = 0, 0
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            for p in procs:
                try:
                    total += p.memory_full_info().pss
                    n += 1
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
            if total > self.peak:
                self.peak, self.peak_procs = total, n
            self._stop.wait(self.every)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def fedhf_run(
    out: Path, name: str, clients: int, args: list[str], measure: bool = False
) -> tuple[RunRecord, float, int]:
    run_json = out / name / "run.json"
    if run_json.is_file() and load_run(run_json.parent).status == "complete" and not measure:
        return load_run(run_json.parent), float("nan"), 0
    if (out / name).exists():
        import shutil

        shutil.rmtree(out / name)
    cmd = [
        sys.executable,
        "-m",
        "fedhf.cli",
        "run",
        "--num-clients",
        str(clients),
        "--set",
        f"output-dir={out}",
        "--set",
        f"run-name={name}",
        *args,
    ]
    print(f"$ fedhf run --num-clients {clients} {' '.join(args)}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    mem = TreeMemory(proc.pid) if measure else None
    _, err = proc.communicate()
    wall = time.perf_counter() - t0
    peak = mem.stop() if mem else 0
    if proc.returncode != 0:
        sys.exit(f"run {name} failed:\n{err[-4000:]}")
    return load_run(run_json.parent), wall, peak


def step_time(mode: str, steps: int, threads: int) -> float:
    proc = subprocess.run(
        [sys.executable, "-c", STEP_CODE, mode, str(steps), str(threads)], capture_output=True, text=True, cwd=ROOT
    )
    if proc.returncode != 0:
        sys.exit(f"step timing ({mode}) failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["step_seconds"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "benchmark")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--only", default="1,2,3,4,5,6", help="comma list of the figures to measure")
    args = ap.parse_args()
    import transformers

    # The in-process measures build the model from the base checkpoint: no load report or progress bar.
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    only = {int(x) for x in args.only.split(",")}
    args.out.mkdir(parents=True, exist_ok=True)
    figures_path = args.out / "figures.json"
    figures = json.loads(figures_path.read_text()) if figures_path.is_file() else {}
    figures["machine"] = f"{os.cpu_count()} CPU cores, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM"
    lines = []

    if 1 in only:  # plain, hooks, plain: the two plain runs show the machine's drift, keep the faster
        plain = min(step_time("plain", args.steps, 2), step_time("plain", args.steps, 2))
        hooks = step_time("hooks", args.steps, 2)
        figures["dp_step"] = {"plain_seconds": plain, "hooks_seconds": hooks, "ratio": hooks / plain}

    if only & {2, 3, 4}:
        seq = ["--cpus-per-client", "2", "--set", "train.num-threads=2", *QUICK]
        runs = {}
        for dtype in ("fp32", "fp16", "int8"):
            runs[dtype], _, _ = fedhf_run(
                args.out, f"transport-{dtype}", 3, [*seq, "--set", f"transport.dtype={dtype}"]
            )
        run = runs["fp32"]
        if 2 in only:
            rows = []
            for r in run.trained_rounds:
                train = sum(r.client_train_seconds.values())
                local = sum(r.client_eval_seconds)
                rows.append((train, local, r.central_eval_seconds or 0.0, r.wall_seconds))  # None: not evaluated
            steady = rows[1:] or rows
            figures["round_overhead"] = {
                "framework_ratio": statistics.mean((w - t - le - ce) / t for t, le, ce, w in steady),
                "outside_training_ratio": statistics.mean((w - t) / t for t, _, _, w in steady),
                "outside_training_seconds": statistics.mean(w - t for t, _, _, w in steady),
                "local_eval_seconds": statistics.mean(le for _, le, _, _ in steady),
                "central_eval_seconds": statistics.mean(ce for _, _, ce, _ in steady),
                "train_seconds": statistics.mean(t for t, _, _, _ in steady),
                "first_round_excess_seconds": rows[0][3] - rows[0][0],
                "ray_init_seconds": ray_startup_seconds(),
                "central_eval_rate": interleaved_eval_rate(run, 2),
            }
        if 3 in only:
            clients = [c for r in run.trained_rounds for c in r.clients]
            tokens = sum(c["train_tokens"] for c in clients)
            seconds = sum(c["train_seconds"] for c in clients)
            steps = sum(c["train_steps"] for c in clients)
            n_ne = non_embedding_params(run)
            achieved = 4 * n_ne * tokens / seconds
            peak = matmul_flops(2)
            per_batch = round(tokens / max(steps, 1))
            shaped = layer_matmul_flops(run, per_batch, 2)
            figures["flops"] = {
                "achieved": achieved,
                "matmul_peak": peak,
                "ratio": achieved / peak,
                "layer_matmul": shaped,
                "layer_ratio": achieved / shaped,
                "tokens_per_batch": per_batch,
                "threads": 2,
                "non_embedding_params": n_ne,
                "interleaved": interleaved_train_rate(run, 2),
            }
        if 4 in only:
            full = run.model.model_bytes
            figures["transport"] = {
                d: {
                    "bytes_up": r.rounds[-1].bytes_up,
                    "ratio_to_model": r.rounds[-1].bytes_up / full,
                    "final_accuracy": r.final.eval_accuracy,
                    "final_f1": r.final.eval_f1,
                }
                for d, r in runs.items()
            }
            figures["transport"]["model_bytes"] = full

    if 5 in only:
        mem = {}
        scale = [
            "--set",
            "data.max-train-examples=2000",
            "--set",
            "num-server-rounds=2",
            "--set",
            "train.local-epochs=1",
            "--set",
            "strategy.fraction-evaluate=0",
        ]
        for n, frac in ((10, "1.0"), (100, "0.1")):
            run, wall, peak = fedhf_run(
                args.out, f"scale-{n}", n, [*scale, "--set", f"strategy.fraction-train={frac}"], measure=True
            )
            mem[n] = {
                "peak_pss_bytes": peak,
                "wall_seconds": wall,
                "clients_per_round": run.rounds[1].clients_sampled,
                "final_accuracy": run.final.eval_accuracy,
            }
        figures["memory"] = mem

    if 6 in only:
        base = {}
        for which in ("flower", "central"):
            print(f"$ python scripts/bench_baselines.py {which}", flush=True)
            t0 = time.perf_counter()
            proc = subprocess.run(
                [sys.executable, str(ROOT / "scripts" / "bench_baselines.py"), which],
                cwd=ROOT,
                capture_output=True,
                text=True,
            )
            if proc.returncode != 0:
                sys.exit(f"baseline {which} failed:\n{proc.stderr[-4000:]}")
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            base[which] = {"wall_seconds": time.perf_counter() - t0, "final_accuracy": result["final_accuracy"]}
        run, wall, _ = fedhf_run(args.out, "quickstart", 3, [], measure=True)
        base["fedhf"] = {"wall_seconds": wall, "final_accuracy": run.final.eval_accuracy}
        figures["baselines"] = base

    figures_path.write_text(json.dumps(figures, indent=2) + "\n")
    f = figures
    if "dp_step" in f:
        d = f["dp_step"]
        lines.append(
            f"[1] DP-SGD step (Opacus hooks) / non-DP step: {d['hooks_seconds'] * 1000:.0f} / "
            f"{d['plain_seconds'] * 1000:.0f} ms = {d['ratio']:.2f}x (target <= 1.10x)"
        )
    if "round_overhead" in f and "framework_ratio" in f["round_overhead"]:
        o = f["round_overhead"]
        rest = o["outside_training_seconds"] - o["local_eval_seconds"] - o["central_eval_seconds"]
        lines.append(
            f"[2] round time outside client training and evaluation, steady state: {100 * o['framework_ratio']:.1f}% "
            f"of the training ({rest:.2f} s per round against {o['train_seconds']:.1f} s; target <= 5%)"
        )
        lines.append(
            f"[2] with the run's evaluation (local, and central after every round): "
            f"{100 * o['outside_training_ratio']:.1f}% (with evaluation counted, the <= 5% target is "
            f"{'met' if o['outside_training_ratio'] <= 0.05 else 'not met'}) "
            f"({o['outside_training_seconds']:.2f} s: local evaluation {o['local_eval_seconds']:.2f} s, central "
            f"evaluation {o['central_eval_seconds']:.2f} s, the rest {rest:.2f} s); one-time: ray.init "
            f"{o['ray_init_seconds']:.1f} s, round 1 {o['first_round_excess_seconds']:.1f} s outside training"
        )
        if "central_eval_rate" in o:
            e = o["central_eval_rate"]
            lines.append(
                f"[2] central evaluation {e['achieved'] / 1e9:.1f} GFLOP/s (2 x non-embedding params x "
                f"{e['tokens']:,} tokens per pass) vs torch matmul at the layer shapes and its {e['tokens_per_batch']} "
                f"tokens per batch {e['layer_matmul'] / 1e9:.1f} GFLOP/s: {100 * e['ratio']:.1f}%"
            )
    if "flops" in f:
        x = f["flops"]
        lines.append(
            f"[3] training in the run {x['achieved'] / 1e9:.1f} GFLOP/s vs torch matmul at the model's layer shapes "
            f"and {x.get('tokens_per_batch', '?')} tokens per batch, best of 9 blocks after the run, "
            f"{x.get('layer_matmul', float('nan')) / 1e9:.1f} GFLOP/s: "
            f"{100 * x.get('layer_ratio', float('nan')):.1f}%; "
            f"large-matrix (1024^3) peak {x['matmul_peak'] / 1e9:.1f} GFLOP/s: {100 * x['ratio']:.1f}% "
            f"({x['threads']} threads)"
        )
        if "interleaved" in x:
            i = x["interleaved"]
            lines.append(
                f"[3] the same loop and the same matmul, one after the other {i['blocks']} times in one process "
                f"(client 0's epochs): {100 * i['ratio']:.1f}% median "
                f"({100 * i['ratio_min']:.1f}-{100 * i['ratio_max']:.1f}%; "
                f"{i['train'] / 1e9:.1f} vs {i['matmul'] / 1e9:.1f} GFLOP/s) (target >= 40%)"
            )
    if "transport" in f:
        t = f["transport"]
        for d in ("fp32", "fp16", "int8"):
            lines.append(
                f"[4] transport {d}: {t[d]['bytes_up']:,} B up per client per round = "
                f"{100 * t[d]['ratio_to_model']:.3f}% of the full model ({t['model_bytes']:,} B); final accuracy "
                f"{t[d]['final_accuracy']:.4f}" + (" (target <= 0.1%)" if d == "int8" else "")
            )
    if "memory" in f:
        for n, m in sorted(f["memory"].items(), key=lambda kv: int(kv[0])):
            lines.append(
                f"[5] {n} clients ({m['clients_per_round']} per round): peak memory {m['peak_pss_bytes'] / 1e9:.2f} GB "
                f"(PSS of all processes), {m['wall_seconds']:.0f} s" + (" (target <= 8 GB)" if int(n) == 100 else "")
            )
    if "baselines" in f:
        b = f["baselines"]
        fed = b["fedhf"]["wall_seconds"]
        for which, label in (("flower", "minimal Flower + transformers app"), ("central", "centralized PEFT loop")):
            lines.append(
                f"[6] the quickstart job: fedhf {fed:.0f} s (accuracy {b['fedhf']['final_accuracy']:.4f}) vs {label} "
                f"{b[which]['wall_seconds']:.0f} s (accuracy {b[which]['final_accuracy']:.4f}): "
                f"{fed / b[which]['wall_seconds']:.2f}x its time (target <= 1.00x)"
            )
    print(f"\nfedhf benchmark on {f['machine']}:")
    print("\n".join(lines))
    print(f"figures: {figures_path}")


if __name__ == "__main__":
    main()
