"""Save a trained adapter (PEFT format + fedhf.json), load it back (a run folder, an adapter folder or a Hub
repo) and predict with it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedhf.config.schema import FedHFConfig
from fedhf.errors import FedHFHubError

if TYPE_CHECKING:
    from fedhf.tasks.base import Task


def resolve_adapter(model: str) -> Path:
    """A folder holding an adapter: a run folder (its adapter/ or hub/), an adapter folder, or a Hub repo id."""
    path = Path(model).expanduser()
    if path.exists():
        # A run folder's adapter/ first: it names the base as trained here (hub/ names only a published Hub id).
        for candidate in (path / "adapter", path / "hub", path):
            if (candidate / "adapter_config.json").is_file():
                return candidate
        raise FedHFHubError(
            f"--model '{model}': no adapter there (no adapter_config.json in it, its hub/ or adapter/)."
        )
    if model.startswith((".", "/", "~")):
        raise FedHFHubError(f"--model '{model}': no such folder.")
    from huggingface_hub import snapshot_download

    try:
        local = Path(snapshot_download(model, repo_type="model"))
    except Exception as exc:  # not found, offline, refused
        raise FedHFHubError(
            f"--model '{model}': cannot download it from the Hub ({type(exc).__name__}); "
            f"check the repo id, HF_ENDPOINT and the token."
        ) from None
    if not (local / "adapter_config.json").is_file():
        raise FedHFHubError(f"--model '{model}': the repo holds no adapter (no adapter_config.json).")
    return local


@dataclass(frozen=True)
class LoadedAdapter:
    """A fedhf adapter on its base model, with what fedhf.json says of it: its labels, max length and task."""

    model: Any
    tokenizer: Any
    labels: list[str]
    max_length: int
    task: Task

    def predict(self, texts: list[str], generation: Any = None) -> list[tuple[str, float]]:
        """What ``fedhf predict`` prints for each text (the adapter's task's own prediction); ``generation``: a
        generative task's settings (``fedhf.tasks.causal_lm.GenerationSettings``), None for its default."""
        if generation is None:
            return self.task.predict(self.model, self.tokenizer, self.labels, texts, self.max_length)
        return self.task.predict(self.model, self.tokenizer, self.labels, texts, self.max_length, generation)


def load_adapter_model(folder: Path, base_model: str | None = None) -> LoadedAdapter:
    """A fedhf adapter folder loaded with PEFT on its base model; ``base_model`` overrides the base it names."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    from fedhf.tasks.base import get_task
    from fedhf.tasks.model import peft_wrapping, resolve_model

    meta_path = folder / "fedhf.json"
    if not meta_path.is_file():
        raise FedHFHubError(f"'{folder}' has no fedhf.json (label names and base model); was it written by fedhf?")
    meta = json.loads(meta_path.read_text())
    labels = meta["label_names"]
    base_name = base_model or meta.get("base_model")
    if not base_name:
        raise FedHFHubError(
            f"'{folder}' does not name its base model (it was trained from a local folder whose Hub id "
            "was not given); give --base-model with the Hub id or a local folder of that base."
        )
    task = get_task(meta.get("task", "text-classification"), labels, meta.get("data_format", "labels"))
    base = task.load_base(resolve_model(base_name), labels, meta.get("pooling", "cls"))  # before model.pooling: cls
    with peft_wrapping():
        model = PeftModel.from_pretrained(base, folder).eval()
    return LoadedAdapter(model, AutoTokenizer.from_pretrained(folder), labels, int(meta.get("max_length", 128)), task)


def save_adapter(
    model: Any, tokenizer: Any, cfg: FedHFConfig, label_names: list[str], path: Path, data_format: str = "labels"
) -> None:
    """PEFT ``save_pretrained`` format + tokenizer, the base named as configured (model.name: a Hub id, or a folder on
    this machine, which ``fedhf predict RUN_DIR`` loads); the published copy in hub/ names only a Hub id."""
    peft_config = model.peft_config["default"]
    local_base = peft_config.base_model_name_or_path
    peft_config.base_model_name_or_path = cfg.model.name
    try:
        model.save_pretrained(path, save_embedding_layers=False)
    finally:
        peft_config.base_model_name_or_path = local_base
    tokenizer.save_pretrained(path)
    (path / "fedhf.json").write_text(
        json.dumps(
            {
                "base_model": cfg.model.name,
                "label_names": label_names,
                "max_length": cfg.data.max_length,
                "num_labels": len(label_names),
                "pooling": cfg.model.pooling,
                "task": cfg.model.task,
                "data_format": data_format,  # how a prompt is written (labels, instruction or messages records)
            },
            indent=2,
        )
        + "\n"
    )
