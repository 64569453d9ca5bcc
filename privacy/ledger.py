"""An organisation's privacy ledger: append-only, hash-chained, Ed25519-signed JSON Lines.

Every DP event a node takes part in (one round of local DP-SGD) and every
refusal to train is one entry. Each entry names the previous entry's hash
and is signed with the organisation's own key, so an auditor holding the
organisation's public key can tell an intact ledger from one that was edited,
reordered, cut or spliced, and can recompute the epsilon from the recorded
parameters alone. A line is flushed and fsynced before it is reported.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

from fedpriv.kernel import atomic_files
from fedpriv.kernel.errors import PrivacyError
from fedpriv.kernel.key_files import describe, key_type

LEDGER_FILE = "ledger.jsonl"
SIGNING_KEY_FILE = "ledger.key"
PUBLIC_KEY_FILE = "ledger.pub"
FORMAT = "fedpriv-ledger/1"
KINDS = ("dp_round", "refusal", "client_dp_round")  # client_dp_round: the coordinator's organisation-level DP
DP_KINDS = ("dp_round", "client_dp_round")
# what every entry holds, and what each kind adds (the audit checks exactly these)
COMMON_FIELDS = ("format", "org", "seq", "kind", "round", "time", "prev_hash")
DP_FIELDS = (
    "local_steps", "sample_rate", "noise_multiplier", "max_grad_norm", "delta", "accountant",
    "epsilon", "num_examples", "model_digest", "target_epsilon", "max_epsilon",
)  # fmt: skip
# recorded when given, absent from older entries (the audit reports them, never requires them)
OPTIONAL_FIELDS = {
    # what the node's redaction did to the data the steps used; the local epochs its steps make; "diverged" when
    # the round stopped early on a non-finite loss or update (its local_steps are then the steps it took)
    "dp_round": ("redaction", "local_epochs", "stopped"),
    # organisation-level DP (server/client_dp.py): the release's estimator, its denominator and neighbouring
    # relation, the update's own multiplier and (adaptive clipping) the std of the noise on the count
    "client_dp_round": (
        "estimator", "organisations_planned", "neighbouring", "update_noise_multiplier", "clipped_count_stddev",
    ),
}  # fmt: skip
REFUSAL_FIELDS = ("reason", "requested_steps", "epsilon", "epsilon_if_trained", "max_epsilon", "delta", "accountant")


class LedgerError(PrivacyError):
    """A ledger or key file that cannot be read, or an entry that cannot be appended."""


def canonical(body: dict[str, Any]) -> bytes:
    """The bytes that are signed and hashed: sorted keys, no spaces, UTF-8 (floats round-trip exactly)."""
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def genesis_hash(org: str) -> str:
    """The ``prev_hash`` of an organisation's first entry (binds the chain to the organisation)."""
    return hashlib.sha256(f"{FORMAT}:{org}".encode()).hexdigest()


def entry_hash(entry: dict[str, Any]) -> str:
    """SHA-256 of the whole signed entry; the next entry's ``prev_hash``."""
    return hashlib.sha256(canonical(entry)).hexdigest()


def unsigned(entry: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in entry.items() if key != "signature"}


def sign(body: dict[str, Any], key: Ed25519PrivateKey) -> dict[str, Any]:
    signature = base64.b64encode(key.sign(canonical(unsigned(body)))).decode()
    return {**unsigned(body), "signature": signature}


@functools.lru_cache(maxsize=4096)
def _verifier(raw_public_key: bytes) -> VerifyKey:
    return VerifyKey(raw_public_key)


def signature_valid(entry: dict[str, Any], key: Ed25519PublicKey) -> bool:
    """Whether ``entry`` carries ``key``'s signature over its other fields.

    Verified with libsodium (PyNaCl): the same RFC 8032 check as OpenSSL's, stricter about malformed
    signatures, and about twice as fast, which is what an audit of 100,000 entries spends its time on.
    """
    try:
        signature = base64.b64decode(str(entry.get("signature", "")), validate=True)
        _verifier(key.public_bytes_raw()).verify(canonical(unsigned(entry)), signature)
    except (BadSignatureError, ValueError, TypeError):
        return False
    return True


# --------------------------------------------------------------------------- keys


def public_key_text(key: Ed25519PublicKey) -> str:
    """PEM (SubjectPublicKeyInfo), the form written to ``ledger.pub`` and sent to the coordinator."""
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def key_fingerprint(key: Ed25519PublicKey) -> str:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "sha256:" + hashlib.sha256(raw).hexdigest()[:32]


