"""Run fedhf's apps in Flower's Simulation Engine, in this process.

``flwr run .`` does the same through a local SuperLink (see the README); this path runs the apps
directly (``flwr.simulation.run_simulation``, Flower's public entry point) so that ``fedhf run``
needs no SuperLink, hands the ServerApp the already parsed config, and leaves no process behind.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from flwr.clientapp import ClientApp
from flwr.simulation import run_simulation

from fedhf.flower.server_app import ServerMain, server_app_for

log = logging.getLogger("fedhf")


def simulate(
    server_main: ServerMain,
    client_app: ClientApp,
    num_supernodes: int,
    cpus_per_client: int = 1,
    gpus_per_client: float = 0.0,
) -> None:
    """Run ``server_main(grid, run_config)`` as the ServerApp against ``num_supernodes`` simulated SuperNodes, each
    client with ``cpus_per_client`` CPUs and a ``gpus_per_client`` share of a GPU (Ray hides the GPUs from a client
    without a share)."""
    backend_config = {
        "client_resources": {"num_cpus": cpus_per_client, "num_gpus": float(gpus_per_client)},
        "init_args": {"num_cpus": max(os.cpu_count() or 1, cpus_per_client)},
    }
    server_done = threading.Event()
    finished = threading.Event()
    watchdog = threading.Thread(target=_stop_stuck_actors, args=(server_done, finished), daemon=True)
    watchdog.start()
    try:
        run_simulation(
            server_app=server_app_for(server_main, on_exit=server_done.set),
            client_app=client_app,
            num_supernodes=num_supernodes,
            backend_name="ray",
            backend_config=backend_config,
        )
    finally:
        finished.set()


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
        log.warning(
            "the run has ended but %d client actor(s) are still busy (a client that hung?); stopping them", len(stuck)
        )
        for p in stuck:
            p.kill()


def _is_actor(p: Any) -> bool:
    import psutil

    try:
        return "ClientAppActor" in " ".join(p.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):  # exited meanwhile
        return False
