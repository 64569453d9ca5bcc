"""An organisation's side of provisioning: its keys made on its own machine, a join request, the reply taken in.

``fedpriv org init ORG --kit DIR`` makes the organisation's SuperNode key and
ledger signing key where they will be used (private halves mode 0600, never
sent anywhere) and a join request holding only the public halves and the
organisation's name. The coordinator provisions from the join request; what it
sends back (``kits/ORG/``) holds no private key, and ``fedpriv org accept
REPLY --kit DIR`` takes it in: it checks that the reply names this kit's own
keys, pins the federation's CA on first use, and never replaces the
organisation's own ``node.yaml`` (a different proposal is written beside it as
``node.yaml.new``).

So nobody on the coordinator's side can act as the organisation's node or sign
its privacy ledger.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedpriv.commands.provisioning import ProvisioningError, pki
from fedpriv.commands.provisioning.federation import RESERVED_KITS
from fedpriv.kernel.key_files import key_type
from fedpriv.kernel.node_config import ORG_NAME
from fedpriv.privacy.ledger import PUBLIC_KEY_FILE as LEDGER_PUB
from fedpriv.privacy.ledger import SIGNING_KEY_FILE as LEDGER_KEY
from fedpriv.privacy.ledger import LedgerError, key_fingerprint, load_signing_key, public_key_text
from fedpriv.privacy.ledger import load_public_key as load_ledger_public_key

FORMAT = "fedpriv-join-request/1"
REQUEST_FILE = "join-request.json"
NODE_KEY, NODE_PUB = "node.key", "node.pub"
PRIVATE, PUBLIC, SCRIPT = 0o600, 0o644, 0o755
PRIVATE_MARK = "PRIVATE KEY"  # in every PEM / OpenSSH private key's armour
# what a coordinator's reply may hold, and how each is taken into the organisation's kit
REPLY_FILES = {"ca.crt": PUBLIC, NODE_PUB: PUBLIC, LEDGER_PUB: PUBLIC, "README.txt": PUBLIC}
CONNECTION_FILE = "federation.json"  # the federation's name and the address to dial (kit_templates.connection_json)
START_SCRIPT = "start-supernode.sh"  # written here from fedpriv's own template: no code from the reply runs
NODE_YAML = "node.yaml"


@dataclass(frozen=True)
class JoinRequest:
    """What an organisation sends the coordinator: its name and the public halves of its two keys."""

    org: str
    federation: str
    node_public_key: str  # OpenSSH line, EC on a NIST curve (what `flwr supernode register` reads)
    ledger_public_key: str  # PEM, Ed25519 (what its ledger entries are signed with)
    path: Path | None = None

    def node_key(self):
        return serialization.load_ssh_public_key(self.node_public_key.encode())

    def ledger_key(self) -> Ed25519PublicKey:
        return load_ledger_public_key(self.ledger_public_key)

    def fingerprints(self) -> dict[str, str]:
        """What the organisation reads to the coordinator over another channel (phone, signed mail)."""
        return {"node": pki.ssh_fingerprint(self.node_key()), "ledger": key_fingerprint(self.ledger_key())}

    def to_json(self) -> str:
        body = {
            "format": FORMAT,
            "org": self.org,
            "federation": self.federation,
            "node_public_key": self.node_public_key,
            "ledger_public_key": self.ledger_public_key,
            "fingerprints": self.fingerprints(),
        }
        return json.dumps(body, indent=2) + "\n"


def _bad(path: Path, what: str) -> ProvisioningError:
    return ProvisioningError(f"{path}: {what}")


def load_join_request(path: str | Path, org: str | None = None, federation: str | None = None) -> JoinRequest:
    """Read and check a join request; every problem is one line naming the file and the field."""
    path = Path(path)
    expected = f"a join request (JSON, format {FORMAT!r}, written by `fedpriv org init`)"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise _bad(path, f"missing; expected {expected}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise _bad(path, f"cannot be read ({getattr(exc, 'strerror', None) or exc.__class__.__name__})") from None
    if PRIVATE_MARK in text:
        raise _bad(
            path,
            "holds a private key; a join request carries public keys only. The organisation must treat that key"
            " as disclosed and make new ones with `fedpriv org init`",
        )
    try:
        raw = json.loads(text)
    except ValueError as exc:
        raise _bad(path, f"expected {expected}; not JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        got = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
        raise _bad(path, f"format: expected {FORMAT!r}, got {got!r}")
    for key in ("org", "federation", "node_public_key", "ledger_public_key"):
        if not isinstance(raw.get(key), str):
            raise _bad(path, f"{key}: expected a string, got {raw.get(key)!r}")
    if not ORG_NAME.fullmatch(raw["org"]):
        raise _bad(path, f"org: expected a name of letters, digits, '.', '_' or '-' (at most 64), got {raw['org']!r}")
    if org is not None and raw["org"] != org:
        raise _bad(path, f"org: the request names {raw['org']!r}, expected {org!r} (the federation file's name for it)")
    if federation is not None and raw["federation"] and raw["federation"] != federation:
        raise _bad(path, f"federation: the request is for {raw['federation']!r}, not {federation!r}")
    request = JoinRequest(raw["org"], raw["federation"], raw["node_public_key"].strip(), raw["ledger_public_key"], path)
    try:
        node_key = request.node_key()
    except (ValueError, UnsupportedAlgorithm):
        raise _bad(path, "node_public_key: expected an OpenSSH public key line (ecdsa-sha2-nistp384 ...)") from None
    if not pki.is_nist_ec(node_key):
        raise _bad(path, f"node_public_key: expected an EC key on a NIST curve; found {key_type(node_key)}")
    try:
        request.ledger_key()
    except LedgerError as exc:
        raise _bad(path, f"ledger_public_key: {str(exc).split(': ', 1)[-1]}") from None
    return request


# --------------------------------------------------------------------------- the organisation's machine


@dataclass
class InitOutcome:
    request: JoinRequest
    request_path: Path
    created: list[Path] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)


def init_org(org: str, kit: str | Path, federation: str = "") -> InitOutcome:
    """Make (or keep) the organisation's two key pairs in ``kit`` and write its join request there."""
    from fedpriv.commands.provisioning.kits import ledger_pem_private, write_atomic

    kit = Path(kit)
    if not ORG_NAME.fullmatch(org) or org.lower() in RESERVED_KITS:
        raise ProvisioningError(
            f"ORG: expected a name of letters, digits, '.', '_' or '-' (at most 64, not {' or '.join(RESERVED_KITS)}),"
            f" got {org!r}"
        )
    if kit.exists() and not kit.is_dir():
        raise ProvisioningError(f"{kit}: not a folder")
    created, kept = [], []
    node_path, ledger_path = kit / NODE_KEY, kit / LEDGER_KEY
    if node_path.exists():
        node_key = pki.require_nist_ec(node_path, pki.load_private_key(node_path, form="openssh"))
        kept.append(node_path)
    else:
        node_key = pki.new_key()
        write_atomic(node_path, pki.ssh_private(node_key), PRIVATE)
        created.append(node_path)
    if ledger_path.exists():
        try:
            ledger_key = load_signing_key(ledger_path)
        except LedgerError as exc:
            raise ProvisioningError(str(exc)) from None
        kept.append(ledger_path)
    else:
        ledger_key = Ed25519PrivateKey.generate()
        write_atomic(ledger_path, ledger_pem_private(ledger_key), PRIVATE)
        created.append(ledger_path)
    node_pub = pki.ssh_public(node_key.public_key(), f"{org}@{federation or 'fedpriv'}")
    ledger_pub = public_key_text(ledger_key.public_key())
    for path, data in ((kit / NODE_PUB, node_pub), (kit / LEDGER_PUB, ledger_pub.encode())):
        write_atomic(path, data, PUBLIC)
    request = JoinRequest(org, federation, node_pub.decode().strip(), ledger_pub)
    request_path = kit / REQUEST_FILE
    write_atomic(request_path, request.to_json().encode(), PUBLIC)
    return InitOutcome(request, request_path, created, kept)


