#!/usr/bin/env python
"""GPU figures (issue 19), printed, for scripts/device_check.sh. Without a CUDA device: says so, exits 0.

1. The initial adapter (head and LoRA A, from the run's seed) built on CUDA equals the CPU one: nodes on
   different hardware start from the same adapter (FFA-LoRA's frozen A must agree everywhere).
2. One step of the default model (LoRA r 8, batch 32, sequence 64) through fedhf's own loop: plain fp32, plain
   bf16 autocast, and DP-SGD (Opacus hooks, fedhf.privacy.dp.private_train): median step time and peak CUDA memory.
3. The quickstart (3 clients, 3 rounds, SST-2) with train.device=cuda: wall time and central accuracy.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
LABELS = ["negative", "positive"]


def init_parity() -> float:
    """Max |difference| between every adapter tensor (trained ones and FFA-LoRA's frozen A) built on CPU and CUDA."""
    from fedhf.config.schema import parse_config
    from fedhf.tasks.model import build_model

    cfg = parse_config({"model.adapter": "ffa-lora"})

    def adapter(device: str) -> dict[str, torch.Tensor]:
        model = build_model(cfg, LABELS, device=device)
        return {n: p.detach().cpu() for n, p in model.named_parameters() if "lora_" in n or "modules_to_save" in n}

    cpu, gpu = adapter("cpu"), adapter("cuda")
    if set(cpu) != set(gpu):
        sys.exit("device check: the adapter built on CUDA has other tensors than the CPU one")
    return max(float((cpu[k] - gpu[k]).abs().max()) for k in cpu)


def step_figures(steps: int) -> dict:
    import datasets

    from fedhf.config.schema import parse_config
    from fedhf.privacy.dp import SampleAccount, private_train
    from fedhf.tasks.model import build_model, load_tokenizer
    from fedhf.tasks.text_classification import TextClassification, make_loader
    from fedhf.train.loop import train_local

    cfg = parse_config({})
    tok = load_tokenizer(cfg.model.name)
    n = 32 * steps
    ds = datasets.Dataset.from_dict(
        {
            "text": [f"the film number {i} was " + ("good and " * 20) for i in range(n)],
            "label": [i % 2 for i in range(n)],
        }
    )
    task = TextClassification()
    out = {}
    for variant in ("plain", "bf16", "hooks"):
        model = build_model(cfg, LABELS, device="cuda")
        loader = make_loader(ds, tok, 64, 32, shuffle=True, seed=0)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        if variant == "hooks":
            res = private_train(model, loader, SampleAccount("rdp", 1e-5, 1.0, 1.0), task=task, epochs=1, lr=1e-3).train
        else:
            res = train_local(
                model, loader, task=task, epochs=1, lr=1e-3, precision="bf16" if variant == "bf16" else "fp32"
            )
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        out[variant] = {
            "step_seconds": wall / max(res.steps, 1),
            "steps": res.steps,
            "tokens_per_second": res.tokens / wall,
            "peak_mib_above_model": (torch.cuda.max_memory_allocated() - base) / 2**20,
        }
    return out


def quickstart() -> dict:
    out = ROOT / "outputs" / "device-check"
    cmd = [sys.executable, "-m", "fedhf.cli", "run", "--num-clients", "3", "--set", "train.device=cuda",
           "--set", f"output-dir={out}", "--set", f"run-name=qs-cuda-{int(time.time())}"]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"device check: the quickstart on cuda failed:\n{proc.stderr[-3000:]}")
    run = json.loads((out / cmd[-1].split("=", 1)[1] / "run.json").read_text())
    rounds = run["rounds"]
    return {
        "wall_seconds": wall,
        "central_accuracy": run["final"]["eval_accuracy"],
        "round_seconds": [r.get("wall_seconds") for r in rounds[1:]],
        "console": proc.stdout.strip().splitlines()[-1],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--skip-quickstart", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        why = "this torch is a CPU-only build" if torch.version.cuda is None else "torch sees no CUDA device"
        print(f"device check: no GPU ({why}); nothing to measure here.")
        return
    print(f"device check on {torch.cuda.get_device_name(0)} (torch {torch.__version__}, CUDA {torch.version.cuda})")
    print(f"1. initial adapter, CUDA vs CPU: max |difference| {init_parity():.3g}")
    steps = step_figures(args.steps)
    for name, f in steps.items():
        print(
            f"2. step {name:5s}: {f['step_seconds'] * 1000:7.1f} ms/step ({f['steps']} steps), "
            f"{f['tokens_per_second']:,.0f} tokens/s, peak {f['peak_mib_above_model']:.0f} MiB above the model"
        )
    print(
        f"   DP (hooks) / plain: time {steps['hooks']['step_seconds'] / steps['plain']['step_seconds']:.2f}x, "
        f"peak memory {steps['hooks']['peak_mib_above_model'] / max(steps['plain']['peak_mib_above_model'], 1e-9):.2f}x"
    )
    if not args.skip_quickstart:
        q = quickstart()
        print(f"3. quickstart on cuda: {q['wall_seconds']:.0f} s, central accuracy {q['central_accuracy']:.3f}")
        print(f"   round seconds {q['round_seconds']}; {q['console']}")


if __name__ == "__main__":
    main()
