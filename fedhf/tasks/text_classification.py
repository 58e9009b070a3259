"""Text classification: a sequence-classification head on an encoder (BERT family), cross-entropy, accuracy
and macro-F1. The reference task (``fedhf.tasks.base.Task``): every member fedhf needs of a task is here.

``model.pooling = mean`` makes the head read the attention-mask-weighted mean of the last hidden
states (a forward hook on the backbone: no new weights, the PEFT format is unchanged); the adapter's
``fedhf.json`` records the pooling, and loaders apply the same hook.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import datasets
import torch
from peft import TaskType
from torch.utils.data import DataLoader
from transformers import AutoModelForSequenceClassification, PreTrainedTokenizerBase

from fedhf.errors import FedHFModelError
from fedhf.tasks.base import TOKENIZED, EvalResult, batching
from fedhf.tasks.device import model_device, to_device

# Model families whose sequence-classification head reads the backbone's pooler output or its first token,
# so that mean pooling can be put in their place (decoder heads read the last token instead).
MEAN_POOLING_FAMILIES = ("bert", "roberta", "xlm-roberta", "distilbert", "electra", "mpnet", "camembert")


def apply_pooling(model: torch.nn.Module, pooling: str) -> None:
    """Make a transformers sequence classifier's head read ``pooling`` features; call before LoRA wrapping.

    ``cls`` keeps the model's own head. ``mean`` replaces what the head reads (BERT's pooler output, or
    the first token for heads that pool it themselves) by the attention-mask-weighted mean of the last
    hidden states, through a forward hook on the backbone: no new weights, so the adapter and its
    ``save_pretrained`` format are unchanged, and a loader must apply the same pooling (``fedhf.json``
    records it). Opacus sees only the usual layers.
    """
    if pooling == "cls":
        return
    if pooling != "mean":
        raise FedHFModelError(f"config key 'model.pooling': got '{pooling}'; use 'cls' or 'mean'.")
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in MEAN_POOLING_FAMILIES:
        raise FedHFModelError(
            f"config key 'model.pooling': 'mean' is supported for {', '.join(MEAN_POOLING_FAMILIES)} models, and "
            f"this model is '{model_type}'; set model.pooling = 'cls'."
        )
    if getattr(model, "_fedhf_pooling", None) == "mean":
        return  # already hooked
    backbone = model.base_model  # transformers: the encoder under the head (e.g. .bert)
    backbone.register_forward_hook(_mean_pooling_hook, with_kwargs=True)
    model._fedhf_pooling = "mean"


def masked_mean(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``hidden`` (batch, tokens, dim) over the tokens the mask keeps (all when no mask)."""
    if attention_mask is None:
        return hidden.mean(dim=1)
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


def _mean_pooling_hook(module: torch.nn.Module, args: tuple, kwargs: dict, output):  # noqa: ANN202
    mask = kwargs.get("attention_mask")
    if mask is None and len(args) > 1 and isinstance(args[1], torch.Tensor):
        mask = args[1]  # (input_ids, attention_mask, ...) passed positionally
    hidden = output[0]
    pooled = masked_mean(hidden, mask)
    if isinstance(output, tuple):  # return_dict=False: (last_hidden_state, pooler_output?, ...)
        if len(output) > 1 and isinstance(output[1], torch.Tensor) and output[1].dim() == 2:
            return (hidden, pooled, *output[2:])
        return (torch.cat([pooled.unsqueeze(1), hidden[:, 1:]], dim=1), *output[1:])
    if getattr(output, "pooler_output", None) is not None:  # BERT-style: the head reads the pooler output
        output.pooler_output = pooled
    else:  # the head reads the first token
        output.last_hidden_state = torch.cat([pooled.unsqueeze(1), hidden[:, 1:]], dim=1)
    return output


def macro_f1(pred: torch.Tensor, truth: torch.Tensor, num_labels: int) -> float:
    """Mean F1 over the labels present in truth or prediction."""
    f1s = []
    for c in range(num_labels):
        tp = int(((pred == c) & (truth == c)).sum())
        fp = int(((pred == c) & (truth != c)).sum())
        fn = int(((pred != c) & (truth == c)).sum())
        if tp + fp + fn == 0:
            continue  # label absent from both: not counted
        f1s.append(2 * tp / (2 * tp + fp + fn))
    return sum(f1s) / len(f1s) if f1s else 0.0


