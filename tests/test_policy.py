"""The data owner's policy, from the node config: parsed strictly, enforced by the node, never by the run config."""

import pytest

from fedhf.config.schema import parse_config
from fedhf.errors import FedHFConfigError
from fedhf.privacy.policy import SHAREABLE, NodePolicy, check_delta, check_request, parse_policy


def test_defaults_share_everything_without_dp_and_nothing_under_dp():
    p = parse_policy({"partition-id": 0, "num-partitions": 2})
    assert p == NodePolicy()
    assert p.shared(dp=False) == frozenset(SHAREABLE) and p.shared(dp=True) == frozenset()
    assert check_request(p, mode="none", secure=False, noise_multiplier=None) is None


def test_a_budget_implies_sample_level_dp_and_contradictions_are_refused():
    assert parse_policy({"max-epsilon": 2}).min_privacy == "sample"
    assert parse_policy({"max-epsilon": "2.5"}).max_epsilon == 2.5
    with pytest.raises(FedHFConfigError, match="'max-epsilon' is a sample-level budget, but 'min-privacy' is 'none'"):
        parse_policy({"max-epsilon": 2, "min-privacy": "none"})


@pytest.mark.parametrize(
    ("node", "match"),
    [
        ({"max-epsilon": "abc"}, "node config 'max-epsilon': got 'abc'; give a positive number"),
        ({"max-epsilon": -1}, "node config 'max-epsilon': got -1"),
        ({"max-epsilon": "inf"}, "node config 'max-epsilon'"),
        ({"max-epsilon": True}, "node config 'max-epsilon'"),
        ({"max-delta": 0}, "node config 'max-delta': got 0"),
        ({"max-delta": 1.5}, "node config 'max-delta': got 1.5; delta must be below 1"),
        ({"min-privacy": "strong"}, "node config 'min-privacy': got 'strong'; allowed: none, client, sample"),
        (
            {"require-secure-aggregation": "yes"},
            "node config 'require-secure-aggregation': got 'yes'; give true or false",
        ),
        ({"share": "passwords"}, "node config 'share': 'passwords' is not something fedhf can share"),
        ({"share": 3}, "node config 'share': got 3"),
    ],
)
def test_bad_policy_values_name_the_key_and_the_fix(node, match):
    with pytest.raises(FedHFConfigError, match=match):
        parse_policy(node)


def test_share_lists_all_and_none():
    assert parse_policy({"share": "num-examples, train-loss"}).shared(dp=True) == {"num-examples", "train-loss"}
    assert parse_policy({"share": "all"}).shared(dp=True) == frozenset(SHAREABLE)
    assert parse_policy({"share": "none"}).shared(dp=False) == frozenset()
    assert parse_policy({"share": ""}).shared(dp=False) == frozenset()


@pytest.mark.parametrize(
    ("node", "mode", "secure", "sigma", "rule"),
    [
        ({"min-privacy": "sample"}, "none", True, None, "min-privacy"),
        ({"min-privacy": "sample"}, "client", True, None, "min-privacy"),
        ({"max-epsilon": 1}, "none", True, None, "min-privacy"),
        ({"min-privacy": "sample"}, "sample", True, 0.0, "min-privacy"),
        ({"min-privacy": "client"}, "sample", True, 1.0, "min-privacy"),
        ({"require-secure-aggregation": True}, "sample", False, 1.0, "require-secure-aggregation"),
        (
            {"require-secure-aggregation": "true", "min-privacy": "sample"},
            "sample",
            False,
            1.0,
            "require-secure-aggregation",
        ),
    ],
)
def test_requests_that_break_the_policy_are_refused_by_rule(node, mode, secure, sigma, rule):
    refusal = check_request(parse_policy(node), mode=mode, secure=secure, noise_multiplier=sigma)
    assert refusal is not None and refusal.rule == rule


@pytest.mark.parametrize(
    ("node", "mode", "secure"),
    [
        ({"min-privacy": "sample"}, "sample", False),
        ({"min-privacy": "sample"}, "both", False),
        ({"min-privacy": "client"}, "client", False),
        ({"require-secure-aggregation": True}, "none", True),
    ],
)
def test_compliant_requests_pass(node, mode, secure):
    assert check_request(parse_policy(node), mode=mode, secure=secure, noise_multiplier=1.0) is None


def test_the_delta_ceiling_defaults_to_one_over_n_and_the_refusal_does_not_quote_it():
    p = parse_policy({})
    assert check_delta(p, 0.1 / 90, 90) is None
    refusal = check_delta(p, 0.5, 90)
    assert refusal.rule == "max-delta" and "0.5" in refusal.reason and "90" not in refusal.reason
    assert "0.0111" not in refusal.reason  # 1/90: the ceiling would reveal the node's row count
    assert check_delta(p, 1 / 80, 90).rule == "max-delta"
    assert check_delta(parse_policy({"max-delta": 1e-5}), 1e-4, 10**9).rule == "max-delta"


def test_the_removed_run_config_budget_says_where_a_budget_belongs():
    with pytest.raises(
        FedHFConfigError, match="privacy.node-max-epsilon' was removed: a node's budget is its owner's word"
    ):
        parse_config({"privacy.node-max-epsilon": "0:2.5"})
