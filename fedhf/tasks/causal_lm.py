"""Causal language modelling (generative fine-tuning): instruction tuning of a decoder (Llama, Qwen, SmolLM, GPT-2).

A record is one of three shapes (``data.format``): an instruction record (``instruction``, optional ``input``,
``output``), a chat (``messages``: a list of ``{"role", "content"}`` whose last turn is the assistant's answer), or
plain text. Each becomes (prompt, response): the tokenizer's chat template writes instruction records and chats
when the tokenizer has one, else a fixed Alpaca-style template; plain text has no prompt. The loss is token
cross-entropy over the response tokens only (``response_only``; else over every token), averaged per example and
then over the batch, so that each example weighs the same (and per-example clipping clips what one example adds).

Bad input fails before training with the key, the count and the fix, never a row's text (errors may leave a data
owner's node): a record without the named fields, a template that leaves no response tokens, a prompt that fills
``data.max-length``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from peft import TaskType
from torch.utils.data import DataLoader
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerBase
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from fedhf.data.records import record_format
from fedhf.errors import FedHFDataError, FedHFModelError
from fedhf.tasks.base import TOKENIZED, EvalResult, batching
from fedhf.tasks.device import model_device, to_device
from fedhf.tasks.text_classification import macro_f1

IGNORE = -100  # the label of a token the loss does not read (PyTorch's and transformers' convention)
FORMATS = ("auto", "instruction", "messages", "text")

# Families in transformers' causal-LM mapping that are encoders: their "LM head" needs is_decoder and was never
# trained to generate. Refused under this task.
ENCODER_FAMILIES = ("bert", "roberta", "xlm-roberta", "camembert", "electra", "ernie", "rembert", "roc_bert")

# LoRA targets per family: attention (and the MLP with mlp=True). GPT-2 packs q, k, v into one Conv1D (c_attn).
LORA_TARGETS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "llama": (("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj", "down_proj")),
    "mistral": (("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj", "down_proj")),
    "qwen2": (("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj", "down_proj")),
    "qwen3": (("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj", "down_proj")),
    "gemma": (("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj", "down_proj")),
    "phi3": (("qkv_proj", "o_proj"), ("gate_up_proj", "down_proj")),
    "gpt2": (("c_attn",), ("c_fc", "mlp.c_proj")),
    "gpt_neox": (("query_key_value", "dense"), ("dense_h_to_4h", "dense_4h_to_h")),
}

# Without a chat template (base models, GPT-2): the Alpaca layout.
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


def lora_targets(model_type: str, mlp: bool = False) -> list[str]:
    """The module names that get LoRA in a ``model_type`` decoder: attention, plus the MLP with ``mlp``."""
    if model_type not in LORA_TARGETS:
        raise FedHFModelError(
            f"config key 'model.lora.target-modules': fedhf has no default LoRA targets for '{model_type}' models "
            f"(it knows {', '.join(sorted(LORA_TARGETS))}); name the model's linear layers, e.g. 'q_proj,v_proj'."
        )
    attention, feed_forward = LORA_TARGETS[model_type]
    return [*attention, *(feed_forward if mlp else ())]


def lora_options(model_type: str) -> dict[str, Any]:
    """LoraConfig options a family needs: GPT-2's Conv1D layers store their weight transposed (fan_in_fan_out)."""
    return {"fan_in_fan_out": True} if model_type == "gpt2" else {}


def check_causal_lm(path: str, name: str | None = None) -> Any:
    """The model's config when ``path`` (a folder or Hub id) is a decoder with a causal-LM head; else one error."""
    config = AutoConfig.from_pretrained(path)
    model_type = getattr(config, "model_type", "?")
    shown = name or path  # what the user named (model.name), not where it resolved to
    if getattr(config, "is_encoder_decoder", False):
        raise FedHFModelError(
            f"model.name '{shown}' is an encoder-decoder ('{model_type}'); model.task 'causal-lm' takes a decoder "
            f"(Llama, Qwen, SmolLM, GPT-2 families)."
        )
    if model_type in ENCODER_FAMILIES or model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise FedHFModelError(
            f"model.name '{shown}' is a '{model_type}' model without a causal-LM head; model.task 'causal-lm' takes a "
            f"decoder (Llama, Qwen, SmolLM, GPT-2 families), or use model.task 'text-classification' for this model."
        )
    return config


def embedding_modules(config: Any) -> dict[str, str]:
    """The module names of a decoder's input embeddings and LM head, each with what it is; a head tied to the input
    embeddings says so. ``config``: a built model, or its config (then built on the meta device: no weights)."""
    if isinstance(config, torch.nn.Module):
        model = config
    else:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    names = {id(m): n for n, m in model.named_modules()}
    out: dict[str, str] = {}
    inputs, head = model.get_input_embeddings(), model.get_output_embeddings()
    if inputs is not None and id(inputs) in names:
        out[names[id(inputs)]] = "the input embeddings"
    if head is not None and id(head) in names:
        tied = inputs is not None and head.weight is inputs.weight
        out[names[id(head)]] = "the LM head, tied to the input embeddings" if tied else "the LM head"
    return out


def check_lora_targets(config: Any, targets: Sequence[str]) -> None:  # config: a model or its config
    """Refuse LoRA on the embeddings or the LM head: fedhf keeps both frozen under causal-lm (a LoRA on a tied head
    would change the input embeddings too, and Opacus' per-sample gradients of a vocabulary-sized layer cost more
    memory than the rest of the adapter)."""
    modules = embedding_modules(config)
    for target in targets:
        hit = next((n for n in modules if n == target or n.endswith("." + target)), None)
        if hit is not None:
            raise FedHFModelError(
                f"config key 'model.lora.target-modules': '{target}' is {modules[hit]} ('{hit}'); fedhf keeps the "
                f"embeddings and the LM head frozen under model.task 'causal-lm'; name attention or MLP layers, or "
                f"leave it at 'auto' (the family's attention projections)."
            )


