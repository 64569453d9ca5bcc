"""``fedpriv audit``: check privacy ledgers without trusting whoever ran the federation.

For each organisation's ledger: the key it is checked with (the organisation's
own when the auditor brought it, else trust on first use), every signature,
the sequence numbers and the hash chain (edited, deleted, reordered, truncated
or foreign entries, each with its position), every entry's parameters (valid
on their own and consistent with each other), then the epsilon recomputed from
the recorded parameters alone by a second implementation (``dp-accounting``,
RDP for every entry, PLD where RDP does not settle a claim and for each
ledger's total) against what each entry claims and against the budget. Then
the run as a whole (privacy/audit_crosscheck.py): every organisation named
anywhere has a ledger, and ``summary.json`` says what the ledgers say. The
verdict is a plain data structure (privacy/audit_result.py); ``privacy/audit_report.py``
turns it into audit.json / audit.md / audit.html.

This module composes the checks: the inputs are read in privacy/audit_input.py, an
entry's well-formedness is privacy/audit_entries.py, the key, signatures, chain and
length privacy/audit_chain.py, the accounting privacy/audit_epsilon.py.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from fedpriv.privacy import independent
from fedpriv.privacy.audit_chain import check_chain, check_completeness, check_key, check_signatures
from fedpriv.privacy.audit_crosscheck import cross_check
from fedpriv.privacy.audit_epsilon import check_budget, check_epsilon
from fedpriv.privacy.audit_input import (  # noqa: F401  (re-exported: the audit's input API)
    COORDINATOR,
    EMPIRICAL_FILE,
    HEADS_FILE,
    AuditInputError,
    KeyCandidate,
    LedgerSet,
    load_ledger_set,
    read_entries,
)
from fedpriv.privacy.audit_redaction import redaction_summary
from fedpriv.privacy.audit_result import (  # noqa: F401  (re-exported: what an audit returns)
    AUDIT_FORMAT,
    RDP_TOLERANCE,
    RELATIVE_TOLERANCE,
    TRUST_NONE,
    TRUST_ORGS,
    TRUST_TOFU,
    AuditResult,
    Finding,
    OrgAudit,
    RoundCheck,
)
from fedpriv.privacy.ledger import DP_KINDS, key_fingerprint, load_public_key


def _check_org(org: str, path: Path, entries: list[dict[str, Any]], ledger_set: LedgerSet, pld: bool) -> OrgAudit:
    """One organisation's ledger: is it its own, whole and consistent; then do its claims and its budget hold."""
    result = OrgAudit(org=org, ledger=str(path), key_source="none found", key_fingerprint=None, entries=len(entries))
    chain, position_of = _authentic_chain(result, entries, ledger_set)
    dp = [e for e in chain if e["kind"] in DP_KINDS]
    events = _record_contents(result, chain, dp)
    _check_stated_settings(result, chain)
    if not chain:
        return result
    result.claimed_epsilon = float(dp[-1]["epsilon"]) if dp else 0.0
    if dp:
        last = dp[-1]
        names = ("noise_multiplier", "sample_rate", "delta", "accountant", "max_epsilon", "target_epsilon")
        result.parameters = {name: last[name] for name in names}
        check_epsilon(result, dp, events, position_of, pld)
    else:
        result.recomputed_epsilon = {"rdp": 0.0, "prv": None, "pld": 0.0}
    check_budget(result, events)
    return result


def _authentic_chain(
    result: OrgAudit, entries: list[dict[str, Any]], ledger_set: LedgerSet
) -> tuple[list[dict[str, Any]], dict[int, int]]:
    """The entries that are the organisation's own, in seq order, and each seq's line in the file.

    Key, signatures, hash chain and length (privacy/audit_chain.py): nothing that fails them is accounted for,
    so an operator cannot edit, splice in, reorder or cut entries to lower what the ledger claims.
    """
    key = check_key(result, ledger_set)
    trusted, intact = check_signatures(result, entries, key, ledger_set)
    by_seq, position_of = check_chain(result, trusted, intact)
    check_completeness(result, entries, by_seq, key, ledger_set)
    return [by_seq[s] for s in sorted(by_seq)], position_of


def _record_contents(
    result: OrgAudit, chain: list[dict[str, Any]], dp: list[dict[str, Any]]
) -> list[independent.Event]:
    """What the authentic entries hold (rounds, refusals, steps, redaction); returns each DP entry's mechanism.

    ``(noise_multiplier, sample_rate, steps)``: all the recomputation reads, never an entry's own epsilon.
    """
    result.dp_rounds = len(dp)
    result.refusals = sum(e["kind"] == "refusal" for e in chain)
    events = [(float(e["noise_multiplier"]), float(e["sample_rate"]), int(e["local_steps"])) for e in dp]
    result.steps = sum(steps for _, _, steps in events)
    result.redaction = redaction_summary([e for e in dp if e["kind"] == "dp_round"])
    return events


