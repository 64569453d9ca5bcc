"""A real deployment on 127.0.0.1: one flower-superlink and three flower-supernode processes from their kits.

``fedpriv federation up`` provisions the kits, starts the SuperLink with the
coordinator's start-superlink.sh, enrols the nodes with enroll-nodes.sh,
starts every organisation's start-supernode.sh and runs ``flwr run`` (2
rounds, tiny model, DP and SecAgg+ on, each organisation with its own data
file and budget). Then the refusals, from what the processes do: a SuperNode without
TLS, one trusting another CA and one with a key that was never enrolled never
come online, next to an enrolled one that does.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from safetensors.numpy import load_file

from fedpriv.commands.local_federation import (
    enrol,
    flower_env,
    free_port,
    group_alive,
    processes_under,
    start_process,
    stop_process,
    supernodes,
    tail,
    tls_ready,
)
from fedpriv.commands.provisioning import pki
from fedpriv.commands.provisioning.federation import load_federation
from fedpriv.commands.provisioning.kit_templates import CA_KEY_ENV
from fedpriv.commands.provisioning.kits import provision
from fedpriv.kernel.protocol import NODE_CONFIG_FILE
from fedpriv.privacy.calibration import compute_epsilon
from fedpriv.runtime.superexec import READY_LINE
from tests.deployment.helpers import processes_after, write_csv

pytestmark = pytest.mark.integration

TARGETS = {"clinic-a": 3.0, "clinic-b": 5.0, "clinic-c": 8.0}
ROWS = {"clinic-a": 110, "clinic-b": 130, "clinic-c": 150}
RUN_TIMEOUT_S = 420
REFUSAL_WINDOW_S = 20


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    root = tmp_path_factory.mktemp("federation")
    orgs = []
    for seed, (name, target) in enumerate(TARGETS.items()):
        write_csv(root / f"{name}.csv", ROWS[name], seed)
        orgs.append(
            {"name": name, "device": "cpu", "privacy": {"target_epsilon": target}, "data": {"path": f"{name}.csv"}}
        )
    raw = {"federation": "e2e-fed", "coordinator": {"addresses": ["127.0.0.1"]}, "organisations": orgs}
    path = root / "FEDERATION.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return root, path


def _round_two_trained(kits: Path) -> list[str]:
    """Organisations whose node ledger (in its own kit) already holds a round-2 entry."""
    trained = []
    for org in TARGETS:
        ledger = kits / org / "state" / "ledger.jsonl"
        lines = ledger.read_text().splitlines() if ledger.exists() else []
        if any(json.loads(line)["round"] == 2 for line in lines if line.strip()):
            trained.append(org)
    return trained


def _kill_coordinator_mid_round_two(kits: Path, outcome: dict) -> None:
    """SIGKILL the SuperLink and its ServerApp (every process in the coordinator's kit) once a node trained round 2."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline and not outcome.get("done"):
        trained = _round_two_trained(kits)
        if trained:
            outcome["trained"] = trained
            outcome["killed"] = processes_under(kits / "coordinator")
            for line in outcome["killed"]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(line.split(":", 1)[0]), signal.SIGKILL)
            return
        time.sleep(0.05)


@pytest.fixture(scope="module")
def finished_run(federation):
    """The run every test below looks at: its coordinator is killed mid-round 2, then the run is resumed.

    What a federation goes through (issue 6): the SuperLink and ServerApp die with SIGKILL while round 2 is
    under way and at least one organisation has trained it; ``federation up --resume`` starts everything again
    and continues after round 1. The finished run must be indistinguishable, for every organisation's privacy,
    from one that was never interrupted.
    """
    from fedpriv.commands.local_federation import federation_up

    root, path = federation
    kits = root / "kits"
    lines: list[str] = []
    first_processes: dict[str, subprocess.Popen] = {}
    processes: dict[str, subprocess.Popen] = {}
    started = time.monotonic()
    outcome: dict = {}
    killer = threading.Thread(target=_kill_coordinator_mid_round_two, args=(kits, outcome), daemon=True)
    killer.start()
    interrupted = federation_up(
        path,
        kits,
        rounds=2,
        overrides=["model.name=tiny", "training.batch_size=32", "training.local_epochs=1"],
        out=root / "run",
        run_timeout=RUN_TIMEOUT_S,
        say=lines.append,
        processes=first_processes,
    )
    outcome["done"] = True
    killer.join()
    result = federation_up(
        path, kits, resume=root / "run", run_timeout=RUN_TIMEOUT_S, say=lines.append, processes=processes
    )
    return {
        "interrupted": interrupted,
        "outcome": outcome,
        "result": result,
        "lines": lines,
        "processes": processes,
        "first_processes": first_processes,
        "kits": kits,
        "seconds": time.monotonic() - started,
    }


