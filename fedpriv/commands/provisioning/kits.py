"""Writing the kits: one for the coordinator, one per organisation.

Re-running is safe: keys and certificates are only created when missing (or,
for the SuperLink certificate, when the coordinator's addresses changed), text
files only rewritten when their content changes, every file written
atomically. Everything is checked before anything is written, so a refusal
leaves the kits as they were.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedpriv.commands.provisioning import ProvisioningError, pki
from fedpriv.commands.provisioning.federation import RESERVED_KITS, FederationConfig, OrganisationConfig, parse_address
from fedpriv.commands.provisioning.join import JoinRequest, load_join_request
from fedpriv.kernel import atomic_files
from fedpriv.kernel.config import DataConfig
from fedpriv.kernel.errors import ConfigError
from fedpriv.kernel.protocol import NODE_CONFIG_FILE
from fedpriv.privacy.ledger import PUBLIC_KEY_FILE as LEDGER_PUB
from fedpriv.privacy.ledger import SIGNING_KEY_FILE as LEDGER_KEY
from fedpriv.privacy.ledger import LedgerError, load_signing_key, public_key_text
from fedpriv.privacy.ledger import load_public_key as load_ledger_public_key

COORDINATOR = "coordinator"
CA_KIT = "coordinator-ca"  # the CA's private key, apart from everything the SuperLink and its ServerApps can read
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


# --------------------------------------------------------------------------- file contents


def _kit_prelude(script: str) -> list[str]:
    """Resolve the kit folder from the script's own location, so a kit can be copied to another machine."""
    return [
        "set -eu",
        'KIT="$(cd "$(dirname "$0")" && pwd)"',
        'case "$KIT" in',
        f"  *\\'*|*'\"'*|*\\\\*) echo \"{script}: the kit's folder must not contain quotes or backslashes: $KIT\" >&2; exit 2 ;;",
        "esac",
    ]


def _in_kit(path: str) -> str:
    """A shell word for ``path``: as is when absolute, else inside the kit folder."""
    return shlex.quote(path) if Path(path).is_absolute() else '"$KIT"/' + shlex.quote(path)


SUPERLINK = "fedpriv-superlink"
SUPERLINK_ENV = "FEDPRIV_SUPERLINK"
CHECK_FLOWER = "--check-flower"  # fedpriv/runtime/patch_points.py: exit 2 when the installed Flower moved a patch point
SPEEDUPS_ENV = "FEDPRIV_NODE_SPEEDUPS"  # 0: fedpriv-supernode with the approved-app check only (Flower's own loop)
# what start-supernode.sh prints when it starts the node without its speed-ups (`fedpriv federation up` reads it)
NODE_FALLBACK_LINE = "start-supernode.sh: starting fedpriv-supernode without its speed-ups"


def flower_check(script: str, variable: str, command: str, fallback: list[str]) -> list[str]:
    """Shell lines that ask ``command --check-flower`` whether its patches fit the installed Flower, and run
    ``fallback`` (shell lines) when it refuses (exit 2; its own line names the patch point and the Flower)."""
    return [
        f'if [ "${variable}" = {command} ]; then',
        "  status=0",
        f"  {command} {CHECK_FLOWER} || status=$?",
        '  case "$status" in',
        "    0) ;;",
        "    2) " + "; ".join(fallback) + " ;;",
        f'    *) echo "{script}: {command} {CHECK_FLOWER} failed (exit $status)" >&2; exit "$status" ;;',
        "  esac",
        "fi",
    ]


def superlink_command(cfg: FederationConfig) -> list[str]:
    """The SuperLink's command (shell words, ``$KIT`` = the coordinator kit).

    fedpriv-superlink is flower-superlink (same flags) whose nodes hear of a message as soon as it is sent
    (fedpriv/runtime/superlink.py); FEDPRIV_SUPERLINK=flower-superlink runs Flower's own instead.
    """
    co = cfg.coordinator
    return [
        '"$SUPERLINK"',
        '--ssl-ca-certfile "$KIT/ca.crt"',
        '--ssl-certfile "$KIT/superlink.crt"',
        '--ssl-keyfile "$KIT/superlink.key"',
        "--enable-supernode-auth",
        # every ServerApp runs in this installation: no `uv sync` of what a FAB's pyproject asks for (offline,
        # and nothing fetched from a package index on the coordinator's behalf)
        "--disable-runtime-dependency-installation",
        f"--host {shlex.quote(co.bind_host if co.gateway == 'none' else '127.0.0.1')}",
        f"--port {cfg.superlink_port}",
        f"--database {shlex.quote(co.database) if co.database_in_memory else _in_kit(co.database)}",
    ]


