"""Instruction, chat and plain-text records (``data.format`` instruction, messages or text, model.task causal-lm):
their columns checked and normalised once, as the data stage loads them, and the names of the metrics each format
is scored by. No torch.

After loading, an instruction dataset has the string columns ``instruction``, ``input`` ("" where the file has
none) and ``output``; a chat dataset has ``messages``, a list of ``{"role", "content"}`` whose last turn is the
assistant's; a plain-text dataset has ``text`` (and no ``label``). The natural partition column is kept when there
is one. Errors name the column, the count and the fix, never a row's text (they may leave a data owner's node).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import datasets

from fedhf.errors import FedHFDataError

RECORD_FORMATS = ("instruction", "messages", "text")
REQUIRED = {"instruction": ("instruction", "output"), "messages": ("messages",), "text": ("text",)}


@dataclass(frozen=True)
class MetricNames:
    """What a run's two central metrics (``EvalResult.accuracy`` and ``.macro_f1``) are, per data format: the words
    the console, report, plots and card print, and the ids of the card's model-index."""

    accuracy: str
    f1: str
    accuracy_id: str
    f1_id: str
    short_accuracy: str  # the round line's
    short_f1: str


METRICS = {
    "labels": MetricNames("accuracy", "macro-F1", "accuracy", "f1", "acc", "f1"),
    # the greedy answer against the gold one: exact match (normalised) and SQuAD's token F1
    "instruction": MetricNames("exact match", "token F1", "exact_match", "f1", "EM", "token-F1"),
    "messages": MetricNames("exact match", "token F1", "exact_match", "f1", "EM", "token-F1"),
    # no answer to match: how often the model's most likely next token is the text's (top 1 and top 5)
    "text": MetricNames(
        "next-token accuracy", "top-5 next-token accuracy", "accuracy", "top_5_accuracy", "next-token acc", "top-5"
    ),
}


def metric_names(fmt: str | None) -> MetricNames:
    """The metric names of a run over data of format ``fmt`` (None, as in an older run record: labels)."""
    return METRICS.get(fmt or "labels", METRICS["labels"])


ROLES = ("system", "user", "assistant")


def check_columns(columns: Sequence[str], fmt: str, split: str = "train") -> None:
    """Raise unless a ``split`` with ``columns`` has the fields of record format ``fmt``."""
    missing = [c for c in REQUIRED[fmt] if c not in columns]
    if missing:
        raise FedHFDataError(
            f"data.format '{fmt}' needs the column(s) {', '.join(missing)}, which the {split} split lacks (it has "
            f"{', '.join(sorted(columns)) or 'none'}); rename its columns or set data.format to the records' shape."
        )


def _chat_problem(messages: Any) -> str | None:
    """What is wrong with one chat (no text of it), or None."""
    if not isinstance(messages, list) or not messages:
        return "not a non-empty list of turns"
    for turn in messages:
        if not isinstance(turn, dict) or not isinstance(turn.get("content"), str):
            return "a turn without a string 'content'"
        if turn.get("role") not in ROLES:
            return f"a turn whose role is not one of {', '.join(ROLES)}"
    if messages[-1]["role"] != "assistant":
        return "a last turn that is not the assistant's (the answer the model learns)"
    if not messages[-1]["content"].strip():
        return "an empty answer"
    if len(messages) < 2:
        return "no turn before the answer"
    return None


def normalise_records(
    ds: datasets.Dataset, fmt: str, part_col: str, split: str, text_col: str = "text"
) -> datasets.Dataset:
    """``ds`` as records of ``fmt`` in the canonical columns (module docstring), checked row by row; plain text is
    read from ``text_col``."""
    if part_col in ("label", *(c for cols in REQUIRED.values() for c in cols), "input", "output"):
        raise FedHFDataError(
            f"config key 'data.partition-column': '{part_col}' is a column name fedhf's records use for their "
            f"content; rename that column in the data (e.g. to 'group') and name it here."
        )
    if fmt == "text" and text_col != "text":
        if text_col not in ds.column_names:
            raise FedHFDataError(
                f"data.format 'text' reads column '{text_col}', which the {split} split lacks (it has "
                f"{', '.join(sorted(ds.column_names)) or 'none'}); set data.text-column to one of them."
            )
        ds = ds.select_columns([c for c in ds.column_names if c in (text_col, part_col)])
        ds = ds.rename_column(text_col, "text") if "text" not in ds.column_names else ds
    check_columns(ds.column_names, fmt, split)
    columns: dict[str, list[Any]] = {}
    if fmt == "instruction":
        instruction, output = ds["instruction"], ds["output"]
        extra = ds["input"] if "input" in ds.column_names else [""] * len(ds)
        bad = sum(1 for i, o in zip(instruction, output, strict=True) if not (i and str(i).strip()) or o is None)
        empty = sum(1 for o in output if o is not None and not str(o).strip())
        if bad or empty:
            raise FedHFDataError(
                f"data.format 'instruction': {bad + empty} of {len(ds)} rows of the {split} split have an empty "
                f"'instruction' or 'output', which leaves no prompt or no response to learn; drop or fill them."
            )
        columns = {
            "instruction": [str(i) for i in instruction],
            "input": ["" if x is None else str(x) for x in extra],
            "output": [str(o) for o in output],
        }
    elif fmt == "messages":
        chats = ds["messages"]
        problems = [p for p in (_chat_problem(m) for m in chats) if p]
        if problems:
            raise FedHFDataError(
                f"data.format 'messages': {len(problems)} of {len(chats)} chats of the {split} split are malformed "
                f"(the first has {problems[0]}); each must be a list of {{'role', 'content'}} turns ending with the "
                f"assistant's answer."
            )
        columns = {"messages": [[{"role": t["role"], "content": t["content"]} for t in m] for m in chats]}
    elif fmt == "text":
        texts = ds["text"]
        empty = sum(1 for t in texts if t is None or not str(t).strip())
        if empty:
            raise FedHFDataError(
                f"data.format 'text': {empty} of {len(ds)} rows of the {split} split have an empty text, which leaves "
                f"nothing to learn; drop or fill them."
            )
        columns = {"text": [str(t) for t in texts]}
    else:  # a bug in the caller: resolve_format returns labels or a record format
        raise FedHFDataError(f"data.format: '{fmt}' is not a record format ({', '.join(RECORD_FORMATS)}).")
    if part_col and part_col in ds.column_names:
        columns[part_col] = [str(v) for v in ds[part_col]]
    return datasets.Dataset.from_dict(columns)


def record_texts(ds: datasets.Dataset) -> list[str]:
    """Every string a normalised dataset's rows hold, one per row (labels: the text; instruction: instruction,
    input and output; chat: its turns; plain text: the text): what a tokenizer built for the data is trained on."""
    fmt = record_format(ds.column_names)
    if fmt == "messages":
        return ["\n".join(t["content"] for t in m) for m in ds["messages"]]
    if fmt == "instruction":
        cols = zip(ds["instruction"], ds["input"], ds["output"], strict=True)
        return ["\n".join(p for p in parts if p) for parts in cols]
    return [str(t) for t in ds["text"]]


def record_format(columns: Sequence[str]) -> str:
    """The format of a normalised dataset, by its columns: labels, instruction, messages or text."""
    if "messages" in columns:
        return "messages"
    if "instruction" in columns:
        return "instruction"
    if "text" in columns and "label" not in columns:
        return "text"
    return "labels"
