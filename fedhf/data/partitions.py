"""Partitions: split a loaded dataset into clients' shards (flwr-datasets partitioners), describe them."""

from __future__ import annotations

import functools
import hashlib
import os
from collections import Counter
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    IidPartitioner,
    InnerDirichletPartitioner,
    NaturalIdPartitioner,
    PathologicalPartitioner,
)

from fedhf.config.schema import DataConfig
from fedhf.data.load import DATA_DIR_ENV, LoadedData, load_data
from fedhf.errors import FedHFDataError


def label_histogram(labels: list[int], num_labels: int) -> list[int]:
    """Rows per label id, in label order."""
    counts = Counter(labels)
    return [counts.get(i, 0) for i in range(num_labels)]


@dataclass
class Partitions:
    """The training rows split over ``num_partitions`` clients, each with a local eval hold-out."""

    parts: list[tuple[datasets.Dataset, datasets.Dataset | None]]
    label_names: list[str]
    natural_ids: list[str] | None = None

    def stats(self) -> list[dict[str, Any]]:
        out = []
        for pid, (train, local_eval) in enumerate(self.parts):
            row: dict[str, Any] = {
                "partition_id": pid,
                "train_examples": len(train),
                "eval_examples": len(local_eval) if local_eval is not None else 0,
                "label_histogram": (
                    label_histogram(train["label"], len(self.label_names)) if "label" in train.column_names else []
                ),
            }
            if self.natural_ids:
                row["natural_id"] = self.natural_ids[pid]
            out.append(row)
        return out


def prepare_train_rows(data: LoadedData, cfg: DataConfig, seed: int) -> datasets.Dataset:
    """The rows that get partitioned: capped per group (max-examples-per-group), shuffled with the seed,
    capped at max-train-examples."""
    order, _ = _train_order(data, cfg, seed)
    return data.train.select(order).flatten_indices()


