"""Contract: the Flower 1.42 internals that fedhf's strategy wrappers and SecAgg+ grid build on.

Each import below is outside Flower's documented top-level API (``flwr.app``, ``flwr.serverapp``,
``flwr.clientapp``, ``flwr.simulation``). Why fedhf needs each one is written next to it; each test fails
when Flower changes what fedhf relies on, before a run does.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from flwr.app import ArrayRecord
from flwr.serverapp.strategy import DifferentialPrivacyServerSideAdaptiveClipping, FedAvg

from fedhf.config.schema import parse_config
from fedhf.run.record import RunRecorder
from tests.test_strategy import begin, train_reply


def test_adaptive_clipping_moves_the_norm_before_it_adds_noise():
    """Why fedhf overrides the private ``_add_noise_to_aggregated_arrays``: Flower's adaptive wrapper updates
    ``clipping_norm`` for the next round inside ``aggregate_train`` and then noises with the updated value."""
    seen = []

    class Spy(DifferentialPrivacyServerSideAdaptiveClipping):
        def _add_noise_to_aggregated_arrays(self, aggregated):
            seen.append(self.clipping_norm)
            return super()._add_noise_to_aggregated_arrays(aggregated)

    assert (
        len(inspect.signature(DifferentialPrivacyServerSideAdaptiveClipping._add_noise_to_aggregated_arrays).parameters)
        == 2
    )  # (self, the aggregated ArrayRecord) -> ArrayRecord
    dp = Spy(
        FedAvg(min_available_nodes=1, min_train_nodes=1),
        noise_multiplier=1.0,
        num_sampled_clients=3,
        initial_clipping_norm=0.1,
        clipped_count_stddev=2.0,
    )
    dp.current_arrays = ArrayRecord({"w": torch.zeros(2, 2)})
    before = dp.clipping_norm
    replies = [train_reply(11 + i, i, 5.0, 10, 0.5) for i in range(3)]
    for r in replies:
        r.content = type(r.content)({"arrays": r.content["arrays"], "metrics": r.content["metrics"]})
    arrays, _ = dp.aggregate_train(1, replies)
    assert arrays is not None and len(seen) == 1
    assert seen[0] != before  # the noise would use next round's norm: fedhf's override is still needed


def test_fedhf_noises_with_the_norm_that_clipped_the_round(tmp_path, monkeypatch):
    """The override at work: ``compute_stdv`` (module-level in Flower's adaptive wrapper) sees this round's C."""
    import flwr.serverapp.strategy.dp_adaptive_clipping as dpa

    from fedhf.flower.strategy import build_strategy

    seen = []
    real = dpa.compute_stdv
    monkeypatch.setattr(dpa, "compute_stdv", lambda sigma, c, m: seen.append(c) or real(sigma, c, m))
    cfg = parse_config(
        {
            "output-dir": str(tmp_path),
            "run-name": "ad",
            "privacy.mode": "client",
            "privacy.client-clipping": "server-adaptive",
            "privacy.client-clipped-count-stddev": 2.0,
            "privacy.client-clipping-norm": 0.1,
        }
    )
    rec = RunRecorder(cfg)
    rec.set_privacy({"mode": "client"})
    s = build_strategy(cfg, rec, population=3)
    s.dp.current_arrays = ArrayRecord({"w": torch.zeros(2, 2)})
    s.screened.population = 3
    begin(s, rec, 1, 3, nodes=[11, 12, 13])
    before = s.clipping_norm
    s.aggregate_train(
        1, [train_reply(11, 0, 5.0, 10, 0.5), train_reply(12, 1, 5.0, 10, 0.5), train_reply(13, 2, 5.0, 10, 0.5)]
    )
    assert seen == [before]  # noise calibrated to the C that clipped these updates
    assert s.clipping_norm != before  # ... while C itself did adapt for the next round
    assert rec.record.privacy.client_level["rounds"][0]["clipping_norm"] == before


def test_the_dp_wrappers_hold_the_inner_strategy_as_strategy():
    """fedhf composes: ClientLevel -> Flower's DP wrapper -> Screened -> Flower's FedAvg. Flower's wrapper calls
    ``self.strategy`` for configure/aggregate and reads ``weighted_by_key`` from it when it accounts."""
    dp = DifferentialPrivacyServerSideAdaptiveClipping(
        FedAvg(), noise_multiplier=1.0, num_sampled_clients=2, clipped_count_stddev=2.0
    )
    assert isinstance(dp.strategy, FedAvg)
    src = inspect.getsource(type(dp).__mro__[1]) + inspect.getsource(type(dp))
    assert "self.strategy.aggregate_train" in src and "self.strategy.configure_train" in src


@pytest.mark.parametrize(
    ("module", "names", "why"),
    [
        (
            "flwr.common.secure_aggregation.secaggplus_constants",
            ["RECORD_KEY_CONFIGS", "RECORD_KEY_STATE", "Key", "Stage"],
            "the SecAgg+ stage names a node checks to refuse at the set-up stage, before any key is sent",
        ),
        (
            "flwr.compat.common.recorddict_compat",
            ["arrayrecord_to_parameters", "recorddict_to_fitins", "fitres_to_recorddict"],
            "SecAgg+ runs on the legacy FitIns/FitRes records (stack facts: "
            "the Message-API handler fails with KeyError)",
        ),
        (
            "flwr.server.workflow.constant",
            ["MAIN_CONFIGS_RECORD", "MAIN_PARAMS_RECORD", "Key"],
            "the record names SecAggPlusWorkflow reads its round and parameters from",
        ),
        (
            "flwr.server.workflow.secure_aggregation.secaggplus_workflow",
            ["WorkflowState"],
            "the state object SecAggPlusWorkflow's stages share; fedhf drives the stages one round at a time",
        ),
    ],
)
def test_the_non_top_level_flower_names_fedhf_imports_exist(module, names, why):
    import importlib

    mod = importlib.import_module(module)
    missing = [n for n in names if not hasattr(mod, n)]
    assert not missing, f"{module} lacks {missing}; fedhf needs them for {why}"


def test_workflow_state_has_the_fields_fedhf_fills():
    from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState

    state = WorkflowState()
    for field in ("sampled_node_ids", "active_node_ids", "num_shares", "threshold"):
        assert hasattr(state, field), field
