"""The docs site stays true: its reference pages are generated from the code, and it builds with --strict.

docs/gen_reference.py renders the configuration, command-line and architecture pages when mkdocs
builds the site (mkdocs-gen-files); these tests call its page functions directly (fast) and run one
real ``mkdocs build --strict``.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import subprocess
import sys

import click
import pytest
import typer

from fedhf.cli import app
from fedhf.config.schema import SPECS
from fedhf.federation.node import NODE_CONFIG_KEYS

from .conftest import REPO


@pytest.fixture(scope="module")
def gen():
    spec = importlib.util.spec_from_file_location("gen_reference", REPO / "docs" / "gen_reference.py")
    module = importlib.util.module_from_spec(spec)
    dont_write, sys.dont_write_bytecode = sys.dont_write_bytecode, True  # no docs/__pycache__
    try:
        spec.loader.exec_module(module)
    finally:
        sys.dont_write_bytecode = dont_write
    return module


@pytest.fixture(scope="module")
def config_page(gen):
    return gen.config_page()


def test_every_config_key_is_in_the_generated_reference_table(config_page):
    for spec in SPECS:
        assert f"| `{spec.key}` | `{spec.default!r}` |" in config_page, spec.key


def test_every_config_row_is_one_table_row(gen):
    rows = gen.config_rows()
    assert len(rows) == len(SPECS)
    for row in rows:  # a '|' in a help text must not split the row into extra cells
        assert len(re.findall(r"(?<!\\)\|", row)) == 4, row


def test_every_node_config_key_is_in_the_generated_reference(config_page):
    for key in NODE_CONFIG_KEYS:
        assert f"| `{key}` |" in config_page, key


def _commands(cmd: click.Command, path: str):
    yield path, cmd
    if isinstance(cmd, click.Group):
        for name, sub in cmd.commands.items():
            yield from _commands(sub, f"{path} {name}")


def test_cli_reference_has_every_command_and_option(gen):
    page = gen.cli_page()
    commands = list(_commands(typer.main.get_command(app), "fedhf"))
    assert {"fedhf privacy plan", "fedhf privacy ledger", "fedhf node-check"} <= {p for p, _ in commands}
    for path, cmd in commands[1:]:
        assert f"# `{path}`" in page, path
        for param in cmd.params:
            for opt in param.opts:
                if opt.startswith("--"):
                    assert opt in page, f"{path} {opt}"


def test_architecture_page_follows_the_import_layers_and_covers_every_module(gen):
    stages = gen.stage_order()
    assert stages[0] == "fedhf.config" and stages[-1] == "fedhf.cli" and "fedhf.flower" in stages
    page = gen.architecture_page()
    positions = [page.index(f"## `{stage}`") for stage in stages]
    assert positions == sorted(positions), "stages out of order"
    for path in sorted((REPO / "fedhf").rglob("*.py")):
        doc = ast.get_docstring(ast.parse(path.read_text()))
        if path.name == "__init__.py" and not doc:
            continue
        assert f"### `{path.relative_to(REPO).as_posix()}`" in page, path


def test_generated_pages_are_not_committed_files():
    for name in ("config.md", "cli.md", "architecture.md"):
        assert not (REPO / "docs" / "reference" / name).exists(), f"docs/reference/{name} is generated at build time"


def test_every_fedhf_path_in_the_readme_and_docs_exists():
    files = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    seen = 0
    for f in files:
        for path in re.findall(r"fedhf/[A-Za-z0-9_/]*\.py", f.read_text()):
            seen += 1
            assert (REPO / path).is_file(), f"{f.relative_to(REPO)} names {path}, which does not exist"
    assert seen, "no fedhf/...py paths found: the pattern is broken"


def test_mkdocs_build_strict(tmp_path):
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "DISABLE_MKDOCS_2_WARNING": "true"}
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    config = (site / "reference" / "config" / "index.html").read_text()
    cli = (site / "reference" / "cli" / "index.html").read_text()
    assert "privacy.target-epsilon" in config and "max-epsilon" in config
    assert "node-check" in cli and "privacy plan" in cli
    assert (site / "reference" / "architecture" / "index.html").is_file()
    assert not (site / "gen_reference.py").exists()
