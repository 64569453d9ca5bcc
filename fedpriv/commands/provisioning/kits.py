"""Writing the kits: one for the coordinator, one per organisation.

Re-running is safe: keys and certificates are only created when missing (or,
for the SuperLink certificate, when the coordinator's addresses changed), text
files only rewritten when their content changes, every file written
atomically. Everything is checked before anything is written, so a refusal
leaves the kits as they were. What the scripts and READMEs say is in
kit_templates.py; which file goes into which kit, with which mode and key, is here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedpriv.commands.provisioning import ProvisioningError, pki
from fedpriv.commands.provisioning.federation import (
    CA_KIT,
    COORDINATOR,
    RESERVED_KITS,
    FederationConfig,
    OrganisationConfig,
    parse_address,
)
from fedpriv.commands.provisioning.join import JoinRequest, load_join_request
from fedpriv.commands.provisioning.kit_templates import (
    CONNECTION_FILE,
    ca_readme,
    connection_json,
    coordinator_readme,
    enroll_nodes_sh,
    fleet_gateway_conf,
    node_yaml,
    org_readme,
    start_gateway_sh,
    start_superlink_sh,
    start_supernode_sh,
)
from fedpriv.kernel import atomic_files
from fedpriv.kernel.errors import ConfigError
from fedpriv.privacy.ledger import PUBLIC_KEY_FILE as LEDGER_PUB
from fedpriv.privacy.ledger import SIGNING_KEY_FILE as LEDGER_KEY
from fedpriv.privacy.ledger import LedgerError, load_signing_key, public_key_text
from fedpriv.privacy.ledger import load_public_key as load_ledger_public_key

PRIVATE = 0o600


def ledger_pem_private(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


PUBLIC = 0o644
SCRIPT = 0o755


@dataclass(frozen=True)
class Change:
    path: Path
    action: str  # created / updated / re-issued / permissions
    reason: str = ""


@dataclass
class Outcome:
    changes: list[Change] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- files


def write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write to a temporary file created with ``mode`` in the same folder, then rename: never a half-written key.

    A disk failure is a one-line DiskError naming ``path``; the file is then as it was.
    """
    atomic_files.write_all([(path, data, mode)])


