"""The node's budget gate: whatever the server asks, no DP step ever takes a node past max_epsilon."""

from __future__ import annotations

import functools
from types import SimpleNamespace

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedpriv.client.budget import NodeBudget
from fedpriv.privacy.accountant_state import NodePrivacy
from fedpriv.privacy.calibration import dp_steps_per_epoch, plan_privacy
from fedpriv.privacy.ledger import NodeLedger, ensure_signing_key
from fedpriv.privacy.recompute import rdp_epsilons

N, BATCH = 48, 16


@functools.cache
def _plan():
    """Calibrated for 2 rounds of 1 local epoch at epsilon 2 (seconds of work: once per session)."""
    return plan_privacy(
        org="org-a",
        num_examples=N,
        batch_size=BATCH,
        local_epochs=1,
        rounds=2,
        target_epsilon=2.0,
        delta=1e-3,
        max_grad_norm=1.0,
        accountant="rdp",
    )


def _train(privacy: NodePrivacy, epochs: int, seed: int) -> int:
    """Real Opacus DP-SGD on a fresh model, as a node runs a round; returns the optimizer steps taken."""
    torch.manual_seed(seed)
    x, y = torch.randn(N, 4), torch.randint(0, 2, (N,))
    model = nn.Linear(4, 2)
    model, optimizer, loader = privacy.make_private(
        model, torch.optim.SGD(model.parameters(), lr=0.1), DataLoader(TensorDataset(x, y), batch_size=BATCH)
    )
    taken = 0
    for _ in range(epochs):
        for xb, yb in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            optimizer.step()
            taken += 1
    return taken


def _budget(folder, max_epsilon: float) -> NodeBudget:
    node = SimpleNamespace(org="org-a", max_epsilon=max_epsilon, train=range(N))
    privacy = NodePrivacy.open(folder, _plan())
    ledger = NodeLedger.open(folder, "org-a", ensure_signing_key(folder / "ledger.key"))
    return NodeBudget(node, privacy, ledger)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    schedule=st.lists(st.integers(min_value=1, max_value=4), min_size=1, max_size=6),
    slack=st.floats(min_value=1.0, max_value=2.5),
)
def test_no_schedule_takes_a_node_past_its_budget(tmp_path_factory, schedule, slack):
    """The server picks the local epochs of every round and asks for as many rounds as it likes."""
    folder = tmp_path_factory.mktemp("node")
    max_epsilon = 2.0 * slack
    budget = _budget(folder, max_epsilon)
    for server_round, epochs in enumerate(schedule, start=1):
        steps = epochs * dp_steps_per_epoch(N, BATCH)
        refusal = budget.check(server_round, steps)
        if refusal is not None:
            assert refusal.epsilon_if_trained > max_epsilon
            budget.record_refusal(refusal)
            continue
        before = budget.privacy.steps
        taken = _train(budget.privacy, epochs, seed=server_round)
        assert taken == steps == budget.privacy.steps - before  # the gate priced exactly what was spent
        budget.record_round(server_round, before, "00" * 32, {"enabled": False})
    dp = [e for e in budget.ledger.entries if e["kind"] == "dp_round"]
    assert all(e["epsilon"] <= max_epsilon for e in dp)
    events = [(e["noise_multiplier"], e["sample_rate"], e["local_steps"]) for e in dp]
    assert all(eps <= max_epsilon for eps in rdp_epsilons(events, 1e-3))  # the auditor's view agrees
    assert budget.privacy.epsilon() <= max_epsilon


def test_a_refusal_spends_nothing_and_is_recorded(tmp_path):
    budget = _budget(tmp_path, max_epsilon=2.0)
    for server_round in (1, 2):
        before = budget.privacy.steps
        _train(budget.privacy, 1, seed=server_round)
        budget.record_round(server_round, before, "00" * 32, {"enabled": False})
    spent = budget.privacy.epsilon()
    refusal = budget.check(3, dp_steps_per_epoch(N, BATCH))
    assert refusal is not None and refusal.epsilon == spent
    entry = budget.record_refusal(refusal)
    assert entry["kind"] == "refusal" and entry["epsilon_if_trained"] > 2.0
    assert budget.privacy.epsilon() == spent


def test_a_crash_between_ledger_and_accountant_never_undercounts(tmp_path):
    budget = _budget(tmp_path, max_epsilon=4.0)
    before = budget.privacy.steps
    _train(budget.privacy, 2, seed=1)
    # the ledger entry is written (and fsynced) first; the node dies before the accountant file is saved
    budget.ledger.append(
        "dp_round",
        1,
        {
            "local_steps": budget.privacy.steps - before,
            "sample_rate": _plan().sample_rate,
            "noise_multiplier": _plan().noise_multiplier,
            "max_grad_norm": 1.0,
            "delta": 1e-3,
            "accountant": "rdp",
            "epsilon": budget.privacy.epsilon(),
            "num_examples": N,
            "model_digest": "00" * 32,
            "target_epsilon": 2.0,
            "max_epsilon": 4.0,
        },
    )
    restarted = NodePrivacy.open(tmp_path, _plan())
    assert restarted.steps == 0  # the accountant file never saw the round...
    assert restarted.catch_up([(_plan().noise_multiplier, _plan().sample_rate, budget.privacy.steps)])
    assert restarted.steps == budget.privacy.steps  # ...the ledger brings it back
    assert NodePrivacy.open(tmp_path, _plan()).steps == budget.privacy.steps  # and it was saved
