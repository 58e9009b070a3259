"""Continuing an interrupted run: the run-config key ``resume`` (``fedhf run --resume RUN_DIR`` sets it).

A resumed run is the same run: its config, client count and folder come from ``RUN_DIR``
(``run.json`` and the last checkpoint), never from the new request. Under ``flwr run`` Flower
hands the app its whole run config (pyproject defaults plus overrides); a key that differs both
from its default and from the run's own value is a changed configuration, which is a new run, and
is refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedhf.config.schema import FedHFConfig, parse_config
from fedhf.errors import FedHFConfigError, FedHFError
from fedhf.run.checkpoint import Checkpoint, load_checkpoint
from fedhf.run.record import check_run_folder, config_hash
from fedhf.run.store import RunStore

RESUME_KEY = "resume"


@dataclass(frozen=True)
class ResumeTarget:
    """What a resumed run continues from."""

    run_dir: Path
    cfg: FedHFConfig  # the run's own config
    num_clients: int  # as recorded by fedhf run (0: not recorded, e.g. a run started with flwr run)
    checkpoint: Checkpoint
    engine: str  # "simulation" for fedhf run (its clients keep their state in RUN_DIR/client-state), else "flower"


def resume_target(run_dir: Path, what: str = "--resume") -> ResumeTarget:
    """The config, client count and checkpoint of the interrupted run in ``run_dir``; FedHFConfigError otherwise."""
    run_dir = Path(run_dir).expanduser()
    if not run_dir.is_dir():
        raise FedHFConfigError(f"{what} '{run_dir}': not a folder; give the run folder (outputs/<run-id>).")
    check_run_folder(run_dir, what)
    store = RunStore(run_dir)
    if not store.exists():
        raise FedHFConfigError(f"{what} '{run_dir}': no run.json; give a fedhf run folder (outputs/<run-id>).")
    try:
        run = store.read(what)
    except FedHFError as exc:
        raise FedHFConfigError(f"{what} '{run_dir}': run.json is damaged ({type(exc).__name__}: {exc}).") from None
    if run.status == "complete":
        raise FedHFConfigError(f"{what} '{run_dir}': the run is already complete; nothing to resume.")
    cfg = parse_config(run.config)
    checkpoint = load_checkpoint(run_dir, run_uid=run.run_uid, config_sha256=config_hash(run.config))
    if checkpoint.round > cfg.num_server_rounds:
        raise FedHFConfigError(
            f"{what} '{run_dir}': the checkpoint is at round {checkpoint.round}, beyond the "
            f"run's num-server-rounds={cfg.num_server_rounds}."
        )
    federation = run.federation
    return ResumeTarget(
        run_dir,
        cfg,
        (federation.num_clients or 0) if federation else 0,
        checkpoint,
        federation.engine if federation else "flower",
    )


def changed_keys(run_config: Mapping[str, Any], target: ResumeTarget) -> list[str]:
    """Keys of a ``flwr run`` run config that ask for something other than the resumed run's own config."""
    defaults = parse_config({}).to_flat()  # the auto keys as they resolve without DP
    own = target.cfg.to_flat()
    asked = parse_config({k: v for k, v in run_config.items() if k in defaults}).to_flat()
    return sorted(k for k, v in asked.items() if k != RESUME_KEY and v != defaults[k] and v != own[k])
