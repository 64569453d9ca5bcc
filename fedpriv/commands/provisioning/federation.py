"""FEDERATION.yaml: the one place it is parsed and validated, into frozen dataclasses.

It reuses :mod:`fedpriv.kernel.typed_yaml` (and the run schema's data and redaction sections), so mistakes read like every other
config mistake: one line naming the file and the key.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedpriv.kernel.config import DEVICE_CHECK, DataConfig, RedactionConfig, check_data_columns
from fedpriv.kernel.errors import ConfigError
from fedpriv.kernel.node_config import ORG_NAME, SHA256_HEX, NodePrivacyConfig
from fedpriv.kernel.typed_yaml import build_dataclass, field_check, read_yaml, shown

_DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
LOOPBACK = ("127.0.0.1", "localhost")
IN_MEMORY_DATABASE = ":flwr-in-memory:"
GATEWAYS = ("nginx", "none")  # flower-superlink's name for state kept in the process (its default)


def parse_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | str | None:
    """An IP address object, a lower-case DNS name, or None when ``text`` is neither."""
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        pass
    name = text.rstrip(".").lower()
    if not name or len(name) > 253 or re.fullmatch(r"[0-9.]+", name):
        return None  # '10.0.0' or '999.1.1.1' are typos of IPs, not host names
    if all(_DNS_LABEL.fullmatch(label) for label in name.split(".")):
        return name
    return None


COORDINATOR = "coordinator"
CA_KIT = "coordinator-ca"  # the CA's private key, apart from everything the SuperLink and its ServerApps can read
RESERVED_KITS = (COORDINATOR, CA_KIT)  # kit folders that are not organisations


def _is_loopback(text: str) -> bool:
    parsed = parse_address(text)
    return parsed == "localhost" or (not isinstance(parsed, str) and parsed is not None and parsed.is_loopback)


def _addresses_ok(values: list[str]) -> bool:
    return bool(values) and all(parse_address(v) is not None for v in values)


@dataclass(frozen=True)
class CoordinatorConfig:
    """Where the SuperLink runs. ``addresses`` become the certificate's SANs; SuperNodes dial the first one."""

    addresses: list[str] = field(
        default_factory=list, metadata=field_check(_addresses_ok, "a non-empty list of DNS names and/or IP addresses")
    )
    port: int = field(default=9092, metadata=field_check(lambda v: 1 <= v <= 65535, "an integer in [1, 65535]"))
    bind_host: str = field(
        default="0.0.0.0",
        metadata=field_check(
            lambda v: isinstance(parse_address(v), (ipaddress.IPv4Address, ipaddress.IPv6Address)), "an IP address"
        ),
    )
    # an SQLite file (relative: inside the coordinator kit), kept across SuperLink restarts with the enrolled
    # node keys; or IN_MEMORY_DATABASE: faster rounds, but every restart needs ./enroll-nodes.sh again
    database: str = field(
        default="state/superlink.db",
        metadata=field_check(lambda v: bool(v.strip()), f"a file path or {IN_MEMORY_DATABASE!r}"),
    )
    # Flower 1.41 has no separate Control API address (see _cross_checks): the key is accepted only to refuse it clearly
    control_address: str | None = None
    # what the organisations reach at bind_host:port. "nginx" (the default): a TLS reverse proxy that forwards
    # only what a SuperNode needs (the Fleet API and /health) to the SuperLink, which listens on 127.0.0.1:local_port
    # only, so registering nodes and submitting, listing or stopping runs stay on the coordinator host. "none":
    # the SuperLink itself on port (every API: Fleet, Control, Runtime), only for a coordinator on loopback
    gateway: str = field(
        default="nginx", metadata=field_check(lambda v: v in GATEWAYS, f"one of {', '.join(GATEWAYS)}")
    )
    local_port: int = field(default=9093, metadata=field_check(lambda v: 1 <= v <= 65535, "an integer in [1, 65535]"))

    @property
    def database_in_memory(self) -> bool:
        return self.database == IN_MEMORY_DATABASE


