"""``fedhf audit``: an empirical privacy audit of a released adapter by membership inference. No Flower.

Members are the clients' training rows (rebuilt from the run's recorded config and checked
against the partition statistics in run.json); non-members are rows of the same training
split that no client ever saw (the rows the run's sampling left out), or a file the user
gives. Two attacks score every example:

- **loss**: lower loss under the released model => member (Yeom et al. 2018);
- **calibrated**: the released model's loss minus the loss of the untrained model the run
  started from (same seed: the round-0 adapter), i.e. how much training lowered this example's
  loss; this removes per-example difficulty (Watson et al. 2022).

For each: ROC AUC, TPR at 1% FPR, and a lower bound on epsilon that holds with the stated
confidence: the threshold is chosen on one half of the examples and tested on the other; with
Clopper-Pearson upper bounds on its false-positive and false-negative rates, any (epsilon, delta)-DP
mechanism must satisfy FPR + e^eps * FNR >= 1 - delta (and symmetrically), so
eps >= log((1 - delta - FPR_up) / FNR_up) (Kairouz et al. 2015; Jagielski et al. 2020).
On natural examples this bound is loose by design; it tests, it does not certify.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import beta

from fedhf.analysis.evaluation import released_model, run_config
from fedhf.data.records import metric_names
from fedhf.errors import FedHFRunError
from fedhf.run.record import check_run_folder
from fedhf.run.store import RunRecord, RunStore, load_finished_run

log = logging.getLogger("fedhf")
MIN_EXAMPLES = 50


@dataclass
class AttackResult:
    auc: float
    tpr_at_1pct_fpr: float
    epsilon_lower_bound: float
    threshold: float
    test_fpr: float
    test_fnr: float
    direction: str  # "member-if-above" (the attack as designed) or its flip


def roc_auc(members: np.ndarray, non_members: np.ndarray) -> float:
    """P(score of a random member > score of a random non-member), ties counted half (Mann-Whitney)."""
    scores = np.concatenate([members, non_members])
    order = scores.argsort(kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):  # average ranks over ties
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    m, n = len(members), len(non_members)
    return float((ranks[:m].sum() - m * (m + 1) / 2) / (m * n))


def tpr_at_fpr(members: np.ndarray, non_members: np.ndarray, fpr: float = 0.01) -> float:
    """The largest TPR of a threshold 'member if score > t' whose FPR on these non-members is at most ``fpr``."""
    allowed = math.floor(fpr * len(non_members))  # non-members that may score above t
    ranked = np.sort(non_members)[::-1]
    t = ranked[allowed] if allowed < len(ranked) else -np.inf
    return float((members > t).mean())


def _upper(k: int, n: int, alpha: float) -> float:
    """One-sided Clopper-Pearson upper bound on a rate with k events in n trials, level 1 - alpha."""
    return 1.0 if k >= n else float(beta.ppf(1 - alpha, k + 1, n - k))


def _eps_bound(fp: int, n_neg: int, fn: int, n_pos: int, delta: float, alpha: float) -> float:
    """Lower bound on epsilon from a test with fp false positives and fn false negatives (both rates bounded above)."""
    fpr, fnr = _upper(fp, n_neg, alpha / 2), _upper(fn, n_pos, alpha / 2)
    best = 0.0
    for a, b in ((fpr, fnr), (fnr, fpr)):
        if b > 0 and 1 - delta - a > 0:
            best = max(best, math.log((1 - delta - a) / b))
    return best


def epsilon_lower_bound(
    members: np.ndarray, non_members: np.ndarray, delta: float, confidence: float, rng: np.random.Generator
) -> tuple[float, float, float, float, str]:
    """(eps lower bound, threshold, test FPR, test FNR, direction): threshold picked on one half, bound on the other."""
    alpha = 1 - confidence
    pm, pn = rng.permutation(len(members)), rng.permutation(len(non_members))
    mc, mt = members[pm[: len(pm) // 2]], members[pm[len(pm) // 2 :]]
    nc, nt = non_members[pn[: len(pn) // 2]], non_members[pn[len(pn) // 2 :]]
    candidates = np.unique(np.concatenate([mc, nc]))
    if len(candidates) > 400:
        candidates = np.quantile(candidates, np.linspace(0, 1, 401))
    best = (-1.0, float(candidates[0]), "member-if-above")
    for t in candidates:
        fp, fn = int((nc > t).sum()), int((mc <= t).sum())
        for direction, (a, b) in (("member-if-above", (fp, fn)), ("member-if-below", (len(nc) - fp, len(mc) - fn))):
            e = _eps_bound(a, len(nc), b, len(mc), delta, alpha)
            if e > best[0]:
                best = (e, float(t), direction)
    _, t, direction = best
    fp, fn = int((nt > t).sum()), int((mt <= t).sum())
    if direction == "member-if-below":
        fp, fn = len(nt) - fp, len(mt) - fn
    eps = _eps_bound(fp, len(nt), fn, len(mt), delta, alpha)
    return eps, t, fp / len(nt), fn / len(mt), direction


def attack(members: np.ndarray, non_members: np.ndarray, delta: float, confidence: float, seed: int) -> AttackResult:
    eps, t, fpr, fnr, direction = epsilon_lower_bound(
        members, non_members, delta, confidence, np.random.default_rng(seed)
    )
    return AttackResult(
        roc_auc(members, non_members), tpr_at_fpr(members, non_members, 0.01), eps, t, fpr, fnr, direction
    )


# --------------------------------------------------------------------------- members and non-members


def audit_sets(run: RunRecord, non_members_file: str | Path | None) -> tuple[Any, Any, str]:
    """(members, non-members, where the non-members come from), as datasets with text/label columns."""
    import datasets

    from fedhf.data.load import load_data
    from fedhf.data.partitions import make_partitions, split_train_rows
    from fedhf.data.silos import load_silo

    cfg = run_config(run)
    data = load_data(cfg.data)
    recorded = run.partitions
    if list(data.label_names) != list(run.dataset.label_names):
        raise FedHFRunError(
            f"audit: the dataset's labels now are {data.label_names}, not the run's "
            f"{run.dataset.label_names}; the data changed since the run."
        )
    _check_same_files(run, data.source)
    parts = make_partitions(data, cfg.data, cfg.seed, max(len(recorded), 1))
    rebuilt = parts.stats()
    if [(p["train_examples"], p["label_histogram"]) for p in rebuilt] != [
        (p.train_examples, p.label_histogram or []) for p in recorded
    ]:
        raise FedHFRunError(
            "audit: the clients' training rows cannot be rebuilt from the run's config (partition sizes or labels "
            "differ "
            "from run.json: the clients used their own silos, or the data changed); the audit needs the members."
        )
    cols = _audit_columns(data)
    members = datasets.concatenate_datasets([train.select_columns(cols) for train, _ in parts.parts])
    if non_members_file is not None:
        p = Path(non_members_file)
        if not p.exists():
            raise FedHFRunError(f"audit: --non-members '{non_members_file}': no such file or folder.")
        train, extra, _ = load_silo(cfg.data, str(p), tuple(data.label_names), cfg.seed)
        if set(cols) - set(train.column_names):
            raise FedHFRunError(
                f"audit: --non-members '{non_members_file}' holds rows of another shape (columns "
                f"{', '.join(train.column_names)}) than the run's members ({', '.join(cols)}); give rows like theirs."
            )
        pool = [train] + ([extra] if extra is not None else [])
        where = f"file {p.name}"
    else:
        _, unused = split_train_rows(data, cfg.data, cfg.seed)
        held = [ev.select_columns(cols) for _, ev in parts.parts if ev is not None]
        pool = [unused.select_columns(cols)] + held
        where = "rows of the training split no client trained on (left out by the run's sampling" + (
            ", and the clients' local-evaluation hold-outs)" if held else ")"
        )
    non = (
        datasets.concatenate_datasets([d.select_columns(cols) for d in pool if len(d)])
        if any(len(d) for d in pool)
        else None
    )
    if non is not None:
        seen = set(_row_keys(members))
        keep = [i for i, key in enumerate(_row_keys(non)) if key not in seen]
        non = non.select(keep)
    if non is None or len(non) < MIN_EXAMPLES:
        have = 0 if non is None else len(non)
        raise FedHFRunError(
            f"audit: no held-out data: only {have} rows of '{cfg.data.dataset}' were never trained on (the run used "
            f"{len(members)} of its {len(data.train)} training rows); give --non-members FILE with at least "
            f"{MIN_EXAMPLES} rows of the same distribution that no client saw."
        )
    return members, non, where


def _audit_columns(data: Any) -> list[str]:
    """What a member is: its text and label, or its record's columns (instruction or chat records)."""
    if data.format == "labels":
        return ["text", "label"]
    if data.format == "text":
        return ["text"]
    return ["messages"] if data.format == "messages" else ["instruction", "input", "output"]


