"""What a node keeps on its own disk: its privacy spend on its data, over every run. No Flower here.

A node's sample-level privacy spend belongs to its *data*, not to a run: a new run on the same
rows must start from what earlier runs spent, whoever submits it. So the spend is kept per
dataset fingerprint (:func:`fedhf.data.load.data_fingerprint`: the content of a silo's files, or the
source files and partition id of a shared dataset), under ``STATE_DIR/data-<fingerprint>/``:

- ``spend.json``: one entry per round this node trained with DP on this data, in any run
  (run uid, round, accountant and its id, delta, sigma, C, sampling rate, steps). The run's
  epsilon composes its own entries; the lifetime epsilon composes all of them, with one
  accountant (the runs' own when they agree, else RDP) at the smallest delta any run used.
- ``replies/<run-uid>.json`` and ``.safetensors``: the last reply the node sent in that run, so a
  server that restarts and repeats the round gets the same reply again (re-sending a released
  output costs no privacy; training again would spend a second time).

A round's spend is *reserved* before training starts (written and fsynced under an exclusive
lock), so a process that dies mid-round, or two ClientApp processes of one node that run at once
(a hung round and the next), never lose a spend: both are counted. Unreadable state makes the
node refuse to train (fail closed).

``STATE_DIR``: node config ``state-dir``, else the folder the server names in simulation
(``RUN_DIR/client-state``), else ``$FEDHF_STATE_DIR``, else ``~/.cache/fedhf/node-state``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import secrets
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedhf._io import LockTimeout, atomic_write, atomic_write_json, locked
from fedhf.errors import FedHFConfigError, FedHFNodeStateError

RUN_UID_KEY = "fedhf.run-uid"
STATE_DIR_KEY = "fedhf.state-dir"
FORMAT = 1


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


def legacy_key(partition_id: int, data_path: str | None) -> str:
    """How fedhf <= 0.1 named a node's state file (STATE_DIR/<run-uid>/<key>.json), for importing it."""
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


def new_accountant_id() -> str:
    return secrets.token_hex(8)


@dataclass(frozen=True)
class RunAccount:
    """One run's accounting on this node, as its entries say."""

    accountant: str
    accountant_id: str
    delta: float
    noise_multiplier: float
    max_grad_norm: float
    history: list[tuple[float, float, int]]

    @property
    def steps(self) -> int:
        return sum(h[2] for h in self.history)


