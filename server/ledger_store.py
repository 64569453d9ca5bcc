"""The coordinator's copy of every organisation's privacy ledger, in the run folder.

Nodes send the signed entries the coordinator does not hold yet with each
reply. Each one is checked before it is kept: it must be the next in its
organisation's chain and verify with the key that organisation first
reported (a changed key is refused). Kept entries are appended to
``ledgers/<org>.jsonl`` and fsynced; ``ledgers/heads.json`` records each
chain's last (seq, hash) so a later cut is visible; ``ledgers/keys/<org>.pub``
holds the reported keys. A bad record is reported in one line and skipped,
never fatal: the run goes on, the auditor sees the gap.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedpriv.kernel import atomic_files, protocol
from fedpriv.kernel.node_config import ORG_NAME
from fedpriv.privacy.ledger import (
    LedgerError,
    append_lines,
    entry_hash,
    genesis_hash,
    key_fingerprint,
    load_public_key,
    public_key_text,
    read_entries,
    signature_valid,
)

LEDGERS_DIR = "ledgers"
HEADS_FILE = "heads.json"
KEYS_DIR = "keys"
log = logging.getLogger("fedpriv.server")


class LedgerStore:
    """Per-organisation ledger copies under ``run_dir/ledgers``."""

    def __init__(self, run_dir: Path, warn: Callable[[str], None] | None = None):
        self.folder = Path(run_dir) / LEDGERS_DIR
        self.warn = warn or (lambda line: log.warning(line))
        self.heads: dict[str, dict[str, Any]] = {}
        self.keys: dict[str, Any] = {}
        heads_path = self.folder / HEADS_FILE
        if heads_path.exists():  # a resumed coordinator continues its copies
            self.heads = json.loads(heads_path.read_text(encoding="utf-8"))
            for org in self.heads:
                key_path = self.folder / KEYS_DIR / f"{org}.pub"
                if key_path.exists():
                    self.keys[org] = load_public_key(key_path)

    def heads_json(self) -> str:
        """``{org: seq}`` for the server's messages: each node sends what comes after."""
        return json.dumps({org: head["seq"] for org, head in sorted(self.heads.items())}, sort_keys=True)

    def ingest(self, record: Any, source: str) -> list[dict[str, Any]]:
        """Keep the valid new entries of one reply's LEDGER record; returns them (problems are warned)."""
        try:
            return self._ingest(dict(record), source)
        except (LedgerError, ValueError, TypeError, KeyError) as exc:
            self.warn(f"ledger from {source}: refused ({' '.join(str(exc).split())})")
            return []

    def _ingest(self, record: dict[str, Any], source: str) -> list[dict[str, Any]]:
        org = str(record.get(protocol.LEDGER_ORG, ""))
        if not ORG_NAME.fullmatch(org):
            raise ValueError(f"organisation name {org!r} is not valid")
        key = load_public_key(str(record.get(protocol.LEDGER_PUBLIC_KEY, "")).encode())
        known = self.keys.get(org)
        if known is not None and public_key_text(known) != public_key_text(key):
            raise ValueError(
                f"'{org}' reported a different ledger key ({key_fingerprint(key)}) than before"
                f" ({key_fingerprint(known)}); its entries are not kept"
            )
        entries = json.loads(str(record.get(protocol.LEDGER_ENTRIES, "[]")))
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise ValueError("entries: expected a JSON array of objects")
        head = self.heads.get(org, {"seq": 0, "hash": genesis_hash(org)})
        kept = []
        for entry in entries:
            seq = entry.get("seq")
            if not isinstance(seq, int) or seq <= head["seq"]:
                continue  # already held (a resent entry)
            if seq != head["seq"] + 1 or entry.get("prev_hash") != head["hash"] or entry.get("org") != org:
                raise ValueError(
                    f"'{org}' entry {seq} does not follow the held chain (held up to {head['seq']}):"
                    " the node's ledger diverged from what it reported"
                )
            if not signature_valid(entry, key):
                raise ValueError(f"'{org}' entry {seq}: the signature does not verify with the organisation's key")
            kept.append(entry)
            head = {"seq": seq, "hash": entry_hash(entry), "round": entry.get("round"), "kind": entry.get("kind")}
        if known is None:
            self.keys[org] = key
            atomic_files.write_text(self.folder / KEYS_DIR / f"{org}.pub", public_key_text(key))
        if kept:
            path = self.folder / f"{org}.jsonl"
            size = path.stat().st_size if path.exists() else 0
            append_lines(path, kept)  # all or nothing; a failure stops the run (DiskError is not a refusal)
            previous = self.heads.get(org)
            self.heads[org] = head
            try:
                self._write_heads()
            except Exception:  # the copy and heads.json must agree: take the entries back out (the node resends)
                os.truncate(path, size)
                if previous is None:
                    self.heads.pop(org)
                else:
                    self.heads[org] = previous
                raise
        return kept

    def _write_heads(self) -> None:
        atomic_files.write_text(self.folder / HEADS_FILE, json.dumps(self.heads, indent=2, sort_keys=True))

    def entries(self, org: str) -> list[dict[str, Any]]:
        return read_entries(self.folder / f"{org}.jsonl")
