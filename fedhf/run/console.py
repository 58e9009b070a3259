"""The console of a run: a plan, one progress bar, one line per round and a summary; the rest goes to the log.

While a run is captured, file descriptors 1 and 2 of this process point at the run's log file, so
everything Flower, Ray (and its actors' forwarded output), transformers, datasets and Opacus print
lands there in full, once. fedhf writes its own lines to the terminal streams it kept. With
``verbose`` the log is also shown live (a thread copies it to the terminal as it is written).

The log starts as ``OUTPUT_DIR/fedhf-<pid>.log`` (the run folder does not exist yet) and moves to
``RUN_DIR/log.txt`` as soon as the ServerApp has created the run folder (:meth:`RunConsole.adopt`).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

from tqdm.auto import tqdm

from fedhf.run.progress import RoundProgress

LOG_NAME = "log.txt"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class RunConsole:
    """What the user sees of a run. ``out``/``err``: the terminal's stdout and stderr, kept apart from fds 1 and 2."""

    def __init__(self, verbose: bool = False) -> None:
        self.verbose = verbose
        self.out: TextIO = sys.stdout
        self.err: TextIO = sys.stderr
        self.log_path: Path | None = None
        self._saved: dict[int, int] = {}
        self._handlers: list[tuple[logging.Logger, logging.Handler]] = []
        self._propagate: dict[str, bool] = {}
        self._tee: threading.Thread | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ capture

    @contextmanager
    def capture(self, log_path: Path) -> Iterator[RunConsole]:
        """Send fds 1 and 2 (and Python's logging) to ``log_path`` until the block ends."""
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path = log_path
        sys.stdout.flush()
        sys.stderr.flush()
        self._saved = {fd: os.dup(fd) for fd in (1, 2)}
        self.out = os.fdopen(os.dup(self._saved[1]), "w", buffering=1, encoding="utf-8", errors="replace")
        self.err = os.fdopen(os.dup(self._saved[2]), "w", buffering=1, encoding="utf-8", errors="replace")
        log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        if self.verbose:  # a pipe into the log and the terminal; the thread owns its own descriptors
            read_fd, write_fd = os.pipe()
            self._tee = threading.Thread(
                target=_copy,
                args=(read_fd, os.dup(log_fd), os.dup(self._saved[2])),
                daemon=True,
                name="fedhf-log-tee",
            )
            self._tee.start()
            target = write_fd
        else:
            target = log_fd
        for fd in (1, 2):
            os.dup2(target, fd)
        if target != log_fd:
            os.close(target)
        self._log = os.fdopen(2, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)  # the log
        self._configure_logging()
        try:
            yield self
        finally:
            self._restore(log_fd)

    def _configure_logging(self) -> None:
        # Every library logger reaches the log through the root logger, once. A root handler set here first
        # also turns Opacus' import-time logging.basicConfig into a no-op (it doubled every Flower line).
        root = logging.getLogger()
        to_log = logging.StreamHandler(self._log)  # fd 2: the log file
        to_log.setFormatter(logging.Formatter(LOG_FORMAT))
        self._add(root, to_log)
        self._levels = {"": root.level}
        if root.level > logging.INFO or root.level == logging.NOTSET:
            root.setLevel(logging.INFO)
        # Flower has its own console handler (on fd 2, the log) once it is imported: its records must not be
        # written a second time by ours (checked when each record comes, since Flower may be imported later).
        to_log.addFilter(_not_flowers_own)
        fedhf = logging.getLogger("fedhf")
        self._propagate["fedhf"] = fedhf.propagate
        self._levels["fedhf"] = fedhf.level
        fedhf.propagate = True
        fedhf.setLevel(logging.INFO)
        if not self.verbose:  # a warning is shown as it happens, and kept in the log (verbose shows the log itself)
            warn = logging.StreamHandler(self.err)
            warn.setLevel(logging.WARNING)
            warn.setFormatter(_ConsoleFormatter())
            self._add(fedhf, warn)

    def _add(self, logger: logging.Logger, handler: logging.Handler) -> None:
        logger.addHandler(handler)
        self._handlers.append((logger, handler))

    def _restore(self, log_fd: int) -> None:
        for logger, handler in self._handlers:
            logger.removeHandler(handler)
        self._handlers.clear()
        for name, value in self._propagate.items():
            logging.getLogger(name).propagate = value
        for name, level in getattr(self, "_levels", {}).items():
            logging.getLogger(name or None).setLevel(level)
        self._propagate.clear()
        self._levels = {}
        sys.stdout.flush()
        sys.stderr.flush()
        self._log.flush()
        for fd, saved in self._saved.items():
            os.dup2(saved, fd)  # closes this process's end of the tee's pipe (fds 1 and 2)
        if self._tee is not None:
            self._tee.join(timeout=2.0)  # a child process may still hold the pipe open; the thread is a daemon
            self._tee = None
        for saved in self._saved.values():
            os.close(saved)
        self._saved.clear()
        os.close(log_fd)
        for stream in (self.out, self.err):
            stream.close()
        self.out, self.err = sys.stdout, sys.stderr

    # ------------------------------------------------------------------ the run's lines

    def adopt(self, run_dir: Path) -> Path:
        """Move the log into the run folder (``RUN_DIR/log.txt``); the open descriptors keep writing to it.

        A resumed run's log is ``RUN_DIR/log.txt`` from the start (appended to); a log already there is never
        replaced: the log then stays where it is.
        """
        target = run_dir / LOG_NAME
        with self._lock:
            if self.log_path is not None and self.log_path != target and not target.exists():
                os.replace(self.log_path, target)
                self.log_path = target
        return self.log_path if self.log_path is not None else target

    def line(self, text: str, *, err: bool = True) -> None:
        """One line for the user (stderr by default; results on stdout), above the progress bar, and in the log."""
        if self.verbose and self._saved:  # the tee shows the log: write it there once
            print(text, file=self._log, flush=True)
            return
        tqdm.write(text, file=self.err if err else self.out)
        if self._saved:
            print(text, file=self._log, flush=True)

    def progress(self, total: int, done: int = 0) -> RoundProgress:
        return RoundProgress(total, done, write=lambda text: self.line(text, err=False), bar_file=self.err)


