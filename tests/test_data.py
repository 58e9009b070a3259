from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from fedhf.config.schema import parse_config
from fedhf.data.load import load_data
from fedhf.data.partitions import central_eval_set, load_partition, make_partitions
from fedhf.errors import FedHFDataError

from .conftest import synthetic_rows, write_jsonl, write_tsv


def data_cfg(**flat):
    return parse_config({f"data.{k}": v for k, v in flat.items()}).data


def all_texts(parts):
    out = []
    for train, local_eval in parts.parts:
        out.append(list(train["text"]) + (list(local_eval["text"]) if local_eval is not None else []))
    return out


def test_tsv_with_quotes_loads_intact(tmp_path):
    rows = [
        {"sentence": 'he said "great" and left', "label": 1},
        {"sentence": "it's a \"so-so\" film, 'really'", "label": 0},
        {"sentence": '"quoted at the start', "label": 1},
    ]
    f = write_tsv(tmp_path / "train.tsv", rows, ["sentence", "label"])
    data = load_data(data_cfg(dataset=str(f)))
    assert list(data.train["text"]) == [r["sentence"] for r in rows]
    assert data.source["text_column"] == "sentence" and data.source["label_column"] == "label"


def test_folder_with_splits_string_labels_and_provenance(synthetic_dir):
    data = load_data(data_cfg(dataset=str(synthetic_dir)))
    assert data.label_names == ["negative", "positive"]  # sorted, fixed order
    assert len(data.train) == 200 and len(data.eval) == 60
    assert set(data.train["label"]) == {0, 1}
    truth = {r["text"]: r["label"] for r in synthetic_rows(200, seed=1)}
    assert all(
        data.label_names[label] == truth[text]
        for text, label in zip(data.train["text"], data.train["label"], strict=True)
    )
    files = data.source["files"]
    assert [f["name"] for f in files["train"]] == ["train.tsv"] and len(files["train"][0]["sha256"]) == 64


def test_label_mapping_does_not_depend_on_row_order(tmp_path):
    rows = synthetic_rows(20)
    a = load_data(data_cfg(dataset=str(write_jsonl(tmp_path / "a" / "train.jsonl", rows))))
    b = load_data(data_cfg(dataset=str(write_jsonl(tmp_path / "b" / "train.jsonl", rows[::-1]))))
    assert a.label_names == b.label_names == ["negative", "positive"]
    ma = dict(zip(a.train["text"], a.train["label"], strict=True))
    mb = dict(zip(b.train["text"], b.train["label"], strict=True))
    assert ma == mb


@pytest.mark.parametrize("fmt", ["csv", "json", "parquet"])
def test_formats_and_explicit_columns(tmp_path, fmt):
    df = pd.DataFrame({"body": [f"text {i}" for i in range(12)], "y": [i % 3 for i in range(12)]})
    f = tmp_path / f"data.{fmt}"
    {
        "csv": lambda: df.to_csv(f, index=False),
        "json": lambda: df.to_json(f, orient="records", lines=True),
        "parquet": lambda: df.to_parquet(f),
    }[fmt]()
    with pytest.raises(FedHFDataError, match="no text column found .*set data.text-column"):
        load_data(data_cfg(dataset=str(f)))
    data = load_data(data_cfg(dataset=str(f), **{"text-column": "body", "label-column": "y"}))
    assert data.label_names == ["0", "1", "2"] and len(data.train) == 12


def test_missing_columns_and_paths(tmp_path, synthetic_dir):
    with pytest.raises(FedHFDataError, match="column 'review' not found .*columns: text, label.*data.text-column"):
        load_data(data_cfg(dataset=str(synthetic_dir), **{"text-column": "review"}))
    with pytest.raises(FedHFDataError, match="column 'stars' not found"):
        load_data(data_cfg(dataset=str(synthetic_dir), **{"label-column": "stars"}))
    with pytest.raises(FedHFDataError, match="does not exist"):
        load_data(data_cfg(dataset=str(tmp_path / "nope" / "train.csv")))
    with pytest.raises(FedHFDataError, match="does not exist"):
        load_data(data_cfg(dataset="./no/such/folder"))


def test_unreachable_hub_id_without_local_copy():
    with pytest.raises(
        FedHFDataError, match="cannot reach the Hugging Face Hub for dataset 'nobody/no-such-dataset'.*FEDHF_DATA_DIR"
    ):
        load_data(data_cfg(dataset="nobody/no-such-dataset"), data_dir=None)


