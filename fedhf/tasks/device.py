"""Where a model runs (``train.device``) and in what precision it computes (``train.precision``).

``resolve_device`` is called on the machine that trains or evaluates (a node, or the server for its
central evaluation), since that machine's hardware is what counts: ``auto`` is CUDA when torch sees a
GPU there, else the CPU; a device that is named but not present is an error that says
so (``mps`` is used only when named). The model is put on its device before LoRA and Opacus wrap it
(``fedhf.tasks.model.build_model``); batches follow the model (``to_device``); ``autocast`` is mixed
precision for the forward pass.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from fedhf.config.schema import DEVICES
from fedhf.errors import FedHFConfigError


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(name: str) -> torch.device:
    """The torch device ``train.device`` names on this machine; raises when it is not present."""
    if name == "auto":  # MPS only when named: fedhf has not been run on it
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            why = (
                "this torch is a CPU-only build"
                if torch.version.cuda is None
                else "torch sees no CUDA device (CUDA_VISIBLE_DEVICES, the driver, or a simulated client given no "
                "GPU share: fedhf run --gpus-per-client)"
            )
            raise FedHFConfigError(
                f"config key 'train.device': got 'cuda', but {why}; use train.device=auto (CUDA when present, else "
                "the CPU) or cpu."
            )
        return torch.device("cuda")
    if name == "mps":
        if not _mps_available():
            raise FedHFConfigError(
                "config key 'train.device': got 'mps', but torch sees no Apple MPS device on this machine; use "
                "train.device=auto or cpu."
            )
        return torch.device("mps")
    raise FedHFConfigError(f"config key 'train.device': got {name!r}; use one of {', '.join(DEVICES)}.")


def check_precision(precision: str, device: torch.device) -> None:
    """Raise when ``train.precision`` cannot run on ``device``: fp16 needs CUDA (its loss scaling); bf16 needs a
    CPU, or a GPU that computes in bf16."""
    if precision == "fp16" and device.type != "cuda":
        raise FedHFConfigError(
            f"config key 'train.precision': got 'fp16' on device '{device.type}'; fp16 mixed precision (with loss "
            "scaling) runs on CUDA only: use bf16 on this device, or fp32."
        )
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise FedHFConfigError(
            "config key 'train.precision': got 'bf16', but this GPU does not compute in bf16; use fp16 or fp32."
        )
    if precision == "bf16" and device.type == "mps":
        raise FedHFConfigError("config key 'train.precision': got 'bf16' on MPS, which fedhf does not test; use fp32.")


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of a model's (first) parameter: where its batches must go."""
    return next(model.parameters()).device


def to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """A batch's tensors on ``device`` (other values as they are); the CPU's own tensors are not copied."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@contextlib.contextmanager
def autocast(device: torch.device, precision: str) -> Iterator[None]:
    """Mixed precision for what runs inside (``train.precision`` bf16 or fp16); fp32 changes nothing."""
    if precision == "fp32":
        yield
        return
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


def gpu_share(requested: float | None, device: str, num_clients: int, gpus: int | None = None) -> float:
    """The GPU share Ray reserves for each simulated client (``fedhf run --gpus-per-client``); in a simulation a
        client sees a GPU only with a share. Unset: none without a GPU or with train.device cpu/mps; else every client
        gets an equal share of one GPU, as many clients per GPU as it takes to place them all (CPUs permitting, all
    train at once; each holds its own model copies in GPU memory). ``gpus``: the
        GPUs torch sees (default: counted here)."""
    gpus = torch.cuda.device_count() if gpus is None else gpus
    if requested is None:
        if device in ("cpu", "mps") or gpus == 0:
            return 0.0
        per_gpu = math.ceil(max(num_clients, 1) / gpus)  # Ray places a share on one GPU: clients per GPU, whole
        return max(math.floor(10_000 / per_gpu) / 10_000, 0.0001)
    if not math.isfinite(requested) or requested < 0 or requested > 1:
        raise FedHFConfigError(
            f"--gpus-per-client: got {requested:g}; a client trains on one GPU at most: give a share from 0 to 1 "
            "(e.g. 0.25: four clients per GPU at once; 0: none)."
        )
    if requested > 0 and abs(requested * 10_000 - round(requested * 10_000)) > 1e-9:
        raise FedHFConfigError(
            f"--gpus-per-client: got {requested:g}; Ray places GPU shares in steps of 0.0001: round it, e.g. "
            f"{math.floor(requested * 10_000) / 10_000:g}."
        )
    if requested > 0 and gpus == 0:
        raise FedHFConfigError(
            f"--gpus-per-client: got {requested:g}, but torch sees no GPU on this machine (CPU-only torch: "
            f"{torch.version.cuda is None}); leave the option out, or run where there is one."
        )
    if requested > 0 and device in ("cpu", "mps"):
        raise FedHFConfigError(
            f"--gpus-per-client: got {requested:g} with train.device '{device}': each client would hold a GPU share "
            "and not use it; set train.device=auto or cuda, or leave the option out."
        )
    if requested == 0 and device == "cuda" and gpus > 0:
        raise FedHFConfigError(
            "--gpus-per-client: got 0 with train.device 'cuda': a simulated client given no GPU share sees no GPU; "
            "give a share (e.g. 0.5), or use train.device=auto."
        )
    return float(requested)
