"""Epsilon from a ledger's recorded parameters alone, as an auditor recomputes it.

Nothing here reads a node's accountant: the events are the ledger's
``(noise_multiplier, sample_rate, local_steps)`` triples. RDP is computed for
every prefix of the ledger at once (one RDP vector per distinct mechanism,
cumulative sums, the Balle et al. 2020 conversion that Opacus uses, vectorised),
so 1,000 rounds cost about what one does. PRV (Gopi et al. 2021, Opacus's
implementation) is tighter and costlier: it is computed for the prefixes asked
for.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

Event = tuple[float, float, int]  # (noise_multiplier, sample_rate, steps)
RDP_ORDERS = np.array([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)), dtype=float)  # Opacus's alphas


@functools.cache
def _rdp_analysis():
    """Opacus's RDP analysis of the sampled Gaussian mechanism, loaded on its own.

    The module needs only numpy and scipy; importing it through the ``opacus`` package would import torch
    (seconds), which an audit of ledgers never needs.
    """
    spec = importlib.util.find_spec("opacus")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("opacus is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "accountants" / "analysis" / "rdp.py"
    module_spec = importlib.util.spec_from_file_location("fedpriv_opacus_rdp_analysis", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def _rdp_per_step(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    compute_rdp = _rdp_analysis().compute_rdp
    return np.asarray(compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=RDP_ORDERS))


def rdp_epsilons(events: Sequence[Event], delta: float) -> list[float]:
    """Epsilon at ``delta`` after each event (the RDP accountant), one value per event."""
    if not events:
        return []
    per_step: dict[tuple[float, float], np.ndarray] = {}
    rows = np.empty((len(events), len(RDP_ORDERS)))
    for index, (sigma, q, steps) in enumerate(events):
        key = (float(sigma), float(q))
        if key not in per_step:
            per_step[key] = _rdp_per_step(*key) if steps else np.zeros(len(RDP_ORDERS))
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


def prv_epsilon(events: Sequence[Event], delta: float) -> float:
    """Epsilon at ``delta`` after all ``events`` with Opacus's PRV accountant (fresh, from the events only)."""
    from opacus.accountants import PRVAccountant

    merged: dict[tuple[float, float], int] = {}
    for sigma, q, steps in events:  # composing one mechanism k times, in any order: merge identical ones
        if int(steps) > 0:
            merged[(float(sigma), float(q))] = merged.get((float(sigma), float(q)), 0) + int(steps)
    history = [(sigma, q, steps) for (sigma, q), steps in merged.items()]
    if not history:
        return 0.0
    accountant = PRVAccountant()
    accountant.history = history
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(accountant.get_epsilon(delta=delta))


def epsilons(events: Sequence[Event], delta: float, accountant: str) -> list[float]:
    """Epsilon after each event with the named accountant ("rdp" vectorised; "prv" one computation per prefix)."""
    if accountant == "rdp":
        return rdp_epsilons(events, delta)
    if accountant == "prv":
        return [prv_epsilon(events[: index + 1], delta) for index in range(len(events))]
    raise ValueError(f"unknown accountant {accountant!r}; expected rdp or prv")
