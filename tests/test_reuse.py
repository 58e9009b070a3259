"""A client process reuses its built models across rounds and partitions (issue 19): reset to exactly what
build_model makes, keyed on everything that defines them, bounded, and never reused after a failure. A reused
model gives the same update, to the bit, as a freshly built one."""

from __future__ import annotations

import numpy as np
import torch

from fedhf.federation.reuse import ModelShelf
from fedhf.tasks.model import build_model, get_adapter_state, train_only

from .test_personalization import LABELS, config, data, one_round  # noqa: F401  (data: the fixture)


def adapter(model) -> dict[str, tuple[torch.Tensor, bool]]:
    return {
        n: (p.detach().clone(), p.requires_grad)
        for n, p in model.named_parameters()
        if "lora_" in n or "modules_to_save" in n
    }


def test_a_reused_model_is_reset_to_what_build_model_makes(tiny_model_dir, data):  # noqa: F811
    cfg = config(tiny_model_dir, data, **{"personalization.mode": "fedrep"})
    shelf = ModelShelf(size=2)
    model = shelf.take(cfg, LABELS)
    fresh = adapter(build_model(cfg, LABELS))
    # what a round leaves behind: moved weights, fedrep's phase flags, gradients and Opacus' per-sample gradients
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1.0)
                p.grad = torch.ones_like(p)
                p.grad_sample = torch.ones(1, *p.shape)
    train_only(model, "local")
    shelf.give_back(model)
    again = shelf.take(cfg, LABELS)
    assert again is model and (shelf.built, shelf.reused) == (1, 1)
    now = adapter(again)
    assert set(now) == set(fresh)
    for name, (value, trains) in fresh.items():
        assert torch.equal(now[name][0], value) and now[name][1] == trains, name
    assert all(p.grad is None and not hasattr(p, "grad_sample") for p in again.parameters())


def test_the_shelf_is_keyed_on_what_defines_a_model_bounded_and_skips_failed_work(tiny_model_dir, data):  # noqa: F811
    shelf = ModelShelf(size=2)
    base = config(tiny_model_dir, data)
    other_r = config(tiny_model_dir, data, **{"model.lora.r": 4})
    m = shelf.take(base, LABELS)
    shelf.give_back(m)
    assert shelf.take(base, ["pos", "neg"]) is not m  # other labels: another model
    assert shelf.take(other_r, LABELS) is not m and shelf.take(base, LABELS, rank=2) is not m
    assert shelf.take(base, LABELS) is m  # taken: not on the shelf until given back
    assert shelf.take(base, LABELS) is not m  # ... so a second borrower (or one after a failure) gets a new one
    for cfg in (base, other_r, config(tiny_model_dir, data, seed=7)):
        shelf.give_back(shelf.take(cfg, LABELS))
    assert len(shelf._shelf) == 2  # bounded: the least recently used left


def test_a_reused_model_sends_the_same_update_as_a_fresh_one(tiny_model_dir, data, tmp_path, monkeypatch):  # noqa: F811
    """train_round for partition 0, then partition 1 (on the reused model), then partition 0 again: the second
    reply of partition 0 equals the first to the bit (non-DP training is seeded per run, round and partition)."""
    import fedhf.federation.client as client

    shelf = ModelShelf()
    monkeypatch.setattr(client, "SHELF", shelf)
    cfg = config(tiny_model_dir, data)
    start = {k: v.clone() for k, v in get_adapter_state(build_model(cfg, LABELS)).items()}
    first = one_round(cfg, tmp_path / "s", start, pid=0)
    one_round(cfg, tmp_path / "s", start, pid=1)
    second = one_round(cfg, tmp_path / "s", start, pid=0)
    assert shelf.reused == 2 and shelf.built == 1
    assert set(first.state) == set(second.state)
    for k in first.state:
        assert np.array_equal(np.asarray(first.state[k]), np.asarray(second.state[k])), k
    assert first.metrics == second.metrics


def batches(loader) -> list[dict[str, list]]:
    return [{k: v.tolist() for k, v in b.items()} for b in loader]


def test_tokenized_rows_are_reused_only_for_the_same_data_tokenizer_and_options(tiny_model_dir, monkeypatch):
    import datasets
    from transformers import AutoTokenizer

    from fedhf.tasks import text_classification as tc
    from fedhf.tasks.base import TokenizedRows

    cache = TokenizedRows(size=3)
    monkeypatch.setattr(tc, "TOKENIZED", cache)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    texts = [f"row {i} " + "word " * (i % 7) for i in range(20)]
    ds = datasets.Dataset.from_dict({"text": texts, "label": [i % 2 for i in range(20)]})

    first = batches(tc.make_loader(ds, tok, 16, 4, shuffle=True, seed=3))
    again = batches(tc.make_loader(ds, tok, 16, 4, shuffle=True, seed=3))
    assert (cache.built, cache.reused) == (1, 1) and again == first
    # what a fresh process would tokenize: the same batches
    fresh = TokenizedRows()
    monkeypatch.setattr(tc, "TOKENIZED", fresh)
    assert batches(tc.make_loader(ds, tok, 16, 4, shuffle=True, seed=3)) == first and fresh.built == 1
    monkeypatch.setattr(tc, "TOKENIZED", cache)

    # a sorted (evaluation) loader does not reorder the shared rows
    tc.make_loader(ds, tok, 16, 4, shuffle=False, sort_by_length=True)
    assert batches(tc.make_loader(ds, tok, 16, 4, shuffle=False)) == batches(
        tc.make_loader(ds, tok, 16, 4, shuffle=False)
    )
    assert batches(tc.make_loader(ds, tok, 16, 20, shuffle=False))[0]["labels"] == [i % 2 for i in range(20)]

    built = cache.built
    short = batches(tc.make_loader(ds, tok, 5, 4, shuffle=False))  # another max length: tokenized again
    assert cache.built == built + 1 and max(len(b["input_ids"][0]) for b in short) == 5
    part = ds.select(range(6))  # other rows: tokenized again; the same selection again: reused
    tc.make_loader(part, tok, 16, 4, shuffle=False)
    tc.make_loader(ds.select(range(6)), tok, 16, 4, shuffle=False)
    assert cache.built == built + 2
    other = AutoTokenizer.from_pretrained(tiny_model_dir, truncation_side="left")  # same name, other tokenizer
    left = batches(tc.make_loader(ds, other, 5, 20, shuffle=False))
    assert cache.built == built + 3 and left != short
    assert len(cache._rows) == 3  # bounded
    rows = [{"text": "not a datasets.Dataset", "label": 0}]
    assert TokenizedRows().get(rows, tok, (), lambda: ["built"]) == ["built"]  # no fingerprint: never kept


def test_a_tokenizer_with_added_tokens_or_another_template_gets_another_key(tiny_model_dir):
    from transformers import AutoTokenizer

    from fedhf.tasks.base import tokenizer_key

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    key = tokenizer_key(tok)
    tok("some text", truncation=True, max_length=3)  # leaves truncation set on the backend: not part of the key
    assert tokenizer_key(tok) == key
    tok.chat_template = "{{ messages }}"
    templated = tokenizer_key(tok)
    assert templated != key
    tok.add_tokens(["zzqx"])
    assert tokenizer_key(tok) not in (key, templated)
