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
verdict is a plain data structure; ``privacy/audit_report.py`` turns it into
audit.json / audit.md / audit.html.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedpriv.privacy import independent
from fedpriv.privacy.audit_input import (  # noqa: F401  (re-exported: the audit's input API)
    COORDINATOR,
    EMPIRICAL_FILE,
    HEADS_FILE,
    AuditInputError,
    KeyCandidate,
    LedgerSet,
    _read,
    load_ledger_set,
)
from fedpriv.privacy.ledger import (
    DP_FIELDS,
    DP_KINDS,
    FORMAT,
    KINDS,
    REFUSAL_FIELDS,
    entry_hash,
    genesis_hash,
    key_fingerprint,
    load_public_key,
    signature_valid,
)

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


# --------------------------------------------------------------------------- signatures and the chain


def _intact_and_signed(org: str, entries: list[dict[str, Any]], key: Any) -> bool:
    """Whether the whole ledger is authenticated by its last entry's signature alone.

    Each entry's ``prev_hash`` is the SHA-256 of the whole previous entry, so a chain that runs from the
    organisation's genesis hash through every line, in order, ending in an entry the organisation signed,
    authenticates every line: one signature to verify instead of one per entry. Anything else is checked
    entry by entry, which is what places each finding.
    """
    if key is None or not entries:
        return False
    previous = genesis_hash(org)
    for seq, entry in enumerate(entries, start=1):
        if "__malformed__" in entry or entry.get("seq") != seq or entry.get("prev_hash") != previous:
            return False
        previous = entry_hash(entry)
    return signature_valid(entries[-1], key)


def _authenticated(org: str, entries: list[dict[str, Any]], key: Any) -> tuple[list[bool], bool]:
    """Which entries carry the organisation's signature, and whether the whole chain was verified on the way."""
    if _intact_and_signed(org, entries, key):
        return [True] * len(entries), True
    return [key is not None and "__malformed__" not in e and signature_valid(e, key) for e in entries], False


def _field_problems(entry: dict[str, Any]) -> list[str]:
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
        problems += _parameter_problems(entry)
    elif not (_number(entry["delta"]) and 0 < entry["delta"] < 1):
        problems.append(f"delta {entry['delta']!r} is not in (0, 1)")
    if entry["accountant"] not in ("rdp", "prv"):
        problems.append(f"accountant {entry['accountant']!r} is not rdp or prv")
    return problems


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parameter_problems(entry: dict[str, Any]) -> list[str]:
    """What makes a DP entry's parameters impossible on their own or against each other.

    Opacus's Poisson loader samples with q = 1/k for k batches an epoch (k <= n), and a round takes
    whole epochs (empty batches count), so a node's steps are a multiple of 1/q; delta must stay below
    1/n or the mechanism may publish an example outright. The coordinator's organisation-level DP
    releases one noised average a round: q = 1, one step.
    """
    sigma, q, steps = entry["noise_multiplier"], entry["sample_rate"], entry["local_steps"]
    n, delta, epsilon = entry["num_examples"], entry["delta"], entry["epsilon"]
    problems = []
    if not (_number(sigma) and sigma > 0):
        problems.append(f"noise_multiplier {sigma!r} is not a number > 0")
    if not (_number(q) and 0 < q <= 1):
        problems.append(f"sample_rate {q!r} is not in (0, 1]")
    if not (_count(steps) and steps >= 0):
        problems.append(f"local_steps {steps!r} is not an integer >= 0")
    if not (_number(epsilon) and epsilon >= 0):
        problems.append(f"epsilon {epsilon!r} is not a finite number >= 0")
    if not (_count(n) and n >= 1):
        problems.append(f"num_examples {n!r} is not an integer >= 1")
    if not (_number(delta) and 0 < delta < 1):
        problems.append(f"delta {delta!r} is not in (0, 1)")
    elif _count(n) and n >= 1 and entry["kind"] == "dp_round" and not delta < 1 / n:
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
        if steps == 0 or (_count(epochs) and steps > epochs * per_epoch):
            problems.append(f"local_steps {steps} of a round that stopped early is not in 1..{epochs} x {per_epoch}")
    elif steps == 0 or steps % per_epoch:
        problems.append(f"local_steps {steps} is not a whole number of epochs of {per_epoch} steps (q = 1/{per_epoch})")
    elif "local_epochs" in entry:
        epochs = entry["local_epochs"]
        if not (_count(epochs) and epochs >= 1) or steps != epochs * per_epoch:
            problems.append(f"local_steps {steps} is not local_epochs {epochs!r} x {per_epoch} steps an epoch")
    return problems


