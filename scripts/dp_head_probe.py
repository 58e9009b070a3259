"""Feasibility probe: does DP-SGD on a linear head over frozen sentence embeddings learn SST-2?

One client, its rows made by fedhf's own data path (the same seeded sample and local-eval hold-out as
``fedhf run``), the base encoder frozen, features either mean-pooled token states (what
all-MiniLM-L6-v2 was trained for) or BERT's CLS pooler output (what BertForSequenceClassification,
and so fedhf's LoRA model, classifies from). DP-SGD written out in a few lines on purpose (the head is
one matrix): Poisson sampling at q = B/n, per-example clipping to C, Gaussian noise sigma*C on the sum,
sigma planned by fedhf's planner (PRV accountant) for the target epsilon at delta = 0.1/n. Not the product path (that
is Opacus in fedhf.privacy.dp); it tells which representation DP training should start from.

    python scripts/dp_head_probe.py [ROWS]      # default 3,000 rows (2,700 after the hold-out)
"""

import sys

import torch
from transformers import AutoModel

from fedhf.config.schema import parse_config
from fedhf.data.load import load_data
from fedhf.data.partitions import central_eval_set, make_partitions
from fedhf.privacy.dp import default_delta, plan_noise_multiplier
from fedhf.tasks.model import load_tokenizer, resolve_model

torch.set_num_threads(2)
n_rows = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
cfg = parse_config({"data.max-train-examples": n_rows, "data.max-length": 48, "data.max-eval-examples": 872})
data = load_data(cfg.data)
parts = make_partitions(data, cfg.data, 0, 1)
tr = parts.parts[0][0]
te = central_eval_set(data, cfg.data, 0)
tok = load_tokenizer(cfg.model.name)
enc = AutoModel.from_pretrained(resolve_model(cfg.model.name)).eval()


def embed(texts, pool):
    out = []
    with torch.no_grad():
        for i in range(0, len(texts), 128):
            b = tok(texts[i : i + 128], padding=True, truncation=True, max_length=48, return_tensors="pt")
            o = enc(**b)
            if pool == "mean":
                m = b["attention_mask"].unsqueeze(-1).float()
                e = (o.last_hidden_state * m).sum(1) / m.sum(1)
            else:
                e = o.pooler_output
            out.append(e)
    return torch.cat(out)


ytr = torch.tensor(tr["label"])
yte = torch.tensor(te["label"])
for pool in ("mean", "cls-pooler"):
    Xtr = embed(tr["text"], "mean" if pool == "mean" else "cls")
    Xte = embed(te["text"], "mean" if pool == "mean" else "cls")
    n = len(Xtr)
    for eps in (None, 8.0, 4.0, 1.0):
        B, epochs, C, lr = min(256, n), 10, 1.0, 0.5
        q = B / n
        T = int(epochs / q)
        sigma = 0.0 if eps is None else plan_noise_multiplier(eps, default_delta(n), q, T, "prv")  # fedhf's own planner
        g = torch.Generator().manual_seed(1)
        W = torch.zeros(Xtr.shape[1], 2)
        bvec = torch.zeros(2)
        for _t in range(T):
            idx = (torch.rand(n, generator=g) < q).nonzero().squeeze(1)
            X, y = Xtr[idx], ytr[idx]
            logits = X @ W + bvec
            p = logits.softmax(1)
            p[torch.arange(len(y)), y] -= 1  # dL/dlogits per example
            gW = X.unsqueeze(2) * p.unsqueeze(1)
            gb = p  # per-example grads
            norms = (gW.flatten(1).pow(2).sum(1) + gb.pow(2).sum(1)).sqrt()
            f = (C / (norms + 1e-12)).clamp(max=1.0)
            sW = (gW * f[:, None, None]).sum(0) + sigma * C * torch.randn(W.shape, generator=g)
            sb = (gb * f[:, None]).sum(0) + sigma * C * torch.randn(2, generator=g)
            W -= lr * sW / B
            bvec -= lr * sb / B
        acc = ((Xte @ W + bvec).argmax(1) == yte).float().mean().item()
        print(f"{pool:10s} n={n} eps={eps} sigma={sigma:.3f} steps={T} acc={acc:.4f}", flush=True)