CA_KEY_ENV = "FEDPRIV_ALLOW_READABLE_CA_KEY"


def ca_key_guard(script: str) -> list[str]:
    """Shell lines that stop ``script`` where its user can read the CA's key (ServerApps run as that user)."""
    return [
        "# the federation CA's key must be out of this user's reach: every ServerApp runs as this user, here",
        f'for ca_key in "$KIT/../{CA_KIT}/ca.key" "$KIT/ca.key"; do',
        f'  if [ -r "$ca_key" ] && [ "${{{CA_KEY_ENV}:-}}" != 1 ]; then',
        f"    echo \"{script}: refusing to start: this user can read the federation CA's key $ca_key, and every"
        " ServerApp would run as this user; keep it on another machine, or readable only by another user"
        f' ({CA_KEY_ENV}=1 allows it for a one-machine try-out)" >&2',
        "    exit 2",
        "  fi",
        "done",
    ]


def start_superlink_sh(cfg: FederationConfig) -> str:
    co = cfg.coordinator
    db_dir = None if co.database_in_memory else _in_kit(str(Path(co.database).parent))
    where = (
        f"127.0.0.1:{co.local_port} only: the organisations reach it through ./start-gateway.sh (nginx), which"
        "\n# forwards only the Fleet API and /health; registering nodes and runs stay on this host."
        if co.gateway == "nginx"
        else f"{co.bind_host}:{co.port} (gateway: none, every API: for a coordinator on 127.0.0.1 only)."
    )
    lines = [
        "#!/bin/sh",
        f"# Starts the SuperLink of federation {cfg.federation} (written by `fedpriv provision`: re-run it, do not edit).",
        f"# TLS on {where}",
        "# Only SuperNodes whose public key was registered (./enroll-nodes.sh) may connect. Extra flower-superlink",
        "# flags may follow, e.g. ./start-superlink.sh --log-file superlink.log",
        f"# {SUPERLINK_ENV}=flower-superlink ./start-superlink.sh runs Flower's stock SuperLink (nodes poll for messages).",
        *_kit_prelude("start-superlink.sh"),
        *ca_key_guard("start-superlink.sh"),
        *([f"mkdir -p {db_dir}"] if db_dir else []),
        f'SUPERLINK="${{{SUPERLINK_ENV}:-{SUPERLINK}}}"',
        f"# a Flower release that moved what {SUPERLINK} patches: Flower's own flower-superlink (same flags)",
        *flower_check(
            "start-superlink.sh",
            "SUPERLINK",
            SUPERLINK,
            [
                'echo "start-superlink.sh: running Flower\'s own flower-superlink instead" >&2',
                "SUPERLINK=flower-superlink",
            ],
        ),
        "exec " + " \\\n    ".join(superlink_command(cfg)) + ' \\\n    "$@"',
    ]
    return "\n".join(lines) + "\n"


# What a SuperNode with an enrolled key calls on the Fleet API (flwr 1.41, fleet_http_connection.py). Fleet's
# register-node / unregister-node are left out: nodes never self-register here (SuperNode authentication).
FLEET_PATHS = (
    "activate-node",
    "deactivate-node",
    "send-node-heartbeat",
    "pull-messages",
    "push-messages",
    "get-run",
    "get-fab",
    "push-object",
    "pull-object",
    "confirm-message-received",
)
GATEWAY_STATE = "state/gateway"
NGINX_ENV = "FEDPRIV_NGINX"


