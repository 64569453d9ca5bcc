"""``fedpriv audit``: tampering of every kind is found with its position; honest ledgers pass."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedpriv.cli import main
from privacy.audit import audit, load_ledger_set
from privacy.ledger import (
    NodeLedger,
    ensure_signing_key,
    entry_hash,
    public_key_text,
    read_entries,
    sign,
)
from privacy.recompute import prv_epsilon, rdp_epsilons

SIGMA, Q, STEPS, DELTA = 1.1, 0.05, 20, 1e-5


def _dp_fields(epsilon: float, max_epsilon: float = 8.0, accountant: str = "rdp") -> dict:
    return {
        "local_steps": STEPS,
        "sample_rate": Q,
        "noise_multiplier": SIGMA,
        "max_grad_norm": 1.0,
        "delta": DELTA,
        "accountant": accountant,
        "epsilon": epsilon,
        "num_examples": 400,
        "model_digest": "ab" * 32,
        "target_epsilon": max_epsilon,
        "max_epsilon": max_epsilon,
    }


def _write_node(folder: Path, org: str, rounds: int, *, under_report: float = 1.0, max_epsilon: float = 8.0):
    """A node's ledger exactly as NodeLedger writes it, with honest (or scaled) epsilon claims."""
    key = ensure_signing_key(folder / f"{org}.key")
    ledger = NodeLedger.open(folder / org, org, key)
    truth = rdp_epsilons([(SIGMA, Q, STEPS)] * rounds, DELTA)
    for server_round, epsilon in enumerate(truth, start=1):
        ledger.append("dp_round", server_round, _dp_fields(epsilon * under_report, max_epsilon))
    return key, ledger


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """A run folder as the coordinator leaves it: ledgers/<org>.jsonl, keys/<org>.pub, heads.json."""
    nodes = tmp_path / "nodes"
    run = tmp_path / "run"
    (run / "ledgers" / "keys").mkdir(parents=True)
    heads = {}
    for org in ("org-a", "org-b"):
        key, ledger = _write_node(nodes, org, rounds=4)
        shutil.copy(ledger.path, run / "ledgers" / f"{org}.jsonl")
        (run / "ledgers" / "keys" / f"{org}.pub").write_text(public_key_text(key.public_key()))
        heads[org] = {"seq": len(ledger.entries), "hash": entry_hash(ledger.entries[-1])}
    (run / "ledgers" / "heads.json").write_text(json.dumps(heads))
    return run


def _ledger(run: Path, org: str = "org-a") -> Path:
    return run / "ledgers" / f"{org}.jsonl"


def _rewrite(path: Path, entries: list[dict]) -> None:
    path.write_text("".join(json.dumps(e, sort_keys=True) + "\n" for e in entries))


def _findings(run: Path, **kw) -> list[tuple[str, str, int | None, int | None]]:
    result = audit(load_ledger_set([run], kw.get("keys")), prv=False)
    return [(f.org, f.problem, f.position, f.seq) for org in result.orgs for f in org.findings]


def test_an_intact_run_passes_and_every_epsilon_is_recomputed(run_dir):
    result = audit(load_ledger_set([run_dir]), prv=True)
    assert result.ok, result.to_dict()["findings"]
    for org in result.orgs:
        assert org.dp_rounds == 4 and org.within_budget
        assert org.recomputed_epsilon["rdp"] == pytest.approx(org.claimed_epsilon, rel=1e-9)
        # PRV is tighter than RDP for the same mechanism, and computed from the parameters alone
        assert 0 < org.recomputed_epsilon["prv"] < org.recomputed_epsilon["rdp"]
        assert org.recomputed_epsilon["prv"] == pytest.approx(prv_epsilon([(SIGMA, Q, STEPS)] * 4, DELTA))


@pytest.mark.parametrize("field", ["epsilon", "noise_multiplier", "local_steps", "round", "max_epsilon", "org"])
def test_editing_any_field_is_found_at_its_line(run_dir, field):
    entries = read_entries(_ledger(run_dir))
    value = entries[1][field]
    entries[1][field] = "org-x" if field == "org" else (value * 2 if field != "epsilon" else value / 2)
    _rewrite(_ledger(run_dir), entries)
    found = _findings(run_dir)
    assert found == [("org-a", "edited", 2, 2)]


def test_a_deleted_entry_is_found(run_dir):
    entries = read_entries(_ledger(run_dir))
    _rewrite(_ledger(run_dir), entries[:1] + entries[2:])
    assert _findings(run_dir) == [("org-a", "deleted", None, 2)]


