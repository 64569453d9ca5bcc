"""A ledger append that a full disk stops: it fails loudly and leaves the ledger as it was, never a torn line."""

from __future__ import annotations

import json

import pytest

from fedpriv.kernel.errors import DiskError
from fedpriv.privacy.ledger import NodeLedger, ensure_signing_key, read_entries
from fedpriv.server.ledger_store import LedgerStore
from tests.disk_faults import fill, tmpfs
from tests.privacy.test_ledger import FIELDS, _ledger, _record

BIG = {"redaction": {"note": "x" * 9000}}  # an entry larger than what is left of the file's last page


def test_a_node_append_on_a_full_disk_fails_in_one_line_and_leaves_no_torn_line(tmp_path):
    key = ensure_signing_key(tmp_path / "keys" / "org-a.key")
    with tmpfs(tmp_path / "state", size="256k") as state:
        ledger = NodeLedger.open(state, "org-a", key)
        for server_round in (1, 2):
            ledger.append("dp_round", server_round, dict(FIELDS))
        before = ledger.path.read_bytes()
        filler = fill(state)
        with pytest.raises(DiskError) as caught:
            ledger.append("dp_round", 3, dict(FIELDS, **BIG))
        assert str(caught.value) == f"cannot write {ledger.path}: [Errno 28] No space left on device"
        assert ledger.path.read_bytes() == before  # nothing of the failed entry, not even part of a line
        assert len(ledger.entries) == 2
        assert len(NodeLedger.open(state, "org-a", key).entries) == 2  # the chain still verifies
        filler.unlink()
        entry = ledger.append("dp_round", 3, dict(FIELDS, **BIG))
        assert entry["seq"] == 3 and len(NodeLedger.open(state, "org-a", key).entries) == 3


def test_the_coordinator_copy_on_a_full_disk_stops_the_run_instead_of_skipping_the_entries(tmp_path):
    ledger = _ledger(tmp_path, rounds=1)
    with tmpfs(tmp_path / "run", size="256k") as run:
        store = LedgerStore(run)
        store.ingest(_record(ledger), "node 1")
        copy = run / "ledgers" / "org-a.jsonl"
        before = copy.read_bytes()
        for server_round in (2, 3, 4):
            ledger.append("dp_round", server_round, dict(FIELDS, **BIG))
        fill(run)
        with pytest.raises(DiskError, match=r"org-a\.jsonl: \[Errno 28\]"):  # not a warning: the run must stop
            store.ingest(_record(ledger, since=1), "node 1")
        assert copy.read_bytes() == before
        assert json.loads(store.heads_json()) == {"org-a": 1}


def test_a_head_that_cannot_be_recorded_takes_the_copied_entries_back_out(tmp_path, monkeypatch):
    from fedpriv.server import ledger_store

    ledger = _ledger(tmp_path, rounds=1)
    store = LedgerStore(tmp_path / "run")
    store.ingest(_record(ledger), "node 1")
    copy = tmp_path / "run" / "ledgers" / "org-a.jsonl"
    before = copy.read_bytes()
    ledger.append("dp_round", 2, dict(FIELDS))
    real_write = ledger_store.atomic_files.write_text

    def full_disk_for_heads(path, text, mode=None):
        if path.name == "heads.json":
            raise DiskError(f"cannot write {path}: [Errno 28] No space left on device")
        return real_write(path, text, mode)

    monkeypatch.setattr(ledger_store.atomic_files, "write_text", full_disk_for_heads)
    with pytest.raises(DiskError, match="heads.json"):
        store.ingest(_record(ledger, since=1), "node 1")
    assert copy.read_bytes() == before and json.loads(store.heads_json()) == {"org-a": 1}
    monkeypatch.setattr(ledger_store.atomic_files, "write_text", real_write)
    assert [e["seq"] for e in store.ingest(_record(ledger, since=1), "node 1")] == [2]  # once, not twice
    assert [e["seq"] for e in read_entries(copy)] == [1, 2]
