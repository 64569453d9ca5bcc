"""A small lab of Linux network namespaces, so that each party of a test federation gets its own address and stack.

Why: a deployment test that runs SuperLink, SuperNodes and proxies as plain processes on one machine puts them all on
one loopback, where "this port is only bound to 127.0.0.1" or "only the proxy may reach the SuperLink" cannot be
checked. With one namespace per party, each has its own ``lo`` and its own ``eth0`` on a private bridge, so a listener
on 127.0.0.1 really is private and a forbidden path really fails.

Layout made by :class:`NetLab` (``base`` is ``{prefix}-{pid}-{token}``)::

    {base}.sw    switch namespace: bridge br0, ports p0, p1, ... (one veth end per host)
    {base}-{h}   one namespace per host h: lo and eth0 (the veth peer) with the host's address

Nothing is created in the root namespace: veth pairs are made inside the switch namespace with the peer end placed
straight into the host namespace. The subnet lies in 198.18.0.0/15 (RFC 2544, benchmarking), never in the RFC 1918
ranges a developer or CI machine may route. Needs root (or CAP_SYS_ADMIN + CAP_NET_ADMIN) and ``ip`` from iproute2;
:func:`netns_missing_reason` says why a machine cannot, so tests skip instead of failing.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import random
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

IP_TIMEOUT_S = 10.0
"""Upper bound for every ``ip`` call: a wedged netlink call must fail the test, not hang it."""

TERM_GRACE_S = 5.0
"""How long started processes get between SIGTERM and SIGKILL on exit."""

LAB_RANGE = ipaddress.IPv4Network("198.18.0.0/15")
"""RFC 2544 benchmarking range: reserved, never routed, no clash with 10/8, 172.16/12 or 192.168/16 networks."""

_PREFIX_RE = re.compile(r"^[a-z][a-z0-9]{0,11}$")
_HOST_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$")

_PROBE_CODE = """
import errno, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.settimeout(float(sys.argv[3]))
try:
    s.connect((sys.argv[1], int(sys.argv[2])))
    print("connected")
except ConnectionRefusedError:
    print("refused")
except TimeoutError:
    print("timeout")
except OSError as exc:
    print(errno.errorcode.get(exc.errno, "error").lower() if exc.errno else "error")
