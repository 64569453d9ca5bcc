"""Bad certificate and key files, command by command, through the real ``fedpriv`` entry point.

A file that is bad gets one ``error:`` line that names it and says what was expected: exit 2, no
traceback, nothing written. There are two exceptions, both deliberate:

- ``fedpriv pki inspect`` exists to report what is wrong with a kit. When it can parse a file but the
  file is wrong (expired, not yet valid, wrong CA, key mismatch, wrong key type or encoding, missing
  from the kit), that is a failed check. It is listed with all the others and the exit code is 1.
  Only a file it cannot read at all gives exit 2.
- ``provision``, and so ``federation up``, re-issues a SuperLink certificate that has expired or that
  no longer matches superlink.key. That certificate is derived from the CA and the key, and renewing
  it is one of the reasons to re-run provision.

The cases are made with real keys and certificates (``cryptography``), once per module.
"""

from __future__ import annotations

import datetime as dt
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

import fedpriv.commands.local_federation as local_federation
from fedpriv.cli import main
from fedpriv.commands.provisioning import pki
from fedpriv.commands.provisioning.federation import load_federation
from fedpriv.commands.provisioning.kits import ledger_pem_private, provision
from fedpriv.privacy.ledger import NodeLedger, load_signing_key, public_key_text

from .conftest import federation_dict, snapshot, write_federation

ORG = "hospital-a"
CO = "coordinator"
GARBAGE = bytes(range(256)) * 3
NOW = pki.now()


# --------------------------------------------------------------------------- material


def _pem(key) -> bytes:
    return pki.pem_private(key)


def _ssh(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )


def _resign(
    cert: x509.Certificate,
    issuer: x509.Certificate,
    issuer_key,
    *,
    start: dt.datetime | None = None,
    end: dt.datetime | None = None,
    eku: list | None = None,
) -> bytes:
    """``cert`` again (same key, subject, extensions) with other dates, another issuer or another purpose."""
    builder = (
        x509.CertificateBuilder()
        .subject_name(cert.subject)
        .issuer_name(issuer.subject)
        .public_key(cert.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start or cert.not_valid_before_utc)
        .not_valid_after(end or cert.not_valid_after_utc)
    )
    for extension in cert.extensions:
        value = extension.value
        if isinstance(value, x509.AuthorityKeyIdentifier):
            ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
            value = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
        elif isinstance(value, x509.ExtendedKeyUsage) and eku is not None:
            value = x509.ExtendedKeyUsage(eku)
        builder = builder.add_extension(value, extension.critical)
    return pki.cert_pem(builder.sign(issuer_key, hashes.SHA384()))


@dataclass(frozen=True)
class World:
    federation: Path
    kits: Path  # pristine: every test works on a copy
    forged: dict[str, bytes]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    """One federation on 127.0.0.1, so the same kits serve provision, inspect and federation up.

    Also a second federation (another CA), and every forged file the cases need.
    """
    root = tmp_path_factory.mktemp("bad-pki")
    data = root / "notes.csv"
    data.write_text("text,label\ngood stay,positive\nlong wait,negative\nkind staff,positive\n", encoding="utf-8")
    raw = federation_dict(addresses=["127.0.0.1", "localhost"], bind_host="127.0.0.1", database="state/superlink.db")
    for org in raw["organisations"]:
        org["data"] = {"path": str(data), "text_column": "text", "label_column": "label"}
    federation = write_federation(root / "FEDERATION.yaml", raw)
    kits, other = root / "kits", root / "other"
    app = [local_federation.staged_app_hash()]  # what `federation up` ships, so that its check of node.yaml passes
    provision(load_federation(federation), kits, make_org_keys=True, approved_apps=app)
    provision(load_federation(federation), other, make_org_keys=True, approved_apps=app)

    co = kits / CO
    ca_key, ca = pki.load_private_key(co.parent / "coordinator-ca" / "ca.key"), pki.load_cert(co / "ca.crt")
    server = pki.load_cert(co / "superlink.crt")
    other_ca_key, other_ca = (
        pki.load_private_key(other / "coordinator-ca" / "ca.key"),
        pki.load_cert(other / CO / "ca.crt"),
    )
    past = (NOW - dt.timedelta(days=30), NOW - dt.timedelta(days=1))
    future = (NOW + dt.timedelta(days=1), NOW + dt.timedelta(days=30))
    another_ec = pki.new_key()
    another_ed = ed25519.Ed25519PrivateKey.generate()
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_line = pki.ssh_public(another_ec.public_key(), "someone@else")
    forged = {
        "ca-expired": _resign(ca, ca, ca_key, start=past[0], end=past[1]),
        "ca-not-yet-valid": _resign(ca, ca, ca_key, start=future[0], end=future[1]),
        "other-ca": (other / CO / "ca.crt").read_bytes(),
        "server-expired": _resign(server, ca, ca_key, start=past[0], end=past[1]),
        "server-not-yet-valid": _resign(server, ca, ca_key, start=future[0], end=future[1]),
        "server-wrong-ca": _resign(server, other_ca, other_ca_key),
        "server-client-auth-only": _resign(server, ca, ca_key, eku=[ExtendedKeyUsageOID.CLIENT_AUTH]),
        "ec-pem": _pem(another_ec),
        "ec-ssh": _ssh(another_ec),
        "rsa-pem": _pem(rsa_key),
        "ed25519-pem": ledger_pem_private(another_ed),
        "ed25519-ssh": _ssh(another_ed),
        "own-node-key-pem": _pem(pki.load_private_key(kits / ORG / "node.key")),
        "own-server-key-ssh": _ssh(pki.load_private_key(co / "superlink.key")),
        "ec-pub-ssh": ec_line,
        "rsa-pub-ssh": pki.ssh_public(rsa_key.public_key(), "someone@else"),
        "ec-pub-pem": another_ec.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        "ed25519-pub-pem": public_key_text(another_ed.public_key()).encode(),
    }
    return World(federation, kits, forged)


