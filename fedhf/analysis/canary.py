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
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        summed, _ = C.token_losses(logits, batch["labels"])
        out.append(summed)
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
