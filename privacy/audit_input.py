"""What ``fedpriv audit`` reads, and which of it comes from whom.

The audited folder is the operator's: its ledgers, the keys beside them,
``heads.json`` and ``summary.json`` are all things a dishonest coordinator
could have rewritten together. Keys an auditor got from the organisations
themselves (``--keys``, or the ``ledger.pub`` beside an organisation's own ledger
copy) outrank them; a key found only in the audited folder is trust on first
use, and one that differs from the organisation's own is a substitution.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedpriv.privacy.ledger import PUBLIC_KEY_FILE, LedgerError, key_fingerprint, load_public_key

HEADS_FILE = "heads.json"
EMPIRICAL_FILE = "empirical_audit.json"
SUMMARY_FILE = "summary.json"
COORDINATOR = "coordinator"  # the coordinator's own ledger (organisation-level DP), ledgers/coordinator.jsonl


class AuditInputError(LedgerError):
    """The audit's input cannot be read (exit code 2)."""


class NothingToAudit(AuditInputError):
    """A run with DP off: it makes no privacy claim, so there is no ledger to check (exit code 3)."""

    exit_code = 3


@dataclass(frozen=True)
class KeyCandidate:
    """One public key for an organisation and where it was found."""

    key: Any
    source: str
    from_org: bool  # True: given by the organisation (outside the audited folder); False: the audited folder's

    @property
    def fingerprint(self) -> str:
        return key_fingerprint(self.key)


@dataclass
class LedgerSet:
    """What an audit reads: ledgers per organisation, candidate keys, recorded heads, the run's summary."""

    ledgers: dict[str, tuple[Path, list[dict[str, Any]] | None]]  # None: not read yet (see _named_after_its_org)
    keys: dict[str, list[KeyCandidate]]
    heads: dict[str, dict[str, Any]]
    copies: dict[str, list[tuple[Path, list[dict[str, Any]]]]]
    source: str
    notes: list[str]
    empirical: dict[str, Any] | None = None  # a simulation's canary audit (empirical_audit.json), when present
    summary: dict[str, Any] | None = None  # the run's summary.json, cross-checked against the ledgers
    roster: list[str] = field(default_factory=list)  # the organisations provisioned (FEDERATION.yaml), when given
    keys_given: list[str] = field(default_factory=list)  # organisations whose key the auditor brought (--keys)

    def key_for(self, org: str) -> KeyCandidate | None:
        """The key the ledger is checked with: the organisation's own when the auditor has it, else the folder's."""
        candidates = self.keys.get(org, [])
        own = [c for c in candidates if c.from_org]
        return (own or candidates or [None])[0]


def _org_of(path: Path, entries: list[dict[str, Any]]) -> str:
    named = Counter(str(e.get("org")) for e in entries if isinstance(e.get("org"), str))
    return named.most_common(1)[0][0] if named else path.stem


def _inside(path: Path, folders: list[Path]) -> bool:
    resolved = path.resolve()
    return any(resolved == folder or folder in resolved.parents for folder in folders)


def _key_files(folder: Path) -> dict[str, Path]:
    """``<org>.pub`` files, or organisation kits (``<org>/ledger.pub``) in ``folder``."""
    found = {path.stem: path for path in sorted(folder.glob("*.pub"))}
    for path in sorted(folder.glob(f"*/{PUBLIC_KEY_FILE}")):
        found.setdefault(path.parent.name, path)
    return found


def _load_key(path: Path, what: str) -> Any:
    try:
        return load_public_key(path)
    except LedgerError as exc:
        raise AuditInputError(f"{what} {path}: {exc}") from None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AuditInputError(f"{path}: not readable JSON ({exc})") from None


