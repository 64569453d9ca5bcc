"""A real SuperLink started with the kit's own start-superlink.sh: TLS, enrolment and a SuperNode's key.

Processes run in their own session and are always stopped (their whole
process group, which includes the SuperExec they spawn).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedpriv.commands.provisioning.federation import load_federation
from fedpriv.commands.provisioning.kits import provision

from .conftest import federation_dict, write_federation

START_TIMEOUT_S = 60


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # flower-* and flwr of this venv
    env["FLWR_HOME"] = str(home)
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    return env


def _start(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    handle = log.open("wb")
    try:
        return subprocess.Popen(args, stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    finally:
        handle.close()


def _stop(proc: subprocess.Popen) -> None:
    for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)  # the group this test created with start_new_session
        except ProcessLookupError:
            return
        try:
            proc.wait(wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def _handshake(port: int, cafile: Path, server_hostname: str) -> None:
    context = ssl.create_default_context(cafile=str(cafile))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname=server_hostname) as tls:
            assert tls.version() in ("TLSv1.2", "TLSv1.3")


@pytest.fixture(scope="module")
def superlink(tmp_path_factory):
    root = tmp_path_factory.mktemp("tls")
    port = _free_port()
    path = write_federation(
        root / "FEDERATION.yaml",
        federation_dict(addresses=["127.0.0.1", "localhost"], port=port, bind_host="127.0.0.1", gateway="none"),
    )
    kits = root / "kits"
    provision(load_federation(path), kits, make_org_keys=True)
    (kits / "coordinator-ca").rename(root / "offline-ca")  # start-superlink.sh refuses where it can read the CA key
    other_raw = federation_dict(addresses=["127.0.0.1", "localhost"], port=port, bind_host="127.0.0.1", gateway="none")
    other = root / "other"
    provision(load_federation(write_federation(root / "OTHER.yaml", other_raw)), other, make_org_keys=True)
    env = _env(root / "flwr-home")
    log = root / "superlink.log"
    proc = _start(["sh", str(kits / "coordinator" / "start-superlink.sh")], log, env)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"flower-superlink exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                _handshake(port, kits / "coordinator" / "ca.crt", "127.0.0.1")
                break
            except (OSError, ssl.SSLError):
                if time.monotonic() > deadline:
                    pytest.fail(
                        f"flower-superlink did not accept TLS within {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}"
                    )
                time.sleep(0.3)
        yield {"port": port, "kits": kits, "other": other, "env": env, "root": root, "log": log}
    finally:
        _stop(proc)


def test_tls_handshake_trusting_the_kit_ca(superlink):
    for name in ("127.0.0.1", "localhost"):
        _handshake(superlink["port"], superlink["kits"] / "hospital-a" / "ca.crt", name)


def test_tls_handshake_fails_trusting_another_ca(superlink):
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(superlink["port"], superlink["other"] / "coordinator" / "ca.crt", "127.0.0.1")


def test_tls_handshake_fails_for_a_name_not_in_the_certificate(superlink):
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(superlink["port"], superlink["kits"] / "coordinator" / "ca.crt", "elsewhere.example.org")


def _nodes(superlink) -> list[dict]:
    home = superlink["kits"] / "coordinator" / "flwr-home"
    env = dict(superlink["env"], FLWR_HOME=str(home))
    done = subprocess.run(
        ["flwr", "supernode", "list", "--format", "json"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout[done.stdout.index("{") :])["nodes"]


def test_enrolled_supernode_connects_with_its_kit(superlink):
    kits, env = superlink["kits"], superlink["env"]
    enrol = subprocess.run(
        ["sh", str(kits / "coordinator" / "enroll-nodes.sh")], env=env, capture_output=True, text=True, timeout=60
    )
    assert enrol.returncode == 0, enrol.stdout + enrol.stderr
    assert enrol.stdout.count("registered successfully") == 2
    again = subprocess.run(
        ["sh", str(kits / "coordinator" / "enroll-nodes.sh"), "hospital-a"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode == 1 and "not registered: hospital-a" in again.stderr  # Flower refuses a key twice

    log = superlink["root"] / "supernode.log"
    node = _start(["sh", str(kits / "hospital-a" / "start-supernode.sh"), "--port", str(_free_port())], log, env)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            statuses = [n.get("status") for n in _nodes(superlink)]
            if "online" in statuses:
                break
            if node.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"SuperNode never came online ({statuses}):\n{log.read_text()[-3000:]}")
            time.sleep(1)
    finally:
        _stop(node)
