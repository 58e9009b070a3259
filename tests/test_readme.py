"""The README stays true: every config key is documented, and the quickstart commands exist."""

import os

from fedhf.config.schema import SPECS

from .conftest import REPO

README = (REPO / "README.md").read_text()


def test_every_config_key_is_in_the_reference_table():
    for spec in SPECS:
        assert f"| `{spec.key}` | `{spec.default!r}` |" in README, spec.key


def test_quickstart_commands_exist_and_are_executable():
    for script in ("scripts/quickstart.sh", "scripts/test.sh"):
        assert f"{script}" in README
        assert os.access(REPO / script, os.X_OK), script
    ci = (REPO / ".ci" / "run").read_text()
    assert "scripts/test.sh" in ci
