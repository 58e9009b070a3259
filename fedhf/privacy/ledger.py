"""The privacy ledger of a run: its part of the run record, its arithmetic (pure functions over the entries, which
are plain maps) and its table. No Flower.

A ledger entry is one client's sample-level spend in a run, built from what it reports each round
(``ledger_entry``) and from its own saved accountant when that holds more (``with_saved_spend``).
The rules, all conservative:
- the server's floor: epsilon is the larger of what the client reports and what its reported
  sigma, q and steps give;
- an accountant that restarted (a new accountant id, or fewer steps) starts a new accounting
  period; periods compose by basic composition (epsilons and deltas add), so epsilon never goes down;
- steps a client's saved accountant holds beyond what it reported are counted.
Opacus is imported only to compute an epsilon (``fedhf.privacy.dp.epsilon_of``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# The run record (fedhf.run.store) leaves a field with this metadata out of run.json while it is empty.
OPTIONAL = {"omit_empty": True}

SAMPLE = "sample-level (per example)"
CLIENT = "client-level (per participant)"


@dataclass
class Privacy:
    """The run's privacy as stated at its start, and the ledgers its rounds filled in."""

    mode: str
    rng: str | None = field(default=None, metadata=OPTIONAL)
    secure_rng: bool | None = field(default=None, metadata=OPTIONAL)
    label: str | None = field(default=None, metadata=OPTIONAL)
    accountant: str | None = field(default=None, metadata=OPTIONAL)
    target_epsilon: float | None = field(default=None, metadata=OPTIONAL)
    grad_sample_mode: str | None = field(default=None, metadata=OPTIONAL)
    clients: dict[str, dict[str, Any]] = field(default_factory=dict)  # sample-level ledger entries, by partition id
    client_level: dict[str, Any] | None = field(default=None, metadata=OPTIONAL)  # the account and its rounds


@dataclass
class RoundPrivacy:
    """A round's privacy figures: the sample-level spend over clients and the client-level epsilon, side by side."""

    sample_level_epsilon: dict[str, float] | None = field(default=None, metadata=OPTIONAL)
    sample_level_epsilon_max: float | None = field(default=None, metadata=OPTIONAL)
    sample_level_epsilon_mean: float | None = field(default=None, metadata=OPTIONAL)
    exhausted: list[int] | None = field(default=None, metadata=OPTIONAL)
    client_level_epsilon: float | None = field(default=None, metadata=OPTIONAL)
    client_level_epsilon_no_amplification: float | None = field(default=None, metadata=OPTIONAL)


def ledger_table(privacy: Privacy | None) -> str:
    """Per client: epsilon after each round it was asked to train, delta, sigma, C, q, steps, budget, status."""
    if privacy is None or privacy.mode == "none":
        return "privacy: none (this run has no differential-privacy guarantee)"
    lines: list[str] = []
    if privacy.clients:
        lines += _sample_table(privacy)
    if privacy.client_level:
        lines += _client_level_lines(privacy.client_level)
    if privacy.rng:
        lines.append(f"note: {privacy.rng}")
    return "\n".join(lines)


def _client_level_lines(cl: dict[str, Any]) -> list[str]:
    lines = [
        f"privacy ledger: {CLIENT} ({cl['clipping']} clipping, "
        f"C {cl['rounds'][-1]['clipping_norm'] if cl['rounds'] else '-'}, "
        f"sigma {cl['noise_multiplier']:g}, effective sigma {cl['effective_noise_multiplier']:.4g}, "
        f"delta {cl['delta']:.3g}, rdp)"
    ]
    lines.append(f"{'round':>6} {'clients':>8} {'q':>7} {'epsilon':>9} {'eps (q=1)':>10}")
    for r in cl["rounds"]:
        lines.append(
            f"{r['round']:>6} {r['clients_aggregated']:>3}/{r['population']:<4} {r['sample_rate']:>7.3f} "
            f"{r['epsilon']:>9.3f} {r['epsilon_no_amplification']:>10.3f}"
        )
    lines.append(
        f"{CLIENT}: epsilon {cl.get('epsilon', 0.0):.3f} with sampling amplification (assumes Poisson sampling of "
        f"clients), {cl.get('epsilon_no_amplification', 0.0):.3f} without (holds for any client selection)"
    )
    return lines