def _check_signatures(result: OrgAudit, entries: list[dict[str, Any]], key: Any, ledger_set: LedgerSet):
    """Each entry on its own: readable, well-formed, signed by this organisation.

    Returns the (position, entry) pairs that are, and whether the hash chain was verified whole on the way.
    """
    org = result.org
    trusted: list[tuple[int, dict[str, Any]]] = []
    authentic, intact = _authenticated(org, entries, key)
    for position, (entry, genuine) in enumerate(zip(entries, authentic, strict=True), start=1):
        if "__malformed__" in entry:
            result.flag("fields", "malformed", position, None, f"line {position} is not a JSON ledger entry")
            continue
        seq = entry.get("seq") if _count(entry.get("seq")) else None
        if key is not None and not genuine:
            signer = next(
                (
                    other
                    for other, candidates in ledger_set.keys.items()
                    if other != org and any(signature_valid(entry, c.key) for c in candidates)
                ),
                None,
            )
            if signer is not None:
                result.flag(
                    "signature",
                    "foreign",
                    position,
                    seq,
                    f"entry at line {position} was signed by '{signer}', not '{org}' (spliced in)",
                )
            else:
                result.flag(
                    "signature",
                    "edited",
                    position,
                    seq,
                    f"entry at line {position} (seq {seq}) was altered: its signature does not verify",
                )
            continue
        problems = _field_problems(entry)
        if problems:
            result.flag("fields", "malformed", position, seq, f"entry at line {position}: " + "; ".join(problems))
            continue
        trusted.append((position, entry))
    return trusted, intact


def _check_chain(result: OrgAudit, trusted: list[tuple[int, dict[str, Any]]], intact: bool):
    """seq must run 1..n in file order, each naming the previous entry's hash. Returns (by_seq, position_of).

    ``intact``: the links were verified already (privacy/audit.py's ``_intact_and_signed``).
    """
    org = result.org
    seqs = [entry["seq"] for _, entry in trusted]
    counts = Counter(seqs)
    for seq, count in sorted(counts.items()):
        if count > 1:
            result.flag(
                "sequence", "duplicated", None, seq, f"seq {seq} appears {count} times (a forked or replayed ledger)"
            )
    # a seq whose place holds an altered entry (same seq, or same line in an intact ledger) is reported as edited
    altered = {f.seq for f in result.findings if f.problem in ("edited", "malformed")}
    altered |= {f.position for f in result.findings if f.problem in ("edited", "malformed")}
    for seq in sorted(set(range(1, max([*seqs, 0]) + 1)) - set(seqs)):
        if seq not in altered:
            result.flag("sequence", "deleted", None, seq, f"entry seq {seq} is missing (deleted)")
    for index in range(1, len(trusted)):
        (pos_a, a), (pos_b, b) = trusted[index - 1], trusted[index]
        if b["seq"] < a["seq"]:
            result.flag(
                "sequence", "reordered", pos_b, b["seq"],
                f"entry seq {b['seq']} at line {pos_b} comes after seq {a['seq']} (line {pos_a}): entries were reordered",
            )  # fmt: skip
    by_seq = {entry["seq"]: entry for _, entry in trusted if counts[entry["seq"]] == 1}
    position_of = {entry["seq"]: pos for pos, entry in trusted}
    if 1 in by_seq and by_seq[1]["prev_hash"] != genesis_hash(org):
        result.flag("chain", "broken", position_of[1], 1, "the first entry does not start this organisation's chain")
    for seq in [] if intact else sorted(by_seq):
        if seq - 1 in by_seq and by_seq[seq]["prev_hash"] != entry_hash(by_seq[seq - 1]):
            result.flag(
                "chain", "broken", position_of[seq], seq,
                f"entry seq {seq} does not name entry seq {seq - 1}'s hash (an entry was substituted)",
            )  # fmt: skip
    return by_seq, position_of


