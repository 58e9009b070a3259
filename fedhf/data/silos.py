"""A silo: a SuperNode's own data files (node config ``data-path``), mapped onto the federation's labels."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import datasets

from fedhf.config.schema import DataConfig
from fedhf.data.load import (
    FILE_FORMATS,
    LABEL_CANDIDATES,
    TEXT_CANDIDATES,
    detect,
    label_ids_onto,
    load_local,
    normalise,
    resolve_format,
)
from fedhf.data.partitions import split_local
from fedhf.data.records import normalise_records
from fedhf.errors import FedHFDataError


def load_silo(
    cfg: DataConfig, path: str, label_names: tuple[str, ...], seed: int
) -> tuple[datasets.Dataset, datasets.Dataset | None, list[str]]:
    """A SuperNode's own data (node config ``data-path``): its train rows and a local eval hold-out.

    Labels are mapped onto the federation's label names (sent by the server), so every silo
    agrees on what label id 1 means. An ``eval``/``test`` file in a silo folder is its local
    eval set; otherwise ``data.local-eval-fraction`` of the rows is held out.
    """
    return _silo_cached(cfg, str(path), tuple(label_names), seed, _files_signature(Path(path).expanduser()))


def _files_signature(path: Path) -> tuple:
    """(name, size, mtime) of the silo's files: a silo edited between rounds is read again."""
    try:
        files = [path] if path.is_file() else sorted(q for q in path.iterdir() if q.is_file())
        return tuple((q.name, q.stat().st_size, q.stat().st_mtime_ns) for q in files)
    except OSError:
        return ()


@functools.lru_cache(maxsize=4)
def _silo_cached(
    cfg: DataConfig, path: str, label_names: tuple[str, ...], seed: int, signature: tuple
) -> tuple[datasets.Dataset, datasets.Dataset | None, list[str]]:
    p = Path(path).expanduser()
    where = f"node config 'data-path': '{path}'"
    # The public texts (what the server learns) name the key, never the path or a row.
    if not p.exists():
        raise FedHFDataError(
            f"{where} does not exist on this node; give this silo's data file or folder "
            f"({', '.join(sorted(FILE_FORMATS))}).",
            public="node config 'data-path' does not exist on this node.",
        )
    if not os.access(p, os.R_OK) or (p.is_dir() and not os.access(p, os.X_OK)):
        raise FedHFDataError(
            f"{where} is not readable by this SuperNode's user; fix its permissions.",
            public="node config 'data-path' is not readable by the SuperNode's user.",
        )
    try:
        raw_train, raw_eval, _ = load_local(str(p))
    except FedHFDataError as exc:
        raise FedHFDataError(
            f"{where}: {str(exc).removeprefix('data.dataset: ')}",
            public="node config 'data-path': the silo's files cannot be read as a dataset.",
        ) from None
    except (OSError, ValueError, datasets.exceptions.DatasetGenerationError) as exc:
        raise FedHFDataError(
            f"{where} could not be read ({type(exc).__name__}: {str(exc)[:200]}); "
            "check the file's format and permissions.",
            public=f"node config 'data-path' could not be read ({type(exc).__name__}).",
        ) from None
    if not label_names:  # a federation of instruction or chat records (model.task causal-lm): no labels to map
        return _records_silo(cfg, raw_train, raw_eval, seed, where)
    text_col = cfg.text_column or detect(raw_train, TEXT_CANDIDATES, "text", "data.text-column")
    label_col = cfg.label_column or detect(raw_train, LABEL_CANDIDATES, "label", "data.label-column")
    values = set(raw_train.unique(label_col)) | (
        set(raw_eval.unique(label_col)) if raw_eval is not None and label_col in raw_eval.column_names else set()
    )
    names = list(label_names)
    to_id, unknown = label_ids_onto(values, names)
    if unknown:
        raise FedHFDataError(
            f"{where}: labels {unknown[:5]} in column '{label_col}' are not among the federation's labels "
            f"{names} (names, or ids 0..{len(names) - 1}); relabel the silo or fix data.label-column.",
            public=f"node config 'data-path': {len(unknown)} label value(s) in column '{label_col}' are not among the "
            f"federation's {len(names)} labels; relabel the silo or fix data.label-column.",
        )
    train = normalise(raw_train, text_col, label_col, to_id, "", "train")
    if len(train) == 0:
        raise FedHFDataError(
            f"{where} holds no training rows.", public="node config 'data-path' holds no training rows."
        )
    if raw_eval is not None:
        return train, normalise(raw_eval, text_col, label_col, to_id, "", "eval"), names
    local_train, local_eval = split_local(train.shuffle(seed=seed).flatten_indices(), cfg.local_eval_fraction, seed)
    return local_train, local_eval, names


def _records_silo(
    cfg: DataConfig, raw_train: datasets.Dataset, raw_eval: datasets.Dataset | None, seed: int, where: str
) -> tuple[datasets.Dataset, datasets.Dataset | None, list[str]]:
    """A silo's instruction, chat or plain-text records (``fedhf.data.records``), their format read from its own
    columns."""
    try:
        fmt = resolve_format(cfg, raw_train.column_names, None)
    except FedHFDataError as exc:
        raise FedHFDataError(f"{where}: {exc}", public=f"node config 'data-path': {exc}") from None
    if fmt == "labels":
        msg = (
            "node config 'data-path': the federation trains on records (instruction, chat or plain text), and this "
            "silo holds labelled texts; give the silo 'instruction' + 'output' columns, a 'messages' column, or "
            "only a text column."
        )
        raise FedHFDataError(msg, public=msg)
    try:
        text_col = (
            (cfg.text_column or detect(raw_train, TEXT_CANDIDATES, "text", "data.text-column")) if fmt == "text" else ""
        )
        train = normalise_records(raw_train, fmt, "", "train", text_col)
        local_eval = normalise_records(raw_eval, fmt, "", "eval", text_col) if raw_eval is not None else None
    except FedHFDataError as exc:  # counts and column names only, no row text
        raise FedHFDataError(f"{where}: {exc}", public=f"node config 'data-path': {exc}") from None
    if len(train) == 0:
        raise FedHFDataError(
            f"{where} holds no training rows.", public="node config 'data-path' holds no training rows."
        )
    if local_eval is not None:
        return train, local_eval, []
    local_train, local_eval = split_local(train.shuffle(seed=seed).flatten_indices(), cfg.local_eval_fraction, seed)
    return local_train, local_eval, []