def test_the_killed_coordinator_left_a_resumable_run_behind(finished_run):
    interrupted, outcome = finished_run["interrupted"], finished_run["outcome"]
    output = "\n".join(finished_run["lines"])
    assert outcome.get("trained"), "no organisation trained round 2 before the run ended:\n" + output
    assert any("superlink" in line for line in outcome["killed"]), outcome["killed"]
    assert interrupted.returncode != 0 and interrupted.summary["status"] == "running"
    assert [r["round"] for r in interrupted.summary["rounds"]] == [1]  # round 2 was lost with the coordinator
    assert f"resuming {interrupted.run_dir} after round 1 of 2" in output
    for org in outcome["trained"]:  # its round-2 update was stored before the kill and sent again after it
        stored = json.loads((finished_run["kits"] / org / "state" / "train-reply.json").read_text())
        assert (stored["round"], stored["status"]) == (2, "done")


def test_three_organisations_train_over_tls_each_within_its_own_budget(finished_run):
    result, lines = finished_run["result"], finished_run["lines"]
    output = "\n".join(lines)
    assert result.returncode == 0, output + "\n" + tail(result.run_dir / "logs" / "flwr-run.log")
    summary = result.summary
    assert summary["status"] == "completed" and summary["dp_enabled"] is True
    # secure aggregation is on by default in deployment: the coordinator only ever unmasked sums
    assert summary["secure_aggregation"] == {"num_shares": 3, "reconstruction_threshold": 2}
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    assert all(r["trained_orgs"] == sorted(TARGETS) for r in summary["rounds"])
    assert "[round 2/2]" in output  # progress streamed from the ServerApp through `flwr run --stream`
    assert "is_gradient_checkpointing" not in output  # third-party noise filtered in the ServerApp process too

    assert summary["resumes"] == [1]
    for org, target in TARGETS.items():
        report = summary["privacy"][org]
        assert 0 < report["epsilon"] <= target, (org, report)
        assert report["target_epsilon"] == target  # the node's own node.yaml, not the run config's 8.0
        assert report["epsilon"] > 0.9 * target  # calibrated for the 2 planned rounds, both spent
        # what an uninterrupted run spends: the planned steps of both rounds, each round paid for once
        uninterrupted = compute_epsilon(
            noise_multiplier=report["noise_multiplier"], sample_rate=report["sample_rate"],
            steps=report["planned_steps"], delta=report["delta"], accountant=report["accountant"],
        )  # fmt: skip
        assert report["steps"] == report["planned_steps"] and report["epsilon"] == uninterrupted, org
        ledger = (finished_run["kits"] / org / "state" / "ledger.jsonl").read_text().splitlines()
        assert [(json.loads(e)["kind"], json.loads(e)["round"]) for e in ledger] == [("dp_round", 1), ("dp_round", 2)]
    # before round 1 of both starts every node loaded its data and model and had its plan (server/preflight.py):
    # calibrated at the first start, read from its state at the resume; the rounds trained on that plan
    assert output.count(f"pre-flight: {len(TARGETS)} of {len(TARGETS)} connected node(s) ready") == 2, output
    ready = {row["org"]: row for row in summary["preflight"]["ready"]}
    assert sorted(ready) == sorted(TARGETS) and summary["preflight"]["failed"] == []
    for org, target in TARGETS.items():
        plan = {k: summary["privacy"][org][k] for k in ("noise_multiplier", "sample_rate", "planned_steps")}
        assert ready[org]["target_epsilon"] == target and {k: ready[org][k] for k in plan} == plan, org
        assert 0 < ready[org]["epsilon"] <= summary["privacy"][org]["epsilon"]  # the resume's: spent before
    assert summary["preflight"]["elapsed_s"] < summary["rounds"][-1]["elapsed_s"]
    # every node kept its accountant in its own kit, never in the coordinator's run folder
    for org in TARGETS:
        assert (finished_run["kits"] / org / "state" / "accountant.json").exists()
    assert not (result.run_dir / "nodes").exists()

    first = load_file(result.run_dir / "checkpoints" / "round-0001.safetensors")
    second = load_file(result.run_dir / "checkpoints" / "round-0002.safetensors")
    assert first.keys() == second.keys()
    assert any((first[k] != second[k]).any() for k in first), "the global model did not change between rounds"
    assert (result.run_dir / "model" / "merged").is_dir()
    assert json.loads((result.run_dir / "summary.json").read_text())["run_dir"] == str(result.run_dir)


