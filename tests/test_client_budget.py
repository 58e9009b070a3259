"""The data owner's budget: node config beats the run config; bad values are refused."""

import pytest

from fedhf.client import node_budget
from fedhf.config import parse_config
from fedhf.errors import FedHFConfigError


def ctx(**node):
    return {"partition-id": 0, "num-partitions": 2, **node}


def test_budget_precedence():
    cfg = parse_config({"privacy.max-epsilon": 8.0, "privacy.node-max-epsilon": "0:2.5"})
    assert node_budget(cfg, ctx(), 0) == 2.5
    assert node_budget(cfg, ctx(), 1) == 8.0
    assert node_budget(cfg, ctx(**{"max-epsilon": 1.5}), 0) == 1.5
    assert node_budget(cfg, ctx(**{"max-epsilon": "3"}), 1) == 3.0
    assert node_budget(parse_config({}), ctx(), 0) is None


@pytest.mark.parametrize("value", ["abc", -1.0, 0, "inf", "nan"])
def test_node_budget_must_be_a_positive_number(value):
    with pytest.raises(FedHFConfigError, match="node config 'max-epsilon': got .*give a positive number"):
        node_budget(parse_config({}), ctx(**{"max-epsilon": value}), 0)
