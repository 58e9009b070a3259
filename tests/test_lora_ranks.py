"""Heterogeneous-rank LoRA (strategy.lora-aggregation = svd): products averaged, each client given its rank."""

from __future__ import annotations

import numpy as np
import pytest

from fedhf.config.schema import parse_config
from fedhf.errors import FedHFConfigError
from fedhf.federation.client import RoundRequest, train_round
from fedhf.federation.lora_ranks import aggregate_products, lora_pairs, pad, rank_of, truncate
from fedhf.federation.node import Node, load_node_config_file
from fedhf.federation.updates import encode
from fedhf.flower.strategy import build_strategy
from fedhf.tasks.model import build_model, get_adapter_state

from .conftest import synthetic_rows, write_tsv

LABELS = ["negative", "positive"]
OUT, IN = 12, 10
KEY = "base_model.model.layer.0.query"


def lora_state(rank, seed, head=True):
    rng = np.random.default_rng(seed)
    state = {
        f"{KEY}.lora_A.weight": rng.normal(size=(rank, IN)).astype(np.float32),
        f"{KEY}.lora_B.weight": rng.normal(size=(OUT, rank)).astype(np.float32),
    }
    if head:
        state["base_model.model.classifier.weight"] = rng.normal(size=(2, 4)).astype(np.float32)
    return state


def product(state):
    a, b = (np.asarray(state[k], np.float64) for k in (f"{KEY}.lora_A.weight", f"{KEY}.lora_B.weight"))
    return b @ a


def best_rank(p, r):
    u, s, vt = np.linalg.svd(p, full_matrices=False)
    return (u[:, :r] * s[:r]) @ vt[:r], np.sqrt(np.sum(s[r:] ** 2))


def test_the_aggregate_is_the_svd_truncation_of_the_averaged_product():
    clients = [pad(lora_state(r, seed), 8) for r, seed in ((2, 1), (4, 2), (8, 3))]
    weights = [10.0, 30.0, 60.0]
    merged = aggregate_products(clients, weights, rank=8)
    assert rank_of(merged) == 8
    mean = sum(w * product(c) for w, c in zip(weights, clients, strict=True)) / sum(weights)
    want, tail = best_rank(mean, 8)  # the mean of ranks 2 + 4 + 8 has rank 10 > 8: truncation matters
    assert tail > 1e-3
    assert np.allclose(product(merged), want, atol=1e-5)
    assert np.linalg.norm(mean - product(merged)) == pytest.approx(tail, rel=1e-5)  # Eckart-Young: the best
    head = "base_model.model.classifier.weight"
    assert np.allclose(merged[head], sum(w * c[head] for w, c in zip(weights, clients, strict=True)) / 100, atol=1e-6)


def test_each_client_gets_its_rank_back_as_the_truncation_of_the_global_product():
    global_state = lora_state(8, 4)
    for r in (2, 4, 8):
        mine = truncate(global_state, r)
        assert rank_of(mine) == r and mine[f"{KEY}.lora_B.weight"].shape == (OUT, r)
        assert np.allclose(product(mine), best_rank(product(global_state), r)[0], atol=1e-5)
    assert all(np.array_equal(truncate(global_state, 8)[k], v) for k, v in global_state.items())  # its own rank
    # padding keeps the product, so the server can average a rank-2 client with the rest
    assert np.allclose(product(pad(truncate(global_state, 2), 8)), product(truncate(global_state, 2)))


def test_before_any_update_a_client_takes_the_seeds_a_rows_and_b_zero():
    seed = lora_state(8, 5)
    seed[f"{KEY}.lora_B.weight"][:] = 0
    mine = truncate(seed, 3)
    assert np.array_equal(mine[f"{KEY}.lora_A.weight"], seed[f"{KEY}.lora_A.weight"][:3])
    assert not mine[f"{KEY}.lora_B.weight"].any()


def test_the_truncation_does_not_depend_on_how_the_product_is_factored():
    """The server rebuilds a client's start to decode its fp16 / int8 update: signs and rotations must not matter."""
    g = lora_state(6, 6)
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(6, 6)))  # B A = (B Q)(Q^T A)
    other = {
        **g,
        f"{KEY}.lora_B.weight": g[f"{KEY}.lora_B.weight"] @ q,
        f"{KEY}.lora_A.weight": q.T @ g[f"{KEY}.lora_A.weight"],
    }
    one, two = truncate(g, 3), truncate(other, 3)
    assert all(np.allclose(one[k], two[k], atol=1e-5) for k in one)


def test_a_client_model_at_its_rank_keeps_the_global_scaling(tiny_model_dir):
    cfg = parse_config({"model.name": str(tiny_model_dir), "model.lora.r": 8, "model.lora.alpha": 16})
    small = build_model(cfg, LABELS, rank=2)
    layer = next(m for m in small.modules() if isinstance(getattr(m, "scaling", None), dict) and "default" in m.scaling)
    assert layer.scaling["default"] == pytest.approx(16 / 8)
    assert rank_of({k: v.numpy() for k, v in get_adapter_state(small).items()}) == 2


@pytest.fixture()
def data(tmp_path):
    d = tmp_path / "data"
    write_tsv(d / "train.tsv", synthetic_rows(80, seed=3), ["text", "label"])
    write_tsv(d / "test.tsv", synthetic_rows(20, seed=4), ["text", "label"])
    return d