@pytest.fixture
def kits(world: World, tmp_path: Path) -> Path:
    out = tmp_path / "kits"
    shutil.copytree(world.kits, out)
    return out


def damage(kits: Path, file: str, how: str, forged: dict[str, bytes]) -> Path:
    """Damage ``kits/file`` (a forged CA certificate replaces every kit's copy, as a real one would be)."""
    path = kits / file
    if how == "garbage":
        path.write_bytes(GARBAGE)
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "folder":  # unreadable; chmod 000 would not stop the tests, which run as root
        path.unlink()
        path.mkdir()
    elif how == "missing":
        path.unlink()
    else:
        copies = [path] + (list(kits.glob("*/ca.crt")) if file == f"{CO}/ca.crt" else [])
        for copy in copies:
            copy.write_bytes(forged[how])
    return path


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_error_line(code: int, out: str, err: str, path: Path, expect: str) -> None:
    assert "Traceback" not in out + err
    assert code == 2, out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert str(path) in lines[0], f"{path} not named in: {lines[0]}"
    assert expect in lines[0], f"{expect!r} not in: {lines[0]}"


# --------------------------------------------------------------------------- the cases

COORDINATOR_FILES = ("ca.crt", "superlink.crt", "superlink.key", f"nodes/{ORG}.pub", f"ledger-keys/{ORG}.pub")
ORG_FILES = ("ca.crt", "node.key", "node.pub", "ledger.key", "ledger.pub")
SSH_LINES = {f"{CO}/nodes/{ORG}.pub", f"{ORG}/node.pub"}  # one-line OpenSSH keys: truncated, they are just damaged
KIT_FILES = (
    ["coordinator-ca/ca.key"] + [f"{CO}/{name}" for name in COORDINATOR_FILES] + [f"{ORG}/{name}" for name in ORG_FILES]
)


def _unreadable_expectation(file: str, how: str) -> str:
    if how == "truncated":
        return "damaged OpenSSH public key line" if file in SSH_LINES else "truncated PEM"
    return {"garbage": "binary data, not PEM", "empty": "an empty file", "folder": "Is a directory"}[how]


UNREADABLE = [
    pytest.param(file, how, _unreadable_expectation(file, how), id=f"{file}-{how}")
    for file in KIT_FILES
    for how in ("garbage", "empty", "truncated", "folder")
]

