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

from fedpriv.runtime import superexec


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
        app_modules = [m for m in sys.modules if superexec._is_app_module(m)]
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
    assert "fedpriv.runtime.superexec" in sys.modules  # the parent keeps what it imported ...
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
    assert superexec.warm_caches() == ["transformers.conversion_mapping", "presidio.recognizers"]
    assert conversion_mapping._checkpoint_conversion_mapping_cache  # what PEFT's model wrapping reads
    assert superexec.fork_is_safe() is None and superexec.extra_threads() is None


def test_a_failing_redaction_warm_up_leaves_the_superexec_running(monkeypatch, capsys):
    from fedpriv.privacy import redaction

    def broken():
        raise RuntimeError("recognizer registry broke")

    monkeypatch.setattr(redaction, "warm_engine", broken)
    assert "presidio.recognizers" not in superexec.warm_caches()
    assert "redaction not warmed (RuntimeError: recognizer registry broke)" in capsys.readouterr().err


def test_install_makes_flowers_superexec_use_the_fork_executor(monkeypatch):
    monkeypatch.setattr(superexec_module, "get_executor", superexec_module.get_executor)  # restored afterwards
    monkeypatch.setattr(inflatable_utils, "pull_objects", inflatable_utils.pull_objects)
    superexec.install()
    assert inflatable_utils.pull_objects.fedpriv_prompt  # forked ClientApps ask their SuperNode for arrays promptly
    assert isinstance(superexec_module.get_executor(ExecutorType.SUBPROCESS), superexec.ForkExecutor)
    with pytest.raises(ValueError, match="executor-config"):  # Kubernetes still goes to Flower's own factory
        superexec_module.get_executor(ExecutorType.KUBERNETES)


def test_the_plugin_tells_the_executor_which_run_each_task_belongs_to(monkeypatch):
    from flwr.proto.task_pb2 import Task

    monkeypatch.setattr(superexec_module, "AutoExecPlugin", superexec_module.AutoExecPlugin)
    monkeypatch.setattr(superexec_module, "get_executor", superexec_module.get_executor)
    monkeypatch.setattr(inflatable_utils, "pull_objects", inflatable_utils.pull_objects)
    superexec.install()
    launched = []
    executor = superexec.ForkExecutor(warm_runs=2)
    monkeypatch.setattr(executor, "launch", lambda s: launched.append((executor.next_run_id, s.token)) or "ok")
    plugin = superexec_module.AutoExecPlugin(
        runtime_api_address="127.0.0.1:9094", insecure=True, root_certificates_path=None, executor=executor
    )
    task = Task(task_id=3, type=TaskType.CLIENT_APP.value, run_id=4242, fab_hash="f" * 64)
    assert plugin.launch_task(token="tok-9", task=task) == "ok"
    assert launched == [(4242, "tok-9")]
    assert superexec.run_aware(superexec_module.AutoExecPlugin) is superexec_module.AutoExecPlugin  # wrapped once


def test_frames_survive_a_pipe_in_pieces():
    buffer = bytearray()
    read_end, write_end = os.pipe()
    try:
        payload = superexec.spec_to_bytes(spec(token="tok-frames"))
        superexec.send_frame(write_end, payload)
        superexec.send_frame(write_end, b"{}")
        data = os.read(read_end, 65536)
    finally:
        os.close(read_end)
        os.close(write_end)
    buffer += data[:5]
    assert superexec.take_frames(buffer) == []  # a partial frame waits for the rest
    buffer += data[5:]
    first, second = superexec.take_frames(buffer)
    assert superexec.spec_from_bytes(first) == spec(token="tok-frames") and second == b"{}" and not buffer


def test_app_modules_from_another_folder_are_noticed(tmp_path, monkeypatch):
    import types

    stray = types.ModuleType("fedpriv.client.stray_for_test")  # an app module (one import root: fedpriv)
    stray.__file__ = str(tmp_path / "elsewhere" / "fedpriv" / "client" / "stray_for_test.py")
    monkeypatch.setitem(sys.modules, "fedpriv.client.stray_for_test", stray)
    assert "fedpriv.client.stray_for_test" in superexec.app_modules_outside(tmp_path / "fab")
    assert "fedpriv.client.stray_for_test" not in superexec.app_modules_outside(tmp_path / "elsewhere")