def test_each_start_waits_for_its_nodes_to_warm_up_before_the_run(finished_run):
    """Both starts (the interrupted one and the resume) waited for every node's fedpriv-superexec imports."""
    output = "\n".join(finished_run["lines"])
    assert output.count(f"{len(TARGETS)} SuperNodes warm") == 2, output
    logs = finished_run["result"].run_dir / "logs"
    for org in TARGETS:  # one line per start, in the log both starts appended to
        assert (logs / f"{org}.log").read_text().count(READY_LINE) == 2, org


def test_every_process_is_stopped_afterwards(finished_run):
    for processes in (finished_run["first_processes"], finished_run["processes"]):
        assert sorted(processes) == sorted(["superlink", *TARGETS])
        for name, proc in processes.items():
            assert proc.poll() is not None, name
            assert not group_alive(proc.pid), f"{name}: processes of its group still running"
    assert processes_after(finished_run["kits"]) == []


def test_a_second_run_on_the_same_kits_is_refused_before_starting_anything(federation, finished_run):
    from fedpriv.commands.local_federation import FederationUpError, federation_up

    root, path = federation
    with pytest.raises(FederationUpError, match="privacy state from an earlier run"):
        federation_up(path, root / "kits", rounds=1, overrides=["model.name=tiny"], out=root / "run2", say=print)
    assert processes_after(root / "kits") == []


# --------------------------------------------------------------------------- refusals


@pytest.fixture(scope="module")
def superlink(federation, finished_run):
    """The same coordinator kit started again, on a fresh database with the three organisations enrolled again.

    Not on the kit's own database: that one still lists the first run's SuperNodes (killed with their
    coordinator) as online until two of their heartbeats pass, up to a minute, and refuses their keys
    meanwhile; whether they had expired depended on how long the resumed run took (``federation up --resume``
    starts on a fresh database for the same reason).
    """
    root, _ = federation
    kits = finished_run["kits"]
    co = kits / "coordinator"
    port = int(load_federation_port(co))
    # federation up's kits: the CA's key is on this machine (a try-out), which start-superlink.sh refuses unless told
    env = dict(flower_env(root / "refusals-home"), **{CA_KEY_ENV: "1"})
    log = root / "refusals" / "superlink.log"
    database = ["--database", str(root / "refusals" / "superlink.db")]
    proc = start_process(["sh", str(co / "start-superlink.sh"), *database], log, env, cwd=co)
    try:
        deadline = time.monotonic() + 60
        while not tls_ready(port, co / "ca.crt"):
            assert proc.poll() is None, tail(log)
            assert time.monotonic() < deadline, tail(log)
            time.sleep(0.5)
        with ThreadPoolExecutor(max_workers=len(TARGETS)) as pool:  # each is a `flwr` CLI start
            assert list(pool.map(lambda org: enrol(co, org, env), TARGETS)) == ["registered"] * len(TARGETS)
        yield {"port": port, "kits": kits, "env": env, "root": root}
    finally:
        stop_process(proc)
    assert not group_alive(proc.pid)
    assert processes_after(kits) == []