def _row_keys(ds: Any) -> list[str]:
    """Each row's identity (a non-member equal to a member is no non-member): its text, or its whole record."""
    if "text" in ds.column_names:
        return [str(t) for t in ds["text"]]
    cols = [c for c in ds.column_names if c != "label"]
    return [json.dumps([row[c] for c in cols], sort_keys=True) for row in ds]


def _check_same_files(run: RunRecord, source: dict[str, Any]) -> None:
    old = {f["name"]: f["sha256"] for fs in (run.dataset.source.get("files") or {}).values() for f in fs}
    new = {f["name"]: f["sha256"] for fs in (source.get("files") or {}).values() for f in fs}
    changed = sorted(name for name in old.keys() & new.keys() if old[name] != new[name])
    if changed:
        raise FedHFRunError(
            f"audit: the data files changed since the run (sha256 differs: {', '.join(changed[:3])}); "
            "the members cannot be rebuilt."
        )


def label_matched(members: Any, non: Any, max_examples: int, rng: np.random.Generator) -> tuple[Any, Any]:
    """Equal-size seeded samples of members and non-members with the same count of every label.

    Without it, a model whose loss depends on the label (e.g. one that favours the majority class)
    would separate two sets that merely differ in their label mix, and the audit would report
    "leakage" that is only sampling noise in the labels.
    """
    m_idx = rng.permutation(len(members))[:max_examples]
    if "label" not in members.column_names:  # records: no labels to match, equal-size seeded samples
        k = min(len(m_idx), len(non))
        return members.select(sorted(m_idx[:k].tolist())), non.select(sorted(rng.permutation(len(non))[:k].tolist()))
    m_labels = np.asarray(members["label"])[m_idx]
    n_labels = np.asarray(non["label"])
    keep_m, keep_n = [], []
    for label in np.unique(m_labels):
        mine = m_idx[m_labels == label]
        pool = rng.permutation(np.flatnonzero(n_labels == label))
        k = min(len(mine), len(pool))
        keep_m += mine[:k].tolist()
        keep_n += pool[:k].tolist()
    return members.select(sorted(keep_m)), non.select(sorted(keep_n))


