"""Scan DP-SGD recipes for federated LoRA fine-tuning, fast, without Flower.

Runs FedAvg in this one process (clients one after another, equal-size IID partitions made by
fedhf's own partitioner, each client's DP-SGD by fedhf's ``private_train`` with its own
accountant over all rounds) and prints central accuracy after every round. It uses the same
code paths as ``fedhf run`` for data, model, DP-SGD and accounting; what it leaves out is the
Flower transport, so a recipe found here can then be written as an experiment file.

    python scripts/dp_recipe_scan.py --clients 10 --rows 2000 --batch 256 --lr 0.01 --rounds 3 --target-epsilon 8
    python scripts/dp_recipe_scan.py ... --no-dp          # the same recipe without DP
    python scripts/dp_recipe_scan.py ... --seeds 0,1,42 --repeats 2   # judge a recipe by its mean over runs

DP noise is fresh randomness in every run (never seeded), so one run of a recipe is one draw: at the
quickstart's size two runs of the same recipe and seed differ by up to 3 points. Compare recipes by the
SUMMARY line's mean over seeds and repeats.

Prints one line per round and a ``RESULT`` line per run (for grep), then a ``SUMMARY`` line over the runs.
"""

from __future__ import annotations

import argparse
import time

import torch

from fedhf.config.schema import parse_config
from fedhf.data.load import load_data
from fedhf.data.partitions import central_eval_set, make_partitions
from fedhf.federation.client import round_seed
from fedhf.privacy.dp import SampleAccount, default_delta, plan_noise_multiplier, private_train, sampling
from fedhf.tasks.model import build_model, get_adapter_state, load_tokenizer, set_adapter_state
from fedhf.tasks.text_classification import TextClassification, evaluate, make_loader
from fedhf.train.loop import LR_SCHEDULES, round_lr, train_local

TASK = TextClassification()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument(
        "--rows",
        type=int,
        default=1000,
        help="rows per client (10%% of them are held out for local evaluation, as in fedhf run)",
    )
    ap.add_argument(
        "--batch",
        type=int,
        default=256,
        help="expected batch size (Poisson sampling q = 1 / ceil(rows / batch), as fedhf run sets it)",
    )
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument(
        "--lr-schedule", default="constant", choices=LR_SCHEDULES, help="train.lr-schedule (decay across rounds)"
    )
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=1, help="local epochs per round")
    ap.add_argument("--clip", type=float, default=1.0, help="per-example clipping norm C")
    ap.add_argument("--target-epsilon", type=float, default=8.0)
    ap.add_argument("--accountant", default="rdp", choices=["rdp", "prv"])
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--target-modules", default="query,value", help="model.lora.target-modules, e.g. pooler.dense")
    ap.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"], help="train.optimizer")
    ap.add_argument("--momentum", type=float, default=0.0, help="train.momentum (sgd)")
    ap.add_argument("--pooling", default="cls", choices=["cls", "mean"], help="model.pooling")
    ap.add_argument("--adapter", default="lora", choices=["lora", "ffa-lora", "head"], help="model.adapter")
    ap.add_argument("--max-length", type=int, default=48)
    ap.add_argument("--max-eval", type=int, default=872)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-dp", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", default="", help="comma list of seeds (overrides --seed); a summary line at the end")
    ap.add_argument(
        "--repeats", type=int, default=1, help="runs per seed (DP noise is fresh each run, so repeats differ)"
    )
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    seeds = [int(x) for x in a.seeds.split(",")] if a.seeds else [a.seed]
    finals = [run(a, seed) for seed in seeds for _ in range(a.repeats)]
    if len(finals) > 1:
        mean = sum(finals) / len(finals)
        sd = (sum((f - mean) ** 2 for f in finals) / (len(finals) - 1)) ** 0.5
        print(
            f"SUMMARY seeds={','.join(map(str, seeds))} repeats={a.repeats} runs={len(finals)} "
            f"mean={mean:.4f} sd={sd:.4f} min={min(finals):.4f} max={max(finals):.4f} "
            f"finals={','.join(f'{f:.4f}' for f in finals)}",
            flush=True,
        )