def load_federation_port(coordinator_kit: Path) -> str:
    script = (coordinator_kit / "start-superlink.sh").read_text()
    return script.split("--port ", 1)[1].split()[0]


def _supernode(superlink, name: str, *, key: Path | None, ca: Path | None, log: Path) -> subprocess.Popen:
    kit = superlink["kits"] / name
    args = [
        "flower-supernode",
        "--superlink",
        f"127.0.0.1:{superlink['port']}",
        "--port",
        str(free_port()),
        "--node-config",
        f"{NODE_CONFIG_FILE}='{kit / 'node.yaml'}'",
    ]
    args += ["--auth-supernode-private-key", str(key)] if key is not None else []
    args += ["--root-certificates", str(ca)] if ca is not None else ["--insecure"]
    env = flower_env(superlink["root"] / "refusals" / f"home-{log.stem}")
    return start_process(args, log, env, cwd=superlink["root"] / "refusals")


def _refusals_settled(nodes: dict[str, subprocess.Popen], logs: dict[str, Path]) -> bool:
    """The window can close early: each refused SuperNode has exited (it can never come online again) or, for
    plaintext without a key (it retries for ever), has logged a failed attempt; the enrolled one was seen online."""
    exited = all(nodes[name].poll() is not None for name in ("plaintext-with-key", "other-ca", "unenrolled"))
    retrying = tail(logs["plaintext"], 20000)
    return exited and ("Connection attempt failed" in retrying or "retrying" in retrying.lower())


def test_only_the_enrolled_tls_node_connects(superlink, federation):
    root, _ = federation
    kits = superlink["kits"]
    other = root / "other-kits"
    other_raw = {"federation": "other-fed", "coordinator": {"addresses": ["127.0.0.1"]}, "organisations": []}
    other_raw["organisations"] = [{"name": "x", "data": {"path": "x.csv"}}]
    other_file = root / "OTHER.yaml"
    other_file.write_text(yaml.safe_dump(other_raw), encoding="utf-8")
    provision(load_federation(other_file), other, make_org_keys=True)
    stranger = root / "refusals" / "stranger.key"
    stranger.parent.mkdir(parents=True, exist_ok=True)
    stranger.write_bytes(pki.ssh_private(pki.new_key()))
    stranger.chmod(0o600)

    names = ("good", "plaintext", "plaintext-with-key", "other-ca", "unenrolled")
    logs = {name: root / "refusals" / f"{name}.log" for name in names}
    nodes = {}
    try:
        # no TLS at all / no TLS with clinic-a's enrolled key / clinic-b's key trusting another CA / a key never
        # registered; and, as a control, clinic-c's enrolled key with the federation's CA
        nodes["plaintext"] = _supernode(superlink, "clinic-a", key=None, ca=None, log=logs["plaintext"])
        nodes["plaintext-with-key"] = _supernode(
            superlink, "clinic-a", key=kits / "clinic-a" / "node.key", ca=None, log=logs["plaintext-with-key"]
        )
        nodes["other-ca"] = _supernode(
            superlink, "clinic-b", key=kits / "clinic-b" / "node.key", ca=other / "x" / "ca.crt", log=logs["other-ca"]
        )
        nodes["unenrolled"] = _supernode(
            superlink, "clinic-c", key=stranger, ca=kits / "clinic-c" / "ca.crt", log=logs["unenrolled"]
        )
        nodes["good"] = _supernode(
            superlink, "clinic-c", key=kits / "clinic-c" / "node.key", ca=kits / "clinic-c" / "ca.crt", log=logs["good"]
        )
        deadline = time.monotonic() + REFUSAL_WINDOW_S
        online_seen = 0
        while time.monotonic() < deadline:
            online = [
                n
                for n in supernodes(kits / "coordinator" / "flwr-home", superlink["env"])
                if n.get("status") == "online"
            ]
            online_seen = max(online_seen, len(online))
            assert len(online) <= 1, f"a refused SuperNode came online: {online}\n" + "\n".join(
                f"--- {k}\n{tail(v, 1500)}" for k, v in logs.items()
            )
            if online_seen == 1 and _refusals_settled(nodes, logs):
                break  # nothing left to wait for: the refused ones have exited or are retrying in vain
            time.sleep(1)
        assert online_seen == 1, "the enrolled SuperNode never came online:\n" + tail(logs["good"])
        assert nodes["good"].poll() is None, tail(logs["good"])

        def text(name: str) -> str:
            return tail(logs[name], 20000)

        # plaintext against the TLS port: Flower keeps retrying and never says TLS; it never gets in
        assert nodes["plaintext"].poll() is None, text("plaintext")
        assert "Connection attempt failed" in text("plaintext") or "retrying" in text("plaintext").lower()
        # Flower refuses to send a node key over plaintext at all (it prints exit code 303)
        assert nodes["plaintext-with-key"].wait(30) != 0
        assert "Exit Code: 303" in text("plaintext-with-key")
        # another CA: the handshake fails and the SuperNode gives up (printed exit code 305)
        assert nodes["other-ca"].wait(30) != 0
        assert "CERTIFICATE_VERIFY_FAILED" in text("other-ca") and "Exit Code: 305" in text("other-ca")
        # a key the coordinator never registered: the SuperLink refuses to activate the node
        assert nodes["unenrolled"].wait(30) != 0
        assert "[code: 2004]" in text("unenrolled") and "Exit Code: 305" in text("unenrolled")
        print({name: proc.returncode for name, proc in nodes.items()})
    finally:
        for proc in nodes.values():
            stop_process(proc)
    for name, proc in nodes.items():
        assert not group_alive(proc.pid), name
    assert processes_after(root / "refusals") == []


