"""Errors fedhf raises at its boundaries, each saying what to fix.

An error raised on a data owner's node is reported to the server, and from there may reach
run.json and the people who read it. What leaves the node is :func:`text_leaving_node`: an
error's ``public`` text when it has one (counts and column names, never row values or local
paths), its own message when its kind never quotes data (``quotable``: run and node config
problems, privacy settings), else only the error's kind. The full message stays in the node's
log.
"""

from __future__ import annotations


class FedHFError(Exception):
    """Base class: a problem the user can fix; the CLI prints it as one line."""

    quotable = False  # whether str(error) may leave a data owner's node as it is

    def __init__(self, message: str = "", *, public: str | None = None) -> None:
        super().__init__(message)
        self.public = public


class FedHFConfigError(FedHFError, ValueError):
    """A run-config key is unknown, mistyped or out of range."""

    quotable = True


class FedHFDataError(FedHFError):
    """A dataset cannot be loaded, has the wrong columns or cannot be partitioned."""


class FedHFModelError(FedHFError):
    """A model cannot be resolved or an adapter state does not fit the model."""


class FedHFRunError(FedHFError):
    """A federated run cannot continue (e.g. every client failed a round)."""


class FedHFHubError(FedHFError):
    """Pushing to or loading from the Hub cannot proceed; the message says what to fix."""


class LockTimeout(FedHFError, OSError):
    """Another process held the lock for longer than the caller would wait."""


class FedHFNodeStateError(FedHFError):
    """The node's saved privacy state cannot be read or written: with DP the node refuses to train."""

    def __init__(self, message: str) -> None:  # the server learns the kind of problem, not the node's paths
        super().__init__(
            message,
            public="the node's saved privacy state cannot be read or written; it refuses to "
            "train with DP until its owner fixes it (see the node's log).",
        )


class InjectedFault(FedHFError, RuntimeError):
    """Raised by a client told to fail (fault injection)."""

    quotable = True


class DecodeError(FedHFError, ValueError):
    """A reply that cannot be decoded (its reason is recorded and the reply dropped)."""


class Malformed(FedHFError, ValueError):
    """The reply breaks the schema; the message says which field and how."""


class RunStopped(FedHFError):
    """Too few clients can still train (refusals, exhausted budgets): end the run cleanly."""


class FedHFCheckpointError(FedHFError):
    """A checkpoint cannot be used to resume a run (missing, damaged or from another run)."""


class FedHFPrivacyError(FedHFError):
    """DP was asked for and cannot be applied (or a privacy setting cannot be met)."""

    quotable = True  # names settings and model modules, never data


def text_leaving_node(exc: BaseException) -> str:
    """What a node may tell the server about an error: no row values, no local paths."""
    if isinstance(exc, FedHFError):
        if exc.public is not None:
            return exc.public
        if exc.quotable:
            return str(exc)
    if getattr(exc, "quotable", False):
        return str(exc)
    return f"{type(exc).__name__} on the node (its message stays in the node's log)"