@dataclass
class AcceptOutcome:
    written: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def accept_reply(reply: str | Path, kit: str | Path) -> AcceptOutcome:
    """Take the coordinator's reply for this organisation into its kit, after checking it against the kit's keys.

    Refused (nothing written): a reply holding any private key, public keys that are not this kit's own, or a CA
    other than the one the kit already trusts. The organisation's own node.yaml is never replaced.
    """
    from fedpriv.commands.provisioning.kit_templates import start_supernode_sh
    from fedpriv.kernel.atomic_files import write_all

    reply, kit = Path(reply), Path(kit)
    if not reply.is_dir():
        raise ProvisioningError(f"{reply}: not a folder (expected the coordinator's kit for this organisation)")
    for path in sorted(reply.rglob("*")):
        if path.is_file() and PRIVATE_MARK.encode() in path.read_bytes():
            raise ProvisioningError(
                f"{path}: holds a private key; a coordinator's reply must not (its keys were made by somebody"
                " else): refuse this kit and ask the coordinator to provision from your join request"
            )
    for name in (*REPLY_FILES, CONNECTION_FILE):
        if not (reply / name).is_file():
            raise ProvisioningError(f"{reply / name}: missing (expected in the coordinator's reply)")
    org = _own_org(kit)
    federation, dial = _connection(reply / CONNECTION_FILE, org)
    for key_name in (NODE_KEY, LEDGER_KEY):
        if not (kit / key_name).is_file():
            raise ProvisioningError(f"{kit / key_name}: missing; run `fedpriv org init ORG --kit {kit}` first")
    node_key = pki.require_nist_ec(kit / NODE_KEY, pki.load_private_key(kit / NODE_KEY, form="openssh"))
    if not pki.same_public_key(pki.load_public_key(reply / NODE_PUB), node_key.public_key()):
        raise ProvisioningError(
            f"{reply / NODE_PUB}: not the public half of {kit / NODE_KEY}; the coordinator enrolled another key"
            " for you: refuse this kit"
        )
    try:
        ledger_key = load_signing_key(kit / LEDGER_KEY)
        same_ledger = pki.same_public_key(load_ledger_public_key(reply / LEDGER_PUB), ledger_key.public_key())
    except LedgerError as exc:
        raise ProvisioningError(str(exc)) from None
    if not same_ledger:
        raise ProvisioningError(
            f"{reply / LEDGER_PUB}: not the public half of {kit / LEDGER_KEY}; auditors would check your ledger"
            " against another key: refuse this kit"
        )
    new_ca = pki.load_cert(reply / "ca.crt")
    if (kit / "ca.crt").exists() and pki.load_cert(kit / "ca.crt") != new_ca:
        raise ProvisioningError(
            f"{reply / 'ca.crt'}: not the CA {kit / 'ca.crt'} already trusts (fingerprint"
            f" {pki.fingerprint((kit / 'ca.crt').read_bytes())}); confirm the change with the coordinator over"
            " another channel, then delete the old ca.crt to accept it"
        )
    outcome = AcceptOutcome()
    plan: list[tuple[Path, bytes, int]] = []
    for name, mode in REPLY_FILES.items():
        plan.append((kit / name, (reply / name).read_bytes(), mode))
    script = start_supernode_sh(federation, dial, org).encode()
    plan.append((kit / START_SCRIPT, script, SCRIPT))
    if (reply / NODE_YAML).is_file():
        proposed = (reply / NODE_YAML).read_bytes()
        own = kit / NODE_YAML
        if not own.exists():
            plan.append((own, proposed, PUBLIC))
            outcome.notes.append(f"{own}: the coordinator's proposal, now yours: {_summary(reply / NODE_YAML)}")
        elif own.read_bytes() != proposed:
            plan.append((kit / (NODE_YAML + ".new"), proposed, PUBLIC))
            outcome.notes.append(
                f"{own}: kept (your own settings); the coordinator's proposal is in {NODE_YAML}.new: compare, and"
                " copy over only what you agree with (approved_apps, privacy limits, data)"
            )
    if (reply / START_SCRIPT).is_file() and (reply / START_SCRIPT).read_bytes() != script:
        outcome.notes.append(
            f"{reply / START_SCRIPT}: not used (it differs from fedpriv's own template; {kit / START_SCRIPT} was"
            " written from the template, with the address in federation.json)"
        )
    changed = [
        (path, data, mode) for path, data, mode in plan if (path.read_bytes() if path.exists() else None) != data
    ]
    write_all(changed)  # one change: a full disk leaves the kit as it was (the CA pinned with the rest, or not)
    outcome.written += [path for path, _, _ in changed]
    return outcome


