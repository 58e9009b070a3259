"""Flower's ServerApp for fedhf, and the one call that runs a strategy's rounds.

What a run does is written in ``fedhf.apps`` (the composition root, which never imports ``flwr``);
this module turns it into Flower objects: a ``ServerApp`` whose main calls a plain function with the
grid and the run config, and :func:`start`, which hands the adapter, the config and the central
evaluation to Flower's own ``Strategy.start`` and gives back plain tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.serverapp import Grid, ServerApp

from fedhf.flower.client_app import PERSONALIZE_ACTION
from fedhf.flower.strategy import ClientLevel, Resumed, Screened, screened_of

ServerMain = Callable[[Grid, Mapping[str, Any]], None]
Evaluate = Callable[[int, dict[str, torch.Tensor]], dict[str, float] | None]


def server_app_for(main: ServerMain, on_exit: Callable[[], None] | None = None) -> ServerApp:
    """A ServerApp whose main is ``main(grid, run_config)``; ``on_exit`` runs when it returns or raises."""
    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        try:
            main(grid, dict(context.run_config))
        finally:
            if on_exit is not None:
                on_exit()

    return app


def start(
    strategy: Screened | ClientLevel,
    grid: Grid,
    initial: dict[str, torch.Tensor],
    *,
    num_rounds: int,
    timeout: float,
    client_config: dict[str, Any],
    evaluate: Evaluate,
    offset: int = 0,
) -> dict[str, torch.Tensor] | None:
    """Run ``num_rounds`` rounds through Flower's ``Strategy.start``; the last global adapter, or None when no
    round released one. ``offset``: rounds done before a resume (the strategy sees the run's real round numbers).
    """

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        metrics = evaluate(server_round, arrays.to_torch_state_dict())
        return MetricRecord(metrics) if metrics is not None else None

    result = (strategy if offset == 0 else Resumed(strategy, offset)).start(
        grid=grid,
        initial_arrays=ArrayRecord(initial),
        num_rounds=num_rounds,
        timeout=timeout,
        train_config=ConfigRecord(client_config),
        evaluate_config=ConfigRecord(client_config),
        evaluate_fn=evaluate_fn,
    )
    # Flower's Result holds an empty record when no round released an aggregate.
    return result.arrays.to_torch_state_dict() if len(result.arrays) else None


def latest_adapter(strategy: Screened | ClientLevel, default: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The global adapter the strategy last sent (what a run that stops early keeps)."""
    latest = screened_of(strategy).latest_arrays
    return latest.to_torch_state_dict() if latest is not None else default


def personalize(
    grid: Grid, arrays: dict[str, torch.Tensor], client_config: dict[str, Any], *, timeout: float
) -> list[tuple[int, dict[str, Any], dict[str, Any], str | None]]:
    """After the last round: the final global adapter to every connected node, as ``evaluate.personalize``.
    Per node: (node id, metrics, client info, error text or None); no reply within ``timeout`` is an error."""
    nodes = sorted(grid.get_node_ids())
    content = RecordDict({"arrays": ArrayRecord(arrays), "config": ConfigRecord(client_config)})
    messages = [
        Message(content=content, dst_node_id=node, message_type=f"{MessageType.EVALUATE}.{PERSONALIZE_ACTION}")
        for node in nodes
    ]
    out: list[tuple[int, dict[str, Any], dict[str, Any], str | None]] = []
    seen: set[int] = set()
    for reply in grid.send_and_receive(messages, timeout=timeout):
        node = reply.metadata.src_node_id
        seen.add(node)
        if reply.has_error():
            out.append((node, {}, {}, reply.error.reason or "no reason given"))
            continue
        metrics = reply.content.metric_records.get("metrics")
        info = reply.content.config_records.get("client-info")
        out.append((node, dict(metrics or {}), dict(info or {}), None))
    out += [(n, {}, {}, f"no reply within strategy.round-timeout={timeout:g} s") for n in nodes if n not in seen]
    return sorted(out)