def _check_stated_settings(result: OrgAudit, chain: list[dict[str, Any]]) -> None:
    """One accountant, one delta and one budget throughout the ledger; the strictest budget stated is held to.

    Protects against a ledger that changes them partway: epsilons by different accountants or at different
    deltas do not add up to one claim, and a budget raised midway would let a node spend past what it stated.
    """
    accountants = {e["accountant"] for e in chain}
    deltas = {float(e["delta"]) for e in chain}
    budgets = {float(e["max_epsilon"]) for e in chain}
    if len(accountants) > 1 or len(deltas) > 1:
        result.flag(
            "fields", "inconsistent", None, None, f"accountant/delta change within the ledger: {accountants} {deltas}"
        )
    if len(budgets) > 1:
        result.flag("budget", "changed", None, None, f"max_epsilon changes within the ledger: {sorted(budgets)}")
    if chain:
        result.accountant = sorted(accountants)[0]
        result.delta = max(deltas)
        result.max_epsilon = min(budgets)  # the strictest budget the organisation stated


# --------------------------------------------------------------------------- the whole audit


PARALLEL_FROM_ENTRIES = 20_000  # below this a process pool costs more than it saves


def _estimated_entries(path: Path) -> int:
    return path.stat().st_size // 500  # a dp_round line is about 600 bytes


def _check_org_in_worker(task: tuple) -> OrgAudit:
    """One organisation in a worker process (keys travel as PEM: key objects do not pickle)."""
    org, path, entries, keys_pem, heads, copies, pld = task
    entries = read_entries(path) if entries is None else entries
    keys = {
        name: [KeyCandidate(load_public_key(pem.encode()), source, from_org) for pem, source, from_org in candidates]
        for name, candidates in keys_pem.items()
    }
    ledger_set = LedgerSet({org: (path, entries)}, keys, heads, {org: copies}, "", [])
    return _check_org(org, path, entries, ledger_set, pld)


def audit(
    ledger_set: LedgerSet, pld: bool = True, workers: int | None = None, strict: bool = False, prv: bool | None = None
) -> AuditResult:
    """Check every organisation's ledger (in parallel processes for big inputs: one per CPU by default), then the run.

    ``pld=False`` computes PLD only where RDP leaves a claim open (not each ledger's total). ``prv`` is the
    fedpriv-audit/1 name of ``pld``.
    """
    import os

    if prv is not None:
        pld = prv
    started = time.perf_counter()
    items = sorted(ledger_set.ledgers.items())
    total = sum(len(entries) if entries is not None else _estimated_entries(path) for _, (path, entries) in items)
    workers = workers if workers is not None else (os.cpu_count() or 1)
    if workers > 1 and len(items) > 1 and total >= PARALLEL_FROM_ENTRIES:
        from concurrent.futures import ProcessPoolExecutor

        from fedpriv.privacy.ledger import public_key_text

        keys_pem = {
            name: [(public_key_text(c.key), c.source, c.from_org) for c in candidates]
            for name, candidates in ledger_set.keys.items()
        }
        tasks = [
            (org, path, entries, keys_pem, ledger_set.heads, ledger_set.copies.get(org, []), pld)
            for org, (path, entries) in items
        ]
        with ProcessPoolExecutor(max_workers=min(workers, len(items))) as pool:
            orgs = list(pool.map(_check_org_in_worker, tasks, chunksize=max(1, len(tasks) // (4 * workers))))
    else:
        orgs = [
            _check_org(org, path, read_entries(path) if entries is None else entries, ledger_set, pld)
            for org, (path, entries) in items
        ]
    orgs += cross_check(ledger_set, orgs)
    _check_empirical(ledger_set.empirical, orgs)
    return AuditResult(
        ledger_set.source, orgs, list(ledger_set.notes), time.perf_counter() - started, ledger_set.empirical, strict
    )


def _check_empirical(empirical: dict[str, Any] | None, orgs: list[OrgAudit]) -> None:
    """A canary audit's lower bound above the epsilon the ledger accounts for refutes the claim."""
    if empirical is None:
        return
    bound, org_name = float(empirical.get("epsilon_lower_bound", 0.0)), str(empirical.get("org"))
    audited = next((o for o in orgs if o.org == org_name), None)
    if audited is None:
        return
    claimed = audited.recomputed_epsilon.get("pld" if audited.accountant == "prv" else "rdp")
    if claimed is not None and bound > claimed * (1 + RELATIVE_TOLERANCE):
        audited.flag(
            "empirical", "contradicted", None, None,
            f"the canary audit shows epsilon >= {bound:.4g} ({empirical.get('confidence')} confidence),"
            f" above the {claimed:.4g} the ledger accounts for: the DP guarantee does not hold",
        )  # fmt: skip


__all__ = [
    "AUDIT_FORMAT",
    "AuditInputError",
    "AuditResult",
    "Finding",
    "LedgerSet",
    "OrgAudit",
    "RoundCheck",
    "audit",
    "key_fingerprint",
    "load_ledger_set",
    "redaction_summary",
]
