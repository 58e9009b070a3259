"""The causal-LM task (issue 18, first part): records to (prompt, response), response-only labels, the loss, held-out
perplexity, generation, exact match, and DP-SGD on LoRA of tiny Llama and GPT-2 models built from a config with a
tokenizer trained here (no download)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoTokenizer

from fedhf.errors import FedHFDataError, FedHFModelError
from fedhf.privacy.dp import SampleAccount, private_train
from fedhf.tasks import causal_lm as C
from fedhf.tasks.model import _bundled_path
from fedhf.tasks.tiny_lm import write_tiny_causal_lm

ANSWERS = {"good": "positive", "great": "positive", "fine": "positive", "bad": "negative", "awful": "negative"}
# The sentiment word ends each text, next to the answer: a 2-layer model with random frozen weights learns that
# reliably through LoRA (a word far back in a long prompt it does not).
CORPUS = [f"the {c} film was {w}" for w in ANSWERS for c in ("loud", "calm", "funny", "slow")]
TASK = C.CausalLM()


def records() -> list[dict]:
    return [{"instruction": "Label the sentiment.", "input": t, "output": ANSWERS[t.split()[-1]]} for t in CORPUS]


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def tiny(request, tmp_path_factory) -> tuple[str, Path]:
    """(family, folder) of a tiny model with its own tokenizer: Llama with a chat template, GPT-2 without."""
    folder = tmp_path_factory.mktemp(f"tiny-{request.param}")
    texts = CORPUS + [C.ALPACA_PROMPT_INPUT.format(instruction="Label the sentiment.", input=t) for t in CORPUS]
    texts += [f"it was {a}" for a in ANSWERS.values()] + [C.instruction_for(["negative", "positive"])]
    write_tiny_causal_lm(folder, texts * 3, family=request.param, vocab_size=400, hidden=64)
    return request.param, folder


def lora_model(family: str, folder: Path, seed: int = 0):  # noqa: ANN201
    torch.manual_seed(seed)
    base = TASK.load_base(str(folder))
    cfg = LoraConfig(
        task_type=TASK.peft_task_type,
        r=4,
        lora_alpha=8,
        target_modules=C.lora_targets(family, mlp=True),
        **C.lora_options(family),
    )
    return get_peft_model(base, cfg)


def test_the_record_format_is_detected_and_unknown_columns_get_one_error() -> None:
    assert C.detect_format(["messages", "id"]) == "messages"
    assert C.detect_format(["instruction", "input", "output"]) == "instruction"
    assert C.detect_format(["text", "label"]) == "text"
    with pytest.raises(FedHFDataError, match=r"data.format 'auto'.*prompt, reply.*'messages'"):
        C.detect_format(["prompt", "reply"])
    assert C.check_columns(["instruction", "output"], "auto") == "instruction"
    with pytest.raises(FedHFDataError, match=r"data.format 'instruction' needs the column\(s\) output.*it has input"):
        C.check_columns(["instruction", "input"], "instruction")
    with pytest.raises(FedHFDataError, match="config key 'data.format': got 'alpaca'"):
        C.check_columns(["text"], "alpaca")


def test_response_only_labels_mask_exactly_the_prompt(tiny) -> None:
    family, folder = tiny
    tok = AutoTokenizer.from_pretrained(folder)
    assert C.has_chat_template(tok) == (family == "llama")
    rec = records()[0]
    ex = C.to_example(rec, "instruction", tok)
    assert ex.prompt == C.prompt_of(rec, "instruction", tok)  # what generation starts from is what training masks
    assert ex.response.startswith("positive") and tok.eos_token in ex.response
    (row,) = C.tokenize([ex], tok, max_length=200)
    prompt_len = row["labels"].index(next(t for t in row["labels"] if t != C.IGNORE))
    assert prompt_len > 5 and all(t == C.IGNORE for t in row["labels"][:prompt_len])
    assert row["labels"][prompt_len:] == row["input_ids"][prompt_len:]
    assert tok.decode(row["input_ids"][prompt_len:], skip_special_tokens=True).strip() == "positive"
    (full,) = C.tokenize([ex], tok, max_length=200, response_only=False)
    assert full["labels"] == full["input_ids"] == row["input_ids"]


def test_chats_train_on_the_last_assistant_turn_only(tiny) -> None:
    _, folder = tiny
    tok = AutoTokenizer.from_pretrained(folder)
    chat = {
        "messages": [
            {"role": "user", "content": "the film was good"},
            {"role": "assistant", "content": "noted"},
            {"role": "user", "content": "and its sentiment?"},
            {"role": "assistant", "content": "positive"},
        ]
    }
    ex = C.to_example(chat, "messages", tok)
    assert "noted" in ex.prompt and "positive" not in ex.prompt and ex.response.startswith("positive")
    with pytest.raises(FedHFDataError, match="must end with the assistant's turn"):
        C.to_example({"messages": chat["messages"][:3]}, "messages", tok)


def test_bad_examples_get_one_error_that_names_the_key_and_carries_no_row_text(tiny) -> None:
    _, folder = tiny
    tok = AutoTokenizer.from_pretrained(folder)
    exs = [C.to_example(r, "instruction", tok) for r in records()]
    longest = max(len(C.tokenize([e], tok, 500)[0]["input_ids"]) for e in exs)
    with pytest.raises(FedHFDataError, match=r"data.max-length': 8 tokens leave no room .* 20 of 20") as err:
        C.tokenize(exs, tok, max_length=8)
    assert "film" not in str(err.value)
    assert len(C.tokenize(exs, tok, max_length=longest)) == 20
    empty = C.Example(exs[0].prompt, "")
    with pytest.raises(FedHFDataError, match="1 of 2 examples have no response token"):
        C.tokenize([exs[0], empty], tok, max_length=200)


def test_an_encoder_is_refused_under_the_causal_lm_task() -> None:
    minilm = _bundled_path("sentence-transformers/all-MiniLM-L6-v2")
    assert minilm is not None
    with pytest.raises(FedHFModelError, match="'bert' model without a causal-LM head.*text-classification"):
        TASK.load_base(minilm)
    with pytest.raises(FedHFModelError, match="no default LoRA targets for 'bert'"):
        C.lora_targets("bert")


def test_lora_on_the_embeddings_or_the_lm_head_is_refused_and_auto_targets_leave_both_frozen(tiny) -> None:
    from transformers import AutoConfig

    from fedhf.config.schema import parse_config
    from fedhf.tasks.model import build_model

    family, folder = tiny
    config = AutoConfig.from_pretrained(folder)
    modules = C.embedding_modules(config)
    head = "lm_head"
    embed = "model.embed_tokens" if family == "llama" else "transformer.wte"
    # the tiny Llama ties its head to the input embeddings (as SmolLM2 does); GPT-2 ties too
    assert modules == {embed: "the input embeddings", head: "the LM head, tied to the input embeddings"}
    for target, what in ((head, "the LM head, tied"), (embed.split(".")[-1], "the input embeddings")):
        with pytest.raises(FedHFModelError, match=f"'{target}' is {what}.*frozen"):
            C.check_lora_targets(config, ["q_proj" if family == "llama" else "c_attn", target])
    cfg = parse_config({"model.task": "causal-lm", "model.name": str(folder)})
    model = build_model(cfg, ["negative", "positive"])
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with pytest.raises(FedHFModelError, match="'lm_head' is the LM head"):
        build_model(parse_config({**cfg.to_flat(), "model.lora.target-modules": "lm_head"}), ["negative", "positive"])


def test_the_loss_weighs_each_example_alike_and_ignores_padding(tiny) -> None:
    family, folder = tiny
    tok = AutoTokenizer.from_pretrained(folder)
    model = lora_model(family, folder).eval()
    exs = [C.to_example(r, "instruction", tok) for r in records()[:3]]
    exs[1] = C.Example(exs[1].prompt, exs[1].response * 3)  # a longer response must not weigh more
    rows = C.tokenize(exs, tok, 300)
    with torch.no_grad():
        alone = []
        for r in rows:
            b = C.collate([r], C.pad_id(tok))
            s, n = C.token_losses(model(**TASK.split(b)[0]).logits, b["labels"])
            alone.append(float(s / n))
        batch = C.collate(rows, C.pad_id(tok))  # padded to the longest
        together = float(C.causal_loss(model(**TASK.split(batch)[0]).logits, batch["labels"]))
    assert together == pytest.approx(sum(alone) / 3, rel=1e-4)
    res = C.evaluate(model, C.make_loader(rows, tok, 2, shuffle=False))
    counted = sum(sum(t != C.IGNORE for t in r["labels"][1:]) for r in rows)
    assert res.num_examples == 3 and res.num_tokens == counted
    assert res.perplexity == pytest.approx(math.exp(res.loss))


def test_lora_training_lowers_the_held_out_loss_and_greedy_generation_learns_the_answers(tiny) -> None:
    family, folder = tiny
    tok = AutoTokenizer.from_pretrained(folder)
    model = lora_model(family, folder)
    recs = records()
    rows = C.tokenize([C.to_example(r, "instruction", tok) for r in recs], tok, 300)
    loader = C.make_loader(rows, tok, 4, shuffle=True, seed=1)
    before = C.evaluate(model, C.make_loader(rows, tok, 8, shuffle=False))
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(25):
        for batch in loader:
            inputs, target = TASK.split(batch)
            loss = TASK.criterion()(TASK.output(model(**inputs)), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
    after = C.evaluate(model, C.make_loader(rows, tok, 8, shuffle=False))
    assert after.loss < 0.5 * before.loss and after.token_accuracy > 0.8 > before.token_accuracy
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if "lora_" not in n)  # the base is frozen
    prompts = [C.prompt_of(r, "instruction", tok) for r in recs]
    settings = C.GenerationSettings(max_new_tokens=12)
    batched = C.generate(model, tok, prompts, settings, batch_size=8)
    one_by_one = [C.generate(model, tok, [p], settings)[0] for p in prompts[:4]]
    assert batched[:4] == one_by_one  # left padding changes nothing
    assert C.exact_match(batched, [r["output"] for r in recs]) >= 0.8


def test_exact_match_compares_the_normalized_first_line() -> None:
    assert C.normalize_answer("  Positive.\nbecause the film") == "positive"
    assert C.exact_match(["Positive!", "neg ative", "negative\n"], ["positive", "negative", "Negative"]) == 2 / 3
    assert C.exact_match([], []) == 0.0


def test_dp_sgd_trains_the_lora_of_a_causal_lm_and_books_every_step(tiny) -> None:
    family, folder = tiny
    tok = AutoTokenizer.from_pretrained(folder)
    model = lora_model(family, folder)
    rows = C.tokenize([C.to_example(r, "instruction", tok) for r in records()], tok, 300)
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert lora_before and all("lora_" in n for n in lora_before)  # embeddings and the (tied) LM head stay frozen
    account = SampleAccount("rdp", 1e-3, 1.0, 1.0)
    out = private_train(
        model, C.make_loader(rows, tok, 5, shuffle=False), account, task=TASK, epochs=2, lr=0.5, optimizer_name="sgd"
    )
    assert out.account.steps == 8  # 20 rows at batch 5: q = 1/4, 4 steps an epoch
    assert out.account.history == [(1.0, 0.25, 8)]
    assert 0 < out.account.epsilon < math.inf
    moved = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, lora_before[n])]
    assert any(".lora_A." in n for n in moved) and any(".lora_B." in n for n in moved)


def test_the_cards_generate_snippet_runs_against_a_saved_adapter(tiny, tmp_path, capsys) -> None:
    family, folder = tiny
    tok = AutoTokenizer.from_pretrained(folder)
    adapter = tmp_path / "hub"
    lora_model(family, folder).save_pretrained(adapter)
    tok.save_pretrained(adapter)
    (adapter / "fedhf.json").write_text(json.dumps({"label_names": ["negative", "positive"]}))
    code = C.CausalLM(["negative", "positive"]).usage_code(str(folder))
    assert 'snapshot_download("REPO_ID")' in code and "AutoModelForCausalLM" in code
    exec(compile(code.replace('snapshot_download("REPO_ID")', repr(str(adapter))), "card", "exec"), {})  # noqa: S102
    printed = capsys.readouterr().out
    record = {"instruction": C.instruction_for(["negative", "positive"]), "input": "an example sentence"}
    model = PeftModel.from_pretrained(TASK.load_base(str(folder)), adapter)
    (ours,) = C.generate(model, tok, [C.prompt_of(record, "instruction", tok)], C.GenerationSettings(max_new_tokens=8))
    assert printed == ours + "\n"  # the card's code prompts and decodes as fedhf trains and generates


def test_the_task_phrases_labelled_rows_as_instructions_and_scores_greedy_answers(tiny) -> None:
    family, folder = tiny
    tok = AutoTokenizer.from_pretrained(folder)
    names = ["negative", "positive"]
    task = C.CausalLM(names)
    texts = [t for t in CORPUS]
    labels = [names.index(ANSWERS[t.split()[-1]]) for t in texts]
    ds = {"text": texts, "label": labels}
    model = lora_model(family, folder)
    before = task.evaluate(model, task.make_loader(ds, tok, 300, 8, shuffle=False), 2)
    loader = task.make_loader(ds, tok, 300, 4, shuffle=True, seed=1)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(25):
        model.train()
        for batch in loader:
            inputs, target = task.split(batch)
            loss = task.criterion()(task.output(model(**inputs)), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
    after = task.evaluate(model, task.make_loader(ds, tok, 300, 8, shuffle=False), 2)
    assert before.num_examples == after.num_examples == 20
    # majority class: 0.6; an answer naming no label (before training: every one) is wrong
    assert before.accuracy < 0.6 and after.accuracy >= 0.75 and after.macro_f1 >= 0.7 and after.loss < before.loss
    losses, preds = task.per_example_loss(model, tok, texts, labels, 300)
    assert losses.shape == (20,) and float((preds == torch.tensor(labels)).float().mean()) == after.accuracy
    (answer, prob), *_ = task.predict(model, tok, names, texts[:1], 300)
    assert answer == names[labels[0]] and 0.5 < prob <= 1.0
    with pytest.raises(FedHFModelError, match="label names"):
        C.CausalLM().make_loader(ds, tok, 300, 8, shuffle=False)


def test_long_texts_are_cut_to_fit_the_answer_and_a_too_short_max_length_gets_one_error(tiny) -> None:
    _, folder = tiny
    tok = AutoTokenizer.from_pretrained(folder)
    names = ["negative", "positive"]
    long_text = " ".join(CORPUS)  # far longer than 48 tokens with the instruction
    task = C.CausalLM(names)
    loader = task.make_loader({"text": [long_text, "the calm film was good"], "label": [0, 1]}, tok, 48, 2, False)
    batch = next(iter(loader))
    assert batch["input_ids"].shape[1] <= 48
    answers = [tok.decode([t for t in row.tolist() if t != -100]) for row in batch["labels"]]
    assert answers[0].startswith("negative") and answers[1].startswith("positive")  # the whole answer kept
    assert tok.decode(batch["input_ids"][1]).count("the calm film was good") == 1  # a short text is left whole
    with pytest.raises(FedHFDataError, match=r"config key 'data.max-length': 12 tokens hold the instruction"):
        task.make_loader({"text": ["x"], "label": [0]}, tok, 12, 2, False)


def test_train_loss_on_all_labels_the_prompt_too_and_is_refused_for_classifiers(tiny) -> None:
    from fedhf.config.schema import parse_config
    from fedhf.errors import FedHFConfigError

    _, folder = tiny
    tok = AutoTokenizer.from_pretrained(folder)
    task = C.CausalLM(["negative", "positive"])
    ds = {"text": CORPUS[:6], "label": [0, 1, 0, 1, 0, 1]}
    for response_only in (True, False):
        batch = next(iter(task.make_loader(ds, tok, 300, 6, shuffle=False, response_only=response_only)))
        real = batch["attention_mask"].bool()
        counted = (batch["labels"] != C.IGNORE) & real
        prompt = torch.arange(batch["labels"].shape[1]) < batch["prompt_len"].unsqueeze(1)
        if response_only:  # the answer's tokens only
            assert not (counted & prompt).any() and (counted == (real & ~prompt)).all()
        else:  # every real token, the prompt's included, with its own id as the label
            assert counted.equal(real) and batch["labels"][real].equal(batch["input_ids"][real])
    assert parse_config({"model.task": "causal-lm", "train.loss-on": "all"}).train.loss_on == "all"
    with pytest.raises(FedHFConfigError, match="config key 'train.loss-on': got 'all' under model.task"):
        parse_config({"train.loss-on": "all"})


def test_predict_prompts_a_records_adapter_the_way_it_was_tuned(tiny, monkeypatch) -> None:
    """fedhf.json's data_format: a chat-tuned adapter gets the text as a user turn, an instruction-tuned one as the
    instruction (they differ without a chat template: GPT-2's 'user: ...' against Alpaca's layout)."""
    family, folder = tiny
    tok = AutoTokenizer.from_pretrained(folder)
    seen: list[list[int]] = []

    def fake_generate(model, tokenizer, prompts, settings, batch_size=8):  # noqa: ANN001, ANN202
        seen.extend(list(p) for p in prompts)
        return [[tokenizer.eos_token_id] for _ in prompts]

    monkeypatch.setattr(C, "generate_ids", fake_generate)
    model = lora_model(family, folder)
    chat = {"messages": [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": ""}]}
    for fmt, record in (("messages", chat), ("instruction", {"instruction": "hi there"})):
        seen.clear()
        C.CausalLM([], fmt).predict(model, tok, [], ["hi there"], 64)
        assert seen == [C.encode_prompt(tok, C.prompt_of(record, fmt, tok))]
    if family == "gpt2":  # no chat template: the two layouts really differ
        assert C.prompt_of(chat, "messages", tok) == "user: hi there\nassistant: "


def test_next_token_hits_count_the_top_1_and_top_k_tokens_the_loss_reads() -> None:
    # vocab 4; example 0 learns tokens at positions 1 and 2, example 1 only position 2 (position 1 is its prompt)
    logits = torch.tensor(
        [
            [[0.0, 3.0, 2.0, 1.0], [1.0, 0.0, 3.0, 2.0], [0.0, 0.0, 0.0, 0.0]],
            [[3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 2.0, 3.0], [0.0, 0.0, 0.0, 0.0]],
        ]
    )
    labels = torch.tensor([[C.IGNORE, 1, 3], [C.IGNORE, C.IGNORE, 1]])
    top1, top2 = C.next_token_hits(logits, labels, k=2)
    # example 0: position 0 predicts 1 (argmax 1: hit), position 1 predicts 3 (2nd most likely: top-2 only)
    # example 1: position 1 predicts 1 (its least likely but one: neither)
    assert top1.tolist() == [1, 0] and top2.tolist() == [2, 0]
    assert C.next_token_hits(logits, labels, k=4)[1].tolist() == [2, 1]  # top-vocab: every counted token


def test_plain_text_trains_on_every_token_and_is_scored_by_next_token_accuracy(tiny) -> None:
    """data.format text: no prompt (BOS aside), the loss on the whole text, evaluation by the share of tokens that
    are the model's most likely (and top-5) next token, the same figure the LM evaluation counts; the run's fixed
    prompts are the texts' first halves and fedhf predict continues a text as training read it."""
    family, folder = tiny
    tok = AutoTokenizer.from_pretrained(folder)
    ds = {"text": CORPUS[:8]}
    assert C.record_format(list(ds)) == "text"
    loader = TASK.make_loader(ds, tok, 32, 4, shuffle=False)
    batch = next(iter(loader))
    bos = C._bos(tok)
    for i in range(4):
        body = tok(CORPUS[i] + tok.eos_token, add_special_tokens=False)["input_ids"]
        n = len(bos) + len(body)
        assert batch["input_ids"][i, :n].tolist() == bos + body
        # every token of the text and its EOS is learned; BOS (never predicted) and the padding are not
        assert batch["labels"][i, :n].tolist() == [C.IGNORE] * len(bos) + body
        assert (batch["labels"][i, n:] == C.IGNORE).all()
    model = lora_model(family, folder)
    res = TASK.evaluate(model, loader, 0)
    lm = C.evaluate(model, loader)
    assert res.num_examples == 8 and res.loss == pytest.approx(lm.loss, rel=1e-5)
    assert res.accuracy == pytest.approx(lm.token_accuracy) and res.accuracy <= res.macro_f1 <= 1.0
    losses, shares = TASK.record_losses(model, tok, ds, 32)
    assert losses.shape == shares.shape == (8,) and 0 <= float(shares.min()) <= float(shares.max()) <= 1
    prompts = TASK.sample_prompts(ds, 2)
    assert prompts[0] == {"text": "the loud", "answer": "film was good"}
    assert C.split_text("one") == ("one", "")
    gens = TASK.generations(model, tok, ds, 32)
    assert len(gens) == 8 and all(isinstance(g, str) for g in gens)
    seen: list[list[int]] = []

    def fake_generate(model, tokenizer, prompts, settings, batch_size=8):  # noqa: ANN001, ANN202
        seen.extend(list(p) for p in prompts)
        return [[tokenizer.eos_token_id] for _ in prompts]

    import fedhf.tasks.causal_lm as module

    orig = module.generate_ids
    module.generate_ids = fake_generate
    try:
        C.CausalLM([], "text").predict(model, tok, [], ["the loud film"], 64)
    finally:
        module.generate_ids = orig
    # as training tokenizes a text: BOS when the tokenizer adds one, never the chat template (Llama's has one)
    assert seen == [C._bos(tok) + tok("the loud film", add_special_tokens=False)["input_ids"]]
    assert "chat_template" not in C.CausalLM([], "text").usage_code("base", records=True)


