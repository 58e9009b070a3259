"""A SuperNode's node config: which data it holds, its owner's privacy budget. No torch, no Flower.

Kept apart from ``fedhf.client`` so that ``fedhf node-check`` (and the ClientApp's messages that
do not train) can read a node config without importing the training stack.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedhf.config import FedHFConfig, parse_node_budgets
from fedhf.data import load_partition, load_silo
from fedhf.errors import FedHFConfigError


@dataclass(frozen=True)
class Node:
    """What this node holds: its id in the records, and where its rows come from."""

    pid: int
    num_partitions: int | None  # None: a silo with its own data at data_path
    data_path: str | None

    def data(self, cfg: FedHFConfig, label_names: list[str] | None) -> tuple[Any, Any, list[str]]:
        """(train rows, local eval rows or None, label names)."""
        if self.data_path is not None:
            if not label_names:
                raise FedHFConfigError("node config 'data-path' needs the federation's label names from the server; "
                                       "run the same fedhf version on the server and the nodes.")
            return load_silo(cfg.data, self.data_path, tuple(label_names), cfg.seed)
        return load_partition(cfg.data, cfg.seed, self.pid, self.num_partitions)


def node_of(node_config: Mapping[str, Any], node_id: int) -> Node:
    """Read and check a SuperNode's node config (errors name the key and the fix, on the node where they happen)."""
    path = node_config.get("data-path")
    if path is not None and str(path).strip():
        raw_pid = node_config.get("partition-id")
        try:
            pid = int(raw_pid) if raw_pid not in (None, "") else int(node_id)
        except (TypeError, ValueError):
            raise FedHFConfigError(f"node config 'partition-id': got {raw_pid!r}; give an integer or leave it out "
                                   "with data-path (the node id is used).") from None
        return Node(pid, None, str(path))
    try:
        pid, n = int(node_config["partition-id"]), int(node_config["num-partitions"])
    except (KeyError, ValueError, TypeError):
        raise FedHFConfigError(
            f"node config needs 'data-path' (this silo's data) or integer 'partition-id' and 'num-partitions' "
            f"(got {dict(node_config)}); start the SuperNode with --node-config 'data-path=\"/data/silo\"' or "
            "--node-config \"partition-id=0 num-partitions=2\"."
        ) from None
    return Node(pid, n, None)


def node_budget(cfg: FedHFConfig, node_config: Mapping[str, Any], pid: int) -> float | None:
    """The data owner's budget: node config 'max-epsilon', else privacy.node-max-epsilon, else privacy.max-epsilon."""
    raw = node_config.get("max-epsilon")
    if raw is not None and raw != "":
        try:
            value = float(raw)
        except (TypeError, ValueError):
            value = float("nan")
        if not value > 0 or value == float("inf"):
            raise FedHFConfigError(f"node config 'max-epsilon': got {raw!r}; give a positive number, e.g. max-epsilon=4.0.")
        return value
    per_node = parse_node_budgets(cfg.privacy.node_max_epsilon)
    return per_node.get(pid, cfg.privacy.max_epsilon)


