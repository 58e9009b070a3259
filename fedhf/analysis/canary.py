"""Canary exposure (Carlini et al. 2019, "The Secret Sharer"): how much better a model knows an inserted secret than
random secrets of the same shape.

A canary's log-perplexity is the summed next-token loss of the tokens the run trains on in its record (the whole
text under ``data.format = text``, the response otherwise), computed exactly as training tokenizes it. Its rank
among ``m`` random candidates (the same record with other random secrets) gives the estimate

    exposure = -log2((1 + #{candidates with log-perplexity <= the canary's}) / (m + 1)),

which is 0 to log2(m + 1) bits: about 1.4 bits in expectation for a secret the model never saw (-log2 of a uniform
rank), the maximum when the canary beats every candidate. The full space of secrets (10^digits) is larger than m,
so exposures at the maximum mean "at least this much"; ``max_exposure`` says what m can measure.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from fedhf.data.canaries import Canary, canary_record, random_secret
from fedhf.tasks import causal_lm as C
from fedhf.tasks.device import model_device, to_device


@dataclass(frozen=True)
class Exposure:
    """One canary's measured exposure."""

    secret: str
    log_perplexity: float
    rank: int  # 1 + candidates at or below the canary's log-perplexity
    num_candidates: int
    exposure: float
    max_exposure: float

    def to_record(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def log_perplexities(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[dict[str, Any]],
    fmt: str,
    max_length: int,
    response_only: bool = True,
    batch_size: int = 64,
) -> torch.Tensor:
    """Summed next-token loss (nats) of each record's trained tokens, in input order."""
    rows = C.tokenize([C.to_example(r, fmt, tokenizer) for r in records], tokenizer, max_length, response_only)
    model.eval()
    out = []
    for batch in C.make_loader(rows, tokenizer, batch_size, shuffle=False):
        batch = to_device(batch, model_device(model))
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        summed, _ = C.token_losses(logits, batch["labels"])
        out.append(summed.cpu())
    return torch.cat(out) if out else torch.empty(0)


def exposure(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    canary: Canary,
    fmt: str,
    max_length: int,
    num_candidates: int = 1000,
    seed: int = 0,
    response_only: bool = True,
) -> Exposure:
    """The canary's exposure against ``num_candidates`` random secrets of its length (drawn from ``seed``; the canary's
    own secret is never among them)."""
    rng = random.Random(seed)
    digits = len(canary.secret)
    candidates: list[str] = []
    while len(candidates) < num_candidates:
        s = random_secret(rng, digits)
        if s != canary.secret:
            candidates.append(s)
    records = [canary.record] + [canary_record(s, fmt) for s in candidates]
    lp = log_perplexities(model, tokenizer, records, fmt, max_length, response_only)
    mine, others = float(lp[0]), lp[1:]
    rank = 1 + int((others <= mine).sum())
    return Exposure(
        secret=canary.secret,
        log_perplexity=mine,
        rank=rank,
        num_candidates=num_candidates,
        exposure=math.log2((num_candidates + 1) / rank),
        max_exposure=math.log2(num_candidates + 1),
    )


CONTROL_SEED = 7_777_777  # the unseen control secrets: never the run's own canary stream


def canary_audit(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    canaries: dict[str, Any],
    max_length: int,
    num_candidates: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """The exposure of each canary a run trained on (run.json 'canaries'), and of as many control secrets of the
    same shape that it never saw (what chance gives, about 1.4 bits), against ``num_candidates`` random ones."""
    from fedhf.data.canaries import Canary, make_canaries

    fmt = canaries["format"]
    inserted = [Canary(s, canary_record(s, fmt)) for s in canaries["secrets"]]
    taken = set(canaries["secrets"])
    controls = [c for c in make_canaries(len(inserted) + len(taken), fmt, CONTROL_SEED) if c.secret not in taken]
    controls = controls[: len(inserted)]

    def measure(which: list[Canary]) -> list[dict[str, Any]]:
        return [exposure(model, tokenizer, c, fmt, max_length, num_candidates, seed=seed + i).to_record()
                for i, c in enumerate(which)]  # fmt: skip

    seen, unseen = measure(inserted), measure(controls)
    mean = lambda rows: sum(r["exposure"] for r in rows) / max(len(rows), 1)  # noqa: E731
    return {
        "client": canaries["client"],
        "repeats": canaries["repeats"],
        "num_candidates": num_candidates,
        "max_exposure": math.log2(num_candidates + 1),
        "mean_exposure": mean(seen),
        "control_mean_exposure": mean(unseen),
        "inserted": seen,
        "controls": unseen,
    }


def canary_lines(result: dict[str, Any]) -> list[str]:
    top = result["max_exposure"]
    lines = [
        f"canary exposure ({len(result['inserted'])} secrets x {result['repeats']} in client {result['client']}'s "
        f"rows; rank among {result['num_candidates']} random secrets, at most {top:.2f} bits):",
        f"  inserted  mean {result['mean_exposure']:.2f} bits  "
        + " ".join(f"{r['exposure']:.2f}" for r in result["inserted"]),
        f"  controls  mean {result['control_mean_exposure']:.2f} bits  (never trained on; chance is about 1.4)",
    ]
    return lines