def _check_completeness(result, entries, by_seq, key, ledger_set: LedgerSet) -> None:
    """Truncation against the recorded head and the organisation's own copies; copies that do not verify."""
    org = result.org
    last = max(by_seq) if by_seq else 0
    # entries that are present but altered are reported as such, not as cut
    present = max([last, *(e["seq"] for e in entries if _count(e.get("seq")))])
    head = ledger_set.heads.get(org)
    if isinstance(head, dict) and _count(head.get("seq")):
        if head["seq"] > present:
            result.flag(
                "truncation", "truncated", None, last,
                f"the ledger ends at seq {last} but the coordinator recorded seq {head['seq']}: entries were cut",
            )  # fmt: skip
        elif head["seq"] in by_seq and head.get("hash") != entry_hash(by_seq[head["seq"]]):
            result.flag(
                "truncation", "replaced", None, head["seq"], f"entry seq {head['seq']} differs from the recorded head"
            )
    for copy_path, copy_entries in ledger_set.copies.get(org, []):
        genuine, _ = _authenticated(org, copy_entries, key)
        other = [e for e, ok in zip(copy_entries, genuine, strict=True) if ok and _count(e.get("seq"))]
        if copy_entries and not other:
            result.flag(
                "key", "copy_unverified", None, None,
                f"{copy_path} holds {len(copy_entries)} entries and none verifies against the key this ledger is"
                f" checked with ({result.key_fingerprint}, {result.key_source}): the key was substituted, or the copy"
                " is another organisation's",
            )  # fmt: skip
            continue
        if len(other) < len(copy_entries):
            result.flag(
                "chain", "copy_altered", None, None,
                f"{len(copy_entries) - len(other)} of {len(copy_entries)} entries of {copy_path} do not verify",
            )  # fmt: skip
        other_last = max([e["seq"] for e in other], default=0)
        if other_last > last:
            result.flag(
                "truncation", "truncated", None, last,
                f"the ledger ends at seq {last} but {copy_path} holds signed entries up to seq {other_last}",
            )  # fmt: skip
        for entry in other:
            mine = by_seq.get(entry["seq"])
            if mine is not None and entry_hash(mine) != entry_hash(entry):
                result.flag(
                    "chain", "diverged", None, entry["seq"], f"entry seq {entry['seq']} differs from {copy_path}"
                )


def _check_key(result: OrgAudit, ledger_set: LedgerSet) -> Any:
    """The key the ledger is checked with, and findings where the organisation's keys disagree."""
    candidates = ledger_set.keys.get(result.org, [])
    chosen = ledger_set.key_for(result.org)
    if chosen is None:
        result.flag(
            "signature", "no_key", None, None, f"no public key for '{result.org}': its entries cannot be verified"
        )
        return None
    result.key_source, result.key_fingerprint = chosen.source, chosen.fingerprint
    result.key_trust = TRUST_ORGS if chosen.from_org else TRUST_TOFU
    for other in candidates:
        if other.fingerprint == chosen.fingerprint:
            continue
        problem = "conflicting" if other.from_org else "substituted"
        result.flag(
            "key", problem, None, None,
            f"the key {other.source} ({other.fingerprint}) is not the organisation's own ({chosen.fingerprint},"
            f" {chosen.source})" + ("" if other.from_org else ": the audited folder's key was substituted"),
        )  # fmt: skip
    return chosen.key


# --------------------------------------------------------------------------- epsilon and budget


def _check_epsilon(
    result: OrgAudit, dp: list[dict[str, Any]], events: list[independent.Event], position_of: dict[int, int], pld: bool
) -> None:
    """Every claim against dp-accounting: RDP for each entry; PLD and the stated accountant settle what RDP leaves open.

    A claim at or above dp-accounting's RDP (less RDP_TOLERANCE) holds. Below it, a claim under dp-accounting's
    PLD (an upper bound on the true epsilon) is under-reported. Between the two, an RDP claim must still be what
    its stated accountant gives (Opacus's RDP, reproduced): only the two RDP implementations' difference may put
    an honest claim there. A PRV claim there holds (PRV is tighter than RDP; PLD confirms it).
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


def _check_budget(result: OrgAudit, events: list[independent.Event]) -> None:
    """The organisation's epsilon within its budget, by the tightest independent upper bound on it.

    RDP first (computed for every entry anyway); where it passes the budget, PLD decides: dp-accounting's RDP
    bounds fractional orders more loosely than Opacus, whose RDP the node enforces its budget with, and PLD is
    an upper bound on the true epsilon either way. A PRV ledger is held to PLD.
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


