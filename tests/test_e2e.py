"""End to end: real simulations on SST-2 rows (a tiny BERT on our own rows where the DP bookkeeping is checked)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import numpy as np
import psutil
import pytest
import torch

from fedhf.run.store import schema as run_json_schema

from .conftest import REPO, synthetic_rows, write_tsv

pytestmark = pytest.mark.slow

SMALL = [
    "--set",
    "num-server-rounds=2",
    "--set",
    "data.max-train-examples=450",
    "--set",
    "train.local-epochs=2",
    "--set",
    "train.lr=0.002",
    "--set",
    "data.max-length=48",
]


def _env(data_dir: Path, **extra: str) -> dict[str, str]:
    env = dict(
        os.environ,
        FEDHF_DATA_DIR=str(data_dir),
        HF_HUB_OFFLINE="1",
        FLWR_TELEMETRY_ENABLED="0",
        RAY_USAGE_STATS_ENABLED="0",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
    )
    env.update(extra)
    return env


def fedhf_run(data_dir: Path, out: Path, name: str, *args: str, env: dict[str, str] | None = None) -> dict:
    """`fedhf run` in a subprocess (as a user runs it); asserts it succeeded and returns its run.json."""
    proc = subprocess.run(
        [sys.executable, "-m", "fedhf.cli", "run", *args, "--set", f"output-dir={out}", "--set", f"run-name={name}"],
        capture_output=True,
        text=True,
        env=env or _env(data_dir),
        timeout=900,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {**json.loads((out / name / "run.json").read_text()), "_stdout": proc.stdout, "_stderr": proc.stderr}


def tiny_args(model_dir: Path, tmp_path: Path) -> list[str]:
    """A 2-layer BERT on 400 synthetic rows of our own: the DP bookkeeping tests need a real federation, not SST-2."""
    data = tmp_path / "synthetic"
    write_tsv(data / "train.tsv", synthetic_rows(400, seed=5), ["text", "label"])
    write_tsv(data / "test.tsv", synthetic_rows(60, seed=6), ["text", "label"])
    return ["--set", f"model.name={model_dir}", "--set", f"data.dataset={data}", "--set", "data.max-length=24"]


def ledger_text(data_dir: Path, run_dir: Path) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "fedhf.cli", "privacy", "ledger", str(run_dir)],
        capture_output=True,
        text=True,
        env=_env(data_dir),
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _ray_pids() -> set[int]:
    pids = set()
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "raylet" in cmd or "gcs_server" in cmd or "ClientAppActor" in cmd or "ray::" in cmd:
            pids.add(p.info["pid"])
    return pids


def test_fedhf_run_three_clients_two_rounds(shared_data_dir, tmp_path):
    """The core run, ending with hub.push to a local Hub server."""
    from .test_hub import TOKEN, env_for, start_server, stop

    before = _ray_pids()
    out = tmp_path / "outputs"
    server, endpoint = start_server(tmp_path)
    env = {**{k: v for k, v in _env(shared_data_dir).items() if not k.startswith("HF_")}, **env_for(endpoint, tmp_path)}
    try:
        run = fedhf_run(
            shared_data_dir,
            out,
            "e2e",
            "--num-clients",
            "3",
            *SMALL,
            "--set",
            "data.dataset=sst2",
            "--set",
            "hub.push=true",
            "--set",
            "hub.repo-id=fedhf-test/e2e",
            env=env,
        )
    finally:
        stop(server)
    run_dir = out / "e2e"
    jsonschema.validate(json.loads((run_dir / "run.json").read_text()), run_json_schema())
    log_txt = (run_dir / "log.txt").read_text()
    assert TOKEN not in run["_stdout"] + run["_stderr"] + log_txt
    # A calm console: the plan, one line per round, a summary; Flower, Ray and transformers go to RUN_DIR/log.txt.
    console = (run["_stdout"] + run["_stderr"]).split("\n")
    lines = [line for line in console if line.strip()]
    assert len(lines) <= 40, lines
    assert len(set(lines)) == len(lines), [line for line in lines if lines.count(line) > 1]
    plan = [line for line in run["_stderr"].split("\n") if line.strip()]
    assert plan[0].startswith("fedhf run: 3 simulated clients, 2 rounds of fedavg"), plan[:3]
    assert any(line.startswith("  privacy  none") for line in lines)
    assert [line.split()[2] for line in lines if line.startswith("[fedhf] round")] == ["0/2", "1/2", "2/2"]
    for noise in ("LOAD REPORT", "ClientAppActor", "Warning", "DEBUG", "INFO", "configure_train"):
        assert not any(noise in line for line in lines), noise
    for kept in ("LOAD REPORT", "configure_train: Sampled 3 nodes", "[ROUND 2/2]", "INFO fedhf: fedhf run e2e"):
        assert kept in log_txt, kept
    flower_lines = [line for line in log_txt.splitlines() if "configure_train: Sampled" in line and "Actor" not in line]
    assert len(flower_lines) == 2  # once per round, not once per handler
    assert run["status"] == "complete"
    assert [r["round"] for r in run["rounds"]] == [0, 1, 2]
    r0, r2 = run["rounds"][0], run["rounds"][-1]
    assert r2["eval_accuracy"] > r0["eval_accuracy"], (r0, r2)
    for r in run["rounds"][1:]:
        assert r["train_loss"] is not None and r["wall_seconds"] > 0
        assert r["bytes_up"] == r["bytes_down"] > 0
        assert sorted(r["client_train_seconds"]) == ["0", "1", "2"]
        assert r["failures"] == []
        assert sum(c["num_examples"] for c in r["clients"]) == 405  # rows, not batches
    assert run["rounds"][2]["train_loss"] < run["rounds"][1]["train_loss"]
    assert [p["train_examples"] for p in run["partitions"]] == [135, 135, 135]
    assert run["config"]["num-server-rounds"] == 2 and run["versions"]["flwr"].startswith("1.42")
    assert run["model"]["adapter_bytes"] < 0.005 * run["model"]["model_bytes"]
    with (run_dir / "metrics.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["round"]) for r in rows] == [0, 1, 2]
    assert abs(float(rows[-1]["eval_accuracy"]) - r2["eval_accuracy"]) < 1e-12
    assert "run complete" in run["_stdout"]
    assert run["hub_push"]["ok"] is True and run["hub_push"]["repo_id"] == "fedhf-test/e2e"
    hub = run_dir / "hub"
    assert {"README.md", "provenance.json", "adapter_model.safetensors", "fedhf.json"} <= {
        p.name for p in hub.iterdir()
    }
    from huggingface_hub import ModelCard

    card = ModelCard.load(hub / "README.md")
    results = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert results == {"accuracy": r2["eval_accuracy"], "f1": r2["eval_f1"]}
    prov = json.loads((hub / "provenance.json").read_text())
    assert prov["dataset"]["files"] == run["dataset"]["source"]["files"]  # same fingerprints as the data loader's
    assert prov["partitions"] == [
        {k: p[k] for k in ("partition_id", "train_examples", "label_histogram")} for p in run["partitions"]
    ]

    # The saved adapter loads with PEFT on the base model and reproduces the final central accuracy.
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from fedhf.config.schema import parse_config
    from fedhf.data.load import load_data
    from fedhf.data.partitions import central_eval_set
    from fedhf.tasks.model import resolve_model
    from fedhf.tasks.text_classification import evaluate, make_loader

    cfg = parse_config(run["config"])
    base = AutoModelForSequenceClassification.from_pretrained(resolve_model(cfg.model.name), num_labels=2)
    model = PeftModel.from_pretrained(base, run_dir / "adapter")
    data = load_data(cfg.data, data_dir=str(shared_data_dir))
    loader = make_loader(
        central_eval_set(data, cfg.data, cfg.seed),
        AutoTokenizer.from_pretrained(run_dir / "adapter"),
        cfg.data.max_length,
        64,
        shuffle=False,
    )
    torch.set_num_threads(2)
    res = evaluate(model, loader, 2)
    assert abs(res.accuracy - r2["eval_accuracy"]) < 1e-6

    leftover = _ray_pids() - before
    assert not leftover, f"Ray processes left running: {leftover}"


def _processes_with_env(key: str, value: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["pid"]):
        try:
            if p.environ().get(key) == value:
                found.append(p)
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return found


def test_flwr_run_uses_the_app_from_pyproject(shared_data_dir, tmp_path):
    """`flwr run .` with a run-config override file: Flower's own path to the same app."""
    flwr_home = tmp_path / "flwr-home"
    out = tmp_path / "flwr-outputs"
    override = tmp_path / "override.toml"
    override.write_text(
        f'num-server-rounds = 1\noutput-dir = "{out}"\nrun-name = "flwr"\n'
        "[data]\nmax-train-examples = 200\nmax-eval-examples = 200\n[strategy]\nfraction-evaluate = 0.0\n"
    )
    env = _env(shared_data_dir, FLWR_HOME=str(flwr_home))

    def flwr_run(run_config: Path) -> subprocess.CompletedProcess:
        cmd = [
            str(Path(sys.executable).with_name("flwr")),
            "run",
            ".",
            "--run-config",
            str(run_config),
            "--federation-config",
            "num-supernodes=2 client-resources-num-cpus=1",
            "--stream",
        ]
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=REPO)

    def completed(run_json: Path) -> dict:
        """run.json once the ServerApp marked it complete (flwr run returns when the run is submitted and streamed)."""
        deadline = time.time() + 60
        while time.time() < deadline and not (
            run_json.is_file() and json.loads(run_json.read_text())["status"] == "complete"
        ):
            time.sleep(1)
        return json.loads(run_json.read_text())

    try:
        proc = flwr_run(override)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        run_json = out / "flwr" / "run.json"
        run = completed(run_json)
        assert run["status"] == "complete"
        assert run["config"]["num-server-rounds"] == 1 and run["config"]["data.max-train-examples"] == 200
        assert [p["train_examples"] for p in run["partitions"]] == [90, 90]  # reported by the clients (10% held out)
        assert (out / "flwr" / "adapter" / "adapter_model.safetensors").is_file()
        # resume is a run-config key: a run whose server died after its last checkpoint continues under flwr run
        record = {**run, "status": "failed", "error": "killed after the checkpoint of round 1"}
        del record["final"]
        run_json.write_text(json.dumps(record))
        resume = tmp_path / "resume.toml"
        resume.write_text(f'resume = "{out / "flwr"}"\n' + override.read_text())
        again = flwr_run(resume)
        assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
        resumed = completed(run_json)
        assert resumed["status"] == "complete" and resumed["run_uid"] == run["run_uid"]
        assert [(r["from_round"], r["interrupted_attempt"]["status"]) for r in resumed["resumes"]] == [(1, "failed")]
        assert resumed["final"]["eval_accuracy"] == run["final"]["eval_accuracy"]  # the same adapter, not retrained
        assert [r["round"] for r in resumed["rounds"]] == [0, 1]
    finally:
        # `flwr run` leaves its local SuperLink running: stop everything it started, by PID.
        for p in _processes_with_env("FLWR_HOME", str(flwr_home)):
            try:
                p.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass
        gone, alive = psutil.wait_procs(_processes_with_env("FLWR_HOME", str(flwr_home)), timeout=15)
        for p in alive:
            p.kill()


