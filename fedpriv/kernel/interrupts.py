"""Ctrl-C and SIGTERM on a run: stop every process the command started, mark the run folder, say one line.

Why not just let KeyboardInterrupt unwind: Flower's ``run_simulation`` runs
the ServerApp in a non-daemon thread that waits for replies with no deadline,
and on Ctrl-C stops Ray under it; the interpreter then waits for ever to join
that thread (and a second Ctrl-C ends in a ``threading`` traceback). Ray's
``init`` also replaces the SIGTERM handler, and its C++ core prints an absl
dump on SIGTERM. So a run's training processes live in a session of their own
(``fedpriv simulate``: a forked child; ``federation up``: each started process),
and the command's own process, which never starts Ray, takes the signal, kills
what it started (SIGKILL: every file a run writes is atomic or replayed, see
server/resume.py), and marks ``summary.json`` ``interrupted`` (server/reports.py): a resumable
status, like ``running``. Nothing here knows a run's files: the signals and the process table only.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_PR_SET_PDEATHSIG = 1


class Interrupted(Exception):
    """The run was stopped by a signal; ``str()`` is the one line to print, ``exit_code`` 128 + the signal."""

    def __init__(self, message: str, signum: int = signal.SIGINT) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


@dataclass
class StopRequest:
    signum: int | None = None


_stopping = False  # a stop is under way: a further SIGINT/SIGTERM only waits for it (see raise_keyboard_interrupt)


@contextlib.contextmanager
def deferred_signals() -> Iterator[StopRequest]:
    """SIGINT/SIGTERM only recorded (the caller polls ``StopRequest.signum``) while inside; main thread only."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def note(signum, frame) -> None:
        global _stopping
        _stopping = True
        if request.signum is None:
            request.signum = signum

    previous = {sig: signal.signal(sig, note) for sig in SIGNALS}
    try:
        yield request
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def raise_keyboard_interrupt(signum, frame) -> None:
    """A SIGINT/SIGTERM handler: unwind like Ctrl-C (``finally`` blocks and the caller's cleanup run), once: a
    second signal while a stop is under way is ignored, so that it cannot cut the cleanup or its one line short."""
    global _stopping
    if _stopping:
        return
    _stopping = True
    raise KeyboardInterrupt


def arm() -> None:
    """A new command starts: the next SIGINT/SIGTERM interrupts it again."""
    global _stopping
    _stopping = False


@contextlib.contextmanager
def terminal_signals() -> Iterator[None]:
    """SIGINT and SIGTERM handled by :func:`raise_keyboard_interrupt` while inside (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arm()
    previous = {sig: signal.signal(sig, raise_keyboard_interrupt) for sig in SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def become_session_leader(parent: int) -> None:
    """In a freshly forked child of ``parent``: its own session (a terminal's Ctrl-C reaches only the parent),
    default signal handling, and SIGKILL when the parent dies (a killed ``fedpriv`` never leaves training
    running, nor its run folder locked: the child holds the parent's lock too)."""
    os.setsid()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the request above took effect
        os._exit(1)


# --------------------------------------------------------------------------- the process table


def _stat(pid: int) -> list[str] | None:
    """``/proc/PID/stat`` fields after the command name (index 0: state, 1: ppid, 3: session, 19: start time)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _table() -> dict[int, list[str]]:
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields is not None:
                table[int(entry.name)] = fields
    return table


def process_tree(roots: Iterable[int]) -> dict[int, str]:
    """Every live process under ``roots`` (the roots included): their descendants and the members of the sessions
    they lead, by PID, with the start time that tells a PID from a later process given the same number."""
    table = _table()
    roots = set(roots)  # a root that has ended still names its session (Ray's agents outlive a killed driver)
    found = {pid for pid in roots if pid in table}
    changed = True
    while changed:
        changed = False
        for pid, fields in table.items():
            if pid not in found and (int(fields[1]) in found or int(fields[3]) in roots):
                found.add(pid)
                changed = True
    return {pid: table[pid][19] for pid in found if table[pid][0] not in "ZX"}


def alive(processes: dict[int, str]) -> dict[int, str]:
    """The processes of ``processes`` still running (same PID and start time, not a zombie)."""
    left = {}
    for pid, started in processes.items():
        fields = _stat(pid)
        if fields is not None and fields[19] == started and fields[0] not in "ZX":
            left[pid] = started
    return left


def kill_processes(processes: dict[int, str], sig: int = signal.SIGKILL, wait_s: float = 10.0) -> dict[int, str]:
    """Send ``sig`` to each of ``processes`` still running, wait up to ``wait_s`` for them to go; what is left."""
    for pid in alive(processes):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)
    deadline = time.monotonic() + wait_s
    left = alive(processes)
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = alive(left)
    return left


def stop_tree(root: int) -> dict[int, str]:
    """SIGKILL ``root`` (a session leader we forked, running or ended) and every process under it or in its
    session; the processes left (none)."""
    tree = process_tree([root])
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(root, signal.SIGKILL)  # the session's group first: nothing in it can start another process
    left = kill_processes(tree)
    left.update(kill_processes(process_tree([root])))  # started between the two looks
    left.pop(root, None)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(root, 0)
    return left