def svd_config(model_dir, data_dir, **flat):
    return parse_config(
        {
            "model.name": str(model_dir),
            "data.dataset": str(data_dir),
            "data.max-length": 24,
            "train.local-epochs": 1,
            "model.lora.r": 8,
            "strategy.lora-aggregation": "svd",
            **flat,
        }
    )


def client_round(cfg, node_config, global_state, state_root):
    req = RoundRequest(cfg, 1, "run0ranks", "d", False, None)
    return train_round(req, Node(0, 2, None), global_state, node_config=node_config, state_root=state_root)


def test_a_node_at_rank_4_sends_rank_4_and_the_server_averages_it_at_the_global_rank(tiny_model_dir, data, tmp_path):
    cfg = svd_config(tiny_model_dir, data, **{"transport.dtype": "fp16"})
    server_model = build_model(cfg, LABELS)
    global_state = get_adapter_state(server_model)
    out = client_round(cfg, {"lora-rank": 4}, global_state, tmp_path)
    assert out.info["status"] == "trained" and out.info["lora-rank"] == 4
    assert {v.shape[0] for k, v in out.state.items() if ".lora_A." in k} == {4}
    strategy = build_strategy(cfg, recorder=None)
    reference = {k: v.numpy() for k, v in global_state.items()}
    from flwr.app import Array, ArrayRecord

    rec = {"transport": "fp16", "lora-rank": 4}
    reason, decoded = strategy.screen_update(ArrayRecord({k: Array(v) for k, v in out.state.items()}), rec, reference)
    assert reason is None and rec["update-norm"] > 0
    padded = {k: a.numpy() for k, a in decoded.items()}
    assert all(padded[k].shape == reference[k].shape for k in reference)  # written at the global rank
    # the fp16 update decodes onto the start the client computed: its products are what it trained
    trained = {k: v.astype(np.float32) + truncate(reference, 4)[k] for k, v in out.state.items()}
    for a_key, b_key in lora_pairs(trained).items():
        assert np.allclose(padded[b_key] @ padded[a_key], trained[b_key] @ trained[a_key], atol=1e-4)
    # a node at the run's rank sends the run's shapes
    full = client_round(cfg, {}, global_state, tmp_path / "full")
    assert full.info["lora-rank"] == 8 and all(full.state[k].shape == reference[k].shape for k in reference)
    assert encode(full.state, reference, "fp32").arrays.keys() == reference.keys()


def test_a_rank_the_run_cannot_take_is_refused_before_training(tiny_model_dir, data, tmp_path):
    state = get_adapter_state(build_model(svd_config(tiny_model_dir, data), LABELS))
    mean = svd_config(tiny_model_dir, data, **{"strategy.lora-aggregation": "mean"})
    out = client_round(mean, {"lora-rank": 4}, state, tmp_path)
    assert out.info["status"] == "refused" and out.info["rule"] == "lora-rank"
    assert "strategy.lora-aggregation=svd" in out.info["reason"] and out.state is None
    out = client_round(svd_config(tiny_model_dir, data), {"lora-rank": 16}, state, tmp_path)
    assert out.info["rule"] == "lora-rank" and "above the run's global rank model.lora.r=8" in out.info["reason"]
    nodes = tmp_path / "nodes.toml"
    nodes.write_text('[nodes.0]\nlora-rank = "four"\n')
    with pytest.raises(FedHFConfigError, match=r"node config 'lora-rank': got 'four'; give a whole number >= 1"):
        load_node_config_file(nodes, 2)


@pytest.mark.parametrize(
    ("flat", "why"),
    [
        ({"strategy.name": "fedadam"}, "strategy.name='fedadam'"),
        ({"model.adapter": "ffa-lora"}, "model.adapter='ffa-lora'"),
        ({"privacy.mode": "client"}, "privacy.mode='client'"),
        ({"strategy.secure-aggregation": True, "strategy.min-train-nodes": 2}, "secure-aggregation=true"),
        ({"personalization.mode": "fedrep", "personalization.keep-local": "head+lora-b"}, "keeps B on the clients"),
    ],
)
def test_what_svd_aggregation_does_not_compose_with_gets_one_clear_error(flat, why):
    with pytest.raises(FedHFConfigError, match=r"strategy.lora-aggregation': 'svd' cannot be used here: .*" + why):
        parse_config({"strategy.lora-aggregation": "svd", **flat})


def test_svd_aggregation_keeps_lora_under_sample_level_dp():
    cfg = parse_config({"strategy.lora-aggregation": "svd", "privacy.mode": "sample"})
    assert cfg.model.adapter == "lora" and cfg.train.optimizer == "sgd"
    assert parse_config({"privacy.mode": "sample"}).model.adapter == "ffa-lora"


def test_a_global_rank_the_layers_cannot_hold_is_refused_before_training(tiny_model_dir):
    from fedhf.apps import _check_rank

    ok = parse_config({"model.name": str(tiny_model_dir), "model.lora.r": 32, "strategy.lora-aggregation": "svd"})
    _check_rank(ok, get_adapter_state(build_model(ok, LABELS)))  # 32 x 32 query/value layers hold rank 32
    big = parse_config({"model.name": str(tiny_model_dir), "model.lora.r": 64, "strategy.lora-aggregation": "svd"})
    with pytest.raises(FedHFConfigError, match=r"'model.lora.r': got 64, above 32.*at most 32"):
        _check_rank(big, get_adapter_state(build_model(big, LABELS)))
