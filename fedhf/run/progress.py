"""Console progress for a run: a bar over rounds and one summary line per round."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, TextIO

from tqdm.auto import tqdm

from fedhf.data.records import METRICS, MetricNames
from fedhf.privacy.ledger import privacy_line
from fedhf.run.store import Round


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def round_line(
    row: Round,
    total: int,
    names: MetricNames = METRICS["labels"],  # noqa: B008 (frozen)
    perplexity: bool = False,
) -> str:
    """The console's line for a round; ``perplexity``: a language model's, exp(loss per token), after the loss."""
    if row.eval_loss is None:
        central = "central eval skipped (strategy.central-eval-every)"
    else:
        ppl = f"  ppl {math.exp(min(row.eval_loss, 700.0)):.2f}" if perplexity else ""
        central = (
            f"central {names.short_accuracy} {row.eval_accuracy:.4f}  {names.short_f1} {row.eval_f1:.4f}  "
            f"loss {row.eval_loss:.4f}{ppl}"
        )
    if row.round == 0:
        return f"[fedhf] round 0/{total}  {central} (initial adapter)"
    loss = "train loss not shared" if row.train_loss is None else f"train loss {row.train_loss:.4f}"
    refused = f" ({len(row.refused)} refused)" if row.refused else ""
    return (
        f"[fedhf] round {row.round}/{total}  {loss}  {central}  "
        f"clients {len(row.trained)}/{row.clients_sampled}{refused}  "
        f"up {_fmt(row.bytes_up, ',d')} B/client  {row.wall_seconds:.1f}s"
    )


class RoundProgress:
    """A bar over rounds (on ``bar_file``, shown only on a terminal) and one line per round (through ``write``,
    by default above the bar on stdout)."""

    def __init__(
        self,
        total: int,
        done: int = 0,
        *,
        write: Callable[[str], None] | None = None,
        bar_file: TextIO | None = None,
    ) -> None:
        self.total = total
        self.metrics = METRICS["labels"]  # what the run's two central metrics are (set once its data is known)
        self.perplexity = False  # a causal LM's line also shows exp(loss)
        self.write = write or (lambda text: tqdm.write(text))
        self.bar = tqdm(
            total=total,
            initial=done,
            desc="fedhf rounds",
            unit="round",
            dynamic_ncols=True,
            file=bar_file,
            disable=None,
            leave=False,
        )

    def round_done(self, row: Round) -> None:
        self.write(round_line(row, self.total, self.metrics, self.perplexity))
        line = privacy_line(row.round, row.privacy)
        if line:
            self.write(line)
        if row.round > 0:
            acc = "-" if row.eval_accuracy is None else f"{row.eval_accuracy:.3f}"  # "-": not evaluated this round
            self.bar.set_postfix({self.metrics.short_accuracy: acc})
            self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