class Spend:
    """The loaded ``spend.json`` of one dataset (inside :meth:`SpendStore.transaction`)."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data
        self.changed = False

    @property
    def entries(self) -> list[dict[str, Any]]:
        return self.data["entries"]

    def run_account(self, run_uid: str) -> RunAccount | None:
        mine = [e for e in self.entries if e["run_uid"] == run_uid]
        if not mine:
            return None
        first = mine[0]
        return RunAccount(
            str(first["accountant"]),
            str(first["accountant_id"]),
            float(first["delta"]),
            float(first["noise_multiplier"]),
            float(first["max_grad_norm"]),
            _merged([(float(e["noise_multiplier"]), float(e["sample_rate"]), int(e["steps"])) for e in mine]),
        )

    def lifetime(self, extra: dict[str, Any] | None = None) -> tuple[str, float, list[tuple[float, float, int]]]:
        """(accountant, delta, history) of every entry (and ``extra``): what the lifetime epsilon composes."""
        entries = self.entries + ([extra] if extra else [])
        kinds = {str(e["accountant"]) for e in entries}
        kind = kinds.pop() if len(kinds) == 1 else "rdp"
        delta = min((float(e["delta"]) for e in entries), default=1.0)
        return (
            kind,
            delta,
            _merged([(float(e["noise_multiplier"]), float(e["sample_rate"]), int(e["steps"])) for e in entries]),
        )

    def add(self, entry: dict[str, Any]) -> None:
        self.entries.append({**entry, "at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")})
        self.changed = True

    def runs(self) -> list[str]:
        return sorted({e["run_uid"] for e in self.entries})


def _merged(history: list[tuple[float, float, int]]) -> list[tuple[float, float, int]]:
    """Consecutive (sigma, q) runs merged, as Opacus keeps its history (the epsilon is the same either way)."""
    out: list[tuple[float, float, int]] = []
    for s, q, n in history:
        if out and out[-1][0] == s and out[-1][1] == q:
            out[-1] = (s, q, out[-1][2] + n)
        else:
            out.append((s, q, n))
    return out


class SpendStore:
    """The saved spend of one node on one dataset: ``STATE_DIR/<data key>/``."""

    def __init__(self, root: Path, data_key: str) -> None:
        if not data_key or "/" in data_key or data_key.startswith("."):
            raise ValueError(f"bad data key {data_key!r}")  # computed by fedhf, not user input
        self.root = Path(root)
        self.dir = self.root / data_key
        self.data_key = data_key
        self.file = self.dir / "spend.json"
        self.lock_file = self.dir / ".lock"

    # ------------------------------------------------------------------ the spend
    @contextlib.contextmanager
    def transaction(self, legacy: str | None = None, timeout: float = 120.0) -> Iterator[Spend]:
        """Lock, load, yield the spend; save it (fsynced) if changed and the block raised nothing."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            with locked(self.lock_file, timeout):
                spend = Spend(self._load())
                if legacy:
                    self._import_legacy(spend, legacy)
                yield spend
                if spend.changed:
                    atomic_write_json(self.file, spend.data, indent=1)
        except LockTimeout as exc:
            raise FedHFNodeStateError(
                f"another ClientApp of this node holds its privacy state ({exc}); this round is "
                "refused rather than risk losing a spend. Try again when it has finished."
            ) from None
        except OSError as exc:
            raise FedHFNodeStateError(
                f"cannot read or write this node's privacy state under '{self.dir}' ({exc.strerror or exc}); "
                f"with DP the "
                "node does not send an update whose spend it cannot record. Give a writable node config 'state-dir'."
            ) from None

    def _load(self) -> dict[str, Any]:
        if not self.file.is_file():
            return {"format": FORMAT, "data_key": self.data_key, "entries": [], "imported": []}
        try:
            data = json.loads(self.file.read_text())
            if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("entries"), list):
                raise ValueError("not a fedhf spend file of this format")
            for e in data["entries"]:
                for key in (
                    "run_uid",
                    "accountant",
                    "accountant_id",
                    "delta",
                    "noise_multiplier",
                    "sample_rate",
                    "steps",
                ):
                    if key not in e:
                        raise ValueError(f"an entry lacks '{key}'")
        except (OSError, ValueError, UnicodeDecodeError, TypeError) as exc:
            raise FedHFNodeStateError(
                f"this node's saved privacy spend '{self.file}' cannot be read ({exc}); "
                f"it holds what earlier runs spent "
                "on this data, so the node will not train without it. Restore the file from a backup."
            ) from None
        data.setdefault("imported", [])
        return data

    def _import_legacy(self, spend: Spend, legacy: str) -> None:
        """Spend saved by fedhf <= 0.1 (STATE_DIR/<run-uid>/<legacy key>.json) counts here too, once."""
        for old in sorted(self.root.glob(f"*/{legacy}.json")):
            name = str(old.relative_to(self.root))
            if name in spend.data["imported"]:
                continue
            try:
                privacy = json.loads(old.read_text()).get("privacy")
                history = list(
                    zip(privacy["history-sigma"], privacy["history-q"], privacy["history-steps"], strict=True)
                )
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                raise FedHFNodeStateError(
                    f"this node's saved privacy state '{old}' (written by an older fedhf) cannot be "
                    f"read ({type(exc).__name__}); restore it or remove it knowingly."
                ) from None
            acc_id = new_accountant_id()
            for s, q, n in history:
                spend.add(
                    {
                        "run_uid": old.parent.name,
                        "round": None,
                        "partition_id": None,
                        "accountant": privacy["accountant"],
                        "accountant_id": acc_id,
                        "delta": privacy["delta"],
                        "noise_multiplier": float(s),
                        "max_grad_norm": privacy["max-grad-norm"],
                        "sample_rate": float(q),
                        "steps": int(n),
                        "imported_from": name,
                    }
                )
            spend.data["imported"].append(name)
            spend.changed = True

    # ------------------------------------------------------------------ the last reply of a run
    def _reply_paths(self, run_uid: str) -> tuple[Path, Path]:
        if not run_uid or "/" in run_uid or run_uid.startswith("."):
            raise FedHFConfigError(
                f"the server sent run uid {run_uid!r}; run the same fedhf version on server and nodes."
            )
        base = self.dir / "replies"
        return base / f"{run_uid}.json", base / f"{run_uid}.safetensors"

    def replay(
        self, run_uid: str, server_round: int, digest: str
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
        """The reply already sent for this round and global adapter, if any: (arrays, {metrics, info})."""
        meta_file, payload_file = self._reply_paths(run_uid)
        if not meta_file.is_file():
            return None
        try:
            last = json.loads(meta_file.read_text())
        except (OSError, ValueError, UnicodeDecodeError):
            return None  # no usable copy: the node trains again (and accounts that spend)
        if last.get("round") != server_round or last.get("global_digest") != digest:
            return None
        from safetensors.numpy import load

        try:
            raw = payload_file.read_bytes()
        except OSError:
            return None
        if hashlib.sha256(raw).hexdigest() != last.get("payload_sha256"):
            return None
        return load(raw), {"metrics": last["metrics"], "info": last["info"]}

    def save_reply(self, run_uid: str, reply: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        from safetensors.numpy import save

        meta_file, payload_file = self._reply_paths(run_uid)
        try:
            meta_file.parent.mkdir(parents=True, exist_ok=True)
            payload = save({k: np.ascontiguousarray(v) for k, v in arrays.items()})
            atomic_write(payload_file, payload)
            atomic_write_json(meta_file, {**reply, "payload_sha256": hashlib.sha256(payload).hexdigest()}, indent=None)
        except OSError as exc:
            raise FedHFNodeStateError(
                f"cannot save this node's reply under '{meta_file.parent}' ({exc.strerror or exc}); "
                "give a writable node config 'state-dir'."
            ) from None

    # ------------------------------------------------------------------ personal adapters (personalization)
    def personal_path(self, run_uid: str, kind: str) -> Path:
        """Where this node keeps a personal adapter of a run: ``personal/<run-uid>.<kind>.safetensors``."""
        meta, _ = self._reply_paths(run_uid)  # checks the run uid
        return self.dir / "personal" / f"{meta.stem}.{kind}.safetensors"

    def save_personal(self, run_uid: str, kind: str, arrays: Mapping[str, np.ndarray]) -> Path:
        from safetensors.numpy import save

        path = self.personal_path(run_uid, kind)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, save({k: np.ascontiguousarray(v) for k, v in arrays.items()}))
        except OSError as exc:
            raise FedHFNodeStateError(
                f"cannot save this node's personal adapter under '{path.parent}' ({exc.strerror or exc}); "
                "give a writable node config 'state-dir'."
            ) from None
        return path

    def load_personal(self, run_uid: str, kind: str) -> dict[str, np.ndarray] | None:
        """The personal adapter saved in an earlier round, or None (the first round); unreadable state raises."""
        from safetensors import SafetensorError
        from safetensors.numpy import load

        path = self.personal_path(run_uid, kind)
        if not path.is_file():
            return None
        try:
            return load(path.read_bytes())
        except (OSError, SafetensorError) as exc:
            raise FedHFNodeStateError(
                f"this node's personal adapter '{path}' cannot be read ({exc}); remove it to start the personal "
                "part over."
            ) from None

    def drop_replies(self, run_uid: str) -> None:
        for f in self._reply_paths(run_uid):
            with contextlib.suppress(FileNotFoundError):
                f.unlink()


def stores_in(root: Path) -> list[SpendStore]:
    """Every dataset's store under a state folder."""
    if not root.is_dir():
        return []
    return [SpendStore(root, d.name) for d in sorted(root.iterdir()) if d.is_dir() and (d / "spend.json").is_file()]
