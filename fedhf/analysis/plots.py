"""Plots of a run (and across runs), as PNG files. Matplotlib's object API only: no pyplot, no global state.

Each function takes run records (``fedhf.run.store.RunRecord``) and writes one PNG;
it returns the path, or None when the run has nothing to draw (e.g. no DP: no epsilon plot).
"""

from __future__ import annotations

import math
from pathlib import Path

from matplotlib.figure import Figure

from fedhf.data.records import metric_names
from fedhf.run.store import RunRecord

DPI = 110


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=DPI, bbox_inches="tight")
    tmp.replace(path)
    return path


def score_label(runs: list[RunRecord]) -> str:
    """The y-axis of a plot of runs' first central metric: its name when the runs share a data format (accuracy,
    exact match, next-token accuracy), else a generic one."""
    formats = {(r.dataset.format if r.dataset else None) or "labels" for r in runs}
    return f"central {metric_names(formats.pop()).accuracy}" if len(formats) == 1 else "central score (first metric)"


def run_label(run: RunRecord) -> str:
    return run.run_id


def plot_metrics(run: RunRecord, path: Path) -> Path:
    """Central accuracy and macro-F1 (left; a records run's own metrics) and losses (right) per round; round 0 is
    the untrained adapter."""
    rounds = [r for r in run.rounds if r.eval_accuracy is not None]
    x = [r.round for r in rounds]
    fig = Figure(figsize=(9, 3.4), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    names = metric_names(run.dataset.format if run.dataset else None)
    ax1.plot(x, [r.eval_accuracy for r in rounds], marker="o", label=names.accuracy)
    ax1.plot(x, [r.eval_f1 for r in rounds], marker="s", linestyle="--", label=names.f1)
    local = [(r.round, r.local_eval_accuracy) for r in run.rounds if r.local_eval_accuracy is not None]
    if local:
        ax1.plot(*zip(*local, strict=True), marker=".", linestyle=":", label=f"clients' local {names.accuracy}")
    ax1.set(xlabel="round", ylabel="score", title="Central evaluation", ylim=(0, 1))
    ax1.legend(loc="lower right", fontsize=8)
    ax2.plot(x, [r.eval_loss for r in rounds], marker="o", label="central eval loss")
    train = [(r.round, r.train_loss) for r in run.rounds if r.train_loss is not None]
    if train:
        ax2.plot(*zip(*train, strict=True), marker="s", linestyle="--", label="clients' train loss")
    ax2.set(xlabel="round", ylabel="cross-entropy", title="Loss")
    ax2.legend(loc="upper right", fontsize=8)
    for ax in (ax1, ax2):
        ax.set_xticks([r.round for r in run.rounds])
        ax.grid(alpha=0.3)
    name = run.dataset.name if run.dataset else ""
    fig.suptitle(f"{run_label(run)}: {name}, {len(run.partitions)} clients", fontsize=10)
    return _save(fig, path)


def plot_epsilon(run: RunRecord, path: Path) -> Path | None:
    """Each client's cumulative sample-level epsilon after every round (dashed: its budget), and the
    client-level epsilon of the federation when that mode is on."""
    clients = run.privacy.clients if run.privacy else {}
    cl = (run.privacy.client_level if run.privacy else None) or {}
    if not clients and not cl.get("rounds"):
        return None
    fig = Figure(figsize=(6.5, 3.6))
    ax = fig.subplots()
    for pid in sorted(clients, key=int):
        e = clients[pid]
        pts = [(0, 0.0)] + [(r["round"], r["epsilon"]) for r in e["rounds"]]
        (line,) = ax.plot(*zip(*pts, strict=True), marker="o", markersize=3, label=f"client {pid}")
        if e.get("max_epsilon"):
            ax.axhline(e["max_epsilon"], color=line.get_color(), linestyle="--", linewidth=0.8)
        if e.get("stopped"):
            ax.annotate("budget", (e["stopped"]["round"], e["epsilon"]), fontsize=7, color=line.get_color())
    if cl.get("rounds"):
        pts = [(0, 0.0)] + [(r["round"], r["epsilon"]) for r in cl["rounds"]]
        ax.plot(*zip(*pts, strict=True), color="black", linewidth=2, marker="D", label="client-level (federation)")
    ax.set(xlabel="round", ylabel="ε (cumulative)", title=f"Privacy spend per round ({run_label(run)})")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2 if len(clients) > 6 else 1, loc="upper left")
    return _save(fig, path)