# (file, damage, what the error line says): refused by `fedpriv provision` (and so by `federation up`)
PROVISION_REFUSES = [
    ("coordinator-ca/ca.key", "missing", "missing but"),
    (f"{CO}/ca.crt", "missing", "missing but"),
    (f"{ORG}/node.key", "missing", f"missing but {ORG} is enrolled"),
    (f"{ORG}/ledger.key", "missing", "missing but the coordinator holds"),
    (f"{CO}/ca.crt", "ca-expired", "certificate expired on"),
    (f"{CO}/ca.crt", "ca-not-yet-valid", "certificate is not yet valid: not valid before"),
    (f"{ORG}/ca.crt", "other-ca", "not this federation's CA"),
    (f"{CO}/superlink.crt", "server-wrong-ca", "not signed by"),
    (f"{CO}/superlink.crt", "server-not-yet-valid", "certificate is not yet valid: not valid before"),
    (f"{CO}/superlink.crt", "server-client-auth-only", "a TLS client trusting ca.crt would refuse it"),
    ("coordinator-ca/ca.key", "ec-pem", "not the private key of"),
    (
        "coordinator-ca/ca.key",
        "rsa-pem",
        "expected an EC key on a NIST curve (fedpriv makes P-384); found RSA 2048 bits",
    ),
    ("coordinator-ca/ca.key", "ed25519-pem", "found Ed25519"),
    (f"{CO}/superlink.key", "rsa-pem", "found RSA 2048 bits"),
    (f"{CO}/superlink.key", "ed25519-pem", "found Ed25519"),
    (f"{CO}/superlink.key", "own-server-key-ssh", "expected an unencrypted PEM private key"),
    (f"{ORG}/node.key", "ec-ssh", "not the public half of"),
    (f"{ORG}/node.key", "ed25519-ssh", "found Ed25519"),
    (f"{ORG}/node.key", "own-node-key-pem", "found a PEM private key"),
    (f"{ORG}/node.key", "rsa-pem", "expected an unencrypted OpenSSH private key"),
    (f"{ORG}/node.pub", "ec-pub-ssh", "not the public half of"),
    (f"{CO}/nodes/{ORG}.pub", "ec-pub-ssh", "not the public half of"),
    (f"{ORG}/ledger.key", "ed25519-pem", "not the public half of"),
    (f"{ORG}/ledger.key", "ec-pem", "expected an Ed25519 key (ledger keys are Ed25519); found EC secp384r1"),
    (f"{ORG}/ledger.pub", "ed25519-pub-pem", "not the public half of"),
    (f"{ORG}/ledger.pub", "ec-pub-pem", "expected an Ed25519 public key"),
    (f"{CO}/ledger-keys/{ORG}.pub", "ed25519-pub-pem", "not the public half of"),
]


# --------------------------------------------------------------------------- fedpriv provision


@pytest.mark.parametrize(
    ("file", "how", "expect"),
    [*UNREADABLE, *(pytest.param(*c, id=f"{c[0]}-{c[1]}") for c in PROVISION_REFUSES)],
)
def test_provision_refuses_an_unreadable_or_wrong_file(world, kits, capsys, file, how, expect):
    path = damage(kits, file, how, world.forged)
    before = snapshot(kits)
    code, out, err = run(capsys, "provision", world.federation, "--out", kits, "--make-org-keys")
    assert_one_error_line(code, out, err, path, expect)
    assert snapshot(kits) == before


@pytest.mark.parametrize(
    ("file", "how", "reason"),
    [
        (f"{CO}/superlink.crt", "server-expired", "it expired"),
        (f"{CO}/superlink.key", "ec-pem", "superlink.key does not match it"),
    ],
)
def test_provision_reissues_an_expired_or_mismatched_superlink_certificate(world, kits, capsys, file, how, reason):
    damage(kits, file, how, world.forged)
    code, out, err = run(capsys, "provision", world.federation, "--out", kits, "--make-org-keys")
    assert code == 0 and err == "", err
    assert f"re-issued   {kits / CO / 'superlink.crt'}  ({reason})" in out
    co = kits / CO
    cert = pki.load_cert(co / "superlink.crt")
    assert pki.verify_server(cert, pki.load_cert(co / "ca.crt"), ["127.0.0.1", "localhost"]) == []
    assert pki.same_public_key(cert.public_key(), pki.load_private_key(co / "superlink.key").public_key())


# --------------------------------------------------------------------------- fedpriv pki inspect

