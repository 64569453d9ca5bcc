"""fedpriv/runtime/fork_executor.py: each ClientApp task in a forked child of the warm SuperExec."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from flwr.supercore.constant import TaskType
from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor

from fedpriv.runtime import fork_executor, fork_safety
from tests.fedpriv.runtime.superexec_specs import spec, wait_reaped


def test_a_clientapp_task_runs_flowers_run_clientapp_in_a_forked_child(tmp_path: Path, monkeypatch):
    record = tmp_path / "child.txt"

    def fake_run_clientapp(**kwargs):  # what the child runs instead of connecting to a SuperNode
        name = Path("/proc/self/comm").read_text().strip()
        app_modules = [m for m in sys.modules if fork_safety._is_app_module(m)]
        record.write_text(
            f"{os.getpid()} {kwargs['token']} {kwargs['runtime_api_address']} {kwargs['insecure']} {name}"
            f" {len(app_modules)}"
        )
        raise SystemExit(0)  # Flower's flwr_exit leaves this way

    import flwr.supernode.runtime.run_clientapp as runtime

    monkeypatch.setattr(runtime, "run_clientapp", fake_run_clientapp)
    executor = fork_executor.ForkExecutor()
    result = executor.launch(spec())
    assert result.status == "accepted"
    (child,) = executor.children
    wait_reaped(executor)
    assert "fedpriv.runtime.fork_executor" in sys.modules  # the parent keeps what it imported ...
    pid, token, address, insecure, name, app_modules = record.read_text().split()
    assert app_modules == "0"  # ... the child forgets it: Flower's load_app then imports the app from the FAB
    assert int(pid) == child != os.getpid()
    assert (token, address, insecure) == ("tok-123", "127.0.0.1:9094", "True")
    assert name == "flwr-clientapp"  # what ps shows, and how tests/deployment find a node's ClientApps


def test_other_task_types_get_flowers_cold_start(monkeypatch):
    launched = []
    monkeypatch.setattr(SubprocessExecutor, "launch", lambda self, s: launched.append(s.task_type) or "cold")
    executor = fork_executor.ForkExecutor()
    assert executor.launch(spec(TaskType.SERVER_APP)) == "cold"
    assert launched == [TaskType.SERVER_APP] and not executor.children


def test_warm_run_settings_are_checked(monkeypatch):
    monkeypatch.setenv(fork_executor.WARM_RUNS_ENV, "0")
    assert fork_executor.ForkExecutor().warm_runs == 0
    monkeypatch.setenv(fork_executor.WARM_RUNS_ENV, "many")
    with pytest.raises(SystemExit, match="FEDPRIV_WARM_RUNS"):
        fork_executor.ForkExecutor()
