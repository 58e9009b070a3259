"""docs/tutorial.md cannot rot: its shell blocks are extracted and run, in order, in one shell, as a reader would.

The run happens in a copy of the repository (outputs stay out of the checkout), with the datasets from
FEDHF_DATA_DIR and a local Hub server on 127.0.0.1 as HF_ENDPOINT (nothing leaves this machine).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO

TUTORIAL = REPO / "docs" / "tutorial.md"
SKIP = re.compile(r"<!-- not run by the tutorial test: (.+?) -->\s*$")
FED_DIR = Path("/tmp/fedhf-tutorial-fed")


def blocks() -> list[tuple[int, str, str | None]]:
    """(line number, code, skip reason or None) of every ```bash block."""
    lines = TUTORIAL.read_text().splitlines()
    out, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```bash":
            start = i
            j = i + 1
            while lines[j].strip() != "```":
                j += 1
            prev = next((lines[k] for k in range(start - 1, -1, -1) if lines[k].strip()), "")
            m = SKIP.search(prev)
            out.append((start + 1, "\n".join(lines[start + 1 : j]), m.group(1) if m else None))
            i = j
        i += 1
    return out


def test_only_the_install_block_is_skipped_and_it_matches_the_install_script():
    skipped = [(n, code, why) for n, code, why in blocks() if why]
    assert len(skipped) == 1, skipped
    _, code, _ = skipped[0]
    env_sh = (REPO / "scripts" / "_env.sh").read_text()
    assert (
        '-m pip install --quiet "torch==2.13.0"' in env_sh and '.venv/bin/python -m pip install "torch==2.13.0"' in code
    )
    extras = re.search(r'-m pip install --quiet -e "\$FEDHF_ROOT\[([a-z,]+)\]"', env_sh).group(1)
    assert {"offline", "test"} <= set(extras.split(","))
    assert f'.venv/bin/python -m pip install -e ".[{extras}]"' in code  # the same extras as the scripts install
    assert len([b for b in blocks() if not b[2]]) >= 10


def _script() -> str:
    parts = ["set -euo pipefail"]
    for n, code, why in blocks():
        if why:
            continue
        parts.append(f'echo "=== tutorial block at line {n} (${{SECONDS}} s in)" >&2')
        parts.append(code)
    parts.append('echo "=== tutorial finished (${SECONDS} s)" >&2')
    return "\n".join(parts) + "\n"


def _stop_federation() -> None:
    if (FED_DIR / "superlink").exists():
        subprocess.run(
            ["bash", str(REPO / "scripts" / "deploy" / "local_federation.sh"), "stop", "--dir", str(FED_DIR)],
            capture_output=True,
            timeout=120,
        )


@pytest.mark.slow
def test_every_tutorial_command_runs_as_written(tmp_path, shared_data_dir):
    from .test_hub import TOKEN, start_server, stop

    work = tmp_path / "fedhf"
    shutil.copytree(
        REPO,
        work,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "outputs", "__pycache__", "*.egg-info", ".pytest_cache", "fedhf-report"
        ),
    )
    shutil.rmtree(FED_DIR, ignore_errors=True)
    hub, endpoint = start_server(tmp_path, "--token", TOKEN)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "FLWR_HOME"))}
    env.update(
        PATH=f"{Path(sys.executable).parent}:{env['PATH']}",
        FEDHF_DATA_DIR=str(shared_data_dir),
        HF_ENDPOINT=endpoint,
        HF_TOKEN=TOKEN,
        HF_HOME=str(tmp_path / "hf-home"),
        HF_HUB_DISABLE_XET="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_DATASETS_OFFLINE="1",
        FLWR_TELEMETRY_ENABLED="0",
        RAY_USAGE_STATS_ENABLED="0",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
    )
    (tmp_path / "tutorial.sh").write_text(_script())
    try:
        proc = subprocess.run(
            ["bash", str(tmp_path / "tutorial.sh")], cwd=work, env=env, capture_output=True, text=True, timeout=1500
        )
    finally:
        _stop_federation()
        stop(hub)
    assert proc.returncode == 0, (
        "the tutorial stopped in "
        + ([line for line in proc.stderr.splitlines() if line.startswith("=== tutorial block")] or ["?"])[-1]
        + "\n"
        + proc.stdout[-3000:]
        + "\n"
        + proc.stderr[-5000:]
    )
    assert "=== tutorial finished" in proc.stderr

    out = work / "outputs"
    first = json.loads((out / "first" / "run.json").read_text())
    assert first["status"] == "complete" and len(first["rounds"]) == 3 and "audit" in first
    dp = json.loads((out / "dp" / "run.json").read_text())
    assert all(c["epsilon"] <= 8.0 + 1e-9 for c in dp["privacy"]["clients"].values())
    assert dp["config"]["model.pooling"] == "mean" and dp["config"]["train.optimizer"] == "sgd"
    assert json.loads((out / "dp" / "hub" / "fedhf.json").read_text())["pooling"] == "mean"  # travels to the Hub
    budget = json.loads((out / "budget" / "run.json").read_text())["privacy"]["clients"]
    assert budget["0"]["stopped"]["reason"] == "max-epsilon" and budget["0"]["epsilon"] <= 3.0
    assert [len(budget[p]["rounds"]) for p in ("1", "2")] == [3, 3]
    langs = {
        e["data"]["data.languages"] for e in json.loads((out / "afrisenti" / "run.json").read_text())["evaluations"]
    }
    assert langs == {"hau", "orm"}
    assert (out / "report" / "privacy_utility.png").is_file()
    assert re.search(r"^uploaded \d+ files to your-name/fedhf-tutorial-dp:$", proc.stdout, re.M), proc.stdout[-2000:]
    predictions = re.findall(r"^(positive|negative)\t(0\.\d+|1\.0+)\t(a gorgeous|a dull)", proc.stdout, re.M)
    assert len(predictions) == 2, proc.stdout[-2000:]
    assert proc.stdout.splitlines()[-1] == "complete"  # the deployed run's status, printed last
