"""Shared fixtures: a tiny BERT built from a config, small synthetic datasets we write ourselves."""

from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path

import pytest

# Tests never reach the network: Hub lookups fail fast and offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Clients with DP keep their accountant on disk (fedhf.federation.node_state): not in the home folder during tests.
os.environ.setdefault("FEDHF_STATE_DIR", os.path.join(tempfile.gettempdir(), f"fedhf-test-node-state-{os.getuid()}"))

REPO = Path(__file__).resolve().parent.parent
POSITIVE = ["good", "great", "wonderful", "excellent", "lovely", "superb", "delightful", "brilliant"]
NEGATIVE = ["bad", "awful", "terrible", "dreadful", "poor", "horrible", "boring", "weak"]
NOUNS = ["film", "movie", "story", "plot", "cast", "script", "ending", "score", "show", "book"]


def synthetic_rows(n: int, seed: int = 0, languages: tuple[str, ...] = ()) -> list[dict]:
    """Unique, linearly separable sentiment sentences (our own text, no third-party data)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        word = rng.choice(POSITIVE if label else NEGATIVE)
        text = f"the {rng.choice(NOUNS)} was {word} number {i}"
        row = {"text": text, "label": "positive" if label else "negative"}
        if languages:
            row["language"] = languages[i % len(languages)]
        rows.append(row)
    return rows


def write_tsv(path: Path, rows: list[dict], columns: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        fh.write("\t".join(columns) + "\n")
        for r in rows:
            fh.write("\t".join(str(r[c]) for c in columns) + "\n")
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture()
def synthetic_dir(tmp_path: Path) -> Path:
    """A dataset folder with train.tsv (200 rows) and test.tsv (60 rows)."""
    d = tmp_path / "synthetic"
    write_tsv(d / "train.tsv", synthetic_rows(200, seed=1), ["text", "label"])
    write_tsv(d / "test.tsv", synthetic_rows(60, seed=2), ["text", "label"])
    return d


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer BERT (random weights) with the MiniLM WordPiece tokenizer, saved as a local model folder."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from fedhf.tasks.model import DEFAULT_MODEL, resolve_model

    d = tmp_path_factory.mktemp("tiny-bert")
    tok = AutoTokenizer.from_pretrained(resolve_model(DEFAULT_MODEL))
    config = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    import torch

    torch.manual_seed(0)
    BertModel(config).save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture()
def shared_data_dir() -> Path:
    """$FEDHF_DATA_DIR (real datasets laid out as ../shared/data); skipped with the reason when unset."""
    value = os.environ.get("FEDHF_DATA_DIR")
    if not value:
        pytest.skip("FEDHF_DATA_DIR is not set: point it at a folder laid out like ../shared/data to run this test")
    path = Path(value)
    if not (path / "sst2" / "train.tsv").is_file():
        pytest.skip(f"FEDHF_DATA_DIR={value} has no sst2/train.tsv")
    return path


@pytest.fixture()
def server_identity(monkeypatch):
    """Messages are created as by a ServerApp task (Flower sets this identity in its runtime)."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)


def cli_env(root: Path, **extra: str) -> dict[str, str]:
    """Environment for a `fedhf` subprocess: offline, no telemetry, clients' saved state under ``root``, no
    fault injection unless ``extra`` asks for it."""
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        FLWR_TELEMETRY_ENABLED="0",
        RAY_USAGE_STATS_ENABLED="0",
        FEDHF_STATE_DIR=str(root / "node-state"),
    )
    env.pop("FEDHF_TEST_FAULTS", None)
    env.update(extra)
    return env
