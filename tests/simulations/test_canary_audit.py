"""The empirical audit end to end: canaries in one simulated organisation, the bound next to the claim and next to
the most the audit can show."""

from __future__ import annotations

import json

import pytest

from fedpriv.cli import main
from tests.shared_runs import simulate_in_sequence

pytestmark = pytest.mark.integration

# a tiny model fine-tuned in full, 2 organisations, five local epochs per round (75 steps of org-0's 80 examples)
COMMON = [
    "model.name=tiny", "model.finetuning=full", "partitioning.num_orgs=2", "partitioning.scheme=iid",
    "data.max_examples=200", "data.max_length=32", "training.rounds=3", "training.batch_size=16",
    "training.local_epochs=5", "training.learning_rate=0.003", "canary_audit.enabled=true",
    "output.export_model=false",
]  # fmt: skip


RUNS = {
    # the default audit: 16,000 gradient (Dirac) canaries, all guessed; without DP nothing hides them
    "memorising": ["privacy.enabled=false"],
    # the same run with DP-SGD at the default epsilon 8
    "dp": [],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{name: (summary, stdout, run folder)} of the runs, made in one process (tests.shared_runs)."""
    done = simulate_in_sequence(tmp_path_factory.mktemp("canary-runs"), {k: [*COMMON, *v] for k, v in RUNS.items()})
    results = {}
    for name, (code, stdout, out) in done.items():
        assert code == 0, stdout[-3000:]
        assert "Empirical audit (org-0)" in stdout
        assert "Canary audit:" in stdout and "can show at most epsilon >=" in stdout  # said before training
        summary = json.loads((out / "summary.json").read_text())
        assert summary["empirical_audit"] == json.loads((out / "empirical_audit.json").read_text())
        results[name] = (summary, stdout, out)
    return results


def test_a_memorising_non_private_run_shows_a_bound_clearly_above_zero(runs):
    summary, stdout, _ = runs["memorising"]
    # a run without DP says so plainly and reports no epsilon
    assert summary["dp_enabled"] is False and all(p["epsilon"] is None for p in summary["privacy"].values())
    assert "DP is OFF" in stdout and "no privacy guarantee" in stdout.lower()
    audit = summary["empirical_audit"]
    assert audit["kind"] == "gradient" and audit["claimed_epsilon"] is None
    assert (audit["canaries"], audit["guesses"]) == (16000, 16000)
    assert audit["max_reachable_epsilon"] >= 8.0
    assert audit["correct"] >= 0.95 * audit["guesses"], audit  # measured: 15,781 of 16,000
    assert audit["epsilon_lower_bound"] > 2.0, audit  # measured: 4.16
    assert "The most these settings can show (every guess right): epsilon >= 8.11" in stdout


def test_the_same_run_with_dp_stays_below_its_claim_which_the_audit_could_reach(runs, capsys):
    summary, stdout, out = runs["dp"]
    audit = summary["empirical_audit"]
    claimed = summary["privacy"]["org-0"]["epsilon"]
    assert audit["claimed_epsilon"] == claimed and 7.5 < claimed <= 8.0
    assert audit["max_reachable_epsilon"] > claimed and audit["can_contradict_claim"] is True
    assert audit["epsilon_lower_bound"] <= claimed and audit["consistent"] is True  # measured: 0.59
    assert audit["correct"] < runs["memorising"][0]["empirical_audit"]["correct"]
    assert "the audit could contradict it" in stdout
    # the ledger audit shows the bound next to the claim and the reach, and passes
    assert main(["audit", str(out), "--no-prv"]) == 0
    report = json.loads((out / "audit.json").read_text())
    assert report["empirical_audit"]["epsilon_lower_bound"] == audit["epsilon_lower_bound"]
    printed = capsys.readouterr().out
    assert "Empirical audit (canaries)" in printed and "The most this audit can show" in printed