def test_warm_run_settings_are_checked(monkeypatch):
    monkeypatch.setenv(superexec.WARM_RUNS_ENV, "0")
    assert superexec.ForkExecutor().warm_runs == 0
    monkeypatch.setenv(superexec.WARM_RUNS_ENV, "many")
    with pytest.raises(SystemExit, match="FEDPRIV_WARM_RUNS"):
        superexec.ForkExecutor()


@pytest.fixture(scope="module")
def warm_runs(tmp_path_factory):
    """Six messages of two runs through warm run processes (tests/fedpriv/runtime/warm_run_scenario.py), one run kept."""
    import json
    import subprocess

    work = tmp_path_factory.mktemp("warm-runs")
    steps = [[1, "run1-a/query"], [1, "run1-b"], ["append-rows", 8], [1, "run1-c"], [2, "run2-a/secagg:setup"]]
    steps.append([2, "run2-b"])
    (work / "plan.json").write_text(json.dumps({"steps": steps, "rows": 40, "warm_runs": 1}))
    root = Path(__file__).resolve().parents[3]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run(
        [sys.executable, "-m", "tests.fedpriv.runtime.warm_run_scenario", str(work)],
        cwd=root, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    records = [json.loads(line) for line in (work / "records.jsonl").read_text().splitlines()]
    return {r["token"]: r for r in records}, json.loads((work / "result.json").read_text()), done.stderr


def test_a_runs_first_message_is_cold_and_its_later_messages_inherit_data_and_model(warm_runs):
    records, _, _ = warm_runs
    first, second = records["run1-a"], records["run1-b"]
    assert first["parent_comm"] == superexec.RUN_PROCESS_NAME and first["comm"] == superexec.CLIENTAPP_NAME
    assert first["held_before_load"] == {"nodes": 0, "templates": 0} and not first["warm_env"]
    assert not first["node_reused"]  # the first message loaded the node's data itself ...
    # ... from the token cache the run process had just written: it waited for it instead of tokenising the same
    # texts at the same moment (a pre-flight query needs the data; server/preflight.py)
    assert first["waited_for_run_process"] and first["token_cache_before_load"]
    assert second["ppid"] == first["ppid"]  # forked from the same run process ...
    assert second["warm_env"] and second["held_before_load"] == {"nodes": 1, "templates": 1}
    assert second["node_reused"]  # ... which had loaded the data and built the template: not loaded again
    assert second["train_rows"] == first["train_rows"] == 30
    assert first["fab_unzipped_and_verified"] and not second["fab_unzipped_and_verified"]  # same bytes: checked once
    for record in records.values():  # the run's own code, from its FAB; the model handed over without a copy
        assert record["node_module_file"].startswith(record["app_dir"] + os.sep)
        assert record["task_module_file"].startswith(record["app_dir"] + os.sep)
        assert record["model_is_template"]


def test_a_changed_data_file_is_read_again_before_the_next_message(warm_runs):
    records, _, _ = warm_runs
    after = records["run1-c"]
    assert after["train_rows"] == 36 and records["run1-b"]["train_rows"] == 30  # 48 rows, a quarter held out
    assert after["ppid"] == records["run1-a"]["ppid"] and after["warm_env"]
    assert after["node_reused"]  # reloaded by the run process before the fork, not by the message


def test_another_run_gets_its_own_process_with_nothing_of_the_first(warm_runs):
    records, result, _ = warm_runs
    first, second = records["run2-a"], records["run2-b"]
    assert first["ppid"] != records["run1-a"]["ppid"]
    assert first["held_before_load"] == {"nodes": 0, "templates": 0} and not first["warm_env"]
    assert not first["waited_for_run_process"]  # a SecAgg+ key exchange needs no data: it never waits
    assert first["app_dir"] != records["run1-a"]["app_dir"]
    assert second["ppid"] == first["ppid"] and second["warm_env"] and second["node_reused"]
    assert first["fab_unzipped_and_verified"] and not second["fab_unzipped_and_verified"]  # its own FAB, checked once
    assert result["run_pids"] == [first["ppid"]]  # one warm run at a time here: run 1's process gave its place up
    assert result["left"] == []  # every run process and child reaped after close()
    for pid in (records["run1-a"]["ppid"], first["ppid"]):
        assert not Path(f"/proc/{pid}").exists()
