"""What a client keeps on its own disk across rounds and restarts. No Flower here.

With sample-level DP a client's accountant history is its privacy spend: it must survive the
client's process, its SuperNode and the server restarting. Each client keeps, under
``STATE_DIR/<run-uid>/`` (one folder per run, ``run-uid`` sent by the server and kept by
``fedhf run --resume``):

- ``<key>.json``: the accountant history, and a note of the last reply it sent (round, digest
  of the global adapter it trained from, metrics);
- ``<key>.reply.safetensors``: that reply's payload.

The history is written *before* the reply leaves, so a spend is never lost. When the server
restarts and asks for the same round again from the same global adapter (a resumed run
repeating the round that was cut off), the client sends the identical reply again: re-sending
an output already released costs no privacy, while training again would draw fresh noise and
spend a second time.

``<key>`` is ``partition-<id>`` for a partition of a shared dataset, and ``silo-<hash of the
data path>`` for a silo, so a restarted SuperNode finds its state whatever node id it gets.
``STATE_DIR``: node config ``state-dir``, else the folder the server names in simulation
(``RUN_DIR/client-state``), else ``$FEDHF_STATE_DIR``, else ``~/.cache/fedhf/node-state``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedhf.errors import FedHFConfigError, FedHFError

RUN_UID_KEY = "fedhf.run-uid"
STATE_DIR_KEY = "fedhf.state-dir"


class FedHFNodeStateError(FedHFError):
    """The client's saved state cannot be read or written: with DP the client refuses to train."""


def state_dir(node_config: Mapping[str, Any], config: Mapping[str, Any]) -> Path:
    raw = node_config.get("state-dir")
    if raw is not None and str(raw).strip():
        return Path(str(raw)).expanduser()
    sent = config.get(STATE_DIR_KEY)
    if sent:
        return Path(str(sent))
    env = os.environ.get("FEDHF_STATE_DIR")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "fedhf" / "node-state"


def node_key(partition_id: int, data_path: str | None) -> str:
    if data_path is None:
        return f"partition-{int(partition_id)}"
    return "silo-" + hashlib.sha256(str(Path(data_path).expanduser().resolve()).encode()).hexdigest()[:16]


def arrays_digest(arrays: Mapping[str, bytes]) -> str:
    """sha256 over (name, serialised bytes) in name order: identifies the global adapter a round started from."""
    h = hashlib.sha256()
    for k in sorted(arrays):
        h.update(k.encode())
        h.update(b"\0")
        h.update(arrays[k])
    return h.hexdigest()


class NodeStore:
    def __init__(self, root: Path, run_uid: str, key: str) -> None:
        if not run_uid or "/" in run_uid or run_uid in (".", ".."):
            raise FedHFConfigError(f"the server sent run uid {run_uid!r}; run the same fedhf version on server and nodes.")
        self.dir = root / run_uid
        self.json = self.dir / f"{key}.json"
        self.reply_file = self.dir / f"{key}.reply.safetensors"

    def load(self) -> dict[str, Any]:
        if not self.json.is_file():
            return {}
        try:
            data = json.loads(self.json.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise FedHFNodeStateError(
                f"this client's saved privacy state '{self.json}' cannot be read ({exc}); it holds the privacy spent "
                "so far, so the client will not train without it. Restore the file, or start a new run.") from None
        if not isinstance(data, dict):
            raise FedHFNodeStateError(f"this client's saved privacy state '{self.json}' is not a JSON object.")
        return data

    def privacy_state(self) -> dict[str, Any] | None:
        return self.load().get("privacy")

    def replay(self, server_round: int, digest: str) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
        """The reply already sent for this round and global adapter, if any: (arrays, {metrics, info})."""
        last = self.load().get("last_reply")
        if not last or last.get("round") != server_round or last.get("global_digest") != digest:
            return None
        from safetensors.numpy import load_file

        if not self.reply_file.is_file() or _file_sha(self.reply_file) != last.get("payload_sha256"):
            return None  # no usable copy: the client trains again (and accounts the spend again)
        return load_file(str(self.reply_file)), {"metrics": last["metrics"], "info": last["info"]}

    def save(self, privacy: dict[str, Any] | None, reply: dict[str, Any] | None = None,
             arrays: dict[str, np.ndarray] | None = None) -> None:
        """Persist the accountant history (and the reply about to be sent) before the reply leaves."""
        from safetensors.numpy import save

        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            data: dict[str, Any] = {"privacy": privacy}
            if reply is not None and arrays is not None:
                payload = save({k: np.ascontiguousarray(v) for k, v in arrays.items()})
                _atomic_write(self.reply_file, payload)
                data["last_reply"] = {**reply, "payload_sha256": hashlib.sha256(payload).hexdigest()}
            _atomic_write(self.json, (json.dumps(data) + "\n").encode())
        except OSError as exc:
            raise FedHFNodeStateError(
                f"cannot save this client's privacy state under '{self.dir}' ({exc}); with DP the client does not send "
                "an update whose spend it cannot record. Give a writable node config 'state-dir'.") from None


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    with tmp.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _file_sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
