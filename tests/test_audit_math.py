"""The audit's statistics on scores with known answers: AUC, TPR at low FPR, and a sound epsilon lower bound."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedhf.analysis.audit import _upper, attack, epsilon_lower_bound, roc_auc, tpr_at_fpr


def brute_auc(m: np.ndarray, n: np.ndarray) -> float:
    wins = sum((a > b) + 0.5 * (a == b) for a in m for b in n)
    return wins / (len(m) * len(n))


def test_auc_equals_pairwise_count_with_ties():
    rng = np.random.default_rng(1)
    m = rng.integers(0, 6, 80).astype(float)  # many ties
    n = rng.integers(0, 5, 70).astype(float)
    assert roc_auc(m, n) == pytest.approx(brute_auc(m, n), abs=1e-12)
    assert roc_auc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 1.0
    assert roc_auc(np.array([0.0, 1.0]), np.array([2.0, 3.0])) == 0.0
    same = rng.normal(size=4000)
    assert roc_auc(same[:2000], same[2000:]) == pytest.approx(0.5, abs=0.03)


def test_tpr_at_fpr_respects_the_false_positive_budget():
    non = np.arange(100, dtype=float)  # 0..99
    members = np.array([98.5, 99.5, 150.0, 50.0])
    # 1% of 100 non-members may score above t: t is the second largest non-member (98).
    assert tpr_at_fpr(members, non, 0.01) == pytest.approx(0.75)
    assert tpr_at_fpr(members, non, 0.0) == pytest.approx(0.5)  # only above every non-member


def test_clopper_pearson_upper_bound():
    # 0 events in n trials: the one-sided bound is 1 - alpha**(1/n).
    assert _upper(0, 500, 0.025) == pytest.approx(1 - 0.025 ** (1 / 500), rel=1e-9)
    assert _upper(10, 10, 0.05) == 1.0
    assert 0.1 < _upper(10, 100, 0.05) < 0.2


def test_separable_scores_give_the_analytic_bound():
    m, n = np.full(1000, 1.0), np.full(1000, 0.0)
    eps, _, fpr, fnr, direction = epsilon_lower_bound(m, n, 0.0, 0.95, np.random.default_rng(0))
    assert (fpr, fnr, direction) == (0.0, 0.0, "member-if-above")
    up = 1 - 0.025 ** (1 / 500)  # each rate bounded at level 1 - 0.05/2 on the 500 test examples
    assert eps == pytest.approx(math.log((1 - up) / up), rel=1e-6)


def test_bound_is_sound_for_a_mechanism_with_known_epsilon():
    """Randomized response with epsilon = 1 is exactly 1-DP: the audit must not claim more, and must see some."""
    eps_true = 1.0
    p = math.exp(eps_true) / (1 + math.exp(eps_true))
    for seed in range(5):
        rng = np.random.default_rng(seed)
        m = (rng.random(20000) < p).astype(float)  # a member says 1 with probability e/(1+e)
        n = (rng.random(20000) < 1 - p).astype(float)
        res = attack(m, n, 0.0, 0.95, seed)
        assert res.epsilon_lower_bound <= eps_true
        assert res.epsilon_lower_bound > 0.8  # 20,000 examples pin it close to the truth
        assert res.auc == pytest.approx(p, abs=0.01)


def test_indistinguishable_scores_give_no_evidence():
    rng = np.random.default_rng(3)
    res = attack(rng.normal(size=1000), rng.normal(size=1000), 1e-5, 0.95, 0)
    assert res.epsilon_lower_bound < 0.35
    assert abs(res.auc - 0.5) < 0.05


def test_members_and_non_members_are_label_matched():
    import datasets

    from fedhf.analysis.audit import label_matched

    members = datasets.Dataset.from_dict({"text": [f"m{i}" for i in range(100)], "label": [1] * 80 + [0] * 20})
    non = datasets.Dataset.from_dict({"text": [f"n{i}" for i in range(60)], "label": [1] * 30 + [0] * 30})
    m, n = label_matched(members, non, 1000, np.random.default_rng(0))
    assert sorted(m["label"]) == sorted(n["label"]) == [0] * 20 + [1] * 30
    assert len(set(m["text"])) == 50 and len(set(n["text"])) == 50
    m, n = label_matched(members, non, 10, np.random.default_rng(0))
    assert len(m) == len(n) <= 10 and sorted(m["label"]) == sorted(n["label"])
