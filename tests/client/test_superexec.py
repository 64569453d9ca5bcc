"""fedpriv-superexec: ClientApp tasks forked from a warm process, everything else left to Flower."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
from flwr.supercore.constant import ExecutorType, TaskType
from flwr.supercore.inflatable import inflatable_utils
from flwr.supercore.superexec import run_superexec as superexec_module
from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor
from flwr.supercore.superexec.executor.types import ExecutionSpec

from client import superexec


def spec(task_type: TaskType = TaskType.CLIENT_APP, token: str = "tok-123") -> ExecutionSpec:
    return ExecutionSpec(
        task_type=task_type,
        runtime_api_address="127.0.0.1:9094",
        token=token,
        insecure=True,
        root_certificates_path=None,
        runtime_dependency_install=False,
        parent_pid=os.getpid(),
        suppress_output=False,
        task_id=7,
    )


def wait_reaped(executor: superexec.ForkExecutor, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while executor.children and time.monotonic() < deadline:
        executor.reconcile()
        time.sleep(0.05)
    assert not executor.children, "forked ClientApp processes were not reaped"


def test_a_clientapp_task_runs_flowers_run_clientapp_in_a_forked_child(tmp_path: Path, monkeypatch):
    record = tmp_path / "child.txt"

    def fake_run_clientapp(**kwargs):  # what the child runs instead of connecting to a SuperNode
        name = Path("/proc/self/comm").read_text().strip()
        app_modules = [m for m in sys.modules if m.partition(".")[0] in superexec.APP_PACKAGES]
        record.write_text(
            f"{os.getpid()} {kwargs['token']} {kwargs['runtime_api_address']} {kwargs['insecure']} {name}"
            f" {len(app_modules)}"
        )
        raise SystemExit(0)  # Flower's flwr_exit leaves this way

    import flwr.supernode.runtime.run_clientapp as runtime

    monkeypatch.setattr(runtime, "run_clientapp", fake_run_clientapp)
    executor = superexec.ForkExecutor()
    result = executor.launch(spec())
    assert result.status == "accepted"
    (child,) = executor.children
    wait_reaped(executor)
    assert "client.superexec" in sys.modules  # the parent keeps what it imported ...
    pid, token, address, insecure, name, app_modules = record.read_text().split()
    assert app_modules == "0"  # ... the child forgets it: Flower's load_app then imports the app from the FAB
    assert int(pid) == child != os.getpid()
    assert (token, address, insecure) == ("tok-123", "127.0.0.1:9094", "True")
    assert name == "flwr-clientapp"  # what ps shows, and how tests/deployment find a node's ClientApps


def test_a_failing_clientapp_exits_its_child_with_a_failure_code(monkeypatch):
    def crash(**kwargs):
        raise RuntimeError("boom")

    import flwr.supernode.runtime.run_clientapp as runtime

    monkeypatch.setattr(runtime, "run_clientapp", crash)
    assert superexec.run_task(spec()) == 1  # run in this process: the code the child would _exit with
    monkeypatch.setattr(runtime, "run_clientapp", lambda **kw: (_ for _ in ()).throw(SystemExit(800)))
    assert superexec.run_task(spec()) == 800


def test_other_task_types_get_flowers_cold_start(monkeypatch):
    launched = []
    monkeypatch.setattr(SubprocessExecutor, "launch", lambda self, s: launched.append(s.task_type) or "cold")
    executor = superexec.ForkExecutor()
    assert executor.launch(spec(TaskType.SERVER_APP)) == "cold"
    assert launched == [TaskType.SERVER_APP] and not executor.children


def test_preloading_imports_torch_without_initialising_cuda_or_threads():
    loaded = superexec.preload()
    assert "torch" in loaded and "opacus" in loaded
    import torch

    assert not torch.cuda.is_initialized()
    assert superexec.fork_is_safe() is None


def test_warm_caches_hand_children_transformers_conversion_mapping_built(monkeypatch):
    from transformers import conversion_mapping

    monkeypatch.setattr(conversion_mapping, "_checkpoint_conversion_mapping_cache", None)
    assert superexec.warm_caches() == ["transformers.conversion_mapping"]
    assert conversion_mapping._checkpoint_conversion_mapping_cache  # what PEFT's model wrapping reads
    assert superexec.fork_is_safe() is None


def test_install_makes_flowers_superexec_use_the_fork_executor(monkeypatch):
    monkeypatch.setattr(superexec_module, "get_executor", superexec_module.get_executor)  # restored afterwards
    monkeypatch.setattr(inflatable_utils, "pull_objects", inflatable_utils.pull_objects)
    superexec.install()
    assert inflatable_utils.pull_objects.fedpriv_prompt  # forked ClientApps ask their SuperNode for arrays promptly
    assert isinstance(superexec_module.get_executor(ExecutorType.SUBPROCESS), superexec.ForkExecutor)
    with pytest.raises(ValueError, match="executor-config"):  # Kubernetes still goes to Flower's own factory
        superexec_module.get_executor(ExecutorType.KUBERNETES)
