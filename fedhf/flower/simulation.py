"""Run a fedhf federation in Flower's Simulation Engine, in this process.

``flwr run .`` does the same through a local SuperLink (see the README); this path
runs the apps directly so that ``fedhf run`` needs no SuperLink and leaves no
process behind. It uses Flower's simulation runtime entry point (pinned flwr 1.42),
handing the ServerApp the already parsed config.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

from flwr.simulation.run_simulation import _run_simulation
from flwr.supercore.telemetry import EventType

from fedhf.run.checkpoint import Checkpoint
from fedhf.flower.client_app import make_client_app
from fedhf.config.schema import FedHFConfig
from fedhf.flower.server_app import make_server_app

log = logging.getLogger("fedhf")


def run_simulation(cfg: FedHFConfig, num_clients: int, cpus_per_client: int = 1, *,
                   resume: Checkpoint | None = None, resume_dir: Path | None = None,
                   node_configs: dict[int, dict[str, Any]] | None = None) -> Path:
    """Simulate ``num_clients`` SuperNodes (one partition each), run the federation, return the run folder.

    ``resume``: continue the run in ``resume_dir`` from this checkpoint. ``node_configs``: each simulated
    node's owner policy and state dir (``fedhf run --node-config FILE``).
    """
    state_roots = tuple(sorted({Path(str(nc["state-dir"])).expanduser() for nc in (node_configs or {}).values()
                                if str(nc.get("state-dir", "")).strip()}))
    result: dict = {}
    backend_config = {
        "client_resources": {"num_cpus": cpus_per_client, "num_gpus": 0.0},
        "init_args": {"num_cpus": max(os.cpu_count() or 1, cpus_per_client)},
    }
    server_done = threading.Event()
    finished = threading.Event()
    watchdog = threading.Thread(target=_stop_stuck_actors, args=(server_done, finished), daemon=True)
    watchdog.start()
    try:
        _run_simulation(
            num_supernodes=num_clients,
            exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
            client_app=make_client_app(node_configs),
            server_app=make_server_app(cfg, num_clients, result, resume=resume, resume_dir=resume_dir,
                                       on_exit=server_done.set, state_roots=state_roots),
            backend_name="ray",
            backend_config=backend_config,
        )
    finally:
        finished.set()
    return Path(result["run_dir"])


def _stop_stuck_actors(server_done: threading.Event, finished: threading.Event, grace: float = 5.0) -> None:
    """Flower's simulation runtime waits for every client job before it shuts down, also for a client
    that hangs (it has been recorded as failed when strategy.round-timeout passed). Once the ServerApp
    has finished, give the runtime ``grace`` seconds, then kill this process's Ray actor processes."""
    server_done.wait()
    if finished.wait(grace):
        return
    import psutil

    stuck = [p for p in psutil.Process().children(recursive=True) if _is_actor(p)]
    if stuck:
        log.warning("the run has ended but %d client actor(s) are still busy (a client that hung?); stopping them",
                    len(stuck))
        for p in stuck:
            p.kill()


def _is_actor(p: Any) -> bool:
    import psutil

    try:
        return "ClientAppActor" in " ".join(p.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):  # exited meanwhile
        return False