def _sample_table(privacy: Privacy) -> list[str]:
    clients = privacy.clients
    rounds = sorted({r["round"] for e in clients.values() for r in e["rounds"]})
    planned = f", sigma planned for target epsilon {privacy.target_epsilon:g}" if privacy.target_epsilon else ""
    lines = [f"privacy ledger: {privacy.label}, accountant {privacy.accountant}{planned}"]
    personal = {r["round"] for e in clients.values() for r in e["rounds"] if r["status"] == "personalized"}
    head = (
        f"{'client':>6}  "
        + "  ".join(f"{'eps pers' if r in personal else 'eps r' + str(r):>8}" for r in rounds)
        + f"  {'delta':>9} {'sigma':>7} {'C':>6} {'q':>7} {'steps':>6} {'budget':>7}  status"
    )
    lines.append(head)
    for pid in sorted(clients, key=int):
        e = clients[pid]
        by_round = {r["round"]: r for r in e["rounds"]}
        cells = []
        for r in rounds:
            rr = by_round.get(r)
            cells.append(
                f"{'-':>8}"
                if rr is None
                else f"{rr['epsilon']:>8.3f}" + ("" if rr["status"] in ("trained", "personalized") else "*")
            )
        status = (
            "trained" if "stopped" not in e else f"stopped in round {e['stopped']['round']}: {e['stopped']['reason']}"
        )
        budget = f"{e['max_epsilon']:>7.3g}" if e.get("max_epsilon") else f"{'-':>7}"
        lines.append(
            f"{pid:>6}  "
            + "  ".join(cells)
            + f"  {e['delta']:>9.2e} {e['noise_multiplier']:>7.3f} {e['max_grad_norm']:>6.3g} {e['sample_rate']:>7.4f} "
            f"{e['steps']:>6} {budget}  {status}"
        )
    eps = [e["epsilon"] for e in clients.values()]
    lines.append(
        f"{SAMPLE:s}: epsilon max {max(eps):.3f}, mean {sum(eps) / len(eps):.3f} over {len(eps)} clients "
        f"(each at its own delta); * = did not train that round"
        + ("; pers = the personalization stage after the last round" if personal else "")
    )
    return lines


def privacy_line(server_round: int, p: RoundPrivacy | None) -> str | None:
    """One console line per round; the two guarantees side by side, never combined."""
    if p is None:
        return None
    parts = []
    if p.sample_level_epsilon_max is not None:
        ex = f", budget exhausted: clients {p.exhausted}" if p.exhausted else ""
        parts.append(
            f"{SAMPLE} epsilon max {p.sample_level_epsilon_max:.3f}, mean {p.sample_level_epsilon_mean:.3f}{ex}"
        )
    if p.client_level_epsilon is not None:
        parts.append(
            f"{CLIENT} epsilon {p.client_level_epsilon:.3f} ({p.client_level_epsilon_no_amplification:.3f} "
            f"without sampling amplification)"
        )
    return f"[fedhf] privacy after round {server_round}: " + "; ".join(parts) if parts else None


def reported_floor(report: dict[str, Any]) -> float:
    """Epsilon of the reported (sigma, q, steps) at the reported delta, by the reported accountant."""
    from fedhf.privacy.dp import epsilon_of

    if not report["steps"]:
        return 0.0
    if report["noise_multiplier"] <= 0:
        return float("inf")
    return epsilon_of(
        report["accountant"],
        [(report["noise_multiplier"], report["sample_rate"], int(report["steps"]))],
        report["delta"],
    )


def _new_entry(src: dict[str, Any], max_epsilon: float | None = None) -> dict[str, Any]:
    """A client's first ledger entry, from its first report or its saved spend (both in snake_case)."""
    keys = ("delta", "noise_multiplier", "max_grad_norm", "sample_rate", "accountant")
    return {**{k: src[k] for k in keys}, "max_epsilon": max_epsilon, "rounds": []}


