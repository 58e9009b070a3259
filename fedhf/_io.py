"""The one way fedhf writes a file that must survive a crash, and the one way it hashes a file.

``atomic_write`` writes to a temporary name in the same folder, fsyncs the file, renames it over
the target and fsyncs the folder, so that after a power cut the target holds either the old or the
new content, never a mix, and the rename itself is on disk. Everything that holds a privacy spend,
a checkpoint or the run record goes through it.

``locked`` is an exclusive advisory lock (``fcntl.flock``) on a lock file, for a node's saved state:
two ClientApp processes of one node (a hung round and the next one) take turns instead of
overwriting each other's spend.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fedhf.errors import LockTimeout


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (a rename or a new file in it) to disk."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``: temporary file, fsync, rename, fsync of the folder."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any, *, indent: int | None = 2) -> None:
    atomic_write(path, (json.dumps(obj, indent=indent) + "\n").encode())


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def locked(lock_file: Path, timeout: float = 120.0) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_file`` (created if absent) for the block; LockTimeout after ``timeout`` s."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise LockTimeout(f"'{lock_file}' stayed locked by another process for {timeout:g} s") from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
