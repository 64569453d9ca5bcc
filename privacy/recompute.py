"""Epsilon from recorded events with Opacus's own analyses: the accountant the nodes claim with.

Nothing here reads a node's accountant: the events are ``(noise_multiplier,
sample_rate, steps)`` triples. RDP is computed for every prefix at once (one
RDP vector per distinct mechanism, cumulative sums, the Balle et al. 2020
conversion that Opacus uses, vectorised), so 1,000 rounds cost about what one
does: the coordinator's organisation-level record uses it, and the audit asks
it whether an RDP claim is what its stated accountant gives. PRV (Gopi et al.
2021) is Opacus's PRVAccountant, for the prefixes asked for. Both use Opacus's
public API, imported on first use (it imports torch). The audit's independent
recomputation is another implementation altogether: privacy/independent.py
(dp-accounting).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np

from fedpriv.privacy import rdp_steps

Event = tuple[float, float, int]  # (noise_multiplier, sample_rate, steps)
RDP_ORDERS = np.array(rdp_steps.ORDERS)


def rdp_epsilons(events: Sequence[Event], delta: float) -> list[float]:
    """Epsilon at ``delta`` after each event (the RDP accountant), one value per event."""
    if not events:
        return []
    per_step: dict[tuple[float, float], np.ndarray] = {}
    rows = np.empty((len(events), len(RDP_ORDERS)))
    for index, (sigma, q, steps) in enumerate(events):
        key = (float(sigma), float(q))
        if key not in per_step:
            per_step[key] = rdp_steps.per_step(*key) if steps else np.zeros(len(RDP_ORDERS))
        rows[index] = per_step[key] * int(steps)
    cumulative = np.cumsum(rows, axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        eps = (
            cumulative
            - (math.log(delta) + np.log(RDP_ORDERS)) / (RDP_ORDERS - 1)
            + np.log((RDP_ORDERS - 1) / RDP_ORDERS)
        )
    eps = np.where(np.isnan(eps), np.inf, eps)
    best = eps.min(axis=1)
    totals = cumulative.sum(axis=1)
    return [0.0 if total == 0 else float(value) for value, total in zip(best, totals, strict=True)]


PRV_EPS_ERROR = 0.01  # Opacus's default for PRVAccountant.get_epsilon, which nodes use


def prv_epsilon(events: Sequence[Event], delta: float, eps_error: float = PRV_EPS_ERROR) -> float:
    """Epsilon at ``delta`` after all ``events`` with Opacus's PRV accountant (Gopi et al. 2021), from the events only.

    ``PRVAccountant.get_epsilon`` (its upper bound, ``delta_error = delta / 1000``) over the events, identical
    mechanisms merged first: composing one mechanism k times is one history entry of k steps, in any order, and
    each entry is discretised once.
    """
    merged: dict[tuple[float, float], int] = {}
    for sigma, q, steps in events:
        if int(steps) > 0:
            merged[(float(sigma), float(q))] = merged.get((float(sigma), float(q)), 0) + int(steps)
    if not merged:
        return 0.0
    from opacus.accountants import PRVAccountant  # imports torch: only when PRV is asked for

    accountant = PRVAccountant()
    accountant.history = [(sigma, q, steps) for (sigma, q), steps in merged.items()]
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        return float(accountant.get_epsilon(delta, eps_error=eps_error))
