"""The Hub-ready folder: model card metadata and body, provenance, licences."""

import json

import pytest
from huggingface_hub import ModelCard

from fedhf.config.schema import parse_config
from fedhf.release.card import base_model_license, build_hub_folder, combined_license
from fedhf.run.store import RunRecord


def fake_run(tmp_path, *, dataset="sst2", privacy=None, source=None, preset="sst2", license="unknown"):
    cfg = parse_config({"data.dataset": dataset})
    adapter = tmp_path / "run" / "adapter"
    adapter.mkdir(parents=True)
    (tmp_path / "run" / ".fedhf-run").write_text(json.dumps({"run_uid": "u1"}))  # a run folder fedhf made
    for name in ("adapter_config.json", "adapter_model.safetensors", "fedhf.json", "tokenizer.json"):
        (adapter / name).write_text("{}")
    run = {
        "run_id": "r1",
        "run_uid": "u1",
        "status": "complete",
        "started": "2026-12-01T00:00:00+00:00",
        "python": "3.11.7",
        "config": cfg.to_flat(),
        "config_sha256": "ab" * 32,
        "seeds": {"seed": 42},
        "versions": {"flwr": "1.42.0"},
        "git_commit": None,
        "dataset": {
            "name": dataset,
            "preset": preset,
            "label_names": ["negative", "positive"],
            "train_rows": 720,
            "central_eval_rows": 872,
            "license": license,
            "citation": "Someone 2013.",
            "source": source
            or {
                "kind": "preset-local",
                "hub_id": "stanfordnlp/sst2",
                "text_column": "sentence",
                "label_column": "label",
                "files": {"train": [{"name": "train.tsv", "sha256": "1" * 64}]},
            },
        },
        "model": {
            "name": cfg.model.name,
            "trainable_params": 74498,
            "total_params": 22788484,
            "adapter_bytes": 297992,
            "model_bytes": 91153936,
        },
        "partitions": [
            {"partition_id": 0, "train_examples": 360, "label_histogram": [160, 200]},
            {"partition_id": 1, "train_examples": 360, "label_histogram": [170, 190]},
        ],
        "rounds": [
            {"round": 0, "eval_loss": 0.69, "eval_accuracy": 0.47, "eval_f1": 0.46},
            {
                "round": 1,
                "train_loss": 0.5,
                "eval_loss": 0.45,
                "eval_accuracy": 0.8,
                "eval_f1": 0.79,
                "clients": [{"status": "trained"}, {"status": "trained"}],
            },
        ],
        "final": {"eval_loss": 0.45, "eval_accuracy": 0.8, "eval_f1": 0.79},
    }
    if privacy:
        run["privacy"] = privacy
    return tmp_path / "run", run


