"""The task seam: the config's tasks are the registry's, the training loop is task-agnostic, and one inference
loop serves evaluation, the audit's per-example loss and prediction."""

from __future__ import annotations

import inspect

import datasets
import pytest
import torch

from fedhf.config.schema import TASKS, parse_config
from fedhf.errors import FedHFConfigError
from fedhf.tasks.base import Task, get_task
from fedhf.tasks.model import build_model, load_tokenizer
from fedhf.train.loop import train_local

from .conftest import synthetic_rows

PROTOCOL = [name for name, _ in inspect.getmembers(Task, inspect.isfunction)] + [
    "name",
    "pipeline_tag",
    "peft_task_type",
]


def test_every_configurable_task_is_built_and_has_every_member():
    for name in TASKS:
        task = get_task(name)
        assert task.name == name
        missing = [m for m in PROTOCOL if not hasattr(task, m)]
        assert not missing, (name, missing)
    with pytest.raises(FedHFConfigError, match="config key 'model.task': got 'regression'"):
        get_task("regression")
    with pytest.raises(FedHFConfigError, match="model.task"):
        parse_config({"model.task": "regression"})


class Scalar:
    """A task the rest of fedhf never heard of: batches of (x, y) and a squared error. Only what train_local uses."""

    def split(self, batch):
        return {"x": batch["x"]}, batch["y"]

    def criterion(self):
        return torch.nn.MSELoss()

    def output(self, out):
        return out.squeeze(-1)

    def tokens(self, inputs):
        return 0


class Linear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Linear(3, 1)

    def forward(self, x):
        return self.w(x)


def test_the_training_loop_takes_its_batches_and_loss_from_the_task():
    torch.manual_seed(0)
    x = torch.randn(64, 3)
    y = x @ torch.tensor([1.0, -2.0, 0.5])
    rows = [{"x": a, "y": b} for a, b in zip(x, y, strict=True)]
    loader = torch.utils.data.DataLoader(rows, batch_size=16)
    model = Linear()
    before = torch.nn.functional.mse_loss(model(x).squeeze(-1), y).item()
    result = train_local(model, loader, task=Scalar(), epochs=30, lr=0.05, optimizer_name="sgd")
    after = torch.nn.functional.mse_loss(model(x).squeeze(-1), y).item()
    assert result.steps == 30 * 4 and result.num_examples == 64
    assert after < 0.05 * before


def test_one_inference_loop_for_evaluation_the_audit_and_prediction(tiny_model_dir):
    cfg = parse_config({"model.name": str(tiny_model_dir)})
    task = get_task(cfg.model.task)
    labels = ["negative", "positive"]
    model = build_model(cfg, labels).eval()
    tok = load_tokenizer(cfg.model.name)
    rows = synthetic_rows(37, seed=3)
    texts, y = [r["text"] for r in rows], [labels.index(r["label"]) for r in rows]
    ds = datasets.Dataset.from_dict({"text": texts, "label": y})
    res = task.evaluate(model, task.make_loader(ds, tok, 32, 8, shuffle=False, sort_by_length=True), 2)
    losses, preds = task.per_example_loss(model, tok, texts, y, 32)
    assert res.num_examples == 37 and losses.shape == (37,)
    assert float(losses.mean()) == pytest.approx(res.loss, rel=1e-5)
    assert float((preds == torch.tensor(y)).float().mean()) == pytest.approx(res.accuracy)
    predicted = task.predict(model, tok, labels, texts, 32)
    assert [labels.index(p) for p, _ in predicted] == preds.tolist()  # input order kept, the same forward pass
    one = task.predict(model, tok, labels, texts[5:6], 32)[0]
    assert one[0] == predicted[5][0] and one[1] == pytest.approx(predicted[5][1], abs=1e-5)