def plot_label_heatmap(run: RunRecord, path: Path) -> Path | None:
    """Share of each label in each client's training rows (numbers: rows)."""
    parts = [p for p in run.partitions if p.label_histogram is not None]  # only the histograms shared
    names = run.dataset.label_names if run.dataset else []
    if not parts or not names:
        return None
    counts = [p.label_histogram for p in parts]
    shares = [[c / max(sum(row), 1) for c in row] for row in counts]
    fig = Figure(figsize=(1.2 + 0.9 * len(names), 1.0 + 0.32 * len(parts)))
    ax = fig.subplots()
    im = ax.imshow(shares, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ylabels = [f"{p.partition_id}" + (f" ({p.natural_id})" if p.natural_id else "") for p in parts]
    ax.set_yticks(range(len(parts)), ylabels, fontsize=7)
    ax.set(xlabel="label", ylabel="client")
    if len(parts) * len(names) <= 300:
        for i, row in enumerate(counts):
            for j, c in enumerate(row):
                ax.text(
                    j, i, str(c), ha="center", va="center", fontsize=6, color="white" if shares[i][j] < 0.6 else "black"
                )
    fig.colorbar(im, ax=ax, label="share of the client's rows")
    ax.set_title(f"Label distribution ({run.settings['data.partitioner']})", fontsize=9)
    return _save(fig, path)


def final_epsilon(run: RunRecord) -> tuple[float | None, float | None]:
    """(max sample-level epsilon over clients, client-level epsilon); None where the mode is off."""
    clients = run.privacy.clients if run.privacy else {}
    sample = max((c["epsilon"] for c in clients.values()), default=None) if clients else None
    cl = (run.privacy.client_level if run.privacy else None) or {}
    return sample, cl.get("epsilon") if cl.get("rounds") else None


def plot_privacy_utility(runs: list[RunRecord], path: Path) -> Path:
    """Final central accuracy against the privacy guarantee, one point per run.

    Sample-level and client-level runs are separate series (their epsilons mean different
    things); runs without DP are drawn at the right edge, marked "no DP".
    """
    fig = Figure(figsize=(6.5, 3.8))
    ax = fig.subplots()
    sample, client, none = [], [], []
    for run in runs:
        acc = run.final.eval_accuracy
        eps_s, eps_c = final_epsilon(run)
        if eps_s is not None:
            sample.append((eps_s, acc, run_label(run)))
        if eps_c is not None:
            client.append((eps_c, acc, run_label(run)))
        if eps_s is None and eps_c is None:
            none.append((acc, run_label(run)))
    finite = [e for e, _, _ in sample + client if math.isfinite(e)]
    # epsilons spanning orders of magnitude (client-level 300 next to sample-level 1) need a log axis
    log_x = len(finite) >= 2 and min(finite) > 0 and max(finite) / min(finite) > 20
    right = max(finite) * 2.0 if log_x else max(finite, default=1.0) * 1.25 + 0.5
    for pts, marker, label in ((sample, "o", "sample-level ε (max over clients)"), (client, "s", "client-level ε")):
        if pts:
            pts = sorted(pts)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=label)
            for e, a, name in pts:
                ax.annotate(name, (e, a), fontsize=6, xytext=(3, 3), textcoords="offset points")
    for acc, name in none:
        ax.axhline(acc, color="grey", linestyle=":", linewidth=1)
        ax.plot([right], [acc], marker="*", markersize=10, color="grey")
        ax.annotate(f"{name} (no DP)", (right, acc), fontsize=6, xytext=(-4, 4), textcoords="offset points", ha="right")
    if log_x:
        ax.set_xscale("log")
    ax.set(
        xlabel="ε (lower = more private)" + (", log scale" if log_x else ""),
        ylabel=score_label(runs),
        title=f"Privacy–utility ({runs[0].dataset.name})",
    )
    ax.grid(alpha=0.3)
    if sample or client:
        ax.legend(fontsize=8, loc="lower right")
    return _save(fig, path)


PERSONAL_SERIES = (("local_only", "local-only"), ("federated", "federated"), ("personalized", "personalized"))


