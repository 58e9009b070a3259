"""model.task = causal-lm end to end (issue 18): a federated run of a tiny Llama built here (tokenizer trained here,
no download) on labelled rows of our own, phrased as instructions; without DP it learns to answer with the right
label, under sample-level DP every step is booked, and the card and `fedhf predict` are the generative ones."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest

from fedhf.tasks import causal_lm as C
from fedhf.tasks.tiny_lm import write_tiny_causal_lm

from .conftest import REPO, write_jsonl, write_tsv
from .test_e2e import _env, fedhf_run

pytestmark = pytest.mark.slow

POS, NEG = ["good", "great", "lovely", "superb"], ["bad", "awful", "poor", "weak"]
NOUNS = ["film", "movie", "story", "plot", "cast"]


def rows(n: int, seed: int) -> list[dict]:
    """Sentences whose last word carries the sentiment (what a 2-layer random decoder learns through LoRA)."""
    rng = random.Random(seed)
    return [
        {
            "text": f"the {rng.choice(NOUNS)} number {i} was {rng.choice(POS if i % 2 else NEG)}",
            "label": "positive" if i % 2 else "negative",
        }
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("causal-e2e")
    data = root / "data"
    write_tsv(data / "train.tsv", rows(300, 1), ["text", "label"])
    write_tsv(data / "test.tsv", rows(60, 2), ["text", "label"])
    texts = [r["text"] for r in rows(300, 1)] + [C.instruction_for(["negative", "positive"]), "positive negative"]
    model = write_tiny_causal_lm(root / "tiny-llama", texts, family="llama", vocab_size=400)
    return model, data


def args(model: Path, data: Path) -> list[str]:
    return [
        "--num-clients", "2",
        "--set", "model.task=causal-lm",
        "--set", f"model.name={model}",
        "--set", f"data.dataset={data}",
        "--set", "num-server-rounds=2",
        "--set", "data.max-length=64",
    ]  # fmt: skip


def test_a_federated_causal_lm_learns_to_answer_and_publishes_a_generative_card(setup, tmp_path) -> None:
    model, data = setup
    out = tmp_path / "out"
    run = fedhf_run(data, out, "clm", *args(model, data), "--set", "train.local-epochs=3", "--set", "train.lr=0.01")
    assert run["status"] == "complete" and run["model"]["task"] == "causal-lm"
    assert run["model"]["lora_target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]  # Llama's attention
    first, last = run["rounds"][0], run["rounds"][-1]
    assert first["eval_accuracy"] < 0.5  # the random model names no label
    assert last["eval_accuracy"] >= 0.75 and last["eval_loss"] < first["eval_loss"] / 5
    card = (out / "clm" / "hub" / "README.md").read_text()
    assert "pipeline_tag: text-generation" in card and "AutoModelForCausalLM" in card and "model.generate" in card
    assert "the head trained" not in card and "B and the head" not in card
    assert json.loads((out / "clm" / "hub" / "fedhf.json").read_text())["task"] == "causal-lm"
    assert (out / "clm" / "hub" / "chat_template.jinja").is_file()  # the prompt format the adapter was trained with
    proc = subprocess.run(
        [sys.executable, "-m", "fedhf.cli", "predict", "--model", str(out / "clm"),
         "--text", "the plot number 7 was superb", "--text", "the cast number 8 was awful"],
        capture_output=True, text=True, env=_env(data), timeout=300, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    answers = [line.split("\t")[0] for line in proc.stdout.strip().splitlines()]
    assert answers == ["positive", "negative"]
    # model.sample-prompts (3): fixed central eval rows, answered after every round, in run.json and the card
    prompts = run["sample_prompts"]
    test_rows = {r["text"]: r["label"] for r in rows(60, 2)}
    assert len(prompts) == 3 and all(test_rows[p["text"]] == p["answer"] for p in prompts)
    assert [len(r["generations"]) for r in run["rounds"]] == [3, 3, 3]
    again = predict(data, out / "clm", *[a for p in prompts for a in ("--text", p["text"])])
    assert [line.split("\t")[0] for line in again] == [C.normalize_answer(g) for g in run["rounds"][-1]["generations"]]
    assert "### Generations" in card and "left out of this card" in card and prompts[0]["text"] not in card
    # sampling: seeded (the same seed, the same answers), up to --max-new-tokens tokens
    sampled = [predict(data, out / "clm", "--text", "the plot number 7 was", "--sample", "--temperature", "1.5",
                       "--max-new-tokens", "3", "--seed", str(seed)) for seed in (1, 1, 2)]  # fmt: skip
    assert sampled[0] == sampled[1], sampled
    assert all(len(line.split("\t")) == 3 and 0 <= float(line.split("\t")[1]) <= 1 for s in sampled for line in s)


def predict(data: Path, model: Path, *options: str) -> list[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "fedhf.cli", "predict", "--model", str(model), *options],
        capture_output=True, text=True, env=_env(data), timeout=300, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip().splitlines()


def test_sample_level_dp_books_every_step_of_a_causal_lm_canaries_included(setup, tmp_path) -> None:
    model, data = setup
    out = tmp_path / "out"
    canaries = ["--set", "audit.canaries=4", "--set", "audit.canary-repeats=15", "--set", "audit.canary-client=1"]
    run = fedhf_run(
        data, out, "dp", *args(model, data), "--set", "privacy.mode=sample", "--set", "privacy.target-epsilon=8",
        *canaries,
    )  # fmt: skip
    assert run["status"] == "complete"
    assert run["config"]["model.adapter"] == "ffa-lora" and run["config"]["model.pooling"] == "cls"
    rows = {p["partition_id"]: p["train_examples"] for p in run["partitions"]}
    batch = run["config"]["train.batch-size"]
    for pid, e in run["privacy"]["clients"].items():
        # client 1 samples from its rows and the 60 canary rows: q and the steps count them (never under-counted)
        n = rows[int(pid)] + (60 if int(pid) == 1 else 0)
        assert round(1 / e["sample_rate"]) == math.ceil(n / batch)
        assert len(e["rounds"]) == 2 and e["epsilon"] <= 8.0 and e["steps"] == 2 * 4 * round(1 / e["sample_rate"])
    assert math.ceil((rows[1] + 60) / batch) > math.ceil(rows[1] / batch)  # the case tells the two apart
    assert run["rounds"][-1]["eval_loss"] < run["rounds"][0]["eval_loss"]  # the answers' loss fell under DP noise
    assert run["canaries"]["client"] == 1 and len(run["canaries"]["secrets"]) == 4


def test_canaries_one_client_trained_on_are_exposed_by_fedhf_audit(setup, tmp_path) -> None:
    model, data = setup
    out = tmp_path / "out"
    run = fedhf_run(
        data, out, "canary", *args(model, data), "--set", "train.local-epochs=3", "--set", "train.lr=0.01",
        "--set", "audit.canaries=3", "--set", "audit.canary-repeats=10",
    )  # fmt: skip
    c = run["canaries"]
    assert c["client"] == 0 and c["count"] == 3 and c["repeats"] == 10 and c["format"] == "instruction"
    assert len(set(c["secrets"])) == 3 and all(len(x) == 9 and x.isdigit() for x in c["secrets"])
    assert "3 canary secret(s) x 10 in client 0's training rows" in run["_stderr"] + run["_stdout"]
    held_out = tmp_path / "held-out.tsv"
    write_tsv(held_out, [dict(r, text=r["text"].replace("number", "item")) for r in rows(120, 9)], ["text", "label"])
    proc = subprocess.run(
        [sys.executable, "-m", "fedhf.cli", "audit", str(out / "canary"), "--candidates", "200",
         "--max-examples", "100", "--non-members", str(held_out)],
        capture_output=True, text=True, env=_env(data), timeout=600, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    audit = json.loads((out / "canary" / "run.json").read_text())["audit"]
    assert audit["members"] == 100 and 0.0 <= audit["loss"]["auc"] <= 1.0  # membership inference on a generative run
    result = audit["canaries"]
    top = math.log2(201)
    assert result["max_exposure"] == pytest.approx(top) and len(result["inserted"]) == 3
    assert [r["secret"] for r in result["inserted"]] == c["secrets"]
    assert result["mean_exposure"] > 0.7 * top  # ten copies in one client's rows: the adapter repeats them
    assert result["control_mean_exposure"] < result["mean_exposure"] - 3  # secrets never trained on: near chance
    assert "canary exposure" in proc.stdout
    card = (out / "canary" / "hub" / "README.md").read_text()
    assert "Canary audit: client 0 trained on 3 random 9-digit secret(s)" in card
    assert f"**{result['mean_exposure']:.2f} bits**" in card


def test_instruction_records_one_client_per_task_type_learn_and_are_scored_by_exact_match(setup, tmp_path) -> None:
    """data.format instruction (auto-detected from JSONL columns), natural partitioning by a category column."""
    model, _ = setup

    def records(n: int, seed: int) -> list[dict]:
        out = []
        for i, r in enumerate(rows(n, seed)):
            if i % 3:
                out.append({"instruction": C.instruction_for(["negative", "positive"]), "input": r["text"],
                            "output": r["label"], "category": "sentiment"})  # fmt: skip
            else:
                out.append({"instruction": "Say the last word.", "input": r["text"], "output": r["text"].split()[-1],
                            "category": "echo"})  # fmt: skip
        return out

    data = tmp_path / "instructions"
    write_jsonl(data / "train.jsonl", records(300, 1))
    write_jsonl(data / "test.jsonl", records(60, 2))
    out = tmp_path / "out"
    run = fedhf_run(
        data, out, "inst", *args(model, data), "--set", "data.partitioner=natural",
        "--set", "data.partition-column=category", "--set", "train.local-epochs=3", "--set", "train.lr=0.01",
        "--set", "audit.canaries=2", "--set", "audit.canary-repeats=5",
    )  # fmt: skip
    assert run["dataset"]["format"] == "instruction" and run["dataset"]["label_names"] == []
    assert sorted(p["natural_id"] for p in run["partitions"]) == ["echo", "sentiment"]
    assert "instruction records" in run["_stderr"] + run["_stdout"]
    first, last = run["rounds"][0], run["rounds"][-1]
    assert first["eval_accuracy"] == 0.0 and last["eval_accuracy"] >= 0.4 and last["eval_loss"] < first["eval_loss"] / 3
    assert last["eval_f1"] >= last["eval_accuracy"]  # token F1 credits an exact match fully, and partial ones too
    test_rows = {(r["instruction"] + "\n\n" + r["input"]): r["output"] for r in records(60, 2)}
    assert all(test_rows[p["text"]] == p["answer"] for p in run["sample_prompts"])
    card = (out / "inst" / "hub" / "README.md").read_text()
    assert "| eval exact match | eval token F1 |" in card and "answering instructions like the training data" in card
    assert "label_names" not in card.split("## How to use")[1].split("## Intended")[0]
    # the audit: members are the clients' records, non-members records no client saw (no labels to match)
    write_jsonl(tmp_path / "unseen.jsonl", records(400, 3)[300:])
    proc = subprocess.run(
        [sys.executable, "-m", "fedhf.cli", "audit", str(out / "inst"), "--non-members", str(tmp_path / "unseen.jsonl"),
         "--max-examples", "80", "--candidates", "100"],
        capture_output=True, text=True, env=_env(data), timeout=600, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    audit = json.loads((out / "inst" / "run.json").read_text())["audit"]
    assert audit["label_matched"] is False and audit["members"] == audit["non_members"] >= 50
    assert 0 <= audit["loss"]["auc"] <= 1 and audit["member_loss"] < audit["non_member_loss"]
    assert len(audit["canaries"]["inserted"]) == 2 and audit["canaries"]["num_candidates"] == 100
    assert "equal-size seeded samples" in (out / "inst" / "hub" / "README.md").read_text()
    said = predict(
        data, out / "inst", "--text", C.instruction_for(["negative", "positive"]) + "\n\nthe plot was superb"
    )
    assert len(said) == 1 and said[0].split("\t")[2].endswith("\\n\\nthe plot was superb")


def test_plain_text_is_learned_token_by_token_its_canaries_are_texts_and_the_audit_scores_it(setup, tmp_path) -> None:
    """data.format text (auto-detected: a text column alone), one client per topic: the loss on every token falls,
    next-token accuracy rises, the canaries are plain texts (the secret sharer's own setting), and fedhf audit,
    the card and fedhf predict speak of continuing text."""
    model, _ = setup
    data = tmp_path / "plain"
    for name, n, seed in (("train", 300, 1), ("test", 60, 2)):
        write_jsonl(data / f"{name}.jsonl", [{"text": r["text"], "topic": r["label"]} for r in rows(n, seed)])
    out = tmp_path / "out"
    run = fedhf_run(
        data, out, "plain", *args(model, data), "--set", "data.partitioner=natural",
        "--set", "data.partition-column=topic", "--set", "train.local-epochs=3", "--set", "train.lr=0.01",
        "--set", "audit.canaries=2", "--set", "audit.canary-repeats=10",
    )  # fmt: skip
    said = run["_stderr"] + run["_stdout"]
    assert run["dataset"]["format"] == "text" and run["dataset"]["label_names"] == []
    assert "plain text (loss on every token)" in said and "central next-token acc" in said
    first, last = run["rounds"][0], run["rounds"][-1]
    assert first["eval_accuracy"] < 0.05 and last["eval_accuracy"] > 0.3 and last["eval_loss"] < first["eval_loss"] / 2
    assert last["eval_accuracy"] <= last["eval_f1"] <= 1  # top-5 counts every top-1 hit
    assert run["canaries"]["format"] == "text"
    test_texts = [r["text"] for r in rows(60, 2)]
    assert [p["text"] + " " + p["answer"] for p in run["sample_prompts"]] == test_texts[:3]
    held_out = tmp_path / "unseen.jsonl"
    write_jsonl(held_out, [{"text": r["text"].replace("number", "item")} for r in rows(120, 9)])
    proc = subprocess.run(
        [sys.executable, "-m", "fedhf.cli", "audit", str(out / "plain"), "--non-members", str(held_out),
         "--max-examples", "100", "--candidates", "200"],
        capture_output=True, text=True, env=_env(data), timeout=600, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    audit = json.loads((out / "plain" / "run.json").read_text())["audit"]
    assert audit["score"] == "mean per-text next-token accuracy" and audit["label_matched"] is False
    assert audit["member_accuracy"] > audit["non_member_accuracy"] and audit["member_loss"] < audit["non_member_loss"]
    assert "mean per-text next-token accuracy members" in proc.stdout
    exposure = audit["canaries"]
    assert exposure["mean_exposure"] > exposure["control_mean_exposure"] + 3  # ten copies of a text: memorised
    card = (out / "plain" / "hub" / "README.md").read_text()
    assert "| eval next-token accuracy | eval top-5 next-token accuracy |" in card
    assert "continuing text like the training data" in card and "apply_chat_template" not in card
    (line,) = predict(data, out / "plain", "--text", "the film number")
    assert line.endswith("\tthe film number") and line.split("\t")[0].strip()  # a continuation, then the text
