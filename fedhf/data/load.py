"""Datasets: load (preset, Hub id or local files), map labels, partition, describe.

Everything here is plain ``datasets`` + ``flwr_datasets.partitioner``; nothing
imports Flower's app layer. After loading, every dataset has the columns
``text`` (str) and ``label`` (int id into ``label_names``), plus the natural
partition column when the preset has one (AfriSenti: ``language``).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets

from fedhf._io import sha256_file
from fedhf.config.env import hub_offline
from fedhf.config.schema import DataConfig, split_list
from fedhf.data.records import check_columns, normalise_records
from fedhf.errors import FedHFDataError

log = logging.getLogger("fedhf")

DATA_DIR_ENV = "FEDHF_DATA_DIR"
TEXT_CANDIDATES = ("text", "sentence", "tweet", "content", "review", "document", "sentence1", "question")
LABEL_CANDIDATES = ("label", "labels", "sentiment", "category", "class", "target")
FILE_FORMATS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
TRAIN_NAMES = ("train",)
EVAL_NAMES = ("test", "validation", "valid", "dev", "eval")

AFRISENTI_LANGUAGES = ("amh", "arq", "ary", "hau", "ibo", "kin", "orm", "pcm", "por", "swa", "tir", "tso", "twi", "yor")


@dataclass(frozen=True)
class Preset:
    """A dataset users reach for first: where it lives and what it means."""

    name: str
    hub_id: str
    text_column: str
    label_column: str
    label_names: tuple[str, ...]
    hub_eval_split: str
    license: str
    citation: str
    partition_column: str = ""
    languages: tuple[str, ...] = ("en",)


PRESETS: dict[str, Preset] = {
    "sst2": Preset(
        name="sst2",
        hub_id="stanfordnlp/sst2",
        text_column="sentence",
        label_column="label",
        label_names=("negative", "positive"),
        hub_eval_split="validation",
        license="unknown",
        citation=(
            "Socher et al. 2013, Recursive Deep Models for Semantic Compositionality Over a Sentiment Treebank, EMNLP."
        ),
    ),
    "ag_news": Preset(
        name="ag_news",
        hub_id="fancyzhx/ag_news",
        text_column="text",
        label_column="label",
        label_names=("World", "Sports", "Business", "Sci/Tech"),
        hub_eval_split="test",
        license="research and non-commercial use only",
        citation="Zhang, Zhao and LeCun 2015, Character-level Convolutional Networks for Text Classification, NeurIPS.",
    ),
    "afrisenti": Preset(
        name="afrisenti",
        hub_id="shmuhammad/AfriSentiData",
        text_column="tweet",
        label_column="label",
        label_names=("negative", "neutral", "positive"),
        hub_eval_split="test",
        license="cc-by-4.0",
        citation=(
            "Muhammad et al. 2023, AfriSenti: A Twitter Sentiment Analysis Benchmark for African "
            "Languages, EMNLP; SemEval-2023 Task 12."
        ),
        partition_column="language",
        languages=AFRISENTI_LANGUAGES,
    ),
}


@dataclass
class LoadedData:
    """A dataset normalised to ``text``/``label`` columns, with its provenance."""

    train: datasets.Dataset
    eval: datasets.Dataset | None
    label_names: list[str]
    source: dict[str, Any] = field(default_factory=dict)
    preset: Preset | None = None
    partition_column: str = ""
    label_ids: tuple[int, ...] = ()  # the file's integer label of each id, when the labels were bare ids (GLUE's files)
    format: str = "labels"  # data.format as resolved: labels (text, label) or a record format (fedhf.data.records):
    # instruction, messages or text


# --------------------------------------------------------------------------- loading


def load_data(cfg: DataConfig, data_dir: str | None = None) -> LoadedData:
    """Load the dataset named by ``data.dataset`` and normalise its columns and labels.

    ``data_dir`` defaults to ``$FEDHF_DATA_DIR``; presets are read from there when set.
    """
    if data_dir is None:
        data_dir = os.environ.get(DATA_DIR_ENV) or None
    return _load_data_cached(cfg, data_dir)


@functools.lru_cache(maxsize=4)
def _load_data_cached(cfg: DataConfig, data_dir: str | None) -> LoadedData:
    # Keyed on every argument (the frozen config and the data folder): a later call with
    # another dataset, column or cap loads anew.
    name = cfg.dataset.strip()
    preset = PRESETS.get(name.lower())
    if preset is not None:
        raw_train, raw_eval, source = _load_preset(preset, cfg, data_dir)
    elif _looks_like_path(name):
        raw_train, raw_eval, source = load_local(name)
    else:
        raw_train, raw_eval, source = _load_hub(name, None)
    fmt = resolve_format(cfg, raw_train.column_names, preset)
    text_col = (
        cfg.text_column
        or (preset.text_column if preset else "")
        or detect(raw_train, TEXT_CANDIDATES, "text", "data.text-column")
        if fmt in ("labels", "text")
        else ""
    )
    if fmt != "labels":
        part_col = cfg.partition_column or (preset.partition_column if preset and fmt == "text" else "")
        train = normalise_records(raw_train, fmt, part_col, "train", text_col or "text")
        eval_ds = (
            normalise_records(raw_eval, fmt, part_col, "eval", text_col or "text") if raw_eval is not None else None
        )
        source["format"] = fmt
        if fmt == "text":
            source["text_column"] = text_col
        return LoadedData(train, eval_ds, [], source, preset, part_col, (), fmt)
    label_col = (
        cfg.label_column
        or (preset.label_column if preset else "")
        or detect(raw_train, LABEL_CANDIDATES, "label", "data.label-column")
    )
    for col, key in ((text_col, "data.text-column"), (label_col, "data.label-column")):
        if col not in raw_train.column_names:
            raise FedHFDataError(
                f"column '{col}' not found in dataset '{name}' (columns: {', '.join(raw_train.column_names)}); "
                f"set {key} to one of them."
            )
    part_col = cfg.partition_column or (preset.partition_column if preset else "")
    label_names, to_id = _label_mapping(raw_train, label_col, preset)
    bare = not isinstance(raw_train.features[label_col], datasets.ClassLabel) and label_names == [str(v) for v in to_id]
    label_ids = tuple(int(v) for v in to_id) if bare and all(isinstance(v, int) for v in to_id) else ()
    if len(label_names) < 2:
        raise FedHFDataError(
            f"label column '{label_col}' holds a single class ({label_names}); a classifier needs at "
            "least two; check the file or set data.label-column."
        )
    train = normalise(raw_train, text_col, label_col, to_id, part_col, "train")
    eval_ds = normalise(raw_eval, text_col, label_col, to_id, part_col, "eval") if raw_eval is not None else None
    source.update({"text_column": text_col, "label_column": label_col})
    return LoadedData(train, eval_ds, label_names, source, preset, part_col, label_ids)


def resolve_format(cfg: DataConfig, columns: list[str], preset: Preset | None) -> str:
    """``data.format``, with ``auto`` read from the training split's columns: messages, then instruction + output,
    then labels (a preset, or a label column), else text (a text column alone). A classifier's config always says
    labels (fedhf.config.schema)."""
    fmt = cfg.format
    if fmt != "auto":
        if fmt not in ("labels", "text"):  # text: its column is data.text-column or detected (load_data)
            check_columns(columns, fmt)
        return fmt
    if preset is not None:
        return "labels"
    if "messages" in columns:
        return "messages"
    if {"instruction", "output"} <= set(columns):
        return "instruction"
    lower = {c.lower() for c in columns}
    if cfg.label_column or any(c in lower for c in LABEL_CANDIDATES):
        return "labels"
    text = [c for c in columns if c == cfg.text_column or (not cfg.text_column and c.lower() in TEXT_CANDIDATES)]
    others = set(columns) - set(text[:1]) - {cfg.partition_column}
    if text and not others:  # a text column alone (and the partition column): plain text; else say which
        return "text"
    raise FedHFDataError(
        f"data.format 'auto': the dataset's columns ({', '.join(sorted(columns)) or 'none'}) are none of model.task "
        "causal-lm's formats: 'messages' (chats), 'instruction' + 'output' (+ optional 'input'), a text and a "
        "label column, or a text column alone (plain text); rename the columns, or set data.format (and "
        "data.text-column, data.label-column)."
    )


def label_ids_onto(values: Iterable[Any], names: Sequence[str]) -> tuple[dict[Any, int], list[Any]]:
    """How label values map onto the label ids of ``names``: by name when they are strings, by id when they are
    integer ids 0..K-1 (as in GLUE's SST-2 files). Returns (value -> id for the values that map, those that do not)."""
    values = list(dict.fromkeys(values))
    if all(isinstance(v, str) for v in values):
        to_id: dict[Any, int] = {n: i for i, n in enumerate(names)}
    elif all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        to_id = {i: i for i in range(len(names))}
    else:
        to_id = {}
    return {v: to_id[v] for v in values if v in to_id}, sorted((v for v in values if v not in to_id), key=repr)


def onto_label_names(data: LoadedData, names: list[str] | tuple[str, ...], what: str) -> LoadedData:
    """``data`` with its label ids mapped onto ``names`` (an adapter's label names): by name, or by id when the
    data's labels are bare integer ids 0..K-1 (as in GLUE's SST-2 files). Raises naming both label sets otherwise."""
    names = list(names)
    mine = list(data.label_names)
    if mine == names:
        return data
    by_name, unknown = label_ids_onto(mine, names)
    by_id, unknown_ids = label_ids_onto(data.label_ids, names)
    if not unknown:
        new_id = [by_name[n] for n in mine]
    elif data.label_ids and not unknown_ids:
        new_id = [by_id[i] for i in data.label_ids]
    else:
        ids = f" or integer ids 0..{len(names) - 1}" if names else ""
        raise FedHFDataError(
            f"{what}: the data's labels {mine} are not among the adapter's {names}{ids}; "
            "use data with the same label set (names, or ids in the adapter's order)."
        )

    def remap(ds: datasets.Dataset | None) -> datasets.Dataset | None:
        if ds is None:
            return None
        out = ds.map(
            lambda b: {"label": [new_id[i] for i in b["label"]]},
            batched=True,
            load_from_cache_file=False,
            desc="mapping labels",
        )
        return out.cast_column("label", datasets.Value("int64"))

    return dataclasses.replace(data, train=remap(data.train), eval=remap(data.eval), label_names=names, label_ids=())


def _looks_like_path(name: str) -> bool:
    if name.startswith((".", "/", "~")) or os.path.exists(name):
        return True
    return Path(name).suffix.lower() in FILE_FORMATS


def _read_files(
    files: dict[str, list[str]], header: bool = True, names: list[str] | None = None
) -> datasets.DatasetDict:
    """Read local files with ``datasets``; TSVs with quoting disabled so quotes stay in the text."""
    suffixes = {Path(f).suffix.lower() for fs in files.values() for f in fs}
    formats = {FILE_FORMATS[s] for s in suffixes}
    if len(formats) != 1:
        raise FedHFDataError(
            f"mixed file formats {sorted(suffixes)} in one dataset; keep one format per dataset folder."
        )
    fmt = formats.pop()
    kwargs: dict[str, Any] = {}
    if fmt == "csv":
        if suffixes == {".tsv"}:
            kwargs.update(delimiter="\t", quoting=3)
        if not header:
            kwargs.update(header=None, names=names)
    try:
        return datasets.load_dataset(fmt, data_files=files, **kwargs)
    except Exception as exc:  # datasets raises many types for unreadable files
        raise FedHFDataError(f"cannot read {sorted(f for fs in files.values() for f in fs)}: {exc}") from None


def _file_source(kind: str, files: dict[str, list[str]], base: Path, **extra: Any) -> dict[str, Any]:
    """Provenance of local files: names relative to their folder and a sha256 each."""
    return {
        "kind": kind,
        "files": {
            split: [{"name": os.path.relpath(f, base), "sha256": sha256_file(f)} for f in fs]
            for split, fs in files.items()
        },
        **extra,
    }


def load_local(name: str) -> tuple[datasets.Dataset, datasets.Dataset | None, dict[str, Any]]:
    path = Path(name).expanduser()
    if not path.exists():
        raise FedHFDataError(
            f"data.dataset: path '{name}' does not exist; give an existing file or folder "
            f"({', '.join(sorted(FILE_FORMATS))}), a preset ({', '.join(PRESETS)}) or a Hub id."
        )
    if path.is_file():
        if path.suffix.lower() not in FILE_FORMATS:
            raise FedHFDataError(
                f"data.dataset: '{path}' has an unsupported extension; use one of {', '.join(sorted(FILE_FORMATS))}."
            )
        files = {"train": [str(path)]}
        base = path.parent
    else:
        found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in FILE_FORMATS)
        if not found:
            raise FedHFDataError(f"data.dataset: folder '{path}' holds no {', '.join(sorted(FILE_FORMATS))} files.")
        files = {}
        for p in found:
            stem = p.stem.lower()
            split = "train" if stem in TRAIN_NAMES else "eval" if stem in EVAL_NAMES else None
            if split:
                files.setdefault(split, []).append(str(p))
        if "train" not in files:  # no split names: every file is training data
            files = {"train": [str(p) for p in found]}
        elif "eval" in files and len(files["eval"]) > 1:
            # prefer test over validation/dev, as the central eval set
            order = {n: i for i, n in enumerate(EVAL_NAMES)}
            files["eval"] = [min(files["eval"], key=lambda f: order[Path(f).stem.lower()])]
        base = path
    dd = _read_files(files)
    return dd["train"], dd.get("eval"), _file_source("local", files, base)