def test_reordered_entries_are_found(run_dir):
    entries = read_entries(_ledger(run_dir))
    entries[1], entries[2] = entries[2], entries[1]
    _rewrite(_ledger(run_dir), entries)
    assert _findings(run_dir) == [("org-a", "reordered", 3, 2)]


def test_a_truncated_ledger_is_found_from_the_coordinator_head(run_dir):
    entries = read_entries(_ledger(run_dir))
    _rewrite(_ledger(run_dir), entries[:-1])
    assert _findings(run_dir) == [("org-a", "truncated", None, 3)]


def test_a_truncated_copy_is_found_against_the_node_own_copy(run_dir, tmp_path):
    (run_dir / "ledgers" / "heads.json").unlink()  # an operator who also rewrote the heads
    entries = read_entries(_ledger(run_dir))
    _rewrite(_ledger(run_dir), entries[:-1])
    node_copy = tmp_path / "nodes" / "org-a" / "ledger.jsonl"
    result = audit(load_ledger_set([run_dir, node_copy]), prv=False)
    found = [(f.org, f.problem) for org in result.orgs for f in org.findings]
    assert found == [("org-a", "truncated")]


def test_another_organisations_entry_spliced_in_is_foreign(run_dir):
    mine, theirs = read_entries(_ledger(run_dir)), read_entries(_ledger(run_dir, "org-b"))
    _rewrite(_ledger(run_dir), mine[:2] + [theirs[2]] + mine[2:])
    assert _findings(run_dir) == [("org-a", "foreign", 3, 3)]


def test_an_entry_replaced_by_another_organisations_is_foreign_and_its_own_is_missing(run_dir):
    mine, theirs = read_entries(_ledger(run_dir)), read_entries(_ledger(run_dir, "org-b"))
    mine[2] = theirs[2]
    _rewrite(_ledger(run_dir), mine)
    assert sorted(_findings(run_dir), key=str) == sorted(
        [("org-a", "foreign", 3, 3), ("org-a", "deleted", None, 3)], key=str
    )


def test_a_node_that_under_reports_is_flagged_even_with_valid_signatures(tmp_path):
    run = tmp_path / "run"
    key, ledger = _write_node(tmp_path / "nodes", "org-a", rounds=3, under_report=0.9)
    (run / "ledgers" / "keys").mkdir(parents=True)
    shutil.copy(ledger.path, _ledger(run))
    (run / "ledgers" / "keys" / "org-a.pub").write_text(public_key_text(key.public_key()))
    found = _findings(run)
    assert [(f[1], f[2]) for f in found] == [("under_reported", 1), ("under_reported", 2), ("under_reported", 3)]


def test_a_node_past_its_budget_fails_the_budget_check(tmp_path):
    run = tmp_path / "run"
    key, ledger = _write_node(tmp_path / "nodes", "org-a", rounds=4, max_epsilon=1.0)
    (run / "ledgers" / "keys").mkdir(parents=True)
    shutil.copy(ledger.path, _ledger(run))
    (run / "ledgers" / "keys" / "org-a.pub").write_text(public_key_text(key.public_key()))
    result = audit(load_ledger_set([run]), prv=False)
    (org,) = result.orgs
    assert org.within_budget is False and not result.ok
    assert ("budget", "exceeded") in {(f.check, f.problem) for f in org.findings}


