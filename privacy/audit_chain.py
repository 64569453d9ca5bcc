"""Whether a ledger is the organisation's own, whole and unaltered: its key, signatures, hash chain, length.

Each check records findings on the organisation's :class:`OrgAudit` (with the line and seq it concerns);
only entries that pass reach the accounting checks (privacy/audit_epsilon.py).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from fedpriv.privacy.audit_entries import field_problems, is_count
from fedpriv.privacy.audit_input import LedgerSet
from fedpriv.privacy.audit_result import TRUST_ORGS, TRUST_TOFU, OrgAudit
from fedpriv.privacy.ledger import entry_hash, genesis_hash, signature_valid


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


def authenticated(org: str, entries: list[dict[str, Any]], key: Any) -> tuple[list[bool], bool]:
    """Which entries carry the organisation's signature, and whether the whole chain was verified on the way."""
    if _intact_and_signed(org, entries, key):
        return [True] * len(entries), True
    return [key is not None and "__malformed__" not in e and signature_valid(e, key) for e in entries], False


def check_signatures(result: OrgAudit, entries: list[dict[str, Any]], key: Any, ledger_set: LedgerSet):
    """Each entry on its own: readable, well-formed, signed by this organisation.

    Protects against entries edited after signing, entries of another organisation spliced in (named by
    the key that does verify them), and entries the recomputation could not read honestly.
    Returns the (position, entry) pairs that are, and whether the hash chain was verified whole on the way.
    """
    org = result.org
    trusted: list[tuple[int, dict[str, Any]]] = []
    authentic, intact = authenticated(org, entries, key)
    for position, (entry, genuine) in enumerate(zip(entries, authentic, strict=True), start=1):
        if "__malformed__" in entry:
            result.flag("fields", "malformed", position, None, f"line {position} is not a JSON ledger entry")
            continue
        seq = entry.get("seq") if is_count(entry.get("seq")) else None
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
        problems = field_problems(entry)
        if problems:
            result.flag("fields", "malformed", position, seq, f"entry at line {position}: " + "; ".join(problems))
            continue
        trusted.append((position, entry))
    return trusted, intact


def check_chain(result: OrgAudit, trusted: list[tuple[int, dict[str, Any]]], intact: bool):
    """seq must run 1..n in file order, each naming the previous entry's hash. Returns (by_seq, position_of).

    Protects against signed entries deleted, duplicated (a forked or replayed ledger), reordered or swapped
    for another signed entry of the same organisation: each is genuine, only their order tells.
    ``intact``: the links were verified already (``_intact_and_signed``).
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


def check_completeness(result, entries, by_seq, key, ledger_set: LedgerSet) -> None:
    """Truncation against the recorded head and the organisation's own copies; copies that do not verify.

    Protects against a ledger cut after its last costly rounds (every remaining entry still verifies), and
    against a ledger that differs from the copies the organisation kept itself.
    """
    org = result.org
    last = max(by_seq) if by_seq else 0
    # entries that are present but altered are reported as such, not as cut
    present = max([last, *(e["seq"] for e in entries if is_count(e.get("seq")))])
    head = ledger_set.heads.get(org)
    if isinstance(head, dict) and is_count(head.get("seq")):
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
        genuine, _ = authenticated(org, copy_entries, key)
        other = [e for e, ok in zip(copy_entries, genuine, strict=True) if ok and is_count(e.get("seq"))]
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


def check_key(result: OrgAudit, ledger_set: LedgerSet) -> Any:
    """The key the ledger is checked with, and findings where the organisation's keys disagree.

    Protects against a ledger re-signed with a substituted key: the organisation's own key, when the auditor
    brought it, wins over the audited folder's, and any other key found is reported.
    """
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