def _load_preset(
    preset: Preset, cfg: DataConfig, data_dir: str | None
) -> tuple[datasets.Dataset, datasets.Dataset | None, dict[str, Any]]:
    if data_dir is None:
        if preset.name == "afrisenti":
            return _load_afrisenti_hub(preset, cfg)
        train, eval_ds, source = _load_hub(preset.hub_id, None, eval_split=preset.hub_eval_split)
        source["preset"] = preset.name
        return train, eval_ds, source
    root = Path(data_dir).expanduser() / preset.name
    if not root.is_dir():
        raise FedHFDataError(
            f"{DATA_DIR_ENV}={data_dir}: no folder '{preset.name}/' there; lay it out as described in the README "
            f"(e.g. {preset.name}/train.tsv) or unset {DATA_DIR_ENV} to load '{preset.hub_id}' from the Hub."
        )
    extra = {"preset": preset.name, "hub_id": preset.hub_id}
    if preset.name == "sst2":
        files = {"train": [str(root / "train.tsv")], "eval": [str(root / "test.tsv")]}
        dd = _read_files(_require(files))
        return dd["train"], dd["eval"], _file_source("preset-local", files, root, **extra)
    if preset.name == "ag_news":
        files = {"train": [str(root / "train.tsv")], "eval": [str(root / "test.tsv")]}
        dd = _read_files(_require(files), header=False, names=["text", "label"])
        return dd["train"], dd["eval"], _file_source("preset-local", files, root, **extra)
    # afrisenti: one folder per language; the language becomes a column
    langs = _afrisenti_languages(cfg)
    trains, evals, files = [], [], {"train": [], "eval": []}
    for lang in langs:
        lf = {"train": [str(root / lang / "train.tsv")], "eval": [str(root / lang / "test.tsv")]}
        _require(lf)
        files["train"] += lf["train"]
        files["eval"] += lf["eval"]
        for split, bucket in (("train", trains), ("eval", evals)):
            # Each split on its own: orm and tir have an extra ID column in dev/test (and an empty train).
            if _has_no_rows(lf[split][0]):  # orm, tir: a train file with a header only (zero-shot languages)
                ds = datasets.Dataset.from_dict(
                    {"tweet": [], "label": []},
                    features=datasets.Features({"tweet": datasets.Value("string"), "label": datasets.Value("string")}),
                )
            else:
                ds = _read_files({split: lf[split]})[split].select_columns(["tweet", "label"])
            bucket.append(ds.add_column("language", [lang] * len(ds)))
    train = datasets.concatenate_datasets(trains)
    eval_ds = datasets.concatenate_datasets(evals)
    return train, eval_ds, _file_source("preset-local", files, root, languages=langs, **extra)


