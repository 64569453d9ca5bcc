"""Kits: complete, consistent, private keys private, and safe to re-run."""

from __future__ import annotations

import datetime as dt
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedpriv.cli import main
from fedpriv.commands.provisioning import ProvisioningError, pki
from fedpriv.commands.provisioning.federation import load_federation
from fedpriv.commands.provisioning.kits import provision
from fedpriv.kernel.errors import ConfigError
from fedpriv.kernel.node_config import load_node_config

from .conftest import federation_dict, snapshot, write_federation

ORGS = ("hospital-a", "hospital-b")
ADDRESSES = ("coordinator.example.org", "10.0.0.5", "127.0.0.1", "localhost")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_coordinator_kit_is_complete_and_verifies(kits: Path):
    co = kits / "coordinator"
    assert not (co / "ca.key").exists()  # apart from everything the SuperLink (and its ServerApps) read
    assert (kits / "coordinator-ca" / "ca.key").is_file()
    for name in (
        "ca.crt",
        "superlink.crt",
        "superlink.key",
        "README.txt",
        "start-superlink.sh",
        "enroll-nodes.sh",
    ):
        assert (co / name).is_file(), name
    ca, server = pki.load_cert(co / "ca.crt"), pki.load_cert(co / "superlink.crt")
    # cryptography's WebPKI verifier: signature, validity now, serverAuth, SAN match, for every address
    assert pki.verify_server(server, ca, list(ADDRESSES)) == []
    assert pki.verify_server(server, ca, ["elsewhere.example.org"]) != []
    assert set(pki.san_strings(server)) == set(ADDRESSES)
    assert pki.same_public_key(pki.load_private_key(kits / "coordinator-ca" / "ca.key").public_key(), ca.public_key())
    assert pki.same_public_key(pki.load_private_key(co / "superlink.key").public_key(), server.public_key())
    assert server.not_valid_after_utc - server.not_valid_before_utc <= dt.timedelta(days=397, hours=1)


def test_another_ca_does_not_verify_the_server(kits: Path, tmp_path: Path, federation_file: Path):
    other = tmp_path / "other"
    provision(load_federation(federation_file), other, make_org_keys=True)
    server = pki.load_cert(kits / "coordinator" / "superlink.crt")
    problems = pki.verify_server(server, pki.load_cert(other / "coordinator" / "ca.crt"), ["coordinator.example.org"])
    assert problems and "signature" in problems[0]


def test_org_kits_hold_matching_keys_in_flowers_formats(kits: Path):
    ca_bytes = (kits / "coordinator" / "ca.crt").read_bytes()
    for org in ORGS:
        kit = kits / org
        assert (kit / "ca.crt").read_bytes() == ca_bytes
        # what flower-supernode / flwr supernode register load
        private = serialization.load_ssh_private_key((kit / "node.key").read_bytes(), None)
        public = serialization.load_ssh_public_key((kit / "node.pub").read_bytes())
        assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
        assert pki.same_public_key(private.public_key(), public)
        enrolled = serialization.load_ssh_public_key((kits / "coordinator" / "nodes" / f"{org}.pub").read_bytes())
        assert pki.same_public_key(enrolled, public)
        script = (kit / "start-supernode.sh").read_text()
        assert "--superlink coordinator.example.org:9092" in script
        assert '--root-certificates "$KIT/ca.crt"' in script
        assert '--auth-supernode-private-key "$KIT/node.key"' in script
        assert "--node-config \"node-config='$KIT/node.yaml'\"" in script
        assert 'KIT="$(cd "$(dirname "$0")" && pwd)"' in script
    # the two organisations have different identities
    assert (kits / "hospital-a" / "node.pub").read_bytes() != (kits / "hospital-b" / "node.pub").read_bytes()