# (kit, file in it, damage, what its FAIL line says): parsed, but wrong: exit 1 with the full report
INSPECT_FAILS = [
    (CO, "ca.crt", "ca-expired", "certificate expired on"),
    (CO, "ca.crt", "ca-not-yet-valid", "certificate is not yet valid: not valid before"),
    (CO, "superlink.crt", "server-expired", "(not valid after); re-issue it with fedpriv provision"),
    (CO, "superlink.crt", "server-not-yet-valid", "certificate is not yet valid: not valid before"),
    (CO, "superlink.crt", "server-wrong-ca", "does not verify against ca.crt"),
    (CO, "superlink.crt", "server-client-auth-only", "does not verify against ca.crt"),
    ("coordinator-ca", "ca.key", "ec-pem", "ca.key: matches ca.crt"),
    ("coordinator-ca", "ca.key", "rsa-pem", "an EC key on a NIST curve (what Flower accepts), found RSA 2048 bits"),
    (CO, "superlink.key", "ec-pem", "superlink.key: matches superlink.crt"),
    (CO, "superlink.key", "ed25519-pem", "found Ed25519"),
    (CO, "superlink.key", "own-server-key-ssh", "PEM-encoded, found OpenSSH"),
    (CO, "superlink.key", "missing", "missing (a coordinator kit holds it)"),
    (CO, f"nodes/{ORG}.pub", "rsa-pub-ssh", "an EC key on a NIST curve"),
    (CO, f"ledger-keys/{ORG}.pub", "ec-pub-pem", "an Ed25519 key (what ledgers are signed with), found EC"),
    (ORG, "node.key", "ec-ssh", "node.key: matches node.pub"),
    (ORG, "node.key", "ed25519-ssh", "an EC key on a NIST curve (what Flower accepts), found Ed25519"),
    (ORG, "node.key", "own-node-key-pem", "OpenSSH-encoded, found PEM"),
    (ORG, "node.pub", "missing", "missing (an organisation kit holds it)"),
    (ORG, "node.pub", "missing", "node.pub: missing"),
    (ORG, "ledger.key", "ed25519-pem", "ledger.key: matches ledger.pub"),
    (ORG, "ledger.key", "ec-pem", "an Ed25519 key (what ledgers are signed with), found EC"),
    (ORG, "ledger.pub", "ec-pub-pem", "ledger.key: matches ledger.pub"),
]


@pytest.mark.parametrize(("file", "how", "expect"), UNREADABLE)
def test_inspect_cannot_read_a_file_exit_2(world, kits, capsys, file, how, expect):
    path = damage(kits, file, how, world.forged)
    code, out, err = run(capsys, "pki", "inspect", kits / file.split("/")[0])
    assert_one_error_line(code, out, err, path, expect)


def test_inspect_a_kit_without_its_ca_certificate_exit_2(world, kits, capsys):
    path = damage(kits, f"{CO}/ca.crt", "missing", world.forged)
    code, out, err = run(capsys, "pki", "inspect", kits / CO)
    assert_one_error_line(code, out, err, path, "missing; expected a kit folder")


@pytest.mark.parametrize(
    ("kit", "file", "how", "expect"), [pytest.param(*c, id=f"{c[0]}-{c[1]}-{c[2]}") for c in INSPECT_FAILS]
)
def test_inspect_lists_a_wrong_file_as_a_failed_check_exit_1(world, kits, capsys, kit, file, how, expect):
    damage(kits, f"{kit}/{file}", how, world.forged)
    code, out, err = run(capsys, "pki", "inspect", kits / kit)
    assert "Traceback" not in out + err and err == ""
    assert code == 1, out
    failed = [line for line in out.splitlines() if line.startswith("  FAIL  ")]
    assert any(Path(file).name in line and expect in line for line in failed), "\n".join(failed)


def test_inspect_a_good_kit_passes_every_check(world, kits, capsys):
    """The control for the cases above: the same kits, undamaged, pass (so a FAIL there is the damage)."""
    for kit in (CO, ORG):
        code, out, err = run(capsys, "pki", "inspect", kits / kit)
        assert code == 0 and err == "" and "FAIL" not in out, out
    assert "ok    ledger.key: matches ledger.pub" in out and "ok    node.key: OpenSSH-encoded" in out


