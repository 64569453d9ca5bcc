"""The node's ledger file and the coordinator's copy of it."""

from __future__ import annotations

import json
import os
import stat

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedpriv.kernel import protocol
from fedpriv.privacy.ledger import (
    LedgerError,
    NodeLedger,
    ensure_signing_key,
    genesis_hash,
    load_signing_key,
    public_key_text,
    read_entries,
)
from fedpriv.server.ledger_store import LedgerStore

FIELDS = {
    "local_steps": 10, "sample_rate": 0.1, "noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-5,
    "accountant": "rdp", "epsilon": 1.5, "num_examples": 100, "model_digest": "00" * 32,
    "target_epsilon": 8.0, "max_epsilon": 8.0,
}  # fmt: skip


def _ledger(tmp_path, org="org-a", rounds=3) -> NodeLedger:
    key = ensure_signing_key(tmp_path / "keys" / f"{org}.key")
    ledger = NodeLedger.open(tmp_path / org, org, key)
    for server_round in range(1, rounds + 1):
        ledger.append("dp_round", server_round, dict(FIELDS, epsilon=1.5 * server_round))
    return ledger


def _record(ledger: NodeLedger, since: int = 0) -> dict:
    return {
        protocol.LEDGER_ORG: ledger.org,
        protocol.LEDGER_PUBLIC_KEY: public_key_text(ledger.key.public_key()),
        protocol.LEDGER_ENTRIES: json.dumps(ledger.since(since)),
    }


def test_entries_are_chained_signed_and_survive_a_reopen(tmp_path):
    ledger = _ledger(tmp_path)
    first = ledger.entries[0]
    assert first["seq"] == 1 and first["prev_hash"] == genesis_hash("org-a")
    reopened = NodeLedger.open(tmp_path / "org-a", "org-a", ledger.key)
    assert reopened.entries == ledger.entries == read_entries(ledger.path)
    assert reopened.append("refusal", 4, {
        "reason": "budget", "requested_steps": 10, "epsilon": 4.5, "epsilon_if_trained": 9.0,
        "max_epsilon": 8.0, "delta": 1e-5, "accountant": "rdp",
    })["seq"] == 4  # fmt: skip


def test_a_node_never_appends_to_a_ledger_that_was_altered(tmp_path):
    ledger = _ledger(tmp_path)
    lines = ledger.path.read_text().splitlines()
    entry = json.loads(lines[1])
    entry["epsilon"] = 0.1
    lines[1] = json.dumps(entry)
    ledger.path.write_text("\n".join(lines) + "\n")
    with pytest.raises(LedgerError, match=r"ledger.jsonl:2: the signature does not verify"):
        NodeLedger.open(ledger.path.parent, "org-a", ledger.key)


def test_an_entry_missing_a_field_is_never_written(tmp_path):
    ledger = _ledger(tmp_path, rounds=0)
    with pytest.raises(ValueError, match="without epsilon"):
        ledger.append("dp_round", 1, {k: v for k, v in FIELDS.items() if k != "epsilon"})
    assert not ledger.path.exists()


def test_signing_keys_are_private_and_refused_when_readable_by_others(tmp_path):
    key_path = tmp_path / "ledger.key"
    ensure_signing_key(key_path)
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert key_path.with_suffix(".pub").read_text().startswith("-----BEGIN PUBLIC KEY-----")
    os.chmod(key_path, 0o644)
    with pytest.raises(LedgerError, match="readable by others"):
        load_signing_key(key_path)


def test_the_coordinator_keeps_new_entries_once_and_records_the_head(tmp_path):
    ledger = _ledger(tmp_path)
    store = LedgerStore(tmp_path / "run")
    assert [e["seq"] for e in store.ingest(_record(ledger), "node 1")] == [1, 2, 3]
    assert store.ingest(_record(ledger), "node 1") == []  # resent: already held
    assert json.loads(store.heads_json()) == {"org-a": 3}
    assert store.entries("org-a") == ledger.entries
    heads = json.loads((tmp_path / "run" / "ledgers" / "heads.json").read_text())
    assert heads["org-a"]["seq"] == 3
    # a restarted coordinator continues from its files
    assert json.loads(LedgerStore(tmp_path / "run").heads_json()) == {"org-a": 3}


@pytest.mark.parametrize("attack", ["other-key", "bad-signature", "gap", "not-json"])
def test_a_bad_ledger_record_is_refused_in_one_line_and_nothing_is_kept(tmp_path, attack):
    ledger = _ledger(tmp_path)
    store = LedgerStore(tmp_path / "run", warn=(warnings := []).append)
    store.ingest(_record(ledger, since=0) | {protocol.LEDGER_ENTRIES: json.dumps(ledger.entries[:1])}, "node 1")
    record = _record(ledger, since=1)
    if attack == "other-key":
        record[protocol.LEDGER_PUBLIC_KEY] = public_key_text(Ed25519PrivateKey.generate().public_key())
    elif attack == "bad-signature":
        entries = ledger.since(1)
        entries[0]["epsilon"] = 0.0
        record[protocol.LEDGER_ENTRIES] = json.dumps(entries)
    elif attack == "gap":
        record[protocol.LEDGER_ENTRIES] = json.dumps(ledger.since(2))
    else:
        record[protocol.LEDGER_ENTRIES] = "{not json"
    assert store.ingest(record, "node 1") == []
    assert len(warnings) == 1 and "\n" not in warnings[0] and warnings[0].startswith("ledger from node 1: refused")
    assert [e["seq"] for e in store.entries("org-a")] == [1]
