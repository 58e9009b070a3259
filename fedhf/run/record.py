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
from fedhf.run.store import SCHEMA_VERSION, RunStore, snake_keys, upgrade

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
    """Collects what a run did, round by round, and writes it to the run folder."""

    def __init__(
        self, cfg: FedHFConfig, run_dir: Path | None = None, *, resume_from: dict[str, Any] | None = None
    ) -> None:
        self.cfg = cfg
        self._round: dict[str, Any] | None = None
        self._round_start = 0.0
        if resume_from is not None:  # a resumed run: the record as its last checkpoint saw it
            if run_dir is None:
                raise ValueError("resume_from needs the run folder")  # a bug in the caller, not user input
            self.dir = run_dir
            try:  # how the interrupted attempt ended, as its run.json says ("running": it was killed)
                before = RunStore(run_dir).read()
                ended = {
                    "status": before.get("status"),
                    "error": before.get("error"),
                    "last_round_recorded": max((r["round"] for r in before.get("rounds", [])), default=0),
                }
            except (FedHFRunError, TypeError, KeyError):
                ended = {"status": "unreadable run.json"}
            self.data = upgrade(resume_from, "the checkpoint's run record")
            self.run_id = str(self.data["run_id"])
            last = self.data["rounds"][-1]["round"] if self.data["rounds"] else 0
            self.data.update(status="running", finished=None)
            self.data.pop("error", None)
            self.data.setdefault("resumes", []).append(
                {
                    "at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                    "from_round": last,
                    "interrupted_attempt": ended,
                }
            )
            self.write()
            self.write_csv()
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
        self.data: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "run_id": self.run_id,
            "run_uid": run_uid,
            "status": "running",
            "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "finished": None,
            "config": flat,
            "config_sha256": config_hash(flat),
            "seeds": {
                "seed": cfg.seed,
                "partition": cfg.seed,
                "model_init": cfg.seed,
                "client_shuffle_and_dropout": "seed * 100003 + round * 1009 + partition-id",
            },
            "versions": package_versions(),
            "git_commit": git_commit(),
            "python": platform.python_version(),
            "dataset": {},
            "model": {},
            "partitions": [],
            "rounds": [],
        }
        self.write()

    # ------------------------------------------------------------------ facts set at start
    def set_dataset(self, info: dict[str, Any]) -> None:
        self.data["dataset"] = info
        self.write()

    def set_model(self, info: dict[str, Any]) -> None:
        self.data["model"] = info
        self.write()

    def set_partitions(self, stats: list[dict[str, Any]]) -> None:
        self.data["partitions"] = snake_keys(stats)
        self.write()

    # ------------------------------------------------------------------ per round
    def start_round(self, server_round: int, bytes_down: int, num_sampled: int) -> None:
        self._round_start = time.perf_counter()
        self._round = {
            "round": server_round,
            "train_loss": None,
            "eval_loss": None,
            "eval_accuracy": None,
            "eval_f1": None,
            "local_eval_loss": None,
            "local_eval_accuracy": None,
            "bytes_up": None,
            "bytes_down": bytes_down,
            "wall_seconds": None,
            "central_eval_seconds": None,
            "clients_sampled": num_sampled,
            "client_train_seconds": {},
            "client_handler_seconds": {},
            "client_eval_seconds": [],
            "clients": [],
            "failures": [],
        }

    def set_federation(self, info: dict[str, Any]) -> None:
        self.data["federation"] = info
        self.write()

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
        clients, failures = snake_keys(clients), snake_keys(failures)
        rejected, refused = snake_keys(rejected or []), snake_keys(refused or [])
        trained = [c for c in clients if c["status"] == "trained"]
        r["clients"] = clients
        r["failures"] = failures
        r["rejected"] = rejected
        r["refused"] = refused
        r["weighting"] = weighting
        r["client_train_seconds"] = {
            str(c["partition_id"]): round(c["train_seconds"], 3) for c in trained if "train_seconds" in c
        }
        r["client_handler_seconds"] = {
            str(c["partition_id"]): round(c["handler_seconds"], 3) for c in trained if "handler_seconds" in c
        }
        # The round's train loss only when every client that trained shared its loss and its count.
        if trained and all("train_loss" in c and "num_examples" in c for c in trained):
            n = sum(c["num_examples"] for c in trained)
            if n:
                r["train_loss"] = sum(c["train_loss"] * c["num_examples"] for c in trained) / n
        r["bytes_up"] = max((c["bytes_up"] for c in trained if "bytes_up" in c), default=None)
        shared = self.data.setdefault("shared", {})
        for c in clients:
            if "shared" in c:
                shared[str(c["partition_id"])] = c["shared"]
        known = {s["partition_id"] for s in self.data["partitions"]}
        new = [
            {
                "partition_id": c["partition_id"],
                "train_examples": sum(c["label_histogram"]),
                "label_histogram": c["label_histogram"],
                "source": "client",
            }
            for c in clients
            if c["partition_id"] not in known and "label_histogram" in c
        ]
        if (
            new
        ):  # clients report what they hold when their policy shares it; keep it when the server could not compute it
            self.data["partitions"] = sorted(self.data["partitions"] + new, key=lambda s: s["partition_id"])
        if "privacy" in self.data:
            self._privacy_round(r, clients)
        if refused:  # kept at the run level too: a round that ends the run is not recorded as a round
            self.data.setdefault("refusals", []).extend({"round": r["round"], **c} for c in refused)
            self.write()
        for c in refused:
            if c["rule"] in ("max-epsilon", "privacy.max-epsilon") and "privacy" in self.data:
                entry = self.data["privacy"]["clients"].get(str(c["partition_id"]))
                if entry is not None and "stopped" not in entry:
                    entry["stopped"] = {"round": r["round"], "reason": c["rule"], "text": c["reason"]}
        if "privacy" in self.data and self.data["privacy"].get("clients"):
            r.setdefault("privacy", {})["exhausted"] = sorted(
                int(pid) for pid, e in self.data["privacy"]["clients"].items() if "stopped" in e
            )

    # ------------------------------------------------------------------ privacy ledger
    # The set_* methods below keep what earlier rounds recorded: a resumed run calls them again.
    def set_secure_aggregation(self, info: dict[str, Any]) -> None:
        self.data["secure_aggregation"] = {
            **snake_keys(info),
            "rounds": self.data.get("secure_aggregation", {}).get("rounds", []),
        }
        self.write()

    def secure_aggregation_round(self, info: dict[str, Any]) -> None:
        self.data["secure_aggregation"]["rounds"].append(snake_keys(info))
        self.write()

    def set_privacy(self, info: dict[str, Any]) -> None:
        self.data["privacy"] = {"clients": {}, **self.data.get("privacy", {}), **info}
        self.write()

    def set_client_level(self, info: dict[str, Any]) -> None:
        self.data["privacy"]["client_level"] = {**self.data["privacy"].get("client_level", {"rounds": []}), **info}
        self.write()

    def client_level_round(self, info: dict[str, Any]) -> None:
        r = self._require_round()
        cl = self.data["privacy"]["client_level"]
        cl["rounds"].append({"round": r["round"], **info})
        cl["epsilon"] = info["epsilon"]
        cl["epsilon_no_amplification"] = info["epsilon_no_amplification"]
        r.setdefault("privacy", {})
        r["privacy"]["client_level_epsilon"] = info["epsilon"]
        r["privacy"]["client_level_epsilon_no_amplification"] = info["epsilon_no_amplification"]

    def _privacy_round(self, r: dict[str, Any], clients: list[dict[str, Any]]) -> None:
        ledger = self.data["privacy"]["clients"]
        for c in clients:
            if c.get("privacy") is None:
                continue
            pid = str(c["partition_id"])
            entry, warnings = ledger_entry(ledger.get(pid), c["privacy"], r["round"], c["status"])
            ledger[pid] = entry
            for w in warnings:
                log.warning("client %s: %s", pid, w)
        if ledger:  # sample-level DP in this run
            r.setdefault("privacy", {}).update(round_summary(ledger))

    def saved_spend(self, pid: str, spend: dict[str, Any]) -> None:
        """A client's own saved accountant shows more steps than it reported (it trained in a round whose reply the
        server never used: a round cut off by a restart, or a reply that came too late). The ledger takes the
        client's figure: a spend is counted once it may have been released, never dropped."""
        ledger = self.data["privacy"]["clients"]
        ledger[pid] = with_saved_spend(ledger.get(pid), spend)
        self.write()

    def over_budget(self) -> set[int]:
        """Clients whose recorded epsilon reached their budget (only possible after an accountant restart)."""
        return over_budget(self.data.get("privacy", {}).get("clients", {}))

    def local_eval(self, loss: float | None, accuracy: float | None, client_seconds: list[float]) -> None:
        r = self._require_round()
        r["local_eval_loss"], r["local_eval_accuracy"] = loss, accuracy
        r["client_eval_seconds"] = [round(s, 3) for s in client_seconds]

    def end_round(self, server_round: int, central: dict[str, float], eval_seconds: float) -> dict[str, Any]:
        if server_round == 0:
            row = {
                "round": 0,
                "eval_loss": central["loss"],
                "eval_accuracy": central["accuracy"],
                "eval_f1": central["f1"],
                "central_eval_seconds": round(eval_seconds, 3),
            }
        else:
            row = self._require_round()
            row.update(
                eval_loss=central["loss"],
                eval_accuracy=central["accuracy"],
                eval_f1=central["f1"],
                central_eval_seconds=round(eval_seconds, 3),
                wall_seconds=round(time.perf_counter() - self._round_start, 3),
            )
            self._round = None
        self.data["rounds"].append(row)
        self.write()
        self.write_csv()
        return row

    def abandon_round(self) -> None:
        """Drop a round that was configured but will not be completed (the run is ending early)."""
        self._round = None

    def _require_round(self) -> dict[str, Any]:
        if self._round is None:
            raise RuntimeError("no round in progress")  # a bug in the call order, not user input
        return self._round

    # ------------------------------------------------------------------ end
    def finish(self, extra: dict[str, Any] | None = None) -> None:
        if extra:
            self.data.update(extra)
        self.data["status"] = "complete"
        self.data["finished"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        self.write()

    def stop(self, reason: str) -> None:
        """The run ended cleanly before any round was trained (every node refused, or none could train)."""
        self.data["status"] = "stopped"
        self.data["stopped_early"] = {"after_round": 0, "reason": reason}
        self.data["finished"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        self.write()

    def fail(self, reason: str) -> None:
        self.data["status"] = "failed"
        self.data["error"] = reason
        self.data["finished"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        self.write()

    def write(self) -> None:
        RunStore(self.dir).write(self.data)

    def write_csv(self) -> None:
        buf = io.StringIO(newline="")
        w = csv.DictWriter(buf, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in self.data["rounds"]:
            row = {k: r.get(k) for k in CSV_FIELDS}
            row["clients_trained"] = sum(c["status"] == "trained" for c in r.get("clients", [])) if r["round"] else None
            row["clients_failed"] = len(r.get("failures", [])) if r["round"] else None
            row["clients_rejected"] = len(r.get("rejected", [])) if r["round"] else None
            row["clients_refused"] = len(r.get("refused", [])) if r["round"] else None
            w.writerow(row)
        atomic_write(self.dir / "metrics.csv", buf.getvalue().encode())
