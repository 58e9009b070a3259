"""run.json and its one owner: every read and write of a run's record goes through :class:`RunStore`.

A record is written atomically and fsynced (``fedhf._io.atomic_write_json``), so a reader never
sees half a file and a crash leaves the last complete version. Its keys are snake_case throughout
(the reply fields clients send in Flower's words, ``partition-id``, ``num-examples``, are renamed
on the way in); ``schema_version`` says which layout it has. ``fedhf/run/run.schema.json`` is its
JSON Schema (the docs show it, the tests validate real runs against it).

Records of fedhf 0.1 (no ``schema_version``: kebab-case keys in the per-client entries) are read
and upgraded in memory; a record from a newer fedhf is refused with a message that says so.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedhf._io import atomic_write_json
from fedhf.errors import FedHFRunError

RUN_JSON = "run.json"
SCHEMA_VERSION = 2
SCHEMA_FILE = Path(__file__).with_name("run.schema.json")

# Lists of per-client entries whose keys came from the wire (Flower's kebab-case words) in schema 1.
_ROUND_ENTRIES = ("clients", "failures", "rejected", "refused")


def snake_keys(obj: Any) -> Any:
    """``obj`` with every dict key's dashes turned into underscores, recursively (values are left alone)."""
    if isinstance(obj, dict):
        return {str(k).replace("-", "_"): snake_keys(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [snake_keys(v) for v in obj]
    return obj


def upgrade(record: dict[str, Any], where: str = "run.json") -> dict[str, Any]:
    """The record in the current layout: schema 1 is upgraded, a newer schema refused."""
    version = record.get("schema_version", 1)
    if not isinstance(version, int) or version < 1:
        raise FedHFRunError(f"'{where}' has schema_version {version!r}; it was not written by fedhf.")
    if version > SCHEMA_VERSION:
        raise FedHFRunError(
            f"'{where}' has schema_version {version}, newer than this fedhf reads ({SCHEMA_VERSION}); "
            "upgrade fedhf to read it."
        )
    if version == 1:
        record = dict(record)
        for r in record.get("rounds", []):
            for key in _ROUND_ENTRIES:
                if key in r:
                    r[key] = snake_keys(r[key])
        for key in ("partitions", "refusals"):
            if key in record:
                record[key] = snake_keys(record[key])
        if "secure_aggregation" in record:
            record["secure_aggregation"] = snake_keys(record["secure_aggregation"])
        record["schema_version"] = SCHEMA_VERSION
    return record


class RunStore:
    """The record of the run in ``run_dir``."""

    def __init__(self, run_dir: str | Path) -> None:
        self.dir = Path(run_dir)
        self.path = self.dir / RUN_JSON

    def exists(self) -> bool:
        return self.path.is_file()

    def read(self, what: str = "") -> dict[str, Any]:
        """The record, upgraded to the current layout; FedHFRunError naming the file when it cannot be used."""
        prefix = f"{what}: " if what else ""
        if not self.dir.is_dir():
            raise FedHFRunError(f"{prefix}'{self.dir}' is not a folder; give a run folder (outputs/<run-id>).")
        if not self.path.is_file():
            raise FedHFRunError(f"{prefix}'{self.dir}' is not a fedhf run folder (no run.json); give outputs/<run-id>.")
        try:
            record = json.loads(self.path.read_text())
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise FedHFRunError(
                f"{prefix}'{self.path}' cannot be read ({type(exc).__name__}: {str(exc)[:120]}); the "
                "run folder is damaged."
            ) from None
        if not isinstance(record, dict) or "status" not in record:
            raise FedHFRunError(f"{prefix}'{self.path}' is not a fedhf run.json (no status).")
        return upgrade(record, str(self.path))

    def read_finished(self, what: str) -> dict[str, Any]:
        "The record of a complete run with its adapter (for report, audit, evaluate, push); a clear error otherwise."
        record = self.read(what)
        if record["status"] != "complete":
            why = f": {record['error']}" if record.get("error") else ""
            raise FedHFRunError(
                f"{what}: '{self.dir}' is not a finished run (status '{record['status']}'{why}); "
                "wait for it to complete or run it again."
            )
        if not (self.dir / "adapter" / "adapter_model.safetensors").is_file():
            raise FedHFRunError(
                f"{what}: '{self.dir}' has no adapter/adapter_model.safetensors; the run folder is incomplete."
            )
        for key in ("config", "dataset", "rounds", "final"):
            if key not in record:
                raise FedHFRunError(f"{what}: '{self.path}' lacks '{key}'; it was not written by a complete fedhf run.")
        return record

    def write(self, record: dict[str, Any]) -> None:
        """Write the whole record (atomic, fsynced), in the current layout."""
        if record.get("schema_version") != SCHEMA_VERSION:
            record["schema_version"] = SCHEMA_VERSION
        atomic_write_json(self.path, {k: v for k, v in record.items() if not k.startswith("_")})

    def update(self, what: str, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        """Read, change in place, write: how post-run commands add their results (evaluations, audit)."""
        record = self.read(what)
        change(record)
        self.write(record)
        return record


def load_run(run_dir: str | Path) -> dict[str, Any]:
    """The record of the run in ``run_dir`` (any status)."""
    return RunStore(run_dir).read()


def load_finished_run(run_dir: str | Path, what: str) -> dict[str, Any]:
    """The record of a complete run, for ``what`` (report, audit, evaluate), with ``_dir`` (never written back)."""
    record = RunStore(run_dir).read_finished(what)
    record["_dir"] = str(Path(run_dir))
    return record


def schema() -> dict[str, Any]:
    """run.json's JSON Schema (draft 2020-12)."""
    return json.loads(SCHEMA_FILE.read_text())