def test_eval_labels_must_be_known(tmp_path):
    write_tsv(
        tmp_path / "d" / "train.tsv", [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}], ["text", "label"]
    )
    write_tsv(tmp_path / "d" / "test.tsv", [{"text": "c", "label": "z"}], ["text", "label"])
    with pytest.raises(FedHFDataError, match="labels \\['z'\\] that the training split does not have"):
        load_data(data_cfg(dataset=str(tmp_path / "d")))


def test_iid_partitions_are_disjoint_covering_and_seeded(synthetic_dir):
    cfg = data_cfg(dataset=str(synthetic_dir), **{"max-train-examples": 150})
    data = load_data(cfg)
    p1 = make_partitions(data, cfg, seed=7, num_partitions=4)
    texts = all_texts(p1)
    flat = [t for part in texts for t in part]
    assert len(flat) == len(set(flat)) == 150  # disjoint and covering the sampled rows
    assert set(flat) <= set(data.train["text"])
    assert [len(t) for t in texts] == [38, 38, 37, 37]
    assert all_texts(make_partitions(data, cfg, seed=7, num_partitions=4)) == texts  # deterministic
    assert all_texts(make_partitions(data, cfg, seed=8, num_partitions=4)) != texts  # the seed matters
    stats = p1.stats()
    for row, (train, local_eval) in zip(stats, p1.parts, strict=True):
        assert sum(row["label_histogram"]) == row["train_examples"] == len(train)
        assert row["eval_examples"] == len(local_eval) == round((len(train) + len(local_eval)) * 0.1)


def test_dirichlet_skews_labels_and_respects_min_size(synthetic_dir):
    cfg = data_cfg(
        dataset=str(synthetic_dir),
        partitioner="dirichlet",
        **{"dirichlet-alpha": 0.1, "min-partition-size": 5, "local-eval-fraction": 0.0},
    )
    parts = make_partitions(load_data(cfg), cfg, seed=0, num_partitions=4)
    sizes = [len(t) for t, _ in parts.parts]
    assert sum(sizes) == 200 and min(sizes) >= 5
    majority = [max(r["label_histogram"]) / r["train_examples"] for r in parts.stats()]
    assert max(majority) > 0.8  # alpha=0.1: at least one client is dominated by one label
    assert all_texts(make_partitions(load_data(cfg), cfg, seed=0, num_partitions=4)) == all_texts(parts)


def test_pathological_gives_each_client_its_classes(tmp_path):
    rows = [{"text": f"row {i}", "label": f"c{i % 4}"} for i in range(200)]
    f = write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = data_cfg(dataset=str(f), partitioner="pathological", **{"classes-per-client": 1, "local-eval-fraction": 0.0})
    parts = make_partitions(load_data(cfg), cfg, seed=0, num_partitions=4)
    for row in parts.stats():
        assert sum(1 for c in row["label_histogram"] if c) == 1
    with pytest.raises(FedHFDataError, match="data.classes-per-client.*has 4 labels"):
        make_partitions(
            load_data(cfg), data_cfg(dataset=str(f), partitioner="pathological", **{"classes-per-client": 5}), 0, 4
        )


def test_natural_partition_by_language_column(tmp_path):
    rows = synthetic_rows(90, languages=("hau", "yor", "ibo"))
    f = write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = data_cfg(
        dataset=str(f), partitioner="natural", **{"partition-column": "language", "local-eval-fraction": 0.0}
    )
    data = load_data(cfg)
    parts = make_partitions(data, cfg, seed=0, num_partitions=3)
    assert parts.natural_ids == ["hau", "ibo", "yor"]
    by_lang = Counter(r["language"] for r in rows)
    for (train, _), lang in zip(parts.parts, parts.natural_ids, strict=True):
        assert set(train["language"]) == {lang} and len(train) == by_lang[lang]
    with pytest.raises(FedHFDataError, match="gives 3 clients, but the run has 2.*--num-clients 3"):
        make_partitions(data, cfg, seed=0, num_partitions=2)
    no_col = data_cfg(dataset=str(f), partitioner="natural")
    with pytest.raises(FedHFDataError, match="set data.partition-column"):
        make_partitions(load_data(no_col), no_col, seed=0, num_partitions=3)


def test_more_clients_than_rows_and_bad_counts(tmp_path):
    f = write_jsonl(tmp_path / "train.jsonl", synthetic_rows(5))
    cfg = data_cfg(dataset=str(f))
    with pytest.raises(FedHFDataError, match="5 training rows cannot fill 8 partitions"):
        make_partitions(load_data(cfg), cfg, seed=0, num_partitions=8)
    with pytest.raises(FedHFDataError, match="num-partitions must be >= 1"):
        make_partitions(load_data(cfg), cfg, seed=0, num_partitions=0)
    with pytest.raises(FedHFDataError, match="partition-id 3 is outside 0..2"):
        load_partition(cfg, 0, 3, 3)