def run(a: argparse.Namespace, seed: int) -> float:
    """One federated run of the recipe at ``seed``; its final central accuracy."""

    cfg = parse_config(
        {
            "seed": seed,
            "num-server-rounds": a.rounds,
            "data.max-train-examples": a.clients * a.rows,
            "data.max-length": a.max_length,
            "data.max-eval-examples": a.max_eval,
            "train.batch-size": a.batch,
            "train.lr": a.lr,
            "train.local-epochs": a.epochs,
            "model.lora.r": a.lora_r,
            "model.lora.target-modules": a.target_modules,
            "model.lora.alpha": 2 * a.lora_r,
            "model.pooling": a.pooling,
            "model.adapter": a.adapter,
            "privacy.max-grad-norm": a.clip,
            "privacy.accountant": a.accountant,
        }
    )
    data = load_data(cfg.data)
    parts = make_partitions(data, cfg.data, cfg.seed, a.clients)
    names = parts.label_names
    tok = load_tokenizer(cfg.model.name)
    model = build_model(cfg, names)
    global_state = get_adapter_state(model)
    eval_loader = make_loader(
        central_eval_set(data, cfg.data, cfg.seed), tok, cfg.data.max_length, 64, shuffle=False, sort_by_length=True
    )

    accounts: list[SampleAccount] = []
    n = min(len(train) for train, _ in parts.parts)  # each client's training rows (a local-eval share is held out)
    q, steps = sampling(n, a.batch, a.epochs)
    sigma = 0.0
    if not a.no_dp:
        delta = default_delta(n)
        sigma = plan_noise_multiplier(a.target_epsilon, delta, q, steps * a.rounds, a.accountant)
        accounts = [SampleAccount(a.accountant, delta, sigma, a.clip) for _ in range(a.clients)]
    print(
        f"clients {a.clients} x {n} training rows, batch {a.batch} (q {q:.4f}), {steps} steps/round, "
        f"{a.rounds} rounds, "
        f"lr {a.lr} ({a.lr_schedule}), C {a.clip}, {a.adapter} r {a.lora_r} on {a.target_modules}, "
        f"pooling {a.pooling}, "
        f"{a.optimizer} (momentum {a.momentum}), "
        + ("no DP" if a.no_dp else f"sigma {sigma:.3f} for eps {a.target_epsilon}"),
        flush=True,
    )
    t0 = time.perf_counter()
    res = None
    for rnd in range(1, a.rounds + 1):
        states = []
        lr = round_lr(a.lr, a.lr_schedule, rnd, a.rounds)
        for pid, (train_ds, _) in enumerate(parts.parts):
            set_adapter_state(model, global_state)
            loader = make_loader(
                train_ds, tok, cfg.data.max_length, a.batch, shuffle=True, seed=round_seed(cfg, rnd, pid)
            )
            if a.no_dp:
                train_local(
                    model, loader, task=TASK, epochs=a.epochs, lr=lr, optimizer_name=a.optimizer, momentum=a.momentum
                )
            else:
                out = private_train(
                    model,
                    loader,
                    accounts[pid],
                    task=TASK,
                    epochs=a.epochs,
                    lr=lr,
                    optimizer_name=a.optimizer,
                    momentum=a.momentum,
                )
                accounts[pid] = out.account
            states.append(get_adapter_state(model))
        global_state = {k: torch.stack([s[k].float() for s in states]).mean(0) for k in global_state}
        set_adapter_state(model, global_state)
        res = evaluate(model, eval_loader, len(names))
        eps = max(acc.epsilon for acc in accounts) if accounts else 0.0
        print(
            f"round {rnd}: accuracy {res.accuracy:.4f} loss {res.loss:.4f} epsilon {eps:.3f} "
            f"({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
    print(
        f"RESULT seed={seed} clients={a.clients} rows={n} batch={a.batch} lr={a.lr} "
        f"schedule={a.lr_schedule} clip={a.clip} adapter={a.adapter} r={a.lora_r} "
        f"targets={a.target_modules} pooling={a.pooling} optimizer={a.optimizer} "
        f"momentum={a.momentum} rounds={a.rounds} "
        f"epochs={a.epochs} dp={not a.no_dp} sigma={sigma:.3f} accuracy={res.accuracy:.4f}",
        flush=True,
    )
    return res.accuracy


if __name__ == "__main__":
    main()
