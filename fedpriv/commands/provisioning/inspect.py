"""``fedpriv pki inspect``: what a kit holds and whether it still fits together, without openssl.

Exit status: 0 all checks pass; 1 a check failed (expired or not yet valid,
wrong CA, key mismatch, wrong key type or encoding, loose permissions), and
every check is listed so that one run shows all that is wrong; 2 the kit or a
file in it cannot be read at all (missing, a folder, empty, truncated, not PEM):
one ``error:`` line naming the file, because nothing can be checked about it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from fedpriv.commands.provisioning import ProvisioningError, pki
from fedpriv.privacy.ledger import PUBLIC_KEY_FILE as LEDGER_PUB
from fedpriv.privacy.ledger import SIGNING_KEY_FILE as LEDGER_KEY

NIST_CURVES = pki.NIST_CURVES

# private key, its public half, the encoding its reader needs, the key type it must be
KEY_PAIRS = (
    ("ca.key", "ca.crt", "pem", "ec"),
    ("superlink.key", "superlink.crt", "pem", "ec"),  # uvicorn / gRPC read PEM
    ("node.key", "node.pub", "openssh", "ec"),  # flower-supernode reads OpenSSH, NIST curves only
    (LEDGER_KEY, LEDGER_PUB, "pem", "ed25519"),  # fedpriv.privacy.ledger reads PEM Ed25519
)
REMEDY = {
    "ca.crt": "a new CA means new kits for every party (fedpriv provision into an empty --out folder)",
    "superlink.crt": "re-issue it with fedpriv provision",
}


@dataclass
class Report:
    lines: list[str] = field(default_factory=list)
    checks: list[tuple[bool, str]] = field(default_factory=list)

    def check(self, ok: bool, text: str) -> bool:
        self.checks.append((ok, text))
        return ok

    @property
    def ok(self) -> bool:
        return all(ok for ok, _ in self.checks)

    def render(self) -> str:
        out = list(self.lines)
        if self.checks:
            out.append("checks")
            out += [f"  {'ok  ' if ok else 'FAIL'}  {text}" for ok, text in self.checks]
            failed = sum(not ok for ok, _ in self.checks)
            out.append(
                f"{len(self.checks)} checks, {failed} failed" if failed else f"{len(self.checks)} checks, all ok"
            )
        return "\n".join(out)


_when = pki.when


def describe_cert(report: Report, label: str, cert: x509.Certificate) -> None:
    now = pki.now()
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    days_left = (end - now).days
    state = "EXPIRED" if end <= now else ("NOT YET VALID" if start > now else f"{days_left} days left")
    self_signed = cert.issuer == cert.subject
    report.lines += [
        label,
        f"  subject      {cert.subject.rfc4514_string()}",
        f"  issuer       {cert.issuer.rfc4514_string()}{'  (self-signed)' if self_signed else ''}",
        f"  not before   {_when(start)}",
        f"  not after    {_when(end)}  ({state})",
        f"  key          {pki.key_type(cert.public_key())}  {pki.key_fingerprint(cert.public_key())}",
        f"  fingerprint  {pki.fingerprint(cert.public_bytes(serialization.Encoding.DER))}  (certificate)",
    ]
    sans = pki.san_strings(cert)
    if sans:
        report.lines.append(f"  SANs         {', '.join(sans)}")
    try:
        basic = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        if basic.ca:
            report.lines.append("  CA           yes")
    except x509.ExtensionNotFound:
        pass
    problem = pki.validity_problem(cert, now)
    if problem is None:
        report.check(True, f"{label}: valid now")
    else:
        remedy = REMEDY.get(Path(label).name, "") if end <= now else ""
        report.check(False, f"{label}: {problem}{'; ' + remedy if remedy else ''}")


def _describe_key(report: Report, label: str, public_key, private: Path | None = None, ssh: bool = True) -> None:
    report.lines += [
        label,
        f"  key          {pki.key_type(public_key)}  {pki.key_fingerprint(public_key)}",
    ]
    if ssh and isinstance(public_key, ec.EllipticCurvePublicKey):
        report.lines.append(f"  ssh          {pki.ssh_fingerprint(public_key)}")
    if private is not None:
        mode = private.stat().st_mode & 0o777
        report.check(
            mode & 0o077 == 0,
            f"{label}: permissions {mode:o}{'' if mode & 0o077 == 0 else ' (others can read it; chmod 600)'}",
        )


def inspect_kit(path: str | Path) -> Report:
    """Describe a kit folder or one certificate file and run every check that applies."""
    path = Path(path)
    report = Report()
    if path.is_file():
        describe_cert(report, str(path), pki.load_cert(path))
        return report
    if not path.is_dir():
        raise ProvisioningError(f"{path}: no such kit folder or certificate")
    ca_path = path / "ca.crt"
    if not ca_path.exists():
        raise ProvisioningError(f"{ca_path}: missing; expected a kit folder (every kit holds the federation's ca.crt)")
    coordinator = (path / "superlink.crt").exists()
    ca_kit = not coordinator and (path / "ca.key").exists()
    kind = "coordinator kit" if coordinator else ("CA kit (provisioning only)" if ca_kit else "organisation kit")
    report.lines.append(f"{path}: {kind}")
    # ca.key is kept apart (coordinator-ca/, or offline), kits older than the ledger keys lack ledger.key, and an
    # organisation's private keys are on its own machine only (not in the coordinator's copy of its kit)
    for name in ("superlink.crt", "superlink.key") if coordinator else () if ca_kit else ("node.pub",):
        if not (path / name).exists():
            report.check(
                False, f"{name}: missing ({'a coordinator' if coordinator else 'an organisation'} kit holds it)"
            )
    if coordinator and (path / "ca.key").exists():
        report.check(
            False,
            "ca.key: in the coordinator kit, within reach of the SuperLink and every ServerApp it runs (re-run"
            " `fedpriv provision` to move it to coordinator-ca/, and keep that folder off this host)",
        )
    ca = pki.load_cert(ca_path)
    describe_cert(report, "ca.crt", ca)
    is_ca = False
    try:
        is_ca = ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        pass
    report.check(is_ca and pki.signed_by(ca, ca), "ca.crt: a self-signed CA certificate")

    for cert_path in sorted(path.glob("*.crt")):
        if cert_path.name == "ca.crt":
            continue
        cert = pki.load_cert(cert_path)
        describe_cert(report, cert_path.name, cert)
        if cert_path.name == "superlink.crt":
            sans = pki.san_strings(cert)
            problems = pki.verify_server(cert, ca, sans) if sans else ["it has no subjectAltName"]
            report.check(
                not problems,
                "superlink.crt: chains to ca.crt and is valid for every SAN"
                if not problems
                else f"superlink.crt: does not verify against ca.crt ({problems[0]})",
            )
        else:
            report.check(pki.signed_by(cert, ca), f"{cert_path.name}: signed by ca.crt")

    for key_name, public_name, form, kind in KEY_PAIRS:
        key_path = path / key_name
        if not key_path.exists():
            continue
        key = pki.load_private_key(key_path)
        _describe_key(report, key_name, key.public_key(), private=key_path, ssh=key_name == "node.key")
        _check_key_kind(report, key_name, key.public_key(), kind)
        found = "OpenSSH" if b"-----BEGIN OPENSSH PRIVATE KEY-----" in key_path.read_bytes() else "PEM"
        want = "OpenSSH" if form == "openssh" else "PEM"
        report.check(found == want, f"{key_name}: {want}-encoded" + ("" if found == want else f", found {found}"))
        public_path = path / public_name
        if not public_path.exists():
            report.check(False, f"{key_name}: {public_name} is missing")
            continue
        public = (
            pki.load_cert(public_path).public_key()
            if public_name.endswith(".crt")
            else pki.load_public_key(public_path, form="pem" if kind == "ed25519" else None)
        )
        report.check(pki.same_public_key(key.public_key(), public), f"{key_name}: matches {public_name}")
    if (path / "node.pub").exists():
        public = pki.load_public_key(path / "node.pub")
        _describe_key(report, "node.pub", public)
        report.check(_nist_ec(public), "node.pub: an EC key on a NIST curve (what Flower accepts)")
    for pub in sorted((path / "nodes").glob("*.pub")) if (path / "nodes").is_dir() else []:
        public = pki.load_public_key(pub)
        _describe_key(report, f"nodes/{pub.name}", public)
        report.check(_nist_ec(public), f"nodes/{pub.name}: an EC key on a NIST curve (what Flower accepts)")
    for pub in sorted((path / "ledger-keys").glob("*.pub")) if (path / "ledger-keys").is_dir() else []:
        public = pki.load_public_key(pub, form="pem")
        _describe_key(report, f"ledger-keys/{pub.name}", public, ssh=False)
        _check_key_kind(report, f"ledger-keys/{pub.name}", public, "ed25519")
    return report


def _nist_ec(public_key) -> bool:
    return pki.is_nist_ec(public_key)


def _check_key_kind(report: Report, label: str, public_key, kind: str) -> None:
    """EC on a NIST curve (TLS and node keys: what Flower accepts) or Ed25519 (ledger keys)."""
    if kind == "ec":
        ok, want = _nist_ec(public_key), "an EC key on a NIST curve (what Flower accepts)"
    else:
        ok, want = isinstance(public_key, ed25519.Ed25519PublicKey), "an Ed25519 key (what ledgers are signed with)"
    report.check(ok, f"{label}: {want}" + ("" if ok else f", found {pki.key_type(public_key)}"))