@pytest.mark.parametrize(("how", "code", "expect"), [("garbage", 2, "binary data"), ("server-expired", 1, "expired")])
def test_inspect_one_certificate_file(world, kits, capsys, how, code, expect):
    path = damage(kits, f"{CO}/superlink.crt", how, world.forged)
    got, out, err = run(capsys, "pki", "inspect", path)
    if code == 2:
        assert_one_error_line(got, out, err, path, expect)
    else:
        assert got == 1 and err == "" and f"FAIL  {path}: certificate {expect}" in out


# --------------------------------------------------------------------------- fedpriv federation up


class Started(Exception):
    """Raised instead of starting a process: the point every check must come before."""


@pytest.fixture
def no_processes(monkeypatch) -> list[list[str]]:
    started: list[list[str]] = []

    def start_process(args, *rest, **kwargs):
        started.append(list(args))
        raise Started(args)

    monkeypatch.setattr(local_federation, "start_process", start_process)
    return started


def _up(capsys, world: World, kits: Path, tmp_path: Path):
    return run(capsys, "federation", "up", world.federation, "--kits", kits, "--out", tmp_path / "run")


FEDERATION_UP_REFUSES = [
    (f"{CO}/superlink.crt", "garbage", "binary data, not PEM"),
    ("coordinator-ca/ca.key", "empty", "an empty file"),
    (f"{ORG}/node.key", "truncated", "truncated PEM"),
    (f"{ORG}/ledger.key", "folder", "Is a directory"),
    ("coordinator-ca/ca.key", "missing", "missing but"),
    (f"{CO}/ca.crt", "ca-expired", "certificate expired on"),
    (f"{CO}/superlink.crt", "server-not-yet-valid", "certificate is not yet valid: not valid before"),
    (f"{CO}/superlink.crt", "server-wrong-ca", "not signed by"),
    (f"{CO}/superlink.crt", "server-client-auth-only", "a TLS client trusting ca.crt would refuse it"),
    ("coordinator-ca/ca.key", "ec-pem", "not the private key of"),
    (f"{CO}/superlink.key", "rsa-pem", "found RSA 2048 bits"),
    (f"{ORG}/node.key", "ec-ssh", "not the public half of"),
    (f"{ORG}/node.key", "ed25519-ssh", "found Ed25519"),
    (f"{ORG}/ledger.pub", "ed25519-pub-pem", "not the public half of"),
]


@pytest.mark.parametrize(
    ("file", "how", "expect"), [pytest.param(*c, id=f"{c[0]}-{c[1]}") for c in FEDERATION_UP_REFUSES]
)
def test_federation_up_refuses_bad_kits_before_any_process(
    world, kits, capsys, tmp_path, no_processes, file, how, expect
):
    path = damage(kits, file, how, world.forged)
    before = snapshot(kits)
    code, out, err = _up(capsys, world, kits, tmp_path)
    assert_one_error_line(code, out, err, path, expect)
    assert no_processes == [] and snapshot(kits) == before


def test_federation_up_reaches_the_processes_with_good_kits(world, kits, capsys, tmp_path, no_processes):
    """The control: undamaged kits get past every check, to the first process (so the refusals above are real)."""
    with pytest.raises(Started):
        _up(capsys, world, kits, tmp_path)
    assert no_processes == [["sh", str(kits / CO / "start-superlink.sh")]]
    # on one machine the nodes are enrolled at every start, so nothing needs the SuperLink's state on disk
    assert "--database :flwr-in-memory:" in (kits / CO / "start-superlink.sh").read_text()


def test_federation_up_reissues_an_expired_superlink_certificate_first(world, kits, capsys, tmp_path, no_processes):
    damage(kits, f"{CO}/superlink.crt", "server-expired", world.forged)
    with pytest.raises(Started):
        _up(capsys, world, kits, tmp_path)
    assert f"re-issued {kits / CO / 'superlink.crt'} (it expired)" in capsys.readouterr().out
    cert, ca = pki.load_cert(kits / CO / "superlink.crt"), pki.load_cert(kits / CO / "ca.crt")
    assert pki.verify_server(cert, ca, ["127.0.0.1", "localhost"]) == []


