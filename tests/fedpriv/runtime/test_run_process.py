"""fedpriv/runtime/run_process.py: a run's warm process, through six messages of two runs."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from fedpriv.runtime import clientapp_child, run_process


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
    assert first["parent_comm"] == run_process.RUN_PROCESS_NAME and first["comm"] == clientapp_child.CLIENTAPP_NAME
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
