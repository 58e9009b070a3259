"""The run record as a run builds it: ``RunRecorder`` (the ``RoundObserver`` fedhf uses), and metrics.csv. No Flower.

``run.json`` is rewritten (by ``fedhf.run.store``, atomically and fsynced) after every round, so a
reader never sees half a file; its ``status`` is ``running`` until the last round and the adapter
are written, then ``complete`` (or ``failed`` with the reason). Reply fields arrive in Flower's words
(``partition-id``) and are kept in the record's one key style (``partition_id``). The ledger's
arithmetic is ``fedhf.privacy.ledger``'s.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import io
import json
import logging
import platform
import secrets
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from fedhf._io import atomic_write, atomic_write_json
from fedhf.config.schema import FedHFConfig
from fedhf.errors import FedHFRunError
from fedhf.privacy.ledger import (
    ledger_entry,
    over_budget,
    round_summary,
    with_saved_spend,
)
from fedhf.run.store import (
    Dataset,
    Federation,
    Final,
    HubPush,
    Model,
    Partition,
    Personalization,
    Privacy,
    Refusal,
    Resume,
    Round,
    RoundPrivacy,
    RunRecord,
    RunStore,
    Seeds,
    StoppedEarly,
    snake_keys,
)

log = logging.getLogger("fedhf")

PACKAGES = ("fedhf", "flwr", "flwr-datasets", "torch", "transformers", "peft", "opacus", "datasets", "huggingface-hub")
CSV_FIELDS = (
    "round",
    "train_loss",
    "eval_loss",
    "eval_accuracy",
    "eval_f1",
    "local_eval_loss",
    "local_eval_accuracy",
    "bytes_up",
    "bytes_down",
    "wall_seconds",
    "clients_trained",
    "clients_failed",
    "clients_rejected",
    "clients_refused",
)


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit() -> str | None:
    src = Path(__file__).resolve().parent.parent
    if not (src / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and len(commit) == 40 else None


def new_run_id(cfg: FedHFConfig) -> str:
    if cfg.run_name:
        return cfg.run_name
    return dt.datetime.now().strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)


def config_hash(flat: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()


MARKER = ".fedhf-run"  # in every run folder fedhf made: its run uid; fedhf adopts and deletes nothing elsewhere


def check_run_folder(run_dir: Path, what: str) -> dict[str, Any]:
    """The marker of a folder fedhf created as a run folder; FedHFRunError otherwise."""
    marker = Path(run_dir) / MARKER
    if not marker.is_file():
        raise FedHFRunError(
            f"{what}: '{run_dir}' was not created by fedhf as a run folder (no {MARKER}); fedhf "
            "writes into and deletes from its own run folders only."
        )
    try:
        data = json.loads(marker.read_text())
        if not isinstance(data, dict) or not isinstance(data.get("run_uid"), str):
            raise ValueError("no run_uid")
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise FedHFRunError(f"{what}: '{marker}' is damaged ({exc}); the run folder cannot be used.") from None
    return data


class RunRecorder:
    """Builds the run's :class:`RunRecord` round by round and writes it (and metrics.csv) to the run folder."""

    def __init__(
        self, cfg: FedHFConfig, run_dir: Path | None = None, *, resume_from: dict[str, Any] | None = None
    ) -> None:
        self.cfg = cfg
        self._round: Round | None = None
        self._round_start = 0.0
        if resume_from is not None:  # a resumed run: the record as its last checkpoint saw it
            if run_dir is None:
                raise ValueError("resume_from needs the run folder")  # a bug in the caller, not user input
            self._resume(run_dir, resume_from)
            return
        self.run_id = new_run_id(cfg)
        self.dir = run_dir or Path(cfg.output_dir).expanduser() / self.run_id
        if RunStore(self.dir).exists():
            raise FileExistsError(
                f"run folder '{self.dir}' already holds a run; choose another run-name or output-dir."
            )
        if self.dir.exists() and (not self.dir.is_dir() or any(self.dir.iterdir())):
            raise FileExistsError(
                f"'{self.dir}' already exists and is not empty; fedhf creates its own run folders and will not adopt "
                "another one. Choose another run-name or output-dir."
            )
        self.dir.mkdir(parents=True, exist_ok=True)
        run_uid = secrets.token_hex(8)  # identifies this run to its checkpoints and clients' saved state
        atomic_write_json(self.dir / MARKER, {"run_uid": run_uid, "created_by": "fedhf"})
        flat = cfg.to_flat()
        self.record = RunRecord(
            run_id=self.run_id,
            run_uid=run_uid,
            status="running",
            started=_now(),
            config=flat,
            config_sha256=config_hash(flat),
            seeds=Seeds(
                seed=cfg.seed,
                partition=cfg.seed,
                model_init=cfg.seed,
                client_shuffle_and_dropout="seed * 100003 + round * 1009 + partition-id",
            ),
            versions=package_versions(),
            git_commit=git_commit(),
            python=platform.python_version(),
        )
        self.write()

    def _resume(self, run_dir: Path, snapshot: dict[str, Any]) -> None:
        """Continue the record of ``snapshot`` (a checkpoint's), noting how the interrupted attempt ended."""
        self.dir = run_dir
        try:  # how the interrupted attempt ended, as its run.json says ("running": it was killed)
            before = RunStore(run_dir).read()
            ended: dict[str, Any] = {
                "status": before.status,
                "error": before.error,
                "last_round_recorded": max((r.round for r in before.rounds), default=0),
            }
        except FedHFRunError:
            ended = {"status": "unreadable run.json"}
        self.record = RunRecord.from_dict(snapshot, "the checkpoint's run record")
        self.run_id = self.record.run_id
        last = self.record.rounds[-1].round if self.record.rounds else 0
        self.record.status, self.record.finished, self.record.error = "running", None, None
        self.record.resumes.append(Resume(at=_now(), from_round=last, interrupted_attempt=ended))
        self.write()
        self.write_csv()

    # ------------------------------------------------------------------ facts set at start
    def set_dataset(self, dataset: Dataset) -> None:
        self.record.dataset = dataset
        self.write()

    def set_model(self, model: Model) -> None:
        self.record.model = model
        self.write()

    def set_partitions(self, stats: list[dict[str, Any]]) -> None:
        self.record.partitions = [Partition(**s) for s in snake_keys(stats)]
        self.write()

    def set_federation(self, federation: Federation) -> None:
        self.record.federation = federation
        self.write()

    # ------------------------------------------------------------------ per round
    def start_round(self, server_round: int, bytes_down: int, num_sampled: int) -> None:
        self._round_start = time.perf_counter()
        self._round = Round(round=server_round, bytes_down=bytes_down, clients_sampled=num_sampled)

    def train_replies(
        self,
        clients: list[dict[str, Any]],
        failures: list[dict[str, Any]],
        rejected: list[dict[str, Any]] | None = None,
        *,
        refused: list[dict[str, Any]] | None = None,
        weighting: str = "examples",
    ) -> None:
        """Record a round's screened replies (only fields each client's policy shared are present)."""
        r = self._require_round()
        r.clients, r.failures = snake_keys(clients), snake_keys(failures)
        r.rejected, r.refused = snake_keys(rejected or []), snake_keys(refused or [])
        r.weighting = weighting
        trained = r.trained
        r.client_train_seconds = {
            str(c["partition_id"]): round(c["train_seconds"], 3) for c in trained if "train_seconds" in c
        }
        r.client_handler_seconds = {
            str(c["partition_id"]): round(c["handler_seconds"], 3) for c in trained if "handler_seconds" in c
        }
        # The round's train loss only when every client that trained shared its loss and its count.
        if trained and all("train_loss" in c and "num_examples" in c for c in trained):
            n = sum(c["num_examples"] for c in trained)
            if n:
                r.train_loss = sum(c["train_loss"] * c["num_examples"] for c in trained) / n
        r.bytes_up = max((c["bytes_up"] for c in trained if "bytes_up" in c), default=None)
        for c in r.clients:
            if "shared" in c:
                self.record.shared[str(c["partition_id"])] = c["shared"]
        # Clients report what they hold when their policy shares it; keep it when the server could not compute it.
        known = {p.partition_id for p in self.record.partitions}
        new = [
            Partition(
                partition_id=c["partition_id"],
                train_examples=sum(c["label_histogram"]),
                label_histogram=c["label_histogram"],
                source="client",
            )
            for c in r.clients
            if c["partition_id"] not in known and c.get("label_histogram")  # records have none to count
        ]
        if new:
            self.record.partitions = sorted(self.record.partitions + new, key=lambda p: p.partition_id)
        privacy = self.record.privacy
        if privacy is not None:
            self._privacy_round(r, privacy)
        if r.refused:  # kept at the run level too: a round that ends the run is not recorded as a round
            self.record.refusals.extend(Refusal(round=r.round, **c) for c in r.refused)
            self.write()
        if privacy is not None:
            for c in r.refused:
                if c["rule"] in ("max-epsilon", "privacy.max-epsilon"):
                    entry = privacy.clients.get(str(c["partition_id"]))
                    if entry is not None and "stopped" not in entry:
                        entry["stopped"] = {"round": r.round, "reason": c["rule"], "text": c["reason"]}
            if privacy.clients:
                self._round_privacy(r).exhausted = sorted(
                    int(pid) for pid, e in privacy.clients.items() if "stopped" in e
                )

    # ------------------------------------------------------------------ privacy ledger
    # The set_* methods below keep what earlier rounds recorded: a resumed run calls them again.
    def set_secure_aggregation(self, info: dict[str, Any]) -> None:
        before = self.record.secure_aggregation or {}
        self.record.secure_aggregation = {**snake_keys(info), "rounds": before.get("rounds", [])}
        self.write()

    def secure_aggregation_round(self, info: dict[str, Any]) -> None:
        if self.record.secure_aggregation is None:
            raise RuntimeError("secure aggregation was not set up")  # a bug in the call order, not user input
        self.record.secure_aggregation["rounds"].append(snake_keys(info))
        self.write()

    def set_sample_prompts(self, prompts: list[dict[str, Any]]) -> None:
        """The central eval rows whose generations each round records (``model.sample-prompts``)."""
        self.record.sample_prompts = prompts
        self.write()

    def set_canaries(self, info: dict[str, Any]) -> None:
        """The audit's canaries (``audit.canaries``): which client trains on them, how often, and their secrets."""
        self.record.canaries = info
        self.write()

    def set_privacy(self, info: dict[str, Any]) -> None:
        """The run's privacy as stated at its start (``fedhf.privacy.dp.run_privacy_info``); a resumed run's ledgers
        are kept."""
        before = self.record.privacy
        self.record.privacy = Privacy(
            **info,
            clients=before.clients if before else {},
            client_level=before.client_level if before else None,
        )
        self.write()

    def set_client_level(self, info: dict[str, Any]) -> None:
        privacy = self._require_privacy()
        privacy.client_level = {**(privacy.client_level or {"rounds": []}), **info}
        self.write()

    def client_level_round(self, info: dict[str, Any]) -> None:
        r = self._require_round()
        cl = self._require_privacy().client_level
        if cl is None:
            raise RuntimeError("client-level DP was not set up")  # a bug in the call order, not user input
        cl["rounds"].append({"round": r.round, **info})
        cl["epsilon"] = info["epsilon"]
        cl["epsilon_no_amplification"] = info["epsilon_no_amplification"]
        p = self._round_privacy(r)
        p.client_level_epsilon = info["epsilon"]
        p.client_level_epsilon_no_amplification = info["epsilon_no_amplification"]

    @staticmethod
    def _round_privacy(r: Round) -> RoundPrivacy:
        if r.privacy is None:
            r.privacy = RoundPrivacy()
        return r.privacy

    def _privacy_round(self, r: Round, privacy: Privacy) -> None:
        ledger = privacy.clients
        for c in r.clients:
            if c.get("privacy") is None:
                continue
            pid = str(c["partition_id"])
            entry, warnings = ledger_entry(ledger.get(pid), c["privacy"], r.round, c["status"])
            ledger[pid] = entry
            for w in warnings:
                log.warning("client %s: %s", pid, w)
        if ledger:  # sample-level DP in this run
            for key, value in round_summary(ledger).items():
                setattr(self._round_privacy(r), key, value)

    def saved_spend(self, pid: str, spend: dict[str, Any]) -> None:
        """A client's own saved accountant shows more steps than it reported (it trained in a round whose reply the
        server never used: a round cut off by a restart, or a reply that came too late). The ledger takes the
        client's figure: a spend is counted once it may have been released, never dropped."""
        ledger = self._require_privacy().clients
        ledger[pid] = with_saved_spend(ledger.get(pid), spend)
        self.write()

    def personalized(self, personalization: Personalization, privacy: dict[str, dict[str, Any]], after: int) -> None:
        """The personalization stage's results; ``privacy``: each DP client's accounting after it (by partition id),
        entered into the ledger as a stage after round ``after`` (its spend counts like a round's)."""
        self.record.personalization = personalization
        ledger = self.record.privacy.clients if self.record.privacy is not None else None
        for pid, report in privacy.items():
            if ledger is None:
                raise RuntimeError("a personalization reply carries DP accounting in a run without DP")  # a bug
            entry, warnings = ledger_entry(ledger.get(pid), report, after + 1, "personalized")
            ledger[pid] = entry
            for w in warnings:
                log.warning("client %s: %s", pid, w)
        self.write()

    def over_budget(self) -> set[int]:
        """Clients whose recorded epsilon reached their budget (only possible after an accountant restart)."""
        return over_budget(self.record.privacy.clients) if self.record.privacy else set()

    def local_eval(self, loss: float | None, accuracy: float | None, client_seconds: list[float]) -> None:
        r = self._require_round()
        r.local_eval_loss, r.local_eval_accuracy = loss, accuracy
        r.client_eval_seconds = [round(s, 3) for s in client_seconds]

    def end_round(
        self,
        server_round: int,
        central: dict[str, float] | None,
        eval_seconds: float | None,
        generations: list[str] | None = None,
    ) -> Round:
        """Close the round; ``central``: its central evaluation, or None in a round strategy.central-eval-every
        skips."""
        if server_round == 0:
            row = Round(round=0)
        else:
            row = self._require_round()
            row.wall_seconds = round(time.perf_counter() - self._round_start, 3)
            self._round = None
        if central is not None:
            self._set_central(row, central, eval_seconds, generations)
        self.record.rounds.append(row)
        self.write()
        self.write_csv()
        return row

    def evaluate_last(self, central: dict[str, float], eval_seconds: float, generations: list[str] | None) -> Round:
        """The central evaluation of the last recorded round, made after it ended (a run that stopped early after a
        round strategy.central-eval-every skipped)."""
        row = self.record.rounds[-1]
        self._set_central(row, central, eval_seconds, generations)
        self.write()
        self.write_csv()
        return row

    @staticmethod
    def _set_central(
        row: Round, central: dict[str, float], eval_seconds: float | None, generations: list[str] | None
    ) -> None:
        row.eval_loss, row.eval_accuracy, row.eval_f1 = central["loss"], central["accuracy"], central["f1"]
        row.central_eval_seconds = None if eval_seconds is None else round(eval_seconds, 3)
        row.generations = list(generations or [])

    def abandon_round(self) -> None:
        """Drop a round that was configured but will not be completed (the run is ending early)."""
        self._round = None

    def _require_round(self) -> Round:
        if self._round is None:
            raise RuntimeError("no round in progress")  # a bug in the call order, not user input
        return self._round

    def _require_privacy(self) -> Privacy:
        if self.record.privacy is None:
            raise RuntimeError("the run's privacy was not set")  # a bug in the call order, not user input
        return self.record.privacy

    # ------------------------------------------------------------------ end
    def set_final(self, stopped: str | None) -> None:
        """The run's results are its last round's; ``stopped``: why it ended before its last round, if it did."""
        last = self.record.rounds[-1]
        if last.eval_accuracy is None:
            raise RuntimeError(f"round {last.round} has no central evaluation")  # a bug in the call order
        self.record.final = Final(eval_loss=last.eval_loss, eval_accuracy=last.eval_accuracy, eval_f1=last.eval_f1)
        if stopped:
            self.record.stopped_early = StoppedEarly(after_round=last.round, reason=stopped)
        self.write()

    def finish(self, hub_folder: str | None = None) -> None:
        """The run is complete (its adapter and Hub folder are written)."""
        self.record.hub_folder = hub_folder
        self.record.status = "complete"
        self.record.finished = _now()
        self.write()

    def stop(self, reason: str) -> None:
        """The run ended cleanly before any round was trained (every node refused, or none could train)."""
        self.record.status = "stopped"
        self.record.stopped_early = StoppedEarly(after_round=0, reason=reason)
        self.record.finished = _now()
        self.write()

    def fail(self, reason: str) -> None:
        self.record.status = "failed"
        self.record.error = reason
        self.record.finished = _now()
        self.write()

    def pushed(self, push: HubPush) -> None:
        self.record.hub_push = push
        self.write()

    def write(self) -> None:
        RunStore(self.dir).write(self.record)

    def write_csv(self) -> None:
        buf = io.StringIO(newline="")
        w = csv.DictWriter(buf, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in self.record.rounds:
            row = {k: getattr(r, k) for k in CSV_FIELDS if hasattr(r, k)}
            trained = r.round > 0
            row["clients_trained"] = len(r.trained) if trained else None
            row["clients_failed"] = len(r.failures) if trained else None
            row["clients_rejected"] = len(r.rejected) if trained else None
            row["clients_refused"] = len(r.refused) if trained else None
            w.writerow(row)
        atomic_write(self.dir / "metrics.csv", buf.getvalue().encode())


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
