"""Flower's Deployment Engine, for real: a SuperLink with TLS and SuperNode authentication and
SuperNodes with their own silos, all started here by the scripts in scripts/deploy/ on
127.0.0.1 (or on namespaced hosts joined by veth), stopped by PID at the end, also on failure.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from .conftest import REPO

DEPLOY = REPO / "scripts" / "deploy"
_MISSING = [tool for tool in ("openssl", "ssh-keygen") if shutil.which(tool) is None]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        bool(_MISSING), reason=f"the deploy scripts need {', '.join(_MISSING)} (apt install openssl openssh-client)"
    ),
]
FLWR = str(Path(sys.executable).with_name("flwr"))
CONNECTION = "fedhf-test"


def _env(data_dir: Path, fed_dir: Path) -> dict[str, str]:
    env = dict(
        os.environ,
        FEDHF_DATA_DIR=str(data_dir),
        HF_HUB_OFFLINE="1",
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_HOME=str(fed_dir / "flwr-home"),
        PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    )
    return env


def sh(
    script: str, *args: str, env: dict[str, str], timeout: float = 180, check: bool = True, netns: str | None = None
) -> subprocess.CompletedProcess:
    cmd = [str(DEPLOY / script), *args]
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO)
    if check:
        assert proc.returncode == 0, (
            f"{script} {args}: rc {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


def stop_federation(fed_dir: Path, env: dict[str, str]) -> list[str]:
    """The scripts' own stop (by PID files), then anything still running with this FLWR_HOME, by PID.

    Returns what the scripts' stop left behind (and this then killed): empty when they work.
    """
    if (fed_dir / "superlink").exists():
        subprocess.run(
            [str(DEPLOY / "local_federation.sh"), "stop", "--dir", str(fed_dir), "--timeout", "10"],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
    leftover = []
    for p in psutil.process_iter(["pid", "environ", "status"]):
        try:
            if (p.info["environ"] or {}).get("FLWR_HOME") == env["FLWR_HOME"] and p.info[
                "status"
            ] != psutil.STATUS_ZOMBIE:
                leftover.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    names = []
    for p in leftover:
        try:
            names.append(" ".join(p.cmdline()[:3]))
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(leftover, timeout=10)
    return names


def write_silo(data_dir: Path, path: Path, start: int, rows: int) -> Path:
    """A silo of SST-2 training rows (read at test time from ../shared/data, never copied into the repo)."""
    with (data_dir / "sst2" / "train.tsv").open() as fh:
        reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader)
        picked = [r for i, r in enumerate(reader) if start <= i < start + rows]
    path.mkdir(parents=True)
    with (path / "train.tsv").open("w") as fh:
        fh.write("\t".join(header) + "\n")
        for r in picked:
            fh.write("\t".join(r) + "\n")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_run(run_json: Path, timeout: float) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if run_json.is_file():
            run = json.loads(run_json.read_text())
            if run["status"] != "running":
                return run
        time.sleep(2)
    raise AssertionError(f"{run_json} did not finish in {timeout} s")


@pytest.fixture()
def sst2_dir(shared_data_dir) -> Path:
    if not (shared_data_dir / "sst2" / "train.tsv").is_file():
        pytest.skip("needs ../shared/data/sst2/train.tsv")
    return shared_data_dir


class Federation:
    """SuperLink (TLS + node auth) and SuperNodes started with scripts/deploy, state under one folder."""

    def __init__(self, data_dir: Path, fed_dir: Path, host: str = "127.0.0.1", netns: tuple[str, str] | None = None):
        self.dir, self.host, self.netns = fed_dir, host, netns
        self.env = _env(data_dir, fed_dir)
        self.port = free_port()
        self.control_port = free_port()
        self.address = f"{host}:{self.port}"  # the Fleet API: what SuperNodes connect to
        self.control = f"127.0.0.1:{self.control_port}"  # the Control API: loopback of the SuperLink's host only

    def _ns(self, side: int) -> str | None:
        return self.netns[side] if self.netns else None

    def start(self, nodes: list[str]) -> None:
        sh("make_certs.sh", "--out", str(self.dir / "certs"), "--hosts", f"{self.host},localhost", env=self.env)
        sh("make_node_keys.sh", "--out", str(self.dir / "keys"), "--names", " ".join(nodes), env=self.env)
        sh(
            "start_superlink.sh",
            "--certs",
            str(self.dir / "certs"),
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--control-port",
            str(self.control_port),
            "--state",
            str(self.dir / "superlink"),
            env=self.env,
            netns=self._ns(0),
        )
        sh(
            "connection.sh",
            "--name",
            CONNECTION,
            "--address",
            self.control,
            "--ca",
            str(self.dir / "certs" / "ca.crt"),
            env=self.env,
        )
        for name in nodes:  # on the SuperLink's host (or through an SSH tunnel): the Control API is on its loopback
            sh(
                "register_node.sh",
                "--connection",
                CONNECTION,
                "--key",
                str(self.dir / "keys" / f"{name}.pub"),
                "--name",
                name,
                env=self.env,
                netns=self._ns(0),
            )

    def supernode(
        self,
        name: str,
        node_config: str,
        *,
        key: str | None = None,
        ca: Path | None = None,
        address: str | None = None,
        check: bool = True,
        extra: tuple[str, ...] = (),
    ) -> subprocess.CompletedProcess:
        return sh(
            "start_supernode.sh",
            "--superlink",
            address or self.address,
            "--ca",
            str(ca or self.dir / "certs" / "ca.crt"),
            "--key",
            str(self.dir / "keys" / (key or name)),
            "--node-config",
            node_config,
            "--name",
            name,
            "--state",
            str(self.dir / "supernodes"),
            "--timeout",
            "90",
            *extra,
            env=self.env,
            check=check,
            netns=self._ns(1),
        )

    def flwr_run(self, run_config: str, timeout: float = 900) -> subprocess.CompletedProcess:
        cmd = [FLWR, "run", ".", CONNECTION, "--stream", "--run-config", run_config]
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns[0], *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, env=self.env, timeout=timeout, cwd=REPO)

    def stop(self) -> list[str]:
        return stop_federation(self.dir, self.env)


def test_deployment_with_tls_node_auth_dp_and_secure_aggregation(sst2_dir, tmp_path):
    """Two silos (own data-path) and one SuperNode whose silo is missing; 2 rounds, sample-level DP, SecAgg+.

    Also: an unregistered key, a client without the CA and a certificate that has expired are
    refused, and the SuperLink keeps serving the registered nodes.
    """
    fed = Federation(sst2_dir, tmp_path / "fed")
    silo_a = write_silo(sst2_dir, tmp_path / "silos" / "a", 0, 150)
    silo_b = write_silo(sst2_dir, tmp_path / "silos" / "b", 150, 150)
    out = tmp_path / "out"
    left_behind = None
    try:
        fed.start(["node-a", "node-b", "node-c", "rogue"])
        # refused: a key the SuperLink does not know
        sh("make_node_keys.sh", "--out", str(tmp_path / "other-keys"), "--names", "stranger", env=fed.env)
        refused = fed.supernode(
            "stranger", "partition-id=0 num-partitions=2", key=str(tmp_path / "other-keys" / "stranger"), check=False
        )
        assert refused.returncode != 0
        assert "Failed to activate SuperNode" in refused.stdout + refused.stderr
        # refused: a SuperNode that trusts another CA cannot even complete the TLS handshake
        sh("make_certs.sh", "--out", str(tmp_path / "other-ca"), "--hosts", "127.0.0.1", env=fed.env)
        no_ca = fed.supernode(
            "rogue", "partition-id=0 num-partitions=2", ca=tmp_path / "other-ca" / "ca.crt", check=False
        )
        assert no_ca.returncode != 0 and "CERTIFICATE_VERIFY_FAILED" in no_ca.stdout + no_ca.stderr
        # refused: nothing listens at the address (the node gives up after its retries, with the reason)
        dead = fed.supernode(
            "rogue",
            "partition-id=0 num-partitions=2",
            address=f"127.0.0.1:{free_port()}",
            check=False,
            extra=("--max-retries", "2"),
        )
        assert dead.returncode != 0 and "Connection refused" in dead.stdout + dead.stderr

        fed.supernode("node-a", f"data-path={silo_a} max-epsilon=40")
        fed.supernode("node-b", f"data-path={silo_b}")
        fed.supernode("node-c", f"data-path={tmp_path / 'silos' / 'missing'}")  # joins, but its silo is not there
        listed = subprocess.run(
            [FLWR, "supernode", "list", CONNECTION, "--format", "json"],
            capture_output=True,
            text=True,
            env=fed.env,
            timeout=60,
        )
        assert listed.returncode == 0, listed.stderr
        assert listed.stdout.count("online") >= 3 or len(json.loads(listed.stdout).get("nodes", [])) >= 3, listed.stdout

        run_config = (
            f'num-server-rounds=2 output-dir="{out}" run-name="deploy" data.max-eval-examples=200 '
            "data.max-length=48 train.local-epochs=1 strategy.fraction-evaluate=0.0 strategy.min-train-nodes=2 "
            'strategy.min-available-nodes=3 privacy.mode="sample" privacy.noise-multiplier=1.0 '
            "strategy.secure-aggregation=true strategy.secagg-max-weight=200.0"
        )
        proc = fed.flwr_run(run_config)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        run = wait_for_run(out / "deploy" / "run.json", 120)
        left_behind = fed.stop()  # the scripts' own stop, by PID files
    finally:
        fed.stop()

    assert left_behind == [], f"local_federation.sh stop left these running: {left_behind}"
    assert run["status"] == "complete", run.get("error")
    assert [r["round"] for r in run["rounds"]] == [0, 1, 2]
    assert (out / "deploy" / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "deploy" / "hub" / "README.md").is_file()
    # SecAgg+: three sampled, node-c dropped out of every round (its silo is missing), the sum still unmasked
    for r in run["secure_aggregation"]["rounds"]:
        assert (r["sampled"], r["participants"], r["dropped"], r["completed"]) == (3, 2, 1, True), r
        assert (r["num_shares"], r["reconstruction_threshold"]) == (3, 2)
    # the failing node's reason reached the server's record of the round
    for r in run["rounds"][1:]:
        (failure,) = r["failures"]
        assert "secure aggregation" in failure["reason"] and "does not exist on this node" in failure["reason"], failure
    # DP: each silo's accountant lived on its SuperNode across rounds; node-a's own budget is recorded
    ledger = run["privacy"]["clients"]
    assert len(ledger) == 2
    budgets = sorted(e["max_epsilon"] or 0.0 for e in ledger.values())
    assert budgets == [0.0, 40.0]
    for e in ledger.values():
        eps = [x["epsilon"] for x in e["rounds"]]
        assert len(eps) == 2 and 0 < eps[0] < eps[1]
        assert e["steps"] == 2 * round(1 / e["sample_rate"])
    # ... and on its disk: start_supernode.sh put node config state-dir under --state/NAME-fedhf, where a
    # restarted SuperNode finds it (one spend file per dataset, keyed by its content, not its node id or run)
    for name in ("node-a", "node-b"):
        (saved,) = (tmp_path / "fed" / "supernodes" / f"{name}-fedhf").glob("data-*/spend.json")
        steps = sum(e["steps"] for e in json.loads(saved.read_text())["entries"] if e["run_uid"] == run["run_uid"])
        assert steps in {e["steps"] for e in ledger.values()}
    # Under DP the silos shared no sizes or histograms (their default policy); the silo paths never reach the
    # server's records either
    assert run["partitions"] == [] and all(c["shared"] == [] for r in run["rounds"][1:] for c in r["clients"])
    text = (out / "deploy" / "run.json").read_text() + (out / "deploy" / "hub" / "provenance.json").read_text()
    assert str(silo_a) not in text and str(silo_b) not in text


def test_an_expired_server_certificate_is_refused(sst2_dir, tmp_path):
    """A SuperLink presenting an expired certificate (signed by the right CA) gets no SuperNode."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    fed = Federation(sst2_dir, tmp_path / "fed")
    try:
        sh("make_certs.sh", "--out", str(fed.dir / "certs"), "--hosts", "127.0.0.1", env=fed.env)
        certs = fed.dir / "certs"
        ca_key = serialization.load_pem_private_key((certs / "ca.key").read_bytes(), password=None)
        ca_cert = x509.load_pem_x509_certificate((certs / "ca.crt").read_bytes())
        key = ec.generate_private_key(ec.SECP384R1())
        now = dt.datetime.now(dt.UTC)
        import ipaddress

        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=30))
            .not_valid_after(now - dt.timedelta(days=1))
            .add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
            )
            .sign(ca_key, hashes.SHA256())
        )
        (certs / "server.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (certs / "server.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        sh("make_node_keys.sh", "--out", str(fed.dir / "keys"), "--names", "node-a", env=fed.env)
        sh(
            "start_superlink.sh",
            "--certs",
            str(certs),
            "--host",
            "127.0.0.1",
            "--port",
            str(fed.port),
            "--state",
            str(fed.dir / "superlink"),
            env=fed.env,
        )
        refused = fed.supernode("node-a", "partition-id=0 num-partitions=1", check=False)
        assert refused.returncode != 0
        assert "certificate has expired" in refused.stdout + refused.stderr
    finally:
        fed.stop()


def _netns_unavailable() -> str | None:
    """Why network namespaces cannot be used here (None: they can); probed with a name unique to this process."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "the 'ip' tool (iproute2) is not installed"
    name = f"fedhf-probe-{os.getpid()}"
    probe = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"ip netns is not permitted here: {probe.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


def test_superlink_and_supernodes_on_separate_namespaced_hosts(sst2_dir, tmp_path):
    """SuperLink on host 10.77.0.1 (namespace A), two SuperNodes on host 10.77.0.2 (namespace B), joined by veth.

    The hosts reach each other only over the veth pair; the certificate names 10.77.0.1.
    """
    reason = _netns_unavailable()
    if reason:
        pytest.skip(reason)
    suffix = str(os.getpid() % 10000)
    ns_a, ns_b, veth_a, veth_b = f"fhA{suffix}", f"fhB{suffix}", f"fhva{suffix}", f"fhvb{suffix}"
    setup = [
        ["ip", "netns", "add", ns_a],
        ["ip", "netns", "add", ns_b],
        ["ip", "link", "add", veth_a, "type", "veth", "peer", "name", veth_b],
        ["ip", "link", "set", veth_a, "netns", ns_a],
        ["ip", "link", "set", veth_b, "netns", ns_b],
        ["ip", "-n", ns_a, "addr", "add", "10.77.0.1/24", "dev", veth_a],
        ["ip", "-n", ns_b, "addr", "add", "10.77.0.2/24", "dev", veth_b],
        ["ip", "-n", ns_a, "link", "set", veth_a, "up"],
        ["ip", "-n", ns_b, "link", "set", veth_b, "up"],
        ["ip", "-n", ns_a, "link", "set", "lo", "up"],
        ["ip", "-n", ns_b, "link", "set", "lo", "up"],
    ]
    fed = Federation(sst2_dir, tmp_path / "fed", host="10.77.0.1", netns=(ns_a, ns_b))
    out = tmp_path / "out"
    try:
        for cmd in setup:
            subprocess.run(cmd, check=True, capture_output=True)
        fed.start(["node-0", "node-1"])
        # From the SuperNodes' host the Control API cannot be reached: not on the Fleet address (refused by path),
        # not on its own port (bound to the SuperLink host's loopback).
        for name, port in (("public-fleet", fed.port), ("public-control", fed.control_port)):
            sh(
                "connection.sh",
                "--name",
                name,
                "--address",
                f"10.77.0.1:{port}",
                "--ca",
                str(fed.dir / "certs" / "ca.crt"),
                env=fed.env,
            )
        refused = subprocess.run(
            ["ip", "netns", "exec", ns_b, FLWR, "ls", "public-fleet"],
            capture_output=True,
            text=True,
            env=fed.env,
            timeout=60,
        )
        assert refused.returncode != 0 and "not served on the Fleet address" in refused.stdout + refused.stderr
        closed = subprocess.run(
            ["ip", "netns", "exec", ns_b, FLWR, "ls", "public-control"],
            capture_output=True,
            text=True,
            env=fed.env,
            timeout=120,
        )
        assert closed.returncode != 0 and "not served" not in closed.stdout + closed.stderr
        fed.supernode("node-0", "partition-id=0 num-partitions=2")
        fed.supernode("node-1", "partition-id=1 num-partitions=2")
        proc = fed.flwr_run(
            f'num-server-rounds=1 output-dir="{out}" run-name="netns" data.max-train-examples=200 '
            "data.max-eval-examples=200 data.max-length=48 train.local-epochs=1 strategy.fraction-evaluate=0.0"
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        run = wait_for_run(out / "netns" / "run.json", 120)
    finally:
        fed.stop()
        subprocess.run(["ip", "link", "del", veth_a], capture_output=True)  # if setup stopped before the move
        for ns in (ns_a, ns_b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    assert run["status"] == "complete" and [r["round"] for r in run["rounds"]] == [0, 1]
    assert sorted(p["train_examples"] for p in run["partitions"]) == [90, 90]
    assert (out / "netns" / "adapter" / "adapter_model.safetensors").is_file()


def test_nodes_enforce_their_owners_policy_against_the_server(sst2_dir, tiny_model_dir, tmp_path):
    """Two SuperNodes whose owners require sample-level DP, max-epsilon=2 and secure aggregation, in their node
    config. Runs asking (a) no DP, (c) no SecAgg+, (d) a second run after the first spent the budget are refused by
    the nodes with the rule, no update leaves them, and each run ends cleanly with the reason. The compliant run
    trains and its realised epsilon stays within the budget. The Control API answers only on loopback. (A delta
    above the owner's max-delta is refused by the same code path: tests/test_policy.py, test_side_channels.py.)"""
    fed = Federation(sst2_dir, tmp_path / "fed")
    silos = {
        name: write_silo(sst2_dir, tmp_path / "silos" / name, start, 120)
        for name, start in (("node-a", 0), ("node-b", 120))
    }
    out = tmp_path / "out"
    policy = "min-privacy=sample max-epsilon=2 require-secure-aggregation=true"
    common = (
        f'output-dir="{out}" model.name="{tiny_model_dir}" data.max-length=32 data.max-eval-examples=100 '
        "train.local-epochs=1 strategy.fraction-evaluate=0.0 strategy.min-train-nodes=2 "
        "strategy.min-available-nodes=2 strategy.secagg-max-weight=200.0 num-server-rounds=1"
    )
    runs = {
        "a": 'privacy.mode="none" strategy.secure-aggregation=true',
        "c": 'privacy.mode="sample" privacy.noise-multiplier=1.0 strategy.secure-aggregation=false',
        "ok": 'privacy.mode="sample" privacy.target-epsilon=1.9 strategy.secure-aggregation=true',
        "d": 'privacy.mode="sample" privacy.target-epsilon=1.9 strategy.secure-aggregation=true',
    }
    results = {}
    try:
        fed.start(list(silos))
        for name, silo in silos.items():
            fed.supernode(name, f"data-path={silo} {policy}")
        # The Control API is not served on the Fleet address: the flwr CLI pointed there is refused.
        sh(
            "connection.sh",
            "--name",
            "fleet-address",
            "--address",
            fed.address,
            "--ca",
            str(fed.dir / "certs" / "ca.crt"),
            env=fed.env,
        )
        probe = subprocess.run([FLWR, "ls", "fleet-address"], capture_output=True, text=True, env=fed.env, timeout=60)
        assert probe.returncode != 0 and "not served on the Fleet address" in probe.stdout + probe.stderr
        for name, extra in runs.items():
            proc = fed.flwr_run(f'{common} run-name="{name}" {extra}')
            assert proc.returncode == 0, (name, proc.stdout[-3000:] + proc.stderr[-3000:])
            results[name] = wait_for_run(out / name / "run.json", 180)
    finally:
        fed.stop()

    expected_rule = {"a": "min-privacy", "c": "require-secure-aggregation", "d": "max-epsilon"}
    for name, rule in expected_rule.items():
        run = results[name]
        assert run["status"] == "stopped", (name, run.get("error"))
        assert (
            "every sampled client refused" in run["stopped_early"]["reason"] and rule in run["stopped_early"]["reason"]
        )
        assert len(run["refusals"]) == 2 and {r["rule"] for r in run["refusals"]} == {rule}, (name, run["refusals"])
        assert len({r["node_id"] for r in run["refusals"]}) == 2
        assert [r["round"] for r in run["rounds"]] == [0]  # nothing trained, nothing released
        assert not (out / name / "hub").exists() and not (out / name / "adapter").exists()
        assert not run.get("privacy", {}).get("clients")  # no spend reported, none made
        for sa_round in run.get("secure_aggregation", {}).get("rounds", []):
            assert sa_round["bytes_up"] == 0 and sa_round["participants"] == 0  # refused before any key left
    ok = results["ok"]
    assert ok["status"] == "complete" and [r["round"] for r in ok["rounds"]] == [0, 1]
    ledger = ok["privacy"]["clients"]
    assert len(ledger) == 2
    for e in ledger.values():
        assert 0 < e["epsilon"] <= 1.9 and e["max_epsilon"] == 2.0 and e["lifetime_epsilon"] <= 2.0
    assert ok["secure_aggregation"]["rounds"][0]["completed"] is True
    # Under DP the nodes shared nothing else: no sizes, no histograms, no losses, no timings reached the server.
    assert ok["partitions"] == [] and ok["rounds"][1]["train_loss"] is None
    for c in ok["rounds"][1]["clients"]:
        assert c["shared"] == [] and not {"num_examples", "label_histogram", "train_loss", "train_seconds"} & set(c)
    # The data owner sees the lifetime spend on its data, over both runs (the refused one spent nothing).
    check = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedhf.cli",
            "node-check",
            "--labels",
            "negative,positive",
            "--node-config",
            f"data-path={silos['node-a']} state-dir={tmp_path / 'fed' / 'supernodes' / 'node-a-fedhf'} {policy}",
        ],
        capture_output=True,
        text=True,
        env=fed.env,
        cwd=REPO,
        timeout=300,
    )
    assert check.returncode == 0, check.stderr[-2000:]
    line = next(x for x in check.stdout.splitlines() if x.startswith("lifetime privacy spend"))
    eps = float(line.split("epsilon ")[1].split()[0])
    assert 0 < eps <= 2.0 and "of the budget 2" in line and "in 1 run(s)" in line
