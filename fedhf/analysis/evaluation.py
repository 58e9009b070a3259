"""After a run: evaluate its released adapter on other data, and per-example losses for the audit. No Flower.

``evaluate_run(RUN_DIR, {"data.languages": "orm"})`` evaluates the adapter exactly as released
(``hub/``, loaded with PEFT) on the evaluation split of the run's dataset with some ``data.*``
keys changed, e.g. another AfriSenti language, and records the result in ``run.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedhf.config.schema import FedHFConfig, parse_config
from fedhf.errors import FedHFConfigError, FedHFRunError
from fedhf.run.record import check_run_folder
from fedhf.run.store import RunRecord, RunStore, load_finished_run

if TYPE_CHECKING:
    from fedhf.tasks.adapters import LoadedAdapter


def run_config(run: RunRecord, overrides: dict[str, Any] | None = None) -> FedHFConfig:
    """The run's own config (as recorded), with ``overrides`` applied."""
    return parse_config({**run.settings, **(overrides or {})})


def released_model(run_dir: str | Path, run: RunRecord) -> LoadedAdapter:
    """The adapter as released (the run's hub/ folder, else adapter/), loaded with PEFT on its base model."""
    from fedhf.tasks.adapters import load_adapter_model

    d = Path(run_dir)
    folder = d / "hub" if (d / "hub" / "adapter_config.json").is_file() else d / "adapter"
    # The base as the run configured it on this machine (the published copy names only a Hub id).
    return load_adapter_model(folder, base_model=run.settings["model.name"])


EVAL_KEYS = (
    "data.dataset",
    "data.languages",
    "data.max-eval-examples",
    "data.text-column",
    "data.label-column",
    "data.max-length",
)


def evaluate_run(run_dir: str | Path, overrides: dict[str, Any], record: bool = True) -> dict[str, Any]:
    """Evaluate the released adapter on the eval split named by the run's config with ``overrides``."""
    from fedhf.data.load import load_data, onto_label_names
    from fedhf.data.partitions import central_eval_set

    run = load_finished_run(run_dir, "evaluate")
    if record:  # the result is written into run.json: only into a run folder fedhf made
        check_run_folder(Path(run_dir), "evaluate")
    bad = [k for k in overrides if k not in EVAL_KEYS]
    if bad:
        raise FedHFConfigError(
            f"evaluate: cannot change {', '.join(bad)} after training; allowed: {', '.join(EVAL_KEYS)}."
        )
    cfg = run_config(run, overrides)
    loaded = load_data(cfg.data)
    trained_on = (run.dataset.format if run.dataset else None) or "labels"
    if loaded.format != trained_on:
        raise FedHFConfigError(
            f"evaluate: the data is of data.format '{loaded.format}', and the adapter was trained on '{trained_on}' "
            "rows; evaluate it on data of the same shape."
        )
    data = onto_label_names(loaded, run.dataset.label_names, "evaluate")
    ds = central_eval_set(data, cfg.data, cfg.seed)
    released = released_model(run_dir, run)
    task = released.task
    res = task.evaluate(
        released.model,
        task.make_loader(ds, released.tokenizer, cfg.data.max_length, 64, shuffle=False, sort_by_length=True),
        len(data.label_names),
    )
    result = {
        "data": {k: overrides[k] for k in sorted(overrides)},
        "rows": res.num_examples,
        "loss": res.loss,
        "accuracy": res.accuracy,
        "macro_f1": res.macro_f1,
    }
    if record:

        def add(record: RunRecord) -> None:
            kept = [e for e in record.evaluations if e.get("data") != result["data"]]
            record.evaluations = kept + [result]

        RunStore(run_dir).update("evaluate", add)
    return result


def parse_overrides(items: list[str]) -> dict[str, Any]:
    from fedhf.config.schema import parse_set_args

    if not items:
        return {}
    try:
        return parse_set_args(items)
    except FedHFConfigError as exc:
        raise FedHFRunError(f"evaluate: {exc}") from None
