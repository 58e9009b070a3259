"""Built models a client process reuses across rounds and partitions, instead of loading and wrapping its base
model for every message (a simulated client's Ray actor serves many rounds and partitions; a deployed node
starts a process per message, where this changes nothing).

A model is lent (:meth:`ModelShelf.take`) and given back (:meth:`ModelShelf.give_back`) only after the work
with it succeeded: a model whose training raised (Opacus hooks may still be on it) is dropped, never reused.
On every loan it is reset to exactly what :func:`fedhf.tasks.model.build_model` made: every adapter tensor
(trained, frozen, and a personalization's local part) to its initial value and its ``requires_grad``, no
gradients or per-sample gradients left. The key is everything that defines the built model; the shelf holds
at most ``size`` models (least recently used leaves first).
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import Any

import torch

from fedhf.config.schema import FedHFConfig
from fedhf.tasks.device import resolve_device
from fedhf.tasks.model import build_model, resolve_model

_PER_SAMPLE = ("grad_sample", "summed_grad", "_forward_counter", "_current_grad_sample", "_norm_sample")


def model_key(cfg: FedHFConfig, label_names: list[str], rank: int | None, device: torch.device) -> tuple:
    """Everything that defines a built model: the base (as resolved here), the whole model config (LoRA,
    adapter, pooling, task), what personalization keeps local, the seed, the labels, the rank and the device."""
    return (
        resolve_model(cfg.model.name),
        repr(dataclasses.asdict(cfg.model)),
        cfg.personalization.mode,
        cfg.personalization.keep_local,
        cfg.seed,
        tuple(label_names),
        rank,
        str(device),
    )


class ModelShelf:
    """At most ``size`` built models of this process, each with its initial adapter state."""

    def __init__(self, size: int = 2) -> None:
        self.size = size
        self._shelf: OrderedDict[tuple, tuple[Any, dict[str, tuple[torch.Tensor, bool]]]] = OrderedDict()
        self.built = 0  # models built (misses), for tests and the benchmark
        self.reused = 0

    def take(self, cfg: FedHFConfig, label_names: list[str], rank: int | None = None) -> Any:
        """A model as ``build_model(cfg, label_names, rank=rank)`` makes it: from the shelf (reset) or new."""
        device = resolve_device(cfg.train.device)
        key = model_key(cfg, label_names, rank, device)
        entry = self._shelf.pop(key, None)
        if entry is None:
            model = build_model(cfg, label_names, device=device, rank=rank)
            self.built += 1
            initial = {
                n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters() if _adapter_tensor(n)
            }
        else:
            model, initial = entry
            _reset(model, initial)
            self.reused += 1
        model._fedhf_shelf_key, model._fedhf_initial = key, initial
        return model

    def give_back(self, model: Any) -> None:
        """Shelve a model whose work succeeded, for the next :meth:`take` with the same key."""
        key = getattr(model, "_fedhf_shelf_key", None)
        if key is None:
            return
        self._shelf[key] = (model, model._fedhf_initial)
        self._shelf.move_to_end(key)
        while len(self._shelf) > self.size:
            self._shelf.popitem(last=False)


def _adapter_tensor(name: str) -> bool:
    return "lora_" in name or "modules_to_save" in name


def _reset(model: Any, initial: dict[str, tuple[torch.Tensor, bool]]) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in initial:
                value, trains = initial[name]
                p.copy_(value)
                p.requires_grad_(trains)
            p.grad = None
            for attr in _PER_SAMPLE:
                if hasattr(p, attr):
                    delattr(p, attr)


SHELF = ModelShelf()  # this process's: keyed on every argument that defines a model, bounded
