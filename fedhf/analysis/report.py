"""``fedhf report``: plots and a markdown report for one or more finished runs. No Flower.

The report folder holds ``report.md`` (a comparison table, then one section per run with its
plots) and the PNGs it embeds, so it renders as it is on GitHub or the Hub.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedhf.analysis.plots import (
    PERSONAL_SERIES,
    client_label,
    final_epsilon,
    personal_rows,
    plot_privacy_utility,
    run_plots,
)
from fedhf.data.records import metric_names
from fedhf.errors import FedHFRunError
from fedhf.release.card import client_ids
from fedhf.run.store import RunRecord, load_finished_run


def dataset_key(run: RunRecord) -> tuple[str, tuple[str, ...]]:
    """What makes two runs comparable on one axis: the dataset and its label set."""
    return str(run.dataset.preset or run.dataset.name), tuple(run.dataset.label_names)


def _fmt(value: float | None, spec: str = ".4f") -> str:
    return "–" if value is None else format(value, spec)


def summary_row(run: RunRecord) -> dict[str, Any]:
    """The facts of a run that a results table compares."""
    cfg = run.settings
    eps_s, eps_c = final_epsilon(run)
    rounds = run.trained_rounds
    ups = [r.bytes_up for r in rounds if r.bytes_up]
    audit = run.audit or {}
    return {
        "run": run.run_id,
        "dataset": dataset_key(run)[0],
        "clients": len(client_ids(run)),
        "partitioner": cfg["data.partitioner"],
        "rounds": len(rounds),
        "strategy": cfg["strategy.name"],
        "privacy": cfg["privacy.mode"],
        "epsilon_sample_max": eps_s,
        "epsilon_client": eps_c,
        "accuracy": run.final.eval_accuracy,
        "macro_f1": run.final.eval_f1,
        "bytes_up_per_client_round": int(sum(ups) / len(ups)) if ups else None,
        "wall_seconds": round(sum(r.wall_seconds or 0 for r in rounds), 1),
        "audit_auc": (audit.get("loss") or {}).get("auc"),
    }


def write_report(run_dirs: list[str | Path], out_dir: str | Path, *, privacy_utility: bool = True) -> Path:
    """Write ``out_dir/report.md`` and its plots; returns the markdown path."""
    if not run_dirs:
        raise FedHFRunError("report: give at least one run folder.")
    runs = [load_finished_run(d, "report") for d in run_dirs]
    keys = {dataset_key(r) for r in runs}
    if privacy_utility and len(runs) > 1 and len(keys) > 1:
        listing = ", ".join(f"{d}: {dataset_key(r)[0]}" for d, r in zip(run_dirs, runs, strict=True))
        raise FedHFRunError(
            f"report: the runs use different datasets ({listing}); a privacy–utility plot compares runs on one "
            "dataset. Report each dataset's runs separately, or pass --no-privacy-utility."
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = ["# fedhf report", ""]
    rows = [summary_row(r) for r in runs]
    formats = sorted({(r.dataset.format if r.dataset else None) or "labels" for r in runs})
    names = metric_names(formats[0] if len(formats) == 1 else "labels")
    lines += [
        "| run | dataset | clients | partitioner | rounds | privacy | ε sample (max) | ε client "
        f"| {names.accuracy} | {names.f1} | bytes up / client / round | MIA AUC |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['run']} | {row['dataset']} | {row['clients']} | {row['partitioner']} "
            f"| {row['rounds']} | {row['privacy']} "
            f"| {_fmt(row['epsilon_sample_max'], '.3f')} | {_fmt(row['epsilon_client'], '.3f')} "
            f"| {row['accuracy']:.4f} "
            f"| {row['macro_f1']:.4f} | {row['bytes_up_per_client_round'] or '–'} | {_fmt(row['audit_auc'], '.3f')} |"
        )
    if len(formats) > 1:  # one table, several kinds of score: say which each run's columns are
        lines += [
            "",
            "The runs read data of several formats; their two metric columns are each run's own: "
            + "; ".join(f"{f}: {metric_names(f).accuracy} and {metric_names(f).f1}" for f in formats)
            + ".",
        ]
    lines.append("")
    if privacy_utility and len(runs) > 1:
        plot_privacy_utility(runs, out / "privacy_utility.png")
        lines += [
            "## Privacy–utility",
            "",
            f"Final central {names.accuracy if len(formats) == 1 else 'score'} against each run's privacy guarantee "
            "(sample-level: the largest client ε; client-level: the federation's ε). Runs without DP are the dotted "
            "lines.",
            "",
            "![privacy-utility](privacy_utility.png)",
            "",
        ]
    used: set[str] = set()
    for run_dir, run in zip(run_dirs, runs, strict=True):
        name = run.run_id
        sub = name if name not in used else f"{name}-{len(used)}"
        used.add(sub)
        plots = run_plots(run, out / sub)
        lines += [
            f"## {name}",
            "",
            f"Folder: `{run_dir}`. Status {run.status}, finished {run.finished}.",
            "",
        ]
        lines += [f"![{p.stem}]({sub}/{p.name})" for p in plots]
        if run.audit:
            lines += ["", audit_summary(run.audit)]
        lines += personalization_table(run)
        lines.append("")
    md = out / "report.md"
    md.write_text("\n".join(lines))
    return md


def audit_summary(audit: dict[str, Any]) -> str:
    parts = []
    for attack in ("loss", "calibrated"):
        a = audit.get(attack)
        if a:
            parts.append(
                f"{attack}: AUC {a['auc']:.3f}, TPR at 1% FPR {a['tpr_at_1pct_fpr']:.3f}, "
                f"ε lower bound {a['epsilon_lower_bound']:.3f}"
            )
    return (
        f"Membership-inference audit ({audit['members']} members, {audit['non_members']} non-members, "
        f"{audit['confidence']:.0%} confidence): " + "; ".join(parts) + "."
    )


def personalization_table(run: RunRecord) -> list[str]:
    """Markdown lines: per client, macro-F1 (accuracy) on its held-out rows of each adapter the stage measured (a
    records run's own two metrics)."""
    rows = personal_rows(run)
    if not rows:
        return []
    names = metric_names(run.dataset.format if run.dataset else None)
    series = [(k, name) for k, name in PERSONAL_SERIES if f"{k}_f1" in rows[0]]
    lines = [
        "",
        f"Personalization ({run.personalization.mode}), per client on its own held-out rows: "
        f"{names.f1} ({names.accuracy}).",
        "",
        "| client | rows | " + " | ".join(name for _, name in series) + " |",
        "|---|---|" + "---|" * len(series),
    ]
    for r in rows:
        cells = " | ".join(f"{r[f'{k}_f1']:.3f} ({r[f'{k}_accuracy']:.3f})" for k, _ in series)
        lines.append(f"| {client_label(run, r['partition_id'])} | {r['num_examples']} | {cells} |")
    return lines
