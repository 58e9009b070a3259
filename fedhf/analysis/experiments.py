"""``fedhf sweep``: run a named group of experiments, skip what is finished, collect a results table.

A group is a folder ``experiments/<group>/`` with one run-config override file per setting
(usable as it is with ``fedhf run --config`` or ``flwr run . --run-config``) and a
``group.toml`` manifest:

```toml
description = "what the group shows"
[smoke]                       # run-config keys applied to every run of the smoke variant
num-server-rounds = 1
[[runs]]
name = "iid"                  # the run folder: <out>/<group>[-smoke]/<name>
config = "iid.toml"
num-clients = 10
cpus-per-client = 1           # optional (Ray CPUs per simulated client)
set = { "data.languages" = "hau" }    # optional extra keys (one setting, several runs)
audit = true                  # optional: fedhf audit after the run
evaluate-languages = ["hau"]  # optional: fedhf evaluate --set data.languages=X after the run
smoke = false                 # optional: leave this run out of the smoke variant
node-config = "nodes.toml"    # optional: the simulated nodes' configs (fedhf run --node-config)
[tiny-model]                  # optional: a tiny causal LM built for the group (no pretrained one is reachable offline)
family = "llama"              # its tokenizer is trained on the dataset's texts; every run gets model.name = its folder
dataset = "ag_news"
[[targets]]                   # figures the group must reach, checked on the results
kind = "within"               # within | auc-closer | beats | personalized-beats | mean-within
...
```

Each run is a separate ``fedhf run`` process (its own Ray instance, its log next to it);
a finished run (``run.json`` complete) is not run again, a failed one is moved aside and
run again. Results go to ``results.csv`` and ``results.md`` in the group's output folder.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import hashlib
import json
import math
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedhf.config.schema import flatten, load_config_file, parse_config
from fedhf.data.records import metric_names
from fedhf.errors import FedHFConfigError, FedHFError, FedHFRunError
from fedhf.run.store import RunRecord, RunStore

TARGET_KINDS = ("within", "auc-closer", "beats", "personalized-beats", "mean-within")
RUN_KEYS = {
    "name",
    "config",
    "num-clients",
    "cpus-per-client",
    "set",
    "audit",
    "evaluate-languages",
    "smoke",
    "node-config",
}


@dataclass(frozen=True)
class ExperimentRun:
    name: str
    config: Path
    num_clients: int
    cpus_per_client: int = 1
    overrides: dict[str, Any] = field(default_factory=dict)
    audit: bool = False
    evaluate_languages: tuple[str, ...] = ()
    smoke: bool = True
    node_config: Path | None = None  # the simulated nodes' configs (fedhf run --node-config), e.g. their LoRA ranks


TINY_MODEL_KEYS = {"family": "llama", "dataset": "", "hidden": 64, "layers": 2, "vocab-size": 1024, "seed": 0}


@dataclass(frozen=True)
class TinyModel:
    """A tiny random-weight causal LM that a group builds once into its output folder (``fedhf.tasks.tiny_lm``),
    its byte-level BPE tokenizer trained on the training rows of ``dataset`` (labelled texts, with the instruction
    that lists its labels; or instruction, chat or plain-text records, as model.task causal-lm reads them)."""

    family: str
    dataset: str
    hidden: int
    layers: int
    vocab_size: int
    seed: int

    def spec(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def folder(self, out: Path) -> Path:
        """Its own folder per spec: a changed spec is another model, and runs made on the old one keep theirs."""
        digest = hashlib.sha256(json.dumps(self.spec(), sort_keys=True).encode()).hexdigest()[:8]
        return out / f"tiny-model-{digest}"

    def ensure(self, out: Path, log: Any = print) -> Path:
        """The model's folder under the group's output folder, written unless it holds this very model."""
        from fedhf.data.load import load_data
        from fedhf.data.records import record_texts
        from fedhf.tasks.causal_lm import instruction_for
        from fedhf.tasks.tiny_lm import write_tiny_causal_lm

        folder = self.folder(out)
        spec_file = folder / "fedhf-tiny-model.json"
        if spec_file.is_file() and json.loads(spec_file.read_text()) == self.spec():
            return folder
        keys = {"model.task": "causal-lm", "data.dataset": self.dataset, "data.max-train-examples": 0}
        data = load_data(parse_config(keys).data)
        texts = record_texts(data.train.select(range(min(len(data.train), 20000))))
        if data.label_names:
            texts += [instruction_for(data.label_names), " ".join(data.label_names)] * 50
        write_tiny_causal_lm(
            folder, texts, family=self.family, vocab_size=self.vocab_size, hidden=self.hidden, layers=self.layers,
            seed=self.seed,
        )  # fmt: skip
        spec_file.write_text(json.dumps(self.spec(), indent=2) + "\n")
        log(f"tiny model: a random-weight {self.family} ({self.hidden} wide, {self.layers} layers) in {folder}")
        return folder


def _tiny_model(folder: Path, raw: Any) -> TinyModel | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or sorted(set(raw) - set(TINY_MODEL_KEYS)):
        raise FedHFConfigError(
            _where(folder, f"[tiny-model] takes the keys {', '.join(TINY_MODEL_KEYS)} (got {raw!r}).")
        )
    spec = {**TINY_MODEL_KEYS, **raw}
    if not spec["dataset"]:
        raise FedHFConfigError(_where(folder, "[tiny-model] needs 'dataset' (its tokenizer is trained on it)."))
    return TinyModel(
        str(spec["family"]), str(spec["dataset"]), int(spec["hidden"]), int(spec["layers"]), int(spec["vocab-size"]),
        int(spec["seed"]),
    )  # fmt: skip


@dataclass(frozen=True)
class Group:
    name: str
    folder: Path
    description: str
    runs: tuple[ExperimentRun, ...]
    smoke: dict[str, Any]
    smoke_clients: int | None
    smoke_languages: tuple[str, ...] | None
    targets: tuple[dict[str, Any], ...]
    tiny_model: TinyModel | None = None

    def selected(self, smoke: bool, only: list[str] | None = None) -> list[ExperimentRun]:
        runs = [r for r in self.runs if r.smoke or not smoke]
        if only:
            unknown = sorted(set(only) - {r.name for r in self.runs})
            if unknown:
                raise FedHFConfigError(
                    f"--only {', '.join(unknown)}: no such run in group '{self.name}' "
                    f"(runs: {', '.join(r.name for r in self.runs)})."
                )
            runs = [r for r in runs if r.name in only]
        return runs

    def flat_config(self, run: ExperimentRun, smoke: bool) -> dict[str, Any]:
        flat = load_config_file(run.config)
        if smoke:
            flat.update(self.smoke)
        flat.update(run.overrides)  # a run's own keys (e.g. its language) win over the smoke variant's
        return flat

    def languages(self, run: ExperimentRun, smoke: bool) -> tuple[str, ...]:
        if smoke and self.smoke_languages is not None:
            return tuple(lang for lang in run.evaluate_languages if lang in self.smoke_languages)
        return run.evaluate_languages


def _where(folder: Path, what: str) -> str:
    return f"{folder / 'group.toml'}: {what}"


def load_group(name_or_path: str | Path, experiments_dir: str | Path = "experiments") -> Group:
    """Read and check a group manifest and every config file it names (unknown keys fail here, before any run)."""
    folder = Path(name_or_path)
    if not (folder / "group.toml").is_file():
        folder = Path(experiments_dir) / str(name_or_path)
    manifest = folder / "group.toml"
    if not manifest.is_file():
        known = sorted(p.parent.name for p in Path(experiments_dir).glob("*/group.toml"))
        raise FedHFConfigError(
            f"sweep: no experiment group '{name_or_path}' (no {manifest}); groups: {', '.join(known) or 'none'}."
        )
    try:
        spec = tomllib.loads(manifest.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise FedHFConfigError(f"{manifest}: not valid TOML ({exc}).") from None
    allowed = ("description", "smoke", "smoke-num-clients", "smoke-languages", "runs", "targets", "tiny-model")
    unknown = sorted(set(spec) - set(allowed))
    if unknown:
        raise FedHFConfigError(_where(folder, f"unknown key(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}."))
    runs = []
    for i, r in enumerate(spec.get("runs", [])):
        bad = sorted(set(r) - RUN_KEYS)
        if bad:
            raise FedHFConfigError(
                _where(
                    folder, f"runs[{i}] has unknown key(s) {', '.join(bad)}; allowed: {', '.join(sorted(RUN_KEYS))}."
                )
            )
        for key in ("name", "config", "num-clients"):
            if key not in r:
                raise FedHFConfigError(_where(folder, f"runs[{i}] lacks '{key}'."))
        n = r["num-clients"]
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise FedHFConfigError(
                _where(folder, f"runs[{i}] ({r['name']}): num-clients must be an integer >= 1, got {n!r}.")
            )
        runs.append(
            ExperimentRun(
                name=str(r["name"]),
                config=folder / r["config"],
                num_clients=n,
                cpus_per_client=int(r.get("cpus-per-client", 1)),
                overrides=flatten(r.get("set", {})),
                audit=bool(r.get("audit", False)),
                evaluate_languages=tuple(r.get("evaluate-languages", ())),
                smoke=bool(r.get("smoke", True)),
                node_config=folder / r["node-config"] if "node-config" in r else None,
            )
        )
        if runs[-1].node_config is not None and not runs[-1].node_config.is_file():
            raise FedHFConfigError(
                _where(folder, f"runs[{i}] ({r['name']}): no node-config file {runs[-1].node_config}.")
            )
    if not runs:
        raise FedHFConfigError(_where(folder, "no [[runs]]."))
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise FedHFConfigError(_where(folder, f"run names repeat: {names}."))
    for t in spec.get("targets", []):
        if t.get("kind") not in TARGET_KINDS:
            raise FedHFConfigError(
                _where(folder, f"target kind {t.get('kind')!r}; allowed: {', '.join(TARGET_KINDS)}.")
            )
    group = Group(
        folder.name,
        folder,
        str(spec.get("description", "")),
        tuple(runs),
        flatten(spec.get("smoke", {})),
        spec.get("smoke-num-clients"),
        tuple(spec["smoke-languages"]) if "smoke-languages" in spec else None,
        tuple(spec.get("targets", [])),
        _tiny_model(folder, spec.get("tiny-model")),
    )
    for run in runs:  # every file parses, with and without the smoke keys
        for smoke in (False, True):
            try:
                parse_config(group.flat_config(run, smoke))
            except FedHFConfigError as exc:
                raise FedHFConfigError(
                    f"experiment '{group.name}/{run.name}' ({run.config.name}"
                    f"{', smoke variant' if smoke else ''}): {exc}"
                ) from None
    return group


# --------------------------------------------------------------------------- running


def _status(run_dir: Path) -> str | None:
    try:
        return RunStore(run_dir).read().status
    except FedHFError:
        return None


def run_group(
    group: Group, out_root: str | Path, *, smoke: bool = False, only: list[str] | None = None, log: Any = print
) -> Path:
    """Run (or skip) every selected run, then its audit and evaluations; write the results table. Returns its folder."""
    out = Path(out_root) / (group.name + ("-smoke" if smoke else ""))
    out.mkdir(parents=True, exist_ok=True)
    if group.tiny_model is not None:
        group.tiny_model.ensure(out, log)
    failed: list[str] = []
    for run in group.selected(smoke, only):
        run_dir = out / run.name
        changed = _changed_keys(group, run, out, smoke) if _status(run_dir) == "complete" else None
        if changed == []:
            log(f"[{group.name}] {run.name}: finished earlier, skipped")
        else:
            if run_dir.exists():
                kind = "stale" if changed else "failed"
                aside = run_dir.with_name(f"{run.name}.{kind}-{dt.datetime.now():%Y%m%d-%H%M%S}")
                run_dir.rename(aside)
                why = (
                    f"a finished run with another config ({', '.join(changed[:4])}"
                    f"{', ...' if len(changed) > 4 else ''})"
                    if changed
                    else "an unfinished run"
                )
                log(f"[{group.name}] {run.name}: {why} was moved to {aside.name}; running again")
            if not _execute(group, run, out, smoke, log):
                failed.append(run.name)
                continue
        _post(group, run, run_dir, smoke, log)
    table = collect(group, out, smoke)
    if failed:
        raise FedHFRunError(
            f"sweep '{group.name}': run(s) {', '.join(failed)} failed (see their .log files in {out}); "
            "the others are in results.md. Run the sweep again to retry only those."
        )
    return table


def _run_settings(group: Group, run: ExperimentRun, out: Path, smoke: bool) -> tuple[int, dict[str, Any]]:
    """(clients, --set overrides) of one run of the group."""
    clients = (
        min(run.num_clients, group.smoke_clients)
        if smoke and group.smoke_clients and run.num_clients > 1
        else run.num_clients
    )
    sets = {**(group.smoke if smoke else {}), **run.overrides, "output-dir": str(out), "run-name": run.name}
    if group.tiny_model is not None:
        sets["model.name"] = str(group.tiny_model.folder(out).resolve())
    if smoke and clients != run.num_clients:
        sets.update(
            {
                "strategy.min-available-nodes": clients,
                "strategy.min-train-nodes": min(clients, 2),
                "strategy.min-evaluate-nodes": min(clients, 2),
            }
        )
    return clients, sets


def _changed_keys(group: Group, run: ExperimentRun, out: Path, smoke: bool) -> list[str]:
    """Config keys where a finished run differs from what its experiment file asks for now ([] = the same run).

    Keys added to fedhf after the run was made count at their defaults (what that run used)."""
    clients, sets = _run_settings(group, run, out, smoke)
    want = parse_config({**load_config_file(run.config), **sets}).to_flat()
    try:
        made = RunStore(out / run.name).read()
        had = parse_config(made.config).to_flat()
    except (FedHFError, KeyError, TypeError):
        return ["(a config this fedhf cannot read)"]
    # Where the run folder lives is not part of the experiment: a group's folder moved or copied is the same run.
    place = {"output-dir", "run-name"} | ({"model.name"} if group.tiny_model is not None else set())
    changed = sorted(k for k in set(want) | set(had) if k not in place and want.get(k) != had.get(k))
    if group.tiny_model is not None and Path(str(want["model.name"])).name != Path(str(had["model.name"])).name:
        changed.append("model.name")  # the group's tiny model changed (its folder names its spec)
    if len(made.partitions) != clients:
        changed.append("num-clients")
    return changed


def _execute(group: Group, run: ExperimentRun, out: Path, smoke: bool, log: Any) -> bool:
    clients, sets = _run_settings(group, run, out, smoke)
    args = [
        sys.executable,
        "-m",
        "fedhf.cli",
        "run",
        "--config",
        str(run.config),
        "--num-clients",
        str(clients),
        "--cpus-per-client",
        str(run.cpus_per_client),
    ]
    if run.node_config is not None:
        args += ["--node-config", str(run.node_config)]
    for key, value in sets.items():
        args += ["--set", f"{key}={_toml_value(value)}"]
    log(f"[{group.name}] {run.name}: running ({clients} clients) ...")
    t0 = time.perf_counter()
    with (out / f"{run.name}.log").open("w") as fh:
        rc = subprocess.run(args, stdout=fh, stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - t0
    if rc != 0:
        tail = (out / f"{run.name}.log").read_text().strip().splitlines()[-1:] or [""]
        log(f"[{group.name}] {run.name}: FAILED after {seconds:.0f} s (exit {rc}): {tail[0][:300]}")
        return False
    log(f"[{group.name}] {run.name}: done in {seconds:.0f} s")
    return True


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def _post(group: Group, run: ExperimentRun, run_dir: Path, smoke: bool, log: Any) -> None:
    from fedhf.analysis.audit import audit_run
    from fedhf.analysis.evaluation import evaluate_run

    data = RunStore(run_dir).read()
    done = {json.dumps(e["data"], sort_keys=True) for e in data.evaluations}
    for lang in group.languages(run, smoke):
        if json.dumps({"data.languages": lang}, sort_keys=True) in done:
            continue
        res = evaluate_run(run_dir, {"data.languages": lang})
        log(f"[{group.name}] {run.name}: {lang} macro-F1 {res['macro_f1']:.4f} ({res['rows']} rows)")
    if run.audit and data.audit is None:
        res = audit_run(run_dir)
        canaries = res.get("canaries")
        exposed = (
            f"; canary exposure {canaries['mean_exposure']:.2f} bits (controls {canaries['control_mean_exposure']:.2f})"
            if canaries
            else ""
        )
        log(
            f"[{group.name}] {run.name}: audit AUC {res['loss']['auc']:.3f} (loss), "
            f"{res['calibrated']['auc']:.3f} (calibrated){exposed}"
        )


# --------------------------------------------------------------------------- results


COLUMNS = (
    "name",
    "clients",
    "accuracy",
    "macro_f1",
    "data_format",
    "epsilon_sample_max",
    "epsilon_client",
    "bytes_up_per_client_round",
    "wall_seconds",
    "audit_auc_loss",
    "audit_auc_calibrated",
    "audit_epsilon_lower_bound",
    "canary_exposure_mean",
    "canary_control_exposure_mean",
    "eval_loss",
    "local_only_f1_mean",
    "federated_f1_mean",
    "personalized_f1_mean",
    "personalized_beats_local_only",
    "federated_beats_local_only",
    "personalized_clients",
    "status",
)


def _row(name: str, run: RunRecord | None) -> dict[str, Any]:
    from fedhf.analysis.report import summary_row

    if run is None or run.status != "complete":
        return {"name": name, "status": run.status if run else "not run"}
    s = summary_row(run)
    audit = run.audit or {}
    row = {
        "name": name,
        "clients": s["clients"],
        "accuracy": s["accuracy"],
        "macro_f1": s["macro_f1"],
        "data_format": (run.dataset.format if run.dataset else None) or "labels",  # what the two scores are
        "epsilon_sample_max": s["epsilon_sample_max"],
        "epsilon_client": s["epsilon_client"],
        "bytes_up_per_client_round": s["bytes_up_per_client_round"],
        "wall_seconds": s["wall_seconds"],
        "audit_auc_loss": (audit.get("loss") or {}).get("auc"),
        "audit_auc_calibrated": (audit.get("calibrated") or {}).get("auc"),
        "audit_epsilon_lower_bound": audit.get("epsilon_lower_bound"),
        "canary_exposure_mean": (audit.get("canaries") or {}).get("mean_exposure"),
        "canary_control_exposure_mean": (audit.get("canaries") or {}).get("control_mean_exposure"),
        "eval_loss": run.final.eval_loss if run.final else None,
        "status": "complete",
    }
    for e in run.evaluations:
        if list(e["data"]) == ["data.languages"]:
            row[f"f1_{e['data']['data.languages']}"] = e["macro_f1"]
    if run.personalization is not None:  # the clients' own held-out rows (fedhf.federation.personal)
        row.update({k: v for k, v in run.personalization.summary.items() if k in COLUMNS})
        row["personalized_clients"] = run.personalization.summary.get("clients")
    return row


def collect(group: Group, out: Path, smoke: bool) -> Path:
    """results.csv and results.md from the run folders (whatever has finished)."""
    rows = []
    runs: dict[str, RunRecord] = {}
    for run in group.selected(smoke):
        store = RunStore(out / run.name)
        data = store.read() if store.exists() else None
        if data is not None:
            runs[run.name] = data
        rows.append(_row(run.name, data))
    langs = sorted({k for r in rows for k in r if k.startswith("f1_")})
    fields = list(COLUMNS) + langs
    with (out / "results.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k) for k in fields})
    formats = sorted({r["data_format"] for r in rows if r.get("data_format")})
    mixed = len(formats) > 1  # one table, several kinds of score: a column says which each row's are
    names = metric_names(formats[0] if formats else "labels")
    scores = "score 1 | score 2 | scored by" if mixed else f"{names.accuracy} | {names.f1}"
    md = [
        f"# Experiment group `{group.name}`{' (smoke variant)' if smoke else ''}",
        "",
        group.description,
        "",
        f"| run | clients | {scores} | ε sample (max) | ε client "
        "| bytes up / client / round | wall s | MIA AUC loss / calibrated | status |",
        "|---|---|---|---|---|---|---|---|---|---|" + "---|" * mixed,
    ]
    for r in rows:
        by = ""
        if mixed:
            n = metric_names(r.get("data_format"))
            by = f" | {n.accuracy}, {n.f1}" if r.get("data_format") else " | –"
        md.append(
            f"| {r['name']} | {r.get('clients', '–')} | {_f(r.get('accuracy'))} | {_f(r.get('macro_f1'))}{by} "
            f"| {_f(r.get('epsilon_sample_max'), 2)} | {_f(r.get('epsilon_client'), 2)} "
            f"| {r.get('bytes_up_per_client_round') or '–'} "
            f"| {r.get('wall_seconds', '–')} "
            f"| {_f(r.get('audit_auc_loss'), 3)} / {_f(r.get('audit_auc_calibrated'), 3)} | {r['status']} |"
        )
    if any(r.get("canary_exposure_mean") is not None for r in rows):
        md += [
            "",
            "Canary exposure (bits; fedhf audit: each secret's rank among random candidates, Carlini et al.) and the "
            "held-out loss per answer token (plain text: per token):",
            "",
            "| run | canaries trained on | controls never seen | eval loss |",
            "|---|---|---|---|",
        ]
        md += [
            f"| {r['name']} | {_f(r.get('canary_exposure_mean'), 2)} | {_f(r.get('canary_control_exposure_mean'), 2)} "
            f"| {_f(r.get('eval_loss'))} |"
            for r in rows
            if r.get("status") == "complete"
        ]
    if langs:
        md += [
            "",
            "Macro-F1 per language (each language's test split):",
            "",
            "| run | " + " | ".join(lang[3:] for lang in langs) + " |",
            "|---|" + "---|" * len(langs),
        ]
        for r in rows:
            if any(lang in r for lang in langs):
                md.append(f"| {r['name']} | " + " | ".join(_f(r.get(lang)) for lang in langs) + " |")
    for name, run in runs.items():
        if run.status == "complete" and run.personalization is not None:
            from fedhf.analysis.report import personalization_table

            md += ["", f"### {name}"] + personalization_table(run)
    plots = group_plots(group, runs, rows, langs, out / "plots")
    if plots:
        md += ["", "## Plots", ""] + [f"![{p.stem}](plots/{p.name})" for p in plots]
    checks = check_targets(group, rows)
    if checks:
        md += ["", "## Targets", ""] + [f"- {c}" for c in checks]
    md += ["", f"Reproduce: `fedhf sweep {group.name}{' --smoke' if smoke else ''}` (finished runs are skipped).", ""]
    (out / "results.md").write_text("\n".join(md))
    return out


def group_plots(
    group: Group, runs: dict[str, RunRecord], rows: list[dict[str, Any]], langs: list[str], folder: Path
) -> list[Path]:
    """The plots of a group's story: accuracy per round of every run; privacy-utility when a run has DP;
    bytes vs accuracy when the runs send different amounts; macro-F1 per language when measured."""
    from fedhf.analysis.plots import (
        final_epsilon,
        plot_bytes_accuracy,
        plot_language_scores,
        plot_privacy_utility,
        plot_runs_accuracy,
    )

    done = [(name, run) for name, run in runs.items() if run.status == "complete"]
    if not done:
        return []
    out = [plot_runs_accuracy(done, folder / "accuracy_per_round.png")]
    if any(final_epsilon(run) != (None, None) for _, run in done):
        named = [dataclasses.replace(run, run_id=name) for name, run in done]
        out.append(plot_privacy_utility(named, folder / "privacy_utility.png"))
    sizes = {r.get("bytes_up_per_client_round") for r in rows if r.get("status") == "complete"}
    if len(sizes) > 1:
        out.append(plot_bytes_accuracy(done, folder / "bytes_vs_accuracy.png"))
    if langs:
        codes = [lang[3:] for lang in langs]
        series: dict[str, dict[str, float]] = {}
        for r in rows:
            label = "local-only" if r["name"].startswith("local-") else r["name"]
            for lang in langs:
                if lang in r:
                    series.setdefault(label, {})[lang[3:]] = r[lang]
        out.append(plot_language_scores(series, codes, folder / "per_language_f1.png"))
    return out


def _f(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}"


def check_targets(group: Group, rows: list[dict[str, Any]]) -> list[str]:
    """One line per target: the figure, the requirement, met or missed (or not yet measurable)."""
    by = {r["name"]: r for r in rows}
    out = []
    for t in group.targets:
        kind = t["kind"]
        if kind == "within":  # run's metric within `points` (percentage points) of the baseline's
            metric, points = t.get("metric", "accuracy"), float(t.get("points", "nan"))
            base = by.get(t["baseline"], {}).get(metric)
            for name in t["runs"]:
                value = by.get(name, {}).get(metric)
                if value is None or base is None:
                    out.append(f"{name}: {metric} vs {t['baseline']}: not measured yet")
                    continue
                drop = 100 * (base - value)
                line = (
                    f"{name}: {metric} {100 * value:.1f}% vs {t['baseline']} {100 * base:.1f}%: drop {drop:+.1f} points"
                )
                if not math.isnan(points):
                    line += f" (target ≤ {points:g}): {'met' if drop <= points else 'MISSED'}"
                out.append(line)
        elif kind == "auc-closer":  # run's audit AUC closer to 0.5 than the baseline's
            key = f"audit_auc_{t.get('attack', 'loss')}"
            a, b = by.get(t["run"], {}).get(key), by.get(t["baseline"], {}).get(key)
            if a is None or b is None:
                out.append(f"audit: {t['run']} vs {t['baseline']}: not measured yet")
                continue
            verdict = "met" if abs(a - 0.5) < abs(b - 0.5) else "MISSED"
            out.append(
                f"audit ({t.get('attack', 'loss')} attack): {t['run']} AUC {a:.3f} vs {t['baseline']} AUC {b:.3f} "
                f"(|AUC − 0.5|: {abs(a - 0.5):.3f} vs {abs(b - 0.5):.3f}): {verdict}"
            )
        elif kind == "personalized-beats":  # in the run's own personalization stage, on the clients' held-out rows
            row, need = by.get(t["run"], {}), int(t["at-least"])
            wins, n = row.get("personalized_beats_local_only"), row.get("personalized_clients")
            if wins is None:
                out.append(f"{t['run']}: personalized vs local-only: not measured yet (target ≥ {need})")
            else:
                out.append(
                    f"{t['run']}: the personalized adapter beats local-only training in macro-F1 on {wins} of {n} "
                    f"clients (their own held-out rows; target ≥ {need}): {'met' if wins >= need else 'MISSED'}"
                )
        elif kind == "mean-within":  # run's mean macro-F1 over `languages` within `f1` of the baseline's mean
            need, langs = float(t["f1"]), list(t["languages"])
            a = [by.get(t["run"], {}).get(f"f1_{lang}") for lang in langs]
            b = [by.get(t["baseline"], {}).get(f"f1_{lang}") for lang in langs]
            missing = [lang for lang, x, y in zip(langs, a, b, strict=True) if x is None or y is None]
            if missing:
                out.append(
                    f"{t['run']} vs {t['baseline']}: mean macro-F1 not measured yet (missing: {', '.join(missing)}; "
                    f"target within {need:g})"
                )
            else:
                ma, mb = sum(a) / len(a), sum(b) / len(b)
                out.append(
                    f"{t['run']}: mean macro-F1 over {len(langs)} languages {ma:.3f} vs {t['baseline']} {mb:.3f}: "
                    f"{mb - ma:+.3f} behind (target ≤ {need:g}): {'met' if mb - ma <= need else 'MISSED'}"
                )
        elif kind == "beats":  # run beats the per-language baselines on at least `at-least` languages
            wins, total, missing = 0, 0, []
            for lang in t["languages"]:
                a = by.get(t["run"], {}).get(f"f1_{lang}")
                b = by.get(t["baseline-pattern"].format(lang=lang), {}).get(f"f1_{lang}")
                if a is None or b is None:
                    missing.append(lang)
                    continue
                total += 1
                wins += a > b
            need = int(t["at-least"])
            if missing:
                out.append(
                    f"{t['run']} beats local-only macro-F1 on {wins} of {total} languages measured so far "
                    f"(not yet: {', '.join(missing)}; target ≥ {need})"
                )
            else:
                out.append(
                    f"{t['run']} beats {t['baseline-pattern'].format(lang='<lang>')} macro-F1 on {wins} of {total} "
                    f"languages (target ≥ {need}): {'met' if wins >= need else 'MISSED'}"
                )
    return out
