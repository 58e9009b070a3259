"""The ledger's arithmetic as pure functions (fedhf.privacy.ledger): conservative, and never changing its inputs."""

import copy

import pytest

from fedhf.privacy.dp import epsilon_of
from fedhf.privacy.ledger import ledger_entry, over_budget, round_summary, with_saved_spend


def report(epsilon: float, steps: int, acc_id: str = "a", **extra) -> dict:
    return {
        "epsilon": epsilon,
        "delta": 1e-3,
        "noise_multiplier": 1.0,
        "max_grad_norm": 1.0,
        "sample_rate": 0.1,
        "steps": steps,
        "accountant": "rdp",
        "accountant_id": acc_id,
        "max_epsilon": 0.0,
        **extra,
    }


def test_an_entry_follows_the_reports_and_takes_the_servers_floor():
    floor = epsilon_of("rdp", [(1.0, 0.1, 10)], 1e-3)
    first, warnings = ledger_entry(None, report(floor, 10), 1, "trained")
    assert first["epsilon"] == floor and first["steps"] == 10 and warnings == []
    kept = copy.deepcopy(first)
    low, warnings = ledger_entry(first, report(0.01, 20), 2, "trained")  # reports less than sigma, q, steps give
    assert first == kept  # pure: the input entry is unchanged
    assert low["epsilon"] == pytest.approx(epsilon_of("rdp", [(1.0, 0.1, 20)], 1e-3)) and "note_floor" in low
    assert len(warnings) == 1 and [r["round"] for r in low["rounds"]] == [1, 2]


EPS30 = epsilon_of("rdp", [(1.0, 0.1, 30)], 1e-3)  # what sigma 1, q 0.1 and 30 steps give at delta 1e-3 (about 3.2)


def test_a_restarted_accountant_composes_by_adding():
    e1, _ = ledger_entry(None, report(EPS30, 30), 1, "trained")
    e2, warnings = ledger_entry(e1, report(EPS30, 30, acc_id="b"), 2, "trained")
    assert e2["accountant_resets"] == 1 and e2["epsilon"] == pytest.approx(2 * EPS30)
    assert e2["delta"] == pytest.approx(2e-3)
    assert e2["steps"] == 60 and "restarted" in warnings[0]
    assert over_budget({"0": {**e2, "max_epsilon": 5.0}, "1": {**e1, "max_epsilon": 5.0}}) == {0}  # 6.4 vs 3.2
    assert round_summary({"0": e2, "1": e1}) == {
        "sample_level_epsilon": {"0": e2["epsilon"], "1": EPS30},
        "sample_level_epsilon_max": e2["epsilon"],
        "sample_level_epsilon_mean": (e2["epsilon"] + EPS30) / 2,
    }


def test_steps_only_the_clients_own_accountant_holds_are_counted():
    e1, _ = ledger_entry(None, report(EPS30, 30), 1, "trained")
    spent = with_saved_spend(
        e1,
        {
            "epsilon": 4.0,
            "steps": 40,
            "delta": 1e-3,
            "noise_multiplier": 1.0,
            "max_grad_norm": 1.0,
            "sample_rate": 0.1,
            "accountant": "rdp",
        },
    )
    assert spent["epsilon"] == 4.0 and spent["steps"] == 40 and spent["unreported_steps"] == 10
    assert e1["epsilon"] == EPS30
