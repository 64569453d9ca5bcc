"""Noise calibration meets the target within 1% (never above) and bad targets are refused in one line."""

from __future__ import annotations

import math

import pytest

from fedpriv.kernel.errors import PrivacyError
from fedpriv.privacy import PrivacyPlan, compute_epsilon, dp_steps_per_epoch, plan_privacy

COMBOS = [
    # (num_examples, batch_size, local_epochs, rounds, target_epsilon, delta)
    (300, 32, 1, 3, 8.0, 1e-5),
    (1000, 16, 2, 5, 0.5, 1e-5),
    (930, 10, 1, 2, 3.0, 1e-4),  # ceil(930/10) = 93: Opacus's DPDataLoader runs 92 batches
    (50, 64, 1, 10, 2.0, 1e-3),  # one batch holds everything: q = 1
]


def _plan(accountant="rdp", org="org-1", **kw):
    args = dict(
        org=org,
        num_examples=300,
        batch_size=32,
        local_epochs=1,
        rounds=3,
        target_epsilon=8.0,
        delta=1e-5,
        max_grad_norm=1.0,
        accountant=accountant,
    )
    args.update(kw)
    return plan_privacy(**args)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
@pytest.mark.parametrize(("n", "batch", "epochs", "rounds", "eps", "delta"), COMBOS)
def test_calibrated_noise_meets_target_within_one_percent(accountant, n, batch, epochs, rounds, eps, delta):
    plan = _plan(
        accountant,
        num_examples=n,
        batch_size=batch,
        local_epochs=epochs,
        rounds=rounds,
        target_epsilon=eps,
        delta=delta,
    )
    assert plan.planned_steps == plan.steps_per_round * rounds
    assert plan.steps_per_round == dp_steps_per_epoch(n, batch) * epochs
    assert plan.sample_rate == 1 / dp_steps_per_epoch(n, batch)
    assert plan.noise_multiplier > 0
    spent = compute_epsilon(
        noise_multiplier=plan.noise_multiplier,
        sample_rate=plan.sample_rate,
        steps=plan.planned_steps,
        delta=delta,
        accountant=accountant,
    )
    assert eps * 0.99 <= spent <= eps


def test_steps_per_epoch_mirrors_opacus_dataloader():
    import torch
    from opacus.data_loader import DPDataLoader
    from torch.utils.data import DataLoader, TensorDataset

    for n, batch in [(300, 32), (930, 10), (50, 64), (990, 10), (64, 16)]:
        loader = DataLoader(TensorDataset(torch.zeros(n, 1)), batch_size=batch)
        dp_loader = DPDataLoader.from_data_loader(loader)
        assert dp_steps_per_epoch(n, batch) == len(dp_loader)
    assert dp_steps_per_epoch(930, 10) == 92  # int(1 / (1 / 93)) == 92 in floating point


def test_plan_round_trips_through_dict():
    plan = _plan()
    assert PrivacyPlan.from_dict(plan.to_dict()) == plan
    assert set(plan.to_dict()) >= {"noise_multiplier", "sample_rate", "planned_steps", "accountant"}


def test_more_rounds_need_more_noise():
    assert _plan(rounds=6).noise_multiplier > _plan(rounds=3).noise_multiplier


def test_compute_epsilon_is_zero_without_steps():
    assert compute_epsilon(noise_multiplier=1.0, sample_rate=0.1, steps=0, delta=1e-5, accountant="rdp") == 0.0


# --------------------------------------------------------------------------- refusals


def _refusal(**kw) -> str:
    with pytest.raises(PrivacyError) as info:
        _plan(**kw)
    message = str(info.value)
    assert "\n" not in message
    assert "'org-1'" in message
    return message


@pytest.mark.parametrize("eps", [0.0, -1.0])
def test_non_positive_target_epsilon_is_refused(eps):
    message = _refusal(target_epsilon=eps)
    assert "privacy.target_epsilon" in message


@pytest.mark.parametrize("delta", [0.0, -1e-5])
def test_non_positive_delta_is_refused(delta):
    assert "privacy.delta" in _refusal(delta=delta)


def test_delta_not_below_one_over_n_is_refused():
    message = _refusal(delta=0.01)
    assert (
        "privacy.delta=0.01 is not below 1/n = 0.0033 for organisation 'org-1' (300 training examples): choose"
        in message
    )
    # exactly 1/n is refused too
    assert "privacy.delta" in _refusal(delta=1 / 300)


def test_unreachable_target_is_refused():
    # RDP cannot certify epsilon = 0.01 at delta = 1e-5 with any noise: Opacus gives up (ValueError).
    message = _refusal(target_epsilon=0.01)
    assert "privacy.target_epsilon=0.01" in message
    assert "cannot be reached" in message


def test_unknown_accountant_is_refused():
    assert "privacy.accountant" in _refusal(accountant="gdp")


def test_refusal_names_the_organisation():
    with pytest.raises(PrivacyError, match="'hospital-b'"):
        _plan(org="hospital-b", delta=0.5)
    assert math.isfinite(_plan(org="hospital-b").noise_multiplier)