def test_fedpriv_audit_with_the_organisations_kits_passes_strict_and_without_them_says_trust_on_first_use(
    finished_run, tmp_path, capsys
):
    """`fedpriv audit RUN --keys KITS --strict`: each kit's own ledger.pub, summary.json cross-checked, exit 0."""
    from fedpriv.cli import main

    run_dir = finished_run["result"].run_dir
    assert main(["audit", str(run_dir), "--keys", str(finished_run["kits"]), "--strict", "--out", str(tmp_path)]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert "every check holds; every ledger was checked against its organisation's own key" in first
    report = json.loads((tmp_path / "audit.json").read_text())
    assert report["trust_on_first_use"] == [] and set(report["organisations"]) == set(TARGETS)
    for org in report["organisations"].values():
        assert org["key_source"].startswith("given with --keys") and org["recomputed_with"] == "dp-accounting"
        assert 0 < org["recomputed_epsilon"]["pld"] < org["recomputed_epsilon"]["rdp"]
    assert main(["audit", str(run_dir), "--strict", "--no-pld", "--out", str(tmp_path / "tofu")]) == 1
    assert "TRUST ON FIRST USE" in capsys.readouterr().out.splitlines()[0]


def test_the_runs_ledgers_verify_against_the_keys_in_the_organisations_kits(finished_run):
    """An auditor with the coordinator kit's ledger-keys/ (the organisations' own public keys) finds no problem."""
    from fedpriv.privacy.audit import audit, load_ledger_set

    run_dir = finished_run["result"].run_dir
    result = audit(load_ledger_set([run_dir], finished_run["kits"] / "coordinator" / "ledger-keys"), prv=False)
    assert result.ok, result.to_dict()["findings"]
    assert {org.org for org in result.orgs} == set(TARGETS)
    for org in result.orgs:
        assert org.key_source.startswith("given with --keys") and org.dp_rounds == 2
        assert org.within_budget and org.max_epsilon == TARGETS[org.org]
        # the coordinator's copy is the node's own ledger (kept in its kit's state folder)
        node_copy = finished_run["kits"] / org.org / "state" / "ledger.jsonl"
        assert node_copy.read_text() == (run_dir / "ledgers" / f"{org.org}.jsonl").read_text()