def test_load_partition_matches_make_partitions(synthetic_dir):
    cfg = data_cfg(dataset=str(synthetic_dir))
    parts = make_partitions(load_data(cfg), cfg, seed=3, num_partitions=2)
    train, local_eval, names = load_partition(cfg, 3, 1, 2)
    assert list(train["text"]) == list(parts.parts[1][0]["text"])
    assert list(local_eval["text"]) == list(parts.parts[1][1]["text"])
    assert names == ["negative", "positive"]


def test_central_eval_cap(synthetic_dir):
    cfg = data_cfg(dataset=str(synthetic_dir), **{"max-eval-examples": 25})
    ev = central_eval_set(load_data(cfg), cfg, seed=0)
    assert len(ev) == 25 and set(ev["text"]) <= set(load_data(cfg).eval["text"])


# ---------------------------------------------------------------- presets on the real data (FEDHF_DATA_DIR)


def test_sst2_preset(shared_data_dir: Path):
    data = load_data(data_cfg(dataset="sst2"), data_dir=str(shared_data_dir))
    assert data.label_names == ["negative", "positive"]
    assert len(data.train) == 60614 and len(data.eval) == 872
    assert data.source["hub_id"] == "stanfordnlp/sst2"


def test_ag_news_preset_headerless_with_label_names(shared_data_dir: Path):
    data = load_data(data_cfg(dataset="ag_news"), data_dir=str(shared_data_dir))
    assert data.label_names == ["World", "Sports", "Business", "Sci/Tech"]
    assert len(data.eval) == 7600
    assert sorted(Counter(data.eval["label"]).values()) == [1900] * 4


def test_afrisenti_natural_split_one_client_per_language(shared_data_dir: Path):
    cfg = data_cfg(dataset="afrisenti", partitioner="natural", languages="pcm,swa,tso", **{"max-train-examples": 0})
    data = load_data(cfg, data_dir=str(shared_data_dir))
    assert data.label_names == ["negative", "neutral", "positive"]
    parts = make_partitions(data, cfg, seed=0, num_partitions=3)
    assert parts.natural_ids == ["pcm", "swa", "tso"]
    sizes = {r["natural_id"]: r["train_examples"] + r["eval_examples"] for r in parts.stats()}
    assert sizes == {"pcm": 5121, "swa": 1810, "tso": 804}
    with pytest.raises(FedHFDataError, match="unknown AfriSenti language"):
        load_data(data_cfg(dataset="afrisenti", languages="xx"), data_dir=str(shared_data_dir))


def test_group_cap_samples_each_group_on_its_own(tmp_path):
    """max-examples-per-group: a language's sample is the same whether or not the other languages are loaded."""
    from fedhf.data.partitions import prepare_train_rows

    rows = synthetic_rows(300, seed=7, languages=("aa", "bb", "cc"))
    rows += synthetic_rows(12, seed=8, languages=("dd",))  # a small group: kept whole
    both = write_tsv(tmp_path / "all" / "train.tsv", rows, ["text", "label", "language"])
    only = write_tsv(
        tmp_path / "aa" / "train.tsv", [r for r in rows if r["language"] == "aa"], ["text", "label", "language"]
    )
    cfg = {"partition-column": "language", "max-examples-per-group": 40, "max-train-examples": 0}
    pooled = prepare_train_rows(load_data(data_cfg(dataset=str(both), **cfg)), data_cfg(dataset=str(both), **cfg), 5)
    alone = prepare_train_rows(load_data(data_cfg(dataset=str(only), **cfg)), data_cfg(dataset=str(only), **cfg), 5)
    counts = Counter(pooled["language"])
    assert counts == {"aa": 40, "bb": 40, "cc": 40, "dd": 12}
    assert sorted(t for t, lang in zip(pooled["text"], pooled["language"], strict=True) if lang == "aa") == sorted(
        alone["text"]
    )
    other_seed = prepare_train_rows(
        load_data(data_cfg(dataset=str(only), **cfg)), data_cfg(dataset=str(only), **cfg), 6
    )
    assert sorted(other_seed["text"]) != sorted(alone["text"])


