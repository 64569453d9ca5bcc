"""``fedpriv audit``: check privacy ledgers without trusting whoever ran the federation.

For each organisation's ledger: every signature against the organisation's
public key, the sequence numbers and the hash chain (edited, deleted,
reordered, truncated or foreign entries, each with its position); then the
epsilon recomputed from the recorded DP parameters alone with both the RDP
and the PRV accountant, against what each entry claims and against the
organisation's budget. The verdict is a plain data structure;
``privacy/audit_report.py`` turns it into audit.json / audit.md / audit.html.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from privacy import recompute
from privacy.ledger import (
    DP_FIELDS,
    DP_KINDS,
    FORMAT,
    KINDS,
    REFUSAL_FIELDS,
    LedgerError,
    entry_hash,
    genesis_hash,
    key_fingerprint,
    load_public_key,
    signature_valid,
)

# a claimed epsilon may sit below the recomputation by float noise only
RELATIVE_TOLERANCE = 1e-6
HEADS_FILE = "heads.json"
EMPIRICAL_FILE = "empirical_audit.json"


class AuditInputError(LedgerError):
    """The audit's input cannot be read (exit code 2)."""


@dataclass
class Finding:
    org: str
    check: str  # signature | sequence | chain | truncation | fields | epsilon | budget
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
    rdp_epsilon: float
    prv_epsilon: float | None
    accountant: str


@dataclass
class OrgAudit:
    org: str
    ledger: str
    key_source: str
    key_fingerprint: str | None
    entries: int = 0
    dp_rounds: int = 0
    refusals: int = 0
    accountant: str | None = None
    delta: float | None = None
    max_epsilon: float | None = None
    claimed_epsilon: float | None = None
    recomputed_epsilon: dict[str, float | None] = field(default_factory=dict)
    within_budget: bool | None = None
    prv_prefixes_computed: int = 0  # PRV is costly: a PRV ledger's claims are bracketed, not all recomputed
    rounds: list[RoundCheck] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    # what the signed dp_round entries say about redaction of the data the steps used (see redaction_summary)
    redaction: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return not self.findings


@dataclass
class AuditResult:
    source: str
    orgs: list[OrgAudit]
    notes: list[str]
    seconds: float = 0.0
    empirical: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return all(org.ok for org in self.orgs) and bool(self.orgs)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "fedpriv-audit/1",
            "source": self.source,
            "ok": self.ok,
            "seconds": round(self.seconds, 3),
            "notes": list(self.notes),
            "organisations": {
                org.org: {**{k: v for k, v in asdict(org).items() if k not in ("org",)}, "ok": org.ok}
                for org in self.orgs
            },
            "findings": [asdict(f) for org in self.orgs for f in org.findings],
            "empirical_audit": self.empirical,
        }


# --------------------------------------------------------------------------- input


@dataclass
class LedgerSet:
    """What an audit reads: ledgers per organisation, their keys (and where from), recorded heads."""

    ledgers: dict[str, tuple[Path, list[dict[str, Any]] | None]]  # None: not read yet (see _named_after_its_org)
    keys: dict[str, tuple[Any, str]]
    heads: dict[str, dict[str, Any]]
    copies: dict[str, list[tuple[Path, list[dict[str, Any]]]]]
    source: str
    notes: list[str]
    empirical: dict[str, Any] | None = None  # a simulation's canary audit (empirical_audit.json), when present


def _org_of(path: Path, entries: list[dict[str, Any]]) -> str:
    named = Counter(str(e.get("org")) for e in entries if isinstance(e.get("org"), str))
    return named.most_common(1)[0][0] if named else path.stem


def _read_keys(folder: Path, how: str) -> dict[str, tuple[Any, str]]:
    keys = {}
    for path in sorted(folder.glob("*.pub")):
        keys[path.stem] = (load_public_key(path), f"{how} {path}")
    return keys


