"""``fedpriv pki inspect``: shows what is in a kit; exit 1 when a check fails, 2 when it cannot be read."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from fedpriv.cli import main
from fedpriv.commands.provisioning import pki
from fedpriv.commands.provisioning.federation import load_federation
from fedpriv.commands.provisioning.kits import provision


def _inspect(capsys, path: Path) -> tuple[int, str, str]:
    code = main(["pki", "inspect", str(path)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_good_coordinator_kit(kits: Path, capsys):
    code, out, _ = _inspect(capsys, kits / "coordinator")
    assert code == 0, out
    assert "coordinator.example.org, localhost, 10.0.0.5, 127.0.0.1" in out  # SANs
    assert "CN=clinics-2026 SuperLink,O=clinics-2026" in out and "issuer       CN=clinics-2026 CA" in out
    assert "not after" in out and "days left" in out and "EXPIRED" not in out
    assert "EC secp384r1" in out and "SHA256:" in out
    assert "ok    superlink.crt: chains to ca.crt and is valid for every SAN" in out
    assert "ok    superlink.key: matches superlink.crt" in out
    assert "FAIL" not in out


def test_good_org_kit_and_single_certificate(kits: Path, capsys):
    code, out, _ = _inspect(capsys, kits / "hospital-a")
    assert code == 0 and "organisation kit" in out and "ok    node.key: matches node.pub" in out
    code, out, _ = _inspect(capsys, kits / "coordinator" / "superlink.crt")
    assert code == 0 and "SANs" in out and "days left" in out


def test_server_cert_from_another_ca_fails(kits: Path, tmp_path: Path, federation_file: Path, capsys):
    other = tmp_path / "other"
    provision(load_federation(federation_file), other, make_org_keys=True)
    co = kits / "coordinator"
    (co / "superlink.crt").write_bytes((other / "coordinator" / "superlink.crt").read_bytes())
    code, out, _ = _inspect(capsys, co)
    assert code == 1
    assert "FAIL  superlink.crt: does not verify against ca.crt" in out
    assert "FAIL  superlink.key: matches superlink.crt" in out


def test_expired_certificate_and_loose_key_fail(kits: Path, capsys):
    co = kits / "coordinator"
    ca_key, ca = pki.load_private_key(kits / "coordinator-ca" / "ca.key"), pki.load_cert(co / "ca.crt")
    server_key = pki.load_private_key(co / "superlink.key")
    expired = (
        x509.CertificateBuilder()
        .subject_name(pki.load_cert(co / "superlink.crt").subject)
        .issuer_name(ca.subject)
        .public_key(server_key.public_key())
        .serial_number(1)
        .not_valid_before(pki.now() - dt.timedelta(days=10))
        .not_valid_after(pki.now() - dt.timedelta(days=1))
        .sign(ca_key, hashes.SHA384())
    )
    (co / "superlink.crt").write_bytes(pki.cert_pem(expired))
    code, out, _ = _inspect(capsys, co / "superlink.crt")
    assert code == 1 and "EXPIRED" in out
    code, out, _ = _inspect(capsys, co)
    assert code == 1 and "EXPIRED" in out
    (kits / "coordinator-ca" / "ca.key").chmod(0o644)
    code, out, _ = _inspect(capsys, kits / "coordinator-ca")
    assert code == 1 and "FAIL  ca.key: permissions 644" in out and "CA kit" in out


def test_unreadable_is_exit_2(tmp_path: Path, kits: Path, capsys):
    code, _, err = _inspect(capsys, tmp_path / "nope")
    assert code == 2 and err.startswith("error: ") and "nope" in err
    (kits / "coordinator" / "ca.crt").write_text("garbage")
    code, _, err = _inspect(capsys, kits / "coordinator")
    assert code == 2 and "ca.crt" in err and len(err.strip().splitlines()) == 1
