"""One run at a time in a run folder: an exclusive ``flock`` on ``RUN_DIR/run.lock``, held for the whole run.

Two runs writing one folder overwrite each other's summary, model and
checkpoints, and their nodes refuse each other's privacy spending. The lock is
taken before the folder's emptiness is checked (so two starts cannot both pass
the check) and is released by the kernel when its process dies: a crashed or
killed run never leaves its folder stuck. The file keeps the holder's PID, so
the refused run can say who holds the folder.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from fedpriv.kernel.atomic_files import writing
from fedpriv.kernel.errors import ConfigError, UserError

LOCK_FILE = "run.lock"


class RunFolderBusy(UserError):
    """Another live run holds the run folder."""


class RunLock:
    """A held lock; ``release()`` (or leaving the ``with`` block) lets the next run in."""

    def __init__(self, folder: Path, fd: int) -> None:
        self.folder = folder
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor of the open file drops the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def holder(folder: Path) -> str:
    """The PID written by the run that holds ``folder`` ("unknown PID" if it is not readable).

    The holder writes it right after taking the lock: an empty file is read again for up to a second.
    """
    deadline = time.monotonic() + 1.0
    while True:
        try:
            text = (Path(folder) / LOCK_FILE).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            return "unknown PID"
        if text or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    pid = text.split()[0] if text else ""
    return f"PID {pid}" if pid.isdigit() else "unknown PID"


def _busy(folder: Path, flag: str) -> RunFolderBusy:
    return RunFolderBusy(
        f"{flag} {folder}: in use by another fedpriv run ({holder(folder)}); wait for it to end, stop it,"
        " or choose another run folder"
    )


def lock_run_dir(folder: str | Path, *, fresh: bool, flag: str = "--out") -> RunLock:
    """Lock ``folder`` (created if missing) for this process; RunFolderBusy if a live run holds it.

    ``fresh``: the folder must be empty apart from the lock file (a new run); checked after the lock is held,
    so that of two runs started together exactly one gets the folder. A resumed run passes ``fresh=False``.
    """
    folder = Path(folder).resolve()
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{flag} {folder}: is a file, not a run folder; choose a new run folder")
    if fresh and folder.is_dir():
        _check_empty(folder, flag, probe=True)  # before writing anything into a folder that is not ours
    with writing(folder):  # a read-only or full disk: one line naming the run folder and the errno
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise _busy(folder, flag) from None
    lock = RunLock(folder, fd)
    try:
        with writing(folder / LOCK_FILE):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        if fresh:
            _check_empty(folder, flag, probe=False)  # again, now that it is ours: a run that ended may have written
    except BaseException:
        lock.release()
        raise
    return lock


def _check_empty(folder: Path, flag: str, *, probe: bool) -> None:
    """ConfigError unless a new run may use ``folder`` (:func:`new_run_problem`); ``probe``: say so first if a run holds it."""
    problem = new_run_problem(folder)
    if problem is not None:
        if probe and _held_by_other(folder):
            raise _busy(folder, flag)
        raise ConfigError(f"{flag} {folder}: {problem}")


SUMMARY_FILE = "summary.json"  # fedpriv.server.reports.SUMMARY_FILE: what a run that ran leaves
LOGS_DIR = "logs"  # `fedpriv federation up` writes its processes' logs here before the ServerApp starts


def new_run_problem(folder: str | Path) -> str | None:
    """Why a new run may not write into ``folder`` (None: it may): the one rule for every way a run starts.

    ``fedpriv simulate`` (through :func:`lock_run_dir`), `fedpriv federation up` and the ServerApp itself
    (``run.out_dir``) all ask this. A missing folder, or one holding nothing but the run lock and ``logs/``
    (what `fedpriv federation up` puts there before its ServerApp starts), may be used; anything else is
    refused, because a run's privacy state (ledgers, checkpoints, resume point) must never be reused by
    another run. This is the simulator's rule (the stricter of the two there were: the ServerApp and `fedpriv
    federation up` refused only a folder with a summary, and would mix a new run into a crashed run's
    ledgers); both messages are kept, each for its own case: a folder with a summary "already exists and holds
    a run", any other leftover makes it "already exists and is not an empty folder".
    """
    folder = Path(folder)
    if folder.is_file():
        return "is a file, not a run folder; choose a new run folder"
    if not folder.is_dir():
        return None
    if (folder / SUMMARY_FILE).exists():
        return (
            "already exists and holds a run (its summary.json); choose a new run folder"
            " (a run's files are never overwritten by another run)"
        )
    leftovers = [e for e in folder.iterdir() if e.name != LOCK_FILE and not (e.name == LOGS_DIR and e.is_dir())]
    if leftovers:
        return (
            "already exists and is not an empty folder; choose a new run folder"
            " (a run's privacy state is never reused by another run)"
        )
    return None


def _held_by_other(folder: Path) -> bool:
    """Whether a live process holds ``folder``'s lock (tested without creating the lock file)."""
    try:
        fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also drops the probe's own lock
    return False
