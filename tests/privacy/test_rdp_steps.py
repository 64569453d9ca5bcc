"""Cached per-step RDP gives Opacus's epsilons bit for bit; the fast calibration search never overshoots."""

from __future__ import annotations

import json

import pytest
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from fedpriv.privacy import NodePrivacy, plan_privacy, rdp_steps
from fedpriv.privacy.accountant_state import RDP_FILE

PLAN_SETTINGS = (
    ("org", "org-a"),
    ("num_examples", 500),
    ("batch_size", 25),
    ("local_epochs", 1),
    ("rounds", 3),
    ("target_epsilon", 3.0),
    ("delta", 1e-5),
    ("max_grad_norm", 1.0),
    ("accountant", "rdp"),
)


def test_the_written_out_orders_are_opacus_s():
    assert rdp_steps.ORDERS == tuple(float(a) for a in RDPAccountant.DEFAULT_ALPHAS)


def opacus_epsilon(history, delta):
    accountant = RDPAccountant()
    accountant.history = list(history)
    return accountant.get_epsilon(delta=delta)


@pytest.mark.parametrize(
    "history",
    [
        [(1.1, 0.01, 1)],
        [(0.83, 0.125, 40)],
        [(3.7, 0.002, 25_000)],
        [(1.3, 0.05, 100), (2.0, 0.05, 7), (1.3, 0.05, 3)],  # several mechanisms, one repeated
        [(0.5, 1.0, 3)],  # no sampling
    ],
)
def test_epsilon_equals_opacus_rdp_accountant_bit_for_bit(history):
    for delta in (1e-5, 1e-3):
        assert rdp_steps.epsilon(history, delta) == opacus_epsilon(history, delta)


def test_no_steps_spend_nothing():
    assert rdp_steps.epsilon([], 1e-5) == 0.0


@pytest.mark.parametrize("sigma", [0.6, 0.9, 1.4, 3.0, 8.0])
@pytest.mark.parametrize("q,steps", [(0.01, 300), (0.125, 24), (0.004, 20_000)])
def test_search_epsilon_is_never_below_the_full_one_and_close_to_it(sigma, q, steps):
    full = opacus_epsilon([(sigma, q, steps)], 1e-5)
    search = rdp_steps.search_epsilon(sigma, q, steps, 1e-5)
    assert search >= full
    assert search <= full * 1.002  # the best order is next to the best integer order


@pytest.mark.parametrize("target", [0.5, 1.0, 3.0, 8.0])
@pytest.mark.parametrize("q,steps", [(0.016, 189), (0.125, 8), (0.001, 30_000)])
def test_calibrated_noise_meets_the_target_as_tightly_as_opacus(target, q, steps):
    tolerance = 0.005 * target
    sigma = rdp_steps.noise_multiplier_for(
        target_epsilon=target, delta=1e-5, sample_rate=q, steps=steps, tolerance=tolerance
    )
    spent = opacus_epsilon([(sigma, q, steps)], 1e-5)
    assert target - tolerance <= spent <= target
    opacus_sigma = get_noise_multiplier(
        target_epsilon=target,
        target_delta=1e-5,
        sample_rate=q,
        steps=steps,
        accountant="rdp",
        epsilon_tolerance=tolerance,
    )
    assert sigma == pytest.approx(opacus_sigma, rel=0.01)


def test_an_unreachable_target_is_opacus_error():
    with pytest.raises(ValueError, match="privacy budget is too low"):
        rdp_steps.noise_multiplier_for(target_epsilon=1e-9, delta=1e-5, sample_rate=1.0, steps=10**6, tolerance=1e-12)


def _plan():
    return plan_privacy(**dict(PLAN_SETTINGS))


def _count_rdp_orders(monkeypatch) -> list[float]:
    seen: list[float] = []
    loaded = rdp_steps.analysis()  # Opacus's own opacus.accountants.analysis.rdp
    original = loaded._compute_rdp

    def counting(q, sigma, alpha):
        seen.append(alpha)
        return original(q, sigma, alpha)

    monkeypatch.setattr(loaded, "_compute_rdp", counting)
    return seen


