"""The local training loop: plain PyTorch, no Flower, no Opacus specifics.

The task (``fedhf.tasks``) says what a batch holds and what the loss reads; the loss is computed
here with a criterion (not the model's own ``outputs.loss``), so a privacy engine can swap in its
own. Evaluation is the task's.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from fedhf.config.schema import LR_SCHEDULES
from fedhf.tasks.base import Task
from fedhf.tasks.device import autocast, check_precision, model_device, to_device


@dataclass
class TrainResult:
    loss: float  # mean per-example loss over the round's training
    num_examples: int  # rows in the training partition (FedAvg weight)
    steps: int
    tokens: int  # non-padding tokens processed (for FLOP counts)
    seconds: float


@dataclass
class Pull:
    """Ditto's regulariser as a decoupled proximal step: after each optimizer step, p <- p - rate * (p - anchor).

    It reads no data (only the weights and the anchor), so under DP-SGD it is post-processing and costs no privacy.
    """

    pairs: list[tuple[torch.nn.Parameter, torch.Tensor]]
    rate: float

    def __call__(self) -> None:
        with torch.no_grad():
            for p, anchor in self.pairs:
                p.sub_(self.rate * (p - anchor))


def round_lr(lr: float, schedule: str, server_round: int, num_rounds: int) -> float:
    """Round ``server_round``'s (1-based) learning rate of ``num_rounds``: held within a round, decayed across them.

    constant: lr every round; linear: lr * (R - r + 1) / R (lr, ..., lr / R);
    cosine: lr * (1 + cos(pi (r - 1) / R)) / 2
    (still above 0 in the last round). Under DP the step size is post-processing of the
    noisy gradients: the schedule changes no privacy figure.
    """
    if schedule == "constant" or num_rounds <= 1:
        return lr
    r = min(max(server_round, 1), num_rounds)
    if schedule == "linear":
        return lr * (num_rounds - r + 1) / num_rounds
    if schedule == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * (r - 1) / num_rounds))
    raise ValueError(f"config key 'train.lr-schedule': got '{schedule}'; use one of {', '.join(LR_SCHEDULES)}.")


def make_optimizer(
    params: list[torch.nn.Parameter], name: str, lr: float, weight_decay: float = 0.0, momentum: float = 0.0
) -> torch.optim.Optimizer:
    """The client optimizer named by ``train.optimizer``."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"config key 'train.optimizer': got '{name}'; use 'adamw' or 'sgd'.")


def train_local(
    model: torch.nn.Module,
    loader: DataLoader,
    *,
    task: Task,
    epochs: int,
    lr: float,
    weight_decay: float = 0.0,
    optimizer_name: str = "adamw",
    momentum: float = 0.0,
    proximal_mu: float = 0.0,
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    before_step: Callable[[], None] | None = None,
    after_step: Callable[[], None] | None = None,
    empty_batch: Callable[[], None] | None = None,
    pull: Pull | None = None,
    precision: str = "fp32",
) -> TrainResult:
    """Train the trainable parameters (``optimizer_name`` unless an optimizer is given); optional FedProx term.

    The hooks let a privacy engine check each step (``before_step``/``after_step``) and handle
    a batch with no example (``empty_batch``: the step still happens, e.g. noise only). Without
    ``empty_batch`` an empty batch is skipped. ``pull``: Ditto's step toward the global adapter, after each step.
    Batches go to the model's device; ``precision`` (train.precision) bf16 or fp16 runs the forward pass under
    autocast, fp16 with loss scaling (never under DP: the config refuses it there).
    """
    device = model_device(model)
    check_precision(precision, device)
    if precision != "fp32" and (before_step or after_step or empty_batch):  # a bug: DP refuses mixed precision
        raise RuntimeError("mixed precision with step hooks (DP-SGD) is not supported")
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    criterion = criterion or task.criterion()
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
            inputs, target = task.split(to_device(batch, device)) if batch else ({}, None)
            if target is None or target.shape[0] == 0:
                if empty_batch is None:
                    continue
                empty_batch()
            else:
                with autocast(device, precision):
                    loss = criterion(task.output(model(**inputs)), target)
                n = target.shape[0]
                total_loss += loss.item() * n  # the data loss (without the proximal term)
                if anchors is not None:
                    prox = sum(((p - a) ** 2).sum() for p, a in zip(params, anchors, strict=True))
                    loss = loss + proximal_mu / 2 * prox
                (scaler.scale(loss) if scaler is not None else loss).backward()
                seen += n
                tokens += task.tokens(inputs)
            if before_step:
                before_step()
            if scaler is not None:
                scaler.step(optimizer)  # skips a step whose scaled gradients overflowed, then adjusts the scale
                scaler.update()
            else:
                optimizer.step()
            if after_step:
                after_step()
            if pull is not None:
                pull()
            steps += 1
    return TrainResult(
        loss=total_loss / max(seen, 1),
        num_examples=len(loader.dataset),
        steps=steps,
        tokens=tokens,
        seconds=time.perf_counter() - start,
    )
