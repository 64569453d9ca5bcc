"""The accountant is never reset: across rounds, across restarts, through real Opacus training."""

from __future__ import annotations

import dataclasses
import functools
import json
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedpriv.kernel.errors import PrivacyError
from fedpriv.privacy import NodePrivacy, compute_epsilon, plan_privacy

N, BATCH, LOCAL_EPOCHS, ROUNDS = 64, 16, 1, 2


def _plan(accountant="rdp", **kw):
    return _cached_plan(accountant, tuple(sorted(kw.items())))


@functools.cache
def _cached_plan(accountant, kw, calibrate=True):
    """Calibration costs seconds on 2 cores; plans are frozen, so tests share them."""
    args = dict(
        org="org-1",
        num_examples=N,
        batch_size=BATCH,
        local_epochs=LOCAL_EPOCHS,
        rounds=ROUNDS,
        target_epsilon=2.0,
        delta=1e-3,
        max_grad_norm=1.0,
        accountant=accountant,
    )
    args.update(kw)
    return plan_privacy(**args, calibrate=calibrate)


def _uninterrupted_epsilon(plan, steps):
    return compute_epsilon(
        noise_multiplier=plan.noise_multiplier,
        sample_rate=plan.sample_rate,
        steps=steps,
        delta=plan.delta,
        accountant=plan.accountant,
    )


def _train_one_round(node: NodePrivacy, seed: int) -> int:
    """One federated round as a client runs it: a fresh model/optimizer wrapped by Opacus, local epochs of DP-SGD."""
    torch.manual_seed(seed)
    x, y = torch.randn(N, 5), torch.randint(0, 2, (N,))
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(TensorDataset(x, y), batch_size=BATCH)
    model, optimizer, loader = node.make_private(model, optimizer, loader)
    taken = 0
    for _ in range(LOCAL_EPOCHS):
        for xb, yb in loader:
            # Even an (improbable) empty Poisson batch is a noisy step: Opacus handles zero-length batches here.
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(xb), yb)
            loss.backward()
            optimizer.step()
            taken += 1
    return taken


def _step_one_round(node: NodePrivacy) -> None:
    for _ in range(node.plan.steps_per_round):
        node.accountant.step(noise_multiplier=node.plan.noise_multiplier, sample_rate=node.plan.sample_rate)


def test_real_training_accumulates_over_rounds(tmp_path):
    plan = _plan("rdp")
    node = NodePrivacy.open(tmp_path, plan)
    assert node.epsilon() == 0.0 and node.steps == 0

    assert _train_one_round(node, seed=1) == plan.steps_per_round
    assert node.steps == plan.steps_per_round
    eps1 = node.epsilon()
    predicted = node.epsilon_after(plan.steps_per_round)
    assert node.steps == plan.steps_per_round  # epsilon_after does not touch the accountant

    _train_one_round(node, seed=2)
    assert node.steps == plan.planned_steps
    eps2 = node.epsilon()
    assert eps2 > eps1
    assert eps2 == pytest.approx(_uninterrupted_epsilon(plan, plan.planned_steps), rel=1e-9)
    assert eps2 == pytest.approx(predicted, rel=1e-9)
    assert plan.target_epsilon * 0.99 <= eps2 <= plan.target_epsilon
    # Opacus recorded exactly the planned (sigma, q): a single merged history entry.
    assert node.accountant.history == [(plan.noise_multiplier, plan.sample_rate, plan.planned_steps)]


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_simulated_rounds_match_one_go(tmp_path, accountant):
    plan = _plan(accountant)
    node = NodePrivacy.open(tmp_path, plan)
    _step_one_round(node)
    _step_one_round(node)
    rel = 1e-9 if accountant == "rdp" else 1e-6
    assert node.epsilon() == pytest.approx(_uninterrupted_epsilon(plan, plan.planned_steps), rel=rel)
    report = node.report()
    assert report["steps"] == plan.planned_steps
    assert report["epsilon"] <= report["target_epsilon"]
    assert set(report) == {
        "epsilon",
        "delta",
        "target_epsilon",
        "noise_multiplier",
        "sample_rate",
        "steps",
        "planned_steps",
        "accountant",
        "max_grad_norm",
    }


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_restart_continues_the_same_accountant(tmp_path, accountant):
    plan = _plan(accountant)
    first = NodePrivacy.open(tmp_path, plan)
    if accountant == "rdp":
        _train_one_round(first, seed=1)
    else:
        _step_one_round(first)
    first.save()
    assert not list(tmp_path.glob("*.tmp"))
    stored = json.loads((tmp_path / "accountant.json").read_text())
    assert stored["mechanism"] == accountant

    second = NodePrivacy.open(tmp_path, plan)  # a restarted node
    assert second.steps == plan.steps_per_round
    assert second.epsilon() == pytest.approx(first.epsilon(), rel=1e-12)
    if accountant == "rdp":
        _train_one_round(second, seed=2)
    else:
        _step_one_round(second)
    second.save()

    rel = 1e-9 if accountant == "rdp" else 1e-6
    assert second.epsilon() == pytest.approx(_uninterrupted_epsilon(plan, plan.planned_steps), rel=rel)
    third = NodePrivacy.open(tmp_path, plan)
    assert third.steps == plan.planned_steps


