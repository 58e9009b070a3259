"""What a node's privacy spend is kept against: a fingerprint of the data it trains on."""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from fedhf._io import sha256_file
from fedhf.config.schema import DataConfig
from fedhf.data.load import DATA_DIR_ENV, FILE_FORMATS, load_data


def silo_fingerprint(path: str) -> str:
    """sha256 of a silo's data files (names and contents): what a node's privacy spend is kept against."""
    p = Path(path).expanduser()
    files = [p] if p.is_file() else sorted(q for q in p.iterdir() if q.is_file() and q.suffix.lower() in FILE_FORMATS)
    return _fingerprint("silo", [(q.name, _sha256_cached(str(q), *_stat_key(q))) for q in files])


def partition_fingerprint(cfg: DataConfig, partition_id: int, data_dir: str | None = None) -> str:
    """The source of a shared dataset's training rows (file contents, or Hub id and revision) and the partition id.

    The partitioning itself (seed, partitioner, client count, caps) is left out on purpose: any run on
    partition ``partition_id`` of these files counts against one budget, whichever rows it picked.
    """
    if data_dir is None:
        data_dir = os.environ.get(DATA_DIR_ENV) or None
    src = load_data(cfg, data_dir).source
    files = src.get("files", {}).get("train")
    ident: list[Any] = (
        [(Path(f["name"]).name, f["sha256"]) for f in files]
        if files
        else [("hub", src.get("hub_id"), src.get("config"), src.get("revision"), tuple(src.get("languages") or ()))]
    )
    return _fingerprint(f"partition-{int(partition_id)}", ident)


def _fingerprint(kind: str, items: list[Any]) -> str:
    return hashlib.sha256(json.dumps([kind, items]).encode()).hexdigest()


def _stat_key(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


@functools.lru_cache(maxsize=64)
def _sha256_cached(path: str, _size: int, _mtime_ns: int) -> str:
    # Keyed on the path and the file's size and mtime: an edited file is hashed again.
    return sha256_file(path)
