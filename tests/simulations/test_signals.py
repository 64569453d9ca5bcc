"""Ctrl-C and SIGTERM on a real ``fedpriv simulate``: every process it started stops within seconds, one line on
stderr and no traceback, and the run folder is left ``interrupted`` and resumable.

The signal goes to the command's whole process group, as a terminal's Ctrl-C does.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fedpriv.kernel.interrupts import alive, process_tree
from fedpriv.server.resume import load_resume_point, resumable

pytestmark = pytest.mark.integration

RUN = [
    "model.name=tiny",
    "training.rounds=3",
    "partitioning.num_orgs=2",
    "data.max_examples=200",
    "training.batch_size=16",
    "data.max_length=32",
]
EXIT_BOUND_S = 30
START_TIMEOUT_S = 240


def _lines(stream, into: queue.Queue) -> None:
    for line in stream:
        into.put(line)
    into.put(None)


def _start(tmp_path: Path, err) -> subprocess.Popen:
    """A real ``fedpriv simulate`` into ``tmp_path/run``, in its own session (a terminal's process group)."""
    return subprocess.Popen(
        [sys.executable, "-m", "fedpriv.cli", "simulate", *RUN, "--out", str(tmp_path / "run")],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=err,
        text=True,
        start_new_session=True,
    )


def _interrupt(
    tmp_path: Path, sig: int, when: str, again: bool = False
) -> tuple[subprocess.Popen, str, str, dict[int, str], float]:
    """Start the run, send ``sig`` to its process group once a stdout line starts with ``when`` (``again``: a second
    time half a second later, as an impatient user does); (process, stdout, stderr, the processes it had started,
    seconds it took to exit after the signal)."""
    err = (tmp_path / "stderr.txt").open("w+")
    proc = _start(tmp_path, err)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_lines, args=(proc.stdout, lines), daemon=True).start()
    out: list[str] = []
    deadline = time.monotonic() + START_TIMEOUT_S
    tree: dict[int, str] = {}
    try:
        while not out or not out[-1].startswith(when):
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            assert line is not None, "".join(out) + (tmp_path / "stderr.txt").read_text()
            out.append(line)
        tree = process_tree([proc.pid])  # the command and everything under it, Ray included
        assert len(tree) > 3, tree
        os.killpg(proc.pid, sig)
        signalled = time.monotonic()
        if again:
            time.sleep(0.5)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
        try:
            proc.wait(EXIT_BOUND_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {EXIT_BOUND_S} s after {signal.Signals(sig).name}")
        took = time.monotonic() - signalled
    finally:
        if proc.poll() is None or alive(tree):  # never leave the failed run behind
            for pid in alive(tree):
                os.kill(pid, signal.SIGKILL)
            proc.wait(10)
    while (line := lines.get(timeout=10)) is not None:
        out.append(line)
    err.seek(0)
    return proc, "".join(out), err.read(), tree, took


def _no_process_left(tree: dict[int, str]) -> list[int]:
    deadline = time.monotonic() + 5
    while alive(tree) and time.monotonic() < deadline:
        time.sleep(0.2)
    return sorted(alive(tree))


def test_ctrl_c_after_round_one_stops_everything_and_leaves_a_resumable_run(tmp_path):
    """A second Ctrl-C while it stops changes nothing: still one line, the folder still marked."""
    proc, out, err, tree, took = _interrupt(tmp_path, signal.SIGINT, "[round 1/3]", again=True)
    assert proc.returncode == 130 and took < EXIT_BOUND_S
    assert "Traceback" not in err + out
    assert len(err.strip().splitlines()) == 1, err  # one line, nothing else
    run = (tmp_path / "run").resolve()
    assert err.startswith("interrupted (SIGINT): every process stopped;")
    assert f"{run} marked interrupted after round 1 of 3" in err and f"fedpriv simulate --resume {run}" in err
    assert _no_process_left(tree) == []
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted" and [r["round"] for r in summary["rounds"]] == [1]
    assert summary["interrupted"]["signal"] == "SIGINT" and summary["interrupted"]["after_round"] == 1
    assert resumable(load_resume_point(run)).round == 1  # what `fedpriv simulate --resume` checks first


def test_sigterm_in_round_one_stops_everything_and_leaves_a_resumable_run(tmp_path):
    proc, out, err, tree, took = _interrupt(tmp_path, signal.SIGTERM, "training: 3 round(s)")
    assert proc.returncode == 128 + signal.SIGTERM and took < EXIT_BOUND_S
    assert "Traceback" not in err + out and "SIGTERM received" not in err + out
    assert len(err.strip().splitlines()) == 1 and err.startswith("interrupted (SIGTERM)"), err
    assert "[round 1/3]" not in out
    assert _no_process_left(tree) == []
    run = (tmp_path / "run").resolve()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["rounds"] == []
    assert summary["interrupted"]["after_round"] == 0
    assert resumable(load_resume_point(run)).round == 0  # resumed, it starts again from the initial model


def test_a_simulation_process_killed_by_the_kernel_is_one_line_and_leaves_nothing_running(tmp_path):
    """The out-of-memory killer's SIGKILL lands on the simulation's own process, not on the command: Ray's agents
    outlive such a driver unless the command stops them."""
    err = (tmp_path / "stderr.txt").open("w+")
    proc = _start(tmp_path, err)
    tree: dict[int, str] = {}
    try:
        for line in proc.stdout:
            if line.startswith("[round 1/3]"):
                break
        tree = process_tree([proc.pid])
        children = [
            pid for pid in tree if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1] == str(proc.pid)
        ]
        assert len(children) == 1, tree  # the simulation's process
        os.kill(children[0], signal.SIGKILL)
        proc.communicate(timeout=EXIT_BOUND_S)
    finally:
        for pid in alive(tree):
            os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    err.seek(0)
    stderr = err.read()
    assert proc.returncode == 128 + signal.SIGKILL
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert "the simulation's process was killed by SIGKILL" in stderr
    assert _no_process_left(tree) == []
    run = (tmp_path / "run").resolve()
    assert resumable(load_resume_point(run)).round == 1
