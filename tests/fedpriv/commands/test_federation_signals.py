"""Ctrl-C on a real ``fedpriv federation up``: every process it started (SuperLink, SuperNodes, and the SuperExecs,
ServerApp and ClientApps that start sessions of their own) is stopped within seconds, one line on stderr, no
traceback, and the run folder is left ``interrupted`` and resumable with ``--resume``."""

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

import pytest
import yaml

from fedpriv.commands.local_federation import processes_under
from fedpriv.kernel.interrupts import alive, process_tree
from fedpriv.server.resume import load_resume_point, resumable
from tests.deployment.helpers import write_csv

pytestmark = pytest.mark.integration

EXIT_BOUND_S = 30
START_TIMEOUT_S = 420


def _lines(stream, into: queue.Queue) -> None:
    for line in stream:
        into.put(line)
    into.put(None)


def test_ctrl_c_after_round_one_stops_every_process_and_leaves_a_resumable_run(tmp_path):
    orgs = []
    for seed, name in enumerate(("org-a", "org-b")):
        write_csv(tmp_path / f"{name}.csv", 80, seed)
        orgs.append({"name": name, "device": "cpu", "data": {"path": f"{name}.csv"}})
    fed = {"federation": "sig-fed", "coordinator": {"addresses": ["127.0.0.1"]}, "organisations": orgs}
    (tmp_path / "FEDERATION.yaml").write_text(yaml.safe_dump(fed, sort_keys=False), encoding="utf-8")
    kits, run = tmp_path / "kits", tmp_path / "run"
    command = [sys.executable, "-m", "fedpriv.cli", "federation", "up", str(tmp_path / "FEDERATION.yaml")]
    command += ["--kits", str(kits), "--rounds", "3", "--out", str(run), "model.name=tiny", "training.batch_size=32"]
    err = (tmp_path / "stderr.txt").open("w+")
    proc = subprocess.Popen(
        command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True
    )
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_lines, args=(proc.stdout, lines), daemon=True).start()
    out: list[str] = []
    tree: dict[int, str] = {}
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        while not out or not out[-1].startswith("[round 1/3]"):
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            assert line is not None, "".join(out) + (tmp_path / "stderr.txt").read_text()
            out.append(line)
        tree = process_tree([proc.pid])  # SuperLink, SuperNodes, SuperExecs, the ServerApp: all started under it
        commands = " ".join(open(f"/proc/{pid}/cmdline").read() for pid in alive(tree))  # noqa: PTH123
        assert "flwr-serverapp" in commands and "-supernode" in commands and "-superexec" in commands, commands
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        signalled = time.monotonic()
        time.sleep(0.5)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)  # and an impatient user's second one: changes nothing
        try:
            proc.wait(EXIT_BOUND_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {EXIT_BOUND_S} s after Ctrl-C")
        took = time.monotonic() - signalled
        left = alive(tree)
        deadline = time.monotonic() + 5
        while left and time.monotonic() < deadline:
            time.sleep(0.2)
            left = alive(left)
        assert left == {}, [open(f"/proc/{pid}/cmdline").read() for pid in left]  # noqa: PTH123
        assert processes_under(kits) == []
    finally:
        for pid in alive(tree):  # never leave a failed run behind
            os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    while (line := lines.get(timeout=10)) is not None:
        out.append(line)
    err.seek(0)
    stderr = err.read()
    assert proc.returncode == 130 and took < EXIT_BOUND_S
    assert "Traceback" not in stderr + "".join(out) and "warning: still running" not in "".join(out)
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert stderr.startswith("interrupted (SIGINT): every process stopped;")
    assert f"{run} marked interrupted after round 1 of 3" in stderr and f"--resume {run}" in stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted" and [r["round"] for r in summary["rounds"]] == [1]
    assert resumable(load_resume_point(run)).round == 1  # what `federation up --resume` checks first
