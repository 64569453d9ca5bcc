"""Whether each claimed epsilon and the budget hold, recomputed from the recorded mechanisms alone.

The second implementation is dp-accounting (privacy/independent.py); Opacus's RDP (privacy/recompute.py)
only settles an RDP claim that dp-accounting's looser RDP leaves open.
"""

from __future__ import annotations

import math
from typing import Any

from fedpriv.privacy import independent
from fedpriv.privacy.audit_result import RDP_TOLERANCE, RELATIVE_TOLERANCE, OrgAudit, RoundCheck


def check_epsilon(
    result: OrgAudit, dp: list[dict[str, Any]], events: list[independent.Event], position_of: dict[int, int], pld: bool
) -> None:
    """Every claim against dp-accounting: RDP for each entry; PLD and the stated accountant settle what RDP leaves open.

    A claim at or above dp-accounting's RDP (less RDP_TOLERANCE) holds. Below it, a claim under dp-accounting's
    PLD (an upper bound on the true epsilon) is under-reported. Between the two, an RDP claim must still be what
    its stated accountant gives (Opacus's RDP, reproduced): only the two RDP implementations' difference may put
    an honest claim there. A PRV claim there holds (PRV is tighter than RDP; PLD confirms it).

    Protects against a node (or an operator) that records a smaller epsilon than its recorded noise, sampling
    rate and steps give: the claim is never taken on trust, only the mechanism is.
    """
    claims = [float(e["epsilon"]) for e in dp]
    delta = result.delta
    try:
        rdp = independent.rdp_epsilons(events, delta)
    except independent.RecomputationError as exc:
        result.flag("epsilon", "not_recomputable", None, None, f"epsilon cannot be recomputed: {exc}")
        return
    pld_values: dict[int, float] = {}
    failed: list[str] = []

    def pld_at(index: int) -> float:
        try:
            return independent.pld_epsilon(events[: index + 1], delta)
        except independent.RecomputationError as exc:
            failed.append(str(exc))
            return math.inf  # every claim then stays under-reported: a recomputation that fails fails the check

    open_claims = [i for i, (c, value) in enumerate(zip(claims, rdp, strict=True)) if c < value * (1 - RDP_TOLERANCE)]
    below_pld = [False] * len(dp)
    if open_claims:
        known, low = independent.bracket_claims(
            len(open_claims), [claims[i] for i in open_claims], lambda j: pld_at(open_claims[j]), RELATIVE_TOLERANCE
        )
        pld_values.update({open_claims[j]: value for j, value in known.items()})
        for j, flagged in enumerate(low):
            below_pld[open_claims[j]] = flagged
    stated: list[float] | None = None
    if any(dp[i]["accountant"] == "rdp" and not below_pld[i] for i in open_claims):
        from fedpriv.privacy import recompute  # Opacus's RDP analysis: what the claim says it is, not a second opinion

        stated = recompute.rdp_epsilons(events, delta)
    if pld and dp and len(dp) - 1 not in pld_values:
        pld_values[len(dp) - 1] = pld_at(len(dp) - 1)
    if failed:
        result.flag("epsilon", "not_recomputable", None, None, f"epsilon cannot be recomputed: {failed[0]}")
    result.pld_prefixes_computed = len(pld_values)
    for index, (entry, claim, value) in enumerate(zip(dp, claims, rdp, strict=True)):
        check = RoundCheck(
            position=position_of[entry["seq"]],
            seq=entry["seq"],
            round=int(entry["round"]),
            local_steps=int(entry["local_steps"]),
            claimed_epsilon=claim,
            rdp_epsilon=value,
            prv_epsilon=None,
            accountant=entry["accountant"],
            pld_epsilon=pld_values.get(index),
        )
        result.rounds.append(check)
        reference = pld_values.get(index)
        if below_pld[index]:
            result.flag(
                "epsilon", "under_reported", check.position, check.seq,
                f"round {check.round} claims epsilon {claim:.6g}; its recorded parameters give"
                + (f" {reference:.6g} (PLD)" if reference is not None and math.isfinite(reference) else " more (PLD)")
                + f" and {value:.6g} (RDP), by {independent.LIBRARY}",
            )  # fmt: skip
        elif (
            stated is not None
            and entry["accountant"] == "rdp"
            and claim < stated[index] * (1 - RELATIVE_TOLERANCE) - 1e-12
        ):
            result.flag(
                "epsilon", "under_reported", check.position, check.seq,
                f"round {check.round} claims RDP epsilon {claim:.6g}; its recorded parameters give {value:.6g}"
                f" ({independent.LIBRARY}) and {stated[index]:.6g} (its stated accountant, Opacus's RDP)",
            )  # fmt: skip
    total_pld = pld_values.get(len(dp) - 1) if dp else 0.0
    result.recomputed_epsilon = {
        "rdp": rdp[-1] if rdp else 0.0,
        "prv": None,
        "pld": total_pld if total_pld is None or math.isfinite(total_pld) else None,
    }
    if any(not math.isfinite(v) for v in rdp):
        result.flag("epsilon", "unbounded", None, None, "a recorded event has no finite epsilon")


def check_budget(result: OrgAudit, events: list[independent.Event]) -> None:
    """The organisation's epsilon within its budget, by the tightest independent upper bound on it.

    RDP first (computed for every entry anyway); where it passes the budget, PLD decides: dp-accounting's RDP
    bounds fractional orders more loosely than Opacus, whose RDP the node enforces its budget with, and PLD is
    an upper bound on the true epsilon either way. A PRV ledger is held to PLD.

    Protects against spending past the organisation's max_epsilon, whatever each entry claims.
    """
    rdp, pld = result.recomputed_epsilon.get("rdp"), result.recomputed_epsilon.get("pld")
    if rdp is None:
        return
    limit = result.max_epsilon * (1 + RELATIVE_TOLERANCE)
    if pld is None and (result.accountant == "prv" or rdp > limit):
        try:
            pld = independent.pld_epsilon(events, result.delta)
        except independent.RecomputationError as exc:
            result.flag("epsilon", "not_recomputable", None, None, f"epsilon cannot be recomputed: {exc}")
            pld = math.inf
        if math.isfinite(pld):
            result.recomputed_epsilon["pld"] = pld
            result.pld_prefixes_computed += 1
    spent = min(rdp, pld) if pld is not None else rdp
    result.within_budget = spent <= limit
    if not result.within_budget:
        result.flag(
            "budget", "exceeded", None, None,
            f"spent epsilon {spent:.6g} (the lower of {independent.LIBRARY}'s RDP {rdp:.6g} and PLD"
            f" {pld if pld is not None else float('nan'):.6g}) exceeds max_epsilon {result.max_epsilon:g}",
        )  # fmt: skip
