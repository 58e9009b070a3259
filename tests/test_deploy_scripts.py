"""The deployment scripts' own contract: --help, bad arguments, certificates, node keys, connections (fast)."""

from __future__ import annotations

import ipaddress
import os
import shutil
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from .conftest import REPO

DEPLOY = REPO / "scripts" / "deploy"
_MISSING = [tool for tool in ("openssl", "ssh-keygen") if shutil.which(tool) is None]
pytestmark = pytest.mark.skipif(
    bool(_MISSING), reason=f"the deploy scripts need {', '.join(_MISSING)} (apt install openssl openssh-client)"
)
SCRIPTS = [
    "make_certs.sh",
    "make_node_keys.sh",
    "start_superlink.sh",
    "start_supernode.sh",
    "connection.sh",
    "register_node.sh",
    "local_federation.sh",
]


def run(script: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", **(env or {})}
    return subprocess.run([str(DEPLOY / script), *args], capture_output=True, text=True, env=env, timeout=60)


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_has_help_and_rejects_unknown_arguments(script):
    assert os.access(DEPLOY / script, os.X_OK)
    ok = run(script, "--help")
    assert ok.returncode == 0 and "Usage:" in ok.stdout
    bad = (
        run(script, "--no-such-option") if script != "local_federation.sh" else run(script, "start", "--no-such-option")
    )
    assert bad.returncode == 2 and "error:" in bad.stderr and "--help" in bad.stderr


def test_certificates_name_every_host_and_keys_are_private(tmp_path):
    from cryptography import x509

    out = tmp_path / "certs"
    proc = run("make_certs.sh", "--out", str(out), "--hosts", "127.0.0.1,localhost,10.0.0.5")
    assert proc.returncode == 0, proc.stderr
    assert "WARNING" in proc.stdout + proc.stderr and "PKI" in proc.stdout + proc.stderr
    ca = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((out / "server.crt").read_bytes())
    assert server.issuer == ca.subject
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("10.0.0.5"),
    }
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    for key in ("ca.key", "server.key"):
        assert stat.S_IMODE((out / key).stat().st_mode) == 0o600
    again = run("make_certs.sh", "--out", str(out), "--hosts", "127.0.0.1")
    assert again.returncode != 0 and "--force" in again.stderr  # never overwrites a CA silently


def test_node_keys_are_p384_pairs(tmp_path):
    proc = run("make_node_keys.sh", "--out", str(tmp_path / "keys"), "--names", "silo-a silo-b")
    assert proc.returncode == 0, proc.stderr
    for name in ("silo-a", "silo-b"):
        assert (tmp_path / "keys" / f"{name}.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
        assert stat.S_IMODE((tmp_path / "keys" / name).stat().st_mode) == 0o600


def test_connection_entry_is_what_flwr_reads(tmp_path):
    home = tmp_path / "flwr-home"
    (tmp_path / "ca.crt").write_text("placeholder")
    proc = run(
        "connection.sh",
        "--name",
        "lab",
        "--address",
        "10.0.0.5:9093",
        "--ca",
        str(tmp_path / "ca.crt"),
        env={"FLWR_HOME": str(home)},
    )
    assert proc.returncode == 0, proc.stderr
    conf = tomllib.loads((home / "config.toml").read_text())
    assert conf["superlink"]["lab"] == {"address": "10.0.0.5:9093", "root-certificates": str(tmp_path / "ca.crt")}
    from flwr.cli.flower_config import read_superlink_connection

    os.environ["FLWR_HOME"], old = str(home), os.environ.get("FLWR_HOME")
    try:
        conn = read_superlink_connection("lab")
    finally:
        os.environ.pop("FLWR_HOME") if old is None else os.environ.__setitem__("FLWR_HOME", old)
    assert conn.address == "10.0.0.5:9093" and conn.root_certificates == str(tmp_path / "ca.crt")


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--superlink", "nohostport", "--ca", "x", "--key", "y", "--node-config", "a=1"], "HOST:PORT"),
        (["--superlink", "127.0.0.1:1", "--ca", "/nonexistent/ca.crt", "--key", "y", "--node-config", "a=1"], "ca.crt"),
    ],
)
def test_supernode_bad_arguments_name_the_fix(args, fragment):
    proc = run("start_supernode.sh", *args)
    assert proc.returncode == 2 and fragment in proc.stderr, proc.stderr