def test_dp_run_composes_epsilon_across_rounds_and_enforces_budgets(shared_data_dir, tiny_model_dir, tmp_path):
    """Sample-level DP, 3 clients x 3 rounds; client 1's owner set a budget (its node config) that allows one round."""
    out = tmp_path / "outputs"
    nodes = tmp_path / "nodes.toml"
    nodes.write_text("[nodes.1]\nmax-epsilon = 3.0\n")
    run = fedhf_run(
        shared_data_dir,
        out,
        "dp",
        *tiny_args(tiny_model_dir, tmp_path),
        "--num-clients",
        "3",
        "--set",
        "num-server-rounds=3",
        "--set",
        "data.max-train-examples=300",
        "--set",
        "train.local-epochs=1",
        "--set",
        "train.batch-size=16",  # the budgets below are sized for its sampling rate
        "--set",
        "privacy.mode=sample",
        "--node-config",
        str(nodes),
    )
    assert run["status"] == "complete" and [r["round"] for r in run["rounds"]] == [0, 1, 2, 3]
    ledger = run["privacy"]["clients"]
    assert (
        run["privacy"]["label"] == "sample-level (per example)"
        and "not a cryptographically secure" in run["privacy"]["rng"]
    )
    from opacus.accountants import RDPAccountant

    for pid in ("0", "2"):
        e = ledger[pid]
        eps = [r["epsilon"] for r in e["rounds"]]
        assert len(eps) == 3 and eps[0] < eps[1] < eps[2]
        acc = RDPAccountant()
        acc.history = [(e["noise_multiplier"], e["sample_rate"], e["steps"])]
        assert eps[-1] == pytest.approx(acc.get_epsilon(delta=e["delta"]), rel=1e-6)
        assert e["steps"] == 3 * round(1 / e["sample_rate"])
        assert e["delta"] < 1 / 90
    one = ledger["1"]
    assert [r["status"] for r in one["rounds"]] == ["trained"] and one["epsilon"] <= 3.0
    assert one["stopped"]["round"] == 2 and one["stopped"]["reason"] == "max-epsilon" and one["max_epsilon"] == 3.0
    trained = [sorted(c["partition_id"] for c in r["clients"] if c["status"] == "trained") for r in run["rounds"][1:]]
    assert trained == [[0, 1, 2], [0, 2], [0, 2]]
    assert [(c["partition_id"], c["rule"]) for c in run["rounds"][2]["refused"]] == [(1, "max-epsilon")]
    assert run["rounds"][3]["privacy"]["exhausted"] == [1]
    assert "stopped in round 2: max-epsilon" in ledger_text(shared_data_dir, out / "dp")
    # Under DP the clients shared nothing beyond the update and the accounting: no losses, timings or histograms.
    for r in run["rounds"][1:]:
        assert r["train_loss"] is None and r["client_train_seconds"] == {} and r["weighting"] == "uniform"
        for c in r["clients"]:
            if c["status"] == "trained":
                assert c["shared"] == [] and not {
                    "train_loss",
                    "num_examples",
                    "label_histogram",
                    "train_seconds",
                } & set(c)
    card = (out / "dp" / "hub" / "README.md").read_text()
    assert "| training rows per client | not shared, not shared, not shared |" in card
    prov = json.loads((out / "dp" / "hub" / "provenance.json").read_text())
    assert prov["partitions"] == [{"partition_id": i} for i in range(3)]


