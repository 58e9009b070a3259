#!/usr/bin/env python
"""Figures for generative fine-tuning (issue 18) on tiny causal LMs built here. Prints, does not assert.

For a tiny Llama and a tiny GPT-2 (hidden 128, 4 layers, a 2,000-token BPE vocabulary trained on SST-2 sentences;
random weights: no pretrained causal LM is reachable offline), LoRA r 8 on attention, batch 16, sequence 64, the
response-only causal loss of fedhf.tasks.causal_lm: step time, tokens per second (non-padding tokens / step time)
and peak training memory (peak RSS above the loaded model), without DP and with Opacus' DP-SGD (hooks mode, the
default of privacy.grad-sample-mode), each variant in a fresh process, median of --steps steps. These say how the
code behaves on a CPU; a real checkpoint (SmolLM2-135M has ~40x the weights of these) was not measured.

Usage: python scripts/bench_causal_lm.py [--steps N] [--threads T] [--out FILE]   (a minute or two on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

STEP_CODE = r"""
import json, os, resource, statistics, sys, tempfile, time, torch
from peft import LoraConfig, get_peft_model
from transformers import AutoTokenizer
from fedhf.tasks import causal_lm as C
from fedhf.tasks.tiny_lm import write_tiny_causal_lm
family, mode, steps, threads, data = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
torch.set_num_threads(threads)
texts = [line.split("\t")[0] for line in open(data, encoding="utf-8").read().splitlines()[1:3001]]
folder = write_tiny_causal_lm(tempfile.mkdtemp(), texts, family=family, vocab_size=2000, hidden=128, layers=4)
tok = AutoTokenizer.from_pretrained(folder)
task = C.CausalLM()
torch.manual_seed(0)
model = get_peft_model(task.load_base(str(folder)), LoraConfig(task_type=task.peft_task_type, r=8, lora_alpha=16,
                       target_modules=C.lora_targets(family), **C.lora_options(family)))
records = [{"instruction": "Continue the review.", "input": t[:40], "output": t[40:] or t} for t in texts[:64]]
rows = C.tokenize([C.to_example(r, "instruction", tok) for r in records], tok, 64)
batch = C.collate(rows[:16], C.pad_id(tok))
inputs, target = task.split(batch)
tokens = int(inputs["attention_mask"].sum())
params = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.SGD(params, lr=0.1)
model.train()
if mode == "hooks":
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer
    model = GradSampleModule(model)
    opt = DPOptimizer(opt, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=16)
base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
times = []
for i in range(steps + 3):
    t = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss = C.causal_loss(model(**inputs).logits, target)
    loss.backward()
    opt.step()
    if i >= 3:
        times.append(time.perf_counter() - t)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
n_params = sum(p.numel() for p in model.parameters())
print(json.dumps({"family": family, "mode": mode, "step_seconds": statistics.median(times), "tokens": tokens,
                  "base_rss_kb": base_rss, "peak_rss_kb": peak, "params": n_params,
                  "trainable": sum(p.numel() for p in params)}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench-causal-lm.json")
    args = ap.parse_args()
    data = Path(os.environ.get("FEDHF_DATA_DIR", ROOT.parent / "shared" / "data")) / "sst2" / "train.tsv"
    if not data.is_file():
        sys.exit(f"no SST-2 training file at {data}; set FEDHF_DATA_DIR to the folder with sst2/train.tsv")
    figures: dict = {"machine": f"{os.cpu_count()} CPU cores, {args.threads} threads", "runs": []}
    print(
        f"tiny causal LMs, LoRA r 8 on attention, batch 16, sequence <= 64, {args.threads} threads, "
        f"median of {args.steps} steps:"
    )
    for family in ("llama", "gpt2"):
        res = {}
        for mode in ("plain", "hooks"):
            proc = subprocess.run(
                [sys.executable, "-c", STEP_CODE, family, mode, str(args.steps), str(args.threads), str(data)],
                capture_output=True,
                text=True,
                cwd=ROOT,
            )
            if proc.returncode != 0:
                sys.exit(f"{family} {mode} failed:\n{proc.stderr[-2000:]}")
            res[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
            figures["runs"].append(res[mode])
        plain, dp = res["plain"], res["hooks"]
        mem = [(r["peak_rss_kb"] - r["base_rss_kb"]) / 1024 for r in (plain, dp)]
        print(
            f"  {family}: {plain['params'] / 1e6:.2f} M weights, {plain['trainable']:,} trainable, "
            f"{plain['tokens']} tokens a batch\n"
            f"    no DP: {plain['step_seconds'] * 1000:.0f} ms a step, "
            f"{plain['tokens'] / plain['step_seconds']:,.0f} tokens/s, peak training memory {mem[0]:.0f} MB\n"
            f"    DP-SGD (hooks): {dp['step_seconds'] * 1000:.0f} ms a step = "
            f"{dp['step_seconds'] / plain['step_seconds']:.2f}x, {dp['tokens'] / dp['step_seconds']:,.0f} tokens/s, "
            f"peak training memory {mem[1]:.0f} MB = {mem[1] / max(mem[0], 1):.2f}x"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"figures written to {args.out}")


if __name__ == "__main__":
    main()
