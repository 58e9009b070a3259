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


CANARY_SEED_OFFSET = 1_000_003  # the run's canaries are drawn from seed + this (never the partition's stream)


def run_canaries(count: int, fmt: str, run_seed: int) -> list[Canary]:
    """The canaries of a run with ``audit.canaries = count`` and ``seed = run_seed`` (the client inserts them; the
    run record lists them; ``fedhf audit`` ranks them)."""
    return make_canaries(count, fmt, run_seed + CANARY_SEED_OFFSET)


def canary_rows(canaries: Sequence[Canary], repeats: int, client_rows: int) -> list[dict[str, Any]]:
    """Each canary's record ``repeats`` times, for a client with ``client_rows`` rows of its own (training shuffles
    or Poisson-samples them with the rest)."""
    if repeats < 1:
        raise FedHFDataError(f"config key 'audit.canary-repeats': got {repeats}; give at least 1.")
    if len(canaries) > client_rows:
        raise FedHFDataError(
            f"config key 'audit.canaries': {len(canaries)} canaries for a client with {client_rows} training rows; "
            f"give at most {client_rows} (canaries are a small share of a client's data), or a client with more rows."
        )
    return [dict(c.record) for c in canaries for _ in range(repeats)]


def canary_format(data_format: str | None) -> str:
    """The record format a run's canaries take: plain text in a plain-text run (the secret sharer's own setting),
    else instruction records (a question whose answer is the secret), which an instruction or chat run trains on
    alongside its own records."""
    return "text" if data_format == "text" else "instruction"


def canary_info(count: int, repeats: int, client: int, run_seed: int, fmt: str = "instruction") -> dict[str, Any]:
    """What the run record states of its canaries (run.json 'canaries')."""
    canaries = run_canaries(count, fmt, run_seed)
    return {
        "client": client,
        "count": count,
        "repeats": repeats,
        "format": fmt,
        "digits": len(canaries[0].secret),
        "secrets": [c.secret for c in canaries],
    }