"""


class NetnsError(RuntimeError):
    """An ``ip`` command failed or timed out; the message names the command and its stderr."""


def _ip(*args: str, timeout: float = IP_TIMEOUT_S) -> str:
    """Run ``ip ARGS`` and return its stdout; raise :class:`NetnsError` naming the command on failure or timeout."""
    cmd = ["ip", *args]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise NetnsError(f"`{' '.join(cmd)}` timed out after {timeout:g} s") from exc
    except OSError as exc:
        raise NetnsError(f"`{' '.join(cmd)}` could not start: {exc}") from exc
    if done.returncode != 0:
        raise NetnsError(f"`{' '.join(cmd)}` failed (exit {done.returncode}): {done.stderr.strip() or '(no stderr)'}")
    return done.stdout


def list_namespaces() -> list[str]:
    """Names of the named network namespaces (``ip netns list`` prints ``name`` or ``name (id: N)`` per line)."""
    return [line.split()[0] for line in _ip("netns", "list").splitlines() if line.strip()]


def namespace_pids(ns: str) -> list[int]:
    """Pids of the processes living in namespace ``ns``; empty if it is gone."""
    try:
        out = _ip("netns", "pids", ns)
    except NetnsError:
        return []
    return [int(tok) for tok in out.split() if tok.isdigit()]


def _pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (a zombie holds no namespace)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            state = handle.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _kill_namespace_processes(ns: str, grace_s: float = 1.0) -> None:
    """SIGTERM everything still in ``ns``, then SIGKILL what survives ``grace_s``.

    A named namespace whose name is deleted lives on while a process is inside, so this must run before ``ip netns
    del``. Catches what escaped our process groups (daemons that called setsid, orphans of a finished ``run``).
    """
    pids = namespace_pids(ns)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(_pid_alive(pid) for pid in pids):
            time.sleep(0.05)
        pids = [pid for pid in namespace_pids(ns) if _pid_alive(pid)]
        if not pids:
            return


def _delete_namespace(ns: str) -> None:
    """Kill whatever lives in ``ns`` and delete it (its veth ends go with it); a missing namespace is fine."""
    _kill_namespace_processes(ns)
    try:
        _ip("netns", "delete", ns)
    except NetnsError:
        if ns in list_namespaces():
            raise


def remove_stale_namespaces(prefix: str) -> list[str]:
    """Delete namespaces that an earlier, crashed :class:`NetLab` with this ``prefix`` left behind; return their names.

    Lab namespaces are named ``{prefix}-{pid}-{token}...`` after the creating process, so only those whose creator is
    dead are removed: a lab with the same prefix running in a live parallel process (pytest-xdist) is left alone. A
    reused pid can keep a stale namespace a while longer, which is harmless (addresses live only inside the lab).
    """
    pattern = re.compile(rf"^{re.escape(prefix)}-(\d+)-[0-9a-f]{{4}}[-.]")
    removed = []
    for ns in list_namespaces():
        match = pattern.match(ns)
        if match is None or _pid_alive(int(match.group(1))):
            continue
        _delete_namespace(ns)
        removed.append(ns)
    return removed


@functools.cache
def netns_missing_reason() -> str | None:
    """None when this machine can run a :class:`NetLab`, else a one-line reason (for ``pytest.skip``). Cached.

    Tries the real thing on a throwaway namespace (add, bridge, veth, delete) rather than guessing from uid or kernel
    config: containers are often root without CAP_SYS_ADMIN, or lack the bridge/veth modules.
    """
    if not sys.platform.startswith("linux"):
        return f"network namespaces need Linux, not {sys.platform}"
    if shutil.which("ip") is None:
        return "no `ip` binary (install iproute2)"
    if os.geteuid() != 0:
        return "not root: `ip netns add` needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN)"
    probe = f"netnsprobe-{os.getpid()}-{secrets.token_hex(2)}"
    try:
        _ip("netns", "add", probe)
    except NetnsError as exc:
        return f"cannot create a network namespace: {exc}"
    try:
        _ip("-n", probe, "link", "add", "br0", "type", "bridge")
        _ip("-n", probe, "link", "add", "v0", "type", "veth", "peer", "name", "v1")
        _ip("-n", probe, "link", "set", "lo", "up")
    except NetnsError as exc:
        return f"namespaces work but bridge/veth do not: {exc}"
    finally:
        try:
            _ip("netns", "delete", probe)
        except NetnsError:
            pass
    return None


def _default_subnet() -> ipaddress.IPv4Network:
    """A random /24 of 198.18.0.0/15 (512 choices), so parallel labs rarely share one (harmless if they do)."""
    rng = random.Random(os.getpid() ^ secrets.randbits(32))
    return list(LAB_RANGE.subnets(new_prefix=24))[rng.randrange(512)]


class NetLab:
    """Context manager: one network namespace per host on one private bridge, torn down completely on exit.

    ``prefix`` is short lowercase ASCII (it starts every namespace name; :func:`remove_stale_namespaces` keys on it);
    ``hosts`` are distinct names made of letters, digits and ``_``. Inside a host, the lab link is ``eth0``; the
    host's address is :meth:`address`. Every process started through :meth:`popen` or :meth:`run` is killed on exit,
    as is anything else found living in the lab's namespaces, and then the namespaces are deleted, also when the body
    raised or was interrupted.
    """

    def __init__(self, prefix: str, hosts: Sequence[str], subnet: str | None = None) -> None:
        if not _PREFIX_RE.match(prefix):
            raise ValueError(f"prefix must match {_PREFIX_RE.pattern}: {prefix!r}")
        if not hosts or len(set(hosts)) != len(hosts) or not all(_HOST_RE.match(h) for h in hosts):
            raise ValueError(f"hosts must be distinct names matching {_HOST_RE.pattern}: {hosts!r}")
        net = ipaddress.IPv4Network(subnet) if subnet is not None else _default_subnet()
        if net.num_addresses - 2 < len(hosts):
            raise ValueError(f"subnet {net} is too small for {len(hosts)} hosts")
        self.prefix = prefix
        self.hosts = list(hosts)
        self.subnet = net
        self.base = f"{prefix}-{os.getpid()}-{secrets.token_hex(2)}"
        self.switch_ns = f"{self.base}.sw"
        self._ns = {host: f"{self.base}-{host}" for host in self.hosts}
        hosts_iter = net.hosts()
        self._addr = {host: str(next(hosts_iter)) for host in self.hosts}
        self._created: list[str] = []
        self._procs: list[subprocess.Popen] = []
        self._entered = False

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> NetLab:
        if self._entered:
            raise RuntimeError("a NetLab can be entered once")
        self._entered = True
        remove_stale_namespaces(self.prefix)
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _add_namespace(self, ns: str) -> None:
        _ip("netns", "add", ns)
        self._created.append(ns)
        _ip("-n", ns, "link", "set", "lo", "up")

    def _build(self) -> None:
        sw = self.switch_ns
        self._add_namespace(sw)
        _ip("-n", sw, "link", "add", "br0", "type", "bridge")
        _ip("-n", sw, "link", "set", "br0", "up")
        for index, host in enumerate(self.hosts):
            ns, port = self._ns[host], f"p{index}"
            self._add_namespace(ns)
            # Made inside the switch namespace with the peer placed straight into the host one: never in the root ns.
            _ip("-n", sw, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("-n", sw, "link", "set", port, "master", "br0")
            _ip("-n", sw, "link", "set", port, "up")
            _ip("-n", ns, "addr", "add", f"{self._addr[host]}/{self.subnet.prefixlen}", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")

    def close(self) -> None:
        """Kill started processes (group SIGTERM, up to 5 s, then SIGKILL), then anything left inside, then delete.

        Idempotent. Keeps going past individual failures and raises the first one at the end, so one stuck namespace
        does not leave the others behind.
        """
        self._stop_processes()
        errors: list[BaseException] = []
        for ns in reversed(self._created):
            try:
                _delete_namespace(ns)
            except NetnsError as exc:
                errors.append(exc)
        self._created.clear()
        if errors:
            raise errors[0]

    def _stop_processes(self) -> None:
        live = [proc for proc in self._procs if proc.poll() is None]
        for sig, grace in ((signal.SIGTERM, TERM_GRACE_S), (signal.SIGKILL, TERM_GRACE_S)):
            for proc in live:
                try:
                    os.killpg(proc.pid, sig)  # started with start_new_session, so its pid is its group id
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace
            for proc in live:
                try:
                    proc.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
            live = [proc for proc in live if proc.poll() is None]
            if not live:
                break
        for proc in self._procs:  # close our ends of pipes so no ResourceWarning and no blocked writers
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
        self._procs.clear()

    # ------------------------------------------------------------------ lookups

    def address(self, host: str) -> str:
        """The IPv4 address of ``host`` on the lab bridge (on its ``eth0``)."""
        return self._addr[host]

    def ns(self, host: str) -> str:
        """The network namespace name of ``host``."""
        return self._ns[host]

    @property
    def namespaces(self) -> list[str]:
        """All namespaces of this lab, switch included."""
        return [self.switch_ns, *self._ns.values()]

    # ------------------------------------------------------------------ processes

    def command(self, host: str, args: Sequence[str]) -> list[str]:
        """``args`` prefixed to run inside ``host``'s namespace (``ip netns exec`` execs, so the pid is the program's)."""
        return ["ip", "netns", "exec", self._ns[host], *args]

    def popen(self, host: str, args: Sequence[str], **kw: Any) -> subprocess.Popen:
        """Start ``args`` in ``host`` in a new session (own process group), killed on exit; ``kw`` go to Popen."""
        if not self._created:
            raise RuntimeError("NetLab is not entered")
        proc = subprocess.Popen(self.command(host, args), start_new_session=True, **kw)
        self._procs.append(proc)
        return proc

    def run(
        self,
        host: str,
        args: Sequence[str],
        timeout: float,
        *,
        check: bool = False,
        input: str | bytes | None = None,
        **kw: Any,
    ) -> subprocess.CompletedProcess:
        """Run ``args`` in ``host`` to completion, like ``subprocess.run`` but text and captured output by default.

        On timeout the whole process group is killed (not just the leader) before ``TimeoutExpired`` is raised. As with
        ``subprocess.run``, captured output is read to EOF: a background child that keeps the pipes open keeps ``run``
        waiting until ``timeout``; give such children ``stdout=DEVNULL``.
        """
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        kw.setdefault("text", True)
        if input is not None:
            kw["stdin"] = subprocess.PIPE
        proc = self.popen(host, args, **kw)
        try:
            out, err = proc.communicate(input=input, timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:  # a child that left the group (setsid) may still hold our pipes: do not wait for its EOF
                proc.communicate(timeout=1)
            except subprocess.TimeoutExpired:
                for stream in (proc.stdin, proc.stdout, proc.stderr):
                    if stream is not None:
                        stream.close()
                proc.wait(timeout=1)
            raise
        finally:
            if proc.poll() is not None and proc in self._procs:
                self._procs.remove(proc)
        done = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        if check:
            done.check_returncode()
        return done

    # ------------------------------------------------------------------ probes

    def tcp_probe(self, src: str, address: str, port: int, timeout: float = 1.0) -> str:
        """Try a TCP connect from ``src`` to ``address:port``: ``connected``, ``refused``, ``timeout`` or an errno.

        ``refused`` means the packet reached a live stack with nothing listening: good for "reachable but closed".
        """
        done = self.run(
            src, [sys.executable, "-c", _PROBE_CODE, address, str(port), str(timeout)], timeout=timeout + 10
        )
        return done.stdout.strip() or f"error: {done.stderr.strip()}"

    def ping_ok(self, src: str, dst: str, timeout: float = 1.0) -> bool:
        """Whether ``src`` reaches ``dst``'s lab address: ``ping -c1`` when installed, else a TCP probe to port 9.

        Without ping, a refused connection counts as reachable (the RST came from ``dst``'s stack).
        """
        address = self.address(dst)
        if shutil.which("ping"):
            done = self.run(src, ["ping", "-c1", f"-W{max(1, round(timeout))}", address], timeout=timeout + 10)
            return done.returncode == 0
        return self.tcp_probe(src, address, 9, timeout) in ("connected", "refused")