def _listen(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def fleet_gateway_conf(cfg: FederationConfig) -> str:
    """nginx: TLS for the organisations, only the Fleet API and /health through, to the SuperLink on loopback.

    Relative paths: certificates relative to this file (the coordinator kit), pid, logs and buffers relative to
    nginx's prefix (``-p KIT/state/gateway/``, see start-gateway.sh), so the kit can be moved.
    """
    co = cfg.coordinator
    allowed = "|".join(FLEET_PATHS)
    fleet = "\n".join(
        f"        location = /v1/fleet/{name} {{ limit_except POST {{ deny all; }} proxy_pass https://superlink; }}"
        for name in FLEET_PATHS
    )
    return f"""# The organisations' way in to federation {cfg.federation} (written by `fedpriv provision`: re-run it, do not edit).
# Started by ./start-gateway.sh. One HTTPS port of flower-superlink serves the Fleet API (SuperNodes), the Control
# API (register nodes; start, list and stop runs; read logs) and the Runtime API (ServerApps), with no login on
# Control. So the SuperLink listens on 127.0.0.1:{co.local_port} only, and this proxy, on {_listen(co.bind_host, co.port)}, forwards
# exactly what an enrolled SuperNode calls and answers 403 to everything else, for outsiders and organisations alike.
worker_processes 1;
pid gateway.pid;
error_log stderr notice;

events {{
    worker_connections 1024;
}}

http {{
    client_body_temp_path client_body;
    proxy_temp_path proxy;
    fastcgi_temp_path fastcgi;
    uwsgi_temp_path uwsgi;
    scgi_temp_path scgi;
    default_type application/octet-stream;
    server_tokens off;

    # refusals are kept (who tried what), the nodes' polls are not
    map $status $refused {{
        403 1;
        default 0;
    }}
    access_log refused.log combined if=$refused;

    # the raw request target (not decoded, no dot segments or slashes merged, no query string) must be exactly
    # one allowed path, so that no spelling of a Control or Runtime path can reach the SuperLink
    map $request_uri $allowed_target {{
        default 0;
        "~^/v1/fleet/({allowed})$" 1;
        "~^/health$" 1;
    }}

    upstream superlink {{
        server 127.0.0.1:{co.local_port};
        keepalive 16;
    }}

    server {{
        listen {_listen(co.bind_host, co.port)} ssl;
        server_name _;
        ssl_certificate superlink.crt;
        ssl_certificate_key superlink.key;
        ssl_protocols TLSv1.2 TLSv1.3;

        # model updates and objects stream through (never spooled to disk); idle timeouts, not totals
        client_max_body_size 1g;
        proxy_request_buffering off;
        proxy_max_temp_file_size 0;
        client_header_timeout 10s;
        client_body_timeout 120s;
        send_timeout 120s;
        proxy_connect_timeout 5s;
        proxy_send_timeout 120s;
        proxy_read_timeout 120s;

        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Host $host;
        proxy_ssl_verify on;
        proxy_ssl_verify_depth 2;
        proxy_ssl_trusted_certificate ca.crt;
        proxy_ssl_name localhost;
        proxy_ssl_server_name on;
        proxy_ssl_session_reuse on;

        if ($allowed_target = 0) {{
            return 403;
        }}

{fleet}
        location = /health {{ limit_except GET {{ deny all; }} proxy_pass https://superlink; }}

        location / {{
            return 403;
        }}
    }}
}}
"""


def start_gateway_sh(cfg: FederationConfig) -> str:
    co = cfg.coordinator
    lines = [
        "#!/bin/sh",
        f"# Starts the gateway of federation {cfg.federation} (written by `fedpriv provision`: re-run it, do not edit):",
        f"# nginx on {_listen(co.bind_host, co.port)} forwarding only the Fleet API and /health to the SuperLink on",
        f"# 127.0.0.1:{co.local_port} (fleet-gateway.conf). nginx from your distribution: apt-get install nginx-light.",
        f"# Refused requests are logged to {GATEWAY_STATE}/refused.log. Extra nginx flags may follow.",
        *_kit_prelude("start-gateway.sh"),
        f'NGINX="${{{NGINX_ENV}:-nginx}}"',
        'command -v "$NGINX" >/dev/null 2>&1 || { echo "start-gateway.sh: nginx not found (apt-get install nginx-light,'
        f' or set {NGINX_ENV})" >&2; exit 2; }}',
        f'mkdir -p "$KIT/{GATEWAY_STATE}"',
        f'exec "$NGINX" -p "$KIT/{GATEWAY_STATE}/" -c "$KIT/fleet-gateway.conf" -e stderr -g "daemon off;" "$@"',
    ]
    return "\n".join(lines) + "\n"


def register_command(cfg: FederationConfig, org: str) -> str:
    return f'flwr supernode register "$KIT/nodes/{org}.pub" {cfg.federation} --name {org}'


def enroll_nodes_sh(cfg: FederationConfig, enrolled: list[str]) -> str:
    names = " ".join(enrolled)
    lines = [
        "#!/bin/sh",
        f"# Registers the organisations' SuperNode public keys with the running SuperLink of {cfg.federation}.",
        "# Flower 1.41 keeps the allow-list in the SuperLink's database, filled through the Control API",
        "# (`flwr supernode register`); flower-superlink refuses the old --auth-list-public-keys CSV.",
        "# Run on the coordinator host after ./start-superlink.sh. Usage: ./enroll-nodes.sh [ORG ...] (default: all)",
        *_kit_prelude("enroll-nodes.sh"),
        'export FLWR_HOME="$KIT/flwr-home"',
        'mkdir -p "$FLWR_HOME"',
        "# written aside and renamed into place: enrolments run side by side must never read it half written",
        'cat > "$FLWR_HOME/config.toml.tmp$$" <<EOF',
        "[superlink]",
        f'default = "{cfg.federation}"',
        "",
        f'[superlink."{cfg.federation}"]',
        f'address = "{cfg.local_address}"',
        'root-certificates = "$KIT/ca.crt"',
        "EOF",
        'mv -f "$FLWR_HOME/config.toml.tmp$$" "$FLWR_HOME/config.toml"',
        f'[ "$#" -gt 0 ] || set -- {names}',
        "failed=''",
        'for org in "$@"; do',
        '  case "$org" in',
    ]
    for org in enrolled:
        lines.append(f'    {org}) {register_command(cfg, org)} || failed="$failed {org}" ;;')
    lines += [
        f"    *) echo \"enroll-nodes.sh: unknown organisation '$org' (known: {names})\" >&2; exit 2 ;;",
        "  esac",
        "done",
        'if [ -n "$failed" ]; then echo "enroll-nodes.sh: not registered:$failed" >&2; exit 1; fi',
    ]
    return "\n".join(lines) + "\n"


SUPERNODE = "fedpriv-supernode"
SUPERNODE_ENV = "FEDPRIV_SUPERNODE"


def supernode_command(dial_address: str) -> list[str]:
    # fedpriv-supernode is flower-supernode (same flags) with warm ClientApp processes and a short idle poll;
    # FEDPRIV_SUPERNODE=flower-supernode runs Flower's own instead
    return [
        '"$SUPERNODE"',
        f"--superlink {dial_address}",
        '--root-certificates "$KIT/ca.crt"',
        '--auth-supernode-private-key "$KIT/node.key"',
        f"--node-config \"{NODE_CONFIG_FILE}='$KIT/node.yaml'\"",
    ]


def start_supernode_sh(federation: str, dial_address: str, org: str) -> str:
    """The organisation's start script: ``fedpriv org accept`` writes it from this template, never from a reply."""
    lines = [
        "#!/bin/sh",
        f"# Starts {org}'s SuperNode for federation {federation} (written by fedpriv from its own template).",
        "# It dials the coordinator over TLS trusting only ca.crt, proves who it is with node.key (the",
        "# coordinator registered node.pub), reads this organisation's own settings from node.yaml and runs only",
        "# the apps node.yaml approves. Extra flower-supernode flags may follow, e.g. ./start-supernode.sh --port 9095",
        f"# {SUPERNODE_ENV}=flower-supernode ./start-supernode.sh runs Flower's stock SuperNode (cold ClientApps, and",
        "# no approved-app check: it runs any app).",
        *_kit_prelude("start-supernode.sh"),
        f'SUPERNODE="${{{SUPERNODE_ENV}:-{SUPERNODE}}}"',
        f"# a Flower release that moved what {SUPERNODE}'s speed-ups patch: Flower's own SuperNode loop and",
        "# flower-superexec, still with the approved-app check (fedpriv-supernode refuses to start without it)",
        *flower_check(
            "start-supernode.sh",
            "SUPERNODE",
            SUPERNODE,
            [f'echo "{NODE_FALLBACK_LINE} ({SPEEDUPS_ENV}=0)" >&2', f"export {SPEEDUPS_ENV}=0"],
        ),
        "exec " + " \\\n    ".join(supernode_command(dial_address)) + ' \\\n    "$@"',
    ]
    return "\n".join(lines) + "\n"


CONNECTION_FILE = "federation.json"  # what an organisation's own fedpriv needs to write its start script


def connection_json(cfg: FederationConfig, org: OrganisationConfig) -> str:
    body = {"format": "fedpriv-connection/1", "federation": cfg.federation, "org": org.name, "dial": cfg.dial_address}
    return json.dumps(body, indent=2) + "\n"


def node_yaml(cfg: FederationConfig, org: OrganisationConfig, approved_apps: list[str] = ()) -> str:
    """What :func:`fedpriv.kernel.config.load_node_config` reads; only the data keys that differ from the defaults."""
    defaults = dataclasses.asdict(DataConfig(source="file"))
    data = dataclasses.asdict(org.data)
    kept = {"path", "text_column", "label_column"}
    data = {k: v for k, v in data.items() if k != "source" and (k in kept or v != defaults[k])}
    body = {
        "org": org.name,
        "data": data,
        "privacy": dataclasses.asdict(org.privacy),
        "device": org.device,
        "state_dir": org.state_dir,
        "ledger_key": LEDGER_KEY,
        "redaction": dataclasses.asdict(org.redaction),
        "approved_apps": list(approved_apps),
    }
    header = (
        f"# {org.name}'s own settings in federation {cfg.federation}: its data, privacy budget, device and the\n"
        "# redaction of personal data from its text before tokenisation (kinds: email phone url ip_address\n"
        "# payment_card bank_account national_id date_of_birth handle person; extra_names: a file of your own\n"
        "# names, one per line). The coordinator cannot override them. Relative paths are relative to this file.\n"
        "# approved_apps: the SHA-256 of each Flower app (FAB) this node may run, after you reviewed it\n"
        "# (`fedpriv app hash APP_FOLDER`); the node refuses any other before it reads your data or keys.\n"
        "# What your node sends beside its DP-trained update (docs/threat-model.md, 'What leaves a node'):\n"
        "# privacy.share_training_loss (the exact training loss), privacy.share_per_class_eval (per-class test\n"
        "# counts: the run's macro-F1), redaction.share (kinds: which kinds were found; counts: how many; none).\n"
    )
    return header + yaml.safe_dump(body, sort_keys=False, allow_unicode=True)


def coordinator_readme(cfg: FederationConfig, enrolled: list[str]) -> str:
    co = cfg.coordinator
    if co.gateway == "nginx":
        front = f"""  fleet-gateway.conf  nginx: TLS on {co.bind_host}:{co.port} (what the organisations reach), forwarding only the Fleet
                    API a SuperNode uses and /health to the SuperLink on 127.0.0.1:{co.local_port}; everything else 403
  start-gateway.sh  starts it (nginx from your distribution: apt-get install nginx-light)"""
        steps = f"""  1. ./start-superlink.sh        (listens on 127.0.0.1:{co.local_port} only)
  2. ./start-gateway.sh          (in another shell: the organisations' way in, {co.bind_host}:{co.port})
  3. ./enroll-nodes.sh           (once; again for an organisation added with `fedpriv provision --add-org`)
  4. send each organisation its own folder (no private key is in it); never this one."""
        control = f"""Who can do what
  Registering nodes, starting, listing and stopping runs and reading their logs (Flower's Control API) and the
  ServerApp's Runtime API are reachable on 127.0.0.1:{co.local_port} only: from this host. Organisations and
  anyone else reach the gateway, which serves the Fleet API and /health and answers 403 to everything else."""
    else:
        front = "  (no gateway: the SuperLink itself on 127.0.0.1 serves every API; only for a one-machine try-out)"
        steps = """  1. ./start-superlink.sh
  2. ./enroll-nodes.sh
  3. send each organisation its own folder; never this one."""
        control = """Who can do what
  gateway: none. Every API (Fleet, Control, Runtime) on 127.0.0.1: whoever can log in to this host can register
  nodes and submit runs. For a try-out on one machine only; a real federation uses gateway: nginx."""
    return f"""Coordinator kit of federation {cfg.federation} (written by `fedpriv provision`; keep this folder private)

Files
  ca.crt            the CA certificate every party trusts (its private key is in ../{CA_KIT}/, not here)
  superlink.crt/.key  the SuperLink's TLS certificate (SANs: {", ".join(cfg.san_addresses)}) and key
  nodes/ORG.pub     each enrolled organisation's SuperNode public key (OpenSSH, EC P-384)
  ledger-keys/ORG.pub  each organisation's privacy-ledger key: `fedpriv audit RUN_DIR --keys ledger-keys/`
  start-superlink.sh  starts fedpriv-superlink (flower-superlink that hands nodes their messages at once) with TLS
                    and SuperNode authentication; it refuses to start where it can read the CA's key, and runs
                    Flower's own flower-superlink where the installed Flower moved what fedpriv patches
{front}
  enroll-nodes.sh   registers nodes/*.pub with the running SuperLink (flwr supernode register)

Steps
{steps}
  Check a kit at any time: fedpriv pki inspect {COORDINATOR}/

Enrolled organisations: {", ".join(enrolled) or "none"}
SuperNodes dial {cfg.dial_address}.

{control}
  The SuperLink runs every ServerApp as its own user in this folder: run it as a user that cannot read
  ../{CA_KIT}/ (better: keep that folder on another machine; `fedpriv provision` alone needs it).
"""


def ca_readme(cfg: FederationConfig) -> str:
    return f"""The certificate authority of federation {cfg.federation} (written by `fedpriv provision`)

  ca.key   the CA's private key (mode 0600). Only `fedpriv provision` needs it: to enrol an organisation or
           re-issue the SuperLink certificate. Keep this folder off the SuperLink's host, or readable only by a
           user other than the one that runs the SuperLink: every ServerApp runs as that user, and
           start-superlink.sh refuses to start where it can read this key.
  ca.crt   the CA certificate (the same as ../{COORDINATOR}/ca.crt)
"""


def org_readme(cfg: FederationConfig, org: OrganisationConfig, own_keys: bool = True) -> str:
    if own_keys:
        keys = """  node.key, ledger.key  NOT in this folder: made by `fedpriv org init` on your machine, they never leave it
  node.pub          the public half of your node key; the coordinator registered it from your join request
  ledger.pub        the public half of your ledger key: auditors check your ledger against it"""
        setup = """Set-up: on your machine, `fedpriv org accept THIS_FOLDER --kit YOUR_KIT` (the folder where `fedpriv org init`
made your keys): it checks that node.pub and ledger.pub are your own keys and that ca.crt is the CA you trust,
and never replaces a node.yaml you already have (a new proposal goes to node.yaml.new)."""
    else:
        keys = """  node.key          this organisation's SuperNode identity (OpenSSH, EC P-384), made by the coordinator's
                    `fedpriv provision --make-org-keys` (a try-out: the coordinator could act as this node)
  node.pub          its public half; the coordinator registered it
  ledger.key        signs this organisation's privacy ledger (Ed25519; keep it private, 0600)
  ledger.pub        its public half; give it to auditors (the coordinator kit has a copy in ledger-keys/)"""
        setup = "Set-up: none; for a real federation make your keys with `fedpriv org init` and send a join request."
    return f"""Kit of {org.name} in federation {cfg.federation} (written by `fedpriv provision`)

Files
  ca.crt            the federation CA: the only certificate this SuperNode trusts for the coordinator
{keys}
  node.yaml         your own settings: data file, privacy budget (target_epsilon, delta, max_epsilon),
                    device, state folder, redaction (on: emails, phone numbers, IDs, names ... become
                    [EMAIL], [PHONE] ... before tokenisation), approved_apps (the Flower apps your node may run:
                    review an app, `fedpriv app hash APP`, list the hash). The coordinator never changes this file.
  state/            (after the first round) privacy plan, accountant and ledger.jsonl: never delete it
  start-supernode.sh  starts fedpriv-supernode (flower-supernode with warm ClientApps and the approved-app check),
                    dialling the coordinator at {cfg.dial_address}; `fedpriv org accept` writes your own copy from
                    fedpriv's template (federation.json: the federation's name and that address); where the
                    installed Flower moved what the speed-ups patch, it starts without them (Flower's own loop)

{setup}
Run: ./start-supernode.sh      (the folder can be copied anywhere; paths are relative to the script)
Check: fedpriv pki inspect .
Contact on record: {org.contact or "-"}
"""


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
