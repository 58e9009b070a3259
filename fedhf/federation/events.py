"""What the round logic reports, and to whom: the ``RoundObserver`` protocol.

The Flower layer (strategy wrappers, the SecAgg+ grid) sees every message of a round; it tells an
observer what it saw. The run record (``fedhf.run.record.RunRecorder``) is the observer fedhf
uses; the Flower layer never imports it, so it can be tested with any object that has these methods.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol


class RoundObserver(Protocol):
    """The events of a federated round, in the order they happen."""

    dir: Path  # the run folder (named in errors that tell the user how to resume)

    def start_round(self, server_round: int, bytes_down: int, num_sampled: int) -> None: ...

    def train_replies(
        self,
        clients: list[dict[str, Any]],
        failures: list[dict[str, Any]],
        rejected: list[dict[str, Any]],
        *,
        refused: list[dict[str, Any]],
        weighting: str,
    ) -> None: ...

    def over_budget(self) -> set[int]: ...

    def local_eval(self, loss: float | None, accuracy: float | None, client_seconds: list[float]) -> None: ...

    def set_client_level(self, info: dict[str, Any]) -> None: ...

    def client_level_round(self, info: dict[str, Any]) -> None: ...

    def secure_aggregation_round(self, info: dict[str, Any]) -> None: ...