def ledger_entry(
    entry: dict[str, Any] | None, report: dict[str, Any], server_round: int, status: str
) -> tuple[dict[str, Any], list[str]]:
    """One client's ledger entry after its round-``server_round`` report (snake_case keys); the warnings to log.

    ``entry`` is not changed; the returned entry is a new dict.
    """
    p = report
    warnings: list[str] = []
    entry = dict(entry) if entry is not None else _new_entry(p, max_epsilon=p["max_epsilon"] or None)
    entry["rounds"] = list(entry["rounds"])
    # The server's own floor: one run on one node has one sigma and one q.
    floor = reported_floor(p)
    epsilon, steps = max(float(p["epsilon"]), floor), int(p["steps"])
    if floor > float(p["epsilon"]) * (1 + 1e-6):
        entry["note_floor"] = (
            "the client reported less than its sigma, q and steps give; the ledger counts the computed value"
        )
        warnings.append(f"reported epsilon {p['epsilon']:.4f}; its sigma, q and steps give {floor:.4f}: counting that")
    acc_id = p["accountant_id"]
    restarted = entry["rounds"] and (acc_id != entry.get("accountant_id") or steps < entry["reported_steps"])
    if restarted:
        # A new accountant (its state was lost, or another node took this partition id): its epsilon does not
        # include what was spent before. Compose conservatively so that the ledger never goes down.
        entry["offset_epsilon"] = entry.get("offset_epsilon", 0.0) + entry["reported_epsilon"]
        entry["offset_delta"] = entry.get("offset_delta", 0.0) + entry["reported_delta"]
        entry["offset_steps"] = entry.get("offset_steps", 0) + entry["reported_steps"]
        entry["accountant_resets"] = entry.get("accountant_resets", 0) + 1
        entry["note"] = (
            "the client's accountant restarted; epsilon and delta are the sums over its accounting "
            "periods (basic composition)"
        )
        warnings.append(
            f"its privacy accountant restarted (accountant id {acc_id} after {entry.get('accountant_id')}, "
            f"steps {steps} after {entry['reported_steps']}); its epsilon is now composed conservatively"
        )
    entry.update(
        {"reported_epsilon": epsilon, "reported_steps": steps, "reported_delta": p["delta"], "accountant_id": acc_id}
    )
    if "lifetime_epsilon" in p:
        entry["lifetime_epsilon"] = p["lifetime_epsilon"]
        entry["lifetime_delta"] = p.get("lifetime_delta", p["delta"])
    epsilon += entry.get("offset_epsilon", 0.0)
    steps += entry.get("offset_steps", 0)
    entry["delta"] = p["delta"] + entry.get("offset_delta", 0.0)
    entry["rounds"].append({"round": server_round, "epsilon": epsilon, "steps": steps, "status": status})
    entry["epsilon"] = epsilon
    entry["steps"] = steps
    return entry, warnings


def with_saved_spend(entry: dict[str, Any] | None, spend: dict[str, Any]) -> dict[str, Any]:
    """The entry once a client's saved accountant (``spend``: epsilon, steps, delta, sigma, C, q, accountant) shows
    more steps than it reported: the ledger takes the client's figure."""
    entry = (
        dict(entry)
        if entry is not None
        else {**_new_entry(spend), "reported_epsilon": 0.0, "reported_steps": 0, "reported_delta": spend["delta"]}
    )
    entry["unreported_steps"] = spend["steps"] - entry["reported_steps"]
    entry["note_unreported"] = (
        "the client's own accountant holds steps of a round whose update the server did not "
        "aggregate (cut off by a restart or too late); they are counted"
    )
    entry.update({"reported_epsilon": spend["epsilon"], "reported_steps": spend["steps"]})
    entry["epsilon"] = spend["epsilon"] + entry.get("offset_epsilon", 0.0)
    entry["steps"] = spend["steps"] + entry.get("offset_steps", 0)
    return entry


def round_summary(ledger: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """What a round records of the ledger: each client's epsilon so far, the largest and the mean."""
    current = {pid: e["epsilon"] for pid, e in ledger.items()}
    return {
        "sample_level_epsilon": current,
        "sample_level_epsilon_max": max(current.values(), default=0.0),
        "sample_level_epsilon_mean": sum(current.values()) / len(current) if current else 0.0,
    }


def over_budget(ledger: dict[str, dict[str, Any]]) -> set[int]:
    """Clients whose recorded epsilon reached their budget (only possible after an accountant restart)."""
    return {int(pid) for pid, e in ledger.items() if e.get("max_epsilon") and e["epsilon"] >= e["max_epsilon"]}
