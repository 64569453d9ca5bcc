"""fedpriv/runtime/superexec_patch.py: Flower's SuperExec with the fork executor installed."""

from __future__ import annotations

import pytest
from flwr.supercore.constant import ExecutorType, TaskType
from flwr.supercore.inflatable import inflatable_utils
from flwr.supercore.superexec import run_superexec as superexec_module

from fedpriv.runtime import fork_executor, superexec_patch


def test_install_makes_flowers_superexec_use_the_fork_executor(monkeypatch):
    monkeypatch.setattr(superexec_module, "get_executor", superexec_module.get_executor)  # restored afterwards
    monkeypatch.setattr(inflatable_utils, "pull_objects", inflatable_utils.pull_objects)
    superexec_patch.install()
    assert inflatable_utils.pull_objects.fedpriv_prompt  # forked ClientApps ask their SuperNode for arrays promptly
    assert isinstance(superexec_module.get_executor(ExecutorType.SUBPROCESS), fork_executor.ForkExecutor)
    with pytest.raises(ValueError, match="executor-config"):  # Kubernetes still goes to Flower's own factory
        superexec_module.get_executor(ExecutorType.KUBERNETES)


def test_the_plugin_tells_the_executor_which_run_each_task_belongs_to(monkeypatch):
    from flwr.proto.task_pb2 import Task

    monkeypatch.setattr(superexec_module, "AutoExecPlugin", superexec_module.AutoExecPlugin)
    monkeypatch.setattr(superexec_module, "get_executor", superexec_module.get_executor)
    monkeypatch.setattr(inflatable_utils, "pull_objects", inflatable_utils.pull_objects)
    superexec_patch.install()
    launched = []
    executor = fork_executor.ForkExecutor(warm_runs=2)
    monkeypatch.setattr(executor, "launch", lambda s: launched.append((executor.next_run_id, s.token)) or "ok")
    plugin = superexec_module.AutoExecPlugin(
        runtime_api_address="127.0.0.1:9094", insecure=True, root_certificates_path=None, executor=executor
    )
    task = Task(task_id=3, type=TaskType.CLIENT_APP.value, run_id=4242, fab_hash="f" * 64)
    assert plugin.launch_task(token="tok-9", task=task) == "ok"
    assert launched == [(4242, "tok-9")]
    assert superexec_patch.run_aware(superexec_module.AutoExecPlugin) is superexec_module.AutoExecPlugin  # wrapped once
