"""Devices and precision (issue 19): train.device resolves on the machine that trains (auto is the CPU here), a
device that is not present or a GPU share Ray cannot give is one clear error, batches follow the model, and bf16
mixed precision trains on the CPU (never under sample-level DP). The GPU side runs in scripts/device_check.sh."""

from __future__ import annotations

import datasets
import pytest
import torch

from fedhf.config.schema import parse_config
from fedhf.errors import FedHFConfigError
from fedhf.tasks import device as D
from fedhf.tasks.model import build_model, load_tokenizer
from fedhf.tasks.text_classification import TextClassification, evaluate, make_loader
from fedhf.train.loop import train_local

from .conftest import cli_env, synthetic_rows

NO_GPU = not torch.cuda.is_available()
TASK = TextClassification()


def rows(n: int, seed: int) -> datasets.Dataset:
    r = synthetic_rows(n, seed=seed)
    return datasets.Dataset.from_dict(
        {"text": [x["text"] for x in r], "label": [int(x["label"] == "positive") for x in r]}
    )


@pytest.mark.skipif(not NO_GPU, reason="checks the resolution on a machine without a GPU")
def test_auto_is_the_cpu_here_and_an_absent_device_is_one_error_naming_the_key() -> None:
    assert D.resolve_device("auto") == torch.device("cpu") == D.resolve_device("cpu")
    with pytest.raises(FedHFConfigError, match=r"config key 'train.device': got 'cuda', but .*use train.device=auto"):
        D.resolve_device("cuda")
    if not D._mps_available():
        with pytest.raises(FedHFConfigError, match=r"got 'mps', but torch sees no Apple MPS device"):
            D.resolve_device("mps")
    with pytest.raises(FedHFConfigError, match=r"train.device"):
        parse_config({"train.device": "gpu"})
    cfg = parse_config({"train.device": "auto"})
    assert cfg.train.device == "auto" and cfg.train.precision == "fp32"


def test_mixed_precision_is_refused_under_sample_level_dp_and_fp16_off_cuda() -> None:
    with pytest.raises(FedHFConfigError, match=r"'train.precision': got 'bf16' with privacy.mode 'sample'.*fp32"):
        parse_config({"train.precision": "bf16", "privacy.mode": "sample"})
    with pytest.raises(FedHFConfigError, match=r"'train.precision': got 'fp16' with train.device 'cpu'"):
        parse_config({"train.precision": "fp16", "train.device": "cpu"})
    parse_config({"train.precision": "bf16", "privacy.mode": "client"})  # client-level DP noises the aggregate
    with pytest.raises(FedHFConfigError, match=r"fp16 mixed precision .* runs on CUDA only"):
        D.check_precision("fp16", torch.device("cpu"))
    D.check_precision("bf16", torch.device("cpu"))


def test_the_gpu_share_of_a_simulated_client() -> None:
    # unset: none without a GPU or on the CPU by choice; else an equal share for every client, at most one GPU
    assert D.gpu_share(None, "auto", 3, gpus=0) == 0.0
    assert D.gpu_share(None, "cpu", 3, gpus=2) == 0.0
    assert D.gpu_share(None, "auto", 3, gpus=1) == 0.3333
    assert D.gpu_share(None, "cuda", 3, gpus=2) == 0.5 and D.gpu_share(None, "auto", 1, gpus=4) == 1.0
    assert D.gpu_share(0.25, "auto", 8, gpus=1) == 0.25 and D.gpu_share(0, "auto", 3, gpus=1) == 0.0
    for share, words in (
        (1.5, "a client trains on one GPU at most"),
        (-0.1, "a client trains on one GPU at most"),
        (float("nan"), "a client trains on one GPU at most"),
        (0.33333, "Ray places GPU shares in steps of 0.0001: round it, e.g. 0.3333"),
    ):
        with pytest.raises(FedHFConfigError, match=words):
            D.gpu_share(share, "auto", 3, gpus=1)
    with pytest.raises(FedHFConfigError, match="torch sees no GPU on this machine"):
        D.gpu_share(0.5, "auto", 3, gpus=0)
    with pytest.raises(FedHFConfigError, match="with train.device 'cpu': each client would hold a GPU share"):
        D.gpu_share(0.5, "cpu", 3, gpus=1)
    with pytest.raises(FedHFConfigError, match="a simulated client given no GPU share sees no GPU"):
        D.gpu_share(0, "cuda", 3, gpus=1)


def test_batches_follow_the_model_and_only_tensors_move() -> None:
    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long), "row": [4, 5]}
    moved = D.to_device(batch, torch.device("cpu"))
    assert moved["input_ids"] is batch["input_ids"] and moved["row"] == [4, 5]  # the CPU's own tensors: no copy
    assert D.model_device(torch.nn.Linear(2, 2)) == torch.device("cpu")


def test_bf16_mixed_precision_trains_on_the_cpu_with_fp32_weights(tiny_model_dir) -> None:
    """train.precision bf16: the forward pass computes in bf16 (seen by a hook), the LoRA weights and the head stay
    fp32 and move, and the loss falls about as in fp32 (same seed, same batches)."""
    cfg = parse_config({"model.name": str(tiny_model_dir), "train.precision": "bf16"})
    tok = load_tokenizer(cfg.model.name)
    results = {}
    for precision in ("fp32", "bf16"):
        model = build_model(cfg, ["negative", "positive"])
        seen: set[torch.dtype] = set()
        linear = next(m for n, m in model.named_modules() if n.endswith("query.base_layer"))
        hook = linear.register_forward_hook(lambda _m, _i, out, seen=seen: seen.add(out.dtype))
        start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        ev = make_loader(rows(64, 3), tok, 24, 64, shuffle=False)
        before = evaluate(model, ev, 2).loss
        seen.clear()
        torch.manual_seed(0)
        train = make_loader(rows(128, 1), tok, 24, 16, shuffle=True, seed=0)
        train_local(model, train, task=TASK, epochs=3, lr=5e-3, precision=precision)
        hook.remove()
        trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
        assert all(p.dtype == torch.float32 for p in trained.values())
        assert all(not torch.equal(trained[n].detach(), v) for n, v in start.items() if "lora_B" in n)
        assert seen == {torch.bfloat16 if precision == "bf16" else torch.float32}
        results[precision] = (before, evaluate(model, ev, 2).loss)
    for before, after in results.values():
        assert after < before
    assert abs(results["bf16"][1] - results["fp32"][1]) < 0.1 * results["fp32"][0], results


@pytest.mark.slow
@pytest.mark.skipif(not NO_GPU, reason="the refusals of a machine without a GPU")
@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--set", "train.device=cuda"], "config key 'train.device': got 'cuda', but this torch is a CPU-only build"),
        (["--gpus-per-client", "0.5"], "--gpus-per-client: got 0.5, but torch sees no GPU on this machine"),
    ],
)
def test_fedhf_run_refuses_a_gpu_this_machine_lacks_before_the_run(tmp_path, args, words) -> None:
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "fedhf.cli", "run", "--set", f"output-dir={tmp_path}", *args],
        capture_output=True,
        text=True,
        env=cli_env(tmp_path),
        timeout=300,
        cwd=tmp_path,
    )
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and words in errors[0], proc.stderr[-2000:]
    assert not list(tmp_path.rglob("run.json"))


@pytest.mark.skipif(not NO_GPU, reason="the script's answer on a machine without a GPU")
def test_the_device_check_says_no_gpu_and_exits_0_without_one() -> None:
    import subprocess
    import sys

    from .conftest import REPO

    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "device_check.py")], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and proc.stdout.startswith("device check: no GPU"), proc.stderr[-2000:]