def test_both_guarantees_reported_side_by_side(shared_data_dir, tiny_model_dir, tmp_path):
    """privacy.mode=both: sample-level per client and client-level per round, labelled, never combined."""
    out = tmp_path / "outputs"
    run = fedhf_run(
        shared_data_dir,
        out,
        "both",
        *tiny_args(tiny_model_dir, tmp_path),
        "--num-clients",
        "3",
        "--set",
        "num-server-rounds=2",
        "--set",
        "data.max-train-examples=240",
        "--set",
        "train.local-epochs=1",
        "--set",
        "privacy.mode=both",
        "--set",
        "privacy.client-noise-multiplier=0.8",
        "--set",
        "strategy.fraction-evaluate=0",
    )
    assert run["status"] == "complete"
    privacy = run["privacy"]
    assert privacy["label"] == "sample-level (per example)"
    cl = privacy["client_level"]
    assert cl["label"] == "client-level (per participant)" and cl["clipping"] == "server-fixed"
    assert [r["round"] for r in cl["rounds"]] == [1, 2]
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    for r in cl["rounds"]:
        assert r["clients_aggregated"] == r["population"] == 3 and r["sample_rate"] == 1.0
        rdp = compute_rdp(q=1.0, noise_multiplier=0.8, steps=r["round"], orders=orders)
        eps, _ = get_privacy_spent(orders=orders, rdp=rdp, delta=cl["delta"])
        assert r["epsilon"] == pytest.approx(eps, rel=1e-6) == pytest.approx(r["epsilon_no_amplification"], rel=1e-9)
    assert cl["rounds"][0]["epsilon"] < cl["rounds"][1]["epsilon"]
    assert cl["delta"] == 1e-5  # min(1e-5, 0.1 / 3 clients)
    assert len(privacy["clients"]) == 3 and all(len(e["rounds"]) == 2 for e in privacy["clients"].values())
    row = run["rounds"][2]["privacy"]
    assert row["client_level_epsilon"] == cl["epsilon"] and row["sample_level_epsilon_max"] > 0
    ledger = ledger_text(shared_data_dir, out / "both")
    assert "sample-level (per example)" in ledger and "client-level (per participant)" in ledger


