"""Generate the reference pages of the docs site from the code, at build time (mkdocs-gen-files).

- ``reference/config.md``: every run-config key (``fedhf.config.schema.describe``) and every
  node-config key (``fedhf.federation.node.NODE_CONFIG_KEYS``, documented in ``fedhf.privacy.policy``);
- ``reference/cli.md``: every ``fedhf`` command and sub-command, from the Typer app ``fedhf.cli:app``;
- ``reference/architecture.md``: the package layout, from the docstrings under ``fedhf/`` (parsed with
  ``ast``, nothing imported) in the order of the import-linter layers in ``pyproject.toml``.

None of these pages is a file in the repository, so they cannot drift from the code. The page
functions return Markdown and have no side effects (``tests/test_docs.py`` calls them); writing the
pages happens only when mkdocs runs this file.
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

_MD_SPECIAL = re.compile(r"([\\`*_\[\]|])")


def md_escape(text: str) -> str:
    """Plain text as Markdown that renders as itself, also inside a table cell."""
    text = _MD_SPECIAL.sub(r"\\\1", text)
    return text.replace("<", "&lt;").replace(">", "&gt;")


def _rst_to_md(text: str) -> str:
    """Docstring markup to Markdown: ``:class:`X``` -> ```X```; lists set off from the paragraphs around them."""
    text = re.sub(r":[a-z]+:`~?([^`]+)`", r"`\1`", text)
    out: list[str] = []
    in_fence = in_list = False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
        if in_fence or not line.strip():
            in_list = False
            out.append(line)
            continue
        is_item = re.match(r"(- |\d+\. )", line) is not None
        if is_item and not in_list and out and out[-1].strip():
            out.append("")  # a list right after a paragraph line
        elif in_list and not is_item and not line.startswith(" "):
            out.append("")  # a paragraph right after a list (continuation lines are indented)
        in_list = is_item or (in_list and line.startswith(" "))
        out.append(line)
    return "\n".join(out)


# --------------------------------------------------------------------------- reference/config.md

CONFIG_INTRO = """\
# Configuration reference