# --------------------------------------------------------------------------- the audit


def claimed_privacy(run: RunRecord) -> tuple[float | None, float]:
    """(the run's sample-level epsilon, its delta): the largest over clients; (None, 0) without sample-level DP."""
    clients = run.privacy.clients if run.privacy else {}
    if not clients:
        return None, 0.0
    return max(c["epsilon"] for c in clients.values()), max(c["delta"] for c in clients.values())


def audit_run(
    run_dir: str | Path,
    *,
    non_members_file: str | Path | None = None,
    max_examples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    record: bool = True,
    candidates: int = 1000,
) -> dict[str, Any]:
    """Membership inference on the released adapter, and for a run with canaries (run.json 'canaries') their
    exposure against ``candidates`` random secrets."""
    from fedhf.tasks.model import build_model, load_tokenizer

    if max_examples < MIN_EXAMPLES:
        raise FedHFRunError(f"audit: --max-examples {max_examples} is too few; use at least {MIN_EXAMPLES}.")
    if not 0.5 <= confidence < 1:
        raise FedHFRunError(f"audit: --confidence {confidence} must be in [0.5, 1).")
    if not 10 <= candidates <= 100_000:
        raise FedHFRunError(f"audit: --candidates {candidates} must be in 10..100000 (1000 measures up to 9.97 bits).")
    run = load_finished_run(run_dir, "audit")
    if record:  # the audit is written into run.json and hub/: only into a run folder fedhf made
        check_run_folder(Path(run_dir), "audit")
    members, non, where = audit_sets(run, non_members_file)
    if "label" not in non.column_names:  # records: only those the run's template and max length can score
        from fedhf.tasks.causal_lm import scoreable

        rc = run_config(run)
        fits = scoreable(non, load_tokenizer(rc.model.name), rc.data.max_length)
        non = non.select([i for i, ok in enumerate(fits) if ok])
    members, non = label_matched(members, non, max_examples, np.random.default_rng(seed))
    n = len(members)
    if n < MIN_EXAMPLES:
        raise FedHFRunError(
            f"audit: only {n} members could be matched with non-members of the same labels; give "
            f"--non-members FILE with more rows (at least {MIN_EXAMPLES} per side are needed)."
        )
    cfg = run_config(run)
    released = released_model(run_dir, run)
    model, tokenizer, max_length, task = released.model, released.tokenizer, released.max_length, released.task
    reference = build_model(cfg, released.labels, device="cpu")  # the round-0 adapter: same seed, same initialisation
    ref_tok = load_tokenizer(cfg.model.name)
    labelled = "label" in members.column_names
    if labelled:
        texts_m, texts_n = list(members["text"]), list(non["text"])
        y_m, y_n = list(members["label"]), list(non["label"])
        loss_m, pred_m = task.per_example_loss(model, tokenizer, texts_m, y_m, max_length)
        loss_n, pred_n = task.per_example_loss(model, tokenizer, texts_n, y_n, max_length)
        ref_m, _ = task.per_example_loss(reference, ref_tok, texts_m, y_m, max_length)
        ref_n, _ = task.per_example_loss(reference, ref_tok, texts_n, y_n, max_length)
        acc_m = float((pred_m == torch.tensor(y_m)).float().mean())
        acc_n = float((pred_n == torch.tensor(y_n)).float().mean())
    else:  # records: each record's answer loss and its exact match (plain text: token loss, next-token accuracy)
        loss_m, hit_m = task.record_losses(model, tokenizer, members, max_length)
        loss_n, hit_n = task.record_losses(model, tokenizer, non, max_length)
        ref_m, _ = task.record_losses(reference, ref_tok, members, max_length, generate=False)
        ref_n, _ = task.record_losses(reference, ref_tok, non, max_length, generate=False)
        acc_m, acc_n = float(hit_m.float().mean()), float(hit_n.float().mean())
    claimed, delta = claimed_privacy(run)
    results = {
        "loss": attack(-loss_m.numpy(), -loss_n.numpy(), delta, confidence, seed),
        "calibrated": attack((ref_m - loss_m).numpy(), (ref_n - loss_n).numpy(), delta, confidence, seed),
    }
    out: dict[str, Any] = {
        "members": n,
        "non_members": n,
        "non_member_source": where,
        "label_matched": labelled,
        # what member_accuracy is (plain text: each text's share of tokens predicted right, averaged over texts)
        "score": "mean per-text next-token accuracy"
        if (run.dataset and run.dataset.format == "text")
        else metric_names(run.dataset.format if run.dataset else None).accuracy,
        "confidence": confidence,
        "delta": delta,
        "seed": seed,
        "claimed_epsilon": claimed,
        "member_accuracy": acc_m,
        "non_member_accuracy": acc_n,
        "member_loss": float(loss_m.mean()),
        "non_member_loss": float(loss_n.mean()),
        **{name: asdict(r) for name, r in results.items()},
    }
    if run.canaries:
        from fedhf.analysis.canary import canary_audit

        out["canaries"] = canary_audit(model, tokenizer, run.canaries, max_length, candidates, seed)
    best = max(r.epsilon_lower_bound for r in results.values())
    out["epsilon_lower_bound"] = best
    if claimed is not None and best > claimed:
        out["violation"] = (
            f"the empirical lower bound {best:.3f} exceeds the claimed epsilon {claimed:.3f}: the "
            "guarantee does not hold as stated (or the accounting is wrong)"
        )
        log.error("audit: %s", out["violation"])
    if record:
        _record(Path(run_dir), out)
    return out


