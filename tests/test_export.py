"""fedhf export (issue 19): the adapter merged into its base, then PyTorch dynamic int8, ONNX or ONNX int8; each
written whole to RUN_DIR/export/FORMAT/, measured against the fp32 merged model, loaded back with its own runtime
by the card's own code, and published by fedhf push --export. Bad input: one clear error, nothing half-written."""

from __future__ import annotations

import json
import logging
import re
import warnings

import numpy as np
import pytest
import torch

from fedhf.analysis import export as X
from fedhf.errors import FedHFConfigError, FedHFHubError, FedHFModelError, FedHFRunError
from fedhf.release.hub import push

from .test_hub import finished_run  # noqa: F401,F811  (the fixture: a finished run of a tiny trained adapter, SST-2)

TEXTS = ["a wonderful film", "dull and boring", "the plot was fine", "an utterly gripping, beautifully shot story"]


def fp32_logits(run_dir, texts):
    from fedhf.run.store import load_run

    merged, tok, _ = X._merged(run_dir, load_run(run_dir))
    with torch.no_grad():
        return merged(**tok(texts, return_tensors="pt", padding=True)).logits


def card_code(folder) -> str:
    """The loading code of the export's card section, as a user would paste it."""
    text = (folder / "README.md").read_text()
    return re.search(r"```python\n(.*?)```", text, re.S).group(1)


@pytest.mark.parametrize("fmt", X.FORMATS)
def test_each_format_loads_with_its_runtime_by_the_cards_code_and_predicts_as_the_merged_model(
    finished_run,  # noqa: F811
    fmt,
    caplog,
):
    run_dir, _ = finished_run
    caplog.set_level(logging.WARNING)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        folder, f = X.export_run(run_dir, fmt, threads=1, latency_repeats=2)
    # the notes of peft, the tracer, the ONNX exporter and ONNX Runtime that are not the user's to act on, silenced
    # where they arise (torch's own deprecation of its quantized tensors is not filtered; torch gives it once per
    # process, so whether this test hears it depends on the order tests ran in)
    silenced = ("is_gradient_checkpointing", "Converting a tensor to a Python boolean", "aten::index", "TorchScript")
    heard = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    assert not [m for m in heard if any(s in m for s in silenced) or "pre-processing before quantization" in m], heard
    assert folder == run_dir / "export" / fmt and not [p for p in folder.parent.iterdir() if p.name.startswith(".")]
    saved = json.loads((folder / "export.json").read_text())
    assert saved["format"] == fmt and saved["rows"] == 872 and saved["bytes"] == (folder / f.file).stat().st_size
    # (the tiny model is nearly all embedding table, which stays fp32: the size target is the real model's, in the
    # benchmark; here the linear layers must really be int8)
    assert 0.0 < saved["bytes"] / saved["fp32_bytes"] < 1.1
    assert saved["fp32_accuracy"] == pytest.approx(f.fp32_accuracy) and f.agreement >= 0.9
    # the card's own loading code, run with the ordinary tools, gives what the fp32 merged model gives
    code = card_code(folder).replace('path = "export/', f'path = "{run_dir}/export/')
    code = re.sub(r'\["a gripping, beautifully shot film"\]', repr(TEXTS), code)
    code = code.replace("print(", "result = (")
    scope: dict = {}
    exec(code, scope)  # noqa: S102
    got = torch.as_tensor(np.asarray(scope["result"]))
    want = fp32_logits(run_dir, TEXTS)
    if fmt == "int8":
        got = got.log() - got.log().logsumexp(-1, keepdim=True)  # the snippet prints probabilities
        want = want.log_softmax(-1)
    tol = 1e-3 if fmt == "onnx" else 0.15
    assert got.shape == want.shape and float((got - want).abs().max()) < tol, (got, want)
    if fmt == "int8":
        from torch.ao.nn.quantized.dynamic import Linear as Int8Linear

        model = scope["model"]
        assert isinstance(model.bert.encoder.layer[0].attention.self.query, Int8Linear)  # the encoder's int8
        assert type(model.classifier) is torch.nn.Linear  # the head fp32
    elif fmt == "onnx-int8":
        import onnx

        graph = onnx.load(str(folder / f.file)).graph
        assert any(t.data_type == onnx.TensorProto.INT8 for t in graph.initializer)
    text = (folder / "README.md").read_text()
    assert f"## Export: {fmt}" in text and "merge_and_unload" in text and "latency per example, batch 32" in text


