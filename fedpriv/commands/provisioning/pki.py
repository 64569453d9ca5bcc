"""Keys and certificates with the ``cryptography`` package only (nobody should need openssl).

Formats follow what Flower 1.41 reads: PEM (PKCS#8) for the TLS keys that
uvicorn / gRPC load, OpenSSH for the SuperNode authentication key pair
(``flower-supernode`` loads the private key with ``load_ssh_private_key`` and
``flwr supernode register`` the public key with ``load_ssh_public_key``,
NIST curves only).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import re
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from fedpriv.commands.provisioning import ProvisioningError
from fedpriv.commands.provisioning.federation import parse_address
from fedpriv.kernel import key_files
from fedpriv.kernel.key_files import key_type

CURVE = ec.SECP384R1
SKEW = dt.timedelta(hours=1)  # certificates start an hour early: clocks of the parties differ


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(CURVE())


# --------------------------------------------------------------------------- encodings


def pem_private(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def ssh_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )


def ssh_public(public_key, comment: str) -> bytes:
    line = public_key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return line + b" " + comment.encode("ascii") + b"\n"


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _read(path: Path, expected: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        reason = exc.strerror or exc.__class__.__name__
        raise ProvisioningError(f"{path}: cannot be read ({reason}); expected {expected}") from None


def bad_file(path: Path, expected: str, data: bytes, labels: tuple[str, ...] = ()) -> ProvisioningError:
    """The one-line error for a file that does not hold what it should: what was expected, what is there."""
    return ProvisioningError(f"{path}: expected {expected}; found {key_files.describe(data, labels)}")


CERT = "a PEM certificate (-----BEGIN CERTIFICATE-----)"
PRIVATE_FORMS = {
    None: "an unencrypted PEM or OpenSSH private key",
    "pem": "an unencrypted PEM private key (-----BEGIN PRIVATE KEY-----)",
    "openssh": "an unencrypted OpenSSH private key (-----BEGIN OPENSSH PRIVATE KEY-----, what flower-supernode reads)",
}
PUBLIC_FORMS = {
    None: "an OpenSSH public key line or a PEM public key",
    "pem": "a PEM public key (-----BEGIN PUBLIC KEY-----)",
}
_PRIVATE_LABELS = ("PRIVATE KEY", "EC PRIVATE KEY", "RSA PRIVATE KEY", "OPENSSH PRIVATE KEY")


def load_cert(path: Path) -> x509.Certificate:
    data = _read(path, CERT)
    try:
        cert = x509.load_pem_x509_certificate(data)
        cert.extensions  # noqa: B018  (parsed lazily: a malformed extension is a bad file, reported here)
        cert.public_key()
    except (ValueError, UnsupportedAlgorithm):
        raise bad_file(path, CERT, data, ("CERTIFICATE",)) from None
    return cert


def load_private_key(path: Path, form: str | None = None):
    """An unencrypted private key; ``form`` ("pem" / "openssh") insists on the encoding its reader needs."""
    expected = PRIVATE_FORMS[form]
    data = _read(path, expected)
    is_ssh = b"-----BEGIN OPENSSH PRIVATE KEY-----" in data
    try:
        key = (
            serialization.load_ssh_private_key(data, None) if is_ssh else serialization.load_pem_private_key(data, None)
        )
    except TypeError:  # a password-protected PEM key
        raise ProvisioningError(
            f"{path}: expected {expected}; found an encrypted key (kit keys are unencrypted, kept private by mode 0600)"
        ) from None
    except UnsupportedAlgorithm as exc:
        raise ProvisioningError(f"{path}: expected {expected}; found a key it cannot read ({exc})") from None
    except ValueError:
        raise bad_file(path, expected, data, _PRIVATE_LABELS) from None
    if form is not None and (form == "openssh") != is_ssh:
        raise ProvisioningError(f"{path}: expected {expected}; found {'an OpenSSH' if is_ssh else 'a PEM'} private key")
    return key


def load_public_key(path: Path, form: str | None = None):
    """An OpenSSH public key line (what ``flwr supernode register`` reads) or a PEM public key (``form="pem"``)."""
    expected = PUBLIC_FORMS[form]
    data = _read(path, expected)
    pem = data.lstrip().startswith(b"-----BEGIN")
    try:
        if form == "pem" or pem:
            return serialization.load_pem_public_key(data)
        return serialization.load_ssh_public_key(data.strip())
    except (ValueError, UnsupportedAlgorithm):
        raise bad_file(path, expected, data, ("PUBLIC KEY", key_files.SSH_LINE)) from None


NIST_CURVES = {"secp192r1", "secp224r1", "secp256r1", "secp384r1", "secp521r1"}  # Flower's uses_nist_ec_curve


def is_nist_ec(public_key) -> bool:
    return isinstance(public_key, ec.EllipticCurvePublicKey) and public_key.curve.name in NIST_CURVES


def require_nist_ec(path: Path, key):
    """``key`` (private or public) if EC on a NIST curve: what fedpriv makes, all Flower's node authentication takes."""
    public = key.public_key() if hasattr(key, "public_key") else key
    if not is_nist_ec(public):
        raise ProvisioningError(
            f"{path}: expected an EC key on a NIST curve (fedpriv makes P-384); found {key_type(public)}"
        )
    return key


