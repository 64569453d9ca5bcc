"""Whether one ledger entry is well-formed: its fields present, typed, and its mechanism possible.

Protects the recomputation from entries it cannot read honestly: a claim is only ever checked against
parameters that a real DP-SGD node (or the coordinator's organisation-level DP) could have used.
"""

from __future__ import annotations

import math
from typing import Any

from fedpriv.privacy.ledger import DP_FIELDS, DP_KINDS, FORMAT, KINDS, REFUSAL_FIELDS


def field_problems(entry: dict[str, Any]) -> list[str]:
    """What is missing or wrong in an entry of any kind (empty: well-formed)."""
    kind = entry.get("kind")
    if kind not in KINDS:
        return [f"kind {kind!r} is not one of {', '.join(KINDS)}"]
    problems = [
        f"no {name}" for name in ("format", "org", "seq", "round", "prev_hash", "signature") if name not in entry
    ]
    problems += [f"no {name}" for name in (DP_FIELDS if kind in DP_KINDS else REFUSAL_FIELDS) if name not in entry]
    if problems:
        return problems
    if entry["format"] != FORMAT:
        problems.append(f"format {entry['format']!r}, expected {FORMAT}")
    if not (isinstance(entry["round"], int) and not isinstance(entry["round"], bool)):
        problems.append(f"round {entry['round']!r} is not an integer")
    if kind in DP_KINDS:
        problems += parameter_problems(entry)
    elif not (is_number(entry["delta"]) and 0 < entry["delta"] < 1):
        problems.append(f"delta {entry['delta']!r} is not in (0, 1)")
    if entry["accountant"] not in ("rdp", "prv"):
        problems.append(f"accountant {entry['accountant']!r} is not rdp or prv")
    return problems


def is_number(value: Any) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_count(value: Any) -> bool:
    """An int (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool)


def parameter_problems(entry: dict[str, Any]) -> list[str]:
    """What makes a DP entry's parameters impossible on their own or against each other.

    Opacus's Poisson loader samples with q = 1/k for k batches an epoch (k <= n), and a round takes
    whole epochs (empty batches count), so a node's steps are a multiple of 1/q; delta must stay below
    1/n or the mechanism may publish an example outright. The coordinator's organisation-level DP
    releases one noised average a round: q = 1, one step.
    """
    sigma, q, steps = entry["noise_multiplier"], entry["sample_rate"], entry["local_steps"]
    n, delta, epsilon = entry["num_examples"], entry["delta"], entry["epsilon"]
    problems = []
    if not (is_number(sigma) and sigma > 0):
        problems.append(f"noise_multiplier {sigma!r} is not a number > 0")
    if not (is_number(q) and 0 < q <= 1):
        problems.append(f"sample_rate {q!r} is not in (0, 1]")
    if not (is_count(steps) and steps >= 0):
        problems.append(f"local_steps {steps!r} is not an integer >= 0")
    if not (is_number(epsilon) and epsilon >= 0):
        problems.append(f"epsilon {epsilon!r} is not a finite number >= 0")
    if not (is_count(n) and n >= 1):
        problems.append(f"num_examples {n!r} is not an integer >= 1")
    if not (is_number(delta) and 0 < delta < 1):
        problems.append(f"delta {delta!r} is not in (0, 1)")
    elif is_count(n) and n >= 1 and entry["kind"] == "dp_round" and not delta < 1 / n:
        problems.append(f"delta {delta!r} is not below 1/n = {1 / n:.3g} for its {n} examples")
    if problems:
        return problems
    if entry["kind"] == "client_dp_round":
        if q != 1 or steps != 1:
            problems.append(f"an organisation-level round is one release at q = 1, not q={q!r} x {steps} steps")
        return problems
    per_epoch = round(1 / q)
    if abs(1 / per_epoch - q) > 1e-12 * q:
        problems.append(f"sample_rate {q!r} is not 1/k for a whole number k of batches an epoch")
    elif per_epoch > n:
        problems.append(f"sample_rate {q!r} is below 1/n = 1/{n}: more batches an epoch than examples")
    elif entry.get("stopped") == "diverged":  # stopped on a non-finite loss: the steps it took, at least one
        epochs = entry.get("local_epochs", 1)
        if steps == 0 or (is_count(epochs) and steps > epochs * per_epoch):
            problems.append(f"local_steps {steps} of a round that stopped early is not in 1..{epochs} x {per_epoch}")
    elif steps == 0 or steps % per_epoch:
        problems.append(f"local_steps {steps} is not a whole number of epochs of {per_epoch} steps (q = 1/{per_epoch})")
    elif "local_epochs" in entry:
        epochs = entry["local_epochs"]
        if not (is_count(epochs) and epochs >= 1) or steps != epochs * per_epoch:
            problems.append(f"local_steps {steps} is not local_epochs {epochs!r} x {per_epoch} steps an epoch")
    return problems