def split_train_rows(data: LoadedData, cfg: DataConfig, seed: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(rows the run trains on, rows of the training split it never uses).

    The second set is the same distribution as the first and never seen by any client:
    the membership-inference audit draws its non-members from it.
    """
    order, dropped = _train_order(data, cfg, seed)
    return data.train.select(order).flatten_indices(), data.train.select(sorted(dropped)).flatten_indices()


def _train_order(data: LoadedData, cfg: DataConfig, seed: int) -> tuple[list[int], list[int]]:
    order = list(range(len(data.train)))
    dropped: list[int] = []
    if cfg.max_examples_per_group:
        col = data.partition_column
        if not col or col not in data.train.column_names:
            raise FedHFDataError(
                f"config key 'data.max-examples-per-group': got {cfg.max_examples_per_group}, but the dataset has no "
                "partition column to group by; set data.partition-column or use data.max-train-examples instead."
            )
        # Each group is sampled on its own (its rows, its own seeded permutation), so a group's sample
        # does not depend on which other groups were loaded: a single-language run trains on exactly the
        # rows that language contributes to the federated and the pooled runs.
        groups: dict[str, list[int]] = {}
        for i, value in enumerate(data.train[col]):
            groups.setdefault(str(value), []).append(i)
        keep: list[int] = []
        for value, idx in groups.items():
            digest = int.from_bytes(hashlib.sha256(f"{seed}:{value}".encode()).digest()[:8], "little")
            perm = np.random.default_rng(digest).permutation(len(idx))
            keep += [idx[j] for j in perm[: cfg.max_examples_per_group]]
            dropped += [idx[j] for j in perm[cfg.max_examples_per_group :]]
        order = sorted(keep)
    perm = np.random.default_rng(seed).permutation(len(order))
    order = [order[j] for j in perm]
    if cfg.max_train_examples and len(order) > cfg.max_train_examples:
        dropped += order[cfg.max_train_examples :]
        order = order[: cfg.max_train_examples]
    return order, dropped


def make_partitions(data: LoadedData, cfg: DataConfig, seed: int, num_partitions: int) -> Partitions:
    if num_partitions < 1:
        raise FedHFDataError(f"num-partitions must be >= 1, got {num_partitions}; run with at least one client.")
    rows = prepare_train_rows(data, cfg, seed)
    if len(rows) < num_partitions:
        raise FedHFDataError(
            f"{len(rows)} training rows cannot fill {num_partitions} partitions (some would be empty); "
            f"use fewer clients or more rows (data.max-train-examples)."
        )
    natural_ids = None
    kind = cfg.partitioner
    if kind in ("dirichlet", "inner-dirichlet", "pathological") and data.format != "labels":
        raise FedHFDataError(
            f"config key 'data.partitioner': '{kind}' splits the rows by label, and records of data.format "
            f"'{data.format}' have none; use 'iid', or 'natural' with data.partition-column (e.g. one client per "
            "task type)."
        )
    try:
        if kind == "iid":
            part = IidPartitioner(num_partitions=num_partitions)
        elif kind == "dirichlet":
            part = DirichletPartitioner(
                num_partitions=num_partitions,
                partition_by="label",
                alpha=cfg.dirichlet_alpha,
                min_partition_size=cfg.min_partition_size,
                self_balancing=True,
                shuffle=True,
                seed=seed,
            )
        elif kind == "inner-dirichlet":
            sizes = [len(rows) // num_partitions + (i < len(rows) % num_partitions) for i in range(num_partitions)]
            part = InnerDirichletPartitioner(
                partition_sizes=sizes, partition_by="label", alpha=cfg.dirichlet_alpha, shuffle=True, seed=seed
            )
        elif kind == "pathological":
            k = len(data.label_names)
            if cfg.classes_per_client > k:
                raise FedHFDataError(
                    f"config key 'data.classes-per-client': got {cfg.classes_per_client}, "
                    f"but the dataset has {k} labels; use at most {k}."
                )
            part = PathologicalPartitioner(
                num_partitions=num_partitions,
                partition_by="label",
                num_classes_per_partition=cfg.classes_per_client,
                class_assignment_mode="first-deterministic",
                shuffle=True,
                seed=seed,
            )
        elif kind == "natural":
            col = data.partition_column
            if not col or col not in rows.column_names:
                raise FedHFDataError(
                    "config key 'data.partitioner': 'natural' needs a column with one value per client; "
                    "set data.partition-column (the preset afrisenti has 'language')."
                )
            part = NaturalIdPartitioner(partition_by=col)
        else:  # parse_config already restricts the choices
            raise FedHFDataError(f"config key 'data.partitioner': unknown partitioner '{kind}'.")
        part.dataset = rows
        if kind == "natural":
            n = part.num_partitions
            if n != num_partitions:
                raise FedHFDataError(
                    f"the natural partitioner on '{data.partition_column}' gives {n} clients, "
                    f"but the run has {num_partitions}; "
                    f"run with {n} clients (fedhf run --num-clients {n})."
                )
            natural_ids = [str(part.partition_id_to_natural_id[i]) for i in range(n)]
        shards = [part.load_partition(i) for i in range(num_partitions)]
    except FedHFDataError:
        raise
    except ValueError as exc:  # flwr-datasets' own checks (e.g. Dirichlet min size never reached)
        hint = ""
        if kind == "dirichlet":
            hint = (
                f"; raise data.dirichlet-alpha (now {cfg.dirichlet_alpha}), lower data.min-partition-size (now "
                f"{cfg.min_partition_size}), use fewer clients, or use data.partitioner=inner-dirichlet (equal-size "
                "clients, works at any alpha)"
            )
        raise FedHFDataError(f"partitioner '{kind}' failed for {num_partitions} clients: {exc}{hint}") from None
    for pid, shard in enumerate(shards):
        if len(shard) == 0:
            raise FedHFDataError(
                f"partition {pid} of {num_partitions} is empty with partitioner '{kind}'; use fewer clients, "
                f"more rows (data.max-train-examples) or another partitioner setting."
            )
    parts = [split_local(shard, cfg.local_eval_fraction, seed + pid) for pid, shard in enumerate(shards)]
    return Partitions(parts, data.label_names, natural_ids)


def split_local(
    shard: datasets.Dataset, fraction: float, seed: int
) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    n_eval = int(round(len(shard) * fraction))
    if fraction <= 0 or n_eval < 1 or len(shard) - n_eval < 1:
        return shard, None
    split = shard.train_test_split(test_size=n_eval, seed=seed, shuffle=True)
    return split["train"], split["test"]


@functools.lru_cache(maxsize=4)
def _partitions_cached(cfg: DataConfig, seed: int, num_partitions: int, data_dir: str | None) -> Partitions:
    return make_partitions(load_data(cfg, data_dir), cfg, seed, num_partitions)


def load_partition(
    cfg: DataConfig, seed: int, partition_id: int, num_partitions: int, data_dir: str | None = None
) -> tuple[datasets.Dataset, datasets.Dataset | None, list[str]]:
    """One client's (train, local eval) rows and the label names. Cached per process, keyed on every argument."""
    if not 0 <= partition_id < num_partitions:
        raise FedHFDataError(f"partition-id {partition_id} is outside 0..{num_partitions - 1}; check the node config.")
    if data_dir is None:
        data_dir = os.environ.get(DATA_DIR_ENV) or None
    parts = _partitions_cached(cfg, seed, num_partitions, data_dir)
    train, local_eval = parts.parts[partition_id]
    return train, local_eval, parts.label_names


def central_eval_set(data: LoadedData, cfg: DataConfig, seed: int) -> datasets.Dataset:
    """The server's held-out set: the dataset's test/validation split, capped by max-eval-examples."""
    if data.eval is None or len(data.eval) == 0:
        raise FedHFDataError(
            "the dataset has no test/validation split for central evaluation; add a file named test.* or "
            "validation.* next to train.*."
        )
    ds = data.eval
    if cfg.max_eval_examples and len(ds) > cfg.max_eval_examples:
        ds = ds.shuffle(seed=seed).select(range(cfg.max_eval_examples)).flatten_indices()
    return ds


def format_stats(stats: list[dict[str, Any]], label_names: list[str]) -> str:
    """A plain table of per-client statistics for the console."""
    head = f"{'client':>6}  {'id':<8} {'train':>6} {'eval':>5}  " + "  ".join(f"{n[:10]:>10}" for n in label_names)
    lines = [head]
    for row in stats:
        hist = "  ".join(f"{c:>10}" for c in row["label_histogram"])
        lines.append(
            f"{row['partition_id']:>6}  {str(row.get('natural_id', '')):<8} {row['train_examples']:>6} "
            f"{row['eval_examples']:>5}  {hist}"
        )
    return "\n".join(lines)