def test_a_coordinator_that_re_signs_everything_is_caught_with_the_organisations_own_keys(run_dir, tmp_path):
    forger = Ed25519PrivateKey.generate()
    entries = read_entries(_ledger(run_dir))
    # hide half of every round's steps, with epsilons and hash chain made consistent again
    truth = rdp_epsilons([(SIGMA, Q, STEPS // 2)] * len(entries), DELTA)
    forged, previous = [], entries[0]["prev_hash"]
    for entry, epsilon in zip(entries, truth, strict=True):
        forged.append(sign({**entry, "local_steps": STEPS // 2, "epsilon": epsilon, "prev_hash": previous}, forger))
        previous = entry_hash(forged[-1])
    _rewrite(_ledger(run_dir), forged)
    heads = json.loads((run_dir / "ledgers" / "heads.json").read_text())
    heads["org-a"]["hash"] = previous
    (run_dir / "ledgers" / "heads.json").write_text(json.dumps(heads))
    (run_dir / "ledgers" / "keys" / "org-a.pub").write_text(public_key_text(forger.public_key()))
    assert _findings(run_dir) == []  # trusting the keys in the run folder, the forgery is consistent...
    own_keys = tmp_path / "own-keys"
    own_keys.mkdir()
    for org in ("org-a", "org-b"):
        shutil.copy(tmp_path / "nodes" / f"{org}.pub", own_keys / f"{org}.pub")
    found = _findings(run_dir, keys=own_keys)  # ...but not against the keys the organisations hold
    assert {(f[1], f[2]) for f in found} == {("edited", n) for n in (1, 2, 3, 4)}


def test_cli_exit_codes_and_report_files(run_dir, capsys):
    assert main(["audit", str(run_dir), "--no-prv"]) == 0
    for name in ("audit.json", "audit.md", "audit.html"):
        assert (run_dir / name).stat().st_size > 0
    report = json.loads((run_dir / "audit.json").read_text())
    assert report["ok"] is True and set(report["organisations"]) == {"org-a", "org-b"}
    html = (run_dir / "audit.html").read_text()
    assert "data:image/png;base64," in html and "<script" not in html  # self-contained, no external assets
    entries = read_entries(_ledger(run_dir))
    _rewrite(_ledger(run_dir), entries[:1] + entries[2:])
    assert main(["audit", str(run_dir), "--no-prv", "--out", str(run_dir / "second")]) == 1
    assert "deleted" in capsys.readouterr().out
    assert json.loads((run_dir / "second" / "audit.json").read_text())["ok"] is False


@pytest.mark.parametrize(
    "make_input",
    [
        lambda tmp: tmp / "missing",
        lambda tmp: (tmp / "empty").mkdir() or tmp / "empty",
        lambda tmp: (
            (tmp / "ledgers").mkdir()
            or (tmp / "ledgers" / "a.jsonl").write_text("{}\n")
            or (tmp / "ledgers" / "heads.json").write_text("{not json")
            or tmp
        ),
    ],
    ids=["missing", "no-ledgers", "bad-heads"],
)
def test_unreadable_input_exits_2_with_one_line(tmp_path, capsys, make_input):
    assert main(["audit", str(make_input(tmp_path))]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err


def test_a_garbage_line_is_reported_as_malformed_not_a_crash(run_dir):
    with _ledger(run_dir).open("a") as handle:
        handle.write("this is not json\n")
    assert ("org-a", "malformed", 5, None) in _findings(run_dir)


def test_an_empirical_bound_above_the_ledgers_epsilon_fails_the_audit(run_dir):
    claimed = rdp_epsilons([(SIGMA, Q, STEPS)] * 4, DELTA)[-1]
    empirical = {
        "org": "org-a", "epsilon_lower_bound": claimed + 1.0, "confidence": 0.95, "claimed_epsilon": claimed,
        "canaries": 200, "included": 100, "guesses": 40, "correct": 40, "method": "one-run", "delta": DELTA,
    }  # fmt: skip
    (run_dir / "empirical_audit.json").write_text(json.dumps(empirical))
    result = audit(load_ledger_set([run_dir]), prv=False)
    assert not result.ok
    assert [(f.org, f.check, f.problem) for o in result.orgs for f in o.findings] == [
        ("org-a", "empirical", "contradicted")
    ]
    empirical["epsilon_lower_bound"] = claimed / 2
    (run_dir / "empirical_audit.json").write_text(json.dumps(empirical))
    assert audit(load_ledger_set([run_dir]), prv=False).ok


def test_a_prv_ledger_is_checked_against_prv_and_an_under_report_is_found_at_its_line(tmp_path):
    run = tmp_path / "run"
    key = ensure_signing_key(tmp_path / "nodes" / "org-a.key")
    ledger = NodeLedger.open(tmp_path / "nodes" / "org-a", "org-a", key)
    truth = [prv_epsilon([(SIGMA, Q, STEPS)] * r, DELTA) for r in range(1, 6)]
    for server_round, epsilon in enumerate(truth, start=1):
        claimed = epsilon * (0.95 if server_round == 3 else 1.0)
        ledger.append("dp_round", server_round, _dp_fields(claimed, accountant="prv"))
    (run / "ledgers" / "keys").mkdir(parents=True)
    shutil.copy(ledger.path, _ledger(run))
    (run / "ledgers" / "keys" / "org-a.pub").write_text(public_key_text(key.public_key()))
    result = audit(load_ledger_set([run]), prv=False)  # --no-prv still checks the claims of a PRV ledger
    assert [(f.problem, f.position) for f in result.orgs[0].findings] == [("under_reported", 3)]
    assert result.orgs[0].recomputed_epsilon["prv"] == pytest.approx(truth[-1])
    assert main(["audit", str(run), "--no-prv", "--out", str(tmp_path / "report")]) == 1
    assert "of 5 rounds" in (tmp_path / "report" / "audit.md").read_text()


REDACTION_ON = {
    "enabled": True, "rules": "fedpriv-pii", "version": "1", "digest": "cd" * 32, "kinds": ["email", "person"],
    "counts": {"email": 4, "person": 11},
}  # fmt: skip


def test_the_audit_reports_redaction_as_the_signed_entries_record_it(tmp_path):
    key = ensure_signing_key(tmp_path / "org-r.key")
    ledger = NodeLedger.open(tmp_path / "org-r", "org-r", key)
    truth = rdp_epsilons([(SIGMA, Q, STEPS)] * 3, DELTA)
    for server_round, redaction in enumerate([REDACTION_ON, REDACTION_ON, {"enabled": False}], start=1):
        ledger.append("dp_round", server_round, {**_dp_fields(truth[server_round - 1]), "redaction": redaction})
    assert all("redaction" in entry for entry in read_entries(ledger.path))  # recorded and signed with the round
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "org-r.pub").write_text(public_key_text(key.public_key()))
    (org,) = audit(load_ledger_set([ledger.path], keys), prv=False).orgs
    assert org.ok and org.redaction == {
        "status": "mixed", "dp_rounds": 3, "rounds_recorded": 3, "rounds_on": 2,
        "rule_sets": ["fedpriv-pii v1 (" + "cd" * 6 + ")"], "kinds": ["email", "person"],
        "counts": {"email": 4, "person": 11}, "share": "counts", "found": ["email", "person"],
    }  # fmt: skip
    # the record is part of what is signed: turning redaction "on" after the fact breaks the signature
    entries = read_entries(ledger.path)
    entries[2]["redaction"] = REDACTION_ON
    _rewrite(ledger.path, entries)
    (org,) = audit(load_ledger_set([ledger.path], keys), prv=False).orgs
    assert [(f.problem, f.seq) for f in org.findings] == [("edited", 3)]


def test_the_audit_reads_new_entries_that_say_only_which_kinds_were_found_or_nothing(tmp_path):
    """redaction.share (issue 26): entries of "kinds" carry ``found`` and no counts, of "none" neither; entries
    written before the setting (counts, no ``share``) read as before, in the same ledger."""
    from privacy.audit_report import markdown

    key = ensure_signing_key(tmp_path / "org-k.key")
    ledger = NodeLedger.open(tmp_path / "org-k", "org-k", key)
    spec = {k: v for k, v in REDACTION_ON.items() if k != "counts"}
    kinds = {**spec, "share": "kinds", "found": ["person"]}
    truth = rdp_epsilons([(SIGMA, Q, STEPS)] * 3, DELTA)
    for server_round, redaction in enumerate([REDACTION_ON, kinds, kinds], start=1):
        ledger.append("dp_round", server_round, {**_dp_fields(truth[server_round - 1]), "redaction": redaction})
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "org-k.pub").write_text(public_key_text(key.public_key()))
    result = audit(load_ledger_set([ledger.path], keys), prv=False)
    (org,) = result.orgs
    assert org.ok and org.redaction["status"] == "on" and org.redaction["rounds_on"] == 3
    assert org.redaction["counts"] == {} and org.redaction["share"] == "kinds" and org.redaction["found"] == ["person"]
    assert "person (kinds only)" in markdown(result)

    ledger.append("dp_round", 4, {**_dp_fields(rdp_epsilons([(SIGMA, Q, STEPS)] * 4, DELTA)[-1]),
                                  "redaction": {**spec, "share": "none"}})  # fmt: skip
    result = audit(load_ledger_set([ledger.path], keys), prv=False)
    (org,) = result.orgs
    assert org.ok and org.redaction["share"] == "none" and org.redaction["found"] == []
    assert "not shared by the organisation" in markdown(result)


def test_ledgers_from_before_redaction_was_recorded_say_so(run_dir):
    result = audit(load_ledger_set([run_dir]), prv=False)
    assert {org.org: org.redaction["status"] for org in result.orgs} == {
        "org-a": "not recorded",
        "org-b": "not recorded",
    }
    from privacy.audit_report import markdown

    assert "| org-a | not recorded | 0 of 4 | - | - |" in markdown(result)
