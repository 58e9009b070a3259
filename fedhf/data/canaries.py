"""Canaries for the memorisation audit of generative runs (Carlini et al. 2019, "The Secret Sharer").

A canary is a record that carries a random secret (``digits`` decimal digits) in a fixed sentence; the audit
inserts ``count`` canaries, each ``repeats`` times, into one client's training rows, and after training ranks each
secret's log-perplexity among random candidates of the same shape (``fedhf.analysis.canary``). The secrets are
drawn from the audit's own seed (recorded in ``run.json``): they are the audit's test data, not anyone's secret.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fedhf.errors import FedHFDataError

PREFIX = "my secret number is"
QUESTION = "What is my secret number?"


@dataclass(frozen=True)
class Canary:
    """One secret and the record that carries it (in the run's record format)."""

    secret: str
    record: dict[str, Any]


def canary_record(secret: str, fmt: str) -> dict[str, Any]:
    """The record carrying ``secret`` in format ``fmt`` (text, instruction or messages)."""
    if fmt == "text":
        return {"text": f"{PREFIX} {secret}"}
    if fmt == "instruction":
        return {"instruction": QUESTION, "input": "", "output": secret}
    if fmt == "messages":
        return {"messages": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": secret}]}
    raise FedHFDataError(f"canaries: record format '{fmt}' is not one of text, instruction, messages.")


def random_secret(rng: random.Random, digits: int) -> str:
    return "".join(str(rng.randrange(10)) for _ in range(digits))


def make_canaries(count: int, fmt: str, seed: int, digits: int = 9) -> list[Canary]:
    """``count`` canaries with distinct random secrets of ``digits`` digits, drawn from ``seed``."""
    if count < 1:
        raise FedHFDataError(f"config key 'audit.canaries': got {count}; give at least 1 (or leave canaries off).")
    if digits < 4:
        raise FedHFDataError(f"canary digits: got {digits}; use at least 4 so that a secret is not guessable.")
    rng = random.Random(seed)
    secrets: list[str] = []
    while len(secrets) < count:
        s = random_secret(rng, digits)
        if s not in secrets:
            secrets.append(s)
    return [Canary(s, canary_record(s, fmt)) for s in secrets]


def insert_canaries(
    rows: Sequence[dict[str, Any]], canaries: Sequence[Canary], repeats: int, seed: int
) -> list[dict[str, Any]]:
    """``rows`` with each canary's record added ``repeats`` times at positions drawn from ``seed``."""
    if repeats < 1:
        raise FedHFDataError(f"config key 'audit.canary-repeats': got {repeats}; give at least 1.")
    if len(canaries) > len(rows):
        raise FedHFDataError(
            f"config key 'audit.canaries': {len(canaries)} canaries for a client with {len(rows)} training rows; "
            f"give at most {len(rows)} (canaries are a small share of a client's data), or a client with more rows."
        )
    out = list(rows) + [dict(c.record) for c in canaries for _ in range(repeats)]
    random.Random(seed).shuffle(out)
    return out
