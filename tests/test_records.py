"""Instruction and chat records (data.format, model.task causal-lm): detected from the columns, checked row by row
with errors that carry no row text, partitioned without labels, and scored by exact match and token F1."""

from __future__ import annotations

import pytest

from fedhf.config.schema import parse_config
from fedhf.data.load import load_data
from fedhf.data.partitions import make_partitions
from fedhf.errors import FedHFConfigError, FedHFDataError
from fedhf.tasks import causal_lm as C

from .conftest import write_jsonl

SECRET = "zebra-quartz-4471"  # in a malformed row: no error may repeat it


def instruction_rows(n: int, secret_at: int | None = None) -> list[dict]:
    rows = []
    for i in range(n):
        task = "sentiment" if i % 3 else "echo"
        text = f"the film number {i} was {'good' if i % 2 else 'bad'}"
        out = ("positive" if i % 2 else "negative") if task == "sentiment" else text.split()[-1]
        rows.append({"instruction": f"Task {task}.", "input": text, "output": out, "category": task})
    if secret_at is not None:
        rows[secret_at] = {**rows[secret_at], "input": SECRET, "output": ""}
    return rows


def chats(n: int) -> list[dict]:
    return [
        {"messages": [{"role": "user", "content": f"say {i}"}, {"role": "assistant", "content": str(i)}]}
        for i in range(n)
    ]


def data_of(path, **keys):  # noqa: ANN001, ANN201
    return load_data(parse_config({"model.task": "causal-lm", "data.dataset": str(path), **keys}).data)


def test_the_format_is_read_from_the_columns_and_each_normalised(tmp_path) -> None:
    write_jsonl(tmp_path / "inst" / "train.jsonl", [{k: v for k, v in r.items() if k != "input"} for r in
                                                     instruction_rows(30)])  # fmt: skip
    write_jsonl(tmp_path / "inst" / "test.jsonl", instruction_rows(6))
    data = data_of(tmp_path / "inst", **{"data.partition-column": "category"})
    assert data.format == "instruction" and data.label_names == [] and data.source["format"] == "instruction"
    assert data.train.column_names == ["instruction", "input", "output", "category"]
    assert set(data.train["input"]) == {""} and data.eval["input"][1] == "the film number 1 was good"
    write_jsonl(tmp_path / "chat" / "train.jsonl", chats(20))
    write_jsonl(tmp_path / "chat" / "test.jsonl", chats(4))
    chat = data_of(tmp_path / "chat")
    assert chat.format == "messages" and chat.train[3]["messages"][-1] == {"role": "assistant", "content": "3"}
    # labelled rows stay labels (phrased as instructions by the task); a classifier never reads records
    write_jsonl(tmp_path / "lab" / "train.jsonl", [{"text": f"t {i}", "label": i % 2} for i in range(20)])
    assert data_of(tmp_path / "lab").format == "labels"
    assert parse_config({"data.dataset": "x.jsonl"}).data.format == "labels"
    with pytest.raises(FedHFConfigError, match="config key 'data.format': got 'instruction' under model.task"):
        parse_config({"data.format": "instruction"})


@pytest.mark.parametrize(
    ("rows", "keys", "needle"),
    [
        (
            [{"prompt": "a", "completion": "b"}] * 5,
            {},
            "data.format 'auto': the dataset's columns (completion, prompt)",
        ),
        ([{"instruction": "a", "answer": "b"}] * 5, {"data.format": "instruction"}, "needs the column(s) output"),
        (
            instruction_rows(9, secret_at=4),
            {},
            "1 of 9 rows of the train split have an empty 'instruction' or 'output'",
        ),
        (
            [{"messages": [{"role": "user", "content": SECRET}]}] + chats(4),
            {},
            "1 of 5 chats of the train split are malformed (the first has a last turn that is not the assistant's",
        ),
        ([{"messages": [{"role": "robot", "content": SECRET}, {"role": "assistant", "content": "x"}]}], {}, "role"),
    ],
)
def test_records_without_the_named_fields_get_one_error_without_row_text(tmp_path, rows, keys, needle) -> None:
    write_jsonl(tmp_path / "d" / "train.jsonl", rows)
    with pytest.raises(FedHFDataError) as err:
        data_of(tmp_path / "d", **keys)
    assert needle in str(err.value) and SECRET not in str(err.value)


def test_records_partition_naturally_or_iid_but_not_by_label(tmp_path) -> None:
    write_jsonl(tmp_path / "inst" / "train.jsonl", instruction_rows(60))
    cfg = parse_config(
        {"model.task": "causal-lm", "data.dataset": str(tmp_path / "inst"), "data.partitioner": "natural",
         "data.partition-column": "category", "data.local-eval-fraction": 0.0}
    )  # fmt: skip
    parts = make_partitions(load_data(cfg.data), cfg.data, cfg.seed, 2)
    stats = parts.stats()
    assert [s["natural_id"] for s in stats] == ["echo", "sentiment"] and [s["train_examples"] for s in stats] == [
        20,
        40,
    ]
    assert all(s["label_histogram"] == [] for s in stats)
    assert set(parts.parts[0][0]["category"]) == {"echo"}
    bad = parse_config({**cfg.to_flat(), "data.partitioner": "dirichlet"})
    with pytest.raises(FedHFDataError, match="'dirichlet' splits the rows by label"):
        make_partitions(load_data(bad.data), bad.data, bad.seed, 2)


def test_exact_match_and_token_f1_compare_normalized_words() -> None:
    assert C.normalize_text("  The Cat, sat!\n") == "the cat sat"
    assert C.token_f1("the cat sat", "The cat sat.") == 1.0
    assert C.token_f1("a cat", "the cat sat") == pytest.approx(2 * 0.5 * (1 / 3) / (0.5 + 1 / 3))
    assert C.token_f1("dog", "cat") == 0.0 and C.token_f1("", "") == 1.0 and C.token_f1("", "x") == 0.0


def test_a_silo_of_records_reads_its_own_format_and_refuses_labelled_rows(tmp_path) -> None:
    from fedhf.data.silos import load_silo

    cfg = parse_config({"model.task": "causal-lm", "data.local-eval-fraction": 0.2})
    write_jsonl(tmp_path / "chat" / "train.jsonl", chats(20))
    train, local_eval, names = load_silo(cfg.data, str(tmp_path / "chat"), (), cfg.seed)
    assert names == [] and (len(train), len(local_eval)) == (16, 4) and train.column_names == ["messages"]
    write_jsonl(tmp_path / "lab" / "train.jsonl", [{"text": SECRET, "label": i % 2} for i in range(20)])
    with pytest.raises(FedHFDataError) as err:
        load_silo(cfg.data, str(tmp_path / "lab"), (), cfg.seed)
    assert "holds labelled texts" in str(err.value) and SECRET not in err.value.public
    write_jsonl(tmp_path / "bad" / "train.jsonl", instruction_rows(9, secret_at=2))
    with pytest.raises(FedHFDataError) as err:
        load_silo(cfg.data, str(tmp_path / "bad"), (), cfg.seed)
    assert "empty 'instruction' or 'output'" in err.value.public and SECRET not in str(err.value)
