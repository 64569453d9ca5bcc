"""Writes that either complete or leave the previous state, and disk errors as one line.

What others read (summary.json, metrics.csv, checkpoints, the exported model,
audit reports, kit files) is written to a temporary file in the same folder,
fsynced, then renamed over the old one: a reader, a resumed run or a later
provision sees the old file or the new one, never half of one, and a full
disk leaves the previous file as it was. An OSError (or a safetensors I/O
error) on the way becomes a :class:`DiskError` naming the file and the errno:
``cannot write /x/summary.json: [Errno 28] No space left on device``.
"""

from __future__ import annotations

import contextlib
import errno as errno_codes
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from fedpriv.kernel.errors import DiskError

_SAFETENSORS_ERRNO = re.compile(r"os error (\d+)|code: (\d+)")


def _errno_of(exc: BaseException) -> tuple[int | None, str]:
    """(errno, reason) of an OSError, or of a safetensors error that wraps one ("... (os error 28)")."""
    if isinstance(exc, OSError):
        return exc.errno, exc.strerror or str(exc)
    found = _SAFETENSORS_ERRNO.search(str(exc))
    if found:
        code = int(found.group(1) or found.group(2))
        return code, os.strerror(code)
    return None, " ".join(str(exc).split())


def is_disk_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is an I/O failure writing a file: an OSError, or safetensors' error wrapping one."""
    return isinstance(exc, OSError) or (type(exc).__name__ == "SafetensorError" and "os error" in str(exc))


def disk_error(path: str | Path, exc: BaseException) -> DiskError:
    """The one-line error for a failed write of ``path``."""
    code, reason = _errno_of(exc)
    return DiskError(f"cannot write {path}: " + (f"[Errno {code}] {reason}" if code is not None else reason))


@contextlib.contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Turn a disk failure inside the block into a DiskError naming ``path``."""
    try:
        yield
    except DiskError:
        raise
    except Exception as exc:
        if is_disk_failure(exc):
            raise disk_error(path, exc) from None
        raise


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (best effort: some file systems cannot fsync a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno_codes.EINVAL, errno_codes.EBADF, errno_codes.ENOTSUP):
            raise
    finally:
        os.close(fd)


def _umask() -> int:
    """The process's umask, read from /proc where it exists: setting it to read it would change it, for a
    moment, for every thread of the process."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o077)  # the strictest in the meantime
    os.umask(mask)
    return mask


def _default_mode() -> int:
    """What ``open(path, "w")`` would have made."""
    return 0o666 & ~_umask()


def make_folder(path: str | Path) -> Path:
    """``mkdir -p path``; a failure is a DiskError naming the folder."""
    path = Path(path)
    with writing(path):
        path.mkdir(parents=True, exist_ok=True)
    return path


def check_writable(folder: str | Path) -> None:
    """Create, fsync and remove a small file in ``folder``: a read-only or full folder is found before any work."""
    folder = Path(folder)
    with writing(folder):
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".fedpriv-write-check.", suffix=".tmp")
        try:
            os.write(fd, b"\0" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(tmp)


@contextlib.contextmanager
def replacing(path: str | Path, mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write by name; on success it replaces ``path`` atomically.

    ``mode``: the file's permissions (default: 0666 less the umask). On any error the temporary file is
    removed and ``path`` is left as it was; a disk failure is raised as a DiskError naming ``path``.
    """
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        tmp = Path(name)
        try:
            os.fchmod(fd, _default_mode() if mode is None else mode)
        finally:
            os.close(fd)
        try:
            yield tmp
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_folder(path.parent)


def write_bytes(path: str | Path, data: bytes, mode: int | None = None) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`replacing`)."""
    with replacing(path, mode) as tmp, open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
    return Path(path)


def write_text(path: str | Path, text: str, mode: int | None = None) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return write_bytes(path, text.encode("utf-8"), mode)


def _make_parents(folder: Path, created: list[Path]) -> None:
    """``mkdir -p folder``, noting each folder it made (so a failed write can take them back)."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for each in reversed(missing):
        each.mkdir()
        created.append(each)


def write_all(files: list[tuple[Path, bytes, int | None]]) -> None:
    """Write several files as one change: every one, or (on any failure before the renames) none.

    Each ``(path, data, mode)`` is first written in full to a temporary file beside it and fsynced; only when
    all are written are they renamed into place, in the order given (a rename takes no space). On a failure
    the temporary files and the folders made for them are removed: the files and folders are as they were.
    """
    staged: list[tuple[Path, Path]] = []
    created: list[Path] = []
    current: Path | None = None
    try:
        for path, data, mode in files:
            current = Path(path)
            _make_parents(current.parent, created)
            fd, name = tempfile.mkstemp(dir=current.parent, prefix=f".{current.name}.", suffix=".tmp")
            staged.append((Path(name), current))
            with os.fdopen(fd, "wb") as handle:
                os.fchmod(handle.fileno(), _default_mode() if mode is None else mode)
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
        for tmp, current in staged:
            os.replace(tmp, current)
        for folder in dict.fromkeys(target.parent for _, target in staged):
            _fsync_folder(folder)
    except BaseException as exc:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        for folder in reversed(created):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty: a folder an earlier rename filled stays
        if isinstance(exc, Exception) and is_disk_failure(exc) and current is not None:
            raise disk_error(current, exc) from None
        raise


@contextlib.contextmanager
def replacing_folder(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it takes ``path``'s place (an old one is removed).

    On any error the temporary folder is removed (freeing what it took on a full disk) and ``path`` is left
    as it was; a disk failure is raised as a DiskError naming ``path``.
    """
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
        try:
            os.chmod(tmp, 0o777 & ~_umask())  # what mkdir would make (mkdtemp makes it 0700)
            yield tmp
            old = None
            if path.exists():
                old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
                os.replace(path, old / path.name)
            try:
                os.replace(tmp, path)
            except BaseException:
                if old is not None:
                    os.replace(old / path.name, path)  # the previous folder back in its place
                    old.rmdir()
                raise
            _fsync_folder(path.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def relocated(value: str, tmp: Path, final: Path) -> str:
    """A path written inside ``replacing_folder``'s temporary folder, as it reads once the folder is in place."""
    try:
        return str(final / Path(value).relative_to(tmp))
    except ValueError:
        return value