def _not_flowers_own(record: logging.LogRecord) -> bool:
    """False for a Flower record while Flower's logger prints it itself."""
    if record.name != "flwr" and not record.name.startswith("flwr."):
        return True
    return not logging.getLogger("flwr").handlers


class _ConsoleFormatter(logging.Formatter):
    """``[fedhf] warning: ...``: a line starting ``error:`` is the command's own final error (one per failure)."""

    def format(self, record: logging.LogRecord) -> str:
        return f"[fedhf] {record.levelname.lower()}: {record.getMessage()}"


def _copy(read_fd: int, log_fd: int, terminal_fd: int) -> None:
    """The verbose tee: the pipe's bytes into the log and onto the terminal, until every writer has closed it."""
    try:
        while True:
            try:
                chunk = os.read(read_fd, 1 << 16)
            except OSError:
                break
            if not chunk:
                break
            for fd in (log_fd, terminal_fd):
                try:
                    os.write(fd, chunk)
                except OSError:
                    pass
    finally:
        for fd in (read_fd, log_fd, terminal_fd):
            os.close(fd)


def attach_log_file(run_dir: Path) -> Any:
    """Outside ``fedhf run`` (``flwr run``, a SuperLink's ServerApp): fedhf's own log lines into ``RUN_DIR/log.txt``.
    Returns a function that detaches the handler again."""
    handler = logging.FileHandler(run_dir / LOG_NAME, encoding="utf-8")
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.setLevel(logging.INFO)
    logger = logging.getLogger("fedhf")
    level = logger.level
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    logger.addHandler(handler)

    def detach() -> None:
        logger.removeHandler(handler)
        logger.setLevel(level)
        handler.close()

    return detach