def _check_org(org: str, path: Path, entries: list[dict[str, Any]], ledger_set: LedgerSet, pld: bool) -> OrgAudit:
    result = OrgAudit(org=org, ledger=str(path), key_source="none found", key_fingerprint=None, entries=len(entries))
    key = _check_key(result, ledger_set)
    trusted, intact = _check_signatures(result, entries, key, ledger_set)
    by_seq, position_of = _check_chain(result, trusted, intact)
    _check_completeness(result, entries, by_seq, key, ledger_set)
    chain = [by_seq[s] for s in sorted(by_seq)]
    dp = [e for e in chain if e["kind"] in DP_KINDS]
    result.dp_rounds = len(dp)
    result.refusals = sum(e["kind"] == "refusal" for e in chain)
    # the mechanism of each DP entry, all the recomputation reads: (noise_multiplier, sample_rate, steps)
    events = [(float(e["noise_multiplier"]), float(e["sample_rate"]), int(e["local_steps"])) for e in dp]
    result.steps = sum(steps for _, _, steps in events)
    result.redaction = redaction_summary([e for e in dp if e["kind"] == "dp_round"])
    accountants = {e["accountant"] for e in chain}
    deltas = {float(e["delta"]) for e in chain}
    budgets = {float(e["max_epsilon"]) for e in chain}
    if len(accountants) > 1 or len(deltas) > 1:
        result.flag(
            "fields", "inconsistent", None, None, f"accountant/delta change within the ledger: {accountants} {deltas}"
        )
    if len(budgets) > 1:
        result.flag("budget", "changed", None, None, f"max_epsilon changes within the ledger: {sorted(budgets)}")
    if not chain:
        return result
    result.accountant = sorted(accountants)[0]
    result.delta = max(deltas)
    result.max_epsilon = min(budgets)  # the strictest budget the organisation stated
    result.claimed_epsilon = float(dp[-1]["epsilon"]) if dp else 0.0
    if dp:
        last = dp[-1]
        names = ("noise_multiplier", "sample_rate", "delta", "accountant", "max_epsilon", "target_epsilon")
        result.parameters = {name: last[name] for name in names}
        _check_epsilon(result, dp, events, position_of, pld)
    else:
        result.recomputed_epsilon = {"rdp": 0.0, "prv": None, "pld": 0.0}
    _check_budget(result, events)
    return result


def redaction_summary(dp_rounds: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Redaction as the organisation's signed entries record it: on in how many rounds, which rule sets, counts.

    ``status``: "on" (every round recorded redaction on), "off", "mixed", or "not recorded" (entries written
    before redaction was recorded). The counts are those of the last round with redaction on; its ``share`` says
    what the organisation let its entries say (``redaction.share``): "counts" (entries from before the setting
    have counts and no ``share``), "kinds" (``found``: the kinds with matches, ``counts`` empty) or "none".
    """
    if not dp_rounds:
        return None
    recorded = [e.get("redaction") for e in dp_rounds]
    known = [r for r in recorded if isinstance(r, dict)]
    on = [r for r in known if r.get("enabled") is True]
    if not known:
        status = "not recorded"
    elif len(on) == len(recorded):
        status = "on"
    elif not on:
        status = "off"
    else:
        status = "mixed"
    rule_sets = sorted({f"{r.get('rules')} v{r.get('version')} ({str(r.get('digest', ''))[:12]})" for r in on})
    return {
        "status": status,
        "dp_rounds": len(recorded),
        "rounds_recorded": len(known),
        "rounds_on": len(on),
        "rule_sets": rule_sets,
        "kinds": list(on[-1].get("kinds", [])) if on else [],
        "counts": dict(on[-1].get("counts", {})) if on else {},
        "share": str(on[-1].get("share", "counts")) if on else None,
        "found": _found(on[-1]) if on else [],
    }


def _found(report: dict[str, Any]) -> list[str]:
    """The kinds a redaction report says were found: its ``found``, or the kinds with counts in an older one."""
    if isinstance(report.get("found"), list):
        return [str(kind) for kind in report["found"]]
    counts = report.get("counts")
    return sorted(str(kind) for kind, n in counts.items() if n) if isinstance(counts, dict) else []


# --------------------------------------------------------------------------- the whole audit


PARALLEL_FROM_ENTRIES = 20_000  # below this a process pool costs more than it saves


def _estimated_entries(path: Path) -> int:
    return path.stat().st_size // 500  # a dp_round line is about 600 bytes


def _check_org_in_worker(task: tuple) -> OrgAudit:
    """One organisation in a worker process (keys travel as PEM: key objects do not pickle)."""
    org, path, entries, keys_pem, heads, copies, pld = task
    entries = _read(path) if entries is None else entries
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

    from fedpriv.privacy.audit_crosscheck import cross_check

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
            _check_org(org, path, _read(path) if entries is None else entries, ledger_set, pld)
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