def make_loader(
    ds: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    batch_size: int,
    shuffle: bool,
    seed: int = 0,
    sort_by_length: bool = False,
    length_buckets: int = 1,
) -> DataLoader:
    """Tokenize once (per process: ``fedhf.tasks.base.TOKENIZED``), pad per batch (dynamic padding).

    ``sort_by_length`` (evaluation only) orders rows by length so batches carry little padding; ``length_buckets``
    (shuffled training) draws batches of like length (``fedhf.tasks.base.batching``).
    """

    def rows_of() -> list[dict[str, Any]]:
        enc = tokenizer(list(ds["text"]), truncation=True, max_length=max_length)
        return [
            {"input_ids": ids, "attention_mask": mask, "labels": label}
            for ids, mask, label in zip(enc["input_ids"], enc["attention_mask"], ds["label"], strict=True)
        ]

    rows = TOKENIZED.get(ds, tokenizer, ("text-classification", max_length), rows_of)  # once per process
    rows = sorted(rows, key=lambda r: len(r["input_ids"])) if sort_by_length else list(rows)

    def collate(batch: list[dict]) -> dict[str, torch.Tensor]:
        labels = torch.tensor([r["labels"] for r in batch], dtype=torch.long)
        padded = tokenizer.pad(
            [{"input_ids": r["input_ids"], "attention_mask": r["attention_mask"]} for r in batch], return_tensors="pt"
        )
        return {"input_ids": padded["input_ids"], "attention_mask": padded["attention_mask"], "labels": labels}

    lengths = [len(r["input_ids"]) for r in rows]
    return DataLoader(rows, collate_fn=collate, **batching(lengths, batch_size, shuffle, seed, length_buckets))


