"""``fedpriv federation up``: a whole deployment on one machine, from the kits, as real processes.

For people who want to try the deployment path before involving other
machines: the coordinator's ``start-superlink.sh`` and every organisation's
``start-supernode.sh`` run as separate processes on 127.0.0.1 (TLS, enrolled
node keys, each organisation's own node.yaml), the coordinator enrols the
nodes with ``enroll-nodes.sh`` and starts the run with ``flwr run``, exactly
as on three machines. Every process is started in its own session and its
whole process group is stopped at the end, also on errors and Ctrl-C.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shlex
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from fedpriv.commands.provisioning import ProvisioningError
from fedpriv.commands.provisioning.federation import (
    IN_MEMORY_DATABASE,
    CoordinatorConfig,
    FederationConfig,
    load_federation,
)
from fedpriv.commands.provisioning.kit_templates import (
    CA_KEY_ENV,
    NODE_FALLBACK_LINE,
    SPEEDUPS_ENV,
    SUPERLINK,
    SUPERLINK_ENV,
    SUPERNODE,
    SUPERNODE_ENV,
)
from fedpriv.kernel import interrupts
from fedpriv.kernel.errors import ConfigError, UserError
from fedpriv.kernel.protocol import NODE_CONFIG_FILE
from fedpriv.kernel.run_lock import lock_run_dir, new_run_problem
from fedpriv.runtime.superexec import READY_LINE

if TYPE_CHECKING:
    from fedpriv.kernel.config import FedPrivConfig
    from fedpriv.server.resume import ResumePoint

START_TIMEOUT_S = 60.0
WARM_TIMEOUT_S = 300.0  # N nodes' imports on one machine: seconds of CPU each, all nodes sharing its cores
STOP_WAIT_S = 10.0
ENROL_WORKERS = 4
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_FLOWER_LOG = re.compile(r"^(INFO|DEBUG|WARNING|ERROR)\s*:")


class FederationUpError(UserError):
    """The local federation could not be started or did not finish its run."""

    exit_code = 1


# --------------------------------------------------------------------------- processes


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def flower_env(flwr_home: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for Flower's commands: this interpreter's scripts first on PATH, offline, no telemetry."""
    env = dict(os.environ if base is None else base)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["FLWR_HOME"] = str(flwr_home)
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def start_process(args: list[str], log: Path, env: dict[str, str], cwd: Path | None = None) -> subprocess.Popen:
    """Start ``args`` in a new session (its own process group), output to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as handle:
        return subprocess.Popen(
            args,
            stdout=handle,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )


def stop_process(proc: subprocess.Popen, wait_s: float = STOP_WAIT_S) -> None:
    """SIGTERM the process group started by :func:`start_process`, then SIGKILL what is left."""
    for sig, wait in ((signal.SIGTERM, wait_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            continue
        # the leader is gone; its group may still hold children (SuperExec, ClientApps): end them too
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
    try:
        proc.wait(1)
    except subprocess.TimeoutExpired:
        pass


def group_alive(pgid: int) -> bool:
    """Whether any process of the group ``pgid`` is still running (zombies aside)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def processes_under(root: Path) -> list[str]:
    """Live processes whose working directory is inside ``root`` ("pid: command")."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cwd = os.readlink(proc / "cwd")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if state != "Z" and (cwd == str(root) or cwd.startswith(f"{root}/")):
            found.append(f"{proc.name}: {cmdline[:160]}")
    return found


def tls_ready(port: int, cafile: Path, host: str = "127.0.0.1") -> bool:
    """Whether a TLS handshake that trusts ``cafile`` succeeds on ``host:port``."""
    context = ssl.create_default_context(cafile=str(cafile))
    try:
        with socket.create_connection((host, port), timeout=5) as raw:
            with context.wrap_socket(raw, server_hostname=host):
                return True
    except (OSError, ssl.SSLError):
        return False


def tcp_ready(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts TCP connections on ``host:port`` (the plaintext baseline)."""
    try:
        with socket.create_connection((host, port), timeout=5):
            return True
    except OSError:
        return False


def tail(path: Path, chars: int = 3000) -> str:
    try:
        return _ANSI.sub("", path.read_text(errors="replace"))[-chars:]
    except OSError:
        return ""