def _existing(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ProvisioningError(f"{path}: cannot be read ({exc.strerror})") from None


# --------------------------------------------------------------------------- planning and writing


@dataclass
class _Plan:
    writes: dict[Path, tuple[bytes, int, str, str]] = field(default_factory=dict)  # path -> data, mode, action, why
    chmods: dict[Path, int] = field(default_factory=dict)
    removals: list[Path] = field(default_factory=list)

    def put(self, path: Path, data: bytes, mode: int, action: str = "", why: str = "") -> None:
        """Write ``data`` unless the file already holds it (then only fix its permissions)."""
        current = _existing(path)
        if current == data:
            if (path.stat().st_mode & 0o777) != mode:
                self.chmods[path] = mode
            return
        self.writes[path] = (data, mode, action or ("created" if current is None else "updated"), why)


def ca_key_path(out: Path) -> Path:
    """Where the CA's key is: ``coordinator-ca/ca.key``, or inside the coordinator kit where kits before 2026-12 kept it."""
    legacy = out / COORDINATOR / "ca.key"
    return legacy if legacy.exists() and not (out / CA_KIT / "ca.key").exists() else out / CA_KIT / "ca.key"


def _check_ca(out: Path, cfg: FederationConfig, org_names: list[str]):
    """Load the existing CA, or make sure there is nothing a new CA would silently split from."""
    co = out / COORDINATOR
    key_path, crt_path = ca_key_path(out), co / "ca.crt"
    if key_path.exists() and crt_path.exists():
        key = pki.require_nist_ec(key_path, pki.load_private_key(key_path, form="pem"))
        cert = pki.load_cert(crt_path)
        if not pki.same_public_key(key.public_key(), cert.public_key()):
            raise ProvisioningError(
                f"{key_path}: not the private key of {crt_path} (expected the CA key the kits were made with);"
                " refusing to touch the kits"
            )
        issued_for = cert.subject.get_attributes_for_oid(x509.NameOID.ORGANIZATION_NAME)
        if issued_for and issued_for[0].value != cfg.federation:
            raise ProvisioningError(
                f"{crt_path}: the kits in {out} belong to federation {issued_for[0].value!r},"
                f" not {cfg.federation!r}; use another --out folder"
            )
        problem = pki.validity_problem(cert)
        if problem is not None:  # every certificate it would sign, and every kit, depends on it
            expired = cert.not_valid_after_utc <= pki.now()
            raise ProvisioningError(
                f"{crt_path}: the federation CA's {problem}"
                + (
                    "; every kit trusts this CA, so it cannot be renewed in place:"
                    " provision the federation anew into an empty --out folder"
                    if expired
                    else ""
                )
            )
        return key, cert
    existing = [
        p for p in (key_path, crt_path, out / CA_KIT / "ca.crt", co / "superlink.crt", co / "nodes") if p.exists()
    ]
    existing += [out / o / "ca.crt" for o in org_names if (out / o / "ca.crt").exists()]
    if existing == [key_path]:
        # A CA key whose certificate was never written (a provision by earlier fedpriv stopped by a full disk):
        # no copy of a certificate, no SuperLink certificate and no enrolled node exists, so nothing was handed
        # out under this CA. Its certificate is issued for the same key (reported as a change); the key is
        # never replaced, so a copy of an earlier certificate that did leave would still verify.
        return pki.require_nist_ec(key_path, pki.load_private_key(key_path, form="pem")), None
    if existing:
        missing = key_path if not key_path.exists() else crt_path
        raise ProvisioningError(
            f"{missing}: missing but {existing[0]} exists; a new CA would not match the kits already handed out"
            f" (restore {missing.name}, or provision into an empty --out folder)"
        )
    return None, None


def _org_key(out: Path, org: str) -> ec.EllipticCurvePrivateKey | None:
    """The organisation's existing identity key, checked against what the coordinator enrolled."""
    key_path, enrolled = out / org / "node.key", out / COORDINATOR / "nodes" / f"{org}.pub"
    if not key_path.exists():
        if enrolled.exists():
            raise ProvisioningError(
                f"{key_path}: missing but {org} is enrolled ({enrolled}); to give it a new identity delete"
                f" {enrolled.name}, run `flwr supernode unregister` for the old node, then provision again"
            )
        return None
    key = pki.require_nist_ec(key_path, pki.load_private_key(key_path, form="openssh"))
    for pub_path in (out / org / "node.pub", enrolled):
        if pub_path.exists() and not pki.same_public_key(pki.load_public_key(pub_path), key.public_key()):
            raise ProvisioningError(
                f"{pub_path}: not the public half of {key_path} (expected the key {org} was enrolled with);"
                " refusing to touch the kits"
            )
    return key


def _ledger_key(out: Path, org: str) -> Ed25519PrivateKey | None:
    """The organisation's existing ledger signing key (never regenerated: its old ledger entries name it)."""
    key_path = out / org / LEDGER_KEY
    if not key_path.exists():
        registered = out / COORDINATOR / "ledger-keys" / f"{org}.pub"
        if registered.exists():
            raise ProvisioningError(
                f"{key_path}: missing but the coordinator holds {org}'s ledger key ({registered}); restore it"
                " (its ledger is signed with it), or delete that .pub to give the organisation a new one"
            )
        return None
    try:
        key = load_signing_key(key_path)
        for pub_path in (out / org / LEDGER_PUB, out / COORDINATOR / "ledger-keys" / f"{org}.pub"):
            if pub_path.exists() and not pki.same_public_key(load_ledger_public_key(pub_path), key.public_key()):
                raise ProvisioningError(
                    f"{pub_path}: not the public half of {key_path} (expected the key {org}'s ledger is signed with);"
                    " refusing to touch the kits"
                )
    except LedgerError as exc:
        raise ProvisioningError(str(exc)) from None
    return key


def _requested_keys(out: Path, cfg: FederationConfig, org: OrganisationConfig) -> JoinRequest:
    """The organisation's own public keys, from its join request, checked against what the coordinator holds."""
    request = load_join_request(org.join_request, org.name, cfg.federation)
    kit = out / org.name
    for private in (kit / "node.key", kit / LEDGER_KEY):
        if private.exists():
            raise ProvisioningError(
                f"{private}: a private key of {org.name} on the coordinator's side, while its join request brings"
                " its own keys; delete it (and never send it): only the organisation may hold its private keys"
            )
    for held, requested, what in (
        (out / COORDINATOR / "nodes" / f"{org.name}.pub", request.node_key(), "SuperNode key"),
        (out / COORDINATOR / "ledger-keys" / f"{org.name}.pub", request.ledger_key(), "ledger key"),
    ):
        if held.exists():
            current = pki.load_public_key(held) if held.parent.name == "nodes" else _ledger_pub(held)
            if not pki.same_public_key(current, requested):
                raise ProvisioningError(
                    f"{request.path}: another {what} than the one {org.name} is enrolled with ({held}); to change"
                    f" an organisation's identity, confirm it with them, delete {held.name}"
                    + (" and run `flwr supernode unregister` for the old node," if what == "SuperNode key" else ",")
                    + " then provision again"
                )
    return request


def _ledger_pub(path: Path):
    try:
        return load_ledger_public_key(path)
    except LedgerError as exc:
        raise ProvisioningError(str(exc)) from None


def _approved_apps(cfg: FederationConfig) -> list[str]:
    """The FAB digests the kits approve: the app folder's (built as `flwr run` builds it) and those given."""
    from fedpriv.commands.app_source import fab_sha256

    digests = []
    if cfg.app.path:
        folder = Path(cfg.app.path)
        if not (folder / "pyproject.toml").is_file() and not folder.is_file():
            raise ConfigError(f"app.path: {folder}: expected a Flower app folder (with pyproject.toml) or a .fab file")
        try:
            digests.append(fab_sha256(folder))
        except (ValueError, OSError) as exc:
            raise ConfigError(f"app.path: {folder}: not a Flower app that `flwr run` can build ({exc})") from None
    digests += [d for d in cfg.app.fab_sha256 if d not in digests]
    return digests


def _server_reasons(out: Path, cfg: FederationConfig, ca_cert, server_key) -> tuple[list[str], bool]:
    """Why the SuperLink certificate must be (re-)issued (empty: keep it), and whether its addresses changed."""
    path = out / COORDINATOR / "superlink.crt"
    if not path.exists():
        return ["new"], False
    cert = pki.load_cert(path)
    if not pki.signed_by(cert, ca_cert):
        raise ProvisioningError(
            f"{path}: not signed by {out / COORDINATOR / 'ca.crt'} (expected a certificate issued by this"
            f" federation's CA); refusing to touch the kits: if ca.crt is right, delete {path.name} to have it re-issued"
        )
    if cert.not_valid_before_utc > pki.now():  # a clock problem, or not our certificate: a person should look
        raise ProvisioningError(f"{path}: {pki.validity_problem(cert)}; or delete {path.name} to have it re-issued")
    reasons, changed = [], False
    have, want = set(pki.san_strings(cert)), {str(parse_address(a)) for a in cfg.san_addresses}
    if have != want:
        added, removed = sorted(want - have), sorted(have - want)
        parts = ([f"added {', '.join(added)}"] if added else []) + (
            [f"removed {', '.join(removed)}"] if removed else []
        )
        reasons.append("coordinator addresses changed: " + "; ".join(parts))
        changed = True
    if server_key is None or not pki.same_public_key(server_key.public_key(), cert.public_key()):
        reasons.append("superlink.key does not match it")
    if cert.not_valid_after_utc <= pki.now():
        reasons.append("it expired")
    if not reasons:  # kept as it is, so it must be what the SuperNodes' TLS accepts (a hand-made one may not be)
        problems = pki.verify_server(cert, ca_cert, cfg.san_addresses)
        if problems:
            raise ProvisioningError(
                f"{path}: signed by ca.crt, but a TLS client trusting ca.crt would refuse it ({problems[0]});"
                f" refusing to touch the kits: delete {path.name} to have it re-issued"
            )
    return reasons, changed


def provision(
    cfg: FederationConfig,
    out: str | Path,
    add_org: str | None = None,
    make_org_keys: bool = False,
    approved_apps: list[str] | None = None,
) -> Outcome:
    """Create or bring up to date the kits under ``out``; with ``add_org`` touch only what enrols that organisation.

    An organisation's keys come from its join request (``join_request`` in the federation file). Only with
    ``make_org_keys`` (a try-out on one machine: ``fedpriv federation up``) are they made here, and then whoever
    holds these kits can act as that organisation. ``approved_apps`` replaces the federation file's ``app``.
    """
    out = Path(out)
    outcome = Outcome()
    names = [o.name for o in cfg.organisations]
    if add_org is not None and cfg.org(add_org) is None:
        raise ConfigError(f"--add-org {add_org}: not in the federation file (organisations: {', '.join(names)})")
    if out.exists() and not out.is_dir():
        raise ProvisioningError(f"{out}: not a folder")
    co = out / COORDINATOR

    # ---- checks first: a refusal must leave everything as it was
    ca_key, ca_cert = _check_ca(out, cfg, names)
    if add_org is not None and ca_cert is None:
        raise ProvisioningError(f"{co / 'ca.crt'}: no coordinator kit in {out} yet; run `fedpriv provision` first")
    if ca_cert is not None:
        for name in names:
            org_ca = out / name / "ca.crt"
            if org_ca.exists() and pki.load_cert(org_ca) != ca_cert:
                raise ProvisioningError(
                    f"{org_ca}: not this federation's CA (expected a copy of {co / 'ca.crt'}); refusing to mix kits"
                )
    todo = [cfg.org(add_org)] if add_org is not None else list(cfg.organisations)
    requests: dict[str, JoinRequest] = {}
    for i, org in enumerate(cfg.organisations):
        if org not in todo:
            continue
        if org.join_request:
            requests[org.name] = _requested_keys(out, cfg, org)
        elif not make_org_keys:
            raise ConfigError(
                f"organisations[{i}].join_request: required for {org.name} (its public keys, from `fedpriv org init"
                f" {org.name}` on its own machine); --make-org-keys makes its private keys here instead, for a"
                " try-out only: whoever holds these kits could then act as that organisation"
            )
    org_keys = {o.name: _org_key(out, o.name) for o in todo if o.name not in requests}
    apps = _approved_apps(cfg) if approved_apps is None else list(approved_apps)
    if not apps:
        outcome.notes.append(
            "no app declared (app.path or app.fab_sha256 in the federation file): the organisations' node.yaml"
            " approve none, and every node refuses every run until its organisation approves one"
        )

    plan = _Plan()
    ca_key_file = out / CA_KIT / "ca.key"
    ca_why = ""
    if ca_cert is None and ca_key is not None:  # _check_ca found a CA key alone: its certificate is finished
        ca_cert = pki.issue_ca(cfg.federation, ca_key, cfg.validity_days.ca)
        ca_why = f"issued for the existing {ca_key_path(out)}: an earlier provision stopped before writing it"
        if ca_key_path(out) != ca_key_file:
            plan.put(ca_key_file, ca_key_path(out).read_bytes(), PRIVATE, "created", f"moved from {ca_key_path(out)}")
            plan.removals.append(ca_key_path(out))
        else:
            plan.put(ca_key_file, ca_key_file.read_bytes(), PRIVATE)  # permissions only
    elif ca_cert is None:
        ca_key = pki.new_key()
        ca_cert = pki.issue_ca(cfg.federation, ca_key, cfg.validity_days.ca)
        plan.put(ca_key_file, pki.pem_private(ca_key), PRIVATE)
    elif ca_key_path(out) != ca_key_file:  # kept inside the coordinator kit by earlier fedpriv: moved out of it
        plan.put(ca_key_file, ca_key_path(out).read_bytes(), PRIVATE, "created", f"moved from {ca_key_path(out)}")
        plan.removals.append(ca_key_path(out))
    else:
        plan.put(ca_key_file, ca_key_file.read_bytes(), PRIVATE)  # permissions only
    ca_pem = pki.cert_pem(ca_cert)
    plan.put(co / "ca.crt", ca_pem, PUBLIC, why=ca_why)
    plan.put(out / CA_KIT / "ca.crt", ca_pem, PUBLIC, why=ca_why)
    plan.put(out / CA_KIT / "README.txt", ca_readme(cfg).encode(), PUBLIC)

    server_key_path = co / "superlink.key"
    server_key = (
        pki.require_nist_ec(server_key_path, pki.load_private_key(server_key_path, form="pem"))
        if server_key_path.exists()
        else None
    )
    reasons, addresses_changed = _server_reasons(out, cfg, ca_cert, server_key)
    if reasons and add_org is not None and reasons != ["new"]:
        outcome.notes.append(
            f"{co / 'superlink.crt'} left as is with --add-org ({'; '.join(reasons)}); run without --add-org to re-issue it"
        )
    elif reasons:
        if server_key is None:
            server_key = pki.new_key()
            plan.put(server_key_path, pki.pem_private(server_key), PRIVATE)
        server_cert = pki.issue_server(
            cfg.federation, cfg.san_addresses, server_key, ca_cert, ca_key, cfg.validity_days.server
        )
        why = "" if reasons == ["new"] else "; ".join(reasons)
        plan.put(co / "superlink.crt", pki.cert_pem(server_cert), PUBLIC, "created" if why == "" else "re-issued", why)
        if addresses_changed:
            outcome.notes.append(
                "only the SuperLink certificate was re-issued; restart the SuperLink (./start-superlink.sh)"
                + (" and send the organisations their updated start-supernode.sh" if add_org is None else "")
            )
    else:
        plan.put(server_key_path, server_key_path.read_bytes(), PRIVATE)  # permissions only

    for org in todo:
        kit = out / org.name
        request = requests.get(org.name)
        if request is not None:  # the organisation's own keys: only their public halves ever reach this side
            pub = (request.node_public_key + "\n").encode()
            ledger_pub = public_key_text(request.ledger_key()).encode()
        else:  # made here (--make-org-keys, a try-out): this side holds the organisation's private keys
            key = org_keys[org.name]
            if key is None:
                key = pki.new_key()
                plan.put(kit / "node.key", pki.ssh_private(key), PRIVATE)
            else:
                plan.put(kit / "node.key", (kit / "node.key").read_bytes(), PRIVATE)  # permissions only
            pub = pki.ssh_public(key.public_key(), f"{org.name}@{cfg.federation}")
            ledger_key = _ledger_key(out, org.name)
            if ledger_key is None:
                ledger_key = Ed25519PrivateKey.generate()
                plan.put(kit / LEDGER_KEY, ledger_pem_private(ledger_key), PRIVATE)
            else:
                plan.put(kit / LEDGER_KEY, (kit / LEDGER_KEY).read_bytes(), PRIVATE)  # permissions only
            ledger_pub = public_key_text(ledger_key.public_key()).encode()
            if not (kit / "node.key").exists():
                outcome.notes.append(
                    f"{org.name}: its node and ledger keys were made here (--make-org-keys): whoever holds {out}"
                    " can act as its node and sign its ledger; a real federation provisions from join requests"
                )
        plan.put(kit / "node.pub", pub, PUBLIC)
        plan.put(co / "nodes" / f"{org.name}.pub", pub, PUBLIC)
        plan.put(kit / "ca.crt", ca_pem, PUBLIC)
        plan.put(kit / LEDGER_PUB, ledger_pub, PUBLIC)
        plan.put(co / "ledger-keys" / f"{org.name}.pub", ledger_pub, PUBLIC)  # what an auditor checks against
        _own_settings(plan, outcome, kit / "node.yaml", node_yaml(cfg, org, apps).encode())
        plan.put(kit / "README.txt", org_readme(cfg, org, own_keys=request is not None).encode(), PUBLIC)
        plan.put(
            kit / "start-supernode.sh", start_supernode_sh(cfg.federation, cfg.dial_address, org.name).encode(), SCRIPT
        )
        plan.put(kit / CONNECTION_FILE, connection_json(cfg, org).encode(), PUBLIC)

    enrolled = [n for n in names if (co / "nodes" / f"{n}.pub") in plan.writes or (co / "nodes" / f"{n}.pub").exists()]
    if add_org is None:
        plan.put(co / "start-superlink.sh", start_superlink_sh(cfg).encode(), SCRIPT)
        if cfg.coordinator.gateway == "nginx":
            plan.put(co / "fleet-gateway.conf", fleet_gateway_conf(cfg).encode(), PUBLIC)
            plan.put(co / "start-gateway.sh", start_gateway_sh(cfg).encode(), SCRIPT)
    plan.put(co / "enroll-nodes.sh", enroll_nodes_sh(cfg, enrolled).encode(), SCRIPT)
    plan.put(co / "README.txt", coordinator_readme(cfg, enrolled).encode(), PUBLIC)

    if out.is_dir():
        for child in sorted(out.iterdir()):
            if child.is_dir() and child.name not in RESERVED_KITS and child.name not in names:
                outcome.notes.append(f"{child}: not in the federation file, left as is")

    # ---- write, as one change: every file is written aside first, then all are renamed into place (keys before
    # the certificates and scripts that refer to them). A full disk or a read-only folder stops it before the
    # renames: the kits are as they were (never a CA key without its certificate), and a later run starts over.
    ordered = sorted(plan.writes.items(), key=lambda kv: _order(kv[0]))
    atomic_files.write_all([(path, data, mode) for path, (data, mode, _, _) in ordered])
    outcome.changes += [Change(path, action, why) for path, (_, _, action, why) in ordered]
    for path, mode in plan.chmods.items():
        with atomic_files.writing(path):
            os.chmod(path, mode)
        outcome.changes.append(Change(path, "permissions", f"set to {mode:o}"))
    for path in plan.removals:  # only once what replaces them is written
        with atomic_files.writing(path):
            path.unlink()
        outcome.changes.append(Change(path, "removed", f"moved to {out / CA_KIT}/"))
    return outcome


def _own_settings(plan: _Plan, outcome: Outcome, path: Path, proposed: bytes) -> None:
    """node.yaml is the organisation's: written once; afterwards a different proposal goes beside it, never over it."""
    current = _existing(path)
    if current is None:
        plan.put(path, proposed, PUBLIC)
        return
    if current == proposed:
        if (path.stat().st_mode & 0o777) != PUBLIC:
            plan.chmods[path] = PUBLIC
        return
    aside = path.with_name(path.name + ".new")
    if _existing(aside) != proposed:
        plan.put(aside, proposed, PUBLIC)
    outcome.notes.append(
        f"{path}: kept as the organisation set it; what the federation file and app say now is in {aside.name}"
        " (the organisation compares and decides: the coordinator never changes its privacy limits)"
    )


def _order(path: Path) -> tuple[int, str]:
    rank = {".key": 0, ".pub": 1, ".crt": 2}.get(path.suffix, 3)
    return rank, str(path)