def test_run_ends_cleanly_when_budgets_run_out(shared_data_dir, tiny_model_dir, tmp_path):
    """Every client's budget allows one round: round 2 gets no update, the run ends complete with round 1's adapter."""
    from fedhf.privacy.dp import default_delta, epsilon_of, sampling

    n = 54  # 120 rows over 2 clients, 10% held out for local evaluation
    q, steps = sampling(n, 16, 1)
    one, two = (epsilon_of("rdp", [(1.0, q, steps * k)], default_delta(n)) for k in (1, 2))
    budget = (one + two) / 2
    out = tmp_path / "outputs"
    run = fedhf_run(
        shared_data_dir,
        out,
        "stop",
        *tiny_args(tiny_model_dir, tmp_path),
        "--num-clients",
        "2",
        "--set",
        "num-server-rounds=3",
        "--set",
        "data.max-train-examples=120",
        "--set",
        "train.local-epochs=1",
        "--set",
        "train.batch-size=16",  # the budget above is computed for it
        "--set",
        "privacy.mode=sample",
        "--set",
        f"privacy.max-epsilon={budget}",
        "--set",
        "strategy.fraction-evaluate=0",
        "--set",
        "strategy.central-eval-every=3",  # round 1 is not due: the run evaluates it when it ends there
    )
    assert run["status"] == "complete"
    assert run["stopped_early"]["after_round"] == 1 and "every sampled client refused" in run["stopped_early"]["reason"]
    assert "privacy.max-epsilon" in run["stopped_early"]["reason"]
    assert [r["round"] for r in run["rounds"]] == [0, 1]
    last = run["rounds"][1]
    assert last["central_eval_seconds"] > 0 and 0.0 <= last["eval_accuracy"] <= 1.0
    assert run["final"] == {k: last[k] for k in ("eval_loss", "eval_accuracy", "eval_f1")}
    for e in run["privacy"]["clients"].values():
        assert e["epsilon"] == pytest.approx(one, rel=1e-6) and e["epsilon"] <= budget
        assert e["stopped"]["reason"] == "privacy.max-epsilon"
    assert (out / "stop" / "adapter" / "adapter_model.safetensors").is_file()


