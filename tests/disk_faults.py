"""Disk faults made real for tests: a small tmpfs (a disk that fills up) and a read-only one.

Mounting needs root and mount rights (a container may refuse them): then the test is skipped with the
reason. Every mount is undone when the ``with`` block ends, whatever happened inside it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


def _mount(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["mount", *args], capture_output=True, text=True)


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "1m", read_only: bool = False) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted on ``path`` (made if missing); ``read_only``: mounted read-only."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("disk-fault tests mount a tmpfs: they need root")
    mounted = _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path))
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip() or 'mount failed'})")
    try:
        if read_only:
            remount(path, "ro")
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)  # busy: detach it now, freed when idle


def remount(path: Path, options: str) -> None:
    """Change a mounted tmpfs's options (``ro``, ``rw``)."""
    done = _mount("-o", f"remount,{options}", str(path))
    assert done.returncode == 0, done.stderr


def fill(folder: Path, leave: int = 0) -> Path:
    """Fill the file system of ``folder`` with one file until at most ``leave`` bytes stay free; returns it."""
    filler = folder / "filler.bin"
    with open(filler, "wb", buffering=0) as handle:
        chunk = b"\0" * 65536
        try:
            while True:
                stat = os.statvfs(folder)
                free = stat.f_bavail * stat.f_frsize
                if free <= leave:
                    break
                handle.write(chunk[: max(1, min(len(chunk), free - leave))])
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    return filler
