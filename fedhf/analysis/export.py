"""A small, fast model for CPU inference out of a finished run (``fedhf export RUN_DIR --format F``). No Flower.

The released adapter is merged into its base model (PEFT ``merge_and_unload``: one plain transformers
classifier, fp32), then:

- ``int8``: PyTorch dynamic int8 quantization of every ``nn.Linear`` (weights int8, activations quantized on
  the fly), saved as the quantized ``state_dict`` next to the model's ``config.json``;
- ``onnx``: ONNX export of the merged model (``torch.onnx``'s TorchScript exporter, eager attention), run with ONNX
  Runtime;
- ``onnx-int8``: that ONNX graph with ONNX Runtime's dynamic int8 quantization of its weights.

Each export is measured against the fp32 merged model on the run's central evaluation rows (accuracy, and CPU
latency per example at batch 1 and 32 on the same threads) and written whole to ``RUN_DIR/export/<format>/``
(model, tokenizer, ``export.json`` with the figures, ``README.md`` with its card section and loading code), or not
at all: it is built in a temporary folder and moved into place at the end. What is measured here was measured on
this machine's CPU.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import statistics
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from fedhf.errors import FedHFConfigError, FedHFModelError, FedHFRunError
from fedhf.release.hub import EXPORT_FORMATS

FORMATS = EXPORT_FORMATS
# what each format needs besides torch: (module, the package that installs it)
RUNTIMES = {
    "int8": (),
    "onnx": (("onnx", "onnx"), ("onnxscript", "onnxscript"), ("onnxruntime", "onnxruntime")),
    "onnx-int8": (("onnx", "onnx"), ("onnxscript", "onnxscript"), ("onnxruntime", "onnxruntime")),
}
FILES = {"int8": "model_int8.pt", "onnx": "model.onnx", "onnx-int8": "model_int8.onnx"}
INPUTS = ("input_ids", "attention_mask")


@dataclass
class ExportFigures:
    """What ``export.json`` records of one export (sizes in bytes, latency in milliseconds per example)."""

    format: str
    file: str
    bytes: int
    fp32_bytes: int
    rows: int
    accuracy: float
    fp32_accuracy: float
    agreement: float  # the share of rows where the export predicts what the fp32 merged model predicts
    latency_ms_batch1: float
    fp32_latency_ms_batch1: float
    latency_ms_batch32: float
    fp32_latency_ms_batch32: float
    threads: int
    runtime: str
    max_length: int
    label_names: list[str]


def check_format(fmt: str) -> None:
    """Raise unless ``fmt`` is an export format whose runtime is installed (naming the package to install)."""
    if fmt not in FORMATS:
        raise FedHFConfigError(f"--format: got {fmt!r}; use one of {', '.join(FORMATS)}.")
    missing = [pkg for module, pkg in RUNTIMES[fmt] if importlib.util.find_spec(module) is None]
    if missing:
        raise FedHFConfigError(
            f"--format {fmt} needs the package(s) {', '.join(missing)}, which are not installed; install them "
            f"(pip install 'fedhf[export]'), or export --format int8, which needs only torch."
        )


def _merged(run_dir: Path, run: Any) -> tuple[Any, Any, Any]:
    """(the fp32 merged classifier, its tokenizer, the loaded adapter) of a finished run."""
    from fedhf.analysis.evaluation import released_model

    released = released_model(run_dir, run)
    if released.task.name != "text-classification":
        raise FedHFModelError(
            f"fedhf export: the run's task is '{released.task.name}'; export supports text-classification runs "
            "(a causal LM's generation loop is not exported yet)."
        )
    pooling = run.settings.get("model.pooling", "cls")
    if pooling != "cls":
        raise FedHFModelError(
            f"fedhf export: the run used model.pooling '{pooling}', whose head reads a forward hook that a plain "
            "config.json load or an ONNX graph do not carry; export supports model.pooling 'cls' runs."
        )
    merged = released.model.merge_and_unload().eval()
    return merged, released.tokenizer, released


def _eval_texts(run: Any) -> tuple[list[str], list[int]]:
    """The run's central evaluation rows (texts, label ids), as the run scored them."""
    from fedhf.analysis.evaluation import run_config
    from fedhf.data.load import load_data, onto_label_names
    from fedhf.data.partitions import central_eval_set

    cfg = run_config(run)
    data = onto_label_names(load_data(cfg.data), run.dataset.label_names, "export")
    ds = central_eval_set(data, cfg.data, cfg.seed)
    return list(ds["text"]), [int(y) for y in ds["label"]]