def _has_no_rows(path: str) -> bool:
    with open(path, encoding="utf-8") as fh:
        return sum(1 for line in fh if line.strip()) <= 1


def _afrisenti_languages(cfg: DataConfig) -> list[str]:
    langs = split_list(cfg.languages)
    if not langs:
        return [lang for lang in AFRISENTI_LANGUAGES if lang not in ("orm", "tir")]  # orm, tir: no train data
    bad = [lang for lang in langs if lang not in AFRISENTI_LANGUAGES]
    if bad:
        raise FedHFDataError(
            f"config key 'data.languages': unknown AfriSenti language(s) {', '.join(bad)}; "
            f"allowed: {', '.join(AFRISENTI_LANGUAGES)}."
        )
    return langs


def _require(files: dict[str, list[str]]) -> dict[str, list[str]]:
    for fs in files.values():
        for f in fs:
            if not Path(f).is_file():
                raise FedHFDataError(
                    f"missing data file '{f}'; check {DATA_DIR_ENV} and the layout described in the README."
                )
    return files


def _hub_unreachable(repo: str, exc: Exception) -> FedHFDataError:
    return FedHFDataError(
        f"cannot reach the Hugging Face Hub for dataset '{repo}' and there is no local copy "
        f"({type(exc).__name__}); set {DATA_DIR_ENV} to a folder with local copies of the presets, "
        f"or set data.dataset to a local file or folder."
    )