def printed_since(path: Path, offset: int, line: str) -> bool:
    """Whether ``path`` got a line starting with ``line`` after its first ``offset`` bytes."""
    try:
        with path.open("rb") as handle:
            handle.seek(offset)
            return any(row.lstrip().startswith(line.encode()) for row in handle)
    except OSError:
        return False


def supernodes(flwr_home: Path, env: dict[str, str]) -> list[dict]:
    """``flwr supernode list`` on the connection configured in ``flwr_home`` (node id, status)."""
    done = subprocess.run(
        ["flwr", "supernode", "list", "--format", "json"],
        env=dict(env, FLWR_HOME=str(flwr_home)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    text = done.stdout
    if done.returncode != 0 or "{" not in text:
        raise FederationUpError(f"flwr supernode list failed ({done.returncode}): {_ANSI.sub('', text + done.stderr)}")
    return json.loads(text[text.index("{") :]).get("nodes", [])


def enrol(coordinator_kit: Path, org: str, env: dict[str, str]) -> str:
    """Register ``org``'s key with ``enroll-nodes.sh ORG``; 'registered' or 'already registered'."""
    done = subprocess.run(
        ["sh", str(coordinator_kit / "enroll-nodes.sh"), org], env=env, capture_output=True, text=True, timeout=60
    )
    output = _ANSI.sub("", done.stdout + done.stderr)
    if done.returncode == 0:
        return "registered"
    if "already in use" in output:  # Flower refuses a key twice: the SuperLink's database already has it
        return "already registered"
    raise FederationUpError(f"enroll-nodes.sh {org} failed ({done.returncode}):\n{output[-2000:]}")


# --------------------------------------------------------------------------- the federation


def local_federation(cfg: FederationConfig, port: int) -> FederationConfig:
    """The same organisations, with the coordinator on 127.0.0.1:``port``."""
    coordinator = CoordinatorConfig(
        addresses=["127.0.0.1", "localhost"],
        port=port,
        bind_host="127.0.0.1",
        database=IN_MEMORY_DATABASE,
        gateway="none",  # every party on this machine: nobody else reaches 127.0.0.1
    )
    return dataclasses.replace(cfg, coordinator=coordinator)


def _absolute_data(cfg: FederationConfig, base: Path) -> FederationConfig:
    """Data paths in FEDERATION.yaml relative to that file, as in a run config (node.yaml gets absolute ones)."""
    orgs = []
    for org in cfg.organisations:
        data = org.data
        for key in ("path", "test_path"):
            value = getattr(data, key)
            if value and not Path(value).is_absolute():
                data = dataclasses.replace(data, **{key: str((base / value).resolve())})
        orgs.append(dataclasses.replace(org, data=data))
    return dataclasses.replace(cfg, organisations=orgs)


def _check_kits_are_local(kits: Path, cfg: FederationConfig) -> None:
    """Refuse to turn a real federation's kits into local ones (that would re-issue the SuperLink certificate)."""
    from fedpriv.commands.provisioning import pki

    cert = kits / "coordinator" / "superlink.crt"
    if cert.exists():
        have = set(pki.san_strings(pki.load_cert(cert)))
        if have != set(cfg.san_addresses):
            raise FederationUpError(
                f"--kits {kits}: holds the kits of a coordinator at {', '.join(sorted(have))}; `federation up` runs"
                " everything on 127.0.0.1 and would re-issue its certificate: use another --kits folder"
            )


def staged_app_hash() -> str:
    """The FAB digest of this checkout's app as ``flwr run`` will ship it (the kits approve exactly that app)."""
    from fedpriv.commands.app_source import fab_sha256

    with tempfile.TemporaryDirectory(prefix="fedpriv-app-") as staging:
        return fab_sha256(app_dir(Path(staging) / "app"))


def _check_node_configs(kits: Path, cfg: FederationConfig, app_hash: str | None = None) -> None:
    """Every organisation's node.yaml, and its own names file for redaction, as its node will read them.

    A mistake there would otherwise surface as failed replies once the run is under way; a node.yaml that does
    not approve this app would have its node refuse every message of the run.
    """
    from fedpriv.kernel.node_config import load_node_config
    from fedpriv.privacy.person_names import read_extra_names

    for org in cfg.organisations:
        node = load_node_config(kits / org.name / "node.yaml")
        if app_hash is not None and app_hash not in node.approved_apps:
            raise FederationUpError(
                f"{kits / org.name / 'node.yaml'}: approved_apps does not list this app ({app_hash}), so"
                f" {org.name}'s node would refuse the run; the organisation decides: add it there (node.yaml.new"
                " has it) after reviewing the app"
            )
        if node.redaction.enabled and node.redaction.extra_names:
            try:
                read_extra_names(node.redaction.extra_names)
            except ConfigError as exc:
                raise ConfigError(f"{kits / org.name / 'node.yaml'}: {exc}") from None


def _spent_state(cfg: FederationConfig, kits: Path) -> list[str]:
    """Organisations whose node already holds privacy state from an earlier run (it never resets)."""
    from fedpriv.privacy.accountant_state import ACCOUNTANT_FILE, PLAN_FILE

    spent = []
    for org in cfg.organisations:
        folder = Path(org.state_dir) if Path(org.state_dir).is_absolute() else kits / org.name / org.state_dir
        if (folder / ACCOUNTANT_FILE).exists() or (folder / PLAN_FILE).exists():
            spent.append(f"{org.name} ({folder})")
    return spent


def infer_label_names(cfg: FederationConfig) -> list[str]:
    """The union of the organisations' classes (their files are on this machine), in the order they give.

    One organisation may hold a single class; the federation needs two.
    """
    from fedpriv.data.data_files import class_order, load_labelled_file
    from fedpriv.kernel.errors import DataError

    names: dict[str, None] = {}
    for org in cfg.organisations:
        names.update(dict.fromkeys(load_labelled_file(org.data.path, org.data, min_classes=1).label_names))
    order: list[str] = []
    for org in cfg.organisations:  # each organisation's labels.map / ranges as written, first come first
        order += [name for name in class_order(names, org.data.labels) if name not in order]
    if len(order) < 2:
        raise DataError(
            f"organisations' data: every file has the class {order[0]!r} only; a classifier needs at least two"
            " classes: check each organisation's data.label_column and data.labels"
        )
    return order


def write_run_config(path: Path, config_path: str | None, overrides: list[str], resume: Path | None = None) -> Path:
    """A TOML file for ``flwr run --run-config FILE`` with the app's keys (no quoting limits, kept with the run)."""
    lines = [
        "# run config of this fedpriv run (flwr run --run-config THIS_FILE)",
        f"config = {json.dumps(str(Path(config_path).resolve()) if config_path else '', ensure_ascii=False)}",
        f"overrides = {json.dumps(shlex.join(overrides), ensure_ascii=False)}",
        f"resume = {json.dumps(str(resume) if resume else '', ensure_ascii=False)}",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _first_run_config(path: Path) -> tuple[str | None, list[str]]:
    """The ``config`` and ``overrides`` the run was started with (from the run config file written then)."""
    import tomllib

    from fedpriv.server.resume import ResumeError

    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
        return (str(raw["config"]) or None), shlex.split(str(raw["overrides"]))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, KeyError, ValueError) as exc:
        raise ResumeError(
            f"{path}: the run config this run started with cannot be read ({type(exc).__name__}); a run started"
            " by hand is resumed with `flwr run` and its own run config plus resume=RUN_DIR"
        ) from None


def app_dir(staging: Path) -> Path:
    """The Flower app folder for ``flwr run``: this checkout's app, staged in ``staging`` (see fedpriv.commands.app_source)."""
    from fedpriv.commands.app_source import NotAnAppCheckout, stage_app

    try:
        return stage_app(staging)
    except NotAnAppCheckout as err:
        raise FederationUpError(str(err)) from None


def _wait(what: str, ready: Callable[[], bool], procs: dict[str, tuple[subprocess.Popen, Path]], timeout: float):
    deadline = time.monotonic() + timeout
    while not ready():
        for name, (proc, log) in procs.items():
            if proc.poll() is not None:
                raise FederationUpError(f"{name} exited with {proc.returncode} while {what}:\n{tail(log)}")
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {name}\n{tail(log, 1500)}" for name, (_, log) in procs.items())
            raise FederationUpError(f"timed out after {timeout:.0f} s {what}\n{logs}")
        time.sleep(0.5)


def _show_line(line: str, verbose: bool) -> bool:
    plain = _ANSI.sub("", line).rstrip()
    if not plain.strip():
        return False
    if verbose:
        return True
    if _FLOWER_LOG.match(plain):
        return not plain.startswith(("INFO", "DEBUG"))  # warnings and errors always
    return not plain.startswith(("Loading project", "Successfully built", "🎊", "Using SuperLink"))


@dataclass
class UpResult:
    run_dir: Path
    summary: dict | None
    returncode: int


def federation_up(
    federation_path: str | Path,
    kits: str | Path,
    *,
    overrides: list[str] | None = None,
    rounds: int | None = None,
    config_path: str | None = None,
    out: str | Path | None = None,
    run_timeout: float | None = None,
    verbose: bool = False,
    say: Callable[[str], None] = print,
    processes: dict[str, subprocess.Popen] | None = None,
    plaintext: bool = False,
    resume: str | Path | None = None,
) -> UpResult:
    """Provision (if needed), start SuperLink + one SuperNode per organisation, enrol, run, stop everything.

    ``resume`` (a run folder whose coordinator stopped) continues that run after its last complete round, with
    the config it started with: overrides, rounds, config and out are refused beside it.

    ``processes`` (optional) receives every started process by name, for callers that check they were stopped.
    ``plaintext`` is for benchmarks only (no CLI flag): the same processes without TLS and without node
    authentication, the baseline that the cost of the secure transport is measured against.

    The run folder is locked (fedpriv/kernel/run_lock.py) from before the first process starts to the end. Ctrl-C or
    SIGTERM stops every process, marks the run ``interrupted`` and raises Interrupted (fedpriv/kernel/interrupts.py).
    """
    with ExitStack() as held:
        return _federation_up(
            federation_path, kits, held=held, overrides=overrides, rounds=rounds, config_path=config_path, out=out,
            run_timeout=run_timeout, verbose=verbose, say=say, processes=processes, plaintext=plaintext,
            resume=resume,
        )  # fmt: skip


def _refuse_a_used_folder(run_dir: Path) -> None:
    """The rule every new run follows (fedpriv.kernel.run_lock.new_run_problem), checked before any process starts."""
    problem = new_run_problem(run_dir)
    if problem is not None:
        raise FederationUpError(f"--out {run_dir}: {problem}")


@dataclass
class _LocalRun:
    """What one ``federation up`` runs: the local federation, and the run's config and (locked) folder."""

    federation: FederationConfig  # the federation file's, on 127.0.0.1 at a free port, data paths absolute
    run_cfg: FedPrivConfig  # the run's resolved config
    run_dir: Path
    overrides: list[str]  # what `flwr run` is given (a new run)
    point: ResumePoint | None = None  # the run continued (--resume)
    first_run: tuple[str | None, list[str]] | None = None  # a resumed run's first config and overrides


def _federation_up(
    federation_path: str | Path,
    kits: str | Path,
    *,
    held: ExitStack,
    overrides: list[str] | None,
    rounds: int | None,
    config_path: str | None,
    out: str | Path | None,
    run_timeout: float | None,
    verbose: bool,
    say: Callable[[str], None],
    processes: dict[str, subprocess.Popen] | None,
    plaintext: bool,
    resume: str | Path | None,
) -> UpResult:
    """federation_up's steps; ``held`` keeps the run folder's lock until federation_up returns."""
    federation_path = Path(federation_path)
    kits = Path(kits).resolve()
    run = _plan_run(federation_path, held, overrides, rounds, config_path, out, resume)
    _prepare_kits(run, kits, say)
    returncode = _run_processes(
        run, kits, federation_path, config_path, run_timeout, verbose, say, processes, plaintext
    )
    return _report(run.run_dir, returncode, say)


def _plan_run(
    federation_path: Path,
    held: ExitStack,
    overrides: list[str] | None,
    rounds: int | None,
    config_path: str | None,
    out: str | Path | None,
    resume: str | Path | None,
) -> _LocalRun:
    """The local federation, the run's config (a config mistake stops here, before any process starts) and its
    folder, locked in ``held``: a new one (``out``), or the stopped run ``resume`` continues."""
    from fedpriv.kernel.config import load_config

    base = load_federation(federation_path)
    cfg = local_federation(_absolute_data(base, federation_path.resolve().parent), free_port())
    n = len(cfg.organisations)

    overrides = list(overrides or [])
    point = first_run = None
    if resume is not None:
        from fedpriv.kernel.config import config_from_dict
        from fedpriv.server.resume import load_resume_point, resumable

        given = [name for name, value in (("overrides", overrides), ("--rounds", rounds), ("--config", config_path),
                                          ("--out", out)) if value]  # fmt: skip
        if given:
            raise ConfigError(
                f"--resume {resume}: continues the run with the config and folder it started with; drop"
                f" {', '.join(given)}"
            )
        point = resumable(load_resume_point(resume))
        first_run = _first_run_config(point.run_dir / "logs" / "run-config.toml")
        held.enter_context(lock_run_dir(point.run_dir, fresh=False, flag="--resume"))  # held to the end
        point = resumable(load_resume_point(point.run_dir))  # again, now that no other run can write it
        run_cfg = config_from_dict(point.config)
        run_dir = point.run_dir
    if rounds is not None:
        overrides.append(f"training.rounds={rounds}")
    keys = {item.partition("=")[0].strip() for item in overrides}
    if "data.labels.names" not in keys and point is None:
        names = infer_label_names(cfg)
        overrides.append(f"data.labels.names=[{', '.join(json.dumps(name) for name in names)}]")
    if "secure_aggregation.enabled" not in keys and n >= 3:
        overrides.insert(0, "secure_aggregation.enabled=true")  # on by default in deployment (needs 3 or more)
    if "strategy.min_available_nodes" not in keys:
        overrides.append(f"strategy.min_available_nodes={n}")
    if point is None:
        run_dir = Path(out).resolve() if out else (Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")).resolve()
        _refuse_a_used_folder(run_dir)
        overrides.append(f"run.out_dir={json.dumps(str(run_dir))}")
        run_cfg = load_config(config_path, overrides)  # a config mistake stops here, before any process starts
        held.enter_context(lock_run_dir(run_dir, fresh=False))  # one run at a time in it, held to the end
        _refuse_a_used_folder(run_dir)  # again, now that it is ours
    return _LocalRun(cfg, run_cfg, run_dir, overrides, point, first_run)


def _prepare_kits(run: _LocalRun, kits: Path, say: Callable[[str], None]) -> None:
    """Check the kits (on this machine, no privacy spent by an earlier run), then provision or bring them up to date."""
    from fedpriv.commands.provisioning.kits import provision

    cfg = run.federation
    _check_kits_are_local(kits, cfg)
    spent = _spent_state(cfg, kits)
    if spent and run.run_cfg.privacy.enabled and run.point is None:  # a resumed run continues the nodes' accounting
        raise FederationUpError(
            "privacy state from an earlier run in " + ", ".join(spent) + ": a node never resets its accountant,"
            " so it would refuse to train past its budget. Delete those folders for a fresh try-out"
            " (never in a real federation), or use another --kits folder"
        )
    # before any process: provision refuses kits it cannot trust (unreadable, wrong CA, expired CA, mismatched or
    # wrong-type keys, a SuperLink certificate TLS would refuse) and re-issues an expired SuperLink certificate
    app_hash = staged_app_hash()
    outcome = provision(cfg, kits, make_org_keys=True, approved_apps=[app_hash])
    created = sum(change.action == "created" for change in outcome.changes)
    say(f"kits: {kits} ({'provisioned' if created else 'reused'}; coordinator 127.0.0.1:{cfg.coordinator.port})")
    if created:
        say(
            "  a try-out: every organisation's node and ledger keys and the CA's key were made on this machine"
            " (a real federation: `fedpriv org init` at each organisation, see the README)"
        )
    for change in outcome.changes:
        if change.action == "re-issued":
            say(f"  re-issued {change.path} ({change.reason})")
    _check_node_configs(kits, cfg, app_hash)


def _run_processes(
    run: _LocalRun,
    kits: Path,
    federation_path: Path,
    config_path: str | None,
    run_timeout: float | None,
    verbose: bool,
    say: Callable[[str], None],
    processes: dict[str, subprocess.Popen] | None,
    plaintext: bool,
) -> int:
    """Start every process, run the run, stop every process (also on errors, Ctrl-C and SIGTERM: then the run is
    marked interrupted and Interrupted raised); `flwr run`'s exit code."""
    cfg, run_dir = run.federation, run.run_dir
    logs = run_dir / "logs"
    procs: dict[str, tuple[subprocess.Popen, Path]] = {}
    caught: list[int] = []  # the signal that stopped the run (Ctrl-C: SIGINT)
    try:
        with ExitStack() as stack:
            homes = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fedpriv-federation-")))
            stack.callback(_stop_all, procs, kits, say)
            if threading.current_thread() is threading.main_thread():  # SIGTERM stops the processes like Ctrl-C
                interrupts.arm()
                previous = {sig: signal.signal(sig, _note_and_interrupt(caught)) for sig in interrupts.SIGNALS}
                for sig, handler in previous.items():
                    stack.callback(signal.signal, sig, handler)
            return _start_and_run(
                cfg, kits, kits / "coordinator", logs, homes, procs, run, config_path, run_timeout, verbose, say,
                processes, plaintext,
            )  # fmt: skip
    except KeyboardInterrupt:
        with interrupts.deferred_signals():  # a second Ctrl-C must not cut the marking short
            stopped = _interrupted(run_dir, caught[0] if caught else signal.SIGINT, federation_path, kits, run.run_cfg)
        raise stopped from None


def _report(run_dir: Path, returncode: int, say: Callable[[str], None]) -> UpResult:
    """What the run left: its final report (exit code 0 only for a completed run), or where to look."""
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.exists() else None
    if summary is None:
        say(f"no summary.json in {run_dir}: the run did not start or failed; see {run_dir / 'logs'}")
        return UpResult(run_dir, None, returncode or 1)
    from fedpriv.server.reports import final_report

    say(final_report(summary))
    say("every process stopped")
    line = stopped_line(summary)
    if line:
        print(line, file=sys.stderr, flush=True)
    ok = returncode == 0 and summary.get("status") == "completed"
    return UpResult(run_dir, summary, 0 if ok else 1)


def stopped_line(summary: dict) -> str | None:
    """The one error line for what stopped a run (a loss that became non-finite, a full disk), as simulate says it."""
    reason = summary.get("error") or (summary.get("status") == "failed" and summary.get("stopped_reason"))
    return f"error: {reason}" if reason else None


def _stop_all(procs: dict[str, tuple[subprocess.Popen, Path]], kits: Path, say: Callable[[str], None]) -> None:
    """Stop every started process and everything under it, whatever signal arrives meanwhile.

    Flower's SuperExec and the ServerApp / ClientApps it starts run in sessions of their own and outlive a
    stopped SuperLink or SuperNode (a ServerApp stays behind with parent PID 1): they are found in the process
    table under the started processes before anything is stopped, and stopped after them.
    """
    with interrupts.deferred_signals():
        tree = interrupts.process_tree(proc.pid for proc, _ in procs.values())
        stop_processes([proc for proc, _ in reversed(list(procs.values()))])
        left = interrupts.kill_processes(tree, signal.SIGTERM, wait_s=5.0)
        left = interrupts.kill_processes(left, signal.SIGKILL, wait_s=5.0)
        still = processes_under(kits)
        if left or still:
            say(f"warning: still running in {kits}: " + "; ".join(still or [str(pid) for pid in left]))


def _interrupted(run_dir: Path, signum: int, federation_path: Path, kits: Path, run_cfg) -> interrupts.Interrupted:
    """The one line of a stopped ``federation up``: its processes are stopped; the run folder marked."""
    from fedpriv.server.reports import mark_interrupted
    from fedpriv.server.resume import resume_path

    name = signal.Signals(signum).name
    if not resume_path(run_dir).exists() and not (run_dir / "summary.json").exists():
        return interrupts.Interrupted(
            f"interrupted ({name}): every process stopped before the run's first round; {run_dir} holds no round",
            signum,
        )
    rounds = mark_interrupted(run_dir, signum)
    return interrupts.Interrupted(
        f"interrupted ({name}): every process stopped; {run_dir} marked interrupted after round {rounds} of"
        f" {run_cfg.training.rounds}; continue it with: fedpriv federation up {federation_path} --kits {kits}"
        f" --resume {run_dir}",
        signum,
    )


def stop_processes(procs: list[subprocess.Popen], wait_s: float = STOP_WAIT_S) -> None:
    """:func:`stop_process` for several at once: SIGTERM every group, wait together, SIGKILL what is left."""
    for proc in procs:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + wait_s
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(max(0.0, deadline - time.monotonic()))
    for proc in procs:  # a group whose leader has gone may still hold children (SuperExec, ClientApps)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5.0)


def _start_and_run(
    cfg: FederationConfig,
    kits: Path,
    co_kit: Path,
    logs: Path,
    homes: Path,
    procs: dict[str, tuple[subprocess.Popen, Path]],
    run: _LocalRun,
    config_path: str | None,
    run_timeout: float | None,
    verbose: bool,
    say: Callable[[str], None],
    processes: dict[str, subprocess.Popen] | None,
    plaintext: bool,
) -> int:
    """Start the SuperLink and the SuperNodes, enrol them, run ``flwr run``; its exit code."""
    env = flower_env(homes / "cli")
    cli_home = _start_superlink(cfg, co_kit, logs, homes, procs, env, say, plaintext)
    _start_supernodes(cfg, kits, logs, homes, procs, cli_home, env, say, processes, plaintext)
    return _submit_run(cfg, logs, homes, cli_home, env, run, config_path, run_timeout, verbose, say)


def _start_superlink(
    cfg: FederationConfig,
    co_kit: Path,
    logs: Path,
    homes: Path,
    procs: dict[str, tuple[subprocess.Popen, Path]],
    env: dict[str, str],
    say: Callable[[str], None],
    plaintext: bool,
) -> Path:
    """Start the SuperLink (the kit's start-superlink.sh), wait until it accepts connections, enrol the nodes;
    the FLWR_HOME that reaches it."""
    port = cfg.coordinator.port
    log = logs / "superlink.log"
    if plaintext:
        cli_home = _plaintext_cli_home(homes / "cli-plaintext", cfg.federation, port)
        superlink = os.environ.get(SUPERLINK_ENV) or SUPERLINK  # the same SuperLink as the kits' script
        args = [superlink, "--insecure", "--host", "127.0.0.1", "--port", str(port)]
        args += ["--database", IN_MEMORY_DATABASE]
        ready, transport = (lambda: tcp_ready(port)), "PLAINTEXT, no node authentication (benchmark baseline)"
    else:
        cli_home = co_kit / "flwr-home"
        args = ["sh", str(co_kit / "start-superlink.sh")]
        ready, transport = (lambda: tls_ready(port, co_kit / "ca.crt")), "TLS, SuperNode authentication"
    # one machine: the CA's key (coordinator-ca/) is within the SuperLink's reach, which the script refuses
    # unless told this is a try-out
    link_env = dict(flower_env(homes / "superlink"), **{CA_KEY_ENV: "1"})
    procs["superlink"] = (start_process(args, log, link_env, cwd=co_kit), log)
    _wait("waiting for the SuperLink to accept connections", ready, procs, START_TIMEOUT_S)
    say(f"SuperLink up on 127.0.0.1:{port} ({transport}); log {log}")
    if not plaintext:
        names = [org.name for org in cfg.organisations]
        with ThreadPoolExecutor(max_workers=ENROL_WORKERS) as pool:  # each is a `flwr` CLI start (~1.5 s CPU)
            for name, outcome in zip(names, pool.map(lambda name: enrol(co_kit, name, env), names), strict=True):
                say(f"  enrolled {name}: {outcome}")
    return cli_home


def _start_supernodes(
    cfg: FederationConfig,
    kits: Path,
    logs: Path,
    homes: Path,
    procs: dict[str, tuple[subprocess.Popen, Path]],
    cli_home: Path,
    env: dict[str, str],
    say: Callable[[str], None],
    processes: dict[str, subprocess.Popen] | None,
    plaintext: bool,
) -> None:
    """Start one SuperNode per organisation (its kit's start-supernode.sh); wait until all are online and warm."""
    n = len(cfg.organisations)
    port = cfg.coordinator.port
    log_starts: dict[str, int] = {}
    for org in cfg.organisations:
        kit = kits / org.name
        log = logs / f"{org.name}.log"
        if plaintext:
            args = [os.environ.get(SUPERNODE_ENV, SUPERNODE), "--insecure", "--superlink", f"127.0.0.1:{port}"]
            args += ["--node-config", f"{NODE_CONFIG_FILE}='{kit / 'node.yaml'}'"]
        else:
            args = ["sh", str(kit / "start-supernode.sh")]
        args += ["--port", str(free_port())]
        log_starts[org.name] = log.stat().st_size if log.exists() else 0  # logs are appended to across runs
        procs[org.name] = (start_process(args, log, flower_env(homes / org.name), cwd=kit), log)
    if processes is not None:
        processes.update({name: proc for name, (proc, _) in procs.items()})

    def all_online() -> bool:
        return sum(node.get("status") == "online" for node in supernodes(cli_home, env)) >= n

    _wait(f"waiting for {n} SuperNodes to come online", all_online, procs, START_TIMEOUT_S)
    say(f"{n} SuperNodes online: {', '.join(o.name for o in cfg.organisations)}; logs in {logs}")
    if (os.environ.get(SUPERNODE_ENV) or SUPERNODE) == SUPERNODE and os.environ.get(SPEEDUPS_ENV) != "0":
        # each node's fedpriv-superexec imports torch & co. and builds its caches once (seconds of CPU per
        # node, 10 nodes sharing this machine's cores): the run starts once they have, as in a federation
        # whose nodes were started ahead of it, so that its first round does not pay for their start-up. A node
        # whose kit fell back to Flower's own SuperExec (a Flower that moved a patch point) has nothing to warm.
        def warm(name: str, start: int) -> bool:
            log = procs[name][1]
            return printed_since(log, start, READY_LINE) or printed_since(log, start, NODE_FALLBACK_LINE)

        def all_warm() -> bool:
            return all(warm(name, start) for name, start in log_starts.items())

        _wait("waiting for the SuperNodes' fedpriv-superexec to warm up", all_warm, procs, WARM_TIMEOUT_S)
        say(f"{n} SuperNodes warm (torch, transformers, PEFT, Opacus and the redaction rules loaded)")


def _submit_run(
    cfg: FederationConfig,
    logs: Path,
    homes: Path,
    cli_home: Path,
    env: dict[str, str],
    run: _LocalRun,
    config_path: str | None,
    run_timeout: float | None,
    verbose: bool,
    say: Callable[[str], None],
) -> int:
    """Write the run config and submit the run with ``flwr run --stream``, streaming it; its exit code."""
    if run.point is not None:  # the first run's config and overrides (the ClientApps read them too), plus resume
        run_config = write_run_config(logs / "run-config.resume.toml", *run.first_run, resume=run.point.run_dir)
        say(f"resuming {run.run_dir} after round {run.point.round} of {run.run_cfg.training.rounds}")
    else:
        run_config = write_run_config(logs / "run-config.toml", config_path, run.overrides)
    command = [
        "flwr",
        "run",
        str(app_dir(homes / "app")),
        cfg.federation,
        "--stream",
        "--run-config",
        str(run_config),
    ]
    say(f"$ FLWR_HOME={cli_home} " + shlex.join(command))
    run_log = logs / "flwr-run.log"
    return _stream(command, dict(env, FLWR_HOME=str(cli_home)), run_log, run_timeout, verbose, say)


def _plaintext_cli_home(home: Path, federation: str, port: int) -> Path:
    """A FLWR_HOME whose connection to the plaintext SuperLink is ``insecure = true``."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{federation}"\n\n[superlink."{federation}"]\n'
        f'address = "127.0.0.1:{port}"\ninsecure = true\n',
        encoding="utf-8",
    )
    return home


def _note_and_interrupt(caught: list[int]):
    """A handler for SIGINT and SIGTERM: note the first, unwind like Ctrl-C (the processes are stopped on the way)."""

    def handler(signum, frame) -> None:
        if not caught:
            caught.append(signum)
        interrupts.raise_keyboard_interrupt(signum, frame)

    return handler


def _stream(
    command: list[str],
    env: dict[str, str],
    log: Path,
    timeout: float | None,
    verbose: bool,
    say: Callable[[str], None],
) -> int:
    """Run ``flwr run --stream``, showing fedpriv's progress lines (everything with ``verbose``), all into ``log``."""
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
        text=True,
        errors="replace",
        start_new_session=True,
    )
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        import selectors

        with log.open("a", encoding="utf-8") as handle, selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            while True:
                if deadline is not None and time.monotonic() > deadline:
                    say(f"flwr run: still running after {timeout:.0f} s; stopping everything")
                    return 124
                if not sel.select(timeout=1.0):
                    continue
                line = proc.stdout.readline()
                if not line:
                    break
                handle.write(_ANSI.sub("", line))
                handle.flush()
                if _show_line(line, verbose):
                    say(_ANSI.sub("", line).rstrip())
        return proc.wait()
    finally:
        with interrupts.deferred_signals():  # a second Ctrl-C must not leave it running
            stop_process(proc, wait_s=5)


__all__ = [
    "FederationUpError",
    "ProvisioningError",
    "federation_up",
    "free_port",
    "flower_env",
    "group_alive",
    "processes_under",
    "start_process",
    "stop_process",
    "supernodes",
    "tls_ready",
]