@dataclass(frozen=True)
class ValidityDays:
    ca: int = field(default=1825, metadata=field_check(lambda v: v > 0, "an integer > 0 (days)"))
    server: int = field(default=397, metadata=field_check(lambda v: v > 0, "an integer > 0 (days)"))


@dataclass(frozen=True)
class AppConfig:
    """The Flower app the coordinator will run: every organisation's kit is written to approve it (and only it).

    ``path``: an app folder, hashed as ``flwr run`` builds it (its FAB's SHA-256); ``fab_sha256``: hashes given
    as they are (a FAB published elsewhere). Each organisation's node.yaml lists what its node accepts.
    """

    path: str = ""
    fab_sha256: list[str] = field(
        default_factory=list,
        metadata=field_check(
            lambda v: all(SHA256_HEX.fullmatch(h) for h in v), "a list of SHA-256 hex digests (64 0-9a-f)"
        ),
    )


@dataclass(frozen=True)
class OrganisationConfig:
    """One organisation: what goes into its kit's node.yaml (its own data, budget and device)."""

    name: str = ""
    contact: str = ""
    device: str = field(default="auto", metadata=DEVICE_CHECK)
    privacy: NodePrivacyConfig = field(default_factory=NodePrivacyConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(source="file"))
    state_dir: str = "state"
    # on in every kit unless the federation file turns it off for this organisation
    redaction: RedactionConfig = field(default_factory=lambda: RedactionConfig(enabled=True))
    # the organisation's join request (`fedpriv org init` on its own machine): its public keys, so that no private
    # key of it is ever made or held on the coordinator's side (relative paths: relative to the federation file)
    join_request: str = ""


@dataclass(frozen=True)
class FederationConfig:
    federation: str = ""
    coordinator: CoordinatorConfig = field(default_factory=CoordinatorConfig)
    validity_days: ValidityDays = field(default_factory=ValidityDays)
    app: AppConfig = field(default_factory=AppConfig)
    organisations: list[OrganisationConfig] = field(default_factory=list)

    def org(self, name: str) -> OrganisationConfig | None:
        return next((o for o in self.organisations if o.name == name), None)

    @property
    def san_addresses(self) -> list[str]:
        """The coordinator's addresses plus loopback, normalised and de-duplicated, in order.

        Loopback is always included: with ``--host 0.0.0.0`` the SuperLink's own
        SuperExec dials 127.0.0.1 with TLS and checks the certificate against it.
        """
        seen: list[str] = []
        for text in [*self.coordinator.addresses, *LOOPBACK]:
            normalised = str(parse_address(text))
            if normalised not in seen:
                seen.append(normalised)
        return seen

    @property
    def dial_address(self) -> str:
        """host:port the SuperNodes dial (the first coordinator address)."""
        host = str(parse_address(self.coordinator.addresses[0]))
        return f"[{host}]:{self.coordinator.port}" if ":" in host else f"{host}:{self.coordinator.port}"

    @property
    def superlink_port(self) -> int:
        """The SuperLink's own port: loopback only behind the gateway, the public port without one."""
        return self.coordinator.port if self.coordinator.gateway == "none" else self.coordinator.local_port

    @property
    def local_address(self) -> str:
        """host:port the coordinator's own ``flwr`` CLI dials (loopback is always in the certificate)."""
        return f"127.0.0.1:{self.superlink_port}"


def _prepare(raw: dict[str, Any]) -> dict[str, Any]:
    """Organisations' data is always their own file, as in node.yaml."""
    orgs = raw.get("organisations")
    if isinstance(orgs, list):
        prepared = []
        for org in orgs:
            if isinstance(org, dict) and isinstance(org.get("data"), dict):
                org = dict(org, data={"source": "file", **org["data"]})
            if isinstance(org, dict) and isinstance(org.get("redaction"), dict):
                org = dict(org, redaction={"enabled": True, **org["redaction"]})  # on unless turned off
            prepared.append(org)
        raw = dict(raw, organisations=prepared)
    return raw


