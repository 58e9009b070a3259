"""Experiment groups: every shipped file parses, bad files are refused before any run, and a sweep really runs,
skips what is finished, reruns what failed, and tabulates what run.json says."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedhf.analysis.experiments import check_targets, load_group
from fedhf.config.schema import load_config_file, parse_config
from fedhf.errors import FedHFConfigError

from .conftest import REPO, synthetic_rows, write_tsv

GROUPS = ("noniid", "privacy", "languages", "communication", "audit", "generative")


def cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", FLWR_TELEMETRY_ENABLED="0", RAY_USAGE_STATS_ENABLED="0")
    return subprocess.run(
        [sys.executable, "-m", "fedhf.cli", *args], capture_output=True, text=True, env=env, timeout=900, cwd=cwd
    )


@pytest.mark.parametrize("name", GROUPS)
def test_shipped_groups_parse_with_and_without_smoke(name):
    group = load_group(name, REPO / "experiments")
    assert group.description
    for smoke in (False, True):
        runs = group.selected(smoke)
        assert runs
        for run in runs:
            parse_config(group.flat_config(run, smoke))
    # Each setting file is a plain run-config override file, usable on its own.
    for path in (REPO / "experiments" / name).glob("*.toml"):
        if path.name != "group.toml":
            parse_config(load_config_file(path))


def test_groups_compare_like_with_like():
    """The settings a group compares differ only in what the comparison is about."""
    noniid = load_group("noniid", REPO / "experiments")
    flats = {r.name: parse_config(noniid.flat_config(r, False)) for r in noniid.runs}
    rows = {f.data.max_train_examples for f in flats.values()}
    assert rows == {4000}
    for name, f in flats.items():
        assert f.num_server_rounds * f.train.local_epochs == 8, name
    langs = load_group("languages", REPO / "experiments")
    assert len([r for r in langs.runs if r.name.startswith("local-")]) == 12
    lang_flats = {r.name: parse_config(langs.flat_config(r, False)) for r in langs.runs}
    personalized = lang_flats.pop("personalized")
    for name, f in lang_flats.items():
        assert f.data.max_examples_per_group == 400 and f.num_server_rounds * f.train.local_epochs == 8, name
    # federated and local-only (the comparison the target is about) take the same steps at the same lr
    pooled = {name: lang_flats.pop(name) for name in ("centralized", "centralized-mean")}
    assert {f.train.lr for f in lang_flats.values()} == {lang_flats["federated"].train.lr}
    # the pooled baselines differ from each other only in the pooling (the personalized run's is mean)
    assert pooled["centralized"].train == pooled["centralized-mean"].train
    assert (pooled["centralized"].model.pooling, pooled["centralized-mean"].model.pooling) == ("cls", "mean")
    assert personalized.model.pooling == "mean"
    # the personalized run compares against its own local-only baseline (the same rows, steps and lr, in the run)
    assert personalized.data.max_examples_per_group == 400 and personalized.personalization.local_only
    # privacy: the same rows, rounds, epochs, batch, model and head in every run; the DP runs differ only in epsilon
    priv = load_group("privacy", REPO / "experiments")
    pf = {r.name: parse_config(priv.flat_config(r, False)) for r in priv.runs}
    shared = {
        (
            f.data.max_train_examples,
            f.num_server_rounds,
            f.train.local_epochs,
            f.train.batch_size,
            f.model.pooling,
            f.model.lora.r,
            f.data.max_length,
        )
        for f in pf.values()
    }
    assert shared == {(3000, 5, 2, 64, "mean", 8, 48)}
    dp = {n: f for n, f in pf.items() if f.privacy.sample_level}
    assert sorted(f.privacy.target_epsilon for f in dp.values()) == [1.0, 4.0, 8.0]
    assert (
        len({(f.train.optimizer, f.train.lr, f.privacy.max_grad_norm, f.privacy.accountant) for f in dp.values()}) == 1
    )
    assert {(f.train.optimizer, f.train.lr) for n, f in pf.items() if n not in dp} == {("adamw", 0.002)}
    # audit: the DP run trains on the overfit run's rows for as many rounds and epochs
    audit = load_group("audit", REPO / "experiments")
    af = {r.name: parse_config(audit.flat_config(r, False)) for r in audit.runs}
    assert (
        len(
            {
                (f.data.max_train_examples, f.num_server_rounds, f.train.local_epochs, f.model.lora.r, f.seed)
                for f in af.values()
            }
        )
        == 1
    )
    assert af["dp"].privacy.target_epsilon <= 8 and af["overfit"].privacy.mode == "none"


def test_the_generative_group_compares_like_with_like_on_its_own_tiny_model(tmp_path):
    gen = load_group("generative", REPO / "experiments")
    assert gen.tiny_model is not None and gen.tiny_model.dataset == "ag_news"
    f = {r.name: parse_config(gen.flat_config(r, False)) for r in gen.runs}
    clients = {r.name: r.num_clients for r in gen.runs}
    assert {c.model.task for c in f.values()} == {"causal-lm"}
    # federated and dp: the same rows, rounds and canaries; they differ in the privacy (and its DP defaults)
    fed, dp, local = f["federated"], f["dp"], f["local-only"]
    assert (fed.data, fed.num_server_rounds, fed.audit) == (dp.data, dp.num_server_rounds, dp.audit)
    assert fed.privacy.mode == "none" and dp.privacy.sample_level and dp.privacy.target_epsilon == 8.0
    assert fed.audit.canaries > 0 and local.audit.canaries == 0
    # local-only: one client's rows (the federated clients' share), the same rounds, epochs and lr
    assert local.data.max_train_examples * clients["federated"] == fed.data.max_train_examples
    assert (local.num_server_rounds, local.train) == (fed.num_server_rounds, fed.train)
    # plain text: the federated run's rows, rounds, training and canaries, read as text (no instruction, no label)
    text, text_dp = f["text"], f["text-dp"]
    assert (text.data.format, text_dp.data.format, fed.data.format) == ("text", "text", "auto")
    same = lambda d: dataclasses.replace(d, format="auto")  # noqa: E731
    assert same(text.data) == fed.data and (text.train, text.audit) == (fed.train, fed.audit)
    assert same(text_dp.data) == dp.data and (text_dp.train, text_dp.privacy) == (dp.train, dp.privacy)
    # every run trains the group's tiny model: the sweep sets model.name to it
    from fedhf.analysis.experiments import _run_settings

    _, sets = _run_settings(gen, gen.runs[0], tmp_path, False)
    assert sets["model.name"] == str(gen.tiny_model.folder(tmp_path).resolve())
    assert gen.tiny_model.folder(tmp_path).name.startswith("tiny-model-")


def test_unknown_key_in_an_experiment_file_is_refused_before_any_run(tmp_path):
    g = tmp_path / "bad"
    g.mkdir()
    (g / "a.toml").write_text("num-server-rounds = 1\n[train]\nlocal-epoch = 2\n")
    (g / "group.toml").write_text('description = "x"\n[[runs]]\nname = "a"\nconfig = "a.toml"\nnum-clients = 2\n')
    proc = cli("sweep", str(g), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert "experiment 'bad/a' (a.toml)" in errors[0] and "unknown config key 'train.local-epoch'" in errors[0]
    assert "Did you mean 'train.local-epochs'?" in errors[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("manifest", "needle"),
    [
        ('[[runs]]\nname = "a"\nconfig = "a.toml"\n', "runs[0] lacks 'num-clients'"),
        ('[[runs]]\nname = "a"\nconfig = "a.toml"\nnum-clients = 0\n', "num-clients must be an integer >= 1"),
        ('[[runs]]\nname = "a"\nconfig = "a.toml"\nnum-clients = 2\nclients = 3\n', "unknown key(s) clients"),
        ('colour = "red"\n[[runs]]\nname = "a"\nconfig = "a.toml"\nnum-clients = 2\n', "unknown key(s) colour"),
        ('description = "x"\n', "no [[runs]]"),
        ('[[runs]]\nname = "a"\nconfig = "missing.toml"\nnum-clients = 2\n', "no such file"),
        (
            '[[runs]]\nname = "a"\nconfig = "a.toml"\nnum-clients = 2\n[[targets]]\nkind = "better"\n',
            "target kind 'better'",
        ),
        (
            '[[runs]]\nname = "a"\nconfig = "a.toml"\nnum-clients = 2\n[tiny-model]\nfamily = "llama"\n',
            "[tiny-model] needs 'dataset'",
        ),
        (
            '[[runs]]\nname = "a"\nconfig = "a.toml"\nnum-clients = 2\n[tiny-model]\ndataset = "x"\nwidth = 3\n',
            "[tiny-model] takes the keys",
        ),
    ],
)
def test_bad_manifests(tmp_path, manifest, needle):
    (tmp_path / "a.toml").write_text("num-server-rounds = 1\n")
    (tmp_path / "group.toml").write_text(manifest)
    with pytest.raises(FedHFConfigError) as err:
        load_group(tmp_path)
    assert needle in str(err.value)


def test_unknown_group_lists_the_groups():
    proc = cli("sweep", "nosuchgroup")
    assert proc.returncode == 2 and "no experiment group 'nosuchgroup'" in proc.stderr
    for name in GROUPS:
        assert name in proc.stderr


def test_targets_are_checked_on_the_numbers():
    group = load_group("noniid", REPO / "experiments")
    rows = [
        {"name": "centralized", "accuracy": 0.84},
        {"name": "iid", "accuracy": 0.825},
        {"name": "dirichlet-1.0", "accuracy": 0.80},
        {"name": "dirichlet-0.3", "accuracy": 0.70},
    ]
    lines = check_targets(group, rows)
    assert lines[0] == "iid: accuracy 82.5% vs centralized 84.0%: drop +1.5 points (target ≤ 2): met"
    assert lines[1] == "dirichlet-1.0: accuracy 80.0% vs centralized 84.0%: drop +4.0 points"
    assert lines[3] == "dirichlet-0.1: accuracy vs centralized: not measured yet"
    rows[1]["accuracy"] = 0.81
    assert check_targets(group, rows)[0].endswith("(target ≤ 2): MISSED")
    audit = load_group("audit", REPO / "experiments")
    lines = check_targets(
        audit,
        [
            {"name": "overfit", "audit_auc_loss": 0.62, "audit_auc_calibrated": 0.7},
            {"name": "dp", "audit_auc_loss": 0.48, "audit_auc_calibrated": 0.71},
        ],
    )
    assert lines[0].endswith("(|AUC − 0.5|: 0.020 vs 0.120): met")
    assert lines[1].endswith("MISSED")
    langs = load_group("languages", REPO / "experiments")
    codes = ["amh", "arq", "ary", "hau", "ibo", "kin", "pcm", "por", "swa", "tso", "twi", "yor"]
    rows = [{"name": "federated", **{f"f1_{c}": 0.5 for c in codes}}]
    rows += [{"name": f"local-{c}", f"f1_{c}": 0.4 if i < 7 else 0.6} for i, c in enumerate(codes)]
    assert check_targets(langs, rows)[0] == (
        "federated beats local-<lang> macro-F1 on 7 of 12 languages (target ≥ 8): MISSED"
    )
    assert check_targets(langs, rows)[1] == "personalized: personalized vs local-only: not measured yet (target ≥ 10)"
    rows.append({"name": "personalized", "personalized_beats_local_only": 10, "personalized_clients": 12})
    assert check_targets(langs, rows)[1].endswith("on 10 of 12 clients (their own held-out rows; target ≥ 10): met")
    rows[-1]["personalized_beats_local_only"] = 9
    assert check_targets(langs, rows)[1].endswith("target ≥ 10): MISSED")
    assert check_targets(langs, rows)[2].startswith("personalized vs centralized-mean: mean macro-F1 not measured yet")
    rows[-1].update({f"f1_{c}": 0.40 for c in codes})  # the global adapter of the personalized run, per language
    rows.append({"name": "centralized-mean", **{f"f1_{c}": 0.43 for c in codes[:6]}})
    assert "missing: pcm, por, swa, tso, twi, yor" in check_targets(langs, rows)[2]
    rows[-1].update({f"f1_{c}": 0.42 for c in codes[6:]})  # mean 0.425: 0.025 behind
    assert check_targets(langs, rows)[2] == (
        "personalized: mean macro-F1 over 12 languages 0.400 vs centralized-mean 0.425: +0.025 behind "
        "(target ≤ 0.03): met"
    )
    rows[-1]["f1_amh"] = 0.60  # mean 0.439: 0.039 behind
    assert check_targets(langs, rows)[2].endswith("+0.039 behind (target ≤ 0.03): MISSED")


@pytest.mark.slow
def test_sweep_runs_skips_reruns_and_tabulates(tmp_path, tiny_model_dir):
    data = tmp_path / "data"
    write_tsv(data / "train.tsv", synthetic_rows(400, seed=3), ["text", "label"])
    write_tsv(data / "test.tsv", synthetic_rows(60, seed=4), ["text", "label"])
    g = tmp_path / "tiny"
    g.mkdir()
    common = (
        f'num-server-rounds = 1\n[data]\ndataset = "{data}"\nmax-train-examples = 200\nmax-length = 24\n'
        f'[model]\nname = "{tiny_model_dir}"\n[train]\nlocal-epochs = 1\nlr = 0.01\n'
    )
    (g / "central.toml").write_text(
        common + "[strategy]\nmin-available-nodes = 1\nmin-train-nodes = 1\nmin-evaluate-nodes = 0\n"
    )
    (g / "fed.toml").write_text(common)
    (g / "group.toml").write_text(
        'description = "tiny"\n'
        '[[runs]]\nname = "central"\nconfig = "central.toml"\nnum-clients = 1\n'
        '[[runs]]\nname = "fed"\nconfig = "fed.toml"\nnum-clients = 2\naudit = true\n'
        '[[targets]]\nkind = "within"\nbaseline = "central"\nruns = ["fed"]\npoints = 100\n'
    )
    out = tmp_path / "out"
    proc = cli("sweep", str(g), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["name"]: r for r in csv.DictReader((out / "tiny" / "results.csv").open())}
    for name, clients in (("central", "1"), ("fed", "2")):
        run = json.loads((out / "tiny" / name / "run.json").read_text())
        assert rows[name]["status"] == "complete" and rows[name]["clients"] == clients
        assert float(rows[name]["accuracy"]) == pytest.approx(run["final"]["eval_accuracy"])
        assert rows[name]["data_format"] == "labels"  # what its two scores are: accuracy and macro-F1
    fed = json.loads((out / "tiny" / "fed" / "run.json").read_text())
    assert float(rows["fed"]["audit_auc_loss"]) == pytest.approx(fed["audit"]["loss"]["auc"])
    # Members: the 180 rows trained on (10% of each client's 100 held out); non-members: the other rows of the
    # 400 (200 per label); both sides label-matched.
    per_label = [sum(p["label_histogram"][k] for p in fed["partitions"]) for k in range(2)]
    assert sum(per_label) == 180
    assert fed["audit"]["members"] == fed["audit"]["non_members"] == sum(min(m, 200 - m) for m in per_label)
    md = (out / "tiny" / "results.md").read_text()
    assert "fed: accuracy" in md and "(target ≤ 100): met" in md
    assert "| run | clients | accuracy | macro-F1 |" in md and "scored by" not in md  # one format: named once

    # Again: nothing runs; a run marked failed is moved aside and run again.
    proc = cli("sweep", str(g), "--out", str(out))
    assert proc.returncode == 0
    assert proc.stderr.count("finished earlier, skipped") == 2 and "running" not in proc.stderr
    central = out / "tiny" / "central" / "run.json"
    central.write_text(json.dumps(dict(json.loads(central.read_text()), status="failed")))
    proc = cli("sweep", str(g), "--out", str(out), "--only", "central")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "an unfinished run was moved to central.failed-" in proc.stderr
    assert json.loads(central.read_text())["status"] == "complete"
    assert len(list((out / "tiny").glob("central.failed-*"))) == 1

    # The experiment file changes after the run finished: that run is stale, moved aside and run again.
    (g / "central.toml").write_text((g / "central.toml").read_text().replace("lr = 0.01", "lr = 0.02"))
    proc = cli("sweep", str(g), "--out", str(out), "--only", "central")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "a finished run with another config (train.lr) was moved to central.stale-" in proc.stderr
    assert json.loads(central.read_text())["config"]["train.lr"] == 0.02
