"""The README stays a true landing page: short, its quickstart commands exist, its links resolve.

The config-key reference moved to the docs site (generated from the code): tests/test_docs.py.
"""

import os
import re

from .conftest import REPO

README = (REPO / "README.md").read_text()
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def test_quickstart_commands_exist_and_are_executable():
    for script in ("scripts/quickstart.sh", "scripts/test.sh"):
        assert f"{script}" in README
        assert os.access(REPO / script, os.X_OK), script
    ci = (REPO / ".ci" / "run").read_text()
    assert "scripts/test.sh" in ci


def test_readme_is_at_most_250_lines():
    assert len(README.splitlines()) <= 250


def test_every_relative_link_in_the_readme_points_to_an_existing_file():
    targets = LINK.findall(README)
    relative = [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:", t) and not t.startswith("#")]
    assert relative, "no relative links found: the link pattern is broken"
    for target in relative:
        path = target.split("#", 1)[0]
        assert not path.startswith("/"), target
        assert (REPO / path).exists(), f"README.md links to {target}, which does not exist"


def test_readme_shows_a_results_figure_from_the_docs():
    images = [t for t in re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", README)]
    assert any(t.startswith("docs/results/") and t.endswith(".png") for t in images), images