def load_public_key(source: str | Path | bytes) -> Ed25519PublicKey:
    """An Ed25519 public key from PEM bytes/text or a ``.pub`` file."""
    where = ""
    data: bytes
    expected = "an Ed25519 PEM public key (a ledger.pub, -----BEGIN PUBLIC KEY-----)"
    if isinstance(source, Path) or (isinstance(source, str) and not source.lstrip().startswith("-----")):
        where = f"{source}: "
        try:
            data = Path(source).read_bytes()
        except OSError as exc:
            raise LedgerError(f"{where}cannot be read ({exc.strerror}); expected {expected}") from None
    else:
        data = source.encode() if isinstance(source, str) else source
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        raise LedgerError(f"{where}expected {expected}; found {describe(data, ('PUBLIC KEY',))}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise LedgerError(f"{where}expected an Ed25519 public key (ledger keys are Ed25519); found {key_type(key)}")
    return key


def write_private_key(path: Path, key: Ed25519PrivateKey) -> None:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    atomic_files.write_bytes(path, pem, 0o600)  # never a half-written key


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    expected = "the kit's Ed25519 ledger.key, an unencrypted PEM private key (-----BEGIN PRIVATE KEY-----)"
    try:
        data = Path(path).read_bytes()
        mode = stat.S_IMODE(Path(path).stat().st_mode)
    except OSError as exc:
        raise LedgerError(f"{path}: cannot be read ({exc.strerror}); expected {expected}") from None
    if mode & 0o077:
        raise LedgerError(f"{path}: the ledger signing key is readable by others (mode {mode:o}); chmod 600 it")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise LedgerError(f"{path}: expected {expected}; found an encrypted key") from None
    except (ValueError, UnsupportedAlgorithm):
        raise LedgerError(f"{path}: expected {expected}; found {describe(data, ('PRIVATE KEY',))}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise LedgerError(
            f"{path}: expected an Ed25519 key (ledger keys are Ed25519); found {key_type(key.public_key())}"
        )
    return key


def ensure_signing_key(path: Path) -> Ed25519PrivateKey:
    """The key in ``path``; created (0600, with its public key beside it as ``.pub``) when missing."""
    path = Path(path)
    if not path.exists():
        key = Ed25519PrivateKey.generate()
        write_private_key(path, key)
        atomic_files.write_text(path.with_suffix(".pub"), public_key_text(key.public_key()))
        return key
    return load_signing_key(path)


# --------------------------------------------------------------------------- files


def read_entries(path: Path) -> list[dict[str, Any]]:
    """Every line of a ledger file as a dict; a line that is not a JSON object raises LedgerError naming it."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as exc:
        raise LedgerError(f"{path}: cannot read the ledger ({exc})") from None
    entries = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            raise LedgerError(f"{path}:{number}: not a JSON ledger entry ({exc.msg})") from None
        if not isinstance(entry, dict):
            raise LedgerError(f"{path}:{number}: a ledger entry must be a JSON object")
        entries.append(entry)
    return entries


def append_lines(path: Path, entries: Iterable[dict[str, Any]]) -> None:
    """Append entries as JSON lines, then fsync (and fsync the folder when the file is new). All or nothing.

    A write that fails part-way (a full disk) is cut back to the file's length before it, so the ledger never
    keeps a torn line or some of the entries; the failure is raised as a one-line DiskError naming the file.
    """
    path = Path(path)
    data = "".join(json.dumps(e, sort_keys=True, ensure_ascii=False) + "\n" for e in entries).encode("utf-8")
    with atomic_files.writing(path):
        new = not path.exists()
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            before = os.fstat(fd).st_size
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            except OSError:
                os.ftruncate(fd, before)  # shrinking needs no space: the ledger is as it was
                os.fsync(fd)
                raise
        finally:
            os.close(fd)
        if new:
            folder = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(folder)
            finally:
                os.close(folder)


def now_utc() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass
class NodeLedger:
    """The ledger a node keeps in its state folder and signs with its organisation's key."""

    path: Path
    org: str
    key: Ed25519PrivateKey
    entries: list[dict[str, Any]]

    @classmethod
    def open(cls, state_dir: Path, org: str, key: Ed25519PrivateKey, filename: str = LEDGER_FILE) -> NodeLedger:
        """Load the node's own ledger and check it is intact and its own (a node never appends to a broken chain)."""
        path = Path(state_dir) / filename
        entries = read_entries(path)
        public = key.public_key()
        previous = genesis_hash(org)
        for position, entry in enumerate(entries, start=1):
            if entry.get("org") != org or entry.get("seq") != position or entry.get("prev_hash") != previous:
                raise LedgerError(f"{path}:{position}: the ledger chain is broken (entry {position} does not follow)")
            if not signature_valid(entry, public):
                raise LedgerError(f"{path}:{position}: the signature does not verify with this organisation's key")
            previous = entry_hash(entry)
        return cls(path, org, key, entries)

    @property
    def head(self) -> tuple[int, str]:
        """(seq, hash) of the last entry; (0, genesis) before the first."""
        if not self.entries:
            return 0, genesis_hash(self.org)
        return len(self.entries), entry_hash(self.entries[-1])

    def append(self, kind: str, server_round: int, fields: dict[str, Any]) -> dict[str, Any]:
        if kind not in KINDS:
            raise ValueError(f"ledger entry kind {kind!r}; expected one of {KINDS}")
        required = DP_FIELDS if kind in DP_KINDS else REFUSAL_FIELDS
        missing = [name for name in required if name not in fields]
        if missing:
            raise ValueError(f"{kind} ledger entry without {', '.join(missing)}")
        seq, previous = self.head
        body = {
            **{name: fields[name] for name in required},
            **{name: fields[name] for name in OPTIONAL_FIELDS.get(kind, ()) if name in fields},
            "format": FORMAT,
            "org": self.org,
            "seq": seq + 1,
            "kind": kind,
            "round": int(server_round),
            "time": now_utc(),
            "prev_hash": previous,
        }
        entry = sign(body, self.key)
        append_lines(self.path, [entry])
        self.entries.append(entry)
        return entry

    def since(self, seq: int) -> list[dict[str, Any]]:
        """Entries after ``seq`` (what the coordinator does not hold yet)."""
        return self.entries[max(0, int(seq)) :]
