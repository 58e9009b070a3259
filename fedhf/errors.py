"""Errors fedhf raises at its boundaries, each saying what to fix."""


class FedHFError(Exception):
    """Base class: a problem the user can fix; the CLI prints it as one line."""


class FedHFConfigError(FedHFError, ValueError):
    """A run-config key is unknown, mistyped or out of range."""


class FedHFDataError(FedHFError):
    """A dataset cannot be loaded, has the wrong columns or cannot be partitioned."""


class FedHFModelError(FedHFError):
    """A model cannot be resolved or an adapter state does not fit the model."""


class FedHFRunError(FedHFError):
    """A federated run cannot continue (e.g. every client failed a round)."""
