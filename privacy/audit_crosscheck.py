"""The run as a whole against its ledgers: nobody left out, and the summary says what the ledgers say.

An operator who deletes an organisation's ledger, its key and its head
together leaves a self-consistent folder; what gives them away is every other
place that organisation is named: ``summary.json`` (its privacy figures, its
rounds, its redaction), the provisioning roster and the keys the auditor
brought. And ``summary.json`` is what most people read: each privacy figure in
it must be the one the signed ledger holds.
"""

from __future__ import annotations

import math
from typing import Any

from fedpriv.privacy.audit_input import COORDINATOR, LedgerSet
from fedpriv.privacy.audit_result import OrgAudit

# summary.json's privacy.<org> fields and what the ledger's DP entries hold for each
_SAME_AS_LAST_ENTRY = {
    "noise_multiplier": "noise_multiplier",
    "sample_rate": "sample_rate",
    "delta": "delta",
    "accountant": "accountant",
    "max_epsilon": "max_epsilon",
    "target_epsilon": "target_epsilon",
}


def _named_in_summary(summary: dict[str, Any]) -> dict[str, str]:
    """Every organisation the summary names, with where (the first place found)."""
    named: dict[str, str] = {}

    def add(orgs: Any, where: str) -> None:
        for org in orgs if isinstance(orgs, (dict, list)) else []:
            if isinstance(org, str):
                named.setdefault(org, where)

    add(summary.get("privacy"), "summary.json privacy")
    add(summary.get("redaction"), "summary.json redaction")
    budget = summary.get("budget") if isinstance(summary.get("budget"), dict) else {}
    add(budget.get("ledgers"), "summary.json budget.ledgers")
    for record in summary.get("rounds") or []:
        if isinstance(record, dict):
            where = f"summary.json rounds (round {record.get('round')})"
            add(record.get("epsilon"), where)
            add(record.get("trained_orgs"), where)
    final = summary.get("final") if isinstance(summary.get("final"), dict) else {}
    add(final.get("epsilon"), "summary.json final.epsilon")
    add(final.get("trained_orgs"), "summary.json final.trained_orgs")
    return named


def _differs(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return not math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return a != b


def _missing(org: str, where: str) -> OrgAudit:
    missing = OrgAudit(org=org, ledger="(missing)", key_source="", key_fingerprint=None)
    missing.flag("roster", "missing", None, None, f"{where} names '{org}', but no ledger of it was given")
    return missing


def cross_check(ledger_set: LedgerSet, orgs: list[OrgAudit]) -> list[OrgAudit]:
    """Findings on the audited organisations (in place); returns an entry for each named one with no ledger."""
    audited = {org.org: org for org in orgs}
    named: dict[str, str] = {}
    for org in ledger_set.heads:
        named.setdefault(org, "the coordinator's heads.json")
    for org in ledger_set.roster:
        named.setdefault(org, "the provisioning roster")
    for org in ledger_set.keys_given:
        named.setdefault(org, "--keys")
    summary = ledger_set.summary
    if summary is not None:
        for org, where in _named_in_summary(summary).items():
            named.setdefault(org, where)
        if isinstance(summary.get("client_dp"), dict):
            named.setdefault(COORDINATOR, "summary.json client_dp")
    extra = [_missing(org, where) for org, where in sorted(named.items()) if org not in audited]
    if summary is not None:
        _check_summary(summary, audited)
    return extra


def _ledger_rounds(org: OrgAudit) -> dict[int, float]:
    return {check.round: check.claimed_epsilon for check in org.rounds}


def _check_summary(summary: dict[str, Any], audited: dict[str, OrgAudit]) -> None:
    """summary.json's privacy figures, per organisation and per round, against the signed ledgers."""
    privacy = summary.get("privacy") if isinstance(summary.get("privacy"), dict) else {}
    for name, figures in privacy.items():
        org = audited.get(name)
        if org is None or not isinstance(figures, dict):
            continue
        if figures.get("dp_enabled") is False:
            org.flag("summary", "mismatch", None, None, "summary.json says this organisation trained without DP")
            continue
        said = {
            "epsilon": org.claimed_epsilon,
            "steps": org.steps,
            **{field: org.parameters.get(entry_field) for field, entry_field in _SAME_AS_LAST_ENTRY.items()},
        }
        for field, ledger_value in said.items():
            if field in figures and ledger_value is not None and _differs(figures[field], ledger_value):
                org.flag(
                    "summary", "mismatch", None, None,
                    f"summary.json privacy.{name}.{field} is {figures[field]!r}; the signed ledger says {ledger_value!r}",
                )  # fmt: skip
    for record in summary.get("rounds") or []:
        if not isinstance(record, dict) or not isinstance(record.get("round"), int):
            continue
        epsilons = record.get("epsilon") if isinstance(record.get("epsilon"), dict) else {}
        trained = record.get("trained_orgs") if isinstance(record.get("trained_orgs"), list) else []
        for name in sorted(set(epsilons) | {t for t in trained if isinstance(t, str)}):
            org = audited.get(name)
            if org is None or not org.rounds:
                continue
            ledger = _ledger_rounds(org)
            said = epsilons.get(name)
            if name in trained and record["round"] not in ledger:
                org.flag(
                    "summary", "mismatch", None, None,
                    f"summary.json says '{name}' trained in round {record['round']}; its ledger has no DP entry for it",
                )  # fmt: skip
            elif (
                name in trained  # an organisation that did not answer keeps its last figure in the round's record
                and isinstance(said, (int, float))
                and record["round"] in ledger
                and _differs(said, ledger[record["round"]])
            ):
                org.flag(
                    "summary", "mismatch", None, None,
                    f"summary.json round {record['round']} gives '{name}' epsilon {said!r}; the ledger says"
                    f" {ledger[record['round']]!r}",
                )  # fmt: skip
    final = summary.get("final") if isinstance(summary.get("final"), dict) else {}
    for name, said in (final.get("epsilon") or {}).items() if isinstance(final.get("epsilon"), dict) else []:
        org = audited.get(name)
        if org is not None and org.claimed_epsilon is not None and isinstance(said, (int, float)):
            if _differs(said, org.claimed_epsilon):
                org.flag(
                    "summary", "mismatch", None, None,
                    f"summary.json final.epsilon.{name} is {said!r}; the signed ledger says {org.claimed_epsilon!r}",
                )  # fmt: skip
    client_dp = summary.get("client_dp")
    coordinator = audited.get(COORDINATOR)
    if isinstance(client_dp, dict) and coordinator is not None:
        for field, ledger_value in (("epsilon", coordinator.claimed_epsilon), ("rounds", coordinator.dp_rounds)):
            if field in client_dp and ledger_value is not None and _differs(client_dp[field], ledger_value):
                coordinator.flag(
                    "summary", "mismatch", None, None,
                    f"summary.json client_dp.{field} is {client_dp[field]!r}; the coordinator's ledger says {ledger_value!r}",
                )  # fmt: skip
