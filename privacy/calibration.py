"""Noise calibration: one organisation's privacy target becomes a fixed plan (sigma, q, steps).

The noise multiplier is calibrated ONCE for the organisation's whole planned
participation (every local step of every round), so that the epsilon spent at
the end of the run is at most the target and within 1% of it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from fedpriv.kernel.errors import PrivacyError
from fedpriv.privacy import rdp_steps

ACCOUNTANTS = ("rdp", "prv")

# get_noise_multiplier stops once target - tolerance <= epsilon <= target; 0.5% keeps us well inside 1%.
RELATIVE_EPSILON_TOLERANCE = 0.005


@dataclass(frozen=True)
class PrivacyPlan:
    target_epsilon: float
    delta: float
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float  # Poisson sampling rate q, exactly what Opacus's accountant records
    steps_per_round: int  # local DP steps one round performs
    planned_rounds: int
    planned_steps: int  # steps_per_round * planned_rounds
    accountant: str  # "rdp" | "prv"
    num_examples: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PrivacyPlan:
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        missing = sorted(set(types) - set(d))
        if missing:
            raise ValueError(f"privacy plan is missing {', '.join(missing)}")
        convert = {"float": float, "int": int, "str": str}
        return cls(**{name: convert[tp](d[name]) for name, tp in types.items()})


def dp_steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Batches per epoch of the DPDataLoader Opacus builds from ``DataLoader(batch_size=batch_size)``.

    Opacus samples with q = 1 / len(loader) = 1 / ceil(n / b), runs ``int(1 / q)`` batches per
    epoch and records q' = 1 / (that count) in the accountant. Because of floating point,
    ``int(1 / (1 / k))`` is ``k - 1`` for some k (93, 99, 105, ...); we mirror that exactly so
    the plan matches what the accountant records (q' >= q, i.e. conservative).
    """
    loader_len = math.ceil(num_examples / batch_size)
    return int(1 / (1 / loader_len))


def compute_epsilon(*, noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str) -> float:
    """Epsilon after ``steps`` steps at (noise_multiplier, sample_rate), from a fresh accountant."""
    from opacus.accountants import create_accountant

    if steps <= 0:
        return 0.0
    if accountant == "rdp":
        return rdp_steps.epsilon([(noise_multiplier, sample_rate, int(steps))], delta)
    acc = create_accountant(mechanism=accountant)
    acc.history = [(noise_multiplier, sample_rate, int(steps))]
    return float(acc.get_epsilon(delta=delta))


def plan_privacy(
    *,
    org: str,
    num_examples: int,
    batch_size: int,
    local_epochs: int,
    rounds: int,
    target_epsilon: float,
    delta: float,
    max_grad_norm: float,
    accountant: str,
    calibrate: bool = True,
) -> PrivacyPlan:
    """Calibrate the noise for one organisation's whole planned participation, or raise PrivacyError.

    ``calibrate=False`` checks the settings and returns the plan with ``noise_multiplier`` NaN: enough to
    compare with a plan the node already stores (whose sigma is fixed for the run), in milliseconds
    instead of the seconds calibration takes.
    """
    from opacus.accountants.utils import get_noise_multiplier

    where = f"for organisation '{org}' ({num_examples} training examples)"
    if num_examples < 1:
        raise PrivacyError(f"organisation '{org}' has no training examples: cannot plan differential privacy")
    for key, value in (
        ("training.batch_size", batch_size),
        ("training.local_epochs", local_epochs),
        ("training.rounds", rounds),
    ):
        if value < 1:
            raise PrivacyError(f"{key}={value} must be >= 1 to plan privacy {where}")
    if accountant not in ACCOUNTANTS:
        raise PrivacyError(f"privacy.accountant={accountant!r} {where}: expected one of {', '.join(ACCOUNTANTS)}")
    if not max_grad_norm > 0:
        raise PrivacyError(f"privacy.max_grad_norm={max_grad_norm} {where}: expected a number > 0")
    if not target_epsilon > 0:
        raise PrivacyError(f"privacy.target_epsilon={target_epsilon} {where}: expected a number > 0")
    if not 0 < delta < 1 / num_examples:
        raise PrivacyError(
            f"privacy.delta={delta} is not below 1/n = {1 / num_examples:.2g} {where}: choose 0 < delta < 1/n"
        )

    steps_per_epoch = dp_steps_per_epoch(num_examples, batch_size)
    sample_rate = 1 / steps_per_epoch
    steps_per_round = steps_per_epoch * local_epochs
    planned_steps = steps_per_round * rounds
    plan = PrivacyPlan(
        target_epsilon=float(target_epsilon),
        delta=float(delta),
        noise_multiplier=math.nan,
        max_grad_norm=float(max_grad_norm),
        sample_rate=sample_rate,
        steps_per_round=steps_per_round,
        planned_rounds=rounds,
        planned_steps=planned_steps,
        accountant=accountant,
        num_examples=num_examples,
    )
    if not calibrate:
        return plan
    try:
        if accountant == "rdp":  # Opacus's search, a fifth of the cost; checked with Opacus's full orders
            sigma = rdp_steps.noise_multiplier_for(
                target_epsilon=target_epsilon,
                delta=delta,
                sample_rate=sample_rate,
                steps=planned_steps,
                tolerance=RELATIVE_EPSILON_TOLERANCE * target_epsilon,
            )
            spent = rdp_steps.epsilon([(sigma, sample_rate, planned_steps)], delta)
            if not spent <= target_epsilon:
                raise RuntimeError(f"calibrated noise {sigma} spends {spent} > {target_epsilon} (a bug: report it)")
        else:
            sigma = get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=planned_steps,
                accountant=accountant,
                epsilon_tolerance=RELATIVE_EPSILON_TOLERANCE * target_epsilon,
            )
    except (ValueError, RuntimeError) as exc:
        reason = " ".join(str(exc).split())
        raise PrivacyError(
            f"privacy.target_epsilon={target_epsilon} (delta={delta}) cannot be reached {where}"
            f" with {planned_steps} steps at sampling rate {sample_rate:.3g}"
            f" ({rounds} rounds x {local_epochs} local epochs, batch {batch_size}): {reason}"
            " Raise privacy.target_epsilon or train fewer steps."
        ) from None
    return dataclasses.replace(plan, noise_multiplier=float(sigma))
