"""Epsilon from recorded events with Opacus's own analyses: the accountant the nodes claim with.

Nothing here reads a node's accountant: the events are ``(noise_multiplier,
sample_rate, steps)`` triples. RDP is computed for every prefix at once (one
RDP vector per distinct mechanism, cumulative sums, the Balle et al. 2020
conversion that Opacus uses, vectorised), so 1,000 rounds cost about what one
does: the coordinator's organisation-level record uses it, and the audit asks
it whether an RDP claim is what its stated accountant gives. PRV (Gopi et al.
2021, Opacus's implementation) is computed for the prefixes asked for. The
audit's independent recomputation is another implementation altogether:
privacy/independent.py (dp-accounting).
"""

from __future__ import annotations

import functools
import importlib.util
import math
import sys
import types
import warnings
from collections.abc import Sequence
from pathlib import Path

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


class _RDPFromEvents:
    """What Opacus's PRV domain sizing asks of its RDPAccountant (a history, get_epsilon), served vectorised."""

    def __init__(self) -> None:
        self.history: list[Event] = []

    def get_epsilon(self, delta: float) -> float:
        return rdp_epsilons(self.history, delta)[-1]


_SHADOW = "fedpriv_opacus_shadow"


@functools.cache
def _prv_analysis():
    """Opacus's PRV analysis (``opacus.accountants.analysis.prv``) loaded without torch.

    Its modules need numpy and scipy, plus two names from Opacus's accountant modules (which import
    torch): the RDP analysis (loaded on its own, privacy/rdp_steps.py) and ``RDPAccountant`` for the domain size,
    served here by the vectorised RDP of this module. Importing torch costs seconds in every audit
    worker; this costs milliseconds.
    """
    root = Path(next(iter(importlib.util.find_spec("opacus").submodule_search_locations))) / "accountants"
    for name in (_SHADOW, f"{_SHADOW}.accountants", f"{_SHADOW}.accountants.analysis"):
        package = types.ModuleType(name)
        package.__path__ = []  # a package that finds nothing by itself: every module below is placed by hand
        sys.modules.setdefault(name, package)
    sys.modules[f"{_SHADOW}.accountants.analysis.rdp"] = rdp_steps.analysis()
    rdp_accountant = types.ModuleType(f"{_SHADOW}.accountants.rdp")
    rdp_accountant.RDPAccountant = _RDPFromEvents
    sys.modules[rdp_accountant.__name__] = rdp_accountant
    folder = root / "analysis" / "prv"
    spec = importlib.util.spec_from_file_location(
        f"{_SHADOW}.accountants.analysis.prv", folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


PRV_EPS_ERROR = 0.01  # Opacus's default for PRVAccountant.get_epsilon, which nodes use


def prv_epsilon(events: Sequence[Event], delta: float, eps_error: float = PRV_EPS_ERROR) -> float:
    """Epsilon at ``delta`` after all ``events`` with the PRV accountant (Gopi et al. 2021), from the events only.

    The same computation as Opacus's ``PRVAccountant.get_epsilon`` (its upper bound, ``delta_error =
    delta / 1000``): a domain sized by Gopi et al.'s remark 5.6, each mechanism discretised once and
    composed with itself by FFT.
    """
    merged: dict[tuple[float, float], int] = {}
    for sigma, q, steps in events:  # composing one mechanism k times, in any order: merge identical ones
        if int(steps) > 0:
            merged[(float(sigma), float(q))] = merged.get((float(sigma), float(q)), 0) + int(steps)
    if not merged:
        return 0.0
    prv = _prv_analysis()
    delta_error = delta / 1000
    mechanisms = [prv.PoissonSubsampledGaussianPRV(q, sigma) for sigma, q in merged]
    counts = list(merged.values())
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        size = prv.compute_safe_domain_size(mechanisms, counts, eps_error=eps_error, delta_error=delta_error)
        mesh = eps_error / np.sqrt(sum(counts) * np.log(12 / delta_error) / 2)
        domain = prv.Domain.create_aligned(-size, size, mesh)
        discrete = [
            prv.discretize(prv.TruncatedPrivacyRandomVariable(m, domain.t_min, domain.t_max), domain)
            for m in mechanisms
        ]
        composed = prv.compose_heterogeneous(discrete, counts)
        return float(composed.compute_epsilon(delta, delta_error, eps_error)[2])
