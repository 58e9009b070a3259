"""The house rules, checked: import layering (import-linter), lint (ruff), one error hierarchy, one owner per file
format, and the protocol the Flower layer reports to."""

from __future__ import annotations

import ast
import inspect
import shutil
import subprocess
import sys
from pathlib import Path

from .conftest import REPO

PACKAGE = REPO / "fedhf"


def _tool(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent))
    assert found, f"{name} is not installed in this environment (pip install -e '.[test]')"
    return found


def test_every_stage_imports_only_the_stages_before_it():
    proc = subprocess.run([_tool("lint-imports")], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "Contracts: 3 kept, 0 broken." in proc.stdout


def test_ruff_is_clean():
    proc = subprocess.run([_tool("ruff"), "check", "."], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:]


def _modules() -> list[tuple[Path, ast.Module]]:
    return [(p, ast.parse(p.read_text())) for p in sorted(PACKAGE.rglob("*.py"))]


def test_every_exception_is_a_fedhf_error_defined_in_errors():
    import fedhf.errors as errors

    defined = {}
    for path, tree in _modules():
        for node in tree.body:
            if isinstance(node, ast.ClassDef):
                bases = {getattr(b, "id", getattr(b, "attr", "")) for b in node.bases}
                if any(b.endswith(("Error", "Exception")) or b in ("Malformed", "RunStopped") for b in bases):
                    defined[node.name] = path.relative_to(REPO).as_posix()
    outside = {name: where for name, where in defined.items() if where != "fedhf/errors.py"}
    # One exception stays beside its protocol constant: PolicyRefusal (the SecAgg+ refusal text) in the Flower layer.
    assert outside == {"PolicyRefusal": "fedhf/flower/client_app.py"}, outside
    for name, cls in inspect.getmembers(errors, inspect.isclass):
        if issubclass(cls, BaseException):
            assert issubclass(cls, errors.FedHFError), name
    from fedhf.flower.client_app import PolicyRefusal

    assert issubclass(PolicyRefusal, errors.FedHFError)


def test_run_json_is_read_and_written_only_by_its_store():
    offenders = []
    for path, _tree in _modules():
        rel = path.relative_to(REPO).as_posix()
        if rel == "fedhf/run/store.py":
            continue
        text = path.read_text()
        for needle in ('"run.json").read_text', '/ "run.json").write', "run_json.read_text", 'open("run.json"'):
            if needle in text:
                offenders.append(f"{rel}: {needle}")
    assert offenders == []


def test_one_atomic_write_and_one_file_hash():
    offenders = []
    for path, tree in _modules():
        rel = path.relative_to(REPO).as_posix()
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.FunctionDef)
                and rel != "fedhf/_io.py"
                and ("atomic" in node.name or node.name in ("sha256_file", "_sha256", "write_json_atomic"))
            ):
                offenders.append(f"{rel}: def {node.name}")
    assert offenders == []


def test_the_run_recorder_is_a_round_observer():
    from fedhf.federation.events import RoundObserver
    from fedhf.run.record import RunRecorder

    events = [(n, m) for n, m in inspect.getmembers(RoundObserver, inspect.isfunction) if not n.startswith("_")]
    assert len(events) == 7
    for name, member in events:
        mine = getattr(RunRecorder, name, None)
        assert callable(mine), name
        want = list(inspect.signature(member).parameters)
        got = list(inspect.signature(mine).parameters)
        assert got[: len(want)] == want, (name, got, want)
    assert "dir" in RoundObserver.__annotations__


def test_flwr_is_imported_only_by_the_flower_layer():
    importers = set()
    for path, tree in _modules():
        for node in ast.walk(tree):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            if any(n == "flwr" or n.startswith("flwr.") for n in names):
                importers.add(path.relative_to(REPO).as_posix())
    assert importers and all(p.startswith("fedhf/flower/") for p in importers), importers