def _hub_revision(repo: str) -> str | None:
    """Resolve the dataset's commit on the Hub (fast failure when offline, for provenance)."""
    if hub_offline():
        return None
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        return HfApi().dataset_info(repo).sha
    except RepositoryNotFoundError:
        raise FedHFDataError(
            f"data.dataset: '{repo}' is not a dataset on the Hub, a preset ({', '.join(PRESETS)}) "
            f"or an existing local path."
        ) from None
    except Exception as exc:  # connection errors of several kinds
        raise _hub_unreachable(repo, exc) from None


def _load_hub(
    repo: str, name: str | None, eval_split: str | None = None
) -> tuple[datasets.Dataset, datasets.Dataset | None, dict[str, Any]]:
    revision = _hub_revision(repo)
    try:
        dd = datasets.load_dataset(repo, name, revision=revision)
    except Exception as exc:
        raise _hub_unreachable(repo, exc) from None
    if "train" not in dd:
        raise FedHFDataError(f"Hub dataset '{repo}' has no 'train' split (splits: {', '.join(dd)}).")
    if eval_split is None:
        eval_split = next((s for s in ("test", "validation", "valid", "dev") if s in dd), None)
    return (
        dd["train"],
        dd[eval_split] if eval_split else None,
        {"kind": "hub", "hub_id": repo, "config": name, "revision": revision, "eval_split": eval_split},
    )