def test_push_publishes_an_export_with_its_card_section(finished_run):  # noqa: F811
    run_dir, _ = finished_run
    with pytest.raises(
        FedHFHubError,
        match=r"--export int8: the run has no finished int8 export .* run .fedhf export .* --format int8. first",
    ):
        push(run_dir, "someone/model", dry_run=True, exports=("int8",))
    with pytest.raises(FedHFHubError, match=r"--export: got '\.\./x'"):
        push(run_dir, "someone/model", dry_run=True, exports=("../x",))
    X.export_run(run_dir, "int8", threads=1, latency_repeats=1)
    files = dict(push(run_dir, "someone/model", dry_run=True, exports=("int8",)).files)
    assert {"export/int8/model_int8.pt", "export/int8/export.json", "export/int8/config.json", "README.md"} <= set(
        files
    )
    assert "export/int8/README.md" not in files  # its text is in the card
    assert files["README.md"] > (run_dir / "hub" / "README.md").stat().st_size
    assert not any(name.startswith("export/") for name in dict(push(run_dir, "someone/model", dry_run=True).files))


def test_bad_exports_are_refused_and_nothing_is_half_written(finished_run, monkeypatch):  # noqa: F811
    run_dir, run = finished_run
    with pytest.raises(FedHFConfigError, match=r"--format: got 'fp8'; use one of int8, onnx, onnx-int8"):
        X.check_format("fp8")
    monkeypatch.setattr(X.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FedHFConfigError, match=r"--format onnx needs the package\(s\) onnx, onnxscript, onnxruntime"):
        X.check_format("onnx")
    X.check_format("int8")  # torch only
    monkeypatch.undo()

    def broken(*_a, **_k):
        raise RuntimeError("the exporter fell over")

    monkeypatch.setattr(X, "_write_onnx", broken)
    with pytest.raises(RuntimeError, match="fell over"):
        X.export_run(run_dir, "onnx", threads=1, latency_repeats=1)
    assert not (run_dir / "export" / "onnx").exists() and list((run_dir / "export").iterdir()) == []
    for status in ("running", "failed"):
        (run_dir / "run.json").write_text(json.dumps({**run, "status": status}))
        with pytest.raises(FedHFRunError, match="Export only a complete run"):
            X.export_run(run_dir, "int8")
    flat = {**run["config"], "model.pooling": "mean"}
    (run_dir / "run.json").write_text(json.dumps({**run, "config": flat}))
    with pytest.raises(FedHFModelError, match=r"model.pooling 'mean'.*export supports model.pooling 'cls'"):
        X.export_run(run_dir, "int8")


def test_latency_is_timed_in_turns_over_the_same_batches(monkeypatch):
    """Both runtimes are timed on the same full batches, taking turns block by block (who goes first alternates),
    each block after an untimed warm-up batch, so drift in the machine's speed falls on both alike. A fake clock
    that each call advances by a known cost stands in for the wall clock."""
    clock = [0.0]
    calls: list[tuple[str, tuple[str, ...]]] = []

    class Fake:
        def __init__(self, name: str, costs: list[float]) -> None:
            self.name, self.costs, self.n = name, costs, 0

        def encode(self, batch: list[str]) -> tuple[str, ...]:
            return tuple(batch)

        def logits(self, encoded: tuple[str, ...]) -> None:
            calls.append((self.name, encoded))
            clock[0] += self.costs[self.n % len(self.costs)]  # per block: the warm-up, then 3 timed batches
            self.n += 1

    monkeypatch.setattr(X, "time", type("FakeTime", (), {"perf_counter": staticmethod(lambda: clock[0])}))
    texts = [f"t{i}" for i in range(3)]  # fewer texts than a batch: batches cycle through them
    a = Fake("a", [100.0, 1.0, 2.0, 3.0])
    b = Fake("b", [100.0, 10.0, 20.0, 30.0])
    a_ms, b_ms = X.paired_latency_ms(a, b, texts, batch_size=4, repeats=6, block=3)
    assert (a_ms, b_ms) == (1000 * 2.0 / 4, 1000 * 20.0 / 4)  # the medians of the timed batches, per example
    assert [name for name, _ in calls] == ["a"] * 4 + ["b"] * 4 + ["b"] * 4 + ["a"] * 4
    seen = {n: [enc for name, enc in calls if name == n] for n in ("a", "b")}
    assert seen["a"] == seen["b"]  # the same batches, in the same order
    assert all(len(enc) == 4 for _, enc in calls) and calls[0][1] == ("t0", "t1", "t2", "t0")