One typed config (`fedhf/config/schema.py`), parsed once from Flower's `run_config` (or `fedhf run
--config FILE --set KEY=VALUE`). An unknown key, a wrong type or an out-of-range value stops the
run before anything starts with `FedHFConfigError` naming the key, the value and what is allowed.
Lists are comma strings.

This page is generated from `fedhf.config.schema` when the site is built; `fedhf config` prints
the same keys with their values.
"""

CONFIG_OUTRO = """\
Strategies: `fedavg`, `fedprox` (the client adds mu/2 ‖w − w_global‖² over the trainable
parameters to its loss), `fedadam` and `fedyogi` (server-side optimizers; `strategy.server-lr`,
`beta-1`, `beta-2`, `tau`), all Flower's own Message-API strategies. The server evaluates the
global adapter on the central eval set before round 1 (round 0) and after every round (loss,
accuracy, macro-F1); with `strategy.fraction-evaluate` > 0 the clients also evaluate it on their
held-out rows.
"""

_GROUP_TITLES = {
    "": "Run",
    "data": "Data",
    "model": "Model",
    "train": "Local training",
    "strategy": "Strategy",
    "privacy": "Differential privacy",
    "transport": "Transport",
    "hub": "Hugging Face Hub",
}

# Node-config keys that are not part of the owner's policy (fedhf.privacy.policy documents those).
_NODE_KEY_MEANINGS = {
    "data-path": "this silo's data on this machine: a csv/tsv/json/jsonl/parquet file, or a folder "
    "(`train.*` for training, `test.*`/`validation.*` for local evaluation).",
    "partition-id": "instead of `data-path`: which partition of the run's `data.dataset` this node holds "
    "(demos on one shared dataset); with `data-path`, the silo's name in the ledger.",
    "num-partitions": "with `partition-id`: how many partitions the dataset is split into.",
    "state-dir": "where this node keeps its privacy spend, per dataset, over every run "
    "(see [Reliability](../reliability.md)).",
    "lora-rank": "the LoRA rank this node trains (at most the run's `model.lora.r`), for its own compute; it needs "
    "`strategy.lora-aggregation = svd` (otherwise the node refuses, rule `lora-rank`). The node starts each round "
    "from the truncation of the global product to its rank and sends its rank (see [Model](../model.md)).",
    "allow-canaries": "`true` lets a run's canary audit (`audit.canaries`) add its canary records to this node's "
    "training rows (default `false`: the node refuses, rule `allow-canaries`); a silo (`data-path`) never takes them. "
    "`fedhf run` sets it for its own simulated canary client.",
    "fail-at-round": "fault injection, for tests only: the round in which this node fails when asked to train.",
    "fail-mode": "fault injection, for tests only: how it fails (`raise`, `exit`, `hang`, or a malformed "
    "reply: `nan`, `inf`, `shape`, `extra`, `missing`, `norm`, `dtype`).",
    "fail-seconds": "fault injection, for tests only: how long `fail-mode=hang` sleeps (default 3600).",
}


def config_rows() -> list[str]:
    """One table row per run-config key, in schema order: ``| `key` | `default!r` | meaning |``."""
    from fedhf.config.schema import SPECS, describe

    rows = []
    for spec, (key, _default, meaning) in zip(SPECS, describe(), strict=True):
        assert key == spec.key
        rows.append(f"| `{spec.key}` | `{spec.default!r}` | {md_escape(meaning)} |")
    return rows


def _policy_key_docs() -> dict[str, str]:
    """The node-config keys' meanings from the bullet list in fedhf.privacy.policy's docstring."""
    from fedhf.privacy import policy

    docs: dict[str, str] = {}
    key = None
    for line in (policy.__doc__ or "").splitlines():
        m = re.match(r"- ``([a-z-]+)``(.*)", line)
        if m:
            key = m.group(1)
            docs[key] = m.group(2).strip()
        elif key and line.startswith("  "):
            docs[key] += " " + line.strip()
        else:
            key = None
    return {k: re.sub(r"^(?:= |: )", "", v).strip() for k, v in docs.items()}


def _cell(text: str) -> str:
    """Docstring text (with ``code``) for a table cell: code stays code, pipes are escaped."""
    text = re.sub(r":[a-z]+:`~?([^`]+)`", r"`\1`", text).replace("``", "`")
    return text.replace("|", "\\|")


def config_page() -> str:
    from fedhf.config.schema import SPECS
    from fedhf.federation.node import NODE_CONFIG_KEYS
    from fedhf.privacy.policy import POLICY_KEYS, SHAREABLE

    lines = [CONFIG_INTRO, "## Run config", ""]
    rows = config_rows()
    group = None
    for spec, row in zip(SPECS, rows, strict=True):
        g = spec.key.split(".")[0] if "." in spec.key else ""
        if g != group:
            group = g
            lines += ["", f"### {_GROUP_TITLES.get(g, g)}", "", "| key | default | meaning |", "|---|---|---|"]
        lines.append(row)
    lines += ["", CONFIG_OUTRO]

    policy_docs = _policy_key_docs()
    missing = [k for k in NODE_CONFIG_KEYS if k not in policy_docs and k not in _NODE_KEY_MEANINGS]
    if missing:
        raise RuntimeError(
            f"docs/gen_reference.py: node-config keys without a meaning: {missing}; document them "
            "in fedhf.privacy.policy's docstring (policy keys) or in _NODE_KEY_MEANINGS."
        )
    lines += [
        "## Node config",
        "",
        (
            "A node's own settings: its data and its owner's policy, set when the SuperNode starts "
            '(`flower-supernode --node-config "key=value ..."`) or, for simulated nodes, in a `--node-config` '
            "TOML file of `[default]` and `[nodes.N]` tables (`fedhf run --node-config FILE`); never taken from the "
            "run config. `fedhf node-check` refuses other keys. The policy keys are documented in "
            "`fedhf.privacy.policy`; see [Differential privacy](../privacy.md#data-owners-policy-enforced-by-the-node) "
            "and [Deployment](../deployment.md)."
        ),
        "",
        "| key | policy | meaning |",
        "|---|---|---|",
    ]
    for key in NODE_CONFIG_KEYS:
        is_policy = key in POLICY_KEYS
        meaning = _cell(policy_docs[key]) if key in policy_docs else _NODE_KEY_MEANINGS[key]
        lines.append(f"| `{key}` | {'yes' if is_policy else ''} | {meaning} |")
    lines += [
        "",
        (
            "What `share` can name (each is outside the sample-level guarantee, so under DP it leaves the "
            "node only when named):"
        ),
        "",
        "| name | what it is |",
        "|---|---|",
    ]
    for name, what in SHAREABLE.items():
        lines.append(f"| `{name}` | {md_escape(what)} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- reference/cli.md


def _unescape_typer(text: str) -> str:
    return text.replace("\\[", "[")


def _command_section(cmd, ctx, path: str, level: int) -> list[str]:
    import click

    lines = [f"{'#' * level} `{path}`", ""]
    if cmd.help:
        lines += [md_escape(cmd.help).strip(), ""]
    lines += ["```text", f"{path} {' '.join(cmd.collect_usage_pieces(ctx))}", "```", ""]
    params = [p for p in cmd.get_params(ctx) if "--help" not in p.opts]
    if params:
        lines += ["| argument / option | meaning |", "|---|---|"]
        for p in params:
            if isinstance(p, click.Argument):
                name = p.make_metavar(ctx)
                meaning = getattr(p, "help", None) or ""
                if p.required:
                    meaning = f"{meaning}  [required]".strip()
            else:
                record = p.get_help_record(ctx)
                if record is None:  # hidden option
                    continue
                name, meaning = record
            lines.append(f"| `{_unescape_typer(name)}` | {md_escape(_unescape_typer(meaning))} |")
        lines.append("")
    if isinstance(cmd, click.Group):
        for sub_name, sub in cmd.commands.items():
            sub_ctx = click.Context(sub, info_name=sub_name, parent=ctx)
            lines += _command_section(sub, sub_ctx, f"{path} {sub_name}", level + 1)
    return lines


def cli_page() -> str:
    import click
    import typer

    from fedhf.cli import app

    root = typer.main.get_command(app)
    ctx = click.Context(root, info_name="fedhf")
    lines = [
        "# Command-line reference",
        "",
        (
            "Generated from the Typer app `fedhf.cli:app` when the site is built; `fedhf --help` and "
            "`fedhf COMMAND --help` print the same. Every user error is one line, `error: ...`, with exit code 2; "
            "a run that fails after starting exits 1 and its `run.json` says `failed`."
        ),
        "",
        md_escape(root.help or "").strip(),
        "",
        "| command | what it does |",
        "|---|---|",
    ]
    for name, sub in root.commands.items():
        lines.append(f"| [`fedhf {name}`](#fedhf-{name}) | {md_escape(sub.get_short_help_str(limit=200))} |")
    lines.append("")
    for name, sub in root.commands.items():
        lines += _command_section(sub, click.Context(sub, info_name=name, parent=ctx), f"fedhf {name}", 2)
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- reference/architecture.md

ARCHITECTURE_INTRO = """\
# Architecture

fedhf is one package, `fedhf/`, in stages. Data flows one way: configuration, data, the task
(model and adapter), local training, privacy, the federation's round logic, the Flower layer,
the run record, the release (model card, Hub), analysis (reports, audit, sweeps), and at the top
the composition root `fedhf.apps` and the `fedhf` command. Each stage imports only the stages
before it. This is enforced by the import-linter contracts in `pyproject.toml`
(`[tool.importlinter]`, checked by `lint-imports`): only `fedhf.flower` imports `flwr`, and
`fedhf.errors` and `fedhf._io` depend on no stage. `fedhf.apps` is the composition root: it wires
the run, release and analysis stages into Flower's apps, handing the Flower layer plain callables.

This page is generated from the package and module docstrings when the site is built.
"""


def _importlinter() -> dict:
    with (REPO / "pyproject.toml").open("rb") as fh:
        return tomllib.load(fh)["tool"]["importlinter"]


def stage_order() -> list[str]:
    """The stages, first to last: the import-linter layers contract, read bottom up."""
    for contract in _importlinter()["contracts"]:
        if contract.get("type") == "layers":
            return list(reversed(contract["layers"]))
    raise RuntimeError("pyproject.toml: no import-linter layers contract")


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(tree: ast.Module) -> set[str]:
    """Every module a file imports, at any depth (lazy imports inside functions included)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def _stage_of(module: str, stages: list[str]) -> str | None:
    for stage in sorted(stages, key=len, reverse=True):
        if module == stage or module.startswith(stage + "."):
            return stage
    return None


def architecture_page() -> str:
    stages = stage_order()
    shared = ["fedhf.errors", "fedhf._io"]
    files = sorted(p for p in (REPO / "fedhf").rglob("*.py") if "__pycache__" not in p.parts)
    by_stage: dict[str, list[Path]] = {}
    for path in files:
        module = _module_name(path)
        key = _stage_of(module, stages + shared) or ("fedhf" if module == "fedhf" else "other")
        by_stage.setdefault(key, []).append(path)

    lines = [ARCHITECTURE_INTRO, "## The contracts", ""]
    for contract in _importlinter()["contracts"]:
        lines.append(f"- {md_escape(contract['name'])} ({contract['type']})")
    lines += ["", "## Stages, first to last", ""]
    lines += [" → ".join(f"`{s}`" for s in stages), ""]

    def section(title: str, key: str) -> None:
        paths = by_stage.get(key, [])
        if not paths:
            return
        lines.extend([f"## `{title}`", ""])
        fedhf_deps: set[str] = set()
        third_party: set[str] = set()
        for path in paths:
            for name in _imports(ast.parse(path.read_text(encoding="utf-8"))):
                top = name.split(".")[0]
                if top == "fedhf":
                    dep = _stage_of(name, stages + shared)
                    if dep and dep != key:
                        fedhf_deps.add(dep)
                elif top not in sys.stdlib_module_names and top != "__future__":
                    third_party.add(top)
        if key in stages or key in shared:
            order = shared + stages
            deps = sorted(fedhf_deps, key=order.index)
            lines.append(
                f"Imports from fedhf: {', '.join(f'`{d}`' for d in deps) or 'nothing'}. "
                f"Third-party: {', '.join(f'`{t}`' for t in sorted(third_party)) or 'none'}."
            )
            lines.append("")
        for path in paths:
            doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
            rel = path.relative_to(REPO).as_posix()
            if path.name == "__init__.py" and not doc:
                continue
            lines.extend([f"### `{rel}`", "", _rst_to_md(doc) if doc else "(no module docstring)", ""])

    section("fedhf", "fedhf")
    lines += [
        "## Under every stage",
        "",
        "Any stage may import `fedhf.errors` and `fedhf._io`; they import no stage.",
        "",
    ]
    for key in shared:
        for path in by_stage.get(key, []):
            doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
            lines.extend(
                [f"### `{path.relative_to(REPO).as_posix()}`", "", _rst_to_md(doc or "(no module docstring)"), ""]
            )
    for stage in stages:
        section(stage, stage)
    section("other modules (in no import-linter layer)", "other")
    lines += _outside_package()
    return "\n".join(lines) + "\n"


_OUTSIDE = """\
## Outside the package

- `pyproject.toml`: the package, the `fedhf` script, the Flower app (`[tool.flwr.app.components]` and the
  run-config schema `[tool.flwr.app.config]`), pytest and import-linter settings.
- `experiments/`: run-config override files (`fedhf run --config`, `flwr run . --run-config`);
  `experiments/<group>/`: one file per setting and `group.toml` (`fedhf sweep`); `experiments/node-configs/`:
  simulated nodes' configs (`fedhf run --node-config`).
- `docs/`: this site (`mkdocs.yml`; the reference pages are generated by `docs/gen_reference.py`).
- `tests/`: unit tests per module, CLI bad-input tests, end-to-end simulations and deployments (marked slow),
  `tests/hubserver.py` (a stand-in for the Hub's HTTP API on 127.0.0.1), `tests/contract/` (the Flower
  internals fedhf relies on).
- `.ci/run`: the CI entry point (`scripts/test.sh`, then every experiment group's smoke sweep).

### `scripts/`
"""


def _script_summary(path: Path) -> str:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".py":
        doc = ast.get_docstring(ast.parse(text)) or ""
        return doc.split("\n\n")[0].replace("\n", " ")
    lines = text.splitlines()
    if lines and lines[0].startswith("#!"):
        lines = lines[1:]
    comment = []
    for line in lines:  # the first paragraph of the header comment
        if not line.startswith("#") or not line.lstrip("#").strip():
            break
        comment.append(line.lstrip("#").strip())
    return " ".join(comment)


def _outside_package() -> list[str]:
    lines = [_OUTSIDE, "| script | what it does |", "|---|---|"]
    for path in sorted((REPO / "scripts").rglob("*")):
        if path.suffix in (".py", ".sh") and "__pycache__" not in path.parts:
            rel = path.relative_to(REPO).as_posix()
            lines.append(f"| `{rel}` | {md_escape(_script_summary(path))} |")
    lines.append("")
    return lines


# --------------------------------------------------------------------------- the build

PAGES = {
    "reference/config.md": config_page,
    "reference/cli.md": cli_page,
    "reference/architecture.md": architecture_page,
    "reference/run-json.md": lambda: run_json_page(),
}


def record_tables() -> list[str]:
    """One table per dataclass of the run record: its fields, their types, whether run.json always holds them."""
    import dataclasses
    import typing

    from fedhf.privacy.ledger import Privacy, RoundPrivacy
    from fedhf.run import store

    lines: list[str] = []
    classes = [store.RunRecord, store.Seeds, store.Dataset, store.Model, store.Partition, store.Round, RoundPrivacy]
    classes += [store.Federation, Privacy, store.Refusal, store.Resume, store.Final, store.StoppedEarly, store.HubPush]
    for cls in classes:
        hints = typing.get_type_hints(cls)
        doc = (cls.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
        lines += [f"### {cls.__name__}", "", doc, "", "| field | type | in run.json |", "|---|---|---|"]
        for f in dataclasses.fields(cls):
            kind = str(hints[f.name]).replace("typing.", "").replace("fedhf.run.store.", "")
            kind = kind.replace("fedhf.privacy.ledger.", "").replace("<class '", "").replace("'>", "")
            kind = kind.replace("|", "\\|")
            lines.append(f"| `{f.name}` | `{kind}` | {'optional' if f.metadata.get('omit_empty') else 'always'} |")
        lines.append("")
    return lines


def run_json_page() -> str:
    """run.json's JSON Schema (fedhf/run/run.schema.json), as the store and the tests use it."""
    import json

    schema_file = REPO / "fedhf" / "run" / "run.schema.json"
    schema = json.loads(schema_file.read_text())
    version = schema["properties"]["schema_version"]["const"]
    return "\n".join(
        [
            "# run.json",
            "",
            "Every run folder holds `run.json`, the record of the run: its config, seeds, versions, data and model, "
            "each round's figures and clients, the privacy ledger, and what later commands added (evaluations, the "
            "audit). `fedhf.run.store.RunStore` is the only code that reads or writes it "
            "(atomically, fsynced). Keys are "
            "snake_case throughout; maps keyed by client use the partition id; `config` holds the run config in "
            "Flower's own keys (`num-server-rounds`).",
            "",
            f"This is schema version {version}. Records written by fedhf 0.1 (no `schema_version`) are read and "
            "upgraded in memory (their per-client entries used Flower's kebab-case reply fields; config keys "
            "added since read, through `RunRecord.settings`, at the values those runs used); a record from a "
            "newer fedhf, or one with a key this schema does not have, is refused with a message saying so. The "
            "tests validate real runs against this schema.",
            "",
            "## In Python",
            "",
            "`RunStore(run_dir).read()` (or `fedhf.run.store.load_run`) returns the record typed: a `RunRecord` "
            "dataclass and its parts below; `RunStore.write` and `RunStore.update` take one. Four parts stay maps, "
            "because another stage decides their keys: the flat config, a client's reply entry (its fields are those "
            "its owner's policy shares), a client's sample-level ledger entry and the client-level account, and the "
            "results of `fedhf evaluate` and `fedhf audit`. A field marked *optional* is left out of run.json while "
            "it is empty.",
            "",
            *record_tables(),
            "## JSON Schema",
            "",
            "```json",
            json.dumps(schema, indent=2),
            "```",
            "",
        ]
    )


def main() -> None:
    import mkdocs_gen_files

    for name, render in PAGES.items():
        with mkdocs_gen_files.open(name, "w") as fh:
            fh.write(render())


if __name__ in ("__main__", "<run_path>"):  # mkdocs-gen-files runs this file with runpy.run_path
    main()