def load_ledger_set(
    paths: list[str | Path], keys_dir: str | Path | None = None, roster: list[str] | None = None
) -> LedgerSet:
    """Ledgers from run folders (``ledgers/``), ledger folders or ``.jsonl`` files; AuditInputError if unreadable.

    A ``.jsonl`` file given on its own is an organisation's own ledger copy; the ``ledger.pub`` beside it is
    that organisation's key unless it lies inside an audited folder.
    """
    if not paths:
        raise AuditInputError("audit: name a run folder, a ledgers folder or ledger .jsonl files")
    files: list[Path] = []
    keys: dict[str, list[KeyCandidate]] = {}
    heads: dict[str, dict[str, Any]] = {}
    notes: list[str] = []
    empirical = summary = None
    folders = [Path(raw).resolve() for raw in paths if Path(raw).is_dir()]

    def add_key(org: str, path: Path, source: str) -> None:
        candidate = KeyCandidate(_load_key(path, "key"), source, from_org=not _inside(path, folders))
        keys.setdefault(org, [])
        if all(c.fingerprint != candidate.fingerprint or c.from_org != candidate.from_org for c in keys[org]):
            keys[org].append(candidate)

    given: list[str] = []
    own_copies: set[Path] = set()
    if keys_dir is not None:  # first: the keys the auditor brought outrank everything else
        folder = Path(keys_dir)
        if not folder.is_dir():
            raise AuditInputError(f"--keys {folder}: not a folder of <org>.pub files or organisation kits")
        found = _key_files(folder)
        if not found:
            raise AuditInputError(f"--keys {folder}: no <org>.pub files and no <org>/{PUBLIC_KEY_FILE}")
        for org, path in found.items():
            add_key(org, path, f"given with --keys: {path}")
            given.append(org)
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise AuditInputError(f"{path}: no such file or folder")
        if path.is_file():
            files.append(path)
            own_copies.add(path)
            org = _org_of(path, read_entries(path))
            for candidate in (path.with_suffix(".pub"), path.parent / PUBLIC_KEY_FILE):
                if candidate.exists():
                    add_key(org, candidate, f"beside the ledger copy {path}: {candidate}")
            continue
        if (path / EMPIRICAL_FILE).exists():
            empirical = _read_json(path / EMPIRICAL_FILE)
        if (path / SUMMARY_FILE).is_file():
            summary = _read_json(path / SUMMARY_FILE)
            if not isinstance(summary, dict):
                raise AuditInputError(f"{path / SUMMARY_FILE}: expected a JSON object")
        folder = path / "ledgers" if (path / "ledgers").is_dir() else path
        found = sorted(folder.glob("*.jsonl"))
        if not found and isinstance(summary, dict) and summary.get("dp_enabled") is False:
            raise NothingToAudit(
                f"{path}: this run had DP off (summary.json: dp_enabled false): it carries no privacy guarantee to"
                " audit, and its nodes kept no privacy ledger"
            )
        if not found:
            raise AuditInputError(f"{path}: no ledger files (*.jsonl) in {folder}")
        files.extend(found)
        if (folder / "keys").is_dir():
            for org, key_path in _key_files(folder / "keys").items():
                add_key(org, key_path, f"reported by the node, kept in {key_path}")
        heads_path = folder / HEADS_FILE
        if heads_path.exists():
            recorded = _read_json(heads_path)
            if not isinstance(recorded, dict):
                raise AuditInputError(f"{heads_path}: expected a JSON object of organisation -> head")
            heads.update(recorded)
    ledgers: dict[str, tuple[Path, list[dict[str, Any]] | None]] = {}
    copies: dict[str, list[tuple[Path, list[dict[str, Any]]]]] = {}
    # the audited folders' ledgers first: a file given on its own is a copy to compare them with
    for path in sorted(files, key=lambda p: p in own_copies):
        named = _named_after_its_org(path)
        entries = None if named and named not in ledgers else read_entries(path)  # None: read where it is audited
        org = named or _org_of(path, entries)
        if org in ledgers:
            copies.setdefault(org, []).append((path, entries))
        else:
            ledgers[org] = (path, entries)
    return LedgerSet(
        ledgers,
        keys,
        heads,
        copies,
        ", ".join(str(p) for p in paths),
        notes,
        empirical,
        summary,
        list(roster or []),
        given,
    )


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


def read_entries(path: Path) -> list[dict[str, Any]]:
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
