"""Each party can do only its own part, shown with real processes, each party on its own host (network namespace).

One federation, as the README's walk-through builds it across machines:
- three organisations (``org-a``, ``org-b``, ``org-c``), each in its own namespace, make their keys with
  ``fedpriv org init`` and send join requests; the coordinator provisions from them (``fedpriv provision``), and
  each organisation takes its reply in with ``fedpriv org accept``;
- the coordinator host (``coord``) runs ``start-superlink.sh`` (on its 127.0.0.1 only) and ``start-gateway.sh``
  (nginx, the only thing on its lab address); the CA's folder is not on that host: the SuperLink and every process
  it starts run in a mount namespace where ``coordinator-ca/`` is an empty tmpfs, as on another machine;
- an ``outsider`` host holds nothing but the federation's ``ca.crt``.

Then: the outsider, and an enrolled organisation with its own node key, try every Control-API action through
Flower's own CLI and raw HTTPS (each refused with 403, at once); a FAB with one changed line is refused by every
node before anything of it runs; the approved FAB runs with DP and SecAgg+, its ServerApp unable to see the CA's
key; the organisation that lowered its budget keeps it lowered through re-provisioning, and a node whose own
node.yaml is invalid stops with one line.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from fedpriv.commands.app_source import fab_sha256, stage_app
from fedpriv.commands.local_federation import printed_since, tail
from fedpriv.runtime.superexec import READY_LINE
from tests.deployment.helpers import write_csv
from tests.deployment.netns import NetLab, netns_missing_reason

pytestmark = pytest.mark.integration

ORGS = ("org-a", "org-b", "org-c")
ROWS = {"org-a": 110, "org-b": 130, "org-c": 150}
FEDERATION = "lab-fed"
PORT, LOCAL_PORT, NODE_PORT = 9092, 9093, 9101
START_TIMEOUT_S = 90
WARM_TIMEOUT_S = 300
RUN_TIMEOUT_S = 420
CONTROL_ACTIONS = ("ls", "supernode ls", "supernode register", "run", "stop", "log")

_reason = netns_missing_reason()
if _reason is not None:
    pytest.skip(f"network namespaces unavailable: {_reason}", allow_module_level=True)


def _env(home: Path) -> dict[str, str]:
    """A party's environment: this interpreter's scripts, its own HOME and Flower home, offline, no telemetry."""
    home.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        HOME=str(home),
        FLWR_HOME=str(home / ".flwr"),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        PYTHONUNBUFFERED="1",
    )
    return env


def _fedpriv(*args: str) -> list[str]:
    return [str(Path(sys.executable).parent / "fedpriv"), *args]


def _wait(what: str, ready, procs: dict, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        for name, (proc, log) in procs.items():
            if proc.poll() is not None:
                pytest.fail(f"{name} exited with {proc.returncode} while {what}:\n{tail(log)}")
        if time.monotonic() > deadline:
            pytest.fail(
                f"timed out after {timeout:.0f} s {what}:\n" + "\n".join(tail(log, 800) for _, log in procs.values())
            )
        time.sleep(0.5)


def _connection(home: Path, address: str, ca: Path) -> None:
    """A Flower CLI connection to ``address`` trusting ``ca`` (what anyone holding ca.crt can write)."""
    (home / ".flwr").mkdir(parents=True, exist_ok=True)
    (home / ".flwr" / "config.toml").write_text(
        f'[superlink]\ndefault = "{FEDERATION}"\n\n[superlink."{FEDERATION}"]\naddress = "{address}"\n'
        f'root-certificates = "{ca}"\n',
        encoding="utf-8",
    )


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    if shutil.which("nginx") is None:  # the coordinator's gateway is part of what is tested: not a reason to skip
        pytest.fail("nginx is needed for the coordinator's gateway: apt-get install nginx-light (.ci/run does)")
    root = tmp_path_factory.mktemp("trust")
    with NetLab("fpt", ["coord", *ORGS, "outsider"]) as net:
        yield root, net


@pytest.fixture(scope="module")
def federation(lab):
    """Provisioned from join requests, replies accepted, CA taken off the coordinator host, everything started."""
    root, net = lab
    coord_ip = net.address("coord")
    sites = {org: root / "sites" / org for org in ORGS}
    for seed, org in enumerate(ORGS):  # on each organisation's machine: its keys, its data
        done = net.run(org, _fedpriv("org", "init", org, "--kit", str(sites[org]), "--federation", FEDERATION), 60)
        assert done.returncode == 0, done.stderr
        write_csv(sites[org] / "notes.csv", ROWS[org], seed)
    app = stage_app(root / "app")  # the app the coordinator declares; every kit approves exactly its FAB
    app_hash = fab_sha256(app)
    fed = {
        "federation": FEDERATION,
        "coordinator": {
            "addresses": [coord_ip],
            "port": PORT,
            "local_port": LOCAL_PORT,
            "database": ":flwr-in-memory:",
        },
        "app": {"fab_sha256": [app_hash]},
        "organisations": [
            {
                "name": org,
                "device": "cpu",
                "privacy": {"target_epsilon": 8.0},
                "data": {"path": str(sites[org] / "notes.csv")},
                "join_request": str(sites[org] / "join-request.json"),  # what the organisation sent
            }
            for org in ORGS
        ],
    }
    fed_file = root / "FEDERATION.yaml"
    fed_file.write_text(yaml.safe_dump(fed, sort_keys=False), encoding="utf-8")
    kits = root / "kits"
    done = net.run("coord", _fedpriv("provision", str(fed_file), "--out", str(kits)), 60)
    assert done.returncode == 0, done.stdout + done.stderr
    # org-b lowers its own budget before it joins; the coordinator then re-provisions (its file still says 8)
    for org in ORGS:
        done = net.run(org, _fedpriv("org", "accept", str(kits / org), "--kit", str(sites[org])), 60)
        assert done.returncode == 0, done.stdout + done.stderr
    own = sites["org-b"] / "node.yaml"
    own.write_text(own.read_text().replace("target_epsilon: 8.0", "target_epsilon: 2.0"), encoding="utf-8")
    reprovision = net.run("coord", _fedpriv("provision", str(fed_file), "--out", str(kits)), 60)
    again = net.run("org-b", _fedpriv("org", "accept", str(kits / "org-b"), "--kit", str(sites["org-b"])), 60)

    # the CA's private half lives elsewhere: the coordinator host sees an empty folder in its place
    ca_dir = kits / "coordinator-ca"
    co = kits / "coordinator"
    procs: dict[str, tuple[subprocess.Popen, Path]] = {}
    logs = root / "logs"
    logs.mkdir()
    refused_start = net.run("coord", ["sh", str(co / "start-superlink.sh")], 60, env=_env(root / "home-coord"))
    hide_ca = f"mount -t tmpfs -o size=1m,mode=700 fedpriv-no-ca {ca_dir} && exec sh {co / 'start-superlink.sh'}"
    with (logs / "superlink.log").open("ab") as log:
        procs["superlink"] = (
            net.popen(
                "coord",
                ["unshare", "--mount", "--propagation", "private", "sh", "-c", hide_ca],
                env=_env(root / "home-coord"),
                cwd=co,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            ),
            logs / "superlink.log",
        )
    with (logs / "gateway.log").open("ab") as log:
        procs["gateway"] = (
            net.popen("coord", ["sh", str(co / "start-gateway.sh")], stdout=log, stderr=subprocess.STDOUT),
            logs / "gateway.log",
        )

    def up() -> bool:
        return net.tcp_probe("coord", "127.0.0.1", LOCAL_PORT) == "connected" and (
            net.tcp_probe("outsider", coord_ip, PORT) == "connected"
        )

    _wait("waiting for the SuperLink and the gateway", up, procs, START_TIMEOUT_S)
    enrolled = net.run("coord", ["sh", str(co / "enroll-nodes.sh")], 120, env=_env(root / "home-coord"))
    assert enrolled.returncode == 0, enrolled.stdout + enrolled.stderr
    for org in ORGS:
        log_path = logs / f"{org}.log"
        with log_path.open("ab") as log:
            procs[org] = (
                net.popen(
                    org,
                    ["sh", str(sites[org] / "start-supernode.sh"), "--port", str(NODE_PORT)],
                    env=_env(root / f"home-{org}"),
                    cwd=sites[org],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                ),
                log_path,
            )
    cli = _env(root / "home-coord")

    def online() -> bool:
        done = net.run(
            "coord",
            ["flwr", "supernode", "list", "--format", "json"],
            60,
            env=dict(cli, FLWR_HOME=str(co / "flwr-home")),
        )
        text = done.stdout
        nodes = json.loads(text[text.index("{") :]).get("nodes", []) if "{" in text else []
        return sum(node.get("status") == "online" for node in nodes) >= len(ORGS)

    _wait("waiting for the SuperNodes to come online through the gateway", online, procs, START_TIMEOUT_S)
    _wait(
        "waiting for the SuperNodes to warm up",
        lambda: all(printed_since(logs / f"{org}.log", 0, READY_LINE) for org in ORGS),
        procs,
        WARM_TIMEOUT_S,
    )
    return {
        "root": root,
        "net": net,
        "kits": kits,
        "sites": sites,
        "app": app,
        "app_hash": app_hash,
        "procs": procs,
        "logs": logs,
        "cli": dict(cli, FLWR_HOME=str(co / "flwr-home")),
        "ca_dir": ca_dir,
        "refused_start": refused_start,
        "reprovision": reprovision,
        "accept_again": again,
    }


def _flwr_run(fx, app: Path, name: str, overrides: list[str], timeout: float = RUN_TIMEOUT_S):
    """The coordinator operator's `flwr run`, from the coordinator host, with the ServerApp processes it starts."""
    run_config = fx["root"] / f"{name}.toml"
    run_config.write_text(f'config = ""\noverrides = {json.dumps(" ".join(overrides))}\nresume = ""\n')
    serverapps: set[int] = set()
    proc = fx["net"].popen(
        "coord",
        ["flwr", "run", str(app), FEDERATION, "--stream", "--run-config", str(run_config)],
        env=fx["cli"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    ca_seen: list[bool] = []
    lines: list[str] = []
    import selectors

    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            for pid in _serverapp_pids():
                if pid not in serverapps:
                    serverapps.add(pid)
                    ca_seen.append(_sees(pid, fx["ca_dir"] / "ca.key"))
            if sel.select(timeout=0.5):
                line = proc.stdout.readline()
                if not line:
                    break
                lines.append(line)
        else:
            proc.kill()
            pytest.fail(f"flwr run {name} did not finish in {timeout} s:\n{''.join(lines)[-4000:]}")
    proc.wait(timeout=30)
    return proc.returncode, "".join(lines), ca_seen


def _serverapp_pids() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if b"flwr-serverapp" in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def _sees(pid: int, path: Path) -> bool:
    """Whether process ``pid`` can see ``path`` (resolved in its own mount namespace, through /proc/PID/root)."""
    try:
        return (Path(f"/proc/{pid}/root") / path.relative_to("/")).exists()
    except OSError:
        return False


# --------------------------------------------------------------------------- keys made where they are used


def test_provisioning_from_join_requests_leaves_no_organisation_key_on_the_coordinators_side(federation):
    kits, sites = federation["kits"], federation["sites"]
    secrets = {}
    for org in ORGS:
        for name in ("node.key", "ledger.key"):
            secrets[f"{org}/{name}"] = (sites[org] / name).read_bytes()
    holding = sorted(
        str(p.relative_to(kits)) for p in kits.rglob("*") if p.is_file() and b"PRIVATE KEY" in p.read_bytes()
    )
    assert holding == ["coordinator-ca/ca.key", "coordinator/superlink.key"]
    for path in (p for p in kits.rglob("*") if p.is_file()):
        data = path.read_bytes()
        for name, secret in secrets.items():
            body = b"".join(secret.strip().splitlines()[1:-1])  # the key material, whatever the line breaks
            assert body not in data.replace(b"\n", b""), f"{name} found in {path}"


def test_reprovisioning_left_the_lowered_budget_lowered(federation):
    assert federation["reprovision"].returncode == 0 and federation["accept_again"].returncode == 0
    assert "nothing changed" in federation["reprovision"].stdout  # the coordinator's side holds no copy to "fix"
    assert "node.yaml: kept (your own settings)" in federation["accept_again"].stdout
    site = federation["sites"]["org-b"]
    assert yaml.safe_load((site / "node.yaml").read_text())["privacy"]["target_epsilon"] == 2.0
    assert yaml.safe_load((site / "node.yaml.new").read_text())["privacy"]["target_epsilon"] == 8.0


def test_the_superlink_refuses_to_start_where_it_can_read_the_ca_key(federation):
    done = federation["refused_start"]
    assert done.returncode == 2
    assert "refusing to start: this user can read the federation CA's key" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


# --------------------------------------------------------------------------- a closed control plane


def _attempts(fx, host: str, home: Path) -> dict[str, subprocess.CompletedProcess]:
    """Every Control-API action through Flower's own CLI, from ``host``, at the federation's public address."""
    net = fx["net"]
    ca = home / "ca.crt"
    home.mkdir(parents=True, exist_ok=True)
    shutil.copy(fx["kits"] / "coordinator" / "ca.crt", ca)
    _connection(home, f"{net.address('coord')}:{PORT}", ca)
    env = _env(home)
    key = home / "own.pub"
    if not key.exists():
        from fedpriv.commands.provisioning import pki

        key.write_bytes(pki.ssh_public(pki.new_key().public_key(), "mine@elsewhere"))
    app = home / "app"
    if not app.exists():  # an app of their own: the approved one with a line that sends the node's data home
        shutil.copytree(fx["app"], app)
        (app / "client" / "client_app.py").open("a").write("\nEXFILTRATE = True\n")
    commands = {
        "ls": ["flwr", "ls"],
        "supernode ls": ["flwr", "supernode", "ls"],
        "supernode register": ["flwr", "supernode", "register", str(key)],
        "run": ["flwr", "run", str(app), "--run-config", 'overrides="model.name=tiny"'],
        "stop": ["flwr", "stop", "1"],
        "log": ["flwr", "log", "1"],
    }
    return {name: net.run(host, args, 90, env=env, cwd=home) for name, args in commands.items()}


def _refused(done: subprocess.CompletedProcess) -> bool:
    text = done.stdout + done.stderr
    return "403 Forbidden" in text and "/v1/control/" in text.replace("\n", "").replace("│", "").replace(" ", "")


def _http_statuses(fx, host: str) -> dict[str, int | str]:
    """Raw HTTPS from ``host`` to the public address: Control, Runtime, docs, Fleet registration, disguised paths."""
    code = f"""
import http.client, json, ssl, sys
ctx = ssl.create_default_context(cafile=sys.argv[2])
out = dict()
for method, path in json.loads(sys.argv[3]):
    c = http.client.HTTPSConnection(sys.argv[1], {PORT}, context=ctx, timeout=10)
    c.request(method, path, body=b"", headers=dict(Accept="*/*"))
    out[method + " " + path] = c.getresponse().status
    c.close()
print(json.dumps(out))
"""
    paths = [
        ("POST", "/v1/control/list-runs"),
        ("POST", "/v1/control/register-node"),
        ("POST", "/v1/control/start-run"),
        ("POST", "/v1/control/stop-run"),
        ("POST", "/v1/control/stream-logs"),
        ("POST", "/v1/runtime/pull-messages"),
        ("POST", "/v1/fleet/register-node"),
        ("POST", "/v1/fleet/unregister-node"),
        ("GET", "/docs"),
        ("GET", "/openapi.json"),
        ("POST", "/v1/fleet/../control/list-runs"),
        ("POST", "/v1/fleet/%2e%2e/control/list-runs"),
        ("POST", "//v1/control/list-runs"),
        ("GET", "/health"),
        ("POST", "/v1/fleet/pull-messages"),
    ]
    ca = fx["kits"] / "coordinator" / "ca.crt"
    done = fx["net"].run(host, [sys.executable, "-c", code, fx["net"].address("coord"), str(ca), json.dumps(paths)], 60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.parametrize("host", ["outsider", "org-a"], ids=["outsider-with-ca-cert", "enrolled-organisation"])
def test_nobody_but_the_coordinator_host_can_register_run_list_stop_or_read_logs(federation, host):
    started = time.monotonic()
    home = federation["root"] / f"attacker-{host}"
    attempts = _attempts(federation, host, home)
    for action in CONTROL_ACTIONS:
        done = attempts[action]
        assert _refused(done), f"{host}: flwr {action} was not refused:\n{done.stdout}{done.stderr}"
    statuses = _http_statuses(federation, host)
    allowed = {"GET /health", "POST /v1/fleet/pull-messages"}
    for request, status in statuses.items():
        if request not in allowed:
            assert status == 403, (request, status)
    assert statuses["GET /health"] == 200
    # reached the SuperLink (which wants a signed protobuf request from an enrolled node), not the gateway's 403
    assert statuses["POST /v1/fleet/pull-messages"] in (401, 415)
    # the SuperLink itself listens on the coordinator's loopback only: refused at once, not a time-out
    assert federation["net"].tcp_probe(host, federation["net"].address("coord"), LOCAL_PORT) == "refused"
    assert time.monotonic() - started < 120  # refusals, not time-outs (each CLI start costs a few seconds)
    nodes = federation["net"].run("coord", ["flwr", "supernode", "list", "--format", "json"], 60, env=federation["cli"])
    listed = json.loads(nodes.stdout[nodes.stdout.index("{") :])["nodes"]
    assert len(listed) == len(ORGS)  # nobody's key got in beside the three enrolled


# --------------------------------------------------------------------------- nodes run only approved code


@pytest.fixture(scope="module")
def changed_app_run(federation):
    """The coordinator (or whoever got its account) runs a FAB whose ClientApp has one line more."""
    root = federation["root"]
    changed = root / "changed-app"
    shutil.copytree(federation["app"], changed)
    marker = root / "the-changed-line-ran"
    with (changed / "client" / "client_app.py").open("a", encoding="utf-8") as handle:
        handle.write(f"\nopen({str(marker)!r}, 'w').close()  # the one changed line: proof that this code ran\n")
    overrides = [
        "model.name=tiny",
        "training.rounds=1",
        "data.labels.names=[politics,sports,tech]",
        f"strategy.min_available_nodes={len(ORGS)}",
        "strategy.round_timeout=60",
        f"run.out_dir={root / 'changed-run'}",
    ]
    returncode, output, _ = _flwr_run(federation, changed, "changed", overrides, timeout=240)
    return {"output": output, "marker": marker, "hash": fab_sha256(changed), "returncode": returncode}


def test_a_fab_with_one_changed_line_is_refused_by_every_node_before_anything_is_read(federation, changed_app_run):
    got, approved = changed_app_run["hash"], federation["app_hash"]
    assert got != approved
    assert not changed_app_run["marker"].exists()  # no process anywhere ran its code
    refusals = [line for line in changed_app_run["output"].splitlines() if "pre-flight: node" in line]
    assert len(refusals) == len(ORGS), changed_app_run["output"][-3000:]
    for line in refusals:
        assert "is not ready: refused run" in line and f"(FAB sha256 {got}) is not approved" in line
        assert approved in line
    for org in ORGS:
        log = tail(federation["logs"] / f"{org}.log", 200_000)
        assert any(
            "fedpriv-supernode: refused run" in row and got in row and approved in row for row in log.splitlines()
        ), org
        state = federation["sites"][org] / "state"
        assert not state.exists() or not any(state.iterdir()), f"{org}: {list(state.iterdir())}"


def test_the_approved_fab_runs_with_dp_and_secagg_and_its_serverapp_cannot_see_the_ca_key(federation, changed_app_run):
    root = federation["root"]
    out = root / "run"
    overrides = [
        "model.name=tiny",
        "training.rounds=2",
        "training.batch_size=32",
        "training.local_epochs=1",
        "secure_aggregation.enabled=true",
        "data.labels.names=[politics,sports,tech]",
        f"strategy.min_available_nodes={len(ORGS)}",
        f"run.out_dir={out}",
    ]
    returncode, output, ca_seen = _flwr_run(federation, federation["app"], "approved", overrides)
    assert returncode == 0, output[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["dp_enabled"], output[-4000:]
    assert summary["config"]["secure_aggregation"]["enabled"] is True
    assert sorted(summary["privacy"]) == list(ORGS)
    assert [sorted(r["trained_orgs"]) for r in summary["rounds"]] == [list(ORGS)] * 2  # every node, every round
    for org in ORGS:
        spent = summary["privacy"][org]
        target = 2.0 if org == "org-b" else 8.0  # org-b's own, lowered limit held through re-provisioning
        assert spent["target_epsilon"] == target and 0 < spent["epsilon"] <= target
    assert ca_seen and not any(ca_seen)  # every ServerApp process, checked while it ran
    assert (federation["ca_dir"] / "ca.key").exists()  # still there for the tests' own view (the "other machine")


def test_a_node_whose_own_settings_are_invalid_stops_with_one_line(federation):
    site = federation["root"] / "broken-site"
    shutil.copytree(federation["sites"]["org-c"], site, ignore=shutil.ignore_patterns("state"))
    node_yaml = site / "node.yaml"
    node_yaml.write_text(node_yaml.read_text().replace("target_epsilon: 8.0", "target_epsilon: -1"))
    done = federation["net"].run(
        "org-c", ["sh", str(site / "start-supernode.sh"), "--port", "9102"], 60, env=_env(site / "home")
    )
    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"fedpriv-supernode: node config {node_yaml}: privacy.target_epsilon: expected a number > 0, got -1"
    )
