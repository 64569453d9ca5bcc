"""What the SuperExec tests share: a ClientApp task's spec, and a wait for forked children to be reaped."""

from __future__ import annotations

import os
import time

from flwr.supercore.constant import TaskType
from flwr.supercore.superexec.executor.types import ExecutionSpec


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


def wait_reaped(executor, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while executor.children and time.monotonic() < deadline:
        executor.reconcile()
        time.sleep(0.05)
    assert not executor.children, "forked ClientApp processes were not reaped"