@torch.no_grad()
def logits_of(model: torch.nn.Module, loader: DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) of every row, in the loader's order: the one inference loop (evaluation, the audit's
    per-example loss and ``fedhf predict`` all run through it)."""
    model.eval()
    logits, labels = [], []
    device = model_device(model)
    for batch in loader:
        inputs, target = split(batch)
        logits.append(model(**to_device(inputs, device)).logits.float().cpu())
        labels.append(target)
    if not logits:
        return torch.empty(0, 0), torch.empty(0, dtype=torch.long)
    return torch.cat(logits), torch.cat(labels)


def evaluate(model: torch.nn.Module, loader: DataLoader, num_labels: int) -> EvalResult:
    """Mean cross-entropy, accuracy and macro-F1 (over labels present in truth or prediction)."""
    logits, truth = logits_of(model, loader)
    n = int(truth.shape[0])
    if n == 0:
        return EvalResult(0.0, 0.0, 0.0, 0)
    pred = logits.argmax(dim=-1)
    loss = torch.nn.functional.cross_entropy(logits, truth, reduction="sum").item() / n
    return EvalResult(loss, (pred == truth).float().mean().item(), macro_f1(pred, truth, num_labels), n)


def split(batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return inputs, batch["labels"]


def _in_length_order(
    model: torch.nn.Module, tokenizer: Any, texts: list[str], labels: list[int], max_length: int, batch_size: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) of ``texts`` in input order, batched by length for speed."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    ds = datasets.Dataset.from_dict({"text": [texts[i] for i in order], "label": [labels[i] for i in order]})
    logits, target = logits_of(model, make_loader(ds, tokenizer, max_length, batch_size, shuffle=False))
    back = torch.empty(len(order), dtype=torch.long)
    back[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
    return logits[back], target[back]


# The modules of a classification head (and BERT's pooler): new on a base checkpoint (check_encoder_weights), kept
# fp32 by the int8 export (fedhf.analysis.export).
HEAD_MODULES = ("classifier", "pre_classifier", "score", "pooler")


def check_encoder_weights(path: str, base: torch.nn.Module, missing: Iterable[str]) -> None:
    """Only the classification head may be missing from a base checkpoint: an encoder weight that is missing would
    start from random values, frozen under LoRA, and train nothing useful (transformers only logs it, and fedhf's
    commands quiet that log). A checkpoint of another architecture, or a wrong --base-model, is refused here."""
    encoder = sorted(k for k in missing if not set(k.split(".")) & set(HEAD_MODULES))
    if encoder:
        raise FedHFModelError(
            f"model '{path}': its checkpoint has no weights for {len(encoder)} of the "
            f"{type(base).__name__}'s parameters outside the classification head (e.g. {', '.join(encoder[:3])}), "
            "which would start from random values; name a checkpoint of this architecture (model.name, or "
            "fedhf predict --base-model: the base the adapter was trained on)."
        )


class TextClassification:
    """Sequence classification over ``label_names`` (``AutoModelForSequenceClassification``)."""

    name = "text-classification"
    pipeline_tag = "text-classification"
    peft_task_type = TaskType.SEQ_CLS

    def load_base(self, path: str, label_names: list[str], pooling: str) -> torch.nn.Module:
        base, info = AutoModelForSequenceClassification.from_pretrained(
            path,
            num_labels=len(label_names),
            id2label=dict(enumerate(label_names)),
            label2id={n: i for i, n in enumerate(label_names)},
            output_loading_info=True,
        )
        check_encoder_weights(path, base, info["missing_keys"])
        apply_pooling(base, pooling)
        return base

    make_loader = staticmethod(make_loader)
    split = staticmethod(split)
    evaluate = staticmethod(evaluate)

    def criterion(self) -> torch.nn.Module:
        return torch.nn.CrossEntropyLoss()

    def output(self, model_output: Any) -> torch.Tensor:
        return model_output.logits

    def tokens(self, inputs: dict[str, torch.Tensor]) -> int:
        return int(inputs["attention_mask"].sum())

    def per_example_loss(
        self, model: torch.nn.Module, tokenizer: Any, texts: list[str], labels: list[int], max_length: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits, target = _in_length_order(model, tokenizer, texts, labels, max_length)
        return torch.nn.functional.cross_entropy(logits, target, reduction="none"), logits.argmax(-1)

    def predict(
        self, model: torch.nn.Module, tokenizer: Any, labels: list[str], texts: list[str], max_length: int
    ) -> list[tuple[str, float]]:
        logits, _ = _in_length_order(model, tokenizer, texts, [0] * len(texts), max_length, batch_size=32)
        probs = logits.softmax(-1)
        return [(labels[int(row.argmax())], float(row.max())) for row in probs]

    def describe(self, label_names: list[str]) -> str:
        return f"{len(label_names)}-class text classification ({', '.join(label_names)})"

    def usage_code(self, base_model: str | None, pooling: str) -> str:
        mean = pooling == "mean"
        return f"""import json
{"import torch" + chr(10) if mean else ""}from huggingface_hub import snapshot_download
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer

path = snapshot_download("REPO_ID")  # or the local hub/ folder of the run
labels = json.load(open(f"{{path}}/fedhf.json"))["label_names"]
base = AutoModelForSequenceClassification.from_pretrained("{base_model or "BASE_MODEL"}", num_labels=len(labels))
{_MEAN_POOLING_SNIPPET if mean else ""}model = PeftModel.from_pretrained(base, path).eval()
tokenizer = AutoTokenizer.from_pretrained(path)
probs = model(**tokenizer(["an example sentence"], return_tensors="pt")).logits.softmax(-1)
print(labels[int(probs.argmax())], float(probs.max()))"""


# model.pooling = mean: what a loader must add so the head reads what it was trained on (apply_pooling above).
_MEAN_POOLING_SNIPPET = """

def mean_pooling(module, args, kwargs, out):  # trained with model.pooling = "mean": the head reads the token mean
    mask = kwargs["attention_mask"].unsqueeze(-1).to(out[0].dtype)
    mean = (out[0] * mask).sum(1) / mask.sum(1).clamp(min=1)
    if getattr(out, "pooler_output", None) is not None:
        out.pooler_output = mean
    else:
        out.last_hidden_state = torch.cat([mean[:, None], out[0][:, 1:]], 1)
    return out


base.base_model.register_forward_hook(mean_pooling, with_kwargs=True)
"""
