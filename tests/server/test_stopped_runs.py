"""A run a disk error stops inside the ServerApp: one line, summary ``incomplete`` with the line, resumable."""

from __future__ import annotations

import json

import pytest

from fedpriv.kernel.config import load_config
from fedpriv.kernel.errors import DiskError
from fedpriv.server.budget_gate import BudgetState
from fedpriv.server.ledger_store import LedgerStore
from fedpriv.server.resume import ResumeError, ResumePoint, resumable
from fedpriv.server.round_tracker import RoundTracker
from fedpriv.server.run_record import RunRecord
from tests.disk_faults import tmpfs

FULL = "[Errno 28] No space left on device"


def stopped_summary(run_dir, cfg, error: DiskError) -> dict:
    """RunRecord.stopped for a run whose two classes and model were built, before its first round ended."""
    with RunRecord(run_dir, cfg) as record:
        record.tracker = RoundTracker(num_rounds=3, num_labels=2, dp_enabled=False)
        record.budget = BudgetState(LedgerStore(run_dir))
        return record.stopped(error)


def test_the_summary_says_incomplete_with_the_line_and_how_to_continue(tmp_path, capsys):
    cfg = load_config(overrides=["model.name=tiny", "training.rounds=3"])
    error = DiskError(f"cannot write {tmp_path / 'checkpoints' / 'round-0002.safetensors'}: {FULL}")
    summary = stopped_summary(tmp_path, cfg, error)
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["status"] == summary["status"] == "incomplete" and written["error"] == str(error)
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [
        f"error: {error}; the run stopped after round 0 of 3 (summary.json status 'incomplete'; once fixed,"
        f" --resume {tmp_path} continues it)"
    ]


def test_a_summary_that_cannot_be_written_is_said_in_the_same_line(tmp_path, capsys):
    cfg = load_config(overrides=["model.name=tiny", "training.rounds=3"])
    with tmpfs(tmp_path / "run", size="64k", read_only=True) as run:
        error = DiskError(f"cannot write {run / 'metrics.csv'}: [Errno 30] Read-only file system")
        assert stopped_summary(run, cfg, error)["status"] == "incomplete"
        err = capsys.readouterr().err.strip()
        assert err == (
            f"error: {error}; the run stopped after round 0 of 3, and its summary could not be updated:"
            f" cannot write {run / 'summary.json'}: [Errno 30] Read-only file system"
        )


@pytest.mark.parametrize(
    "summary, allowed",
    [
        ({"status": "incomplete", "error": f"cannot write /r/model: {FULL}"}, True),  # stopped by the disk
        ({"status": "incomplete"}, False),  # every round ran, some without training: it ended
        ({"status": "running"}, True),
        ({"status": "completed"}, False),
    ],
)
def test_a_run_a_disk_error_stopped_can_be_resumed_and_an_ended_one_cannot(tmp_path, summary, allowed):
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    point = ResumePoint(
        tmp_path, 1, {}, [{}], {}, [], [], 1.0, checkpoint="round-0001.safetensors", strategy_state=None
    )
    if allowed:
        assert resumable(point) is point
    else:
        with pytest.raises(ResumeError, match="already ended"):
            resumable(point)