def test_private_keys_are_0600_and_ca_key_only_in_coordinator_kit(kits: Path):
    private = [p for p in kits.rglob("*") if p.is_file() and b"PRIVATE KEY" in p.read_bytes()]
    names = sorted(str(p.relative_to(kits)) for p in private)
    assert names == [
        "coordinator-ca/ca.key",
        "coordinator/superlink.key",
        "hospital-a/ledger.key",
        "hospital-a/node.key",
        "hospital-b/ledger.key",
        "hospital-b/node.key",
    ]
    for path in private:
        assert _mode(path) == 0o600, path
    assert [p.relative_to(kits) for p in kits.rglob("ca.key")] == [Path("coordinator-ca/ca.key")]
    for org in ORGS:
        assert not any("superlink.key" in p.name or p.name == "ca.key" for p in (kits / org).iterdir())
    assert not list(kits.rglob("*.tmp")), "temporary files left behind"


def test_each_organisation_has_its_own_ledger_key_and_the_coordinator_its_public_half(kits: Path, federation_file):
    from fedpriv.privacy.ledger import load_signing_key, public_key_text

    pubs = []
    for org in ORGS:
        key = load_signing_key(kits / org / "ledger.key")
        pub = public_key_text(key.public_key())
        assert (kits / org / "ledger.pub").read_text() == pub
        assert (kits / "coordinator" / "ledger-keys" / f"{org}.pub").read_text() == pub
        assert load_node_config(kits / org / "node.yaml").ledger_key == str(kits.resolve() / org / "ledger.key")
        pubs.append(pub)
    assert pubs[0] != pubs[1]
    provision(load_federation(federation_file), kits, make_org_keys=True)  # re-running never replaces a ledger key
    assert [(kits / org / "ledger.pub").read_text() for org in ORGS] == pubs


def test_node_yaml_loads_with_load_node_config(kits: Path):
    a = load_node_config(kits / "hospital-a" / "node.yaml")
    assert a.org == "hospital-a" and a.data.path == "/data/hospital-a/notes.csv"
    assert a.privacy.target_epsilon == 8.0 and a.privacy.delta == 1e-5 and a.device == "auto"
    b = load_node_config(kits / "hospital-b" / "node.yaml")
    assert b.org == "hospital-b" and b.privacy.target_epsilon == 3.0
    assert b.data.path == str((kits / "hospital-b" / "notes.csv").resolve())  # relative to node.yaml
    assert b.state_dir == str((kits / "hospital-b" / "state").resolve())


def test_superlink_script_has_tls_auth_and_database(kits: Path):
    script = (kits / "coordinator" / "start-superlink.sh").read_text()
    for flag in (
        '--ssl-ca-certfile "$KIT/ca.crt"',
        '--ssl-certfile "$KIT/superlink.crt"',
        '--ssl-keyfile "$KIT/superlink.key"',
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",  # nothing fetched from an index for a FAB's pyproject
        "--host 127.0.0.1",  # behind the gateway: the Control and Runtime APIs never reach the organisations
        "--port 9093",
        '--database "$KIT"/state/superlink.db',
    ):
        assert flag in script, flag
    assert 'mkdir -p "$KIT"/state' in script
    assert "--auth-list-public-keys" not in script  # refused by flower-superlink 1.41
    enroll = (kits / "coordinator" / "enroll-nodes.sh").read_text()
    for org in ORGS:
        assert f'flwr supernode register "$KIT/nodes/{org}.pub" clinics-2026 --name {org}' in enroll


def test_rerun_changes_nothing(kits: Path, federation_file: Path):
    before = snapshot(kits)
    outcome = provision(load_federation(federation_file), kits, make_org_keys=True)
    assert outcome.changes == []
    assert snapshot(kits) == before


def test_rerun_restores_permissions_without_new_keys(kits: Path, federation_file: Path):
    key = kits / "hospital-a" / "node.key"
    before = snapshot(kits)
    key.chmod(0o644)
    outcome = provision(load_federation(federation_file), kits, make_org_keys=True)
    assert [(c.path, c.action) for c in outcome.changes] == [(key, "permissions")]
    assert _mode(key) == 0o600 and snapshot(kits) == before


