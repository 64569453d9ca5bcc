"""What the kits' scripts, READMEs, nginx configuration, node.yaml and federation.json say.

Templates only: which file goes into which kit, with which mode and which key, is decided in kits.py. Each
function returns the text of one file from the federation file (and the names kits.py passes in), so a change of
wording never touches a decision about keys.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
from pathlib import Path

import yaml

from fedpriv.commands.provisioning.federation import CA_KIT, COORDINATOR, FederationConfig, OrganisationConfig
from fedpriv.kernel.config import DataConfig
from fedpriv.kernel.protocol import NODE_CONFIG_FILE
from fedpriv.privacy.ledger import SIGNING_KEY_FILE as LEDGER_KEY


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
