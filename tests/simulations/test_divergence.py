"""A real ``fedpriv simulate`` whose training loss becomes non-finite: one line, exit 1, its privacy still accounted.

``training.learning_rate=1e300`` used to pass every check and end in 16 tracebacks from torch's Adam; a
learning rate that float32 can hold (1e30) but that sends the weights past it after one step stands for
"whatever made the loss non-finite" (issue 27).
"""

from __future__ import annotations

import json
import re

import pytest

from tests.shared_runs import simulate_in_sequence

pytestmark = pytest.mark.integration

ARGS = [
    "model.name=tiny", "training.learning_rate=1e30", "training.rounds=2", "data.max_examples=200",
    "data.max_length=32", "partitioning.num_orgs=2", "partitioning.scheme=iid", "output.export_model=false",
]  # fmt: skip
LINE = re.compile(
    r"^error: round 1, (org-\d): training loss became non-finite \((nan|inf)\) at step (\d+): lower"
    r" training\.learning_rate \(1e\+30\)"
)


# Both runs in one process (tests.shared_runs.simulate_in_sequence): the imports and the plan are paid once; each
# run still starts its own simulation process, Ray and nodes.
RUNS = {
    "plain": ARGS,
    # SecAgg+ needs three organisations
    "secagg": [*ARGS, "partitioning.num_orgs=3", "training.batch_size=16", "secure_aggregation.enabled=true"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{name: (exit code, stdout, stderr, run folder)} of RUNS."""
    return simulate_in_sequence(tmp_path_factory.mktemp("diverging-runs"), RUNS, timeout=480, stderr=True)


def test_a_loss_that_becomes_non_finite_stops_the_run_in_one_line_with_its_privacy_accounted(runs):
    code, stdout, stderr, out = runs["plain"]
    shown = f"exit {code}\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    assert code == 1, shown
    assert "Traceback" not in stdout + stderr, shown
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and LINE.match(errors[0]), shown

    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["rounds"] == []
    assert summary["stopped_reason"] == errors[0].removeprefix("error: ")
    assert sorted(d["org"] for d in summary["diverged"]) == ["org-0", "org-1"]
    for stopped in summary["diverged"]:
        org = stopped["org"]
        assert stopped["round"] == 1 and stopped["kind"] in ("nan", "inf") and stopped["step"] >= 2
        # the steps taken before the loss went non-finite are spent: in the node's signed ledger and the summary
        entries = [json.loads(line) for line in (out / "ledgers" / f"{org}.jsonl").read_text().splitlines()]
        assert [(e["kind"], e["round"], e.get("stopped")) for e in entries] == [("dp_round", 1, "diverged")]
        assert entries[0]["local_steps"] == stopped["step"] - 1 == summary["privacy"][org]["steps"]
        assert summary["privacy"][org]["epsilon"] == pytest.approx(entries[0]["epsilon"]) and entries[0]["epsilon"] > 0
        assert summary["data"]["truncation"][org]["max_length"] == 32  # the plan's data report, kept
    from fedpriv.privacy.audit import audit, load_ledger_set

    result = audit(load_ledger_set([str(out)], None), pld=False)
    assert result.ok, [f.to_dict() if hasattr(f, "to_dict") else f for f in getattr(result, "findings", [])]


def test_under_secure_aggregation_a_diverging_node_drops_out_and_the_run_still_stops_in_one_line(runs):
    """SecAgg+ has no reply that can say "diverged": the node fails its round with TrainingDivergedError, whose
    name the coordinator reads in the error reply; its ledger entry arrives with the evaluate reply."""
    code, stdout, stderr, out = runs["secagg"]
    shown = f"exit {code}\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    assert code == 1, shown
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and LINE.match(errors[0]), shown
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["stopped_reason"] == errors[0].removeprefix("error: ")
    assert sorted(d["org"] for d in summary["diverged"]) == ["org-0", "org-1", "org-2"]
    for stopped in summary["diverged"]:
        entries = [json.loads(line) for line in (out / "ledgers" / f"{stopped['org']}.jsonl").read_text().splitlines()]
        assert [(e["round"], e.get("stopped"), e["local_steps"]) for e in entries] == [
            (1, "diverged", stopped["step"] - 1)
        ]
    from fedpriv.privacy.audit import audit, load_ledger_set

    assert audit(load_ledger_set([str(out)], None), pld=False).ok
