"""What a certificate or key file holds, in words: the "found ..." half of a bad-file message.

Shared by the kit code (``fedpriv.commands.provisioning.pki``) and the privacy ledger
(``fedpriv.privacy.ledger``) so that a damaged file reads the same everywhere:
``PATH: expected WHAT; found WHAT IS THERE``.
"""

from __future__ import annotations

import re

from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

_BEGIN = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----")
_SSH_PUBLIC = (b"ecdsa-sha2-", b"ssh-", b"sk-")
SSH_LINE = "OpenSSH public key line"  # a pseudo PEM label for :func:`describe`'s ``labels``


def describe(data: bytes, labels: tuple[str, ...] = ()) -> str:
    """What ``data`` looks like. ``labels``: the PEM labels the reader expected (then: damaged, not wrong)."""
    if not data.strip():
        return "an empty file"
    begin = _BEGIN.search(data)
    if begin is None:
        if data.lstrip().startswith(_SSH_PUBLIC):
            return f"a damaged {SSH_LINE} (it does not parse)" if SSH_LINE in labels else f"an {SSH_LINE}"
        return "binary data, not PEM" if not data.isascii() else "text with no PEM block in it"
    label = begin.group(1).decode("ascii")
    if b"-----END " + begin.group(1) + b"-----" not in data[begin.end() :]:
        return f"a truncated PEM {label} block (no END line)"
    if label in labels:
        return f"a damaged PEM {label} block (it does not parse)"
    return f"a PEM {label} block"


def key_type(public_key) -> str:
    """A public key's algorithm in words (``EC secp384r1 (384 bits)``, ``RSA 2048 bits``, ``Ed25519``)."""
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return f"EC {public_key.curve.name} ({public_key.curve.key_size} bits)"
    if isinstance(public_key, rsa.RSAPublicKey):
        return f"RSA {public_key.key_size} bits"
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return "Ed25519"
    if isinstance(public_key, ed448.Ed448PublicKey):
        return "Ed448"
    return type(public_key).__name__.lstrip("_")
