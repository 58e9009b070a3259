"""A corpus of malformed inputs, each through the real `fedhf` command in a subprocess.

Every case must end with a non-zero exit and exactly one `error: ...` line that names what is
wrong, no traceback, and no run folder marked complete. Cases cover config files and keys,
command-line arguments, data files, labels, node configs, checkpoints and updates.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fedhf.tasks.tiny_lm import write_tiny_causal_lm

from .conftest import cli_env, synthetic_rows, write_jsonl, write_tsv

pytestmark = pytest.mark.slow  # about 40 fedhf processes and one short federation


def fedhf(root: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedhf.cli", *args],
        capture_output=True,
        text=True,
        env=cli_env(root, **env),
        timeout=300,
        cwd=root,
    )


def check_refused(proc: subprocess.CompletedProcess, words: str, root: Path) -> None:
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode != 0, proc.stdout[-500:]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert words in errors[0], errors[0]
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr[-3000:]
    for run_json in root.rglob("run.json"):
        try:
            status = json.loads(run_json.read_text()).get("status")
        except json.JSONDecodeError:
            continue  # the damaged file of a checkpoint case
        assert status != "complete", run_json


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    """Files for the cases, and one real run whose every update is poisoned (it fails after its round-0
    checkpoint: a resumable run folder that the checkpoint cases damage in copies)."""
    root = tmp_path_factory.mktemp("bad-inputs")
    good = root / "good"
    write_tsv(good / "train.tsv", synthetic_rows(80, seed=1), ["text", "label"])
    write_tsv(good / "test.tsv", synthetic_rows(20, seed=2), ["text", "label"])
    files = {"root": root, "good": good, "model": tiny_model_dir}
    texts = [r["text"] for r in synthetic_rows(80, seed=1)] + ["Answer with one label 0123456789"]
    files["llama"] = write_tiny_causal_lm(root / "tiny-llama", texts, family="llama", vocab_size=300)
    (root / "bad.toml").write_text("num-server-rounds = [\n")
    write_tsv(root / "nolabel" / "train.tsv", [{"a": "x", "b": "y"}] * 10, ["a", "b"])
    (root / "empty").mkdir()
    (root / "empty" / "train.tsv").write_text("text\tlabel\n")
    rows = synthetic_rows(20)
    write_tsv(
        root / "emptylabel" / "train.tsv",
        [{**r, "label": "" if i == 3 else r["label"]} for i, r in enumerate(rows)],
        ["text", "label"],
    )
    write_tsv(
        root / "floatlabel" / "train.tsv",
        [{**r, "label": 0.5 * (i % 3)} for i, r in enumerate(rows)],
        ["text", "label"],
    )
    write_tsv(root / "oneclass" / "train.tsv", [{**r, "label": "positive"} for r in rows], ["text", "label"])
    (root / "nodes-key.toml").write_text('[nodes.0]\ndata-path = "/somewhere"\n')
    (root / "nodes-id.toml").write_text("[nodes.7]\nmax-epsilon = 2.0\n")
    (root / "nodes-value.toml").write_text('[default]\nmin-privacy = "strong"\n')
    (root / "nodes-no-canaries.toml").write_text("[nodes.0]\nallow-canaries = false\n")
    instructions = [
        {"instruction": "Label the sentiment.", "input": r["text"], "output": r["label"]} for r in synthetic_rows(40)
    ]
    write_jsonl(root / "inst" / "train.jsonl", instructions)
    write_jsonl(root / "inst" / "test.jsonl", instructions[:10])
    write_jsonl(root / "inst-empty" / "train.jsonl", [{**r, "output": "" if i == 5 else r["output"]}
                                                       for i, r in enumerate(instructions)])  # fmt: skip
    (root / "occupied" / "someone-elses").mkdir(parents=True)
    (root / "occupied" / "someone-elses" / "notes.txt").write_text("not a run")

    out = root / "runs"
    proc = fedhf(
        root,
        "run",
        "-n",
        "2",
        "--set",
        f"model.name={tiny_model_dir}",
        "--set",
        f"data.dataset={good}",
        "--set",
        f"output-dir={out}",
        "--set",
        "run-name=poisoned",
        "--set",
        "num-server-rounds=2",
        "--set",
        "data.max-length=16",
        FEDHF_TEST_FAULTS="0:1:nan,1:1:norm",
    )
    files["poisoned"] = out / "poisoned"
    files["poisoned_proc"] = proc  # type: ignore[assignment]
    return files


def _resumable_copy(corpus: dict, dst: Path) -> Path:
    shutil.copytree(corpus["poisoned"], dst)
    return dst


def _edit_run_json(run_dir: Path, **changes) -> None:
    path = run_dir / "run.json"
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if key == "config":
            data["config"].update(value)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


def test_updates_every_reply_poisoned_fails_the_run_with_the_reasons(corpus):
    proc = corpus["poisoned_proc"]
    check_refused(proc, "every update was rejected", corpus["root"])
    assert proc.returncode == 1  # it failed after it started (bad input exits 2)
    run = json.loads((corpus["poisoned"] / "run.json").read_text())
    assert run["status"] == "failed" and "every update was rejected" in run["error"]
    assert json.loads((corpus["poisoned"] / "checkpoint.json").read_text())["round"] == 0


CAUSAL = ["run", "--set", "model.task=causal-lm", "--set", "model.name={llama}", "--set", "data.dataset={good}"]
CASES = {
    # config keys and files
    "config-unknown-choice": (["run", "--set", "strategy.name=fedavgg"], "Did you mean 'fedavg'"),
    "config-negative-lr": (["run", "--set", "train.lr=-1"], "config key 'train.lr'"),
    "config-transport-dtype": (["run", "--set", "transport.dtype=int4"], "config key 'transport.dtype'"),
    "config-norm-not-a-number": (
        ["run", "--set", "strategy.max-update-norm=big"],
        "config key 'strategy.max-update-norm'",
    ),
    "config-unknown-key": (["run", "--set", "nosuch.key=1"], "unknown config key 'nosuch.key'"),
    "config-invalid-toml": (["run", "--config", "{root}/bad.toml"], "not valid TOML"),
    "config-secagg-with-int8": (
        ["run", "--set", "strategy.secure-aggregation=true", "--set", "transport.dtype=int8"],
        "config key 'transport.dtype'",
    ),
    "config-trim-beta": (["run", "--set", "strategy.trim-beta=0.5"], "config key 'strategy.trim-beta'"),
    "config-client-dp-with-median": (
        ["run", "--set", "privacy.mode=client", "--set", "strategy.name=fedmedian"],
        "needs fedavg",
    ),
    "config-causal-lm-encoder": (
        [
            "run",
            "--set",
            "model.task=causal-lm",
            "--set",
            "model.name=sentence-transformers/all-MiniLM-L6-v2",
            "--set",
            "data.dataset={good}",
        ],  # fmt: skip
        "without a causal-LM head",
    ),
    "config-causal-lm-pooling": (
        ["run", "--set", "model.task=causal-lm", "--set", "model.pooling=mean"],
        "config key 'model.pooling'",
    ),
    "config-canaries-classification": (
        ["run", "--set", "audit.canaries=2", "--set", "data.dataset={good}"],
        "config key 'audit.canaries'",
    ),
    "causal-canaries-more-than-rows": (
        [*CAUSAL, "--set", "data.max-length=160", "--set", "audit.canaries=500"],
        "500 canaries for a client with",
    ),
    "causal-canary-client": (
        [*CAUSAL, "--set", "data.max-length=160", "--set", "audit.canaries=2", "--set", "audit.canary-client=7"],
        "config key 'audit.canary-client'",
    ),
    "causal-canaries-node-says-no": (
        [
            *CAUSAL,
            "--set",
            "data.max-length=160",
            "--set",
            "audit.canaries=2",
            "--node-config",
            "{root}/nodes-no-canaries.toml",
        ],
        "says allow-canaries=false",
    ),  # fmt: skip
    "causal-default-model-offline": (
        ["run", "--set", "model.task=causal-lm", "--set", "data.dataset={good}"],
        "cannot load 'HuggingFaceTB/SmolLM2-135M-Instruct': the Hub is unreachable (HF_HUB_OFFLINE is set) and there "
        "is no local copy; connect to the Hub, or download it where the Hub is reachable (hf download "
        "HuggingFaceTB/SmolLM2-135M-Instruct --local-dir DIR) and pass the folder: --set model.name=DIR.",
    ),
    "causal-lora-on-lm-head": (
        [*CAUSAL, "--set", "data.max-length=160", "--set", "model.lora.target-modules=q_proj,lm_head"],
        "'lm_head' is the LM head, tied to the input embeddings",
    ),
    "causal-records-without-the-fields": (
        [*CAUSAL, "--set", "data.format=instruction"],
        "data.format 'instruction' needs the column(s) instruction, output",
    ),
    "causal-records-no-response": (
        [*CAUSAL[:-2], "--set", "data.dataset={root}/inst-empty"],
        "leaves no prompt or no response to learn",
    ),
    "causal-records-by-label": (
        [*CAUSAL[:-2], "--set", "data.dataset={root}/inst", "--set", "data.partitioner=pathological"],
        "'pathological' splits the rows by label",
    ),
    "causal-records-max-length-below-prompt": (
        [*CAUSAL[:-2], "--set", "data.dataset={root}/inst", "--set", "data.max-length=8"],
        "client 0's training rows: config key 'data.max-length'",
    ),
    "causal-max-length-below-prompt": ([*CAUSAL, "--set", "data.max-length=16"], "config key 'data.max-length'"),
    # command-line arguments
    "cli-too-few-clients": (["run", "-n", "1"], "strategy.min-available-nodes"),
    "cli-predict-temperature-without-sample": (
        ["predict", "--model", "{root}", "--text", "x", "--temperature", "0.5"],
        "add --sample",
    ),
    "cli-predict-max-new-tokens": (["predict", "--model", "{root}", "--text", "x", "--max-new-tokens", "0"], "from 1"),
    "cli-cpus": (["run", "--cpus-per-client", "0"], "--cpus-per-client"),
    "cli-export-format": (["export", "{poisoned}", "--format", "fp8"], "--format: got 'fp8'; use one of int8"),
    "cli-export-unfinished-run": (["export", "{poisoned}", "--format", "int8"], "Export only a complete run"),
    "cli-gpus-over-one": (["run", "--gpus-per-client", "1.5"], "--gpus-per-client: got 1.5; a client trains on one"),
    "config-device-unknown": (["run", "--set", "train.device=gpu0"], "train.device"),
    "config-mixed-precision-under-dp": (
        ["run", "--set", "train.precision=bf16", "--set", "privacy.mode=sample"],
        "config key 'train.precision': got 'bf16' with privacy.mode 'sample'",
    ),
    "cli-missing-config-file": (["run", "--config", "{root}/missing.toml"], "no such file"),
    "cli-resume-with-set": (["run", "--resume", "{poisoned}", "--set", "num-server-rounds=5"], "--resume takes"),
    "cli-resume-not-a-folder": (["run", "--resume", "{root}/nowhere"], "not a folder"),
    "cli-resume-other-client-count": (["run", "--resume", "{poisoned}", "-n", "5"], "--num-clients"),
    "cli-privacy-plan": (["privacy", "plan", "--target-epsilon", "-1", "--num-examples", "10"], "--target-epsilon"),
    # data files
    "data-missing-file": (["run", "--set", "data.dataset={root}/nope.csv"], "data.dataset"),
    "data-no-label-column": (["run", "--set", "data.dataset={root}/nolabel"], "column"),
    "data-no-rows": (["run", "--set", "data.dataset={root}/empty"], "no"),
    "data-text-column": (["run", "--set", "data.dataset={good}", "--set", "data.text-column=nope"], "nope"),
    # labels
    "labels-empty-values": (["run", "--set", "data.dataset={root}/emptylabel"], "empty values"),
    "labels-floats": (["run", "--set", "data.dataset={root}/floatlabel"], "floats"),
    "labels-one-class": (["run", "--set", "data.dataset={root}/oneclass"], "single class"),
    # node configs (what a SuperNode is started with), checked with fedhf node-check
    "node-budget": (
        [
            "node-check",
            "--node-config",
            "partition-id=0 num-partitions=2 max-epsilon=-4",
            "--set",
            "data.dataset={good}",
        ],
        "node config 'max-epsilon'",
    ),
    "node-partition-outside": (
        ["node-check", "--node-config", "partition-id=5 num-partitions=2", "--set", "data.dataset={good}"],
        "partition-id 5 is outside",
    ),
    "node-unknown-key": (
        [
            "node-check",
            "--node-config",
            "partition-id=0 num-partitions=2 max-epsilion=4",
            "--set",
            "data.dataset={good}",
        ],
        "'max-epsilion'",
    ),
    "node-missing-silo": (
        ["node-check", "--node-config", 'data-path="{root}/no-silo"', "--labels", "negative,positive"],
        "does not exist",
    ),
    "node-fail-mode": (
        [
            "node-check",
            "--node-config",
            "partition-id=0 num-partitions=2 fail-at-round=1 fail-mode=boom",
            "--set",
            "data.dataset={good}",
        ],
        "fail-mode",
    ),
    "node-allow-canaries": (
        [
            "node-check",
            "--node-config",
            "partition-id=0 num-partitions=2 allow-canaries=maybe",
            "--set",
            "data.dataset={good}",
        ],
        "node config 'allow-canaries'",
    ),
    "node-no-ids": (
        ["node-check", "--node-config", "max-epsilon=4", "--set", "data.dataset={good}"],
        "node config needs",
    ),
    # the owner's policy (node config), as a SuperNode or a simulated node's file gives it
    "node-policy-level": (
        [
            "node-check",
            "--node-config",
            "partition-id=0 num-partitions=2 min-privacy=strong",
            "--set",
            "data.dataset={good}",
        ],
        "node config 'min-privacy': got 'strong'",
    ),
    "node-policy-share": (
        [
            "node-check",
            "--node-config",
            "partition-id=0 num-partitions=2 share=secrets",
            "--set",
            "data.dataset={good}",
        ],
        "node config 'share': 'secrets'",
    ),
    "node-policy-contradiction": (
        [
            "node-check",
            "--node-config",
            "partition-id=0 num-partitions=2 max-epsilon=2 min-privacy=none",
            "--set",
            "data.dataset={good}",
        ],
        "sample-level budget",
    ),
    "node-policy-delta": (
        ["node-check", "--node-config", "partition-id=0 num-partitions=2 max-delta=2", "--set", "data.dataset={good}"],
        "node config 'max-delta'",
    ),
    "node-file-missing": (["run", "--node-config", "{root}/nope.toml"], "--node-config"),
    "node-file-data-path": (["run", "--node-config", "{root}/nodes-key.toml"], "not one a simulated node takes"),
    "node-file-partition": (["run", "--node-config", "{root}/nodes-id.toml"], "must name a partition id 0..2"),
    "node-file-value": (["run", "--node-config", "{root}/nodes-value.toml"], "node config 'min-privacy'"),
    "config-removed-budget-key": (["run", "--set", "privacy.node-max-epsilon=0:1"], "was removed"),
    "run-folder-not-ours": (
        [
            "run",
            "--set",
            "output-dir={root}/occupied",
            "--set",
            "run-name=someone-elses",
            "--set",
            "data.dataset={good}",
        ],
        "will not adopt",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_refused_with_one_clear_line(corpus, case):
    args, words = CASES[case]
    fmt = {k: str(v) for k, v in corpus.items() if isinstance(v, Path)}
    proc = fedhf(corpus["root"], *[a.format(**fmt) for a in args])
    check_refused(proc, words.format(**fmt), corpus["root"])


CHECKPOINT_CASES = {
    "truncated": "truncated or altered",
    "from-another-run": "another run",
    "config-edited": "another configuration",
    "no-checkpoint": "no checkpoint.json",
    "damaged-run-json": "run.json is damaged",
    "already-complete": "already complete",
}


@pytest.mark.parametrize("case", sorted(CHECKPOINT_CASES))
def test_a_damaged_or_foreign_checkpoint_is_not_resumed(corpus, case, tmp_path):
    run_dir = _resumable_copy(corpus, tmp_path / case)
    if case == "truncated":
        f = next((run_dir / "checkpoints").glob("round-*/adapter.safetensors"))
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif case == "from-another-run":
        _edit_run_json(run_dir, run_uid="0123456789abcdef")
    elif case == "config-edited":
        _edit_run_json(run_dir, config={"train.lr": 0.5})
    elif case == "no-checkpoint":
        (run_dir / "checkpoint.json").unlink()
    elif case == "damaged-run-json":
        (run_dir / "run.json").write_text('{"status": "running", "config": ')
    elif case == "already-complete":
        _edit_run_json(run_dir, status="complete")
    proc = fedhf(corpus["root"], "run", "--resume", str(run_dir))
    if case == "already-complete":
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert proc.returncode == 2 and len(errors) == 1 and "already complete" in errors[0]
        return
    check_refused(proc, CHECKPOINT_CASES[case], tmp_path)
