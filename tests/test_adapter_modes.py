"""model.adapter: what trains and travels (lora, ffa-lora, head); FFA-LoRA averages the clients' updates exactly."""

from __future__ import annotations

import warnings

import datasets
import pytest
import torch

from fedhf.config.schema import parse_config
from fedhf.errors import FedHFConfigError
from fedhf.privacy.dp import SampleAccount, private_train
from fedhf.tasks.model import build_model, get_adapter_state, load_tokenizer, set_adapter_state, travels
from fedhf.tasks.text_classification import TextClassification, make_loader
from fedhf.train.loop import train_local
from tests.conftest import synthetic_rows

LABELS = ["negative", "positive"]
TASK = TextClassification()


def cfg_for(model_dir, adapter, **flat):
    return parse_config({"model.name": str(model_dir), "model.adapter": adapter, **flat})


def rows(n, seed):
    rs = synthetic_rows(n, seed=seed)
    return datasets.Dataset.from_dict(
        {"text": [r["text"] for r in rs], "label": [LABELS.index(r["label"]) for r in rs]}
    )


def lora_layers(model):
    """(A, B, scaling) of every LoRA layer, by module name."""
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            out[name] = (
                module.lora_A["default"].weight.detach().clone(),
                module.lora_B["default"].weight.detach().clone(),
                module.scaling["default"],
            )
    return out


def trained_state(model_dir, adapter, seed_rows, **flat):
    cfg = cfg_for(model_dir, adapter, **flat)
    model = build_model(cfg, LABELS)
    tok = load_tokenizer(cfg.model.name)
    train_local(model, make_loader(rows(24, seed_rows), tok, 32, 8, shuffle=False), task=TASK, epochs=2, lr=0.05)
    return model, get_adapter_state(model)


def test_what_travels_by_mode(tiny_model_dir):
    modes = ("lora", "ffa-lora", "head")
    states = {a: get_adapter_state(build_model(cfg_for(tiny_model_dir, a), LABELS)) for a in modes}
    lora, ffa, head = (set(states[a]) for a in ("lora", "ffa-lora", "head"))
    a_keys = {k for k in lora if ".lora_A." in k}
    b_keys = {k for k in lora if ".lora_B." in k}
    assert a_keys and b_keys and ffa == lora - a_keys and head == lora - a_keys - b_keys
    assert head and all("classifier" in k or "score" in k for k in head)
    for a, keys in (("lora", lora), ("ffa-lora", ffa), ("head", head)):
        model = build_model(cfg_for(tiny_model_dir, a), LABELS)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert all(travels(n, a) for n in trainable) and len(trainable) == len(keys), a
    with pytest.raises(FedHFConfigError, match="model.adapter.*'ffa'.*lora, ffa-lora, head"):
        cfg_for(tiny_model_dir, "ffa")


def test_ffa_lora_averages_the_clients_updates_exactly(tiny_model_dir):
    """A stays where the seed put it on every client, so the average of B (and of the head) is the average of
    the clients' updates B·A: FedAvg of FFA-LoRA is exact, where FedAvg of plain LoRA is not."""
    clients = [trained_state(tiny_model_dir, "ffa-lora", seed) for seed in (1, 2, 3)]
    start = lora_layers(build_model(cfg_for(tiny_model_dir, "ffa-lora"), LABELS))
    for model, _ in clients:  # A frozen and identical everywhere; B moved
        for name, (a, b, _s) in lora_layers(model).items():
            assert torch.equal(a, start[name][0]) and not torch.equal(b, start[name][1])
    states = [s for _, s in clients]
    mean = {k: torch.stack([s[k] for s in states]).mean(0) for k in states[0]}
    server = build_model(cfg_for(tiny_model_dir, "ffa-lora"), LABELS)
    set_adapter_state(server, mean)
    for name, (a, b, scaling) in lora_layers(server).items():
        want = torch.stack([lora_layers(m)[name][1] @ lora_layers(m)[name][0] for m, _ in clients]).mean(0)
        assert torch.allclose(scaling * b @ a, scaling * want, atol=1e-7), name
    # plain LoRA: the average of the products is not the product of the averages
    plain = [trained_state(tiny_model_dir, "lora", seed) for seed in (1, 2, 3)]
    name = next(iter(lora_layers(plain[0][0])))
    layers = [lora_layers(m)[name] for m, _ in plain]
    product_of_means = torch.stack([b for _, b, _ in layers]).mean(0) @ torch.stack([a for a, _, _ in layers]).mean(0)
    mean_of_products = torch.stack([b @ a for a, b, _ in layers]).mean(0)
    assert (product_of_means - mean_of_products).abs().max() > 1e-6


def test_head_mode_trains_and_sends_the_head_alone_also_under_dp(tiny_model_dir):
    cfg = cfg_for(tiny_model_dir, "head")
    model = build_model(cfg, LABELS)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tok = load_tokenizer(cfg.model.name)
    account = SampleAccount("rdp", 1e-3, 1.0, 1.0)
    loader = make_loader(rows(24, 4), tok, 32, 8, shuffle=False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        out = private_train(model, loader, account, task=TASK, epochs=1, lr=0.5)
    assert not [w for w in seen if "Full backward hook" in str(w.message)]  # filtered at its one harmless cause
    assert out.account.steps == 3
    moved = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert moved and all("classifier" in n for n in moved)
    state = get_adapter_state(model)
    assert set(state) == {k for k in state if "classifier" in k}
    with pytest.raises(Exception, match="missing"):
        set_adapter_state(build_model(cfg_for(tiny_model_dir, "lora"), LABELS), state)  # a lora model wants A and B