# --------------------------------------------------------------------------- records -> (prompt, response)


@dataclass(frozen=True)
class Example:
    """One training example as text: the prompt (no loss) and the response (the loss), already templated."""

    prompt: str
    response: str


def detect_format(columns: Sequence[str]) -> str:
    """The record format of a dataset with these columns (``data.format = auto``)."""
    cols = set(columns)
    if "messages" in cols:
        return "messages"
    if {"instruction", "output"} <= cols:
        return "instruction"
    if "text" in cols:
        return "text"
    raise FedHFDataError(
        f"data.format 'auto': the dataset's columns ({', '.join(sorted(cols)) or 'none'}) are none of the record "
        f"formats of model.task 'causal-lm': 'messages' (chats), 'instruction' + 'output' (+ optional 'input'), or "
        f"'text'; rename the columns or set data.format."
    )


REQUIRED = {"instruction": ("instruction", "output"), "messages": ("messages",), "text": ("text",)}


def check_columns(columns: Sequence[str], fmt: str) -> str:
    """The record format (``fmt``, or detected for ``auto``) after checking the dataset has its fields."""
    if fmt not in FORMATS:
        raise FedHFDataError(f"config key 'data.format': got '{fmt}'; one of {', '.join(FORMATS)}.")
    if fmt == "auto":
        return detect_format(columns)
    missing = [c for c in REQUIRED[fmt] if c not in columns]
    if missing:
        raise FedHFDataError(
            f"data.format '{fmt}' needs the column(s) {', '.join(missing)}, which the dataset lacks (it has "
            f"{', '.join(sorted(columns)) or 'none'}); rename its columns or set data.format to the records' shape."
        )
    return fmt


def has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _as_messages(record: Mapping[str, Any]) -> list[dict[str, str]]:
    user = str(record["instruction"])
    extra = record.get("input")
    if extra:
        user = f"{user}\n\n{extra}"
    messages = [{"role": "user", "content": user}]
    if "output" in record:  # a prompt to answer has none
        messages.append({"role": "assistant", "content": str(record["output"])})
    return messages


def prompt_of(record: Mapping[str, Any], fmt: str, tokenizer: PreTrainedTokenizerBase) -> str:
    """The text a model is given to answer ``record`` (what generation starts from; no response)."""
    if fmt == "text":
        return ""
    if fmt == "instruction":
        if has_chat_template(tokenizer):
            return tokenizer.apply_chat_template(_as_messages(record)[:1], tokenize=False, add_generation_prompt=True)
        template = ALPACA_PROMPT_INPUT if record.get("input") else ALPACA_PROMPT
        return template.format(instruction=record["instruction"], input=record.get("input") or "")
    messages = list(record["messages"])
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages[:-1]) + "assistant: "


def to_example(record: Mapping[str, Any], fmt: str, tokenizer: PreTrainedTokenizerBase) -> Example:
    """(prompt, response) text of one record; the response ends the way the model should stop (EOS or end of turn)."""
    eos = tokenizer.eos_token or ""
    if fmt == "text":
        return Example("", str(record["text"]) + eos)
    if fmt == "instruction":
        messages = _as_messages(record)
    else:
        messages = list(record["messages"])
        if not messages or messages[-1].get("role") != "assistant":
            raise FedHFDataError(
                "data.format 'messages': a chat must end with the assistant's turn (the response the model learns); "
                "a record ends with another role."
            )
    prompt = prompt_of(record, fmt, tokenizer)
    if has_chat_template(tokenizer):
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        if not full.startswith(prompt):
            raise FedHFDataError(
                "the tokenizer's chat template does not write a chat as its prompt followed by the answer, so the "
                "response tokens cannot be told apart; use a tokenizer whose template does (or one without a template)."
            )
        return Example(prompt, full[len(prompt) :])
    return Example(prompt, str(messages[-1]["content"]) + eos)


# --------------------------------------------------------------------------- tokens


def tokenize(
    examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase, max_length: int, response_only: bool = True
) -> list[dict[str, list[int]]]:
    """``input_ids`` and ``labels`` (IGNORE over the prompt when ``response_only``) of each example, at most
    ``max_length`` tokens (the response is cut at the end). Raises when a prompt leaves no room for its response
    or an example has no response token to learn."""
    rows, too_long, longest, empty = [], 0, 0, 0
    for ex in examples:
        # A chat template writes its own BOS (as text); otherwise BOS when the tokenizer adds one, and never an EOS
        # before the response.
        prompt_ids = encode_prompt(tokenizer, ex.prompt)
        response_ids = tokenizer(ex.response, add_special_tokens=False)["input_ids"]
        if len(prompt_ids) >= max_length and response_ids:
            too_long += 1
            longest = max(longest, len(prompt_ids))
            continue
        ids = (prompt_ids + response_ids)[:max_length]
        labels = (([IGNORE] * len(prompt_ids)) if response_only else list(prompt_ids)) + response_ids
        labels = labels[: len(ids)]
        if all(t == IGNORE for t in labels[1:]) or not response_ids:  # position 0 is never predicted
            empty += 1
            continue
        rows.append({"input_ids": ids, "labels": labels, "prompt_len": len(prompt_ids)})
    if too_long:  # counts only: the text may leave a data owner's node as it is (public)
        msg = (
            f"config key 'data.max-length': {max_length} tokens leave no room for the response of {too_long} of "
            f"{len(examples)} examples (the longest prompt is {longest} tokens); set data.max-length above {longest} "
            f"or shorten the prompts."
        )
        raise FedHFDataError(msg, public=msg)
    if empty:
        msg = (
            f"{empty} of {len(examples)} examples have no response token to learn after the template (an empty "
            f"output or text, or a one-token text with no BOS before it); drop them or fill their responses."
        )
        raise FedHFDataError(msg, public=msg)
    return rows