@pytest.mark.parametrize(
    ("setting", "names", "expect"),
    [
        ({"kinds": ["email", "passport"]}, None, "redaction.kinds: expected a non-empty list of distinct kinds"),
        ({"extra_names": "staff.txt"}, None, "redaction.extra_names: "),
        ({"extra_names": "staff.txt"}, b"Ann Lee\nroom 101\n", "staff.txt:2: expected a name"),
    ],
    ids=["unknown-kind", "missing-names-file", "bad-line-in-names-file"],
)
def test_federation_up_refuses_a_bad_redaction_rule_before_any_process(
    world, kits, capsys, tmp_path, no_processes, setting, names, expect
):
    staff = tmp_path / "staff.txt"
    if names is not None:
        staff.write_bytes(names)
    rule = {k: str(staff) if k == "extra_names" else v for k, v in setting.items()}
    federation = world.federation
    if "kinds" in setting:  # a mistake in the federation file: refused when it is read
        raw = yaml.safe_load(world.federation.read_text(encoding="utf-8"))
        for org in raw["organisations"]:
            if org["name"] == ORG:
                org["redaction"] = rule
        federation = write_federation(tmp_path / "FEDERATION.yaml", raw)
    else:  # the organisation's own node.yaml (federation up never rewrites it)
        node_yaml = kits / ORG / "node.yaml"
        node = yaml.safe_load(node_yaml.read_text(encoding="utf-8"))
        node["redaction"] = {**node["redaction"], **rule}
        node_yaml.write_text(yaml.safe_dump(node, sort_keys=False), encoding="utf-8")
    code, out, err = run(capsys, "federation", "up", federation, "--kits", kits, "--out", tmp_path / "run")
    named = federation if "kinds" in setting else kits / ORG / "node.yaml"  # what the organisation itself edits
    assert_one_error_line(code, out, err, named, expect)
    assert no_processes == []


# --------------------------------------------------------------------------- fedpriv audit


@pytest.fixture(scope="module")
def audited(world: World, tmp_path_factory) -> Path:
    """A run folder holding one organisation's signed ledger and its public key, as the coordinator keeps them."""
    root = tmp_path_factory.mktemp("audit")
    key = load_signing_key(world.kits / ORG / "ledger.key")
    ledger = NodeLedger.open(root / "node", ORG, key)
    ledger.append(
        "refusal",
        1,
        {
            "reason": "budget",
            "requested_steps": 10,
            "epsilon": 0.0,
            "epsilon_if_trained": 9.0,
            "max_epsilon": 8.0,
            "delta": 1e-5,
            "accountant": "rdp",
        },
    )
    run_dir = root / "run"
    (run_dir / "ledgers" / "keys").mkdir(parents=True)
    shutil.copy(ledger.path, run_dir / "ledgers" / f"{ORG}.jsonl")
    (run_dir / "ledgers" / "keys" / f"{ORG}.pub").write_bytes((world.kits / ORG / "ledger.pub").read_bytes())
    return run_dir


AUDIT_REFUSES = [
    ("garbage", "binary data, not PEM"),
    ("empty", "an empty file"),
    ("truncated", "truncated PEM"),
    ("folder", "Is a directory"),
    ("ec-pub-pem", "expected an Ed25519 public key (ledger keys are Ed25519); found EC secp384r1"),
    ("ec-pub-ssh", "found an OpenSSH public key line"),
]


@pytest.mark.parametrize("where", ["--keys", "run folder"])
@pytest.mark.parametrize(("how", "expect"), AUDIT_REFUSES)
def test_audit_refuses_an_unreadable_public_key(world, audited, tmp_path, capsys, where, how, expect):
    run_dir = tmp_path / "run"
    shutil.copytree(audited, run_dir)
    keys = run_dir / "ledgers" / "keys"
    if where == "--keys":
        keys = tmp_path / "org-keys"
        keys.mkdir()
        shutil.copy(world.kits / ORG / "ledger.pub", keys / f"{ORG}.pub")
    path = damage(keys, f"{ORG}.pub", how, world.forged)
    args = ["audit", run_dir, "--no-prv", "--out", tmp_path / "report"] + (
        ["--keys", keys] if where == "--keys" else []
    )
    code, out, err = run(capsys, *args)
    assert_one_error_line(code, out, err, path, expect)
    assert not (tmp_path / "report").exists()


def test_audit_refuses_a_missing_keys_folder(audited, tmp_path, capsys):
    missing = tmp_path / "no-such-keys"
    code, out, err = run(capsys, "audit", audited, "--no-prv", "--keys", missing, "--out", tmp_path / "report")
    assert_one_error_line(code, out, err, missing, "not a folder of <org>.pub files")
