"""The ClientApp's per-message timings (benchmarks) and its light import (every message is a new process)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedpriv.client import stage_timing


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """What Flower's runtime sets in a process before messages are created."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_node_id", 7), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


def _message(config: dict | None = None) -> Message:
    content = RecordDict({"secaggplus_configs": ConfigRecord(config)} if config else {})
    return Message(content, dst_node_id=7, message_type="train", group_id="3")


def _context() -> Context:
    return Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})


def test_the_client_app_module_imports_without_torch():
    code = "import sys, fedpriv.client.client_app; print(sorted(m for m in ('torch', 'transformers', 'opacus') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_no_file_is_written_unless_asked(tmp_path, monkeypatch):
    monkeypatch.delenv(stage_timing.ENV_VAR, raising=False)
    reply = stage_timing.stage_timings(_message(), _context(), lambda msg, ctx: "reply")
    assert reply == "reply" and list(tmp_path.iterdir()) == []


def test_each_message_appends_its_stage_startup_and_phases(tmp_path, monkeypatch):
    path = tmp_path / "stages.jsonl"
    monkeypatch.setenv(stage_timing.ENV_VAR, str(path))

    def handler(msg, ctx):
        with stage_timing.phase("model"):
            pass
        with stage_timing.phase("train"):
            pass
        return "reply"

    assert stage_timing.stage_timings(_message({"stage": "share_keys"}), _context(), handler) == "reply"
    assert stage_timing.stage_timings(_message(), _context(), lambda msg, ctx: "reply") == "reply"
    first, second = (json.loads(line) for line in path.read_text().splitlines())
    assert first["stage"] == "secagg:share_keys" and second["stage"] == "train"
    assert first["node_id"] == 7 and first["round"] == "3"
    # Flower's message-API strategies (the plain path) set no group id: the round is their config's server-round
    plain = Message(
        RecordDict({"config": ConfigRecord({"server-round": 2, "lr": 0.1})}), dst_node_id=7, message_type="train"
    )
    stage_timing.stage_timings(plain, _context(), lambda msg, ctx: "reply")
    assert json.loads(path.read_text().splitlines()[-1])["round"] == "2"
    assert set(first["phases"]) == {"model", "train"} and second["phases"] == {}
    assert 0 < first["started_after_s"] < 36_000 and first["handler_s"] >= 0
    assert first["peak_rss_mb"] > 50  # the process's peak resident set (a Python process with torch holds more)


def test_a_forked_childs_start_up_steps_and_warm_run_are_reported(tmp_path, monkeypatch):
    import time

    path = tmp_path / "stages.jsonl"
    monkeypatch.setenv(stage_timing.ENV_VAR, str(path))
    monkeypatch.setenv(stage_timing.WARM_RUN_ENV, "1")
    started = time.time() - stage_timing.process_age_s()
    monkeypatch.setenv(stage_timing.STEPS_ENV, json.dumps({"pulled": started + 0.5, "app_loaded": started + 0.75}))
    stage_timing.stage_timings(_message(), _context(), lambda msg, ctx: "reply")
    (entry,) = (json.loads(line) for line in path.read_text().splitlines())
    assert entry["warm_run"] is True
    assert entry["steps"] == pytest.approx({"pulled": 0.5, "app_loaded": 0.75}, abs=0.05)  # after the process start
