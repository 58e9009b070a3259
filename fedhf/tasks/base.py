"""The task seam: what one kind of fine-tuning owns, and the registry that names the kinds.

A task (text classification; causal LM, which answers with the label's name) owns the model class,
tokenization and collation, the loss, metrics, prediction, the model card's ``pipeline_tag`` and usage code,
and the per-example loss the audit uses. Everything else (data loading and partitions, LoRA, local training,
DP-SGD, federation, the run record, the Hub) is shared. Another task is one new module with a class that has
these members, plus a line in :func:`get_task` and in ``fedhf.config.schema.TASKS``.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import datasets
import torch
from torch.utils.data import DataLoader, Sampler

from fedhf.errors import FedHFConfigError


@dataclass
class EvalResult:
    """A model's figures on one evaluation set (the metric names are the task's own)."""

    loss: float
    accuracy: float
    macro_f1: float
    num_examples: int


class LengthBuckets(Sampler[list[int]]):
    """Shuffled batches of rows of like length (``train.length-buckets``): each pass draws a permutation, cuts it
    into pools of ``pool`` batches' rows, sorts each pool by length, cuts it into batches and shuffles the batches'
    order. Every row is seen once per pass and there are ceil(n / batch_size) batches, as with plain shuffled
    batches, but a batch pads to a length near its rows' own. Not for DP-SGD, whose Poisson batches are drawn
    afresh (``fedhf.privacy.dp.poisson_loader``)."""

    def __init__(self, lengths: Sequence[int], batch_size: int, pool: int, generator: torch.Generator) -> None:
        self.lengths, self.batch_size, self.pool, self.generator = list(lengths), batch_size, pool, generator

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        n, size = len(self.lengths), self.batch_size * self.pool
        perm = torch.randperm(n, generator=self.generator).tolist()
        batches = []
        for start in range(0, n, size):
            rows = sorted(perm[start : start + size], key=self.lengths.__getitem__)
            batches += [rows[i : i + self.batch_size] for i in range(0, len(rows), self.batch_size)]
        for i in torch.randperm(len(batches), generator=self.generator).tolist():
            yield batches[i]


def batching(lengths: Sequence[int], batch_size: int, shuffle: bool, seed: int, buckets: int = 1) -> dict[str, Any]:
    """DataLoader arguments for rows of ``lengths``: plain shuffled batches, or (``buckets`` > 1, shuffled only)
    length-bucketed ones (:class:`LengthBuckets`), both drawn from a generator seeded with ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    if shuffle and buckets > 1 and len(lengths) > batch_size:
        return {"batch_sampler": LengthBuckets(lengths, batch_size, buckets, generator)}
    return {"batch_size": batch_size, "shuffle": shuffle, "generator": generator}


class TokenizedRows:
    """Tokenized rows a process reuses: a client's rows are tokenized in its first round and read again in every
    later one (a simulated client's process serves many rounds and partitions). Keyed on everything the rows
    depend on: the dataset's content fingerprint (``datasets``' own, which changes with every transform and
    selection), the tokenizer's whole content (:func:`tokenizer_key`), the max length and the task's options;
    holds at most ``size`` row lists (least recently used leave first). Rows are shared: readers never change
    them (loaders sort and batch copies of the list)."""

    def __init__(self, size: int = 6) -> None:
        self.size = size
        self._rows: OrderedDict[tuple, Any] = OrderedDict()
        self.built = 0  # row lists tokenized (misses), for tests
        self.reused = 0

    def get(self, ds: Any, tokenizer: Any, options: tuple, build: Callable[[], Any]) -> Any:
        """``build()``'s rows, tokenized now or earlier for the same key; not kept for data without a fingerprint
        (rows that are not a ``datasets.Dataset``) or a tokenizer without a serialisable backend."""
        key = rows_key(ds, tokenizer, options)
        if key is None:
            self.built += 1
            return build()
        rows = self._rows.pop(key, None)
        if rows is None:
            rows = build()
            self.built += 1
        else:
            self.reused += 1
        self._rows[key] = rows
        while len(self._rows) > self.size:
            self._rows.popitem(last=False)
        return rows


