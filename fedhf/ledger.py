"""The privacy ledger of a run, as a table for the console and `fedhf privacy ledger`. No Flower, no Opacus."""

from __future__ import annotations

from typing import Any


def ledger_table(run: dict[str, Any]) -> str:
    """Per client: epsilon after each round it was asked to train, delta, sigma, C, q, steps, budget, status."""
    privacy = run.get("privacy")
    if not privacy or privacy.get("mode", "none") == "none":
        return "privacy: none (this run has no differential-privacy guarantee)"
    clients = privacy.get("clients", {})
    rounds = sorted({r["round"] for e in clients.values() for r in e["rounds"]})
    lines = [f"privacy ledger: {privacy['label']}, accountant {privacy['accountant']}"
             + (f", sigma planned for target epsilon {privacy['target_epsilon']:g}" if privacy.get("target_epsilon") else "")]
    head = f"{'client':>6}  " + "  ".join(f"{'eps r' + str(r):>8}" for r in rounds) + \
        f"  {'delta':>9} {'sigma':>7} {'C':>6} {'q':>7} {'steps':>6} {'budget':>7}  status"
    lines.append(head)
    for pid in sorted(clients, key=int):
        e = clients[pid]
        by_round = {r["round"]: r for r in e["rounds"]}
        cells = []
        for r in rounds:
            rr = by_round.get(r)
            cells.append(f"{'-':>8}" if rr is None else f"{rr['epsilon']:>8.3f}" + ("" if rr["status"] == "trained" else "*"))
        status = "trained" if "stopped" not in e else (
            f"stopped before round {e['stopped']['round']}: budget (would reach {e['stopped']['projected_epsilon']:.3f})")
        budget = f"{e['max_epsilon']:>7.3g}" if e.get("max_epsilon") else f"{'-':>7}"
        lines.append(f"{pid:>6}  " + "  ".join(cells) +
                     f"  {e['delta']:>9.2e} {e['noise_multiplier']:>7.3f} {e['max_grad_norm']:>6.3g} {e['sample_rate']:>7.4f} "
                     f"{e['steps']:>6} {budget}  {status}")
    eps = [e["epsilon"] for e in clients.values()]
    if eps:
        lines.append(f"{SAMPLE:s}: epsilon max {max(eps):.3f}, mean {sum(eps) / len(eps):.3f} over {len(eps)} clients "
                     f"(each at its own delta); * = did not train that round")
    if privacy.get("rng"):
        lines.append(f"note: {privacy['rng']}")
    return "\n".join(lines)


SAMPLE = "sample-level (per example)"


def privacy_line(row: dict[str, Any]) -> str | None:
    p = row.get("privacy")
    if not p:
        return None
    ex = f", budget exhausted: clients {p['exhausted']}" if p["exhausted"] else ""
    return (f"[fedhf] privacy after round {row['round']}: {SAMPLE} epsilon max {p['sample_level_epsilon_max']:.3f}, "
            f"mean {p['sample_level_epsilon_mean']:.3f}{ex}")