def test_reopen_reuses_the_stored_plan(tmp_path):
    plan = _plan()
    NodePrivacy.open(tmp_path, plan).save()
    # More rounds would calibrate more noise, but the noise was fixed at the first start.
    longer = _plan(rounds=ROUNDS + 3)
    assert longer.noise_multiplier != plan.noise_multiplier
    reopened = NodePrivacy.open(tmp_path, longer)
    assert reopened.plan == plan


@pytest.mark.parametrize(
    "changed",
    [{"target_epsilon": 3.0}, {"delta": 1e-4}, {"accountant": "prv"}, {"batch_size": BATCH * 2}],
)
def test_reopen_with_a_different_privacy_plan_is_refused(tmp_path, changed):
    node = NodePrivacy.open(tmp_path, _plan())
    _step_one_round(node)
    node.save()
    with pytest.raises(PrivacyError) as info:
        NodePrivacy.open(tmp_path, _plan(**changed))
    message = str(info.value)
    assert str(tmp_path) in message and "fixed for the run" in message and "\n" not in message


def test_data_loader_must_match_the_plan(tmp_path):
    node = NodePrivacy.open(tmp_path, _plan())
    model = nn.Linear(5, 2)
    loader = DataLoader(TensorDataset(torch.randn(N, 5)), batch_size=BATCH * 2)
    with pytest.raises(PrivacyError, match="sampling rate"):
        node.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), loader)


def _uncalibrated(**kw):
    return _cached_plan("rdp", tuple(sorted(kw.items())), calibrate=False)


def test_later_rounds_reopen_without_calibrating(tmp_path):
    plan = _plan()
    assert not NodePrivacy.has_plan(tmp_path)
    with pytest.raises(ValueError, match="uncalibrated"):
        NodePrivacy.open(tmp_path, _uncalibrated())  # the first start must calibrate
    first = NodePrivacy.open(tmp_path, plan)
    _step_one_round(first)
    first.save()
    assert NodePrivacy.has_plan(tmp_path)
    reopened = NodePrivacy.open(tmp_path, _uncalibrated())
    assert reopened.plan == plan and reopened.steps == first.steps
    with pytest.raises(PrivacyError, match="fixed for the run"):  # the settings are still checked
        NodePrivacy.open(tmp_path, _uncalibrated(batch_size=BATCH * 2))


def test_an_uncalibrated_plan_differs_only_in_its_noise(tmp_path):
    plan, quick = _plan(), _uncalibrated()
    assert math.isnan(quick.noise_multiplier)
    assert dataclasses.replace(quick, noise_multiplier=plan.noise_multiplier) == plan
    with pytest.raises(PrivacyError, match="delta"):  # the settings are validated all the same
        _uncalibrated(delta=0.5)
