"""Differential privacy for one organisation: noise calibration and a persistent accountant."""

from fedpriv.privacy.accountant_state import NodePrivacy
from fedpriv.privacy.calibration import PrivacyPlan, compute_epsilon, dp_steps_per_epoch, plan_privacy

__all__ = ["NodePrivacy", "PrivacyPlan", "compute_epsilon", "dp_steps_per_epoch", "plan_privacy"]