def when(moment: dt.datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%SZ")


def validity_problem(cert: x509.Certificate, at: dt.datetime | None = None) -> str | None:
    """Why ``cert`` is not valid at ``at`` (default now): expired or not yet valid; None when it is."""
    at = at or now()
    if cert.not_valid_after_utc <= at:
        return f"certificate expired on {when(cert.not_valid_after_utc)} (not valid after)"
    if cert.not_valid_before_utc > at:
        return (
            f"certificate is not yet valid: not valid before {when(cert.not_valid_before_utc)},"
            f" and this machine's clock says {when(at)} (check the clock)"
        )
    return None


# --------------------------------------------------------------------------- issuing


def _name(federation: str, role: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, federation),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{federation} {role}"),
        ]
    )


def _general_name(address: str) -> x509.GeneralName:
    parsed = parse_address(address)
    if parsed is None:
        raise ProvisioningError(f"{address!r}: not a DNS name or IP address")
    if isinstance(parsed, str):
        return x509.DNSName(parsed)
    return x509.IPAddress(parsed)


def issue_ca(federation: str, key: ec.EllipticCurvePrivateKey, days: int) -> x509.Certificate:
    """Self-signed CA that may sign end-entity certificates only (path length 0)."""
    start = now()
    name = _name(federation, "CA")
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - SKEW)
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA384())
    )


def issue_server(
    federation: str,
    addresses: list[str],
    key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    days: int,
) -> x509.Certificate:
    """TLS server certificate for the SuperLink: every address as a SAN, serverAuth only, never after the CA."""
    start = now()
    end = min(start + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(_name(federation, "SuperLink"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - SKEW)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([_general_name(a) for a in addresses]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA384())
    )


# --------------------------------------------------------------------------- checking


def san_strings(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(v) for v in san.get_values_for_type(x509.DNSName)] + [
        str(v) for v in san.get_values_for_type(x509.IPAddress)
    ]


def same_public_key(a, b) -> bool:
    fmt = serialization.PublicFormat.SubjectPublicKeyInfo
    return a.public_bytes(serialization.Encoding.DER, fmt) == b.public_bytes(serialization.Encoding.DER, fmt)


def signed_by(cert: x509.Certificate, ca_cert: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def verify_server(
    cert: x509.Certificate, ca_cert: x509.Certificate, addresses: list[str], at: dt.datetime | None = None
) -> list[str]:
    """Problems (empty when fine) verifying ``cert`` as a TLS server for every address, trusting only ``ca_cert``.

    Uses cryptography's WebPKI verifier: signature, validity at ``at``, key usage,
    serverAuth and the SAN match for each name, like a TLS client would.
    """
    problems = []
    for address in addresses:
        name = _general_name(address)
        subject = x509.DNSName(name.value) if isinstance(name, x509.DNSName) else x509.IPAddress(name.value)
        verifier = PolicyBuilder().store(Store([ca_cert])).time(at or now()).build_server_verifier(subject)
        try:
            verifier.verify(cert, [])
        except VerificationError as exc:
            problems.append(f"not valid for {address}: {_verification_text(exc)}")
    return problems


def _verification_text(exc: VerificationError) -> str:
    """The verifier's reason on one line, without the repr of the certificate it was processing."""
    text = " ".join(str(exc).split())
    text = re.sub(r" \(encountered processing <Certificate\(.*\)>\)", "", text)
    return text.removeprefix("validation failed: ").removeprefix("candidates exhausted: ")


def fingerprint(data: bytes) -> str:
    return "SHA256:" + hashlib.sha256(data).hexdigest()


def key_fingerprint(public_key) -> str:
    """SHA-256 of the SubjectPublicKeyInfo (stable across PEM / OpenSSH encodings of the same key)."""
    return fingerprint(
        public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


def ssh_fingerprint(public_key) -> str:
    """The fingerprint ``ssh-keygen -lf`` shows for the key (what an operator may compare by eye)."""
    blob = public_key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).split()[1]
    digest = hashlib.sha256(base64.b64decode(blob)).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


def is_ip(address: str) -> bool:
    return isinstance(parse_address(address), (ipaddress.IPv4Address, ipaddress.IPv6Address))