def _bos(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """[BOS] when the tokenizer puts one before a text by itself (Llama's), else nothing (GPT-2's)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    return [bos] if bos in tokenizer("a", add_special_tokens=True)["input_ids"][:1] else []


def pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    raise FedHFModelError("the tokenizer has neither a pad nor an EOS token; give one a pad_token.")


def collate(rows: Sequence[Mapping[str, list[int]]], pad: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (IGNORE on the padding)."""
    width = max((len(r["input_ids"]) for r in rows), default=0)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        mask[i, :n] = 1
        labels[i, :n] = torch.tensor(r["labels"])
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    for key in ("prompt_len", "class", "row"):  # what evaluation reads (generation starts after the prompt)
        if rows and key in rows[0]:
            batch[key] = torch.tensor([int(r[key]) for r in rows], dtype=torch.long)
    return batch


def make_loader(
    rows: Sequence[Mapping[str, list[int]]],
    tokenizer: PreTrainedTokenizerBase,
    batch_size: int,
    shuffle: bool,
    seed: int = 0,
    sort_by_length: bool = False,
    length_buckets: int = 1,
) -> DataLoader:
    """Batches of tokenized rows (``tokenize``), padded per batch; ``sort_by_length`` for evaluation only,
    ``length_buckets`` for shuffled training batches of like length (``fedhf.tasks.base.batching``)."""
    rows = sorted(rows, key=lambda r: len(r["input_ids"])) if sort_by_length else list(rows)
    p = pad_id(tokenizer)
    lengths = [len(r["input_ids"]) for r in rows]
    loader = DataLoader(
        rows,
        collate_fn=functools.partial(collate, pad=p),
        **batching(lengths, batch_size, shuffle, seed, length_buckets),
    )
    loader.tokenizer = tokenizer  # evaluation generates, and decodes with it
    return loader


# --------------------------------------------------------------------------- loss and evaluation


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed next-token loss, counted tokens) of each example: position t predicts label t + 1."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=IGNORE,
        reduction="none",
    ).view(shift_labels.shape)
    counted = (shift_labels != IGNORE).sum(dim=1)
    return nll.sum(dim=1), counted