def _own_org(kit: Path) -> str:
    """The organisation this kit belongs to, from the join request `fedpriv org init` wrote there."""
    try:
        return str(json.loads((kit / REQUEST_FILE).read_text(encoding="utf-8"))["org"])
    except (OSError, ValueError, KeyError, TypeError):
        raise ProvisioningError(
            f"{kit / REQUEST_FILE}: missing or unreadable; run `fedpriv org init ORG --kit {kit}` first"
        ) from None


def _connection(path: Path, org: str) -> tuple[str, str]:
    """The federation's name and the coordinator's host:port, checked: they go into a shell script."""
    from fedpriv.commands.provisioning.federation import parse_address

    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ProvisioningError(f"{path}: expected the coordinator's federation.json ({exc})") from None
    if not isinstance(raw, dict) or raw.get("format") != "fedpriv-connection/1":
        raise ProvisioningError(f"{path}: format: expected 'fedpriv-connection/1'")
    federation, dial = raw.get("federation"), raw.get("dial")
    if not isinstance(federation, str) or not ORG_NAME.fullmatch(federation):
        raise ProvisioningError(f"{path}: federation: expected a name of letters, digits, '.', '_' or '-'")
    if raw.get("org") != org:
        raise ProvisioningError(f"{path}: org: the reply is for {raw.get('org')!r}, this kit is {org!r}'s")
    host, _, port = (dial or "").rpartition(":") if isinstance(dial, str) else ("", "", "")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if parse_address(host) is None or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ProvisioningError(f"{path}: dial: expected HOST:PORT (a DNS name or IP address), got {dial!r}")
    return federation, dial


def _summary(node_yaml: Path) -> str:
    """What an organisation must check in a proposal it adopts: its limits, data and the apps it would run."""
    try:
        from fedpriv.kernel.node_config import load_node_config

        node = load_node_config(node_yaml)
    except Exception as exc:  # noqa: BLE001 - a proposal that does not load is reported, the node refuses it later
        return f"it does not load ({exc})"
    privacy = node.privacy
    return (
        f"target_epsilon {privacy.target_epsilon}, delta {privacy.delta}, max_epsilon {privacy.budget},"
        f" data {node.data.path}, approved_apps {', '.join(node.approved_apps) or 'none'}: check them"
    )
