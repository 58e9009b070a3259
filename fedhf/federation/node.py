"""A SuperNode's node config: which data it holds (its owner's policy: ``fedhf.privacy.policy``). No torch, no Flower.

Kept apart from ``fedhf.federation.client`` so that ``fedhf node-check`` (and the ClientApp's messages that
do not train) can read a node config without importing the training stack.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedhf.config.schema import FedHFConfig
from fedhf.data.partitions import load_partition
from fedhf.data.silos import load_silo
from fedhf.errors import FedHFConfigError
from fedhf.privacy.policy import POLICY_KEYS

# Every node-config key fedhf reads (fedhf node-check refuses others; fault injection is for tests).
NODE_CONFIG_KEYS = (
    "data-path",
    "partition-id",
    "num-partitions",
    *POLICY_KEYS,
    "state-dir",
    "lora-rank",
    "allow-canaries",
    "fail-at-round",
    "fail-mode",
    "fail-seconds",
)


@dataclass(frozen=True)
class Node:
    """What this node holds: its id in the records, and where its rows come from."""

    pid: int
    num_partitions: int | None  # None: a silo with its own data at data_path
    data_path: str | None

    def data(self, cfg: FedHFConfig, label_names: list[str] | None) -> tuple[Any, Any, list[str]]:
        """(train rows, local eval rows or None, label names)."""
        if self.data_path is not None:
            if label_names is None or (not label_names and cfg.model.task != "causal-lm"):  # []: records
                raise FedHFConfigError(
                    "node config 'data-path' needs the federation's label names from the server; "
                    "run the same fedhf version on the server and the nodes."
                )
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
            raise FedHFConfigError(
                f"node config 'partition-id': got {raw_pid!r}; give an integer or leave it out "
                "with data-path (the node id is used)."
            ) from None
        return Node(pid, None, str(path))
    try:
        pid, n = int(node_config["partition-id"]), int(node_config["num-partitions"])
    except (KeyError, ValueError, TypeError):
        raise FedHFConfigError(
            f"node config needs 'data-path' (this silo's data) or integer 'partition-id' and 'num-partitions' "
            f"(got {dict(node_config)}); start the SuperNode with --node-config 'data-path=\"/data/silo\"' or "
            '--node-config "partition-id=0 num-partitions=2".',
            public="node config needs 'data-path' or integer 'partition-id' and 'num-partitions'.",
        ) from None
    return Node(pid, n, None)


def node_lora_rank(node_config: Mapping[str, Any]) -> int | None:
    """The LoRA rank this node trains (node config ``lora-rank``: its owner's word, for its compute), or None."""
    raw = node_config.get("lora-rank")
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return None
    try:
        rank = int(raw)
    except (TypeError, ValueError):
        rank = 0
    if isinstance(raw, bool) or rank < 1 or str(rank) != str(raw).strip():
        raise FedHFConfigError(
            f"node config 'lora-rank': got {raw!r}; give a whole number >= 1 (at most the run's model.lora.r), "
            "or leave it out to train at the run's rank."
        )
    return rank


def node_allows_canaries(node_config: Mapping[str, Any]) -> bool:
    """Whether this node's owner lets a run add the audit's canary records to its training rows (node config
    ``allow-canaries``, default false): records that the run config, not the owner, wrote."""
    raw = node_config.get("allow-canaries", False)
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.strip().lower() in ("true", "false", ""):
        return raw.strip().lower() == "true"
    raise FedHFConfigError(f"node config 'allow-canaries': got {raw!r}; give true or false.")


SIMULATED_KEYS = tuple(k for k in NODE_CONFIG_KEYS if k not in ("data-path", "partition-id", "num-partitions"))


def load_node_config_file(path: str | Path, num_clients: int) -> dict[int, dict[str, Any]]:
    """The simulated nodes' configs for ``fedhf run --node-config FILE``: the owners' word, never the run config's.

    TOML with an optional ``[default]`` table for every node and ``[nodes.N]`` tables for partition N,
    holding node-config keys (``fedhf.privacy.policy``, ``state-dir``, fault injection). The simulation assigns
    ``partition-id`` and ``num-partitions`` itself.
    """
    import tomllib

    from fedhf.federation import faults
    from fedhf.privacy.policy import parse_policy

    p = Path(path)
    if not p.is_file():
        raise FedHFConfigError(
            f"--node-config {str(path)!r}: no such file; give a TOML file with [default] and "
            "[nodes.N] tables of node-config keys."
        )
    try:
        with p.open("rb") as fh:
            raw = tomllib.load(fh)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise FedHFConfigError(f"--node-config {str(path)!r}: not valid TOML ({exc}).") from None
    unknown = sorted(set(raw) - {"default", "nodes"})
    if unknown:
        raise FedHFConfigError(
            f"--node-config {str(path)!r}: unknown table '{unknown[0]}'; use [default] and [nodes.N]."
        )
    default = raw.get("default", {})
    nodes = raw.get("nodes", {})
    if not isinstance(default, dict) or not isinstance(nodes, dict):
        raise FedHFConfigError(f"--node-config {str(path)!r}: [default] and [nodes.N] must be tables.")
    out: dict[int, dict[str, Any]] = {}
    for key, table in nodes.items():
        try:
            pid = int(key)
        except ValueError:
            pid = -1
        if not 0 <= pid < num_clients or not isinstance(table, dict):
            raise FedHFConfigError(
                f"--node-config {str(path)!r}: [nodes.{key}] must name a partition id 0..{num_clients - 1} "
                "and hold node-config keys."
            )
        out[pid] = table
    merged = {pid: {**default, **out.get(pid, {})} for pid in range(num_clients)}
    for pid, entries in merged.items():
        bad = sorted(set(entries) - set(SIMULATED_KEYS))
        if bad:
            raise FedHFConfigError(
                f"--node-config {str(path)!r}: node config key '{bad[0]}' (partition {pid}) is not one "
                f"a simulated node takes; allowed: {', '.join(SIMULATED_KEYS)}."
            )
        parse_policy(entries)
        node_lora_rank(entries)
        node_allows_canaries(entries)
        faults.planned(entries, pid, 1)
    return merged
