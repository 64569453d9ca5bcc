"""``fedpriv simulate`` on a read-only folder and on a disk that fills up: one line, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.disk_faults import remount, tmpfs

TINY = [
    "model.name=tiny",
    "partitioning.num_orgs=2",
    "partitioning.scheme=iid",
    "data.max_examples=200",
    "training.batch_size=16",
]


def _simulate(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedpriv.cli", "simulate", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


def test_simulate_out_on_a_read_only_folder_stops_before_training_with_exit_2(tmp_path):
    with tmpfs(tmp_path / "ro", size="64k", read_only=True) as folder:
        for out in (folder / "run", folder):  # a new folder inside it; the (existing, empty) folder itself
            proc = _simulate(tmp_path, *TINY, "training.rounds=1", "--out", str(out))
            assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
            assert _error_lines(proc) == [f"error: cannot write {out}: [Errno 30] Read-only file system"]
            assert "[round" not in proc.stdout


def test_a_disk_that_fills_up_after_the_rounds_ends_incomplete_in_one_line_and_resumes_once_freed(tmp_path):
    # 2 MB hold the round of a tiny LoRA run (checkpoints, ledgers, summary: about 250 kB) but not the exported
    # model (about 9 MB): the disk is full once the rounds are over
    with tmpfs(tmp_path / "disk", size="2m") as disk:
        run = disk / "run"
        proc = _simulate(tmp_path, *TINY, "training.rounds=1", "--out", str(run))
        assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
        errors = _error_lines(proc)
        assert len(errors) == 1 and errors[0].startswith(
            f"error: cannot write {run / 'model'}: [Errno 28] No space left on device; the run stopped after round 1"
        ), errors
        summary = json.loads((run / "summary.json").read_text())
        assert summary["status"] == "incomplete" and len(summary["rounds"]) == 1
        assert summary["error"] == f"cannot write {run / 'model'}: [Errno 28] No space left on device"
        assert "Run incomplete" in proc.stdout
        assert not (run / "model").exists() and not [p for p in run.iterdir() if p.name.startswith(".")]
        remount(disk, "size=32m")  # space freed: --resume finishes the run without training again
        resumed = _simulate(tmp_path, "--resume", str(run))
        assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
        summary = json.loads((run / "summary.json").read_text())
        assert summary["status"] == "completed" and "error" not in summary
        assert (run / "model" / "merged" / "model.safetensors").is_file()
