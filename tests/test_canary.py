"""Canaries and their exposure (issue 18, the audit of generative runs): inserted secrets are found by their rank
among random candidates, secrets the model never saw are not, and DP-SGD lowers what the model memorised."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from fedhf.analysis.canary import exposure
from fedhf.data.canaries import PREFIX, canary_record, insert_canaries, make_canaries
from fedhf.errors import FedHFDataError
from fedhf.privacy.dp import SampleAccount, private_train
from fedhf.tasks import causal_lm as C
from fedhf.tasks.tiny_lm import write_tiny_causal_lm
from tests.test_causal_lm import CORPUS, TASK, lora_model

CANDIDATES = 200  # exposure measurable up to log2(201) = 7.65 bits


def test_canaries_are_distinct_reproducible_secrets_inserted_exactly_repeats_times() -> None:
    a, b = make_canaries(5, "text", seed=7), make_canaries(5, "text", seed=7)
    assert a == b and len({c.secret for c in a}) == 5
    assert all(len(c.secret) == 9 and c.secret.isdigit() and c.record == {"text": f"{PREFIX} {c.secret}"} for c in a)
    assert make_canaries(5, "text", seed=8) != a
    rows = [{"text": t} for t in CORPUS]
    out = insert_canaries(rows, a[:2], repeats=4, seed=0)
    counts = Counter(r["text"] for r in out)
    assert len(out) == len(rows) + 8
    assert all(counts[c.record["text"]] == 4 for c in a[:2]) and all(counts[t] == 1 for t in CORPUS)
    assert canary_record("1234", "instruction")["output"] == "1234"
    assert canary_record("1234", "messages")["messages"][-1] == {"role": "assistant", "content": "1234"}


def test_bad_canary_settings_get_one_clear_error() -> None:
    with pytest.raises(FedHFDataError, match="'audit.canaries': got 0"):
        make_canaries(0, "text", seed=0)
    with pytest.raises(FedHFDataError, match="at most 3"):
        insert_canaries([{"text": "a"}] * 3, make_canaries(4, "text", seed=0), repeats=1, seed=0)
    with pytest.raises(FedHFDataError, match="'audit.canary-repeats': got 0"):
        insert_canaries([{"text": "a"}] * 3, make_canaries(1, "text", seed=0), repeats=0, seed=0)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_tiny_causal_lm(tmp_path_factory.mktemp("tiny-canary"), CORPUS * 3, family="llama", vocab_size=400)


def _train(folder: Path, rows: list[dict], dp: bool) -> tuple[torch.nn.Module, SampleAccount | None]:
    tok = AutoTokenizer.from_pretrained(folder)
    model = lora_model("llama", folder)
    trows = C.tokenize([C.to_example(r, "text", tok) for r in rows], tok, 64)
    loader = C.make_loader(trows, tok, 8, shuffle=True, seed=1)
    if dp:
        account = SampleAccount("rdp", 1e-3, 2.0, 1.0)
        out = private_train(model, loader, account, task=TASK, epochs=3, lr=0.5, optimizer_name="sgd")
        return model, out.account
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        for batch in loader:
            inputs, target = TASK.split(batch)
            loss = C.causal_loss(model(**inputs).logits, target)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model, None


def test_inserted_canaries_are_exposed_and_dp_sgd_exposes_them_less(folder) -> None:
    tok = AutoTokenizer.from_pretrained(folder)
    canaries = make_canaries(8, "text", seed=3)
    inserted, unseen = canaries[:5], canaries[5:]
    rows = insert_canaries([{"text": t} for t in CORPUS * 2], inserted, repeats=10, seed=0)

    def exposures(model: torch.nn.Module, which) -> list[float]:  # noqa: ANN001
        return [exposure(model, tok, c, "text", 64, CANDIDATES, seed=1).exposure for c in which]

    plain, _ = _train(folder, rows, dp=False)
    seen, never = exposures(plain, inserted), exposures(plain, unseen)
    top = math.log2(CANDIDATES + 1)
    assert min(seen) > 0.8 * top  # each inserted secret ranks near the top of 200 random ones
    assert sum(never) / 3 < 3.0  # an unseen secret ranks where chance puts it (about 1.4 bits)
    private, account = _train(folder, rows, dp=True)
    assert account is not None and account.steps == 3 * 12  # 90 rows at batch 8: q = 1/12
    dp_seen = exposures(private, inserted)
    assert sum(dp_seen) / 5 < sum(seen) / 5 - 2.0  # sigma 2 (epsilon about 1 per example)
    e = exposure(plain, tok, inserted[0], "text", 64, CANDIDATES, seed=1)
    assert e.max_exposure == pytest.approx(top) and 1 <= e.rank <= CANDIDATES + 1 and e.log_perplexity > 0
