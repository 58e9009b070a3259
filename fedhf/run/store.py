"""run.json and its one owner: the typed run record (:class:`RunRecord`) and the store that reads and writes it.

A record is a tree of dataclasses; :class:`RunStore` turns it into ``run.json`` and back, atomically
and fsynced (``fedhf._io.atomic_write_json``), so a reader never sees half a file and a crash leaves
the last complete version. Its keys are snake_case throughout (the reply fields clients send in
Flower's words, ``partition-id``, ``num-examples``, are renamed on the way in); ``schema_version``
says which layout it has. ``fedhf/run/run.schema.json`` is its JSON Schema (the docs show it, the
tests validate real runs against it and check that it names the dataclasses' fields).

What the dataclasses type is the record's own shape. Four parts stay maps, each because another
stage decides its keys: the flat config (``fedhf.config``), a client's reply entry (its fields are
those its owner's policy shares: ``fedhf.federation.replies``), a client's sample-level ledger entry
and the client-level account (``fedhf.privacy.ledger``, pure functions over maps; the strategy),
and the results of ``fedhf evaluate`` and ``fedhf audit`` (the task's metrics, the audit's figures).

Records of fedhf 0.1 (no ``schema_version``: kebab-case keys in the per-client entries) are read
and upgraded in memory; a record from a newer fedhf is refused with a message that says so, and so is
a record with a key this fedhf does not know (it was not written by this schema).
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedhf._io import atomic_write_json
from fedhf.errors import FedHFRunError
from fedhf.privacy.ledger import OPTIONAL, Privacy, RoundPrivacy

RUN_JSON = "run.json"
SCHEMA_VERSION = 2
SCHEMA_FILE = Path(__file__).with_name("run.schema.json")

# Lists of per-client entries whose keys came from the wire (Flower's kebab-case words) in schema 1.
_ROUND_ENTRIES = ("clients", "failures", "rejected", "refused")

# Config keys added after the first runs, with the value the runs without them used: ``RunRecord.settings`` reads an
# old record's config as if it named them (so its card states what it trained with). ``config`` itself stays as
# recorded: it is what config_sha256 hashes and what a resume checks.
CONFIG_BEFORE_KEY = {
    "data.format": "labels",
    "model.task": "text-classification",
    "model.pooling": "cls",
    "model.adapter": "lora",
    "model.hub-id": "",
    "model.sample-prompts": 0,
    "train.optimizer": "adamw",
    "train.momentum": 0.0,
    "train.lr-schedule": "constant",
    "train.loss-on": "response",
    "transport.dtype": "fp32",
    "strategy.lora-aggregation": "mean",
    "strategy.central-eval-every": 1,
    "personalization.mode": "none",
    "personalization.epochs": 1,
    "personalization.lr": "",
    "personalization.keep-local": "head",
    "personalization.ditto-lambda": 0.1,
    "personalization.local-only": True,
    "audit.canaries": 0,
    "audit.canary-repeats": 10,
    "audit.canary-client": 0,
}


def _optional(default: Any = None, *, factory: Callable[[], Any] | None = None) -> Any:
    """A field that run.json leaves out while it is empty (None, [] or {}) and that reads as empty when absent."""
    if factory is not None:
        return field(default_factory=factory, metadata=OPTIONAL)
    return field(default=default, metadata=OPTIONAL)


# ---------------------------------------------------------------------------------------------------- the record
@dataclass
class Seeds:
    """The seeds the run drew its randomness from (the clients' shuffles and dropout derive from ``seed``)."""

    seed: int
    partition: int | None = _optional()
    model_init: int | None = _optional()
    client_shuffle_and_dropout: str | None = _optional()


@dataclass
class Dataset:
    """The data the run was given (the server's copy: name, files and their hashes, label names, row counts)."""

    name: str
    source: dict[str, Any]  # the files and their hashes, or the Hub dataset (fedhf.data.load)
    label_names: list[str]
    train_rows: int
    central_eval_rows: int
    preset: str | None = _optional()
    license: str | None = _optional()
    citation: str | None = _optional()
    format: str | None = _optional()  # data.format as resolved from the columns (labels, instruction, messages)


@dataclass
class Model:
    """The base model and the adapter trained on it: sizes in parameters and bytes, where the base was loaded from."""

    name: str
    trainable_params: int
    total_params: int
    adapter_bytes: int
    model_bytes: int
    task: str | None = _optional()
    resolved_from: str | None = _optional()
    base_is_local_folder: bool | None = _optional()
    adapter_tensors: int | None = _optional()
    lora_target_modules: list[str] | None = _optional()  # as resolved (model.lora.target-modules = auto)


@dataclass
class Partition:
    """One client's data as the server computed it, or as the client reported it (``source: client``)."""

    partition_id: int
    train_examples: int | None = _optional()
    eval_examples: int | None = _optional()
    label_histogram: list[int] | None = _optional()
    natural_id: str | int | None = _optional()
    source: str | None = _optional()


@dataclass
class Round:
    """One round: the central evaluation after it, what the clients sent (screened) and what it cost.

    Round 0 is the evaluation of the initial adapter (nothing trained: its client fields are empty).
    """

    round: int
    eval_loss: float | None = None  # the central evaluation after the round; None where strategy.central-eval-every
    # skipped it (round 0 and the last round of a complete or stopped run always have one)
    eval_accuracy: float | None = None
    eval_f1: float | None = None
    train_loss: float | None = None
    local_eval_loss: float | None = None
    local_eval_accuracy: float | None = None
    bytes_up: int | None = None
    bytes_down: int | None = None
    wall_seconds: float | None = None
    central_eval_seconds: float | None = None
    clients_sampled: int = 0
    client_train_seconds: dict[str, float] = field(default_factory=dict)
    client_handler_seconds: dict[str, float] = field(default_factory=dict)
    client_eval_seconds: list[float] = field(default_factory=list)
    clients: list[dict[str, Any]] = field(default_factory=list)  # reply entries: the fields each policy shared
    failures: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    refused: list[dict[str, Any]] = field(default_factory=list)
    weighting: str | None = _optional()
    privacy: RoundPrivacy | None = _optional()
    generations: list[str] = _optional(factory=list)  # the global adapter's answer to each of RunRecord.sample_prompts

    @property
    def trained(self) -> list[dict[str, Any]]:
        return [c for c in self.clients if c.get("status") == "trained"]


@dataclass
class Federation:
    """How the federation ran: the engine (``simulation`` or ``flower``) and, where known, its clients."""

    engine: str
    num_clients: int | None = None


@dataclass
class Refusal:
    """A node that refused the run by its owner's policy (kept at the run level: such a round may end the run)."""

    round: int
    partition_id: int | None = _optional()
    node_id: int | None = _optional()
    rule: str = ""
    reason: str = ""


@dataclass
class Resume:
    """One continuation of the run from its last checkpoint, and how the interrupted attempt ended."""

    at: str
    from_round: int
    interrupted_attempt: dict[str, Any] = field(default_factory=dict)


@dataclass
class Final:
    """The released adapter's central evaluation (the last round's)."""

    eval_loss: float
    eval_accuracy: float
    eval_f1: float


@dataclass
class StoppedEarly:
    """Why the run ended before its last round, and after which round."""

    after_round: int
    reason: str


@dataclass
class Personalization:
    """What the federation gave each client, measured on its own held-out rows after the last round
    (``fedhf.federation.personal``): the global adapter, the personalized one and the local-only baseline."""

    mode: str  # personalization.mode
    epochs: int
    released: str  # what of the personal adapters left the nodes, and to whom
    keep_local: str | None = _optional()  # fedrep: what stayed on the clients
    ditto_lambda: float | None = _optional()
    local_only: bool = False  # whether the local-only baseline was trained
    clients: list[dict[str, Any]] = field(default_factory=list)  # per client: its screened reply (what it shares)
    summary: dict[str, Any] = _optional(factory=dict)  # per stage: mean macro-F1 and accuracy; clients where it wins


@dataclass
class HubPush:
    """The outcome of pushing the Hub folder at the end of the run (``hub.push``)."""

    repo_id: str
    ok: bool
    commit_url: str | None = _optional()
    error: str | None = _optional()


@dataclass
class RunRecord:
    """What a run did, as ``run.json`` holds it (schema 2)."""

    run_id: str
    run_uid: str
    status: str  # running, complete, failed or stopped
    started: str
    config: dict[str, Any]  # the flat config (``FedHFConfig.to_flat``), hashed into config_sha256
    config_sha256: str
    seeds: Seeds
    versions: dict[str, str | None]
    python: str
    schema_version: int = SCHEMA_VERSION
    finished: str | None = None
    git_commit: str | None = None
    dataset: Dataset | None = _optional()  # set once the data is loaded
    model: Model | None = _optional()  # set once the model is built
    partitions: list[Partition] = field(default_factory=list)
    rounds: list[Round] = field(default_factory=list)
    federation: Federation | None = _optional()
    shared: dict[str, list[str]] = _optional(factory=dict)  # the fields each client's policy shares
    privacy: Privacy | None = _optional()
    secure_aggregation: dict[str, Any] | None = _optional()  # SecAgg+'s settings and rounds (fedhf.flower.secagg)
    refusals: list[Refusal] = _optional(factory=list)
    resumes: list[Resume] = _optional(factory=list)
    final: Final | None = _optional()
    personalization: Personalization | None = _optional()
    stopped_early: StoppedEarly | None = _optional()
    hub_folder: str | None = _optional()
    hub_push: HubPush | None = _optional()
    plots_error: str | None = _optional()
    error: str | None = _optional()
    evaluations: list[dict[str, Any]] = _optional(factory=list)  # fedhf evaluate: the data and the task's metrics
    audit: dict[str, Any] | None = _optional()  # fedhf audit's figures (fedhf.analysis.audit)
    canaries: dict[str, Any] | None = _optional()  # audit.canaries: where they went and their secrets
    sample_prompts: list[dict[str, Any]] = _optional(factory=list)  # model.sample-prompts: eval rows (text, answer)

    @property
    def settings(self) -> dict[str, Any]:
        """The run's config as it ran: ``config``, with the keys fedhf added since read at the values the run used."""
        return {**CONFIG_BEFORE_KEY, **self.config}

    @property
    def trained_rounds(self) -> list[Round]:
        return [r for r in self.rounds if r.round > 0]

    @property
    def dp(self) -> bool:
        return self.privacy is not None and self.privacy.mode != "none"

    def to_dict(self) -> dict[str, Any]:
        """The record as run.json holds it (a fresh tree of plain values)."""
        return as_json(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "run.json") -> RunRecord:
        """The record of a run.json (upgraded to the current layout); FedHFRunError naming the key otherwise."""
        return _from_json(cls, upgrade(data, where), where, "")


# ---------------------------------------------------------------------------------------------- (de)serialising
def as_json(obj: Any) -> Any:
    """A part of the record as run.json holds it: plain values, optional fields left out while empty."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if f.metadata.get("omit_empty") and (value is None or value == [] or value == {}):
                continue
            out[f.name] = as_json(value)
        return out
    if isinstance(obj, dict):
        return {str(k): as_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [as_json(v) for v in obj]
    return obj


def _strip_none(hint: Any) -> Any:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0] if len(args) == 1 else hint
    return hint


def _from_json(cls: type, data: Any, where: str, path: str) -> Any:
    if not isinstance(data, dict):
        what = type(data).__name__
        raise FedHFRunError(f"'{where}': '{path or '/'}' is {what}, not an object; the record is damaged.")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise FedHFRunError(
            f"'{where}' has {', '.join(f'{path}/{k}' for k in unknown)}, which schema {SCHEMA_VERSION} does not "
            "have; it was not written by this version of fedhf (upgrade fedhf, or check the file)."
        )
    kwargs = {}
    for name, f in known.items():
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise FedHFRunError(f"'{where}' lacks '{path}/{name}'; it was not written by a fedhf run.")
            continue
        kwargs[name] = _value(hints[name], data[name], where, f"{path}/{name}")
    return cls(**kwargs)


def _value(hint: Any, value: Any, where: str, path: str) -> Any:
    hint = _strip_none(hint)
    if value is None:
        return None
    if dataclasses.is_dataclass(hint):
        return _from_json(hint, value, where, path)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is list and args and dataclasses.is_dataclass(args[0]):
        if not isinstance(value, list):
            raise FedHFRunError(f"'{where}': '{path}' is not a list; the record is damaged.")
        return [_from_json(args[0], v, where, f"{path}[{i}]") for i, v in enumerate(value)]
    return value


# ------------------------------------------------------------------------------------------------------ layouts
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
    record = dict(record)
    if version == 1:
        record["rounds"] = [dict(r) for r in record.get("rounds", [])]
        for r in record["rounds"]:
            for key in _ROUND_ENTRIES:
                if key in r:
                    r[key] = snake_keys(r[key])
        for key in ("partitions", "refusals"):
            if key in record:
                record[key] = snake_keys(record[key])
        if "secure_aggregation" in record:
            record["secure_aggregation"] = snake_keys(record["secure_aggregation"])
        record["schema_version"] = SCHEMA_VERSION
    for key in ("dataset", "model"):  # fedhf 0.1 wrote {} until they were known
        if record.get(key) == {}:
            del record[key]
    return record


# --------------------------------------------------------------------------------------------------------- store
class RunStore:
    """The record of the run in ``run_dir``."""

    def __init__(self, run_dir: str | Path) -> None:
        self.dir = Path(run_dir)
        self.path = self.dir / RUN_JSON

    def exists(self) -> bool:
        return self.path.is_file()

    def read(self, what: str = "") -> RunRecord:
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
        try:
            return RunRecord.from_dict(record, str(self.path))
        except FedHFRunError as exc:
            raise FedHFRunError(f"{prefix}{exc}") from None

    def read_finished(self, what: str) -> RunRecord:
        "The record of a complete run with its adapter (for report, audit, evaluate, push); a clear error otherwise."
        record = self.read(what)
        if record.status != "complete":
            why = f": {record.error}" if record.error else ""
            raise FedHFRunError(
                f"{what}: '{self.dir}' is not a finished run (status '{record.status}'{why}); "
                "wait for it to complete or run it again."
            )
        if not (self.dir / "adapter" / "adapter_model.safetensors").is_file():
            raise FedHFRunError(
                f"{what}: '{self.dir}' has no adapter/adapter_model.safetensors; the run folder is incomplete."
            )
        for key in ("dataset", "model", "final"):
            if getattr(record, key) is None:
                raise FedHFRunError(f"{what}: '{self.path}' lacks '{key}'; it was not written by a complete fedhf run.")
        if not record.rounds:
            raise FedHFRunError(f"{what}: '{self.path}' has no rounds; it was not written by a complete fedhf run.")
        return record

    def write(self, record: RunRecord) -> None:
        """Write the whole record (atomic, fsynced), in the current layout."""
        record.schema_version = SCHEMA_VERSION
        atomic_write_json(self.path, record.to_dict())

    def update(self, what: str, change: Callable[[RunRecord], None]) -> RunRecord:
        """Read, change in place, write: how post-run commands add their results (evaluations, audit)."""
        record = self.read(what)
        change(record)
        self.write(record)
        return record


def load_run(run_dir: str | Path) -> RunRecord:
    """The record of the run in ``run_dir`` (any status)."""
    return RunStore(run_dir).read()


def load_finished_run(run_dir: str | Path, what: str) -> RunRecord:
    """The record of a complete run, for ``what`` (report, audit, evaluate, push)."""
    return RunStore(run_dir).read_finished(what)


def schema() -> dict[str, Any]:
    """run.json's JSON Schema (draft 2020-12)."""
    return json.loads(SCHEMA_FILE.read_text())