def test_node_privacy_stores_the_plans_vector_and_reuses_it(tmp_path, monkeypatch):
    plan = _plan()
    privacy = NodePrivacy.open(tmp_path, plan)
    privacy.accountant.history = [(plan.noise_multiplier, plan.sample_rate, 20)]
    rdp_steps._VECTORS.clear()
    first = privacy.epsilon()
    assert first == opacus_epsilon(privacy.accountant.history, plan.delta)
    stored = json.loads((tmp_path / RDP_FILE).read_text())
    assert (stored["noise_multiplier"], stored["sample_rate"]) == (plan.noise_multiplier, plan.sample_rate)
    assert len(stored["rdp"]) == len(stored["orders"]) == len(RDPAccountant.DEFAULT_ALPHAS)
    privacy.save()

    rdp_steps._VECTORS.clear()  # a new ClientApp process
    seen = _count_rdp_orders(monkeypatch)
    reopened = NodePrivacy.open(tmp_path, plan)
    spent, next_round = reopened.epsilon(), reopened.epsilon_after(plan.steps_per_round)
    assert seen and all(alpha == int(alpha) for alpha in seen)  # only the load check: no fractional order
    assert spent == first
    assert next_round == opacus_epsilon(
        [(plan.noise_multiplier, plan.sample_rate, 20 + plan.steps_per_round)], plan.delta
    )


def test_a_damaged_vector_on_disk_is_recomputed_never_trusted(tmp_path):
    plan = _plan()
    privacy = NodePrivacy.open(tmp_path, plan)
    privacy.accountant.history = [(plan.noise_multiplier, plan.sample_rate, 20)]
    honest = privacy.epsilon()
    data = json.loads((tmp_path / RDP_FILE).read_text())
    data["rdp"] = [value / 10 for value in data["rdp"]]  # would understate what the node spends
    (tmp_path / RDP_FILE).write_text(json.dumps(data))

    rdp_steps._VECTORS.clear()
    reopened = NodePrivacy.open(tmp_path, plan)
    reopened.accountant.history = [(plan.noise_multiplier, plan.sample_rate, 20)]
    assert reopened.epsilon() == honest
    assert json.loads((tmp_path / RDP_FILE).read_text())["rdp"] != data["rdp"]  # rewritten


def _reference_noise_multiplier(target_epsilon, delta, sample_rate, steps, tolerance):
    """The search as Opacus's get_noise_multiplier writes it, over the full ``search_epsilon`` at every step."""
    sigma_low, sigma_high, eps_high = 0.0, 10.0, float("inf")
    while eps_high > target_epsilon:
        sigma_high *= 2
        eps_high = rdp_steps.search_epsilon(sigma_high, sample_rate, steps, delta)
    while target_epsilon - eps_high > tolerance:
        sigma = (sigma_low + sigma_high) / 2
        eps = rdp_steps.search_epsilon(sigma, sample_rate, steps, delta)
        if eps < target_epsilon:
            sigma_high, eps_high = sigma, eps
        else:
            sigma_low = sigma
    return sigma_high


@pytest.mark.parametrize(
    ("target", "q", "steps"),
    [(8.0, 1 / 6, 12), (8.0, 1 / 9, 18), (4.0, 0.1, 50), (50.0, 0.5, 4)],  # best orders < 11
)
def test_calibration_computes_fractional_orders_only_where_a_comparison_needs_them(target, q, steps, monkeypatch):
    tolerance = 0.005 * target
    expected = _reference_noise_multiplier(target, 1e-5, q, steps, tolerance)
    opacus_rdp = rdp_steps.analysis()
    fractional = []

    class Counting:
        get_privacy_spent = staticmethod(opacus_rdp.get_privacy_spent)

        @staticmethod
        def compute_rdp(*, q, noise_multiplier, steps, orders):
            fractional.extend(a for a in orders if a != int(a))
            return opacus_rdp.compute_rdp(q=q, noise_multiplier=noise_multiplier, steps=steps, orders=orders)

    monkeypatch.setattr(rdp_steps, "analysis", lambda: Counting)
    sigma = rdp_steps.noise_multiplier_for(
        target_epsilon=target, delta=1e-5, sample_rate=q, steps=steps, tolerance=tolerance
    )
    assert sigma == expected  # the same decisions, bit for bit
    searched = len(fractional)
    fractional.clear()
    _reference_noise_multiplier(target, 1e-5, q, steps, tolerance)
    assert searched < len(fractional)  # some fractional orders never computed (14-45% fewer in these cases)
