"""Epsilon recomputed by a second implementation: Google's ``dp-accounting``, not the Opacus code that made the claims.

A node's claims come from Opacus's accountants. An audit that reran the same
code would reproduce its bugs, so the audit recomputes every ledger with
``dp_accounting``: its RDP accountant (the sampled Gaussian's RDP at each order
from its own implementation, then its conversion to epsilon) for every entry,
and its PLD accountant (privacy loss distributions, Meiser & Mohammadi 2018,
pessimistic estimate) where asked. Only the events are read:
``(noise_multiplier, sample_rate, steps)`` per entry.

RDP is computed for every prefix of a ledger at once: one step's RDP vector per
distinct mechanism (``RdpAccountant.rdp`` after one composed step), cumulative
sums, and the conversion of ``dp_accounting.rdp.compute_epsilon`` (Canonne et
al. 2020, Proposition 12 of arXiv:2004.00010) evaluated for all prefixes with
numpy; the last prefix is also converted by dp-accounting's own
``compute_epsilon`` and must agree. The orders are the union of Opacus's and dp-accounting's defaults, so
the minimum is never above the one a node's accountant takes.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Callable, Iterator, Sequence

import numpy as np
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from fedpriv.privacy.rdp_steps import ORDERS as OPACUS_ORDERS

Event = tuple[float, float, int]  # (noise_multiplier, sample_rate, steps)
ORDERS = np.array(
    sorted({float(a) for a in OPACUS_ORDERS} | {float(a) for a in rdp_privacy_accountant.DEFAULT_RDP_ORDERS})
)
PLD_DISCRETIZATION = 1e-4  # dp-accounting's default value_discretization_interval
LIBRARY = "dp-accounting"


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """dp-accounting logs (through absl) each fractional order whose series it gives up on; the order is simply
    left out of the minimum, which only makes its RDP more conservative."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


class RecomputationError(ValueError):
    """The second implementation could not give a finite, non-negative epsilon for these events."""


def _event(noise_multiplier: float, sample_rate: float) -> dp_event.DpEvent:
    gaussian = dp_event.GaussianDpEvent(float(noise_multiplier))
    return gaussian if float(sample_rate) == 1.0 else dp_event.PoissonSampledDpEvent(float(sample_rate), gaussian)


@functools.lru_cache(maxsize=65536)
def rdp_per_step(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    """One step's RDP at every order of ``ORDERS``, as dp-accounting computes it."""
    accountant = rdp_privacy_accountant.RdpAccountant(list(ORDERS))
    with _quiet():
        accountant.compose(_event(noise_multiplier, sample_rate))
    values = accountant.rdp
    values.setflags(write=False)
    return values


def _convert(rdp: np.ndarray, delta: float) -> np.ndarray:
    """dp-accounting's ``compute_epsilon`` for each row of ``rdp`` (prefixes x orders), vectorised."""
    orders = ORDERS[np.newaxis, :]
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        eps = rdp + np.log1p(-1 / orders) - np.log(delta * orders) / (orders - 1)
        kl_enough = delta**2 + np.expm1(-rdp) > 0  # delta <= sqrt(1 - exp(-KL)): epsilon 0 at this order
    eps = np.where(rdp < 0, 0.0, np.where(kl_enough, 0.0, np.where(orders > 1.01, eps, np.inf)))
    eps = np.where(np.isnan(eps), np.inf, eps)
    return np.maximum(0.0, eps.min(axis=1))


def rdp_epsilons(events: Sequence[Event], delta: float) -> list[float]:
    """Epsilon at ``delta`` after each event with dp-accounting's RDP accountant; RecomputationError if it cannot."""
    if not events:
        return []
    rows = np.empty((len(events), len(ORDERS)))
    try:
        for index, (sigma, q, steps) in enumerate(events):
            rows[index] = rdp_per_step(float(sigma), float(q)) * int(steps) if steps else 0.0
    except (ValueError, ArithmeticError, OverflowError) as exc:
        raise RecomputationError(f"dp-accounting's RDP accountant refused the events ({exc})") from None
    cumulative = np.cumsum(rows, axis=0)
    values = _convert(cumulative, delta)
    # the last prefix once more through dp-accounting's own conversion: the vectorised one must agree
    with _quiet():
        direct = float(rdp_privacy_accountant.compute_epsilon(ORDERS, cumulative[-1], delta)[0])
    if not math.isclose(direct, float(values[-1]), rel_tol=1e-9, abs_tol=1e-12):
        raise RecomputationError(
            f"dp-accounting's conversion gives {direct!r} for the whole ledger, the vectorised prefixes"
            f" {float(values[-1])!r}"
        )
    return [float(v) for v in values]


def merged(events: Sequence[Event]) -> dict[tuple[float, float], int]:
    """Steps per distinct mechanism (composition is commutative: identical mechanisms compose as one count)."""
    counts: dict[tuple[float, float], int] = {}
    for sigma, q, steps in events:
        if int(steps) > 0:
            counts[(float(sigma), float(q))] = counts.get((float(sigma), float(q)), 0) + int(steps)
    return counts


def pld_epsilon(events: Sequence[Event], delta: float) -> float:
    """Epsilon at ``delta`` after all ``events`` with dp-accounting's PLD accountant (pessimistic estimate)."""
    counts = merged(events)
    if not counts:
        return 0.0
    accountant = pld_privacy_accountant.PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)
    try:
        for (sigma, q), steps in counts.items():
            accountant.compose(_event(sigma, q), steps)
        value = float(accountant.get_epsilon(delta))
    except (ValueError, ArithmeticError, OverflowError, MemoryError) as exc:
        raise RecomputationError(f"dp-accounting's PLD accountant refused the events ({exc})") from None
    if not math.isfinite(value) or value < 0:
        raise RecomputationError(f"dp-accounting's PLD accountant gives epsilon {value!r}")
    return value


def bracket_claims(
    count: int, claims: Sequence[float], value: Callable[[int], float], tolerance: float
) -> tuple[dict[int, float], list[bool]]:
    """Which claims (one per prefix) are below a costly monotone epsilon, computing few prefixes.

    Epsilon never falls as events are added, so a claim at or above a later prefix's value (less
    ``tolerance``) is sound and one below an earlier prefix's is under-reported; only the claims left
    undecided between two computed prefixes make the audit compute another one (bisection).
    Returns the values computed (prefix index -> epsilon) and the under-reported flags.
    """
    known: dict[int, float] = {}

    def at(index: int) -> float:
        if index < 0:
            return 0.0
        if index not in known:
            known[index] = value(index)
        return known[index]

    def below(claim: float, reference: float) -> bool:
        return claim < reference * (1 - tolerance) - 1e-12

    under = [False] * count
    if not count:
        return known, under
    under[count - 1] = below(claims[count - 1], at(count - 1))
    intervals = [(-1, count - 1)]  # open intervals whose two ends are computed
    while intervals:
        low, high = intervals.pop()
        undecided = []
        for index in range(low + 1, high):
            if not below(claims[index], at(high)):
                continue
            if below(claims[index], at(low)):
                under[index] = True
            else:
                undecided.append(index)
        if undecided:
            middle = undecided[len(undecided) // 2]
            under[middle] = below(claims[middle], at(middle))
            intervals += [(low, middle), (middle, high)]
    return known, under