def _cross_checks(cfg: FederationConfig) -> None:
    if not ORG_NAME.fullmatch(cfg.federation):
        raise ConfigError(
            f"federation: expected a name of letters, digits, '.', '_' or '-' (at most 64), got {cfg.federation!r}"
        )
    if not cfg.coordinator.addresses:
        raise ConfigError("coordinator.addresses: required (the DNS names and/or IPs SuperNodes dial)")
    if cfg.coordinator.control_address is not None:
        raise ConfigError(
            "coordinator.control_address: Flower 1.41 serves the Control API on the Fleet port"
            " (--control-api-address is deprecated and ignored); remove the key: the kits keep the SuperLink on"
            " 127.0.0.1:local_port and put a gateway that serves only the Fleet API on port (gateway: nginx)"
        )
    co = cfg.coordinator
    if co.gateway == "none":
        exposed = [a for a in co.addresses if a not in LOOPBACK and not _is_loopback(a)]
        if exposed or not _is_loopback(co.bind_host):
            raise ConfigError(
                "coordinator.gateway: none serves Flower's Control API (register nodes, submit and stop runs) to"
                f" whoever reaches {co.bind_host}:{co.port}; it is only for a coordinator on 127.0.0.1 (addresses"
                " and bind_host): use gateway: nginx"
            )
    elif co.local_port == co.port:
        raise ConfigError(
            f"coordinator.local_port: {co.local_port} is the gateway's port too; expected another port (the"
            " SuperLink's own, on 127.0.0.1)"
        )
    if not cfg.organisations:
        raise ConfigError("organisations: expected at least one organisation")
    seen: set[str] = set()
    for i, org in enumerate(cfg.organisations):
        key = f"organisations[{i}]"
        if not ORG_NAME.fullmatch(org.name):
            raise ConfigError(
                f"{key}.name: expected a name of letters, digits, '.', '_' or '-' (at most 64), got {org.name!r}"
            )
        if org.name.lower() in seen or org.name.lower() in RESERVED_KITS:
            why = "reserved for the coordinator's kits" if org.name.lower() in RESERVED_KITS else "duplicate name"
            raise ConfigError(f"{key}.name: {why} {org.name!r} (kit folders must not collide)")
        seen.add(org.name.lower())
        if org.data.source != "file" or not org.data.path:
            raise ConfigError(f"{key}.data.path: required (the organisation's own CSV / TSV / JSONL file)")
        check_data_columns(org.data, f"{key}.")


def federation_from_dict(raw: Any, where: str = "federation") -> FederationConfig:
    """Build and check; every error is one line starting with ``where`` (the file)."""
    try:
        if not isinstance(raw, dict):
            raise ConfigError("expected a mapping at the top level")
        cfg = build_dataclass(FederationConfig, _prepare(raw), "")
        _cross_checks(cfg)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {str(exc).removeprefix('config: ')}") from None
    return cfg


def load_federation(path: str | Path) -> FederationConfig:
    """Parse and validate FEDERATION.yaml."""
    path = Path(path)
    try:
        raw = read_yaml(path)
    except ConfigError as exc:
        raise ConfigError(str(exc).replace("config file", "federation file", 1)) from None
    cfg = federation_from_dict(raw, f"federation file {shown(path)}")
    return _relative_to(cfg, path.resolve().parent)


def _relative_to(cfg: FederationConfig, base: Path) -> FederationConfig:
    """Join requests and the app folder, as written in the federation file, are relative to it."""

    def resolved(value: str) -> str:
        return value if not value or Path(value).is_absolute() else str(base / value)

    orgs = [dataclasses.replace(o, join_request=resolved(o.join_request)) for o in cfg.organisations]
    app = dataclasses.replace(cfg.app, path=resolved(cfg.app.path))
    return dataclasses.replace(cfg, organisations=orgs, app=app)
