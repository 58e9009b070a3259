"""Instruction, chat and plain-text records (data.format, model.task causal-lm): detected from the columns, checked
row by row with errors that carry no row text, partitioned without labels, and scored by exact match and token F1
(plain text: next-token accuracy)."""

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


def test_plain_text_is_detected_read_from_its_column_checked_and_partitioned_without_labels(tmp_path) -> None:
    from fedhf.data.records import metric_names, record_texts

    texts = [{"text": f"document {i} says {'yes' if i % 2 else 'no'}", "site": f"s{i % 3}"} for i in range(30)]
    write_jsonl(tmp_path / "txt" / "train.jsonl", texts)
    data = data_of(tmp_path / "txt", **{"data.partition-column": "site"})
    assert data.format == "text" and data.label_names == [] and data.train.column_names == ["text", "site"]
    assert data.source["text_column"] == "text" and record_texts(data.train)[1] == "document 1 says yes"
    # labelled rows read as plain text by name: the text column only, the labels dropped
    write_jsonl(tmp_path / "lab" / "train.jsonl", [{"review": f"r {i}", "label": i % 2} for i in range(20)])
    plain = data_of(tmp_path / "lab", **{"data.format": "text"})
    assert plain.format == "text" and plain.train.column_names == ["text"] and plain.train["text"][3] == "r 3"
    assert data_of(tmp_path / "lab").format == "labels"  # auto: a label column makes labelled rows
    with pytest.raises(FedHFDataError, match="data.format 'text' reads column 'body'"):
        data_of(tmp_path / "lab", **{"data.format": "text", "data.text-column": "body"})
    write_jsonl(tmp_path / "empty" / "train.jsonl", [{"text": SECRET}] * 5 + [{"text": "  "}, {"text": None}])
    with pytest.raises(FedHFDataError) as err:
        data_of(tmp_path / "empty")
    assert "2 of 7 rows of the train split have an empty text" in str(err.value) and SECRET not in str(err.value)
    cfg = parse_config({"model.task": "causal-lm", "data.dataset": str(tmp_path / "txt"), "data.partitioner": "natural",
                        "data.partition-column": "site", "data.local-eval-fraction": 0.0})  # fmt: skip
    parts = make_partitions(load_data(cfg.data), cfg.data, cfg.seed, 3)
    assert [s["train_examples"] for s in parts.stats()] == [10, 10, 10]
    assert all(s["label_histogram"] == [] for s in parts.stats())
    bad = parse_config({**cfg.to_flat(), "data.partitioner": "pathological"})
    with pytest.raises(FedHFDataError, match="records of data.format 'text' have none"):
        make_partitions(load_data(bad.data), bad.data, bad.seed, 3)
    assert metric_names("text").accuracy == "next-token accuracy" and metric_names(None).f1 == "macro-F1"


def test_a_silo_of_plain_text_reads_its_own_text_column(tmp_path) -> None:
    from fedhf.data.silos import load_silo

    cfg = parse_config({"model.task": "causal-lm", "data.local-eval-fraction": 0.25, "data.text-column": "body"})
    write_jsonl(tmp_path / "silo" / "train.jsonl", [{"body": f"note {i}"} for i in range(20)])
    train, local_eval, names = load_silo(cfg.data, str(tmp_path / "silo"), (), cfg.seed)
    assert names == [] and (len(train), len(local_eval)) == (15, 5) and train.column_names == ["text"]
    assert sorted(list(train["text"]) + list(local_eval["text"])) == sorted(f"note {i}" for i in range(20))
    # no data.text-column: the column is detected as centrally (here 'sentence')
    plain = parse_config({"model.task": "causal-lm", "data.local-eval-fraction": 0.25})
    write_jsonl(tmp_path / "sent" / "train.jsonl", [{"sentence": f"s {i}"} for i in range(8)])
    train, _, _ = load_silo(plain.data, str(tmp_path / "sent"), (), plain.seed)
    assert train.column_names == ["text"] and len(train) == 6


def test_auto_reads_plain_text_only_from_a_text_column_alone(tmp_path) -> None:
    """Other columns beside a text column are not dropped silently: auto refuses and data.format=text says so."""
    write_jsonl(tmp_path / "qa" / "train.jsonl", [{"question": f"q {i}", "answer": f"a {i}"} for i in range(10)])
    with pytest.raises(FedHFDataError, match="data.format 'auto': the dataset's columns \\(answer, question\\)"):
        data_of(tmp_path / "qa")
    assert data_of(tmp_path / "qa", **{"data.format": "text"}).train["text"][2] == "q 2"
    write_jsonl(tmp_path / "lab" / "train.jsonl", [{"text": f"t {i}", "label": f"g{i % 2}"} for i in range(10)])
    with pytest.raises(FedHFDataError, match="'data.partition-column': 'label' is a column name"):
        data_of(tmp_path / "lab", **{"data.format": "text", "data.partition-column": "label"})
