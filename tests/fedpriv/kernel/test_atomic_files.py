"""Atomic writes: a write either completes or leaves the previous file; a disk error is one line with its errno."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from fedpriv.kernel import atomic_files
from fedpriv.kernel.errors import DiskError, UserError
from tests.disk_faults import fill, tmpfs


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_a_write_that_fails_half_way_leaves_the_previous_file_and_no_temporary_file(tmp_path):
    path = tmp_path / "summary.json"
    atomic_files.write_text(path, '{"status": "running"}\n')
    with pytest.raises(RuntimeError), atomic_files.replacing(path) as tmp:
        tmp.write_text('{"status": "compl')  # half written, then the writer fails
        raise RuntimeError("the writer failed")
    assert path.read_text() == '{"status": "running"}\n'
    assert _leftovers(tmp_path) == []


def test_new_files_get_the_umask_mode_and_keys_their_own(tmp_path):
    atomic_files.write_text(tmp_path / "a.txt", "x")
    atomic_files.write_bytes(tmp_path / "a.key", b"k", 0o600)
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o666 & ~mask
    assert (tmp_path / "a.key").stat().st_mode & 0o777 == 0o600


def test_a_full_disk_leaves_the_previous_file_and_says_which_file_and_errno(tmp_path):
    with tmpfs(tmp_path / "disk", size="64k") as disk:
        path = disk / "metrics.csv"
        atomic_files.write_text(path, "round,accuracy\n1,0.5\n")
        fill(disk)
        with pytest.raises(DiskError) as caught:
            atomic_files.write_text(path, "round,accuracy\n1,0.5\n2,0.6\n" * 2000)
        assert str(caught.value) == f"cannot write {path}: [Errno 28] No space left on device"
        assert isinstance(caught.value, UserError)
        assert path.read_text() == "round,accuracy\n1,0.5\n"
        assert _leftovers(disk) == []


def test_a_read_only_folder_is_found_by_the_write_check(tmp_path):
    with tmpfs(tmp_path / "ro", size="64k", read_only=True) as folder:
        with pytest.raises(DiskError, match=r"^cannot write .*/ro: \[Errno 30\] Read-only file system$"):
            atomic_files.check_writable(folder)
        with pytest.raises(DiskError, match=r"^cannot write .*/ro/run: \[Errno 30\] Read-only file system$"):
            atomic_files.make_folder(folder / "run")


def test_several_files_are_written_as_one_change_or_not_at_all(tmp_path):
    with tmpfs(tmp_path / "disk", size="512k") as disk:
        atomic_files.write_all([(disk / "audit.json", b"old json", None)])
        filler = fill(disk, leave=8192)  # room for the small files, not for the big one
        files = [
            (disk / "audit.json", b"new json", None),
            (disk / "new" / "deeper" / "audit.md", b"new md", None),
            (disk / "audit.html", b"x" * 300_000, None),
        ]
        with pytest.raises(DiskError, match=r"audit\.html: \[Errno 28\]"):
            atomic_files.write_all(files)
        assert (disk / "audit.json").read_bytes() == b"old json"
        assert not (disk / "new").exists()  # the folders made for it are taken back
        assert _leftovers(disk) == []
        filler.unlink()
        atomic_files.write_all(files)
        assert (disk / "new" / "deeper" / "audit.md").read_bytes() == b"new md"


def test_a_folder_is_replaced_whole_or_left_as_it_was(tmp_path):
    target = tmp_path / "model"
    with atomic_files.replacing_folder(target) as folder:
        (folder / "a.txt").write_text("first")
    with pytest.raises(DiskError, match=r"^cannot write .*/model: \[Errno 28\] No space left on device$"):
        with atomic_files.replacing_folder(target) as folder:
            (folder / "a.txt").write_text("second, half")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert (target / "a.txt").read_text() == "first"
    assert _leftovers(tmp_path) == []
    with atomic_files.replacing_folder(target) as folder:
        (folder / "b.txt").write_text("second")
        assert atomic_files.relocated(str(folder / "b.txt"), folder, target) == str(target / "b.txt")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"] and _leftovers(tmp_path) == []
    mask = os.umask(0)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o777 & ~mask  # as mkdir makes it, not mkdtemp's 0700


def test_a_safetensors_io_error_is_read_for_its_errno(tmp_path):
    from safetensors import SafetensorError

    error = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert atomic_files.is_disk_failure(error)
    assert str(atomic_files.disk_error(tmp_path / "x", error)) == (
        f"cannot write {tmp_path / 'x'}: [Errno 28] No space left on device"
    )
    assert not atomic_files.is_disk_failure(SafetensorError("header too large"))
