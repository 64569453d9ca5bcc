"""``fedpriv simulate`` on a read-only folder and on a disk that fills up: one line, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.disk_faults import fill, tmpfs
from tests.shared_runs import simulate_in_sequence

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
        # --out a new folder inside it, and the (existing, empty) folder itself: both in one process (shared_runs)
        args = [*TINY, "training.rounds=1"]
        runs = simulate_in_sequence(folder, {"run": args, ".": args}, stderr=True)
        for code, stdout, stderr, out in runs.values():
            assert code == 2, stdout[-2000:] + stderr[-2000:]
            assert "Traceback" not in stdout + stderr, stderr[-3000:]
            errors = [line for line in stderr.splitlines() if line.startswith("error:")]
            assert errors == [f"error: cannot write {out}: [Errno 30] Read-only file system"]
            assert "[round" not in stdout
        assert sorted(str(out) for *_, out in runs.values()) == sorted([str(folder), str(folder / "run")])


def test_a_disk_too_small_for_the_exported_model_ends_incomplete_in_one_line(tmp_path):
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


def test_a_disk_filled_after_round_1_stops_the_run_in_one_line_and_it_resumes_once_freed(tmp_path):
    with tmpfs(tmp_path / "disk", size="4m") as disk:
        run = disk / "run"
        args = [*TINY, "training.rounds=2", "output.export_model=false", "--out", str(run)]
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedpriv.cli", "simulate", *args],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("[round 1/2]"):
                fill(disk)  # the disk is full from now on: round 2's files cannot be written
        assert proc.wait(timeout=300) == 1, "".join(lines)[-3000:]
        output = "".join(lines)
        assert "Traceback" not in output, output[-3000:]
        errors = [line for line in lines if line.startswith("error:")]
        assert len(errors) == 1 and "[Errno 28] No space left on device" in errors[0], output[-3000:]
        assert "the run stopped after round" in errors[0]
        summary = json.loads((run / "summary.json").read_text())
        if "its summary could not be updated" not in errors[0]:
            assert summary["status"] == "incomplete" and summary["error"] in errors[0]
        assert json.loads((run / "checkpoints" / "resume.json").read_text())["round"] >= 1
        (disk / "filler.bin").unlink()  # space freed: the run continues after its last complete round
        resumed = _simulate(tmp_path, "--resume", str(run))
        assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
        summary = json.loads((run / "summary.json").read_text())
        assert summary["status"] == "completed" and len(summary["rounds"]) == 2 and "error" not in summary
