"""The privacy ledger of a run, as a table for the console and `fedhf privacy ledger`. No Flower, no Opacus."""

from __future__ import annotations

from typing import Any

SAMPLE = "sample-level (per example)"
CLIENT = "client-level (per participant)"


def ledger_table(run: dict[str, Any]) -> str:
    """Per client: epsilon after each round it was asked to train, delta, sigma, C, q, steps, budget, status."""
    privacy = run.get("privacy")
    if not privacy or privacy.get("mode", "none") == "none":
        return "privacy: none (this run has no differential-privacy guarantee)"
    lines: list[str] = []
    clients = privacy.get("clients", {})
    if clients:
        lines += _sample_table(privacy, clients)
    cl = privacy.get("client_level")
    if cl:
        lines += _client_level_lines(cl)
    if privacy.get("rng"):
        lines.append(f"note: {privacy['rng']}")
    return "\n".join(lines)


def _client_level_lines(cl: dict[str, Any]) -> list[str]:
    lines = [f"privacy ledger: {CLIENT} ({cl['clipping']} clipping, C {cl['rounds'][-1]['clipping_norm'] if cl['rounds'] else '-'}, "
             f"sigma {cl['noise_multiplier']:g}, effective sigma {cl['effective_noise_multiplier']:.4g}, delta {cl['delta']:.3g}, rdp)"]
    lines.append(f"{'round':>6} {'clients':>8} {'q':>7} {'epsilon':>9} {'eps (q=1)':>10}")
    for r in cl["rounds"]:
        lines.append(f"{r['round']:>6} {r['clients_aggregated']:>3}/{r['population']:<4} {r['sample_rate']:>7.3f} "
                     f"{r['epsilon']:>9.3f} {r['epsilon_no_amplification']:>10.3f}")
    lines.append(f"{CLIENT}: epsilon {cl.get('epsilon', 0.0):.3f} with sampling amplification (assumes Poisson sampling of "
                 f"clients), {cl.get('epsilon_no_amplification', 0.0):.3f} without (holds for any client selection)")
    return lines


def _sample_table(privacy: dict[str, Any], clients: dict[str, Any]) -> list[str]:
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
        status = "trained" if "stopped" not in e else f"stopped in round {e['stopped']['round']}: {e['stopped']['reason']}"
        budget = f"{e['max_epsilon']:>7.3g}" if e.get("max_epsilon") else f"{'-':>7}"
        lines.append(f"{pid:>6}  " + "  ".join(cells) +
                     f"  {e['delta']:>9.2e} {e['noise_multiplier']:>7.3f} {e['max_grad_norm']:>6.3g} {e['sample_rate']:>7.4f} "
                     f"{e['steps']:>6} {budget}  {status}")
    eps = [e["epsilon"] for e in clients.values()]
    lines.append(f"{SAMPLE:s}: epsilon max {max(eps):.3f}, mean {sum(eps) / len(eps):.3f} over {len(eps)} clients "
                 f"(each at its own delta); * = did not train that round")
    return lines




def privacy_line(row: dict[str, Any]) -> str | None:
    """One console line per round; the two guarantees side by side, never combined."""
    p = row.get("privacy")
    if not p:
        return None
    parts = []
    if "sample_level_epsilon_max" in p:
        ex = f", budget exhausted: clients {p['exhausted']}" if p["exhausted"] else ""
        parts.append(f"{SAMPLE} epsilon max {p['sample_level_epsilon_max']:.3f}, mean {p['sample_level_epsilon_mean']:.3f}{ex}")
    if "client_level_epsilon" in p:
        parts.append(f"{CLIENT} epsilon {p['client_level_epsilon']:.3f} ({p['client_level_epsilon_no_amplification']:.3f} "
                     f"without sampling amplification)")
    return f"[fedhf] privacy after round {row['round']}: " + "; ".join(parts)
