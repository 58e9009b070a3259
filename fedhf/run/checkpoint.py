"""Per-round checkpoints of a run, and reading them back for ``fedhf run --resume``. No Flower here.

After every round (and after the initial evaluation, round 0) the server writes what a restart
needs into ``RUN_DIR/checkpoints/round-NNNN/``:

- ``adapter.safetensors``: the global adapter after the round;
- ``strategy.safetensors``: the strategy's arrays (FedAdam/FedYogi moments ``m_t/…``, ``v_t/…``);
- ``state.json``: the round, the run's identity (``run_uid``, config hash), the strategy's
  scalars (adaptive clipping norm, the client-level accountant's history) and the run record
  (``run.json`` as it stood at the end of the round: metrics, privacy ledger, failures).

The folder is written under a temporary name and renamed; then ``RUN_DIR/checkpoint.json``
(the pointer: round, folder, and the sha256 of every file) is replaced atomically. A crash at
any point leaves the previous checkpoint intact; a resume verifies every file's hash, so a
truncated or altered checkpoint is refused with a clear error rather than half-loaded.

The clients' own accountant histories are not here: each client keeps its own on its machine
(see ``fedhf.federation.node_state``); the server's ledger in ``state.json`` is what they reported.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedhf._io import atomic_write, fsync_dir, sha256_file
from fedhf.errors import FedHFCheckpointError
from fedhf.run.record import check_run_folder

POINTER = "checkpoint.json"
FOLDER = "checkpoints"
FORMAT = 1


@dataclass
class Checkpoint:
    round: int
    arrays: dict[str, np.ndarray]
    strategy_arrays: dict[str, np.ndarray]
    strategy: dict[str, Any]
    run: dict[str, Any]
    path: Path


_sha256 = sha256_file
ROUND_NAME = re.compile(r"^round-\d{4,}$")
TMP_NAME = re.compile(r"^\.round-\d{4,}\.tmp-\d+$")


def _fsync_write(path: Path, data: bytes) -> None:
    with path.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _save_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save

    _fsync_write(path, save({k: np.ascontiguousarray(v) for k, v in arrays.items()}))


def save_checkpoint(
    run_dir: Path,
    server_round: int,
    *,
    run_uid: str,
    config_sha256: str,
    arrays: dict[str, np.ndarray],
    strategy_arrays: dict[str, np.ndarray],
    strategy_state: dict[str, Any],
    run_record: dict[str, Any],
) -> Path:
    """Write round ``server_round``'s checkpoint (temporary folder, rename, then the pointer); drop older ones.

    Every file and both folders are fsynced; only folders named as fedhf names them are ever removed.
    """
    check_run_folder(run_dir, "writing a checkpoint")
    root = run_dir / FOLDER
    root.mkdir(exist_ok=True)
    name = f"round-{server_round:04d}"
    tmp = root / f".{name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    _save_arrays(tmp / "adapter.safetensors", arrays)
    _save_arrays(tmp / "strategy.safetensors", strategy_arrays)
    state = {
        "format": FORMAT,
        "round": server_round,
        "run_uid": run_uid,
        "config_sha256": config_sha256,
        "strategy": strategy_state,
        "run": run_record,
    }
    _fsync_write(tmp / "state.json", (json.dumps(state, indent=1) + "\n").encode())
    fsync_dir(tmp)
    final = root / name
    if final.exists():  # a previous attempt at this round died after the rename, before the pointer
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_dir(root)
    pointer = {
        "format": FORMAT,
        "round": server_round,
        "folder": f"{FOLDER}/{name}",
        "run_uid": run_uid,
        "config_sha256": config_sha256,
        "sha256": {f.name: _sha256(f) for f in sorted(final.iterdir())},
    }
    atomic_write(run_dir / POINTER, (json.dumps(pointer, indent=1) + "\n").encode())
    for old in root.iterdir():  # only the pointed-to checkpoint is kept; nothing fedhf did not name is touched
        if old.name != name and old.is_dir() and (ROUND_NAME.match(old.name) or TMP_NAME.match(old.name)):
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(run_dir: Path, *, run_uid: str | None = None, config_sha256: str | None = None) -> Checkpoint:
    """The checkpoint RUN_DIR/checkpoint.json points to, every file verified; FedHFCheckpointError otherwise."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    pointer_path = run_dir / POINTER
    if not pointer_path.is_file():
        raise FedHFCheckpointError(
            f"--resume '{run_dir}': no {POINTER}; the run stopped before its first checkpoint (the initial "
            "evaluation). Start it again with fedhf run."
        )
    try:
        pointer = json.loads(pointer_path.read_text())
        folder = run_dir / str(pointer["folder"])
        hashes = dict(pointer["sha256"])
        server_round = int(pointer["round"])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as exc:
        raise FedHFCheckpointError(
            f"--resume '{run_dir}': {POINTER} is damaged ({type(exc).__name__}: {exc}); "
            "the run cannot be resumed, start it again."
        ) from None
    for name in ("adapter.safetensors", "strategy.safetensors", "state.json"):
        f = folder / name
        if not f.is_file():
            raise FedHFCheckpointError(
                f"--resume '{run_dir}': checkpoint file '{f}' is missing; the checkpoint is "
                "incomplete, start the run again."
            )
        if hashes.get(name) != _sha256(f):
            raise FedHFCheckpointError(
                f"--resume '{run_dir}': checkpoint file '{f}' does not match its recorded "
                "sha256 (truncated or altered); start the run again."
            )
    try:
        state = json.loads((folder / "state.json").read_text())
        arrays = load_file(str(folder / "adapter.safetensors"))
        strategy_arrays = load_file(str(folder / "strategy.safetensors"))
    except (json.JSONDecodeError, UnicodeDecodeError, SafetensorError, OSError) as exc:
        raise FedHFCheckpointError(f"--resume '{run_dir}': the checkpoint cannot be read ({exc}).") from None
    for key, expected, what in (("run_uid", run_uid, "run"), ("config_sha256", config_sha256, "configuration")):
        if expected is not None and (state.get(key) != expected or pointer.get(key) != expected):
            raise FedHFCheckpointError(
                f"--resume '{run_dir}': the checkpoint belongs to another {what} ({key} {state.get(key)!r}, the run "
                f"folder's run.json says {expected!r}); was it copied from another run folder?"
            )
    if state.get("round") != server_round or not isinstance(state.get("run"), dict):
        raise FedHFCheckpointError(f"--resume '{run_dir}': the checkpoint's state.json does not match its pointer.")
    return Checkpoint(server_round, arrays, strategy_arrays, dict(state.get("strategy", {})), state["run"], folder)