def _record(run_dir: Path, audit: dict[str, Any]) -> None:
    """Store the audit in run.json and rebuild the hub/ folder so the model card states it."""
    from fedhf.release.card import base_model_license, build_hub_folder
    from fedhf.tasks.model import resolve_model

    def add(record: RunRecord) -> None:
        record.audit = audit

    record = RunStore(run_dir).update("audit", add)
    name = record.config["model.name"]
    build_hub_folder(run_dir, record, base_model_license(name, resolve_model(name)))


def audit_lines(audit: dict[str, Any]) -> list[str]:
    lines = [
        f"membership inference on {audit['members']} members and {audit['non_members']} non-members "
        f"({audit['non_member_source']}; {'label-matched' if audit.get('label_matched', True) else 'records'})",
        f"{audit.get('score') or ('accuracy' if audit.get('label_matched', True) else 'exact match')} members "
        f"{audit['member_accuracy']:.4f} / non-members {audit['non_member_accuracy']:.4f}; "
        f"mean loss {audit['member_loss']:.4f} / {audit['non_member_loss']:.4f}",
        f"{'attack':<11} {'AUC':>6} {'TPR@1%FPR':>10} {'eps lower bound':>16}",
    ]
    for name in ("loss", "calibrated"):
        a = audit[name]
        lines.append(f"{name:<11} {a['auc']:>6.3f} {a['tpr_at_1pct_fpr']:>10.3f} {a['epsilon_lower_bound']:>16.3f}")
    claimed = audit.get("claimed_epsilon")
    lines.append(
        f"lower bounds hold with {audit['confidence']:.0%} confidence at delta {audit['delta']:.3g}; "
        + (
            f"claimed sample-level epsilon {claimed:.3f}"
            if claimed is not None
            else "the run claims no sample-level DP"
        )
    )
    if audit.get("canaries"):
        from fedhf.analysis.canary import canary_lines

        lines.extend(canary_lines(audit["canaries"]))
    if audit.get("violation"):
        lines.append(f"VIOLATION: {audit['violation']}")
    return lines
