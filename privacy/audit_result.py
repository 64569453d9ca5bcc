"""What an audit finds: per organisation, per round, and for the run (audit.json's contract).

Plain data: privacy/audit.py fills it, privacy/audit_report.py writes it out. Field names are the
fedpriv-audit/2 format, read by whoever checks a run's audit files: they change only with the format.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from fedpriv.privacy import independent

AUDIT_FORMAT = "fedpriv-audit/2"
# a claim may sit below dp-accounting's PLD (an upper bound on the true epsilon) by float noise only
RELATIVE_TOLERANCE = 1e-6
# Opacus sums the fractional-order RDP series exactly, dp-accounting bounds it term by term: for epsilon up to 20
# its RDP is up to 0.4% higher (BENCHMARKS.md). A claim further below is settled by PLD, never waved through.
RDP_TOLERANCE = 0.01
TRUST_ORGS, TRUST_TOFU, TRUST_NONE = "the organisation's own key", "trust on first use", "no key"


@dataclass
class Finding:
    org: str
    check: str  # key | signature | sequence | chain | truncation | fields | parameters | epsilon | budget | roster | summary
    problem: str  # edited | foreign | deleted | reordered | duplicated | truncated | malformed | under_reported | ...
    position: int | None  # 1-based line in the ledger file (None: the ledger as a whole)
    seq: int | None
    message: str


@dataclass
class RoundCheck:
    position: int
    seq: int
    round: int
    local_steps: int
    claimed_epsilon: float
    rdp_epsilon: float  # dp-accounting's RDP accountant
    prv_epsilon: float | None  # fedpriv-audit/1 (Opacus's PRV); no longer computed: always None
    accountant: str
    pld_epsilon: float | None = None  # dp-accounting's PLD accountant, where it was computed


@dataclass
class OrgAudit:
    org: str
    ledger: str
    key_source: str
    key_fingerprint: str | None
    key_trust: str = TRUST_NONE
    entries: int = 0
    dp_rounds: int = 0
    refusals: int = 0
    accountant: str | None = None
    delta: float | None = None
    max_epsilon: float | None = None
    claimed_epsilon: float | None = None
    recomputed_epsilon: dict[str, float | None] = field(default_factory=dict)  # rdp, pld (dp-accounting); prv: None
    recomputed_with: str = independent.LIBRARY
    within_budget: bool | None = None
    prv_prefixes_computed: int = 0  # fedpriv-audit/1; always 0
    pld_prefixes_computed: int = 0  # PLD is costly: computed for the total and where RDP leaves a claim open
    steps: int = 0  # DP steps the ledger records
    parameters: dict[str, Any] = field(default_factory=dict)  # the last DP entry's mechanism and budget
    rounds: list[RoundCheck] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    # what the signed dp_round entries say about redaction of the data the steps used (see redaction_summary)
    redaction: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return not self.findings

    def flag(self, check: str, problem: str, position: int | None, seq: int | None, message: str) -> None:
        self.findings.append(Finding(self.org, check, problem, position, seq, message))


@dataclass
class AuditResult:
    source: str
    orgs: list[OrgAudit]
    notes: list[str]
    seconds: float = 0.0
    empirical: dict[str, Any] | None = None
    strict: bool = False  # trust on first use fails the audit

    @property
    def tofu(self) -> list[str]:
        """Organisations whose ledger was checked only against a key from the audited folder."""
        return [org.org for org in self.orgs if org.key_trust == TRUST_TOFU]

    @property
    def checks_hold(self) -> bool:
        return all(org.ok for org in self.orgs) and bool(self.orgs)

    @property
    def ok(self) -> bool:
        return self.checks_hold and not (self.strict and self.tofu)

    def verdict(self) -> str:
        """One line: the outcome, and on what the keys rest."""
        outcome = "every check holds" if self.checks_hold else "CHECKS FAILED"
        if self.tofu:
            who = ", ".join(self.tofu[:5]) + (f" and {len(self.tofu) - 5} more" if len(self.tofu) > 5 else "")
            strict = "; --strict: FAILED" if self.strict else ""
            return (
                f"{outcome}, on TRUST ON FIRST USE: the keys of {who} came from the audited folder itself, so an"
                f" operator who re-signed their ledgers would pass (give the organisations' own keys{strict})"
            )
        return f"{outcome}; every ledger was checked against its organisation's own key"

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": AUDIT_FORMAT,
            "source": self.source,
            "ok": self.ok,
            "verdict": self.verdict(),
            "strict": self.strict,
            "trust_on_first_use": self.tofu,
            "seconds": round(self.seconds, 3),
            "notes": list(self.notes),
            "tolerances": {"rdp_relative": RDP_TOLERANCE, "pld_relative": RELATIVE_TOLERANCE},
            "organisations": {
                org.org: {**{k: v for k, v in asdict(org).items() if k not in ("org",)}, "ok": org.ok}
                for org in self.orgs
            },
            "findings": [asdict(f) for org in self.orgs for f in org.findings],
            "empirical_audit": self.empirical,
        }