def test_add_org_touches_nothing_else(tmp_path: Path):
    raw = federation_dict()
    path = write_federation(tmp_path / "FEDERATION.yaml", raw)
    out = tmp_path / "kits"
    provision(load_federation(path), out, make_org_keys=True)
    before = snapshot(out)
    raw["organisations"].append({"name": "clinic-c", "data": {"path": "c.csv"}})
    write_federation(path, raw)
    outcome = provision(load_federation(path), out, add_org="clinic-c", make_org_keys=True)
    after = snapshot(out)
    changed = {k for k in after if before.get(k) != after[k]}
    assert changed == {
        "clinic-c/ca.crt",
        "clinic-c/ledger.key",
        "clinic-c/ledger.pub",
        "coordinator/ledger-keys/clinic-c.pub",
        "clinic-c/node.key",
        "clinic-c/node.pub",
        "clinic-c/node.yaml",
        "clinic-c/README.txt",
        "clinic-c/federation.json",
        "clinic-c/start-supernode.sh",
        "coordinator/nodes/clinic-c.pub",
        "coordinator/enroll-nodes.sh",
        "coordinator/README.txt",
    }
    assert {k for k in before if k not in after} == set()
    assert "clinic-c" in after["coordinator/enroll-nodes.sh"].decode()
    assert after["clinic-c/ca.crt"] == before["coordinator/ca.crt"]
    assert all(c.action == "created" or c.path.name in ("enroll-nodes.sh", "README.txt") for c in outcome.changes)
    # enrolling again is a no-op
    assert provision(load_federation(path), out, add_org="clinic-c", make_org_keys=True).changes == []


def test_add_org_must_be_in_the_federation_file(kits: Path, federation_file: Path):
    with pytest.raises(ConfigError, match="--add-org nobody"):
        provision(load_federation(federation_file), kits, add_org="nobody", make_org_keys=True)


def test_address_change_reissues_only_the_server_certificate(tmp_path: Path):
    path = write_federation(tmp_path / "FEDERATION.yaml", federation_dict())
    out = tmp_path / "kits"
    provision(load_federation(path), out, make_org_keys=True)
    before = snapshot(out)
    old_serial = pki.load_cert(out / "coordinator" / "superlink.crt").serial_number
    write_federation(path, federation_dict(addresses=["coordinator.example.org", "10.0.0.6"]))
    outcome = provision(load_federation(path), out, make_org_keys=True)
    after = snapshot(out)
    changed = {k for k in after if before[k] != after[k]}
    assert changed == {"coordinator/superlink.crt", "coordinator/README.txt"}
    reissued = [c for c in outcome.changes if c.path.name == "superlink.crt"]
    assert reissued[0].action == "re-issued" and "10.0.0.6" in reissued[0].reason and "10.0.0.5" in reissued[0].reason
    assert any("only the SuperLink certificate" in n for n in outcome.notes)
    cert = pki.load_cert(out / "coordinator" / "superlink.crt")
    assert cert.serial_number != old_serial
    assert pki.verify_server(cert, pki.load_cert(out / "coordinator" / "ca.crt"), ["10.0.0.6", "127.0.0.1"]) == []
    assert pki.verify_server(cert, pki.load_cert(out / "coordinator" / "ca.crt"), ["10.0.0.5"]) != []


def test_changing_the_first_address_updates_the_supernode_scripts(tmp_path: Path):
    path = write_federation(tmp_path / "FEDERATION.yaml", federation_dict())
    out = tmp_path / "kits"
    provision(load_federation(path), out, make_org_keys=True)
    write_federation(path, federation_dict(addresses=["fl.example.org"]))
    provision(load_federation(path), out, make_org_keys=True)
    assert "--superlink fl.example.org:9092" in (out / "hospital-a" / "start-supernode.sh").read_text()