def test_split_train_rows_separates_used_and_never_used_rows(synthetic_dir):
    from fedhf.data.partitions import prepare_train_rows, split_train_rows

    cfg = data_cfg(dataset=str(synthetic_dir), **{"max-train-examples": 70})
    data = load_data(cfg)
    used, unused = split_train_rows(data, cfg, 3)
    assert list(used["text"]) == list(prepare_train_rows(data, cfg, 3)["text"])
    assert len(used) == 70 and len(unused) == 130
    assert not set(used["text"]) & set(unused["text"])
    assert sorted(list(used["text"]) + list(unused["text"])) == sorted(data.train["text"])
    everything = data_cfg(dataset=str(synthetic_dir), **{"max-train-examples": 0})
    assert len(split_train_rows(data, everything, 3)[1]) == 0


def test_group_cap_needs_a_partition_column(synthetic_dir):
    from fedhf.data.partitions import prepare_train_rows

    cfg = data_cfg(dataset=str(synthetic_dir), **{"max-examples-per-group": 10})
    with pytest.raises(
        FedHFDataError,
        match="config key 'data.max-examples-per-group': got 10, but the dataset has no partition column",
    ):
        prepare_train_rows(load_data(cfg), cfg, 0)


def test_afrisenti_zero_shot_languages_load_with_an_empty_train(shared_data_dir: Path):
    """orm and tir: a header-only train file and an extra ID column in test: evaluation still works."""
    for lang, rows in (("orm", 2096), ("tir", 2000)):
        cfg = data_cfg(dataset="afrisenti", languages=lang)
        data = load_data(cfg, str(shared_data_dir))
        assert len(data.train) == 0 and len(data.eval) == rows
        assert data.label_names == ["negative", "neutral", "positive"]
        assert set(data.eval["language"]) == {lang} and set(data.eval["label"]) == {0, 1, 2}


def test_integer_label_ids_map_onto_names_by_id_and_names_by_name(tmp_path, shared_data_dir: Path):
    from fedhf.data.load import onto_label_names

    glue = load_data(parse_config({"data.dataset": str(shared_data_dir / "sst2")}).data)  # GLUE's files: ids 0/1
    preset = load_data(parse_config({"data.dataset": "sst2"}).data)
    assert glue.label_names == ["0", "1"] and glue.label_ids == (0, 1)
    mapped = onto_label_names(glue, preset.label_names, "evaluate")
    assert mapped.label_names == ["negative", "positive"]
    assert mapped.eval["label"] == preset.eval["label"] and mapped.eval["text"] == preset.eval["text"]
    assert onto_label_names(preset, preset.label_names, "evaluate") is preset
    # ids that are not 0..K-1 of the adapter's K labels, or names it does not have: refused, naming both
    sparse = write_tsv(
        tmp_path / "s" / "train.tsv", [{"text": f"t {i}", "label": 1 + i % 3} for i in range(12)], ["text", "label"]
    )
    with pytest.raises(FedHFDataError, match=r"labels \['1', '2', '3'\] are not among the adapter's \['a', 'b', 'c'\]"):
        onto_label_names(load_data(parse_config({"data.dataset": str(sparse)}).data), ["a", "b", "c"], "evaluate")
    sub = write_tsv(
        tmp_path / "n" / "train.tsv",
        [{"text": f"t {i}", "label": "positive"} for i in range(4)] + [{"text": "x", "label": "neutral"}],
        ["text", "label"],
    )
    with pytest.raises(FedHFDataError, match="not among the adapter's"):
        onto_label_names(load_data(parse_config({"data.dataset": str(sub)}).data), ["negative", "positive"], "evaluate")
    names = write_tsv(
        tmp_path / "m" / "train.tsv",
        [{"text": f"t {i}", "label": "positive"} for i in range(3)] + [{"text": "y", "label": "negative"}],
        ["text", "label"],
    )
    by_name = onto_label_names(
        load_data(parse_config({"data.dataset": str(names)}).data), ["negative", "neutral", "positive"], "x"
    )
    assert sorted(set(by_name.train["label"])) == [0, 2]


def test_one_rule_maps_label_values_onto_the_label_names():
    """The silo loader and `fedhf evaluate` map labels by the same rule: names by name, integer ids by id."""
    from fedhf.data.load import label_ids_onto

    names = ["negative", "positive"]
    assert label_ids_onto(["positive", "negative", "positive"], names) == ({"positive": 1, "negative": 0}, [])
    assert label_ids_onto([1, 0], names) == ({1: 1, 0: 0}, [])
    assert label_ids_onto([0, 2], names) == ({0: 0}, [2])  # an id beyond the names does not map
    assert label_ids_onto(["neutral", "positive"], names) == ({"positive": 1}, ["neutral"])
    assert label_ids_onto([True, False], names)[1] == [False, True]  # booleans are not ids
    assert set(label_ids_onto([0, "positive"], names)[1]) == {0, "positive"}  # mixed values map by neither rule
