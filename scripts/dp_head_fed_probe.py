"""Probe: how far does a federated DP linear head on frozen mean-pooled embeddings get, over seeds?

The quickstart's rows (fedhf's own seeded sample and partitions: K IID clients, each holding out its local-eval
share), the base encoder frozen and its mean-pooled features computed once, then FedAvg over R rounds of a
384 x labels linear head: each client runs DP-SGD on its rows (Poisson sampling q = 1 / ceil(n / B), per-example
clipping to C, Gaussian noise sigma * C on the sum, sigma planned by fedhf's planner with the RDP accountant for
the target epsilon over all rounds at delta = 0.1 / n). Each recipe runs at 5 seeds; it prints the mean, min and
max central accuracy. Seconds per recipe, so it tells quickly where the head alone stops (the ceiling that an
adapter training the encoder too must beat). Not the product path (that is Opacus in fedhf.privacy.dp).

    python scripts/dp_head_fed_probe.py                       # 3 clients x 400 rows, eps none/8/4
    python scripts/dp_head_fed_probe.py --clients 10 --rows 1000 --eps 1 --batch 64
"""

from __future__ import annotations

import argparse
import math

import torch
from transformers import AutoModel

from fedhf.config.schema import parse_config
from fedhf.data.load import load_data
from fedhf.data.partitions import central_eval_set, make_partitions
from fedhf.privacy.dp import default_delta, plan_noise_multiplier
from fedhf.tasks.model import load_tokenizer, resolve_model
from fedhf.tasks.text_classification import masked_mean


def embed(enc: torch.nn.Module, tok, texts: list[str]) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for i in range(0, len(texts), 128):
            b = tok(texts[i : i + 128], padding=True, truncation=True, max_length=48, return_tensors="pt")
            out.append(masked_mean(enc(**b).last_hidden_state, b["attention_mask"]))
    return torch.cat(out)


def fed_head(clients, test, eps, batch, epochs, lr, rounds, seed, clip=1.0):
    """FedAvg of DP-SGD linear heads; returns (central accuracy, sigma)."""
    n = min(len(x) for x, _ in clients)
    q = 1.0 / math.ceil(n / batch)
    steps = math.ceil(n / batch) * epochs
    sigma = 0.0 if eps is None else plan_noise_multiplier(eps, default_delta(n), q, steps * rounds, "rdp")
    g = torch.Generator().manual_seed(seed)
    labels = int(max(int(y.max()) for _, y in clients)) + 1
    w, b = torch.zeros(clients[0][0].shape[1], labels), torch.zeros(labels)
    for _ in range(rounds):
        outs = []
        for x_all, y_all in clients:
            cw, cb = w.clone(), b.clone()
            for _ in range(steps):
                idx = (torch.rand(len(x_all), generator=g) < q).nonzero().squeeze(1)
                x, y = x_all[idx], y_all[idx]
                p = (x @ cw + cb).softmax(1)
                p[torch.arange(len(y)), y] -= 1  # dL/dlogits per example
                gw, gb = x.unsqueeze(2) * p.unsqueeze(1), p
                norms = (gw.flatten(1).pow(2).sum(1) + gb.pow(2).sum(1)).sqrt()
                f = (clip / (norms + 1e-12)).clamp(max=1.0)
                cw -= lr * ((gw * f[:, None, None]).sum(0) + sigma * clip * torch.randn(cw.shape, generator=g)) / batch
                cb -= lr * ((gb * f[:, None]).sum(0) + sigma * clip * torch.randn(labels, generator=g)) / batch
            outs.append((cw, cb))
        w = torch.stack([o[0] for o in outs]).mean(0)
        b = torch.stack([o[1] for o in outs]).mean(0)
    x_te, y_te = test
    return ((x_te @ w + b).argmax(1) == y_te).float().mean().item(), sigma


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=3)
    ap.add_argument("--rows", type=int, default=400, help="rows per client before its local-eval hold-out")
    ap.add_argument("--eps", default="none,8,4", help="comma list of target epsilons; 'none' = no DP")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seeds", type=int, default=5)
    a = ap.parse_args()
    torch.set_num_threads(2)
    cfg = parse_config(
        {"data.max-train-examples": a.clients * a.rows, "data.max-length": 48, "data.max-eval-examples": 872}
    )
    data = load_data(cfg.data)
    parts = make_partitions(data, cfg.data, cfg.seed, a.clients)
    tok = load_tokenizer(cfg.model.name)
    enc = AutoModel.from_pretrained(resolve_model(cfg.model.name)).eval()
    clients = [(embed(enc, tok, tr["text"]), torch.tensor(tr["label"])) for tr, _ in parts.parts]
    te = central_eval_set(data, cfg.data, cfg.seed)
    test = (embed(enc, tok, te["text"]), torch.tensor(te["label"]))
    for e in a.eps.split(","):
        eps = None if e.strip() == "none" else float(e)
        runs = [fed_head(clients, test, eps, a.batch, a.epochs, a.lr, a.rounds, s) for s in range(a.seeds)]
        accs = [acc for acc, _ in runs]
        print(
            f"clients={a.clients} rows={len(clients[0][0])} eps={e.strip()} batch={a.batch} epochs={a.epochs} "
            f"lr={a.lr} rounds={a.rounds} sigma={runs[0][1]:.3f} mean={sum(accs) / len(accs):.4f} "
            f"min={min(accs):.4f} max={max(accs):.4f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
