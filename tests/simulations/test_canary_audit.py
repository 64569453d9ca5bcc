"""The empirical audit end to end: canaries in one simulated organisation, the bound next to the claim."""

from __future__ import annotations

import json

import pytest

from fedpriv.cli import main
from tests.shared_runs import simulate_in_sequence

pytestmark = pytest.mark.integration

# a tiny model fine-tuned in full, 2 organisations, 100 canaries (about 50 inserted into org-0's data)
COMMON = [
    "model.name=tiny", "model.finetuning=full", "partitioning.num_orgs=2", "partitioning.scheme=iid",
    "data.max_examples=200", "data.max_length=32", "training.rounds=3", "training.batch_size=16",
    "canary_audit.enabled=true", "canary_audit.canaries=100", "canary_audit.guesses=10", "output.export_model=false",
]  # fmt: skip


RUNS = {
    # the test has power: five local epochs per round without DP memorise the inserted canaries
    "memorising": ["privacy.enabled=false", "training.local_epochs=5", "training.learning_rate=0.003"],
    "dp": ["privacy.target_epsilon=2"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{name: (summary, stdout, run folder)} of both runs, made in one process (tests.shared_runs)."""
    done = simulate_in_sequence(tmp_path_factory.mktemp("canary-runs"), {k: [*COMMON, *v] for k, v in RUNS.items()})
    results = {}
    for name, (code, stdout, out) in done.items():
        assert code == 0, stdout[-3000:]
        assert "Empirical audit (org-0)" in stdout
        summary = json.loads((out / "summary.json").read_text())
        assert summary["empirical_audit"] == json.loads((out / "empirical_audit.json").read_text())
        results[name] = (summary, stdout, out)
    return results


def test_a_memorising_non_private_run_shows_a_bound_clearly_above_zero(runs):
    """The test has power: five local epochs per round without DP memorise the inserted canaries."""
    summary, stdout, _ = runs["memorising"]
    # a run without DP says so plainly and reports no epsilon
    assert summary["dp_enabled"] is False and all(p["epsilon"] is None for p in summary["privacy"].values())
    assert "DP is OFF" in stdout and "no privacy guarantee" in stdout.lower()
    audit = summary["empirical_audit"]
    assert audit["claimed_epsilon"] is None and audit["guesses"] == 20
    assert audit["correct"] >= 18, audit  # measured: 20 of 20
    assert audit["epsilon_lower_bound"] > 1.0, audit


def test_a_dp_run_never_shows_a_bound_above_its_claimed_epsilon(runs, capsys):
    summary, _, out = runs["dp"]
    audit = summary["empirical_audit"]
    claimed = summary["privacy"]["org-0"]["epsilon"]
    assert audit["claimed_epsilon"] == claimed and 0 < claimed <= 2.0
    assert audit["epsilon_lower_bound"] <= claimed and audit["consistent"] is True
    # the ledger audit shows the bound next to the claim, and passes
    assert main(["audit", str(out), "--no-prv"]) == 0
    report = json.loads((out / "audit.json").read_text())
    assert report["empirical_audit"]["epsilon_lower_bound"] == audit["epsilon_lower_bound"]
    assert "Empirical audit (canaries)" in capsys.readouterr().out