def test_long_prompts_are_cut_from_the_left_keeping_bos_and_an_empty_text_gets_one_error(tiny, monkeypatch) -> None:
    """Generation (the run's sample prompts and fedhf predict) reads at most data.max-length prompt tokens, as
    training does, and keeps BOS in front when it cuts; a text with nothing to continue from is refused."""
    assert C.fit_prompt([1, 5, 6, 7, 8], 3, bos=1) == [1, 7, 8]
    assert C.fit_prompt([5, 6, 7, 8], 3, bos=1) == [6, 7, 8]  # no BOS to keep
    assert C.fit_prompt([1, 5], 3, bos=1) == [1, 5] and C.fit_prompt([5, 6, 7], 2, bos=None) == [6, 7]
    family, folder = tiny
    tok = AutoTokenizer.from_pretrained(folder)
    seen: list[list[int]] = []

    def fake_generate(model, tokenizer, prompts, settings, batch_size=8):  # noqa: ANN001, ANN202
        seen.extend(list(p) for p in prompts)
        return [[tokenizer.eos_token_id] for _ in prompts]

    monkeypatch.setattr(C, "generate_ids", fake_generate)
    model = lora_model(family, folder)
    long_text = " ".join(CORPUS)  # far more than 12 tokens
    full = C.encode_text(tok, long_text)
    assert len(full) > 12
    C.CausalLM([], "text").predict(model, tok, [], [long_text], 12)
    assert seen == [C._bos(tok) + full[len(full) - 12 + len(C._bos(tok)) :]] and len(seen[0]) == 12
    seen.clear()
    TASK.generations(model, tok, {"text": [long_text + " " + long_text]}, 12)
    assert len(seen[0]) == 12 and seen[0][: len(C._bos(tok))] == C._bos(tok)
    if not C._bos(tok):  # GPT-2's tokenizer puts no BOS before a text: an empty one leaves nothing to continue
        with pytest.raises(FedHFDataError, match="text 2 of 2 is empty and this tokenizer puts no BOS token"):
            C.CausalLM([], "text").predict(model, tok, [], ["the loud film", ""], 12)
    else:  # Llama's does: the model continues from BOS
        assert len(C.CausalLM([], "text").predict(model, tok, [], [""], 12)) == 1
