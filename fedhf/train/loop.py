"""Local training and evaluation loops: plain PyTorch, no Flower, no Opacus specifics.

The loss is computed here from the logits with a criterion (not from the model's
own ``outputs.loss``), so a privacy engine can swap in its own criterion.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import datasets
import torch
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase


@dataclass
class TrainResult:
    loss: float  # mean per-example loss over the round's training
    num_examples: int  # rows in the training partition (FedAvg weight)
    steps: int
    tokens: int  # non-padding tokens processed (for FLOP counts)
    seconds: float


@dataclass
class EvalResult:
    loss: float
    accuracy: float
    macro_f1: float
    num_examples: int


def make_loader(ds: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int,
                batch_size: int, shuffle: bool, seed: int = 0, sort_by_length: bool = False) -> DataLoader:
    """Tokenize once, pad per batch (dynamic padding).

    ``sort_by_length`` (evaluation only) orders rows by length so batches carry little padding.
    """
    enc = tokenizer(list(ds["text"]), truncation=True, max_length=max_length)
    rows = [
        {"input_ids": ids, "attention_mask": mask, "labels": label}
        for ids, mask, label in zip(enc["input_ids"], enc["attention_mask"], ds["label"], strict=True)
    ]
    if sort_by_length:
        rows.sort(key=lambda r: len(r["input_ids"]))

    def collate(batch: list[dict]) -> dict[str, torch.Tensor]:
        labels = torch.tensor([r["labels"] for r in batch], dtype=torch.long)
        padded = tokenizer.pad([{"input_ids": r["input_ids"], "attention_mask": r["attention_mask"]} for r in batch],
                               return_tensors="pt")
        return {"input_ids": padded["input_ids"], "attention_mask": padded["attention_mask"], "labels": labels}

    generator = torch.Generator().manual_seed(seed)
    return DataLoader(rows, batch_size=batch_size, shuffle=shuffle, collate_fn=collate, generator=generator)


def make_optimizer(params: list[torch.nn.Parameter], name: str, lr: float, weight_decay: float = 0.0,
                   momentum: float = 0.0) -> torch.optim.Optimizer:
    """The client optimizer named by ``train.optimizer``."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"config key 'train.optimizer': got '{name}'; use 'adamw' or 'sgd'.")


def train_local(model: torch.nn.Module, loader: DataLoader, *, epochs: int, lr: float, weight_decay: float = 0.0,
                optimizer_name: str = "adamw", momentum: float = 0.0,
                proximal_mu: float = 0.0, criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                optimizer: torch.optim.Optimizer | None = None, before_step: Callable[[], None] | None = None,
                after_step: Callable[[], None] | None = None, empty_batch: Callable[[], None] | None = None) -> TrainResult:
    """Train the trainable parameters (``optimizer_name`` unless an optimizer is given); optional FedProx term.

    The hooks let a privacy engine check each step (``before_step``/``after_step``) and handle
    a batch with no example (``empty_batch``: the step still happens, e.g. noise only). Without
    ``empty_batch`` an empty batch is skipped.
    """
    criterion = criterion or torch.nn.CrossEntropyLoss()
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError("the model has no trainable parameters")  # a bug, not user input
    optimizer = optimizer or make_optimizer(params, optimizer_name, lr, weight_decay, momentum)
    anchors = [p.detach().clone() for p in params] if proximal_mu > 0 else None
    model.train()
    total_loss, seen, steps, tokens = 0.0, 0, 0, 0
    start = time.perf_counter()
    for _ in range(epochs):
        for batch in loader:
            optimizer.zero_grad(set_to_none=True)
            if not batch or batch["labels"].shape[0] == 0:
                if empty_batch is None:
                    continue
                empty_batch()
            else:
                labels = batch.pop("labels")
                logits = model(**batch).logits
                loss = criterion(logits, labels)
                n = labels.shape[0]
                total_loss += loss.item() * n  # the data loss (without the proximal term)
                if anchors is not None:
                    prox = sum(((p - a) ** 2).sum() for p, a in zip(params, anchors, strict=True))
                    loss = loss + proximal_mu / 2 * prox
                loss.backward()
                seen += n
                tokens += int(batch["attention_mask"].sum())
            if before_step:
                before_step()
            optimizer.step()
            if after_step:
                after_step()
            steps += 1
    return TrainResult(
        loss=total_loss / max(seen, 1),
        num_examples=len(loader.dataset),
        steps=steps,
        tokens=tokens,
        seconds=time.perf_counter() - start,
    )


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: DataLoader, num_labels: int) -> EvalResult:
    """Mean cross-entropy, accuracy and macro-F1 (over labels present in truth or prediction)."""
    model.eval()
    criterion = torch.nn.CrossEntropyLoss(reduction="sum")
    total_loss, n = 0.0, 0
    preds, truth = [], []
    for batch in loader:
        labels = batch.pop("labels")
        logits = model(**batch).logits
        total_loss += criterion(logits, labels).item()
        n += labels.shape[0]
        preds.append(logits.argmax(dim=-1))
        truth.append(labels)
    if n == 0:
        return EvalResult(0.0, 0.0, 0.0, 0)
    p, t = torch.cat(preds), torch.cat(truth)
    return EvalResult(total_loss / n, (p == t).float().mean().item(), macro_f1(p, t, num_labels), n)


def macro_f1(pred: torch.Tensor, truth: torch.Tensor, num_labels: int) -> float:
    f1s = []
    for c in range(num_labels):
        tp = int(((pred == c) & (truth == c)).sum())
        fp = int(((pred == c) & (truth != c)).sum())
        fn = int(((pred != c) & (truth == c)).sum())
        if tp + fp + fn == 0:
            continue  # label absent from both: not counted
        f1s.append(2 * tp / (2 * tp + fp + fn))
    return sum(f1s) / len(f1s) if f1s else 0.0