def next_token_hits(logits: torch.Tensor, labels: torch.Tensor, k: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example: (learned tokens the model's most likely next token gets right, those in its ``k`` most likely),
    over the positions ``token_losses`` counts."""
    shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
    read = shift_labels != IGNORE
    top = shift_logits.topk(min(k, shift_logits.shape[-1]), dim=-1).indices
    in_top = (top == shift_labels.unsqueeze(-1)) & read.unsqueeze(-1)
    return in_top[..., 0].sum(dim=1), in_top.any(dim=-1).sum(dim=1)


def causal_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of each example's mean response-token loss (each example weighs the same)."""
    summed, counted = token_losses(logits, labels)
    return (summed / counted.clamp(min=1)).mean()


@dataclass
class LMEvalResult:
    """Held-out figures of a causal LM: mean loss per response token and its perplexity."""

    loss: float
    perplexity: float
    token_accuracy: float  # next-token argmax matches, over the response tokens
    num_examples: int
    num_tokens: int


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: DataLoader) -> LMEvalResult:
    """Token-weighted mean loss over the response tokens of every row, perplexity exp(loss), next-token accuracy."""
    model.eval()
    total, tokens, correct, n = 0.0, 0, 0, 0
    for batch in loader:
        batch = to_device(batch, model_device(model))
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        summed, counted = token_losses(logits, batch["labels"])
        total += float(summed.sum())
        tokens += int(counted.sum())
        shift = batch["labels"][:, 1:]
        hit = (logits[:, :-1].argmax(-1) == shift) & (shift != IGNORE)
        correct += int(hit.sum())
        n += int(batch["input_ids"].shape[0])
    if tokens == 0:
        return LMEvalResult(0.0, 1.0, 0.0, n, 0)
    loss = total / tokens
    return LMEvalResult(loss, math.exp(min(loss, 700.0)), correct / tokens, n, tokens)


@torch.no_grad()
def per_example_loss(model: torch.nn.Module, loader: DataLoader) -> torch.Tensor:
    """Each row's mean response-token loss, in the loader's order (what a loss-based membership attack reads)."""
    model.eval()
    out = []
    for batch in loader:
        batch = to_device(batch, model_device(model))
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        summed, counted = token_losses(logits, batch["labels"])
        out.append((summed / counted.clamp(min=1)).cpu())
    return torch.cat(out) if out else torch.empty(0)


# --------------------------------------------------------------------------- generation


@dataclass(frozen=True)
class GenerationSettings:
    """``fedhf predict`` and the per-round prompts: greedy unless ``do_sample``."""

    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """A prompt's token ids as ``tokenize`` puts them before a response (BOS unless a chat template wrote it)."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
    return ids if (has_chat_template(tokenizer) and prompt) else _bos(tokenizer) + ids


def encode_text(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """A plain text's token ids as training reads them (``data.format = text``: BOS when the tokenizer adds one,
    never a chat template): what a continuation of it starts from."""
    return _bos(tokenizer) + tokenizer(text, add_special_tokens=False)["input_ids"]


def fit_prompt(ids: Sequence[int], max_length: int, bos: int | None) -> list[int]:
    """A prompt's ids cut to ``max_length`` from the left, keeping its first token when that is BOS (a prompt that
    lost its BOS is one the model never saw in training): what generation continues from."""
    ids = list(ids)
    if len(ids) <= max_length:
        return ids
    head = ids[:1] if bos is not None and ids[0] == bos else []
    return head + ids[len(ids) - (max_length - len(head)) :]


@torch.no_grad()
def generate_ids(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Sequence[int]],
    settings: GenerationSettings = GenerationSettings(),  # noqa: B008 (frozen)
    batch_size: int = 8,
) -> list[list[int]]:
    """The new token ids generated after each prompt (token ids, as ``encode_prompt`` gives them)."""
    model.eval()
    pad = pad_id(tokenizer)
    kwargs: dict[str, Any] = {
        "max_new_tokens": settings.max_new_tokens,
        "pad_token_id": pad,
        "do_sample": settings.do_sample,
    }
    if settings.do_sample:
        kwargs.update(temperature=settings.temperature, top_p=settings.top_p)
    if tokenizer.eos_token_id is not None:
        kwargs["eos_token_id"] = tokenizer.eos_token_id
    device = next(model.parameters()).device
    outputs: list[list[int]] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            width = max(len(e) for e in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, e in enumerate(chunk):  # left padding: generation continues every row from its last token
                ids[i, width - len(e) :] = torch.tensor(list(e), dtype=torch.long)
                mask[i, width - len(e) :] = 1
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
            outputs.extend(row[width:].tolist() for row in out)
    return outputs


def generate(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    settings: GenerationSettings = GenerationSettings(),  # noqa: B008 (frozen)
    batch_size: int = 8,
) -> list[str]:
    """The continuation of each prompt (already templated: ``prompt_of``), without the prompt, special tokens cut."""
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    new = generate_ids(model, tokenizer, encoded, settings, batch_size)
    return [tokenizer.decode(row, skip_special_tokens=True) for row in new]


def until_eos(ids: Sequence[int], eos: int | None) -> list[int]:
    """Generated ids up to and including the first EOS (what follows it is the batch's padding)."""
    ids = list(ids)
    return ids[: ids.index(eos) + 1] if eos is not None and eos in ids else ids


_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """What exact match compares: the first line, lower-cased, without punctuation or surrounding space."""
    first = text.strip().split("\n", 1)[0] if text.strip() else ""
    return re.sub(r"\s+", " ", first.lower().translate(_PUNCT)).strip()


def exact_match(generations: Sequence[str], answers: Sequence[str]) -> float:
    """Share of generations whose normalized first line equals the normalized gold answer."""
    if not answers:
        return 0.0
    hits = sum(normalize_answer(g) == normalize_answer(a) for g, a in zip(generations, answers, strict=True))
    return hits / len(answers)


# --------------------------------------------------------------------------- the task


def instruction_for(label_names: Sequence[str]) -> str:
    """The instruction that phrases classification as generation: the answer is one of the label names."""
    return f"Answer with one label ({', '.join(label_names)}) for this text."


def classification_records(texts: Sequence[str], labels: Sequence[int], label_names: Sequence[str]) -> list[dict]:
    """Labelled texts as instruction records whose output is the label's name."""
    instruction = instruction_for(label_names)
    return [
        {"instruction": instruction, "input": t, "output": label_names[y]} for t, y in zip(texts, labels, strict=True)
    ]


def fit_texts(
    texts: Sequence[str], label_names: Sequence[str], tokenizer: PreTrainedTokenizerBase, max_length: int
) -> list[str]:
    """``texts`` cut (at a token boundary) so that the instruction, each text and the longest answer fit in
    ``max_length`` tokens, as a classifier truncates its input; one error when not even the template fits."""
    instruction = instruction_for(label_names)
    shell = to_example({"instruction": instruction, "input": "x", "output": ""}, "instruction", tokenizer)
    overhead = len(encode_prompt(tokenizer, shell.prompt)) - 1
    longest = max(
        len(tokenizer(to_example({"instruction": instruction, "input": "x", "output": n}, "instruction", tokenizer)
                      .response, add_special_tokens=False)["input_ids"])
        for n in label_names
    )  # fmt: skip
    budget = max_length - overhead - longest - 2  # 2: merges where the text meets the template
    if budget < 4:
        raise FedHFDataError(
            f"config key 'data.max-length': {max_length} tokens hold the instruction template ({overhead} tokens) and "
            f"the longest answer ({longest}) but leave {max(budget, 0)} for the text; set data.max-length to at least "
            f"{overhead + longest + 2 + 16}."
        )
    out = []
    for t in texts:
        ids = tokenizer(t, add_special_tokens=False)["input_ids"]
        out.append(t if len(ids) <= budget else tokenizer.decode(ids[:budget]))
    return out


RECORD_MAX_NEW_TOKENS = 64  # the most tokens evaluation and fedhf predict generate for an instruction record


def _columns(ds: Any) -> list[str]:
    return list(ds.column_names) if hasattr(ds, "column_names") else list(ds)


def _rows(ds: Any, fmt: str) -> list[dict[str, Any]]:
    """The records of a normalised dataset (``fedhf.data.records``) as dicts."""
    if fmt == "messages":
        return [{"messages": list(m)} for m in ds["messages"]]
    if fmt == "text":
        return [{"text": t} for t in ds["text"]]
    extra = ds["input"] if "input" in _columns(ds) else [""] * len(ds["instruction"])
    return [
        {"instruction": i, "input": x or "", "output": o}
        for i, x, o in zip(ds["instruction"], extra, ds["output"], strict=True)
    ]


def _format_of(record: Mapping[str, Any]) -> str:
    return "messages" if "messages" in record else "text" if "text" in record else "instruction"


def answer_of(record: Mapping[str, Any], fmt: str) -> str:
    """The gold answer of a record: its output, or the chat's last (assistant) turn."""
    if fmt == "messages":
        return str(record["messages"][-1]["content"])
    if fmt == "text":
        return str(record["text"])
    return str(record["output"])


def split_text(text: str) -> tuple[str, str]:
    """A plain text's first half of words (the prompt a run's sample generation continues) and the rest (what the
    text goes on to say)."""
    words = str(text).split()
    cut = max(1, len(words) // 2)
    return " ".join(words[:cut]), " ".join(words[cut:])


def question_of(record: Mapping[str, Any], fmt: str) -> str:
    """What the user asks in a record: instruction and input, or the chat's last user turn (plain text: its first
    half)."""
    if fmt == "text":
        return split_text(record["text"])[0]
    if fmt == "messages":
        users = [t["content"] for t in record["messages"][:-1] if t["role"] == "user"]
        return str(users[-1]) if users else ""
    extra = record.get("input")
    return f"{record['instruction']}\n\n{extra}" if extra else str(record["instruction"])


def normalize_text(text: str) -> str:
    """What exact match of a record's answer compares: lower-cased, without punctuation, spacing collapsed."""
    return re.sub(r"\s+", " ", text.lower().translate(_PUNCT)).strip()


def token_f1(prediction: str, gold: str) -> float:
    """SQuAD's token F1: the harmonic mean of the shared normalized words' precision and recall."""
    said, want = normalize_text(prediction).split(), normalize_text(gold).split()
    if not said or not want:
        return float(said == want)
    common = sum(min(said.count(w), want.count(w)) for w in set(said))
    if common == 0:
        return 0.0
    precision, recall = common / len(said), common / len(want)
    return 2 * precision * recall / (precision + recall)


def scoreable(ds: Any, tokenizer: PreTrainedTokenizerBase, max_length: int) -> list[bool]:
    """Whether each record of ``ds`` tokenizes into a prompt and a response within ``max_length`` (what the
    audit can score; training refuses the others before the run)."""
    fmt = record_format(_columns(ds))
    out = []
    for record in _rows(ds, fmt):
        try:
            tokenize([to_example(record, fmt, tokenizer)], tokenizer, max_length)
            out.append(True)
        except FedHFDataError:
            out.append(False)
    return out


def answer_ids(generations: Sequence[str], label_names: Sequence[str]) -> torch.Tensor:
    """The label id each generation names by exact match (normalized first line), -1 where it names none."""
    index = {normalize_answer(n): i for i, n in enumerate(label_names)}
    return torch.tensor([index.get(normalize_answer(g), -1) for g in generations], dtype=torch.long)


class CausalLM:
    """A decoder (``AutoModelForCausalLM``) that answers an instruction listing the labels with the label's name.

    fedhf's data stage gives every task labelled texts; this task phrases each as an instruction record
    (``classification_records``), trains on the answer tokens (loss over the response only) and evaluates by greedy
    generation: accuracy and macro-F1 of the exact matches (a generation naming no label is wrong), with the loss
    per answer token (perplexity = exp(loss)).
    """

    name = "causal-lm"
    pipeline_tag = "text-generation"
    peft_task_type = TaskType.CAUSAL_LM

    def __init__(self, label_names: Sequence[str] | None = None, data_format: str = "labels") -> None:
        self.label_names = list(label_names or [])
        self.data_format = data_format  # what a released adapter was tuned on: how fedhf predict prompts it

    def load_base(self, path: str, label_names: list[str] | None = None, pooling: str = "cls") -> torch.nn.Module:
        check_causal_lm(path)
        if pooling != "cls":
            raise FedHFModelError(
                f"config key 'model.pooling': got '{pooling}'; pooling belongs to classification heads and "
                f"model.task 'causal-lm' has none; leave it unset."
            )
        return AutoModelForCausalLM.from_pretrained(path)

    def _names(self, num_labels: int | None = None) -> list[str]:
        if not self.label_names or (num_labels is not None and num_labels != len(self.label_names)):
            raise FedHFModelError(  # a bug in fedhf (the task was built without the run's labels), not user input
                f"the causal-lm task needs the run's {num_labels or ''} label names; it has {self.label_names}."
            )
        return self.label_names

    def make_loader(
        self,
        ds: Any,
        tokenizer: PreTrainedTokenizerBase,
        max_length: int,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        sort_by_length: bool = False,
        extra_records: Sequence[Mapping[str, Any]] = (),
        response_only: bool = True,
        length_buckets: int = 1,
    ) -> DataLoader:
        """Batches of the rows of ``ds`` (``text``, ``label``) phrased as instructions, tokenized once;
        ``extra_records`` (instruction records, e.g. the audit's canaries) train with them and have class -1;
        ``response_only``: labels on the answer tokens only (else on the prompt's as well: train.loss-on = all)."""
        fmt = record_format(_columns(ds))
        if fmt != "labels":
            return self._records_loader(
                ds, fmt, tokenizer, max_length, batch_size, shuffle, seed, sort_by_length, extra_records, response_only,
                length_buckets,
            )  # fmt: skip
        names = self._names()

        def rows_of() -> list[dict[str, Any]]:
            texts = fit_texts(list(ds["text"]), names, tokenizer, max_length)
            records = classification_records(texts, list(ds["label"]), names) + list(extra_records)
            examples = [to_example(r, "instruction", tokenizer) for r in records]
            rows = tokenize(examples, tokenizer, max_length, response_only=response_only) if examples else []
            classes = [int(y) for y in ds["label"]] + [-1] * len(extra_records)
            for row, y in zip(rows, classes, strict=True):
                row["class"] = y
            return rows

        options = ("causal-lm", fmt, tuple(names), max_length, response_only, repr(list(extra_records)))
        rows = TOKENIZED.get(ds, tokenizer, options, rows_of)  # tokenized once per process and key
        return make_loader(
            rows,
            tokenizer,
            batch_size,
            shuffle,
            seed=seed,
            sort_by_length=sort_by_length,
            length_buckets=length_buckets,
        )

    def _records_loader(
        self,
        ds: Any,
        fmt: str,
        tokenizer: PreTrainedTokenizerBase,
        max_length: int,
        batch_size: int,
        shuffle: bool,
        seed: int,
        sort_by_length: bool,
        extra_records: Sequence[Mapping[str, Any]],
        response_only: bool,
        length_buckets: int = 1,
    ) -> DataLoader:
        """Instruction or chat records (``fedhf.data.records``), each row remembering its gold answer (what exact
        match and token F1 compare the greedy generation with)."""

        def rows_of() -> tuple[list[dict[str, Any]], list[str]]:
            records = [*_rows(ds, fmt), *extra_records]
            formats = [fmt] * (len(records) - len(extra_records)) + [_format_of(r) for r in extra_records]
            examples = [to_example(r, f, tokenizer) for r, f in zip(records, formats, strict=True)]
            rows = tokenize(examples, tokenizer, max_length, response_only=response_only) if examples else []
            for i, row in enumerate(rows):
                row["class"], row["row"] = -1, i
            return rows, [answer_of(r, f) for r, f in zip(records, formats, strict=True)]

        options = ("causal-lm", fmt, max_length, response_only, repr(list(extra_records)))
        rows, answers = TOKENIZED.get(ds, tokenizer, options, rows_of)  # tokenized once per process and key
        loader = make_loader(
            rows,
            tokenizer,
            batch_size,
            shuffle,
            seed=seed,
            sort_by_length=sort_by_length,
            length_buckets=length_buckets,
        )
        loader.answers = answers
        loader.data_format = fmt  # plain text has no answer to generate: next-token accuracy scores it
        return loader

    def split(self, batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}, batch["labels"]

    def criterion(self):  # noqa: ANN201
        return causal_loss

    def output(self, model_output: Any) -> torch.Tensor:
        return model_output.logits

    def tokens(self, inputs: dict[str, torch.Tensor]) -> int:
        return int(inputs["attention_mask"].sum())

    def max_new_tokens(self, tokenizer: PreTrainedTokenizerBase) -> int:
        """Enough new tokens for the longest label name and the end of the answer."""
        longest = max(len(tokenizer(n, add_special_tokens=False)["input_ids"]) for n in self._names())
        return longest + 2

    @torch.no_grad()
    def answers(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, loader: DataLoader) -> tuple:
        """(loss per answer token summed, answer tokens, predicted label ids, true label ids) over the loader."""
        model.eval()
        total, tokens, preds, truth = 0.0, 0, [], []
        settings = GenerationSettings(max_new_tokens=self.max_new_tokens(tokenizer))
        for batch in loader:
            batch = to_device(batch, model_device(model))
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            summed, counted = token_losses(logits, batch["labels"])
            total += float(summed.sum())
            tokens += int(counted.sum())
            prompts = [row[: int(n)].tolist() for row, n in zip(batch["input_ids"], batch["prompt_len"], strict=True)]
            new = generate_ids(model, tokenizer, prompts, settings, batch_size=len(prompts))
            preds.append(answer_ids([tokenizer.decode(r, skip_special_tokens=True) for r in new], self._names()))
            truth.append(batch["class"].cpu())
        cat = lambda xs: torch.cat(xs) if xs else torch.empty(0, dtype=torch.long)  # noqa: E731
        return total, tokens, cat(preds), cat(truth)

    def evaluate(self, model: torch.nn.Module, loader: DataLoader, num_labels: int) -> EvalResult:
        """Loss per answer token; accuracy and macro-F1 of the greedy answers (exact match with a label's name)."""
        if getattr(loader, "data_format", "") == "text":  # plain text: next-token accuracy (top 1, top 5)
            return self._evaluate_text(model, loader)
        if hasattr(loader, "answers"):  # records: exact match and token F1 of the greedy answers
            return self._evaluate_records(model, loader)
        self._names(num_labels)
        tokenizer = loader.tokenizer  # set by make_loader
        total, tokens, pred, truth = self.answers(model, tokenizer, loader)
        n = int(truth.shape[0])
        if n == 0:
            return EvalResult(0.0, 0.0, 0.0, 0)
        return EvalResult(
            total / max(tokens, 1), float((pred == truth).float().mean()), macro_f1(pred, truth, num_labels), n
        )

    @torch.no_grad()
    def _record_batches(self, model: torch.nn.Module, loader: DataLoader, generate: bool = True) -> Any:
        """Per batch of a records loader: (summed answer-token loss, answer tokens, [(greedy answer, gold answer)]
        when ``generate``). Generation stops one token past the longest gold answer, at most RECORD_MAX_NEW_TOKENS."""
        model.eval()
        tokenizer = loader.tokenizer
        longest = max((len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in loader.answers), default=1)
        settings = GenerationSettings(max_new_tokens=min(longest + 1, RECORD_MAX_NEW_TOKENS))
        for batch in loader:
            batch = to_device(batch, model_device(model))
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            summed, counted = token_losses(logits, batch["labels"])
            pairs: list[tuple[str, str]] = []
            if generate:
                prompts = [r[: int(k)].tolist() for r, k in zip(batch["input_ids"], batch["prompt_len"], strict=True)]
                new = generate_ids(model, tokenizer, prompts, settings, batch_size=len(prompts))
                pairs = [
                    (tokenizer.decode(ids, skip_special_tokens=True), loader.answers[i])
                    for ids, i in zip(new, batch["row"].tolist(), strict=True)
                ]
            yield summed, counted, pairs

    @torch.no_grad()
    def _text_batches(self, model: torch.nn.Module, loader: DataLoader) -> Any:
        """Per batch of a plain-text loader: (summed token loss, tokens, top-1 hits, top-5 hits), per example."""
        model.eval()
        for batch in loader:
            batch = to_device(batch, model_device(model))
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            summed, counted = token_losses(logits, batch["labels"])
            top1, top5 = next_token_hits(logits, batch["labels"])
            yield summed, counted, top1, top5

    def _evaluate_text(self, model: torch.nn.Module, loader: DataLoader) -> EvalResult:
        """Loss per token; accuracy: the share of tokens that are the model's most likely next token; macro_f1: the
        share in its five most likely (fedhf.data.records.METRICS names them). Token-weighted over the loader."""
        total, tokens, hits1, hits5, n = 0.0, 0, 0, 0, 0
        for summed, counted, top1, top5 in self._text_batches(model, loader):
            total, tokens = total + float(summed.sum()), tokens + int(counted.sum())
            hits1, hits5, n = hits1 + int(top1.sum()), hits5 + int(top5.sum()), n + int(counted.shape[0])
        if tokens == 0:
            return EvalResult(0.0, 0.0, 0.0, n)
        return EvalResult(total / tokens, hits1 / tokens, hits5 / tokens, n)

    def _evaluate_records(self, model: torch.nn.Module, loader: DataLoader) -> EvalResult:
        """Loss per answer token; accuracy: exact match of the greedy answer with the gold answer (normalized:
        case, punctuation and spacing); macro_f1: the mean token F1 between them (SQuAD's)."""
        total, tokens, hits, f1s, n = 0.0, 0, 0.0, 0.0, 0
        for summed, counted, pairs in self._record_batches(model, loader):
            total += float(summed.sum())
            tokens += int(counted.sum())
            hits += sum(float(normalize_text(said) == normalize_text(gold)) for said, gold in pairs)
            f1s += sum(token_f1(said, gold) for said, gold in pairs)
            n += len(pairs)
        if n == 0:
            return EvalResult(0.0, 0.0, 0.0, 0)
        return EvalResult(total / max(tokens, 1), hits / n, f1s / n, n)

    def record_losses(
        self, model: torch.nn.Module, tokenizer: Any, ds: Any, max_length: int, generate: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each record's mean answer-token loss and (with ``generate``) whether its greedy answer matches the gold
        one exactly, in the order of ``ds`` (instruction or chat records): what the membership audit reads. Plain
        text: each text's mean token loss and its share of tokens predicted right (top 1), as floats."""
        loader = self.make_loader(ds, tokenizer, max_length, 32, shuffle=False)
        if getattr(loader, "data_format", "") == "text":
            losses, shares = [], []
            for summed, counted, top1, _ in self._text_batches(model, loader):
                losses.append((summed / counted.clamp(min=1)).cpu())
                shares.append((top1 / counted.clamp(min=1)).cpu())
            cat = lambda xs: torch.cat(xs) if xs else torch.empty(0)  # noqa: E731
            return cat(losses), (cat(shares) if generate else torch.empty(0))
        losses, hits = [], []
        for summed, counted, pairs in self._record_batches(model, loader, generate):
            losses.append((summed / counted.clamp(min=1)).cpu())
            hits += [normalize_text(said) == normalize_text(gold) for said, gold in pairs]
        return (torch.cat(losses) if losses else torch.empty(0)), torch.tensor(hits, dtype=torch.bool)

    def per_example_loss(
        self, model: torch.nn.Module, tokenizer: Any, texts: list[str], labels: list[int], max_length: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each example's mean answer-token loss and its greedy answer's label id (-1: none), in input order."""
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        ds = {"text": [texts[i] for i in order], "label": [labels[i] for i in order]}
        loader = self.make_loader(ds, tokenizer, max_length, 32, shuffle=False)
        losses, preds = [], []
        settings = GenerationSettings(max_new_tokens=self.max_new_tokens(tokenizer))
        model.eval()
        with torch.no_grad():
            for batch in loader:
                batch = to_device(batch, model_device(model))
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                summed, counted = token_losses(logits, batch["labels"])
                losses.append((summed / counted.clamp(min=1)).cpu())
                prompts = [r[: int(n)].tolist() for r, n in zip(batch["input_ids"], batch["prompt_len"], strict=True)]
                new = generate_ids(model, tokenizer, prompts, settings, batch_size=len(prompts))
                preds.append(answer_ids([tokenizer.decode(r, skip_special_tokens=True) for r in new], self._names()))
        back = torch.empty(len(order), dtype=torch.long)
        back[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
        return torch.cat(losses)[back], torch.cat(preds)[back]

    def sample_prompts(self, ds: Any, k: int) -> list[dict[str, str]]:
        """The first ``k`` rows of ``ds`` as (text, answer): the fixed prompts whose generations a run records after
        every round (``model.sample-prompts``). A record's text is what its user asks (instruction and input, or
        the last user turn; a plain text's first half of words, whose answer is the rest)."""
        n = min(k, len(ds))
        fmt = record_format(_columns(ds))
        if fmt != "labels":
            if fmt == "text":
                return [dict(zip(("text", "answer"), split_text(r["text"]), strict=True)) for r in _rows(ds, fmt)[:n]]
            return [{"text": question_of(r, fmt), "answer": answer_of(r, fmt)} for r in _rows(ds, fmt)[:n]]
        names = self._names()
        return [{"text": str(t), "answer": names[int(y)]} for t, y in zip(ds["text"][:n], ds["label"][:n], strict=True)]

    def generations(self, model: torch.nn.Module, tokenizer: Any, ds: Any, max_length: int) -> list[str]:
        """The greedy answer generated for each row of ``ds`` (prompted as in training), special tokens cut."""
        fmt = record_format(_columns(ds))
        if fmt == "labels":
            texts = list(ds["text"])
            return [answer for answer, _ in self.predict(model, tokenizer, self._names(), texts, max_length)]
        records = _rows(ds, fmt)
        if fmt == "text":  # continue each text's first half (sample_prompts); its answer is the rest
            halves = [split_text(r["text"]) for r in records]
            prompts, answers = [h[0] for h in halves], [h[1] for h in halves]
        else:
            prompts = [prompt_of(r, fmt, tokenizer) for r in records]
            answers = [answer_of(r, fmt) for r in records]
        longest = max(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers)
        settings = GenerationSettings(max_new_tokens=min(max(longest, 1) + 1, RECORD_MAX_NEW_TOKENS))
        encode = encode_text if fmt == "text" else encode_prompt
        encoded = [fit_prompt(encode(tokenizer, p), max_length, tokenizer.bos_token_id) for p in prompts]
        new = generate_ids(model, tokenizer, encoded, settings)
        return [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in new]

    def predict(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        labels: list[str],
        texts: list[str],
        max_length: int,
        settings: GenerationSettings | None = None,
    ) -> list[tuple[str, float]]:
        """Each text's answer (greedy, enough tokens for a label's name, unless ``settings`` say otherwise) and the
        probability the model gives the generated tokens."""
        if labels:
            fitted = fit_texts(texts, labels, tokenizer, max_length)
            records = classification_records(fitted, [0] * len(texts), labels)
        elif self.data_format == "text":  # tuned on plain text: each text is continued as it is
            records = [{"text": t} for t in texts]
        elif self.data_format == "messages":  # tuned on chats: each text is the user's turn
            records = [
                {"messages": [{"role": "user", "content": t}, {"role": "assistant", "content": ""}]} for t in texts
            ]
        else:  # tuned on instruction records: each text is the instruction
            records = [{"instruction": t} for t in texts]
        fmt = _format_of(records[0]) if records else "instruction"
        prompts = [r["text"] if fmt == "text" else prompt_of(r, fmt, tokenizer) for r in records]
        settings = settings or GenerationSettings(max_new_tokens=0)
        if not settings.max_new_tokens:  # 0: enough for the longest label name (records: RECORD_MAX_NEW_TOKENS)
            default = self.max_new_tokens(tokenizer) if labels else RECORD_MAX_NEW_TOKENS
            settings = dataclasses.replace(settings, max_new_tokens=default)
        encode = encode_text if fmt == "text" else encode_prompt
        encoded = [fit_prompt(encode(tokenizer, p), max_length, tokenizer.bos_token_id) for p in prompts]
        empty = [i for i, ids in enumerate(encoded) if not ids]
        if empty:  # nothing to continue from: a tokenizer without BOS and an empty text
            raise FedHFDataError(
                f"text {empty[0] + 1} of {len(encoded)} is empty and this tokenizer puts no BOS token before a text, "
                "so there is nothing to continue from; give it some text."
            )
        new = generate_ids(model, tokenizer, encoded, settings)
        out = []
        with torch.no_grad():
            for ids, gen in zip(encoded, new, strict=True):
                gen = until_eos(gen, tokenizer.eos_token_id)  # a batch pads the rows that ended first
                full = torch.tensor([ids + gen], device=model_device(model))
                logp = torch.log_softmax(model(input_ids=full).logits[0, len(ids) - 1 : -1].float(), -1).cpu()
                score = float(logp.gather(1, torch.tensor(gen).unsqueeze(1)).sum().exp()) if gen else 0.0
                out.append((tokenizer.decode(gen, skip_special_tokens=True).strip(), score))
        return out

    def describe(self, label_names: list[str] | None = None) -> str:
        names = label_names or self.label_names
        if not names and self.data_format == "text":
            return "text generation: a causal LM tuned on plain text (it continues a text)"
        if not names:
            return "text generation: a causal LM tuned to answer instructions (instruction or chat records)"
        return f"text generation: a causal LM that answers with one of {len(names)} labels ({', '.join(names)})"

    def usage_code(self, base_model: str | None, pooling: str = "cls", records: bool = False) -> str:
        if records and self.data_format == "text":  # tuned on plain text: it continues what it is given
            return f"""from huggingface_hub import snapshot_download
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

path = snapshot_download("REPO_ID")  # or the local hub/ folder of the run
base = AutoModelForCausalLM.from_pretrained("{base_model or "BASE_MODEL"}")
model = PeftModel.from_pretrained(base, path).eval()
tokenizer = AutoTokenizer.from_pretrained(path)
inputs = tokenizer("The beginning of a text", return_tensors="pt")
out = model.generate(**inputs, max_new_tokens=64, do_sample=False)
print(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))"""
        if records:  # tuned on instruction or chat records: the user's text is the instruction
            return f"""import json

from huggingface_hub import snapshot_download
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

path = snapshot_download("REPO_ID")  # or the local hub/ folder of the run
base = AutoModelForCausalLM.from_pretrained("{base_model or "BASE_MODEL"}")
model = PeftModel.from_pretrained(base, path).eval()
tokenizer = AutoTokenizer.from_pretrained(path)
instruction = "an example instruction"
tuned_on = json.load(open(f"{{path}}/fedhf.json"))["data_format"]  # instruction or messages records
if tokenizer.chat_template:  # the prompt the adapter was trained on
    messages = [{{"role": "user", "content": instruction}}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
elif tuned_on == "messages":
    prompt = f"user: {{instruction}}\\nassistant: "
else:
    prompt = f"### Instruction:\\n{{instruction}}\\n\\n### Response:\\n"
inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=not tokenizer.chat_template)
out = model.generate(**inputs, max_new_tokens=64, do_sample=False)
print(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))"""
        return f"""import json

from huggingface_hub import snapshot_download
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

path = snapshot_download("REPO_ID")  # or the local hub/ folder of the run
labels = json.load(open(f"{{path}}/fedhf.json"))["label_names"]
base = AutoModelForCausalLM.from_pretrained("{base_model or "BASE_MODEL"}")
model = PeftModel.from_pretrained(base, path).eval()
tokenizer = AutoTokenizer.from_pretrained(path)
instruction = f"Answer with one label ({{', '.join(labels)}}) for this text."
text = "an example sentence"
if tokenizer.chat_template:  # the prompt the adapter was trained on
    messages = [{{"role": "user", "content": f"{{instruction}}\\n\\n{{text}}"}}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
else:
    prompt = f"### Instruction:\\n{{instruction}}\\n\\n### Input:\\n{{text}}\\n\\n### Response:\\n"
inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=not tokenizer.chat_template)
out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
print(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))"""