def personal_rows(run: RunRecord) -> list[dict]:
    """The clients that reported their held-out metrics in the personalization stage."""
    pers = run.personalization
    return [r for r in pers.clients if r["status"] == "personalized"] if pers is not None else []


def client_label(run: RunRecord, pid: int) -> str:
    """A client's id, with its natural partition's value (e.g. its AfriSenti language) when known."""
    natural = {p.partition_id: p.natural_id for p in run.partitions if p.natural_id is not None}
    return f"{pid} ({natural[pid]})" if pid in natural else str(pid)


def plot_personalization(run: RunRecord, path: Path) -> Path | None:
    """Per client: macro-F1 (a records run's second metric) on its own held-out rows of the local-only, federated
    and personalized adapters."""
    rows = personal_rows(run)
    if not rows:
        return None
    series = [(k, name) for k, name in PERSONAL_SERIES if f"{k}_f1" in rows[0]]
    fig = Figure(figsize=(max(5.0, 0.6 * len(rows) * len(series) / 2 + 2), 3.6), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / len(series)
    for k, (key, name) in enumerate(series):
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(rows))]
        ax.bar(xs, [r[f"{key}_f1"] for r in rows], width=width, label=name)
    ax.set_xticks(
        range(len(rows)), [client_label(run, r["partition_id"]) for r in rows], rotation=30 if len(rows) > 6 else 0
    )
    ax.set(
        xlabel="client",
        ylabel=f"{metric_names(run.dataset.format if run.dataset else None).f1} (its held-out rows)",
        ylim=(0, 1),
        title=f"Personalization ({run.personalization.mode}) per client",
    )
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    return _save(fig, path)


def run_plots(run: RunRecord, folder: Path) -> list[Path]:
    """The per-run plots (metrics, epsilon, label distribution, personalization) in ``folder``; returns those
    written."""
    out = [
        plot_metrics(run, folder / "metrics.png"),
        plot_epsilon(run, folder / "epsilon.png"),
        plot_label_heatmap(run, folder / "label_distribution.png"),
        plot_personalization(run, folder / "personalization.png"),
    ]
    return [p for p in out if p is not None]


def plot_runs_accuracy(runs: list[tuple[str, RunRecord]], path: Path) -> Path:
    """Central accuracy per round of several runs on one axis (name, record)."""
    fig = Figure(figsize=(6.5, 3.8), layout="constrained")
    ax = fig.subplots()
    for name, run in runs:
        pts = [(r.round, r.eval_accuracy) for r in run.rounds if r.eval_accuracy is not None]
        ax.plot(*zip(*pts, strict=True), marker="o", markersize=3, label=name)
    label = score_label([run for _, run in runs])
    ax.set(xlabel="round", ylabel=label, title=f"{label[:1].upper() + label[1:]} per round")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2 if len(runs) > 6 else 1)
    return _save(fig, path)


def plot_bytes_accuracy(runs: list[tuple[str, RunRecord]], path: Path) -> Path:
    """Final central accuracy against the adapter bytes one client sends per round."""
    fig = Figure(figsize=(6.0, 3.6), layout="constrained")
    ax = fig.subplots()
    for name, run in runs:
        ups = [r.bytes_up for r in run.trained_rounds if r.bytes_up]
        if ups:
            x, y = sum(ups) / len(ups) / 1e3, run.final.eval_accuracy
            ax.plot([x], [y], marker="o")
            ax.annotate(name, (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set(
        xlabel="kB sent per client per round", ylabel=score_label([r for _, r in runs]), title="Communication vs score"
    )
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_language_scores(scores: dict[str, dict[str, float]], languages: list[str], path: Path) -> Path:
    """Grouped bars: per language, the macro-F1 of each series (e.g. federated, local-only, centralized)."""
    fig = Figure(figsize=(max(6.0, 0.75 * len(languages) + 2), 3.8), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / max(len(scores), 1)
    for k, (series, values) in enumerate(scores.items()):
        xs = [i + (k - (len(scores) - 1) / 2) * width for i in range(len(languages))]
        ax.bar(xs, [values.get(lang, math.nan) for lang in languages], width=width, label=series)
    ax.set_xticks(range(len(languages)), languages)
    ax.set(xlabel="language (test split)", ylabel="macro-F1", title="Macro-F1 per language", ylim=(0, 1))
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    return _save(fig, path)