@pytest.mark.parametrize(
    "damage", ["delete-ca-key", "foreign-org-ca", "foreign-server-cert", "swapped-ca-key", "lost-node-key"]
)
def test_mismatched_kits_are_refused_and_left_untouched(tmp_path: Path, federation_file: Path, kits: Path, damage: str):
    cfg = load_federation(federation_file)
    other = tmp_path / "other"
    provision(cfg, other, make_org_keys=True)
    co = kits / "coordinator"
    if damage == "delete-ca-key":
        (kits / "coordinator-ca" / "ca.key").unlink()
    elif damage == "foreign-org-ca":
        (kits / "hospital-b" / "ca.crt").write_bytes((other / "coordinator" / "ca.crt").read_bytes())
    elif damage == "foreign-server-cert":
        (co / "superlink.crt").write_bytes((other / "coordinator" / "superlink.crt").read_bytes())
    elif damage == "swapped-ca-key":
        (kits / "coordinator-ca" / "ca.key").write_bytes((other / "coordinator-ca" / "ca.key").read_bytes())
    elif damage == "lost-node-key":
        (kits / "hospital-a" / "node.key").unlink()
    before = snapshot(kits)
    with pytest.raises(ProvisioningError) as info:
        provision(cfg, kits, make_org_keys=True)
    assert len(str(info.value).splitlines()) == 1
    assert snapshot(kits) == before


