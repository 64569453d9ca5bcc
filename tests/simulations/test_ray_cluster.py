"""The simulation on an existing Ray cluster (``ray start --head``), joined through ``simulation.ray_address``.

The cluster is started by the test (``ray start --head --block`` in its own session, its own ``--temp-dir``)
and stopped by the test, by process id: never with ``ray stop``, which stops every Ray process on the
machine (it matches process names), other people's simulations included. Its own temp dir also keeps it
out of Ray's ``/tmp/ray/ray_current_cluster``, so no other ``ray.init()`` on the machine joins it by mistake.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from fedpriv.kernel.config import load_config
from fedpriv.kernel.errors import ConfigError
from fedpriv.simulations.runner import backend_config

RAY = Path(sys.executable).parent / "ray"
START_TIMEOUT_S = 60.0
TINY_PAIR = [
    "model.name=tiny",
    "partitioning.num_orgs=2",
    "partitioning.scheme=iid",
    "data.max_examples=120",
    "training.batch_size=16",
    "data.max_length=32",
    "training.rounds=1",
    "output.export_model=false",
]

# Asks the cluster's GCS which drivers (jobs) and actors it has run; prints them as one JSON line.
QUERY = """
import json, sys
import ray
from ray._private import state

ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
print(json.dumps({
    "jobs": state.jobs(),
    "actors": list(state.actors().values()),
    "nodes": [node["NodeID"] for node in ray.nodes()],
}, default=str))
ray.shutdown()
"""


# --------------------------------------------------------------------------- config and backend (no cluster)


@pytest.mark.parametrize("address", ["127.0.0.1:6379", "head.example.org:10001", "auto", '"[::1]:6379"'])
def test_a_ray_address_is_accepted(address):
    cfg = load_config(overrides=[f"simulation.ray_address={address}"])
    assert cfg.simulation.ray_address == address.strip('"')


@pytest.mark.parametrize("address", ["6379", "head", "head:0", "head:70000", "ray://head:10001", "head:port"])
def test_a_wrong_ray_address_is_one_line_naming_the_key(address):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[f"simulation.ray_address={address}"])
    message = str(info.value)
    assert message.startswith("config: simulation.ray_address: expected ") and "\n" not in message


def test_ray_init_gets_the_address_or_a_private_instance():
    joined = backend_config(load_config(overrides=["simulation.ray_address=127.0.0.1:6379"]), verbose=False)
    assert joined["init_args"]["address"] == "127.0.0.1:6379"
    # no address: a private instance even if RAY_ADDRESS or an earlier `ray start` would make Ray join a cluster
    assert backend_config(load_config(), verbose=False)["init_args"]["address"] == "local"
    json.dumps(joined)  # Flower hands the backend config on as JSON


def test_only_a_private_instance_is_told_to_start_no_idle_workers():
    private = backend_config(load_config(), verbose=False)["init_args"]["_system_config"]
    assert private == {"prestart_worker_first_driver": False, "enable_worker_prestart": False}
    joined = backend_config(load_config(overrides=["simulation.ray_address=127.0.0.1:6379"]), verbose=False)
    assert "_system_config" not in joined["init_args"]  # Ray refuses one when joining a cluster


# --------------------------------------------------------------------------- a real cluster


@dataclass
class RayCluster:
    address: str
    temp_dir: Path
    proc: subprocess.Popen
    log: Path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # only the config may route the run
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    return env


def _session_pids(session: int, temp_dir: Path) -> list[int]:
    """Processes of the cluster: in the session the test started it in, or naming its temp dir."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] != "Z" and (int(fields[3]) == session or str(temp_dir).encode() in cmdline):
            pids.append(int(entry))
    return pids


def _stop_cluster(cluster: RayCluster) -> list[int]:
    """SIGTERM to ``ray start --block`` (it stops its processes), then SIGKILL to any left; returns survivors."""
    proc = cluster.proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
    deadline = time.monotonic() + 15
    while (left := _session_pids(proc.pid, cluster.temp_dir)) and time.monotonic() < deadline:
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.5)
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)
    return _session_pids(proc.pid, cluster.temp_dir)


@pytest.fixture
def ray_cluster(tmp_path):
    temp_dir = Path(tempfile.mkdtemp(prefix="fpray-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    port = _free_port()
    log = tmp_path / "ray-start.log"
    with log.open("wb") as handle:
        proc = subprocess.Popen(
            [
                str(RAY), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
                "--num-cpus", "2", "--temp-dir", str(temp_dir), "--include-dashboard=false", "--disable-usage-stats",
            ],
            stdout=handle,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=_env(),
            start_new_session=True,
        )  # fmt: skip
    cluster = RayCluster(address=f"127.0.0.1:{port}", temp_dir=temp_dir, proc=proc, log=log)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not (temp_dir / "ray_current_cluster").exists() or not _accepts(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"ray start --head did not come up:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield cluster
    finally:
        survivors = _stop_cluster(cluster)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not survivors, f"Ray processes of the test's cluster still running: {survivors}"


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


@pytest.mark.integration
def test_the_simulation_runs_on_an_existing_ray_cluster(ray_cluster, tmp_path):
    out = tmp_path / "run"
    sim = subprocess.Popen(
        [
            sys.executable, "-m", "fedpriv.cli", "simulate", *TINY_PAIR,
            f"simulation.ray_address={ray_cluster.address}", "--out", str(out),
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_env(),
    )  # fmt: skip
    output, _ = sim.communicate(timeout=240)
    assert sim.returncode == 0, output[-4000:]

    # The cluster's GCS ran this process as a driver (a job), and Flower's ClientApp actors for that job
    # on the cluster's node: the run did not start a Ray instance of its own.
    query = subprocess.run(
        [sys.executable, "-c", QUERY, ray_cluster.address],
        capture_output=True,
        text=True,
        timeout=60,
        env=_env(),
        cwd=tmp_path,
    )
    assert query.returncode == 0, query.stderr[-3000:]
    seen = json.loads(query.stdout.strip().splitlines()[-1])
    # the driver is the simulation's own child process (simulations/runner.py), whose command line is this one's
    jobs = [job for job in seen["jobs"] if f"--out {out}" in job["Entrypoint"]]
    assert len(jobs) == 1, seen["jobs"]
    job = jobs[0]
    assert job["IsDead"] and "simulate" in job["Entrypoint"] and ray_cluster.address in job["Entrypoint"]
    actors = [a for a in seen["actors"] if a["JobID"] == job["JobID"] and a["ActorClassName"] == "ClientAppActor"]
    assert len(actors) == 2, seen["actors"]  # 2 CPUs in the cluster, 1 per virtual organisation
    assert {a["Address"]["NodeID"] for a in actors} <= set(seen["nodes"])

    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and [r["round"] for r in summary["rounds"]] == [1]
    assert summary["config"]["simulation"]["ray_address"] == ray_cluster.address
    assert set(summary["privacy"]) == {"org-0", "org-1"}
    for org, report in summary["privacy"].items():
        assert 0 < report["epsilon"] <= report["target_epsilon"]
        assert (out / "nodes" / org / "accountant.json").is_file() and (out / "nodes" / org / "ledger.jsonl").is_file()
        assert (out / "ledgers" / f"{org}.jsonl").is_file()