def tokenizer_key(tokenizer: Any) -> str | None:
    """A digest of everything in a fast tokenizer that tokenization reads: its vocabulary, merges, normalizer,
    pre-tokenizer, post-processor and added tokens (``backend_tokenizer.to_str()``, computed once per tokenizer
    object and size: adding tokens changes it), its special tokens, chat template and truncation side; None for a
    tokenizer without a backend (never cached)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    size = len(tokenizer)
    known = getattr(tokenizer, "_fedhf_backend_digest", None)
    if known is None or known[0] != size:
        content = json.loads(backend.to_str())
        for state in ("truncation", "padding"):  # what the last call left set, not what the tokenizer is
            content.pop(state, None)
        known = (size, hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest())
        tokenizer._fedhf_backend_digest = known
    h = hashlib.sha256(known[1].encode())
    for extra in (
        type(tokenizer).__name__,
        str(tokenizer.special_tokens_map),
        str(getattr(tokenizer, "chat_template", None)),
        str(getattr(tokenizer, "truncation_side", None)),
        str(getattr(tokenizer, "padding_side", None)),
    ):
        h.update(b"\0" + extra.encode())
    return h.hexdigest()


def rows_key(ds: Any, tokenizer: Any, options: tuple) -> tuple | None:
    fingerprint = getattr(ds, "_fingerprint", None) if isinstance(ds, datasets.Dataset) else None
    tok = tokenizer_key(tokenizer)
    if fingerprint is None or tok is None:
        return None
    return (fingerprint, tok, *options)


TOKENIZED = TokenizedRows()  # this process's: keyed on the data, the tokenizer and every option, bounded


class Task(Protocol):
    """The members a task module provides (see ``fedhf.tasks.text_classification`` for the reference one)."""

    name: str  # the value of model.task
    pipeline_tag: str  # the Hub's pipeline tag for the card
    peft_task_type: Any  # peft.TaskType for the LoRA config

    def load_base(self, path: str, label_names: list[str], pooling: str) -> torch.nn.Module:
        """The base model (no LoRA yet) from a resolved folder or Hub id."""

    def make_loader(
        self,
        ds: datasets.Dataset,
        tokenizer: Any,
        max_length: int,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        sort_by_length: bool = False,
        length_buckets: int = 1,
    ) -> DataLoader:
        """Tokenized, collated batches of the rows of ``ds`` (columns ``text`` and ``label``); ``sort_by_length``
        for evaluation, ``length_buckets`` for shuffled training batches (:func:`batching`)."""

    def split(self, batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """(what the model takes, the target) of a batch."""

    def criterion(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The training loss over (model output, target), mean over the batch (Opacus may replace it)."""

    def output(self, model_output: Any) -> torch.Tensor:
        """What the criterion reads of the model's forward output."""

    def tokens(self, inputs: dict[str, torch.Tensor]) -> int:
        """The tokens a batch carries (for the FLOP counts of the benchmark)."""

    def evaluate(self, model: torch.nn.Module, loader: DataLoader, num_labels: int) -> EvalResult:
        """The task's figures on the loader's rows."""

    def per_example_loss(
        self, model: torch.nn.Module, tokenizer: Any, texts: list[str], labels: list[int], max_length: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, prediction) of each example in input order: what the membership-inference audit attacks."""

    def predict(
        self, model: torch.nn.Module, tokenizer: Any, labels: list[str], texts: list[str], max_length: int
    ) -> list[tuple[str, float]]:
        """What ``fedhf predict`` prints for each text."""

    def describe(self, label_names: list[str]) -> str:
        """What the adapter does, in the card's words (e.g. '2-class text classification (a, b)')."""

    def usage_code(self, base_model: str | None, pooling: str) -> str:
        """The card's 'How to use' Python code for an adapter of this task."""


def get_task(name: str, label_names: list[str] | None = None, data_format: str = "labels") -> Task:
    """The task named by ``model.task`` (the config's choices are ``fedhf.config.schema.TASKS``), for a run over
    ``label_names`` (the causal-LM task phrases each example as an instruction that lists them)."""
    from fedhf.tasks.causal_lm import CausalLM
    from fedhf.tasks.text_classification import TextClassification

    if name == TextClassification.name:
        return TextClassification()
    if name == CausalLM.name:
        return CausalLM(label_names, data_format)
    raise FedHFConfigError(
        f"config key 'model.task': got {name!r}; allowed: {TextClassification.name}, {CausalLM.name}."
    )