def test_card_metadata_and_body(tmp_path):
    privacy = {
        "mode": "both",
        "label": "sample-level (per example)",
        "accountant": "rdp",
        "rng": "not secure",
        "clients": {
            "0": {"epsilon": 3.5, "delta": 2e-4, "noise_multiplier": 1.0, "max_grad_norm": 1.0, "rounds": []},
            "1": {
                "epsilon": 2.5,
                "delta": 3e-4,
                "noise_multiplier": 1.0,
                "max_grad_norm": 1.0,
                "rounds": [],
                "stopped": {"round": 2},
            },
        },
        "client_level": {
            "label": "client-level (per participant)",
            "epsilon": 9.1,
            "epsilon_no_amplification": 9.1,
            "delta": 0.05,
            "effective_noise_multiplier": 1.0,
            "clipping": "server-fixed",
            "rounds": [{"clipping_norm": 0.5}],
        },
    }
    run_dir, run = fake_run(tmp_path, privacy=privacy)
    hub = build_hub_folder(run_dir, RunRecord.from_dict(run), "apache-2.0")
    assert sorted(p.name for p in hub.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "fedhf.json",
        "provenance.json",
        "tokenizer.json",
    ]
    card = ModelCard.load(hub / "README.md")
    meta = card.data.to_dict()
    assert meta["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert meta["library_name"] == "peft" and meta["pipeline_tag"] == "text-classification"
    assert meta["datasets"] == ["stanfordnlp/sst2"] and meta["language"] == ["en"] and meta["license"] == "unknown"
    assert {"federated-learning", "differential-privacy", "flower", "lora", "opacus"} <= set(meta["tags"])
    results = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert results == {"accuracy": 0.8, "f1": 0.79}
    text = card.text
    assert "| sample-level (per example) | 3.500 | 3.000 | 3.00e-04 |" in text
    assert "| client-level (per participant) | 9.100 | 9.100 | 5.00e-02 |" in text
    assert "What the sample-level guarantee means" in text and "Client(s) 1 stopped" in text
    assert "## Secure aggregation\n\n**Off.**" in text and "| partitioner | iid" in text and "| clients | 2 |" in text
    assert "PeftModel.from_pretrained" in text and "Someone 2013." in text


def test_no_privacy_is_said_plainly(tmp_path):
    run_dir, run = fake_run(tmp_path)
    card = ModelCard.load(build_hub_folder(run_dir, RunRecord.from_dict(run), "apache-2.0") / "README.md")
    assert "**No differential privacy.**" in card.text
    assert "differential-privacy" not in card.data.to_dict()["tags"]


@pytest.mark.parametrize(
    ("model", "data", "expected"),
    [
        ("apache-2.0", "research and non-commercial use only", "other"),
        ("apache-2.0", "unknown", "unknown"),
        ("apache-2.0", "cc-by-4.0", "cc-by-4.0"),
        ("apache-2.0", "apache-2.0", "apache-2.0"),
        ("mit", "apache-2.0", "mit"),
    ],
)
def test_most_restrictive_license(model, data, expected):
    lic, note = combined_license(model, data)
    assert lic == expected
    assert (note is None) == (model == data)


def test_non_commercial_data_is_stated_on_the_card(tmp_path):
    run_dir, run = fake_run(
        tmp_path, dataset="ag_news", preset="ag_news", license="research and non-commercial use only"
    )
    card = ModelCard.load(build_hub_folder(run_dir, RunRecord.from_dict(run), "apache-2.0") / "README.md")
    assert card.data.to_dict()["license"] == "other"
    assert "research and non-commercial use only" in card.text


def test_provenance_has_no_absolute_paths_and_names_local_data_by_hash(tmp_path):
    src = {
        "kind": "local",
        "text_column": "text",
        "label_column": "label",
        "files": {"train": [{"name": "train.csv", "sha256": "2" * 64}]},
    }
    run_dir, run = fake_run(tmp_path, dataset=str(tmp_path / "secret" / "data"), preset=None, source=src)
    run["config"]["data.dataset"] = str(tmp_path / "secret" / "data")
    hub = build_hub_folder(run_dir, RunRecord.from_dict(run), "apache-2.0")
    prov = json.loads((hub / "provenance.json").read_text())
    blob = (hub / "provenance.json").read_text() + (hub / "README.md").read_text()
    assert str(tmp_path) not in blob and "/secret/" not in blob
    assert prov["dataset"]["files"]["train"][0] == {"name": "train.csv", "sha256": "2" * 64}
    assert prov["partitions"][0] == {"partition_id": 0, "train_examples": 360, "label_histogram": [160, 200]}
    assert prov["config_sha256"] == "ab" * 32 and prov["seeds"] == {"seed": 42}


def test_base_model_license():
    assert base_model_license("sentence-transformers/all-MiniLM-L6-v2") == "apache-2.0"
    assert base_model_license("someone/unknown-model", None) == "unknown"


def test_afrisenti_card_lists_the_languages(tmp_path):
    src = {
        "kind": "preset-local",
        "hub_id": "shmuhammad/AfriSentiData",
        "languages": ["hau", "yor", "pcm"],
        "files": {"train": [{"name": "hau/train.tsv", "sha256": "3" * 64}]},
    }
    run_dir, run = fake_run(tmp_path, dataset="afrisenti", preset="afrisenti", source=src, license="cc-by-4.0")
    run["config"]["data.partitioner"] = "natural"
    card = ModelCard.load(build_hub_folder(run_dir, RunRecord.from_dict(run), "apache-2.0") / "README.md")
    meta = card.data.to_dict()
    assert meta["language"] == ["ha", "yo", "pcm"] and meta["license"] == "cc-by-4.0"
    assert "| partitioner | natural (one client per value of 'language') |" in card.text


def test_same_data_gives_the_same_fingerprints(tmp_path, synthetic_dir):
    from fedhf.data.load import _load_data_cached, load_data

    cfg = parse_config({"data.dataset": str(synthetic_dir)}).data
    first = load_data(cfg).source["files"]
    _load_data_cached.cache_clear()
    copy = tmp_path / "elsewhere"
    import shutil

    shutil.copytree(synthetic_dir, copy)
    second = load_data(parse_config({"data.dataset": str(copy)}).data).source["files"]
    assert first == second  # names relative to the folder, sha256 of the bytes: independent of where the data lives
    assert len(first["train"][0]["sha256"]) == 64


def test_card_states_secure_aggregation_and_its_parameters(tmp_path):
    from fedhf.config.schema import parse_config
    from fedhf.flower.secagg import SecAggSettings

    run_dir, run = fake_run(tmp_path)
    run["secure_aggregation"] = {
        **SecAggSettings.from_config(parse_config({"strategy.secure-aggregation": True})).describe(),
        "rounds": [
            {"num_shares": 3, "reconstruction_threshold": 2, "dropped": 1, "completed": True},
            {"num_shares": 3, "reconstruction_threshold": 2, "dropped": 2, "completed": False},
        ],
    }
    text = (build_hub_folder(run_dir, RunRecord.from_dict(run), "apache-2.0") / "README.md").read_text()
    assert "**On: SecAgg+" in text and "| shares per secret / reconstruction threshold | 3 / 2 |" in text
    assert "| quantization | 22 bits (4,194,304 levels) over [-8, 8], step 3.81e-06 |" in text
    assert "| 2 / 3 / 1 |" in text  # rounds / clients dropped / rounds withheld
    assert "SHAKE-256" in text and "each client's averaging weight" in text


def test_card_states_the_wire_format_failures_and_resumes(tmp_path):
    run_dir, run = fake_run(tmp_path)
    run["config"]["transport.dtype"] = "int8"
    run["rounds"][1]["failures"] = [{"node_id": 5, "reason": "timeout"}]
    run["rounds"][1]["rejected"] = [
        {"node_id": 6, "partition_id": 1, "reason": "NaN"},
        {"node_id": 7, "partition_id": 2, "reason": "norm"},
    ]
    run["resumes"] = [{"at": "2026-12-01T00:00:00+00:00", "from_round": 1}]
    text = ModelCard.load(build_hub_folder(run_dir, RunRecord.from_dict(run), "apache-2.0") / "README.md").text
    assert "| updates on the wire | int8 updates with one scale per tensor" in text
    assert "| failures | 1 client failure(s) (error or timeout); 2 update(s) rejected" in text
    assert "update norm <= 1000.0" in text and "resumed 1 time(s) from a checkpoint" in text
    plain_dir, plain = fake_run(tmp_path / "plain")
    plain_hub = build_hub_folder(plain_dir, RunRecord.from_dict(plain), "apache-2.0")
    plain_text = ModelCard.load(plain_hub / "README.md").text
    assert "| updates on the wire | fp32 adapters |" in plain_text and "resumed" not in plain_text
    assert "| failures | 0 client failure(s) (error or timeout); 0 update(s) rejected" in plain_text


def test_hub_folder_rebuilds_only_over_what_fedhf_wrote_and_only_in_its_own_run_folders(tmp_path):
    from fedhf.errors import FedHFRunError

    run_dir, run = fake_run(tmp_path)
    hub = build_hub_folder(run_dir, RunRecord.from_dict(run), "apache-2.0")
    build_hub_folder(run_dir, RunRecord.from_dict(run), "apache-2.0")  # a rebuild replaces fedhf's own files
    (hub / "my-notes.txt").write_text("mine")
    with pytest.raises(FedHFRunError, match="holds 'my-notes.txt', which fedhf did not write"):
        build_hub_folder(run_dir, RunRecord.from_dict(run), "apache-2.0")
    assert (hub / "my-notes.txt").read_text() == "mine" and (hub / "README.md").is_file()
    (run_dir / ".fedhf-run").unlink()
    (hub / "my-notes.txt").unlink()
    with pytest.raises(FedHFRunError, match="was not created by fedhf as a run folder"):
        build_hub_folder(run_dir, RunRecord.from_dict(run), "apache-2.0")
    assert not list(run_dir.glob(".hub.*"))  # no temporary folder left behind


def test_a_local_base_model_path_is_never_published(tmp_path):
    run_dir, run = fake_run(tmp_path)
    local = str(tmp_path / "my-models" / "secret-base")
    run["config"]["model.name"] = local
    run["model"]["base_is_local_folder"] = True
    (run_dir / "adapter" / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": local}))
    (run_dir / "adapter" / "fedhf.json").write_text(json.dumps({"base_model": local, "label_names": ["a", "b"]}))
    hub = build_hub_folder(run_dir, RunRecord.from_dict(run), "apache-2.0")
    published = "".join(p.read_text() for p in hub.rglob("*") if p.is_file())
    assert local not in published and "secret-base" not in published
    assert json.loads((hub / "adapter_config.json").read_text())["base_model_name_or_path"] is None
    assert "loaded from a local folder" in (hub / "README.md").read_text()
    assert json.loads((run_dir / "adapter" / "fedhf.json").read_text())["base_model"] == local  # kept for local use
    run["config"]["model.hub-id"] = "my-org/secret-base"
    hub = build_hub_folder(run_dir, RunRecord.from_dict(run), "apache-2.0")
    assert json.loads((hub / "fedhf.json").read_text())["base_model"] == "my-org/secret-base"
    assert ModelCard.load(hub / "README.md").data.to_dict()["base_model"] == "my-org/secret-base"


def test_card_names_the_training_keys_that_held_the_dp_defaults(tmp_path):
    run_dir, run = fake_run(tmp_path / "dp")
    run["config"] = parse_config({"privacy.mode": "sample", "train.lr": 0.5}).to_flat()
    text = ModelCard.load(build_hub_folder(run_dir, RunRecord.from_dict(run), "apache-2.0") / "README.md").text
    row = next(line for line in text.splitlines() if line.startswith("| training defaults |"))
    assert "model.adapter = ffa-lora" in row and "model.pooling = mean" in row and "train.batch-size = 64" in row
    assert "train.local-epochs = 4" in row
    # set by hand: AdamW stays with its lr, and the rate stays constant
    assert "train.lr" not in row and "train.optimizer" not in row and "train.lr-schedule" not in row
    assert "FFA-LoRA: A stayed where the shared seed put it" in text
    assert "the mean of B is exactly the mean of the clients' updates" in text
    run["config"] = parse_config({"privacy.mode": "sample", "strategy.name": "fedmedian"}).to_flat()
    median = ModelCard.load(build_hub_folder(run_dir, RunRecord.from_dict(run), "apache-2.0") / "README.md").text
    assert "aggregated by fedmedian (a coordinate-wise rule on B: not the mean" in median and "exactly" not in median
    plain_dir, plain = fake_run(tmp_path / "plain")
    plain_text = ModelCard.load(
        build_hub_folder(plain_dir, RunRecord.from_dict(plain), "apache-2.0") / "README.md"
    ).text
    assert "| training defaults | as configured |" in plain_text and "(model.adapter = lora)" in plain_text


def test_card_names_a_learning_rate_schedule_that_is_not_constant(tmp_path):
    run_dir, run = fake_run(tmp_path / "lr")
    for schedule, expected in (("linear", "SGD lr 0.1 (linear decay across rounds)"), ("constant", "SGD lr 0.1,")):
        run["config"] = parse_config(
            {"train.optimizer": "sgd", "train.lr": 0.1, "train.lr-schedule": schedule}
        ).to_flat()
        text = ModelCard.load(build_hub_folder(run_dir, RunRecord.from_dict(run), "apache-2.0") / "README.md").text
        assert expected in text, schedule
        assert ("decay across rounds" in text) == (schedule != "constant")


def test_a_generative_card_shows_sample_generations_of_a_published_dataset_only(tmp_path):
    """model.sample-prompts: the table of each round's answers for a preset or Hub dataset; for the server's own
    local files only a pointer to run.json (their rows are not published)."""
    for source, shown in ((None, True), ({"kind": "local", "files": {}}, False)):
        run_dir, run = fake_run(tmp_path / str(shown), source=source, preset="sst2" if shown else None)
        run["config"] = parse_config({"model.task": "causal-lm", "model.name": "HuggingFaceTB/SmolLM2-135M-Instruct"}
                                     ).to_flat()  # fmt: skip
        run["sample_prompts"] = [{"text": "a | gripping film", "answer": "positive"}]
        run["rounds"][0]["generations"] = ["neutral"]
        run["rounds"][1]["generations"] = ["positive"]
        text = ModelCard.load(build_hub_folder(run_dir, RunRecord.from_dict(run), "apache-2.0") / "README.md").text
        assert "### Generations" in text
        assert ("| a \\| gripping film | positive | neutral | positive |" in text) is shown
        assert ("gripping" in text) is shown and ("left out of this card" in text) is not shown


def test_a_plain_text_card_names_its_metrics_and_continues_a_text(tmp_path):
    """data.format text: the card's round table, model-index and limitations speak of next-token accuracy and of
    continuing text (not of labels or exact match), and the generations table of continuations; the round line and
    the plot's legend use the same names (fedhf.data.records.METRICS)."""
    from fedhf.analysis.plots import plot_metrics
    from fedhf.data.records import metric_names
    from fedhf.run.progress import round_line

    run_dir, run = fake_run(tmp_path)
    run["config"] = parse_config({"model.task": "causal-lm", "model.name": "HuggingFaceTB/SmolLM2-135M-Instruct"}
                                 ).to_flat()  # fmt: skip
    run["dataset"] = {**run["dataset"], "label_names": [], "format": "text"}
    run["sample_prompts"] = [{"text": "the film", "answer": "was good"}]
    for r, said in zip(run["rounds"], ("xx", "was fine"), strict=True):
        r["generations"] = [said]
    record = RunRecord.from_dict(run)
    card = ModelCard.load(build_hub_folder(run_dir, record, "apache-2.0") / "README.md")
    text = card.text
    assert "| eval loss | eval perplexity | eval next-token accuracy | eval top-5 next-token accuracy |" in text
    assert "| 0 | - | 0.6900 | 1.99 | 0.4700 | 0.4600 | - |" in text  # perplexity = exp(loss per token)
    assert "continuing text like the training data" in text and "exact match" not in text.lower()
    assert "| text (first half) | the text goes on | round 0 | round 1 |" in text
    assert "| the film | was good | xx | was fine |" in text
    assert "the model's own LM head (frozen) generates the text's next token" in text
    metrics = card.data.eval_results
    assert [(m.metric_type, m.metric_value) for m in metrics] == [("accuracy", 0.8), ("top_5_accuracy", 0.79)]
    assert metrics[0].metric_name == "Next-token accuracy"
    line = round_line(record.rounds[0], 1, metric_names("text"), perplexity=True)
    assert "central next-token acc 0.4700  top-5 0.4600  loss 0.6900  ppl 1.99" in line
    assert "central acc 0.4700  f1 0.4600" in round_line(record.rounds[0], 1)
    assert plot_metrics(record, tmp_path / "m.png").is_file()


def test_a_generative_runs_personalization_is_named_by_its_own_metrics(tmp_path):
    """personalization.mode under causal-lm: the card's per-client table, the report's table, the console line and
    the policy's words for local-eval name the run's own metrics (token F1 for records, top-5 next-token accuracy
    for plain text), never macro-F1."""
    from fedhf.analysis.report import personalization_table
    from fedhf.apps import personalization_line, personalization_summary
    from fedhf.privacy.policy import SHAREABLE

    rows = [
        {"node_id": 7 + p, "partition_id": p, "status": "personalized", "num_examples": 20}
        | {f"{s}_f1": f for s, f in (("federated", 0.4), ("personalized", 0.5 + p / 10), ("local_only", 0.45))}
        | {f"{s}_accuracy": 0.3 for s in ("federated", "personalized", "local_only")}
        for p in (0, 1)
    ]
    summary = personalization_summary(rows)
    assert summary["personalized_f1_mean"] == pytest.approx(0.55) and summary["personalized_beats_local_only"] == 2
    for fmt, f1_name, acc_name in (
        ("instruction", "token F1", "exact match"),
        ("text", "top-5 next-token accuracy", "next-token accuracy"),
        (None, "macro-F1", "accuracy"),
    ):
        run_dir, run = fake_run(tmp_path / str(fmt))
        if fmt:
            flat = {"model.task": "causal-lm", "model.name": "HuggingFaceTB/SmolLM2-135M-Instruct"}
            run["config"] = parse_config(flat).to_flat()
            run["dataset"] = {**run["dataset"], "label_names": [], "format": fmt}
        run["personalization"] = {
            "mode": "finetune",
            "epochs": 1,
            "released": "metrics only",
            "local_only": True,
            "clients": rows,
            "summary": summary,
        }
        record = RunRecord.from_dict(run)
        text = ModelCard.load(build_hub_folder(run_dir, record, "apache-2.0") / "README.md").text
        assert f"| client | held-out rows | local-only {f1_name} | federated {f1_name} | personalized {f1_name} |" in (
            text
        )
        assert f"In {f1_name}, the personalized adapter beats local-only training on 2 of 2 clients" in text
        assert ("macro-F1" in text) is (fmt is None)
        table = "\n".join(personalization_table(record))
        assert f"per client on its own held-out rows: {f1_name} ({acc_name})." in table
        assert "| 1 | 20 | 0.450 (0.300) | 0.400 (0.300) | 0.600 (0.300) |" in table
        line = personalization_line("finetune", summary, {"personalized": 2}, f1_name)
        assert line.endswith(
            f"2/2 clients reported their held-out metrics; mean {f1_name} local-only 0.450, federated 0.400, "
            "personalized 0.550; personalized beats local-only on 2/2"
        )
    assert "token F1" in SHAREABLE["local-eval"] and "next-token accuracy" in SHAREABLE["local-eval"]
