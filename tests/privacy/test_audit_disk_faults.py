"""``fedpriv audit --out`` on a read-only or full folder: one line, and no empty or half audit file."""

from __future__ import annotations

import pytest

from fedpriv.cli import main
from tests.disk_faults import fill, tmpfs
from tests.privacy.test_audit import run_dir  # noqa: F401 - the fixture: a run folder with two honest ledgers


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


def test_audit_out_on_a_read_only_folder_is_one_line_and_writes_nothing(run_dir, tmp_path, capsys):  # noqa: F811
    with tmpfs(tmp_path / "ro", size="64k", read_only=True) as folder:
        assert main(["audit", str(run_dir), "--no-prv", "--out", str(folder)]) == 2
        assert _one_line(capsys) == f"error: cannot write {folder / 'audit.json'}: [Errno 30] Read-only file system"
        assert list(folder.iterdir()) == []


@pytest.mark.parametrize("earlier", [False, True], ids=["first-audit", "earlier-audit-kept"])
def test_audit_out_on_a_full_folder_is_one_line_and_leaves_no_empty_audit_json(run_dir, tmp_path, capsys, earlier):  # noqa: F811
    with tmpfs(tmp_path / "disk", size="256k") as folder:
        if earlier:
            assert main(["audit", str(run_dir), "--no-prv", "--out", str(folder)]) == 0
            capsys.readouterr()
        before = {p.name: p.read_bytes() for p in folder.iterdir()}
        fill(folder)
        assert main(["audit", str(run_dir), "--no-prv", "--out", str(folder)]) == 2
        err = _one_line(capsys)
        assert err.startswith(f"error: cannot write {folder}/audit.") and err.endswith(
            "[Errno 28] No space left on device"
        )
        after = {p.name: p.read_bytes() for p in folder.iterdir() if p.name != "filler.bin"}
        assert after == before  # no 0-byte audit.json; an earlier audit's three files as they were
