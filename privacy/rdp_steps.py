"""Opacus's RDP accounting, with each mechanism's per-step RDP computed once.

Opacus's ``RDPAccountant.get_epsilon`` recomputes the RDP of every history
entry at all 151 orders on each call (pure Python series for the fractional
orders: about 0.4 s on this machine's CPU). A node asks for epsilon several
times a message (budget check, what the next round would cost, its report),
and noise calibration asks 14 times: seconds of CPU per message, which ten
nodes sharing two cores pay five times over. RDP after ``n`` steps is ``n``
times one step's RDP, and Opacus computes it exactly that way
(``compute_rdp(..., steps=n) == compute_rdp(..., steps=1) * n``), so caching the
one-step vector gives bit-identical epsilons (tests/privacy/test_rdp_steps.py).

Calibration searches over the orders near the best integer order only: a
minimum over fewer orders is never below Opacus's minimum over all of them, so
a noise multiplier the search accepts meets the target under Opacus's full
accounting too (``plan_privacy`` checks it with the full orders before use).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import numpy as np

MAX_SIGMA = 1e6  # Opacus's get_noise_multiplier gives up at the same noise multiplier
# Opacus's RDPAccountant.DEFAULT_ALPHAS, written out so that importing this module (privacy/independent.py reads
# them) imports no torch (a test compares them)
ORDERS = tuple([1 + x / 10.0 for x in range(1, 100)] + [float(a) for a in range(12, 64)])


def analysis():
    """Opacus's RDP analysis of the sampled Gaussian mechanism: its public ``opacus.accountants.analysis.rdp``.

    Imported on first use, not with this module: importing ``opacus`` imports torch (about 2 s), which a node
    has loaded anyway, and an audit only for an RDP claim that dp-accounting leaves open (privacy/audit_epsilon.py).
    """
    from opacus.accountants.analysis import rdp

    return rdp


def orders() -> tuple[float, ...]:
    """The orders Opacus's RDP accountant minimises over."""
    return ORDERS


_VECTORS: dict[tuple[float, float], tuple[float, ...]] = {}  # (sigma, q) -> one step's RDP at every order


def per_step(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    """One step's RDP at every order, as Opacus computes it (once per process and mechanism)."""
    key = (float(noise_multiplier), float(sample_rate))
    if key not in _VECTORS:
        values = analysis().compute_rdp(q=key[1], noise_multiplier=key[0], steps=1, orders=orders())
        _VECTORS[key] = tuple(float(v) for v in values)
    return np.array(_VECTORS[key])


def remember(noise_multiplier: float, sample_rate: float, values: Sequence[float]) -> None:
    """Take a vector ``per_step`` gave earlier (``NodePrivacy`` stores it next to the node's plan)."""
    if len(values) != len(orders()):
        raise ValueError(f"expected {len(orders())} RDP values, got {len(values)}")
    _VECTORS[(float(noise_multiplier), float(sample_rate))] = tuple(float(v) for v in values)


def agrees(
    noise_multiplier: float, sample_rate: float, stored_orders: Sequence[float], values: Sequence[float]
) -> bool:
    """Whether a stored one-step vector is for Opacus's orders and matches them at the integer orders.

    The integer orders cost a fortieth of the fractional ones: a cheap check that a cached vector on disk
    is the one ``per_step`` computed, not a damaged or foreign file.
    """
    if [float(a) for a in stored_orders] != list(orders()) or len(values) != len(orders()):
        return False
    integer = [i for i, a in enumerate(orders()) if a == int(a)]
    fresh = analysis().compute_rdp(
        q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=[orders()[i] for i in integer]
    )
    return all(float(values[i]) == float(v) for i, v in zip(integer, fresh, strict=True))


def epsilon(history: Iterable[tuple[float, float, int]], delta: float) -> float:
    """What ``RDPAccountant(history).get_epsilon(delta)`` returns, bit for bit (0.0 for no steps)."""
    history = [(float(s), float(q), int(n)) for s, q, n in history]
    if not history:
        return 0.0
    # Opacus: sum([compute_rdp(q, sigma, n, orders) for ...]) with compute_rdp = vector * n
    total = sum([per_step(sigma, q) * n for sigma, q, n in history])
    eps, _ = analysis().get_privacy_spent(orders=list(orders()), rdp=total, delta=delta)
    return float(eps)


class _SearchEpsilon:
    """``search_epsilon`` in two parts: the integer orders at once, the fractional ones only when asked.

    The epsilon over the integer orders alone (``bound``) is never below the search epsilon (a minimum over
    fewer orders), so a comparison it already settles needs no fractional order: those cost forty times the
    integer ones, and most of the calibration's comparisons are settled by the bound alone.
    """

    def __init__(self, noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> None:
        self._args = (noise_multiplier, sample_rate, steps, delta)
        sgm = analysis()
        coarse = [a for a in orders() if a == int(a)]
        rdp = sgm.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=steps, orders=coarse)
        eps, best = sgm.get_privacy_spent(orders=coarse, rdp=rdp, delta=delta)
        self.bound = float(eps)
        self._near = [a for a in orders() if a != int(a) and abs(a - best) < 1] if math.isfinite(best) else []
        self._value: float | None = None if self._near else self.bound

    def value(self) -> float:
        if self._value is None:
            noise_multiplier, sample_rate, steps, delta = self._args
            sgm = analysis()
            rdp = sgm.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=steps, orders=self._near)
            eps_near, _ = sgm.get_privacy_spent(orders=self._near, rdp=rdp, delta=delta)
            self._value = float(min(self.bound, eps_near))
        return self._value

    def holds(self, test: Callable[[float], bool]) -> bool:
        """``test(value())``, for a ``test`` that holds for an epsilon whenever it holds for a larger one."""
        return test(self.bound) or test(self.value())

    def exceeds(self, limit: float) -> bool:
        """``value() > limit``."""
        return self.bound > limit and self.value() > limit


def search_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """Epsilon over the integer orders and the fractional ones next to the best of them.

    Never below ``epsilon([(noise_multiplier, sample_rate, steps)], delta)`` (a minimum over a subset of its
    orders), equal to it when the best order is among them; about a fifth of the cost.
    """
    return _SearchEpsilon(noise_multiplier, sample_rate, steps, delta).value()


def noise_multiplier_for(
    *, target_epsilon: float, delta: float, sample_rate: float, steps: int, tolerance: float
) -> float:
    """Opacus's ``get_noise_multiplier`` search (double, then bisect) over ``search_epsilon``.

    Returns the smallest noise multiplier found whose search epsilon is within ``tolerance`` below the
    target. Raises ValueError when even ``MAX_SIGMA`` does not reach it (Opacus's message). Each comparison
    computes the fractional orders only when the integer ones leave it open (``_SearchEpsilon``): the same
    decisions, so the same noise multiplier, in about half the time.
    """
    sigma_low, sigma_high, eps_high = 0.0, 10.0, None
    while eps_high is None or eps_high.exceeds(target_epsilon):
        sigma_high *= 2
        if sigma_high > MAX_SIGMA:
            raise ValueError("The privacy budget is too low.")
        eps_high = _SearchEpsilon(sigma_high, sample_rate, steps, delta)
    while eps_high.holds(lambda eps: target_epsilon - eps > tolerance):
        sigma = (sigma_low + sigma_high) / 2
        eps = _SearchEpsilon(sigma, sample_rate, steps, delta)
        if eps.holds(lambda eps: eps < target_epsilon):
            sigma_high, eps_high = sigma, eps
        else:
            sigma_low = sigma
    return sigma_high