def test_secure_aggregation_gives_the_plain_fedavg_adapter_within_tolerance(shared_data_dir, tiny_model_dir, tmp_path):
    """The real fedhf clients, 1 round, 3 clients, no DP (deterministic training): with SecAgg+ the
    global adapter equals the plain FedAvg run's within the documented quantization tolerance."""
    from safetensors.numpy import load_file

    from fedhf.config.schema import parse_config
    from fedhf.flower.secagg import SecAggSettings, quantization_tolerance

    out = tmp_path / "outputs"
    common = [
        *tiny_args(tiny_model_dir, tmp_path),
        "--num-clients",
        "3",
        "--set",
        "num-server-rounds=1",
        "--set",
        "data.max-train-examples=240",
        "--set",
        "train.local-epochs=1",
        "--set",
        "strategy.fraction-evaluate=0",
        "--set",
        "data.max-length=48",
    ]
    plain = fedhf_run(shared_data_dir, out, "plain", *common)
    secure = fedhf_run(
        shared_data_dir,
        out,
        "secure",
        *common,
        "--set",
        "strategy.secure-aggregation=true",
        "--set",
        "strategy.secagg-max-weight=100",
    )
    assert plain["status"] == secure["status"] == "complete"
    sa = secure["secure_aggregation"]
    assert sa["quantization_bits"] == 22 and sa["max_weight"] == 100
    (r1,) = sa["rounds"]
    assert (r1["sampled"], r1["participants"], r1["dropped"], r1["completed"]) == (3, 3, 0, True)
    assert (r1["num_shares"], r1["reconstruction_threshold"]) == (3, 2)
    clients = secure["rounds"][1]["clients"]
    sizes = [c["num_examples"] for c in clients]
    assert [c["num_examples"] for c in plain["rounds"][1]["clients"]] == sizes
    a = load_file(str(out / "plain" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(out / "secure" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    max_abs = max(float(abs(v).max()) for v in a.values())
    tol = quantization_tolerance(
        sizes, SecAggSettings.from_config(parse_config({"strategy.secagg-max-weight": 100.0})), max_abs
    )
    worst = max(float(abs(a[k].astype("float64") - b[k].astype("float64")).max()) for k in a)
    assert 0 < worst <= tol, (worst, tol)  # not bit-identical (masked, quantized), but within the bound
    changed = max(float(abs(a[k]).max()) for k in a if "lora_B" in k)
    assert changed > 50 * tol  # the round really trained: the bound is small against the update
    # upload per client = the masked vector, recorded; the card states the protocol and its parameters
    assert all(c["bytes_up"] > 0 for c in clients)
    card = (out / "secure" / "hub" / "README.md").read_text()
    assert "**On: SecAgg+" in card and "| quantization | 22 bits" in card


def test_personalization_stage_under_dp_is_accounted_and_reported(shared_data_dir, tiny_model_dir, tmp_path):
    """Ditto under sample-level DP, 3 clients whose owners share their held-out metrics: the stage after the last
    round is in the ledger, within the target, and in the record, the card and its plot; personal adapters stay."""
    out = tmp_path / "outputs"
    nodes = tmp_path / "nodes.toml"
    nodes.write_text('[default]\nshare = "local-eval"\n')
    run = fedhf_run(
        shared_data_dir,
        out,
        "ditto",
        *tiny_args(tiny_model_dir, tmp_path),
        "--num-clients",
        "3",
        "--set",
        "data.max-train-examples=300",
        "--set",
        "train.local-epochs=1",
        "--set",
        "privacy.mode=sample",
        "--set",
        "num-server-rounds=2",
        "--set",
        "privacy.target-epsilon=8",
        "--set",
        "personalization.mode=ditto",
        "--node-config",
        str(nodes),
    )
    assert run["status"] == "complete"
    pers = run["personalization"]
    assert pers["mode"] == "ditto" and pers["local_only"] and pers["summary"]["clients"] == 3
    rows = pers["clients"]
    assert [r["partition_id"] for r in rows] == [0, 1, 2] and all(r["status"] == "personalized" for r in rows)
    for key in ("federated", "personalized", "local_only"):
        mean = sum(r[f"{key}_f1"] for r in rows) / 3
        assert pers["summary"][f"{key}_f1_mean"] == pytest.approx(mean)
    for pid, e in run["privacy"]["clients"].items():
        assert [r["round"] for r in e["rounds"]] == [1, 2, 3] and e["rounds"][-1]["status"] == "personalized"
        assert e["rounds"][1]["epsilon"] < e["epsilon"] <= 8.0 * 1.01, pid
        # every DP-SGD step: (1 local + 1 Ditto epoch) x 2 rounds, then 2 local-only epochs
        assert e["steps"] == 6 * round(1 / e["sample_rate"])
    assert "[fedhf] personalization (ditto): 3/3 clients reported" in run["_stdout"]
    assert "eps pers" in ledger_text(shared_data_dir, out / "ditto")
    card = (out / "ditto" / "hub" / "README.md").read_text()
    assert "## Personalization" in card and "| client | held-out rows | local-only macro-F1 |" in card
    assert "the ledger's 'pers' column" in card and "plots/personalization.png" in card
    hub_files = {p.name for p in (out / "ditto" / "hub").rglob("*")}
    assert not any("ditto" in name or "personal" in name and name.endswith(".safetensors") for name in hub_files)
    personal = sorted((out / "ditto" / "client-state").glob("data-*/personal/*.ditto.safetensors"))
    assert len(personal) == 3


def test_heterogeneous_lora_ranks_federate_through_products(shared_data_dir, tiny_model_dir, tmp_path):
    """Three nodes at ranks 4, 8 and 16 (their node configs) under strategy.lora-aggregation = svd: each trains and
    sends its own rank, and the global adapter stays at rank 16."""
    out = tmp_path / "outputs"
    nodes = tmp_path / "nodes.toml"
    nodes.write_text("[nodes.0]\nlora-rank = 4\n[nodes.1]\nlora-rank = 8\n")
    run = fedhf_run(
        shared_data_dir,
        out,
        "ranks",
        *tiny_args(tiny_model_dir, tmp_path),
        "--num-clients",
        "3",
        "--set",
        "num-server-rounds=2",
        "--set",
        "data.max-train-examples=300",
        "--set",
        "train.lr=0.01",
        "--set",
        "model.lora.r=16",
        "--set",
        "strategy.lora-aggregation=svd",
        "--node-config",
        str(nodes),
    )
    assert run["status"] == "complete"
    for r in run["rounds"][1:]:
        trained = sorted((c["partition_id"], c["lora_rank"], c["bytes_up"]) for c in r["clients"])
        assert [t[1] for t in trained] == [4, 8, 16]
        assert trained[0][2] < trained[1][2] < trained[2][2]  # a smaller rank sends fewer bytes
    from safetensors.numpy import load_file

    released = load_file(out / "ranks" / "adapter" / "adapter_model.safetensors")
    assert {v.shape[0] for k, v in released.items() if ".lora_A." in k} == {16}
    # the products moved: every layer's released B is non-zero (the tiny random model's accuracy is not the point
    # here; the aggregation experiment group measures learning on MiniLM)
    assert all(np.any(v) for k, v in released.items() if ".lora_B." in k)
    card = (out / "ranks" / "hub" / "README.md").read_text()
    assert "| client LoRA ranks | client 0: r 4, client 1: r 8, client 2: r 16 |" in card
    assert "kept its rank-16 SVD truncation" in card


def test_ffa_lora_runs_under_sample_level_dp_and_secure_aggregation(shared_data_dir, tiny_model_dir, tmp_path):
    """FFA-LoRA (the DP default) through SecAgg+ with DP-SGD clients: A never moves from the seed, B trains, and the
    masked vector carries only B and the head."""
    from peft import get_peft_model_state_dict
    from safetensors.numpy import load_file

    from fedhf.config.schema import parse_config
    from fedhf.tasks.model import build_model

    out = tmp_path / "outputs"
    run = fedhf_run(
        shared_data_dir,
        out,
        "ffa-secure",
        *tiny_args(tiny_model_dir, tmp_path),
        "--num-clients",
        "3",
        "--set",
        "num-server-rounds=2",
        "--set",
        "data.max-train-examples=240",
        "--set",
        "train.local-epochs=1",
        "--set",
        "privacy.mode=sample",
        "--set",
        "privacy.target-epsilon=8",
        "--set",
        "strategy.secure-aggregation=true",
    )
    assert run["status"] == "complete" and run["config"]["model.adapter"] == "ffa-lora"
    assert all(r["completed"] for r in run["secure_aggregation"]["rounds"])
    assert all(e["epsilon"] <= 8.0 * 1.01 for e in run["privacy"]["clients"].values())
    released = load_file(out / "ffa-secure" / "adapter" / "adapter_model.safetensors")
    cfg = parse_config({"model.name": str(tiny_model_dir), "privacy.mode": "sample"})
    seed = {k: v.numpy() for k, v in get_peft_model_state_dict(build_model(cfg, ["negative", "positive"])).items()}
    a_keys = [k for k in released if ".lora_A." in k]
    assert a_keys and all(np.array_equal(released[k], seed[k]) for k in a_keys)  # A stayed at the seed
    assert all(np.any(released[k]) for k in released if ".lora_B." in k)  # B trained (DP noise at least)
    assert run["model"]["adapter_tensors"] == len(a_keys) + 2  # what travels: each B and the head (weight, bias)
