"""Personalization (personalization.mode): what each mode keeps on the client, what it sends, what it spends."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedhf.config.schema import parse_config
from fedhf.errors import FedHFConfigError, Malformed
from fedhf.federation.client import RoundRequest, data_key, train_round
from fedhf.federation.node import Node
from fedhf.federation.node_state import SpendStore
from fedhf.federation.personal import final_round
from fedhf.federation.replies import screen_personalize
from fedhf.privacy.dp import dp_epochs, epsilon_of, plan_for, sampling
from fedhf.tasks.model import build_model, get_adapter_state, stays_local, train_only, travels
from fedhf.train.loop import Pull

from .conftest import synthetic_rows, write_tsv

LABELS = ["negative", "positive"]
UID = "run0personal"


@pytest.fixture()
def data(tmp_path):
    d = tmp_path / "data"
    write_tsv(d / "train.tsv", synthetic_rows(120, seed=3), ["text", "label"])
    write_tsv(d / "test.tsv", synthetic_rows(20, seed=4), ["text", "label"])
    return d


def config(model_dir, data_dir, **flat):
    return parse_config(
        {
            "model.name": str(model_dir),
            "data.dataset": str(data_dir),
            "data.max-length": 24,
            "data.local-eval-fraction": 0.2,
            "num-server-rounds": 2,
            "train.local-epochs": 1,
            "train.lr": 0.01,
            **flat,
        }
    )


def request(cfg, server_round=1):
    return RoundRequest(cfg, server_round, UID, f"digest-{server_round}", False, None)


def one_round(cfg, state_root, global_state, server_round=1, node_config=None, pid=0):
    return train_round(
        request(cfg, server_round),
        Node(pid, 2, None),
        global_state,
        node_config=node_config or {},
        state_root=state_root,
    )


def as_tensors(arrays):
    return {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}


def test_which_tensors_stay_local_travel_and_train(tiny_model_dir, data):
    lora = get_adapter_state(build_model(config(tiny_model_dir, data), LABELS))
    head = {k for k in lora if ".lora_" not in k}
    b = {k for k in lora if ".lora_B." in k}
    assert head and b
    for keep, local in (("head", head), ("head+lora-b", head | b)):
        cfg = config(tiny_model_dir, data, **{"personalization.mode": "fedrep", "personalization.keep-local": keep})
        model = build_model(cfg, LABELS)
        assert set(get_adapter_state(model)) == set(lora) - local
        assert set(get_adapter_state(model, "local")) == local
        assert set(get_adapter_state(model, "trained")) == set(lora)
        assert {k for k in lora if stays_local(k, keep)} == local and not any(travels(k, "lora", keep) for k in local)
        train_only(model, "local")
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable and all(stays_local(n, keep) for n in trainable)
        train_only(model, "travels")
        assert all(not stays_local(n, keep) for n, p in model.named_parameters() if p.requires_grad)
    # without fedrep nothing stays local: the whole adapter travels
    assert set(get_adapter_state(build_model(config(tiny_model_dir, data), LABELS), "local")) == set()


def test_fedreps_local_head_never_leaves_the_client_and_carries_over_rounds(tiny_model_dir, data, tmp_path):
    cfg = config(tiny_model_dir, data, **{"personalization.mode": "fedrep"})
    server = build_model(cfg, LABELS)
    global_state = get_adapter_state(server)
    seed_head = get_adapter_state(server, "local")
    out = one_round(cfg, tmp_path, global_state)
    assert out.info["status"] == "trained" and set(out.state) == set(global_state)  # no head in the reply
    assert not any("classifier" in k for k in out.state) and not any("classifier" in str(v) for v in out.info.values())
    store = SpendStore(tmp_path, data_key(cfg, Node(0, 2, None)))
    head1 = store.load_personal(UID, "local")
    assert set(head1) == set(seed_head) and not all(np.array_equal(head1[k], seed_head[k].numpy()) for k in head1)
    # round 2 starts from the node's own head, not the seed's: it moves on from round 1's
    one_round(cfg, tmp_path, as_tensors(out.state), server_round=2)
    head2 = store.load_personal(UID, "local")
    assert not all(np.array_equal(head1[k], head2[k]) for k in head1)
    # FedRep's two phases: the head trained with the body frozen, then the body with the head frozen
    assert out.info["train-steps"] == 2 * sampling(48, 16, 1)[1]


def test_dittos_personal_adapter_does_not_change_what_the_client_sends(tiny_model_dir, data, tmp_path):
    plain = config(tiny_model_dir, data)
    ditto = config(tiny_model_dir, data, **{"personalization.mode": "ditto", "personalization.ditto-lambda": 5.0})
    global_state = get_adapter_state(build_model(plain, LABELS))
    sent_plain = one_round(plain, tmp_path / "plain", global_state).state
    sent_ditto = one_round(ditto, tmp_path / "ditto", global_state).state
    assert set(sent_plain) == set(sent_ditto)
    assert all(np.array_equal(sent_plain[k], sent_ditto[k]) for k in sent_plain)  # the global side is untouched
    store = SpendStore(tmp_path / "ditto", data_key(ditto, Node(0, 2, None)))
    personal = store.load_personal(UID, "ditto")
    assert set(personal) == set(sent_ditto) and not all(np.array_equal(personal[k], sent_ditto[k]) for k in personal)
    # a node whose personal adapter is far off still sends the same update
    store.save_personal(UID, "ditto", {k: v * 0 + 3.0 for k, v in personal.items()})
    again = one_round(ditto, tmp_path / "ditto", global_state).state
    assert all(np.array_equal(again[k], sent_ditto[k]) for k in again)


def test_dittos_pull_is_a_decoupled_step_toward_the_global_adapter():
    p = torch.nn.Parameter(torch.tensor([1.0, -3.0]))
    anchor = torch.tensor([0.0, 1.0])
    Pull([(p, anchor)], 0.25)()
    assert torch.allclose(p.detach(), torch.tensor([0.75, -2.0]))  # p - 0.25 * (p - anchor)
    Pull([(p, anchor)], 1.0)()
    assert torch.equal(p.detach(), anchor)


def test_finetune_measures_three_adapters_and_keeps_the_personal_one_on_the_node(tiny_model_dir, data, tmp_path):
    cfg = config(tiny_model_dir, data, **{"personalization.mode": "finetune", "personalization.epochs": 2})
    global_state = get_adapter_state(build_model(cfg, LABELS))
    before = {k: v.clone() for k, v in global_state.items()}
    metrics, info = final_round(request(cfg, 3), Node(1, 2, None), global_state, node_config={}, state_root=tmp_path)
    assert info["status"] == "personalized" and metrics["num-examples"] == 12
    for stage in ("federated", "personalized", "local-only"):
        assert 0 <= metrics[f"{stage}-accuracy"] <= 1 and metrics[f"{stage}-loss"] > 0
    assert metrics["personalized-loss"] != metrics["federated-loss"]
    # 2 personal epochs, then rounds x local epochs for the local-only baseline
    assert info["train-steps"] == sampling(48, 16, 2 + 2 * 1)[1]
    assert all(torch.equal(global_state[k], before[k]) for k in before)  # the global adapter is left alone
    saved = SpendStore(tmp_path, data_key(cfg, Node(1, 2, None))).load_personal(UID, "finetune")
    assert set(saved) == set(global_state)
    screened = screen_personalize(metrics, info, node_id=7, sample_level=False)
    assert screened.record["personalized-f1"] == metrics["personalized-f1"]


def test_a_node_that_does_not_share_local_eval_reports_no_metrics(tiny_model_dir, data, tmp_path):
    cfg = config(tiny_model_dir, data, **{"personalization.mode": "finetune", "personalization.local-only": False})
    metrics, info = final_round(
        request(cfg, 3),
        Node(0, 2, None),
        get_adapter_state(build_model(cfg, LABELS)),
        node_config={"share": "num-examples"},
        state_root=tmp_path,
    )
    assert metrics == {} and info["status"] == "not-shared" and "handler-seconds" not in info


def test_dp_accounting_covers_every_personal_step(tiny_model_dir, data, tmp_path):
    flat = {
        "privacy.mode": "sample",
        "privacy.target-epsilon": 6.0,
        "train.batch-size": 16,
        "personalization.mode": "ditto",
        "personalization.epochs": 2,
    }
    cfg = config(tiny_model_dir, data, **flat)
    n = 48
    per_round, final = dp_epochs(cfg)
    assert (per_round, final) == (1 + 2, 2 * 1)  # ditto's epochs each round; the local-only baseline at the end
    plan = plan_for(cfg, n)
    q, steps = sampling(n, 16, per_round)
    assert plan.total_steps == 2 * steps + sampling(n, 16, final)[1]
    # sigma covers the personal steps: larger than for the rounds alone
    assert (
        plan.noise_multiplier
        > plan_for(config(tiny_model_dir, data, **{**flat, "personalization.mode": "none"}), n).noise_multiplier
    )
    node = Node(0, 2, None)
    state = get_adapter_state(build_model(cfg, LABELS))
    for r in (1, 2):
        out = one_round(cfg, tmp_path, state, server_round=r)
        assert out.info["steps"] == r * steps and out.info["train-steps"] == steps
        state = as_tensors(out.state)
    metrics, info = final_round(request(cfg, 3), node, state, node_config={"share": "local-eval"}, state_root=tmp_path)
    assert info["status"] == "personalized" and "personalized-f1" in metrics
    assert info["steps"] == plan.total_steps and info["accountant-id"] == out.info["accountant-id"]
    assert info["epsilon"] == pytest.approx(
        epsilon_of("rdp", [(plan.noise_multiplier, q, plan.total_steps)], info["delta"])
    )
    assert out.info["epsilon"] < info["epsilon"] <= 6.0 * 1.01
    with SpendStore(tmp_path, data_key(cfg, node)).transaction() as spend:
        assert sum(e["steps"] for e in spend.entries) == plan.total_steps  # every step was reserved before it was taken
    screened = screen_personalize(metrics, info, node_id=1, sample_level=True)
    assert screened.privacy["steps"] == plan.total_steps
    with pytest.raises(Malformed, match="privacy accounting"):
        screen_personalize(metrics, {k: v for k, v in info.items() if k != "epsilon"}, node_id=1, sample_level=True)
    with pytest.raises(Malformed, match="above the node's own budget"):
        screen_personalize(metrics, {**info, "max-epsilon": info["epsilon"] / 2}, node_id=1, sample_level=True)


def test_a_personalization_stage_past_the_run_budget_is_refused_before_it_spends(tiny_model_dir, data, tmp_path):
    flat = {"privacy.mode": "sample", "privacy.noise-multiplier": 0.6, "personalization.mode": "finetune"}
    cfg = config(tiny_model_dir, data, **flat)
    state = get_adapter_state(build_model(cfg, LABELS))
    out = one_round(cfg, tmp_path, state)
    budget = out.info["epsilon"] * 1.05  # room for the rounds' spend, not for the stage after them
    tight = config(tiny_model_dir, data, **flat, **{"privacy.max-epsilon": budget})
    metrics, info = final_round(request(tight, 3), Node(0, 2, None), state, node_config={}, state_root=tmp_path)
    assert metrics == {} and info["status"] == "refused" and info["rule"] == "privacy.max-epsilon"
    with SpendStore(tmp_path, data_key(cfg, Node(0, 2, None))).transaction() as spend:
        assert [e["round"] for e in spend.entries] == [1]


def test_personalization_replies_are_screened(tiny_model_dir):
    good = {"num-examples": 10, "personalized-f1": 0.5, "personalized-accuracy": 0.5, "personalized-loss": 0.7}
    assert screen_personalize(good, {"partition-id": 1, "status": "personalized"}, node_id=1, sample_level=False)
    for metrics, info, why in (
        (good, {"partition-id": 1, "status": "not-shared"}, "must not carry metrics"),
        ({**good, "colour": 1.0}, {"partition-id": 1, "status": "personalized"}, "unexpected field 'colour'"),
        ({**good, "personalized-f1": 1.5}, {"partition-id": 1, "status": "personalized"}, r"must be in \[0, 1\]"),
        ({}, {"partition-id": 1, "status": "refused"}, "must name its 'rule'"),
        ({}, {"partition-id": 1, "status": "trained"}, "status"),
        ({}, {"partition-id": 1, "status": "personalized", "train-steps": 3}, "num-examples"),
    ):
        with pytest.raises(Malformed, match=why):
            screen_personalize(metrics, info, node_id=1, sample_level=False)


def test_bad_personalization_settings_get_one_clear_error(tiny_model_dir, data):
    with pytest.raises(FedHFConfigError, match=r"personalization.mode.*'fedavg'.*none, finetune, fedrep, ditto"):
        config(tiny_model_dir, data, **{"personalization.mode": "fedavg"})
    with pytest.raises(
        FedHFConfigError, match=r"personalization.keep-local.*model.adapter='head'.*nothing to federate"
    ):
        config(tiny_model_dir, data, **{"personalization.mode": "fedrep", "model.adapter": "head"})
    with pytest.raises(FedHFConfigError, match=r"keep-local.*'head\+lora-b'.*ffa-lora"):
        config(
            tiny_model_dir,
            data,
            **{
                "personalization.mode": "fedrep",
                "personalization.keep-local": "head+lora-b",
                "model.adapter": "ffa-lora",
            },
        )
    with pytest.raises(FedHFConfigError, match=r"personalization.epochs.*>= 1"):
        config(tiny_model_dir, data, **{"personalization.epochs": 0})


def test_fedrep_measures_the_clients_own_heads_and_releases_no_trained_head(tiny_model_dir, data, tmp_path):
    from peft import get_peft_model_state_dict

    from fedhf.tasks.model import set_adapter_state

    cfg = config(tiny_model_dir, data, **{"personalization.mode": "fedrep", "personalization.local-only": False})
    server = build_model(cfg, LABELS)
    seed_head = get_adapter_state(server, "local")
    out = one_round(cfg, tmp_path, get_adapter_state(server))
    global_state = as_tensors(out.state)
    set_adapter_state(server, global_state)  # what the server does with the aggregate: the head is not in it
    released = get_peft_model_state_dict(server)
    assert all(torch.equal(released[k], v) for k, v in seed_head.items())  # the seed's head, never trained
    metrics, info = final_round(request(cfg, 3), Node(0, 2, None), global_state, node_config={}, state_root=tmp_path)
    assert info["status"] == "personalized" and info["train-steps"] == 0  # nothing trained after the rounds
    assert "personalized-f1" in metrics and not any(k.startswith(("federated-", "local-only-")) for k in metrics)
    # a node that never trained in the run has no head of its own to measure
    metrics, info = final_round(request(cfg, 3), Node(1, 2, None), global_state, node_config={}, state_root=tmp_path)
    assert metrics == {} and info["status"] == "no-personal-state"


def test_fedreps_local_evaluation_reads_the_nodes_own_head(tiny_model_dir, data, tmp_path):
    from fedhf.federation.client import evaluate_round

    cfg = config(tiny_model_dir, data, **{"personalization.mode": "fedrep", "train.lr": 0.05})
    global_state = get_adapter_state(build_model(cfg, LABELS))
    node = Node(0, 2, None)
    before, _ = evaluate_round(cfg, node, global_state, None, {}, state_root=tmp_path, run_uid=UID)
    out = one_round(cfg, tmp_path, global_state)
    after, _ = evaluate_round(cfg, node, as_tensors(out.state), None, {}, state_root=tmp_path, run_uid=UID)
    seed_head, _ = evaluate_round(cfg, node, as_tensors(out.state), None, {}, state_root=tmp_path / "none", run_uid=UID)
    assert after["eval-loss"] != seed_head["eval-loss"] and before["eval-loss"] == pytest.approx(
        evaluate_round(cfg, node, global_state, None, {})[0]["eval-loss"]
    )


def test_personalization_lr_sets_the_personal_steps_and_leaves_the_local_only_baseline(tiny_model_dir, data, tmp_path):
    flat = {"personalization.mode": "finetune"}
    state = get_adapter_state(build_model(config(tiny_model_dir, data, **flat), LABELS))
    runs = {}
    for name, lr in (("default", {}), ("tiny", {"personalization.lr": 1e-12})):
        cfg = config(tiny_model_dir, data, **flat, **lr)
        runs[name], _ = final_round(
            request(cfg, 3), Node(0, 2, None), state, node_config={}, state_root=tmp_path / name
        )
    tiny, default = runs["tiny"], runs["default"]
    assert tiny["personalized-loss"] == pytest.approx(tiny["federated-loss"], abs=1e-6)  # a step of 1e-12 moves nothing
    assert default["personalized-loss"] != pytest.approx(default["federated-loss"], abs=1e-6)
    assert tiny["local-only-loss"] == default["local-only-loss"]  # the baseline trains at train.lr either way
