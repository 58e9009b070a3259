"""The run's console: library output goes to the log, fedhf's own lines to the terminal (and the log), once."""

from __future__ import annotations

import logging
import os

from fedhf.run.console import RunConsole


def _speak(console: RunConsole, run_dir) -> None:
    os.write(1, b"library stdout\n")
    os.write(2, b"library stderr\n")
    flwr = logging.getLogger("flwr")
    flwr.warning("flower says")  # Flower not imported yet: its records reach the log through fedhf's handler
    own = logging.StreamHandler(os.fdopen(2, "w", closefd=False))  # as Flower's console handler, on fd 2
    flwr.addHandler(own)  # Flower imported during the run: its own handler prints, fedhf's does not print it again
    flwr.warning("flower again")
    flwr.removeHandler(own)
    logging.getLogger("fedhf").info("fedhf info")
    logging.getLogger("fedhf").warning("careful")
    console.line("plan line")
    run_dir.mkdir()
    console.adopt(run_dir)
    console.line("round line", err=False)


def _without_flowers_handlers(monkeypatch) -> None:
    monkeypatch.setattr(logging.getLogger("flwr"), "handlers", [])  # hermetic: no handler of an earlier test's


def test_quiet_capture_keeps_the_terminal_calm_and_the_log_complete(tmp_path, capfd, monkeypatch):
    _without_flowers_handlers(monkeypatch)
    console = RunConsole()
    before = logging.getLogger().level, logging.getLogger("fedhf").level, logging.getLogger("flwr").propagate
    with console.capture(tmp_path / "fedhf-1.log"):
        _speak(console, tmp_path / "run")
    out, err = capfd.readouterr()
    assert out.splitlines() == ["round line"]
    assert err.splitlines() == ["[fedhf] warning: careful", "plan line"]
    log = (tmp_path / "run" / "log.txt").read_text()
    assert not (tmp_path / "fedhf-1.log").exists()  # moved into the run folder
    for text in (
        "library stdout",
        "library stderr",
        "flower says",
        "flower again",
        "fedhf info",
        "careful",
        "plan line",
        "round line",
    ):
        assert log.count(text) == 1, text
    after = logging.getLogger().level, logging.getLogger("fedhf").level, logging.getLogger("flwr").propagate
    assert after == before  # nothing left behind
    os.write(2, b"after the run\n")
    assert "after the run" in capfd.readouterr().err


def test_verbose_shows_the_log_live_once(tmp_path, capfd, monkeypatch):
    _without_flowers_handlers(monkeypatch)
    console = RunConsole(verbose=True)
    with console.capture(tmp_path / "fedhf-2.log"):
        _speak(console, tmp_path / "run")
    out, err = capfd.readouterr()
    shown = out + err
    for text in (
        "library stdout",
        "library stderr",
        "flower says",
        "flower again",
        "careful",
        "plan line",
        "round line",
    ):
        assert shown.count(text) == 1, (text, shown)
    log = (tmp_path / "run" / "log.txt").read_text()
    for text in ("library stdout", "library stderr", "flower says", "fedhf info", "careful", "plan line"):
        assert log.count(text) == 1, text
