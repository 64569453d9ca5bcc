"""The auditor's recomputation equals Opacus's accountants, needs no torch, and checks PRV claims cheaply."""

from __future__ import annotations

import math
import subprocess
import sys
import warnings

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from fedpriv.privacy import recompute
from fedpriv.privacy.independent import bracket_claims
from fedpriv.privacy.recompute import prv_epsilon, rdp_epsilons

DELTA = 1e-5
HISTORIES = [
    [(1.1, 0.05, 20)],
    [(1.1, 0.01, 100), (0.9, 0.02, 50), (1.1, 0.01, 30)],  # a node whose data size or noise changed mid-run
    [(0.85, 0.0022, 4600)],
    [(2.0, 0.5, 3)],
]


@pytest.mark.parametrize("history", HISTORIES)
def test_rdp_and_prv_equal_opacus_accountants_on_the_same_events(history):
    rdp, prv = RDPAccountant(), PRVAccountant()
    rdp.history, prv.history = list(history), list(history)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert rdp_epsilons(history, DELTA)[-1] == pytest.approx(rdp.get_epsilon(DELTA), rel=1e-9)
        assert prv_epsilon(history, DELTA) == pytest.approx(prv.get_epsilon(DELTA), rel=1e-9)


def test_importing_the_recomputation_imports_no_torch():
    """Opacus (and torch, seconds) is imported when a recomputation asks for it, not with these modules."""
    code = (
        "import sys; from fedpriv.privacy.recompute import prv_epsilon, rdp_epsilons;"
        "from fedpriv.privacy import independent, rdp_steps;"
        "assert 'torch' not in sys.modules and 'opacus' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_recomputation_runs_opacus_own_public_modules_not_copies_loaded_by_path():
    """A copy of Opacus's sources loaded by path beside the real one could drift from what the nodes ran."""
    import opacus.accountants.analysis.rdp

    from fedpriv.privacy import rdp_steps

    assert rdp_steps.analysis() is opacus.accountants.analysis.rdp
    rdp_epsilons([(1.3, 0.02, 7)], DELTA)
    prv_epsilon([(1.3, 0.02, 7)], DELTA)
    assert [name for name in sys.modules if "opacus" in name and not name.startswith("opacus")] == []


def _node_claims(rounds: int, sigma: float = 1.0, q: float = 0.05, steps: int = 20) -> list[float]:
    """What a node with Opacus's PRV accountant records after each round."""
    claims = []
    for server_round in range(1, rounds + 1):
        accountant = PRVAccountant()
        accountant.history = [(sigma, q, steps * server_round)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            claims.append(accountant.get_epsilon(DELTA))
    return claims


@pytest.fixture(scope="module")
def honest_prv_ledger() -> tuple[list[tuple[float, float, int]], list[float]]:
    rounds = 12
    return [(1.0, 0.05, 20)] * rounds, _node_claims(rounds)


def _bracket(events, claims, tolerance):
    """The audit's bracketing of claims (privacy/independent.py) with ``recompute.prv_epsilon`` as the measure."""
    known, under = bracket_claims(
        len(events), claims, lambda index: recompute.prv_epsilon(events[: index + 1], DELTA), tolerance
    )
    return [known.get(index) for index in range(len(events))], under


def test_a_node_s_honest_prv_claims_pass_and_a_lowered_one_is_flagged(honest_prv_ledger):
    events, claims = honest_prv_ledger
    computed, under = _bracket(events, claims, tolerance=0.01)
    assert not any(under)
    assert computed[-1] == pytest.approx(claims[-1], rel=1e-9)
    lowered = [value * 0.95 if index == 6 else value for index, value in enumerate(claims)]
    assert [i for i, flagged in enumerate(_bracket(events, lowered, 0.01)[1]) if flagged] == [6]


@pytest.fixture
def counted_prv(monkeypatch) -> list[int]:
    """PRV replaced by a cheap increasing function of the steps so far; records which prefixes were computed."""
    computed: list[int] = []

    def fake(events, delta):
        computed.append(len(events))
        return math.sqrt(sum(steps for _, _, steps in events))

    monkeypatch.setattr(recompute, "prv_epsilon", fake)
    return computed


ROUNDS = 1000


def test_a_long_honest_ledger_is_decided_from_few_prefixes(counted_prv):
    events = [(1.0, 0.01, 10)] * ROUNDS
    claims = [math.sqrt(10 * r) for r in range(1, ROUNDS + 1)]
    computed, under = _bracket(events, claims, tolerance=0.01)
    assert not any(under)
    # epsilon ~ sqrt(steps): 1% of epsilon is 2% of the steps, so ~200 prefixes is the least any scheme needs
    assert len(counted_prv) < ROUNDS * 0.3
    assert sorted(i + 1 for i, value in enumerate(computed) if value is not None) == sorted(counted_prv)


@pytest.mark.parametrize("lowered", [[0], [1], [499, 500], [998], [999], list(range(0, ROUNDS, 7))])
def test_each_under_reported_claim_of_a_long_ledger_is_flagged_and_no_other(counted_prv, lowered):
    events = [(1.0, 0.01, 10)] * ROUNDS
    claims = [math.sqrt(10 * r) * (0.98 if r - 1 in lowered else 1.0) for r in range(1, ROUNDS + 1)]
    _, under = _bracket(events, claims, tolerance=0.01)
    assert [index for index, flagged in enumerate(under) if flagged] == lowered
