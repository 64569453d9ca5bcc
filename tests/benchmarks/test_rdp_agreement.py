"""Smoke run of benchmarks/rdp_agreement.py, and the audit's RDP tolerance against what it measures."""

from __future__ import annotations

from fedpriv.privacy.audit import RDP_TOLERANCE
from tests.benchmarks.scripts import benchmark_module


def test_dp_accounting_rdp_exceeds_opacus_by_less_than_the_audits_tolerance_up_to_epsilon_20(capsys):
    result = benchmark_module("rdp_agreement").main(["cases=60", "seed=1"])
    capsys.readouterr()
    assert result["cases"] == 60
    # honest Opacus claims at the epsilons budgets use pass the audit's RDP comparison without PLD
    assert 0 <= result["by_epsilon"]["<= 20"]["max_relative_excess"] < RDP_TOLERANCE