def _load_afrisenti_hub(
    preset: Preset, cfg: DataConfig
) -> tuple[datasets.Dataset, datasets.Dataset | None, dict[str, Any]]:
    langs = _afrisenti_languages(cfg)
    trains, evals, revision = [], [], None
    for lang in langs:
        train, eval_ds, src = _load_hub(preset.hub_id, lang, eval_split=preset.hub_eval_split)
        revision = src["revision"]
        for ds, bucket in ((train, trains), (eval_ds, evals)):
            ds = ds.select_columns(["tweet", "label"])
            bucket.append(ds.add_column("language", [lang] * len(ds)))
    return (
        datasets.concatenate_datasets(trains),
        datasets.concatenate_datasets(evals),
        {"kind": "hub", "hub_id": preset.hub_id, "revision": revision, "languages": langs, "preset": preset.name},
    )


def detect(ds: datasets.Dataset, candidates: tuple[str, ...], what: str, key: str) -> str:
    lower = {c.lower(): c for c in ds.column_names}
    for c in candidates:
        if c in lower:
            return lower[c]
    msg = (
        f"no {what} column found (columns: {', '.join(ds.column_names)}; looked for {', '.join(candidates)}); "
        f"set {key} to the right one."
    )
    raise FedHFDataError(msg, public=msg)  # column names only