def test_cli_provision_reports_and_refuses_in_one_line(tmp_path: Path, federation_file: Path, capsys):
    out = tmp_path / "kits"
    assert main(["provision", str(federation_file), "--out", str(out), "--make-org-keys"]) == 0
    first = capsys.readouterr().out
    assert "created" in first and "ca.key" in first
    assert main(["provision", str(federation_file), "--out", str(out), "--make-org-keys"]) == 0
    assert "nothing changed" in capsys.readouterr().out
    (out / "coordinator-ca" / "ca.key").unlink()
    assert main(["provision", str(federation_file), "--out", str(out), "--make-org-keys"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and "ca.key" in err
    assert main(["provision", str(tmp_path / "missing.yaml"), "--out", str(out), "--make-org-keys"]) == 2
    assert "missing.yaml" in capsys.readouterr().err


def test_kits_of_another_federation_are_refused(tmp_path: Path, kits: Path):
    raw = federation_dict()
    raw["federation"] = "banks-2027"
    cfg = load_federation(write_federation(tmp_path / "OTHER.yaml", raw))
    before = snapshot(kits)
    with pytest.raises(ProvisioningError, match="clinics-2026"):
        provision(cfg, kits, make_org_keys=True)
    assert snapshot(kits) == before


def test_superlink_state_in_memory_when_asked(tmp_path: Path):
    """``database: ":flwr-in-memory:"`` is Flower's name, passed as is: not a file inside the kit, no folder made."""
    raw = federation_dict(database=":flwr-in-memory:")
    provision(
        load_federation(write_federation(tmp_path / "FEDERATION.yaml", raw)), tmp_path / "kits", make_org_keys=True
    )
    script = (tmp_path / "kits" / "coordinator" / "start-superlink.sh").read_text()
    assert "--database :flwr-in-memory: \\\n" in script
    assert "mkdir" not in script and 'flwr-in-memory:"' not in script


def test_enrolments_run_side_by_side_never_see_a_half_written_flower_config(kits: Path, tmp_path: Path):
    """`fedpriv federation up` enrols several organisations at once, each `enroll-nodes.sh ORG` writing the
    coordinator's Flower config first: another one's `flwr` must never read it truncated (it did: "SuperLink
    connection 'clinics-2026' not found")."""
    import os
    import subprocess

    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    flwr = fake_bin / "flwr"  # reads the config the way Flower's CLI does: it must name the federation's connection
    flwr.write_text('#!/bin/sh\ngrep -q \'^\\[superlink."clinics-2026"\\]\' "$FLWR_HOME/config.toml" || exit 3\n')
    flwr.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}"}
    script = kits / "coordinator" / "enroll-nodes.sh"
    for _ in range(10):
        runs = [
            subprocess.Popen(["sh", str(script), *ORGS], env=env, stderr=subprocess.PIPE, text=True) for _ in range(12)
        ]
        errors = [run.communicate(timeout=60)[1] for run in runs]
        assert all(run.returncode == 0 for run in runs), errors
    config = (kits / "coordinator" / "flwr-home" / "config.toml").read_text()
    assert '[superlink."clinics-2026"]' in config and not list((kits / "coordinator" / "flwr-home").glob("*.tmp*"))


def test_the_gateway_forwards_exactly_what_flowers_supernode_calls_with_an_enrolled_key(kits: Path):
    """Every Fleet path the SuperNode's client knows, less self-registration (refused under node authentication)."""
    import re

    import flwr.supernode.fleet_http_client as client
    from flwr.superlink.routers.fleet import router

    from fedpriv.commands.provisioning.kit_templates import FLEET_PATHS

    called = set(re.findall(r'path="/v1/fleet/([a-z-]+)"', Path(client.__file__).read_text()))
    assert set(FLEET_PATHS) == called - {"register-node", "unregister-node"}
    served = {r.path.removeprefix("/v1/fleet/") for r in router.router.routes}
    assert set(FLEET_PATHS) <= served
    conf = (kits / "coordinator" / "fleet-gateway.conf").read_text()
    assert "listen 0.0.0.0:9092 ssl;" in conf and "server 127.0.0.1:9093;" in conf
    for name in FLEET_PATHS:
        assert f"location = /v1/fleet/{name} {{ limit_except POST" in conf
    assert "register-node" not in conf and "/v1/control" not in conf and "/v1/runtime" not in conf
    assert "if ($allowed_target = 0)" in conf and "location / {\n            return 403;" in conf
    script = (kits / "coordinator" / "start-gateway.sh").read_text()
    assert '-c "$KIT/fleet-gateway.conf"' in script and _mode(kits / "coordinator" / "start-gateway.sh") == 0o755


def test_gateway_none_is_only_for_a_coordinator_on_loopback(tmp_path: Path):
    with pytest.raises(ConfigError, match="coordinator.gateway: none serves Flower's Control API"):
        load_federation(write_federation(tmp_path / "F.yaml", federation_dict(gateway="none")))
    raw = federation_dict(addresses=["127.0.0.1"], bind_host="127.0.0.1", gateway="none")
    out = tmp_path / "kits"
    provision(load_federation(write_federation(tmp_path / "F.yaml", raw)), out, make_org_keys=True)
    assert not (out / "coordinator" / "fleet-gateway.conf").exists()
    assert "--host 127.0.0.1 \\\n    --port 9092" in (out / "coordinator" / "start-superlink.sh").read_text()
    with pytest.raises(ConfigError, match="coordinator.local_port: 9092 is the gateway's port too"):
        load_federation(write_federation(tmp_path / "G.yaml", federation_dict(local_port=9092)))


@pytest.mark.parametrize("where", ["coordinator-ca", "inside-coordinator-kit"])
def test_start_superlink_refuses_where_it_can_read_the_ca_key(kits: Path, where: str):
    """Root can read any file: with the CA's key on this host the script stops before the SuperLink starts."""
    import os
    import shutil
    import subprocess

    co = kits / "coordinator"
    if where == "inside-coordinator-kit":  # how kits made before 2026-12 kept it
        shutil.move(kits / "coordinator-ca" / "ca.key", co / "ca.key")
    env = {**os.environ, "FEDPRIV_SUPERLINK": "true"}  # were it to get past the check: a command that does nothing
    done = subprocess.run(["sh", str(co / "start-superlink.sh")], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "refusing to start: this user can read the federation CA's key" in done.stderr
    shutil.move(co / "ca.key" if where != "coordinator-ca" else kits / "coordinator-ca" / "ca.key", kits / "away.key")
    done = subprocess.run(["sh", str(co / "start-superlink.sh")], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr


def test_reprovisioning_moves_a_ca_key_out_of_the_coordinator_kit(kits: Path, federation_file: Path):
    import shutil

    shutil.move(kits / "coordinator-ca" / "ca.key", kits / "coordinator" / "ca.key")
    key = (kits / "coordinator" / "ca.key").read_bytes()
    outcome = provision(load_federation(federation_file), kits, make_org_keys=True)
    assert not (kits / "coordinator" / "ca.key").exists()
    assert (kits / "coordinator-ca" / "ca.key").read_bytes() == key and _mode(
        kits / "coordinator-ca" / "ca.key"
    ) == 0o600
    assert ("removed", kits / "coordinator" / "ca.key") in [(c.action, c.path) for c in outcome.changes]


def _fake_commands(tmp_path: Path, check_exit: int) -> dict[str, str]:
    """PATH with stand-ins for fedpriv's and Flower's commands: ``--check-flower`` exits ``check_exit`` (2: a Flower
    release that moved a patch point); otherwise each prints its name, what it was started with, and the speed-ups
    setting it sees."""
    import os

    fake_bin = tmp_path / "bin"
    fake_bin.mkdir(exist_ok=True)
    for name in ("fedpriv-superlink", "flower-superlink", "fedpriv-supernode", "flower-supernode"):
        (fake_bin / name).write_text(
            "#!/bin/sh\n"
            f'if [ "${{1:-}}" = --check-flower ]; then echo "{name}: refusing to patch Flower: moved" >&2;'
            f" exit {check_exit}; fi\n"
            f'echo "{name} speedups=${{FEDPRIV_NODE_SPEEDUPS:-unset}} $1"\n'
        )
        (fake_bin / name).chmod(0o755)
    return {**os.environ, "PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}", "FEDPRIV_ALLOW_READABLE_CA_KEY": "1"}


@pytest.mark.parametrize(
    ("check_exit", "superlink", "supernode"),
    [
        (0, "fedpriv-superlink speedups=unset", "fedpriv-supernode speedups=unset"),
        (2, "flower-superlink speedups=unset", "fedpriv-supernode speedups=0"),  # Flower moved a patch point
    ],
)
def test_start_scripts_fall_back_to_flowers_own_commands_when_the_patches_do_not_fit(
    kits: Path, tmp_path: Path, check_exit: int, superlink: str, supernode: str
):
    """A Flower release that moved a patch point: the SuperLink is Flower's own, the SuperNode runs Flower's loop
    and flower-superexec but keeps the approved-app check (fedpriv-supernode with its speed-ups off)."""
    import subprocess

    env = _fake_commands(tmp_path, check_exit)
    link = subprocess.run(
        ["sh", str(kits / "coordinator" / "start-superlink.sh")], env=env, capture_output=True, text=True, timeout=30
    )
    node = subprocess.run(
        ["sh", str(kits / "hospital-a" / "start-supernode.sh")], env=env, capture_output=True, text=True, timeout=30
    )
    assert link.returncode == 0 and node.returncode == 0, link.stderr + node.stderr
    assert link.stdout.startswith(superlink + " --ssl-ca-certfile") and node.stdout.startswith(
        supernode + " --superlink"
    )
    if check_exit:  # the refusal's own line, then what the script does instead
        assert "running Flower's own flower-superlink instead" in link.stderr
        assert "starting fedpriv-supernode without its speed-ups (FEDPRIV_NODE_SPEEDUPS=0)" in node.stderr


def test_start_scripts_stop_when_the_flower_check_itself_fails(kits: Path, tmp_path: Path):
    import subprocess

    env = _fake_commands(tmp_path, 1)  # not a refusal: a broken installation, shown as it is
    for script in (kits / "coordinator" / "start-superlink.sh", kits / "hospital-a" / "start-supernode.sh"):
        done = subprocess.run(["sh", str(script)], env=env, capture_output=True, text=True, timeout=30)
        assert done.returncode == 1 and "--check-flower failed (exit 1)" in done.stderr and not done.stdout
    env["FEDPRIV_SUPERLINK"], env["FEDPRIV_SUPERNODE"] = "flower-superlink", "flower-supernode"  # no check asked
    done = subprocess.run(
        ["sh", str(kits / "coordinator" / "start-superlink.sh")], env=env, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0 and done.stdout.startswith("flower-superlink")