def load_ledger_set(paths: list[str | Path], keys_dir: str | Path | None = None) -> LedgerSet:
    """Ledgers from run folders (``ledgers/``), ledger folders or ``.jsonl`` files; AuditInputError if unreadable."""
    if not paths:
        raise AuditInputError("audit: name a run folder, a ledgers folder or ledger .jsonl files")
    files: list[Path] = []
    keys: dict[str, tuple[Any, str]] = {}
    heads: dict[str, dict[str, Any]] = {}
    notes: list[str] = []
    empirical = None
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise AuditInputError(f"{path}: no such file or folder")
        if path.is_dir() and (path / EMPIRICAL_FILE).exists():
            try:
                empirical = json.loads((path / EMPIRICAL_FILE).read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as exc:
                raise AuditInputError(f"{path / EMPIRICAL_FILE}: not readable JSON ({exc})") from None
        folder = path / "ledgers" if (path / "ledgers").is_dir() else path
        if path.is_file():
            files.append(path)
            for candidate in (path.with_suffix(".pub"), path.parent / "ledger.pub"):
                if candidate.exists():
                    keys.setdefault(_org_of(path, _read(path)), (load_public_key(candidate), f"beside {candidate}"))
            continue
        found = sorted(folder.glob("*.jsonl"))
        if not found:
            raise AuditInputError(f"{path}: no ledger files (*.jsonl) in {folder}")
        files.extend(found)
        if (folder / "keys").is_dir():
            for org, value in _read_keys(folder / "keys", "reported by the node, kept in").items():
                keys.setdefault(org, value)
        heads_path = folder / HEADS_FILE
        if heads_path.exists():
            try:
                heads.update(json.loads(heads_path.read_text(encoding="utf-8")))
            except (OSError, json.JSONDecodeError) as exc:
                raise AuditInputError(f"{heads_path}: not readable JSON ({exc})") from None
    if keys_dir is not None:
        folder = Path(keys_dir)
        if not folder.is_dir():
            raise AuditInputError(f"--keys {folder}: not a folder of <org>.pub files")
        trusted = _read_keys(folder, "given with --keys:")
        if not trusted:
            raise AuditInputError(f"--keys {folder}: no <org>.pub files")
        keys.update(trusted)
    elif keys:
        notes.append(
            "public keys were taken from the audited folder itself (trust on first use): pass --keys with the"
            " organisations' own ledger.pub files to rule out a coordinator that re-signed everything"
        )
    ledgers: dict[str, tuple[Path, list[dict[str, Any]] | None]] = {}
    copies: dict[str, list[tuple[Path, list[dict[str, Any]]]]] = {}
    for path in files:
        named = _named_after_its_org(path)
        entries = None if named and named not in ledgers else _read(path)  # None: read where it is audited
        org = named or _org_of(path, entries)
        if org in ledgers:
            copies.setdefault(org, []).append((path, entries))
        else:
            ledgers[org] = (path, entries)
    return LedgerSet(ledgers, keys, heads, copies, ", ".join(str(p) for p in paths), notes, empirical)


def _named_after_its_org(path: Path) -> str | None:
    """The organisation a ledger file belongs to when its name says so and its first entry agrees (no parsing).

    The coordinator keeps ``ledgers/<org>.jsonl``; reading such a file can wait for the worker that
    audits it. Any other file is read here, and its organisation is the one most of its entries name.
    """
    try:
        with path.open(encoding="utf-8") as handle:
            first = json.loads(handle.readline())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return path.stem if isinstance(first, dict) and first.get("org") == path.stem else None


def _read(path: Path) -> list[dict[str, Any]]:
    """A ledger's lines; a line that is not a JSON object becomes a marker the audit reports as malformed."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise AuditInputError(f"{path}: cannot read ({exc})") from None
    entries = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            value = None
        entries.append(value if isinstance(value, dict) else {"__malformed__": line[:120]})
    return entries


# --------------------------------------------------------------------------- checks


def _field_problems(entry: dict[str, Any]) -> list[str]:
    kind = entry.get("kind")
    if kind not in KINDS:
        return [f"kind {kind!r} is not one of {', '.join(KINDS)}"]
    problems = []
    for name in ("format", "org", "seq", "round", "prev_hash", "signature"):
        if name not in entry:
            problems.append(f"no {name}")
    for name in DP_FIELDS if kind in DP_KINDS else REFUSAL_FIELDS:
        if name not in entry:
            problems.append(f"no {name}")
    if problems:
        return problems
    if entry["format"] != FORMAT:
        problems.append(f"format {entry['format']!r}, expected {FORMAT}")
    if kind in DP_KINDS:
        if not (isinstance(entry["noise_multiplier"], (int, float)) and entry["noise_multiplier"] > 0):
            problems.append(f"noise_multiplier {entry['noise_multiplier']!r} is not > 0")
        if not (isinstance(entry["sample_rate"], (int, float)) and 0 < entry["sample_rate"] <= 1):
            problems.append(f"sample_rate {entry['sample_rate']!r} is not in (0, 1]")
        if not (isinstance(entry["local_steps"], int) and entry["local_steps"] >= 0):
            problems.append(f"local_steps {entry['local_steps']!r} is not an integer >= 0")
        if not isinstance(entry["epsilon"], (int, float)):
            problems.append(f"epsilon {entry['epsilon']!r} is not a number")
    if not (isinstance(entry["delta"], (int, float)) and 0 < entry["delta"] < 1):
        problems.append(f"delta {entry['delta']!r} is not in (0, 1)")
    if entry["accountant"] not in ("rdp", "prv"):
        problems.append(f"accountant {entry['accountant']!r} is not rdp or prv")
    return problems


def _check_org(org: str, path: Path, entries: list[dict[str, Any]], ledger_set: LedgerSet, prv: bool) -> OrgAudit:
    key, key_source = ledger_set.keys.get(org, (None, "none found"))
    result = OrgAudit(
        org=org,
        ledger=str(path),
        key_source=key_source,
        key_fingerprint=key_fingerprint(key) if key is not None else None,
        entries=len(entries),
    )

    def flag(check: str, problem: str, position: int | None, seq: int | None, message: str) -> None:
        result.findings.append(Finding(org, check, problem, position, seq, message))

    if key is None:
        flag("signature", "no_key", None, None, f"no public key for '{org}': its entries cannot be verified")
    # 1. each entry on its own: readable, well-formed, signed by this organisation
    trusted: list[tuple[int, dict[str, Any]]] = []  # (position, entry) whose signature verifies
    for position, entry in enumerate(entries, start=1):
        if "__malformed__" in entry:
            flag("fields", "malformed", position, None, f"line {position} is not a JSON ledger entry")
            continue
        seq = entry.get("seq") if isinstance(entry.get("seq"), int) else None
        if key is not None and not signature_valid(entry, key):
            signer = next(
                (other for other, (k, _) in ledger_set.keys.items() if other != org and signature_valid(entry, k)),
                None,
            )
            if signer is not None:
                flag(
                    "signature",
                    "foreign",
                    position,
                    seq,
                    f"entry at line {position} was signed by '{signer}', not '{org}' (spliced in)",
                )
            else:
                flag(
                    "signature",
                    "edited",
                    position,
                    seq,
                    f"entry at line {position} (seq {seq}) was altered: its signature does not verify",
                )
            continue
        problems = _field_problems(entry)
        if problems:
            flag("fields", "malformed", position, seq, f"entry at line {position}: " + "; ".join(problems))
            continue
        trusted.append((position, entry))
    # 2. order and completeness: seq must run 1..n in file order, each naming the previous entry's hash
    seqs = [entry["seq"] for _, entry in trusted]
    counts = Counter(seqs)
    for seq, count in sorted(counts.items()):
        if count > 1:
            flag("sequence", "duplicated", None, seq, f"seq {seq} appears {count} times (a forked or replayed ledger)")
    # a seq whose place holds an altered entry (same seq, or same line in an intact ledger) is reported as edited
    altered = {f.seq for f in result.findings if f.problem in ("edited", "malformed")}
    altered |= {f.position for f in result.findings if f.problem in ("edited", "malformed")}
    missing = sorted(set(range(1, max([*seqs, 0]) + 1)) - set(seqs))
    for seq in missing:
        if seq in altered:
            continue
        flag("sequence", "deleted", None, seq, f"entry seq {seq} is missing (deleted)")
    for index in range(1, len(trusted)):
        (pos_a, a), (pos_b, b) = trusted[index - 1], trusted[index]
        if b["seq"] < a["seq"]:
            flag(
                "sequence",
                "reordered",
                pos_b,
                b["seq"],
                f"entry seq {b['seq']} at line {pos_b} comes after seq {a['seq']} (line {pos_a}): entries were reordered",
            )
    by_seq = {entry["seq"]: entry for _, entry in trusted if counts[entry["seq"]] == 1}
    position_of = {entry["seq"]: pos for pos, entry in trusted}
    if 1 in by_seq and by_seq[1]["prev_hash"] != genesis_hash(org):
        flag("chain", "broken", position_of[1], 1, "the first entry does not start this organisation's chain")
    for seq in sorted(by_seq):
        if seq - 1 in by_seq and by_seq[seq]["prev_hash"] != entry_hash(by_seq[seq - 1]):
            flag(
                "chain",
                "broken",
                position_of[seq],
                seq,
                f"entry seq {seq} does not name entry seq {seq - 1}'s hash (an entry was substituted)",
            )
    # 3. truncation: the recorded head (coordinator) or another copy holds more than this ledger
    last = max(by_seq) if by_seq else 0
    # entries that are present but altered are reported as such, not as cut
    present = max([last, *(e["seq"] for e in entries if isinstance(e.get("seq"), int))])
    head = ledger_set.heads.get(org)
    if isinstance(head, dict) and isinstance(head.get("seq"), int):
        if head["seq"] > present:
            flag(
                "truncation",
                "truncated",
                None,
                last,
                f"the ledger ends at seq {last} but the coordinator recorded seq {head['seq']}: entries were cut",
            )
        elif head["seq"] in by_seq and head.get("hash") != entry_hash(by_seq[head["seq"]]):
            flag("truncation", "replaced", None, head["seq"], f"entry seq {head['seq']} differs from the recorded head")
    for copy_path, copy_entries in ledger_set.copies.get(org, []):
        other = [
            e for e in copy_entries if isinstance(e.get("seq"), int) and key is not None and signature_valid(e, key)
        ]
        other_last = max([e["seq"] for e in other], default=0)
        if other_last > last:
            flag(
                "truncation",
                "truncated",
                None,
                last,
                f"the ledger ends at seq {last} but {copy_path} holds signed entries up to seq {other_last}",
            )
        for entry in other:
            mine = by_seq.get(entry["seq"])
            if mine is not None and entry_hash(mine) != entry_hash(entry):
                flag("chain", "diverged", None, entry["seq"], f"entry seq {entry['seq']} differs from {copy_path}")
    # 4. epsilon from the recorded parameters, and the budget
    chain = [by_seq[s] for s in sorted(by_seq)]
    dp = [e for e in chain if e["kind"] in DP_KINDS]
    result.dp_rounds = len(dp)
    result.refusals = sum(e["kind"] == "refusal" for e in chain)
    result.redaction = redaction_summary([e for e in dp if e["kind"] == "dp_round"])
    accountants = {e["accountant"] for e in chain}
    deltas = {float(e["delta"]) for e in chain}
    budgets = {float(e["max_epsilon"]) for e in chain}
    if len(accountants) > 1 or len(deltas) > 1:
        flag("fields", "inconsistent", None, None, f"accountant/delta change within the ledger: {accountants} {deltas}")
    if len(budgets) > 1:
        flag("budget", "changed", None, None, f"max_epsilon changes within the ledger: {sorted(budgets)}")
    if not chain:
        return result
    result.accountant = sorted(accountants)[0]
    result.delta = max(deltas)
    result.max_epsilon = min(budgets)  # the strictest budget the organisation stated
    events = [(float(e["noise_multiplier"]), float(e["sample_rate"]), int(e["local_steps"])) for e in dp]
    rdp = recompute.rdp_epsilons(events, result.delta)
    prv_all: list[float | None] = [None] * len(dp)
    prv_under = [False] * len(dp)
    if dp and (prv or result.accountant == "prv"):  # a PRV ledger's claims are checked even with --no-prv
        if result.accountant == "prv":
            claims = [float(e["epsilon"]) for e in dp]
            prv_all, prv_under = recompute.prv_check_claims(events, claims, result.delta, RELATIVE_TOLERANCE)
        else:
            prv_all[-1] = recompute.prv_epsilon(events, result.delta)
    result.prv_prefixes_computed = sum(value is not None for value in prv_all)
    for entry, eps_rdp, eps_prv, prv_low in zip(dp, rdp, prv_all, prv_under, strict=True):
        claimed = float(entry["epsilon"])
        check = RoundCheck(
            position=position_of[entry["seq"]],
            seq=entry["seq"],
            round=int(entry["round"]),
            local_steps=int(entry["local_steps"]),
            claimed_epsilon=claimed,
            rdp_epsilon=eps_rdp,
            prv_epsilon=eps_prv,
            accountant=entry["accountant"],
        )
        result.rounds.append(check)
        same = eps_rdp if entry["accountant"] == "rdp" else eps_prv
        if prv_low or (same is not None and claimed < same * (1 - RELATIVE_TOLERANCE) - 1e-12):
            flag(
                "epsilon",
                "under_reported",
                check.position,
                check.seq,
                f"round {check.round} claims epsilon {claimed:.6g}; its recorded parameters give"
                + (f" {same:.6g}" if same is not None else " more (an earlier round's is already higher)")
                + f" ({entry['accountant'].upper()})",
            )
    result.claimed_epsilon = float(dp[-1]["epsilon"]) if dp else 0.0
    result.recomputed_epsilon = {"rdp": rdp[-1] if rdp else 0.0, "prv": prv_all[-1] if dp else 0.0}
    spent = result.recomputed_epsilon.get(result.accountant)
    if spent is None:
        spent = result.recomputed_epsilon["rdp"]
    result.within_budget = spent <= result.max_epsilon * (1 + RELATIVE_TOLERANCE)
    if not result.within_budget:
        flag(
            "budget",
            "exceeded",
            None,
            None,
            f"spent epsilon {spent:.6g} ({result.accountant.upper()}) exceeds max_epsilon {result.max_epsilon:g}",
        )
    for check in result.rounds:
        value = check.rdp_epsilon if check.accountant == "rdp" else check.prv_epsilon
        if value is not None and value > result.max_epsilon * (1 + RELATIVE_TOLERANCE) and result.within_budget:
            flag("budget", "exceeded", check.position, check.seq, f"round {check.round} passed max_epsilon")
    if any(math.isinf(r.rdp_epsilon) for r in result.rounds):
        flag("epsilon", "unbounded", None, None, "a recorded event has no finite epsilon")
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


PARALLEL_FROM_ENTRIES = 20_000  # below this a process pool costs more than it saves


def _estimated_entries(path: Path) -> int:
    return path.stat().st_size // 500  # a dp_round line is about 600 bytes


def _check_org_in_worker(task: tuple) -> OrgAudit:
    """One organisation in a worker process (keys travel as PEM: key objects do not pickle)."""
    org, path, entries, keys_pem, heads, copies, prv = task
    entries = _read(path) if entries is None else entries
    keys = {name: (load_public_key(pem.encode()), source) for name, (pem, source) in keys_pem.items()}
    ledger_set = LedgerSet({org: (path, entries)}, keys, heads, {org: copies}, "", [])
    return _check_org(org, path, entries, ledger_set, prv)


def audit(ledger_set: LedgerSet, prv: bool = True, workers: int | None = None) -> AuditResult:
    """Check every organisation's ledger (in parallel processes for big inputs: one per CPU by default)."""
    import os

    started = time.perf_counter()
    items = sorted(ledger_set.ledgers.items())
    total = sum(len(entries) if entries is not None else _estimated_entries(path) for _, (path, entries) in items)
    workers = workers if workers is not None else (os.cpu_count() or 1)
    if workers > 1 and len(items) > 1 and total >= PARALLEL_FROM_ENTRIES:
        from concurrent.futures import ProcessPoolExecutor

        from privacy.ledger import public_key_text

        keys_pem = {name: (public_key_text(key), source) for name, (key, source) in ledger_set.keys.items()}
        tasks = [
            (org, path, entries, keys_pem, ledger_set.heads, ledger_set.copies.get(org, []), prv)
            for org, (path, entries) in items
        ]
        with ProcessPoolExecutor(max_workers=min(workers, len(items))) as pool:
            orgs = list(pool.map(_check_org_in_worker, tasks, chunksize=max(1, len(tasks) // (4 * workers))))
    else:
        orgs = [
            _check_org(org, path, _read(path) if entries is None else entries, ledger_set, prv)
            for org, (path, entries) in items
        ]
    for org in sorted(set(ledger_set.heads) - set(ledger_set.ledgers)):
        missing = OrgAudit(org=org, ledger="(missing)", key_source="", key_fingerprint=None)
        missing.findings.append(
            Finding(
                org, "truncation", "missing", None, None, f"the coordinator recorded a ledger for '{org}'; none given"
            )
        )
        orgs.append(missing)
    empirical = ledger_set.empirical
    if empirical is not None:
        bound, org_name = float(empirical.get("epsilon_lower_bound", 0.0)), str(empirical.get("org"))
        audited = next((o for o in orgs if o.org == org_name), None)
        claimed = None if audited is None else audited.recomputed_epsilon.get(audited.accountant or "rdp")
        if claimed is not None and bound > claimed * (1 + RELATIVE_TOLERANCE):
            audited.findings.append(
                Finding(
                    org_name,
                    "empirical",
                    "contradicted",
                    None,
                    None,
                    f"the canary audit shows epsilon >= {bound:.4g} ({empirical.get('confidence')} confidence),"
                    f" above the {claimed:.4g} the ledger accounts for: the DP guarantee does not hold",
                )
            )
    return AuditResult(
        ledger_set.source, orgs, list(ledger_set.notes), time.perf_counter() - started, ledger_set.empirical
    )
