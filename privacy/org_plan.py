"""An organisation's privacy plan: its (epsilon, delta) target and the noise calibrated to reach it.

The target is the organisation's own (its node.yaml, which its node reports) in deployment, and the run config's
in a simulation (its ``privacy.orgs`` entry, else ``privacy``). :func:`org_target` is the one place that says so,
for the simulated node, the pre-flight check, the server's progress plot and the canary audit; and
:func:`org_privacy_plan` calibrates for the target it is handed, never one it looks up itself, so the node (its
own target) and the pre-flight check (the run config's) cannot plan for different ones by accident.
"""

from __future__ import annotations

from collections.abc import Mapping

from fedpriv.kernel.config import FedPrivConfig
from fedpriv.privacy.calibration import PrivacyPlan, plan_privacy


def org_target(cfg: FedPrivConfig, org: str, reported: Mapping | None = None) -> tuple[float, float]:
    """``org``'s (target_epsilon, delta): what its node reported (``target_epsilon``, ``delta`` of its privacy
    report: a deployment node's own node.yaml), else the run config's for it (per-organisation overrides applied)."""
    epsilon, delta = cfg.privacy.target_for(org)
    if reported:
        epsilon = reported.get("target_epsilon") or epsilon
        delta = reported.get("delta") or delta
    return epsilon, delta


def org_privacy_plan(
    cfg: FedPrivConfig, org: str, num_train: int, target: tuple[float, float], *, calibrate: bool = True
) -> PrivacyPlan:
    """One organisation's DP plan for ``target`` (epsilon, delta): the same call on the node and in the pre-flight
    check. ``calibrate=False`` checks the settings only (see :func:`plan_privacy`)."""
    target_epsilon, delta = target
    return plan_privacy(
        org=org,
        num_examples=num_train,
        batch_size=cfg.training.batch_size,
        local_epochs=cfg.training.local_epochs,
        rounds=cfg.training.rounds,
        target_epsilon=target_epsilon,
        delta=delta,
        max_grad_norm=cfg.privacy.max_grad_norm,
        accountant=cfg.privacy.accountant,
        calibrate=calibrate,
    )