def _label_mapping(ds: datasets.Dataset, col: str, preset: Preset | None) -> tuple[list[str], dict[Any, int]]:
    """Fixed, recorded order of labels: ClassLabel names, the preset's names, else sorted values."""
    feature = ds.features[col]
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names), {i: i for i in range(feature.num_classes)}
    values = set(ds.unique(col))
    if None in values:
        msg = f"label column '{col}' has empty values; clean the data or choose another data.label-column."
        raise FedHFDataError(msg, public=msg)
    if all(isinstance(v, str) for v in values):
        if preset and values <= set(preset.label_names):
            names = list(preset.label_names)
        else:
            names = sorted(values)
        return names, {n: i for i, n in enumerate(names)}
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        if preset and values <= set(range(len(preset.label_names))):
            return list(preset.label_names), {i: i for i in range(len(preset.label_names))}
        ordered = sorted(values)
        return [str(v) for v in ordered], {v: i for i, v in enumerate(ordered)}
    raise FedHFDataError(
        f"label column '{col}' mixes types or holds floats ({sorted(map(repr, values))[:5]}); "
        f"labels must be class names or integer ids.",
        public=f"label column '{col}' mixes types or holds floats; labels must be class names or integer ids.",
    )


def normalise(
    ds: datasets.Dataset, text_col: str, label_col: str, to_id: dict[Any, int], part_col: str, split: str
) -> datasets.Dataset:
    missing = [c for c in (text_col, label_col) if c not in ds.column_names]
    if missing:
        msg = f"the {split} split lacks column(s) {', '.join(missing)} (columns: {', '.join(ds.column_names)})."
        raise FedHFDataError(msg, public=msg)
    keep = [text_col, label_col] + ([part_col] if part_col and part_col in ds.column_names else [])
    ds = ds.select_columns(keep)
    unknown = sorted({v for v in ds.unique(label_col) if v not in to_id}, key=repr)
    if unknown:
        raise FedHFDataError(
            f"the {split} split has labels {unknown[:5]} that the training split does not have; "
            f"known labels: {list(to_id)[:10]}.",
            public=f"the {split} split has {len(unknown)} label value(s) in column '{label_col}' that the training "
            "split does not have.",
        )
    # Plain lists, read once: `ds[col]` is a lazy column, and `from_dict` would read it back one row at a time
    # (15 s for AfriSenti's three largest languages).
    raw = ds.to_dict()
    columns: dict[str, list[Any]] = {
        "text": ["" if t is None else str(t) for t in raw[text_col]],
        "label": [to_id[v] for v in raw[label_col]],
    }
    if part_col and part_col in raw:
        columns[part_col] = raw[part_col]
    return datasets.Dataset.from_dict(columns)


# --------------------------------------------------------------------------- partitioning