class _Runner:
    """Logits of a batch of texts from one runtime (torch module or ONNX Runtime session)."""

    def __init__(self, tokenizer: Any, max_length: int, torch_model: Any = None, session: Any = None) -> None:
        self.tokenizer, self.max_length, self.model, self.session = tokenizer, max_length, torch_model, session

    def encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(texts, truncation=True, max_length=self.max_length, padding=True, return_tensors="pt")
        return {k: enc[k] for k in INPUTS}

    def logits(self, enc: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.session is not None:
            return torch.from_numpy(self.session.run(["logits"], {k: v.numpy() for k, v in enc.items()})[0])
        with torch.inference_mode():
            return self.model(**enc).logits.float()

    def predictions(self, texts: list[str], batch_size: int = 32) -> torch.Tensor:
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # little padding; put back after
        preds = torch.empty(len(texts), dtype=torch.long)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            preds[idx] = self.logits(self.encode([texts[i] for i in idx])).argmax(-1)
        return preds


def paired_latency_ms(
    a: _Runner, b: _Runner, texts: list[str], batch_size: int, repeats: int, block: int = 5
) -> tuple[float, float]:
    """Median wall time per example of ``a`` and of ``b`` over the same ``repeats`` batches of ``batch_size`` texts.

    The two take turns in blocks of ``block`` batches (a first in one block, b first in the next), each block
    after an untimed warm-up batch: a machine whose speed drifts from second to second slows both alike, and
    neither times a batch while the other's threads are still spinning down. A whole number of block pairs
    (``repeats`` a multiple of 2 x ``block``) gives each the first turn equally often. Batches are full, cycling
    through ``texts``."""
    if repeats < 1 or not texts:
        raise ValueError("paired_latency_ms needs at least one batch and one text")  # a bug, not user input
    batches = [[texts[(k * batch_size + j) % len(texts)] for j in range(batch_size)] for k in range(repeats)]
    times: tuple[list[float], list[float]] = ([], [])
    for n, start in enumerate(range(0, repeats, block)):
        chunk = batches[start : start + block]
        for which in (0, 1) if n % 2 == 0 else (1, 0):
            runner = (a, b)[which]
            for k, batch in enumerate([chunk[0], *chunk]):
                encoded = runner.encode(batch)
                t0 = time.perf_counter()
                runner.logits(encoded)
                if k:
                    times[which].append(time.perf_counter() - t0)
    return 1000 * statistics.median(times[0]) / batch_size, 1000 * statistics.median(times[1]) / batch_size


def int8_spec(model: Any) -> dict[str, Any]:
    """Which modules the int8 export quantizes, and how: every linear layer of the encoder, per output channel;
    the classifier head and the pooler stay fp32 (small, and where int8 rounding moved predictions most)."""
    from torch.ao.quantization import per_channel_dynamic_qconfig

    keep = _kept_fp32(model)
    return {
        name: per_channel_dynamic_qconfig
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and not name.startswith(keep)
    }


def _kept_fp32(model: Any) -> tuple[str, ...]:
    from fedhf.tasks.text_classification import HEAD_MODULES

    return (*HEAD_MODULES, f"{model.base_model_prefix}.pooler")


def _write_int8(merged: Any, folder: Path) -> tuple[Any, str]:
    """(the quantized module, its runtime's words), its state_dict saved in ``folder``."""
    from torch.ao.quantization import quantize_dynamic

    quantized = quantize_dynamic(merged, int8_spec(merged), dtype=torch.qint8)
    torch.save(quantized.state_dict(), folder / FILES["int8"])
    return quantized, f"torch {torch.__version__} dynamic int8, per channel ({torch.backends.quantized.engine})"


def _no_preprocess_hint(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Please consider to run pre-processing before quantization")


def _write_onnx(merged: Any, tokenizer: Any, folder: Path, max_length: int, fmt: str, threads: int) -> tuple:
    """(an ONNX Runtime session on the written graph, its runtime's words)."""
    import onnxruntime as ort

    sample = tokenizer(["an example", "a longer example sentence"], padding=True, return_tensors="pt")
    graph = folder / ("model_fp32.onnx" if fmt == "onnx-int8" else FILES["onnx"])
    # The TorchScript exporter over eager attention: the graph ONNX Runtime runs fastest (measured on the quickstart
    # model, 2 threads: 1.9 ms per example at batch 32 in int8 against 2.6 ms from torch.export over SDPA, whose
    # decomposed attention is slower than torch's own fp32 at batch 32). torch 2.13 marks that exporter deprecated:
    # only that warning is silenced, and only around this call.
    previous = merged.config._attn_implementation
    merged.set_attn_implementation("eager")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "You are using the legacy TorchScript-based ONNX", DeprecationWarning)
            # Tracing notes, not the user's to act on, silenced here only: transformers' masking utils turn tensors
            # into Python booleans (the mask padding branches, traced as taken or not for the sample's shapes; for
            # an encoder's own attention mask, keys and mask have the same length at every batch), and aten::index
            # becomes several ONNX operators (its note warns about negative indices). Neither is taken on trust: the
            # export's predictions are compared with the fp32 model's on every central row, each at its own length,
            # and timed at batch 1 and 32 (export.json's agreement; a test checks the onnx logits within 1e-3).
            warnings.filterwarnings(
                "ignore",
                "Converting a tensor to a Python boolean",
                torch.jit.TracerWarning,
                module=r"transformers\.masking_utils",
            )
            warnings.filterwarnings("ignore", "Exporting aten::index operator of advanced indexing", UserWarning)
            torch.onnx.export(
                merged,
                (),
                str(graph),
                kwargs={k: sample[k] for k in INPUTS},
                input_names=list(INPUTS),
                output_names=["logits"],
                dynamic_axes={k: {0: "batch", 1: "sequence"} for k in INPUTS},
                opset_version=17,
                dynamo=False,
            )
    finally:
        merged.set_attn_implementation(previous)
    if fmt == "onnx-int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        # ONNX Runtime logs, through the root logger, a suggestion to pre-process the graph first. Measured on the
        # quickstart model: its symbolic shape inference fails on this graph ("Incomplete symbolic shape inference")
        # and, without it, pre-processing gave no faster or smaller model. Only that record is dropped, here.
        root = logging.getLogger()
        root.addFilter(_no_preprocess_hint)
        try:
            quantize_dynamic(str(graph), str(folder / FILES[fmt]), weight_type=QuantType.QInt8, per_channel=True)
        finally:
            root.removeFilter(_no_preprocess_hint)
        graph.unlink()
        graph = folder / FILES[fmt]
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # Flush denormal floats to zero: the attention softmax otherwise spends most of its time on them (14.5 against
    # 2.9 ms per batch of 32 in ONNX Runtime's profile of the quickstart's int8 graph); values below 1.2e-38 only.
    options.add_session_config_entry("session.set_denormal_as_zero", "1")
    session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
    words = f"onnxruntime {metadata.version('onnxruntime')}" + (" dynamic int8" if fmt == "onnx-int8" else "")
    return session, words


def export_run(
    run_dir: str | Path, fmt: str, *, threads: int | None = None, latency_repeats: int = 30
) -> tuple[Path, ExportFigures]:
    """Export a finished run's adapter merged into its base as ``fmt``; returns (the export folder, its figures)."""
    from fedhf.run.store import load_finished_run

    check_format(fmt)
    run_dir = Path(run_dir)
    try:
        run = load_finished_run(run_dir, "export")
    except FedHFRunError as exc:
        raise FedHFRunError(f"{exc} Export only a complete run.") from None
    threads = threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    merged, tokenizer, released = _merged(run_dir, run)
    max_length = released.max_length
    texts, labels = _eval_texts(run)
    if not texts:
        raise FedHFRunError("fedhf export: the run has no central evaluation rows to measure the export on.")
    truth = torch.tensor(labels)
    fp32 = _Runner(tokenizer, max_length, torch_model=merged)
    fp32_pred = fp32.predictions(texts)
    out = run_dir / "export"
    out.mkdir(exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{fmt}-", dir=out))
    tmp.chmod(0o755)
    try:
        merged.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if fmt == "int8":
            quantized, runtime = _write_int8(merged, tmp)
            runner = _Runner(tokenizer, max_length, torch_model=quantized)
        else:
            session, runtime = _write_onnx(merged, tokenizer, tmp, max_length, fmt, threads)
            runner = _Runner(tokenizer, max_length, session=session)
        pred = runner.predictions(texts)
        fp32_bytes = sum(p.numel() * p.element_size() for p in merged.parameters())
        batch1 = paired_latency_ms(runner, fp32, texts, 1, latency_repeats * 4)
        batch32 = paired_latency_ms(runner, fp32, texts, 32, latency_repeats)
        figures = ExportFigures(
            format=fmt,
            file=FILES[fmt],
            bytes=(tmp / FILES[fmt]).stat().st_size,
            fp32_bytes=fp32_bytes,
            rows=len(texts),
            accuracy=float((pred == truth).float().mean()),
            fp32_accuracy=float((fp32_pred == truth).float().mean()),
            agreement=float((pred == fp32_pred).float().mean()),
            latency_ms_batch1=batch1[0],
            fp32_latency_ms_batch1=batch1[1],
            latency_ms_batch32=batch32[0],
            fp32_latency_ms_batch32=batch32[1],
            threads=threads,
            runtime=runtime,
            max_length=max_length,
            label_names=list(run.dataset.label_names),
        )
        (tmp / "export.json").write_text(json.dumps(asdict(figures), indent=2) + "\n")
        (tmp / "README.md").write_text(card_section(figures, _kept_fp32(merged)))
        final = out / fmt
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final, figures


def card_section(f: ExportFigures, kept: tuple[str, ...] = ()) -> str:
    """The export's section of a model card: what it is, its measured figures and how to load it (``kept``: the
    module prefixes the int8 export leaves in fp32)."""
    ratio = f.bytes / f.fp32_bytes
    b1 = f.fp32_latency_ms_batch1 / f.latency_ms_batch1
    b32 = f.fp32_latency_ms_batch32 / f.latency_ms_batch32
    fp32_32, ms_32 = f.fp32_latency_ms_batch32, f.latency_ms_batch32
    load = (
        {
            "int8": """import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

config = AutoConfig.from_pretrained(path)
model = AutoModelForSequenceClassification.from_config(config).eval()
keep = KEEP  # left in fp32
spec = {n: torch.ao.quantization.per_channel_dynamic_qconfig for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and not n.startswith(keep)}
model = torch.ao.quantization.quantize_dynamic(model, spec, dtype=torch.qint8)
model.load_state_dict(torch.load(f"{path}/model_int8.pt", weights_only=False))
tok = AutoTokenizer.from_pretrained(path)
with torch.inference_mode():
    print(model(**tok(["a gripping, beautifully shot film"], return_tensors="pt", padding=True)).logits.softmax(-1))""",
            "onnx": """import onnxruntime as ort
from transformers import AutoTokenizer

options = ort.SessionOptions()
options.add_session_config_entry("session.set_denormal_as_zero", "1")  # as measured: see the section above
session = ort.InferenceSession(f"{path}/FILE", options, providers=["CPUExecutionProvider"])
tok = AutoTokenizer.from_pretrained(path)
enc = tok(["a gripping, beautifully shot film"], return_tensors="np", padding=True)
print(session.run(["logits"], {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})[0])""",
        }["int8" if f.format == "int8" else "onnx"]
        .replace("FILE", f.file)
        .replace("KEEP", repr(kept))
    )
    return f"""## Export: {f.format}

The adapter merged into its base model (PEFT `merge_and_unload`), then {_WHAT[f.format]}. Measured by
`fedhf export` against the fp32 merged model on the run's {f.rows:,} central evaluation rows, on this machine's CPU
with {f.threads} thread(s) ({f.runtime}{_DAZ if f.format != "int8" else ""}):

| | fp32 merged | {f.format} |
|---|---|---|
| size | {f.fp32_bytes:,} B | {f.bytes:,} B ({ratio:.1%}) |
| accuracy | {f.fp32_accuracy:.4f} | {f.accuracy:.4f} (same prediction on {f.agreement:.1%} of rows) |
| latency per example, batch 1 | {f.fp32_latency_ms_batch1:.2f} ms | {f.latency_ms_batch1:.2f} ms ({b1:.2f}x faster) |
| latency per example, batch 32 | {fp32_32:.2f} ms | {ms_32:.2f} ms ({b32:.2f}x faster) |

Labels: {", ".join(f.label_names)}; texts are cut at {f.max_length} tokens as in training. Load it with:

```python
path = "export/{f.format}"  # this folder
{load}
```
"""


_DAZ = "; the session flushes denormal floats to zero, as the loading code below does"

_WHAT = {
    "int8": "PyTorch dynamic int8 quantization of the encoder's linear layers, per output channel (int8 weights, "
    "activations quantized at run time; the embeddings, the pooler and the head stay fp32), saved as the quantized "
    "state_dict beside the model's config",
    "onnx": "exported to ONNX (fp32) and run with ONNX Runtime",
    "onnx-int8": "exported to ONNX and quantized by ONNX Runtime's dynamic int8 quantization of its weights (per "
    "channel)",
}
