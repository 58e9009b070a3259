"""Tiny causal LMs for tests, benchmarks and offline experiments: no pretrained causal LM is reachable here.

``write_tiny_causal_lm`` trains a byte-level BPE tokenizer on the given texts (``tokenizers``), builds a Llama or
GPT-2 model from a small config with random weights drawn at 10x the usual scale (at std 0.02 a tiny decoder's
logits are nearly flat, which no LoRA on attention can sharpen; a trained checkpoint's are not), and saves both as
an ordinary Hugging Face model folder, so that ``model.name = <folder>`` goes through the same ``from_pretrained``
path as a Hub checkpoint. Figures measured on these models say how fedhf's code behaves (loss falls, DP
accounting, memorisation of canaries), not how a real checkpoint such as SmolLM2-135M would score.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from fedhf.errors import FedHFModelError

FAMILIES = ("llama", "gpt2")

# A ChatML-style template (the one SmolLM2 and Qwen use), in the tokenizer's own special tokens.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512, chat: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``texts``; with ``chat``, ChatML turn tokens and a chat template."""
    specials = ["<|endoftext|>", "<s>", "<pad>"] + (["<|im_start|>", "<|im_end|>"] if chat else [])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>" if chat else "<|endoftext|>",
        bos_token="<s>" if chat else "<|endoftext|>",
        pad_token="<pad>",
    )
    if chat:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_model(family: str, tokenizer: PreTrainedTokenizerFast, hidden: int = 64, layers: int = 2, seed: int = 0):  # noqa: ANN201
    """A randomly initialised ``family`` decoder sized for a CPU test (a few hundred thousand weights)."""
    if family not in FAMILIES:
        raise FedHFModelError(f"tiny model family: got '{family}'; one of {', '.join(FAMILIES)}.")
    common = {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "initializer_range": 0.2,  # see the module docstring
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if family == "llama":
            cfg = LlamaConfig(
                hidden_size=hidden,
                intermediate_size=2 * hidden,
                num_hidden_layers=layers,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=256,
                tie_word_embeddings=True,
                **common,
            )
            return LlamaForCausalLM(cfg)
        cfg = GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, n_positions=256, **common)
        return GPT2LMHeadModel(cfg)


def write_tiny_causal_lm(
    out_dir: str | Path,
    texts: Iterable[str],
    family: str = "llama",
    vocab_size: int = 512,
    hidden: int = 64,
    layers: int = 2,
    chat: bool | None = None,
    seed: int = 0,
) -> Path:
    """Save a tiny ``family`` model and its tokenizer (trained on ``texts``) to ``out_dir``; returns the folder.
    ``chat`` (default: Llama yes, GPT-2 no) gives the tokenizer a chat template."""
    chat = family == "llama" if chat is None else chat
    tokenizer = train_tokenizer(texts, vocab_size=vocab_size, chat=chat)
    model = tiny_model(family, tokenizer, hidden=hidden, layers=layers, seed=seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
