"""``fedpriv audit``: tampering of every kind is found with its position; honest ledgers pass."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from dp_accounting.dp_event import GaussianDpEvent, PoissonSampledDpEvent
from dp_accounting.pld.pld_privacy_accountant import PLDAccountant
from dp_accounting.rdp.rdp_privacy_accountant import RdpAccountant

from fedpriv.cli import main
from fedpriv.privacy.audit import audit, load_ledger_set
from fedpriv.privacy.ledger import (
    NodeLedger,
    ensure_signing_key,
    entry_hash,
    public_key_text,
    read_entries,
    sign,
)
from fedpriv.privacy.recompute import prv_epsilon, rdp_epsilons

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
    (run / "summary.json").write_text(json.dumps(_summary(tmp_path / "nodes", ("org-a", "org-b"))))
    return run


def _summary(nodes: Path, orgs: tuple[str, ...]) -> dict:
    """summary.json's privacy figures as the coordinator writes them from the nodes' reports."""
    privacy, rounds = {}, {}
    for org in orgs:
        entries = read_entries(nodes / org / "ledger.jsonl")
        last = entries[-1]
        privacy[org] = {
            "dp_enabled": True, "steps": sum(e["local_steps"] for e in entries), "planned_steps": 80,
            **{k: last[k] for k in ("epsilon", "delta", "target_epsilon", "noise_multiplier", "sample_rate",
                                     "accountant", "max_grad_norm", "max_epsilon")},
        }  # fmt: skip
        for e in entries:
            record = rounds.setdefault(e["round"], {"round": e["round"], "epsilon": {}, "trained_orgs": []})
            record["epsilon"][org] = e["epsilon"]
            record["trained_orgs"].append(org)
    final = {**rounds[max(rounds)], "accuracy": 0.5}
    return {"dp_enabled": True, "privacy": privacy, "rounds": list(rounds.values()), "final": final}


def _ledger(run: Path, org: str = "org-a") -> Path:
    return run / "ledgers" / f"{org}.jsonl"


def _rewrite(path: Path, entries: list[dict]) -> None:
    path.write_text("".join(json.dumps(e, sort_keys=True) + "\n" for e in entries))


def _findings(run: Path, **kw) -> list[tuple[str, str, int | None, int | None]]:
    """The ledgers' own findings (summary.json's disagreement with a damaged ledger is tested on its own)."""
    result = audit(load_ledger_set([run], kw.get("keys")), pld=False)
    found = [f for org in result.orgs for f in org.findings if f.check != "summary"]
    return [(f.org, f.problem, f.position, f.seq) for f in found]


def test_an_intact_run_passes_and_every_epsilon_is_recomputed_by_a_second_implementation(run_dir):
    result = audit(load_ledger_set([run_dir]), pld=True)
    assert result.ok, result.to_dict()["findings"]
    accountant = RdpAccountant()  # dp-accounting's own defaults, composed here without fedpriv's code
    accountant.compose(PoissonSampledDpEvent(Q, GaussianDpEvent(SIGMA)), STEPS * 4)
    pld = PLDAccountant()
    pld.compose(PoissonSampledDpEvent(Q, GaussianDpEvent(SIGMA)), STEPS * 4)
    for org in result.orgs:
        assert org.dp_rounds == 4 and org.within_budget and org.recomputed_with == "dp-accounting"
        # Opacus's claim and dp-accounting's RDP agree to the two implementations' difference
        assert org.recomputed_epsilon["rdp"] == pytest.approx(org.claimed_epsilon, rel=1e-3)
        assert org.recomputed_epsilon["rdp"] <= accountant.get_epsilon(DELTA) * (1 + 1e-12)
        # PLD is tighter than RDP for the same mechanism, and computed from the parameters alone
        assert 0 < org.recomputed_epsilon["pld"] < org.recomputed_epsilon["rdp"]
        assert org.recomputed_epsilon["pld"] == pytest.approx(pld.get_epsilon(DELTA), rel=1e-9)
        assert org.recomputed_epsilon["prv"] is None  # fedpriv-audit/1's field, no longer computed
    assert result.to_dict()["format"] == "fedpriv-audit/2"


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
    found = [(f.org, f.problem) for org in result.orgs for f in org.findings if f.check != "summary"]
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


def _forge_with_a_new_key(run: Path, changes: list[dict], org: str = "org-a") -> None:
    """Every entry of ``org``'s ledger changed and re-signed with a new key, chain, head and folder key to match."""
    forger = Ed25519PrivateKey.generate()
    entries = read_entries(_ledger(run, org))
    forged, previous = [], entries[0]["prev_hash"]
    for entry, change in zip(entries, changes, strict=True):
        forged.append(sign({**entry, **change, "prev_hash": previous}, forger))
        previous = entry_hash(forged[-1])
    _rewrite(_ledger(run, org), forged)
    heads = json.loads((run / "ledgers" / "heads.json").read_text())
    heads[org]["hash"] = previous
    (run / "ledgers" / "heads.json").write_text(json.dumps(heads))
    (run / "ledgers" / "keys" / f"{org}.pub").write_text(public_key_text(forger.public_key()))


def test_a_coordinator_that_re_signs_everything_is_caught_with_the_organisations_own_keys(run_dir, tmp_path):
    # hide half of every round's steps (an epoch of half the batches), with epsilons and hash chain made consistent
    truth = rdp_epsilons([(SIGMA, 2 * Q, STEPS // 2)] * 4, DELTA)
    _forge_with_a_new_key(run_dir, [{"local_steps": STEPS // 2, "sample_rate": 2 * Q, "epsilon": e} for e in truth])
    assert _findings(run_dir) == []  # trusting the keys in the run folder, the forgery is consistent...
    own_keys = tmp_path / "own-keys"
    own_keys.mkdir()
    for org in ("org-a", "org-b"):
        shutil.copy(tmp_path / "nodes" / f"{org}.pub", own_keys / f"{org}.pub")
    found = _findings(run_dir, keys=own_keys)  # ...but not against the keys the organisations hold
    assert {(f[1], f[2]) for f in found} == {("edited", n) for n in (1, 2, 3, 4)} | {("substituted", None)}


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
    # dp-accounting's PLD, next to Opacus's PRV upper bound (eps_error 0.01)
    assert result.orgs[0].recomputed_epsilon["pld"] == pytest.approx(truth[-1], abs=0.02)
    assert result.orgs[0].recomputed_epsilon["pld"] <= truth[-1]
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
    from fedpriv.privacy.audit_report import markdown

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
    from fedpriv.privacy.audit_report import markdown

    assert "| org-a | not recorded | 0 of 4 | - | - |" in markdown(result)


# --------------------------------------------------------------------------- issue 26: tampered runs that passed


def _resign(path: Path, key, change: dict, at: int) -> None:
    """Entry ``at`` (0-based) changed and re-signed with ``key``, and the chain after it re-linked and re-signed."""
    entries = read_entries(path)
    previous = entries[at - 1] if at else None
    out = entries[:at]
    for index in range(at, len(entries)):
        body = {**entries[index], **(change if index == at else {})}
        body["prev_hash"] = entry_hash(previous) if previous is not None else body["prev_hash"]
        previous = sign(body, key)
        out.append(previous)
    _rewrite(path, out)


def _org_key(run: Path, org: str):
    from fedpriv.privacy.ledger import load_signing_key

    return load_signing_key(run.parent / "nodes" / f"{org}.key")


def _problems(result) -> set[tuple[str, str, str]]:
    return {(f.org, f.check, f.problem) for org in result.orgs for f in org.findings}


def _own_keys(tmp_path: Path, orgs=("org-a", "org-b")) -> Path:
    folder = tmp_path / "own-keys"
    folder.mkdir(exist_ok=True)
    for org in orgs:
        shutil.copy(tmp_path / "nodes" / f"{org}.pub", folder / f"{org}.pub")
    return folder


@pytest.mark.parametrize("with_keys", [False, True], ids=["folder-keys", "own-keys"])
def test_an_organisation_deleted_from_ledgers_keys_and_heads_is_missing(run_dir, tmp_path, with_keys):
    (run_dir / "ledgers" / "org-b.jsonl").unlink()
    (run_dir / "ledgers" / "keys" / "org-b.pub").unlink()
    heads = json.loads((run_dir / "ledgers" / "heads.json").read_text())
    del heads["org-b"]
    (run_dir / "ledgers" / "heads.json").write_text(json.dumps(heads))
    result = audit(load_ledger_set([run_dir], _own_keys(tmp_path) if with_keys else None), pld=False)
    assert not result.ok and _problems(result) == {("org-b", "roster", "missing")}
    assert main(["audit", str(run_dir), "--no-pld", "--out", str(tmp_path / "report")]) == 1


def test_an_organisation_missing_from_the_provisioning_roster_is_found(run_dir):
    result = audit(load_ledger_set([run_dir], roster=["org-a", "org-b", "org-c"]), pld=False)
    assert _problems(result) == {("org-c", "roster", "missing")}


def test_a_summary_epsilon_lowered_below_the_ledgers_is_a_mismatch(run_dir, tmp_path):
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["privacy"]["org-a"]["epsilon"] = 0.5
    (run_dir / "summary.json").write_text(json.dumps(summary))
    result = audit(load_ledger_set([run_dir]), pld=False)
    assert _problems(result) == {("org-a", "summary", "mismatch")}
    (finding,) = result.orgs[0].findings
    assert "privacy.org-a.epsilon is 0.5" in finding.message
    summary["privacy"]["org-a"]["epsilon"] = read_entries(_ledger(run_dir))[-1]["epsilon"]
    summary["rounds"][1]["epsilon"]["org-b"] = 0.1  # a round's figure, too
    (run_dir / "summary.json").write_text(json.dumps(summary))
    assert _problems(audit(load_ledger_set([run_dir]), pld=False)) == {("org-b", "summary", "mismatch")}


def test_an_organisation_whose_reply_was_lost_keeps_its_last_figure_in_that_rounds_record(run_dir):
    """Its node trained and signed the round (the entry arrives with a later reply); the round's record has the
    figure the coordinator last had: not a mismatch."""
    summary = json.loads((run_dir / "summary.json").read_text())
    record = summary["rounds"][2]
    record["trained_orgs"].remove("org-b")
    record["epsilon"]["org-b"] = summary["rounds"][1]["epsilon"]["org-b"]
    (run_dir / "summary.json").write_text(json.dumps(summary))
    assert audit(load_ledger_set([run_dir]), pld=False).ok


def test_an_entry_re_signed_with_the_real_key_and_delta_one_half_fails(run_dir):
    _resign(_ledger(run_dir), _org_key(run_dir, "org-a"), {"delta": 0.5, "num_examples": 366}, at=1)
    result = audit(load_ledger_set([run_dir]), pld=True)
    org = result.orgs[0]
    assert ("org-a", "fields", "malformed") in _problems(result) and not result.ok
    assert any("delta 0.5 is not below 1/n" in f.message and f.seq == 2 for f in org.findings)
    assert all(value is None or value >= 0 for value in org.recomputed_epsilon.values())


def test_an_entry_re_signed_with_local_steps_cut_fails(run_dir):
    _resign(_ledger(run_dir), _org_key(run_dir, "org-a"), {"local_steps": 4}, at=2)
    result = audit(load_ledger_set([run_dir]), pld=False)
    found = _problems(result)
    assert ("org-a", "fields", "malformed") in found  # 4 steps is not a whole epoch of 20 (q = 1/20)
    assert any("local_steps 4 is not a whole number of epochs" in f.message for f in result.orgs[0].findings)


def test_local_steps_that_disagree_with_the_recorded_local_epochs_fail(tmp_path):
    key = ensure_signing_key(tmp_path / "org-e.key")
    ledger = NodeLedger.open(tmp_path / "org-e", "org-e", key)
    claims = rdp_epsilons([(SIGMA, Q, STEPS)] * 2, DELTA)
    ledger.append("dp_round", 1, {**_dp_fields(claims[0]), "local_epochs": 1})
    ledger.append("dp_round", 2, {**_dp_fields(claims[1]), "local_epochs": 2})  # 2 epochs would be 40 steps
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "org-e.pub").write_text(public_key_text(key.public_key()))
    (org,) = audit(load_ledger_set([ledger.path], keys), pld=False).orgs
    assert [(f.problem, f.seq) for f in org.findings] == [("malformed", 2)]
    assert "not local_epochs 2 x 20" in org.findings[0].message


@pytest.mark.parametrize(
    "change, message",
    [
        ({"sample_rate": 0.001}, "below 1/n"),  # 1,000 batches an epoch from 400 examples
        ({"sample_rate": 0.03}, "not 1/k"),
        ({"noise_multiplier": 0}, "noise_multiplier 0 is not a number > 0"),
        ({"epsilon": -1.0}, "epsilon -1.0 is not a finite number >= 0"),
    ],
)
def test_impossible_parameters_signed_by_the_organisation_fail(run_dir, change, message):
    _resign(_ledger(run_dir), _org_key(run_dir, "org-a"), change, at=0)
    result = audit(load_ledger_set([run_dir]), pld=False)
    assert any(message in f.message and f.seq == 1 for f in result.orgs[0].findings), result.orgs[0].findings


def test_a_ledger_re_signed_with_a_new_key_is_caught_with_the_organisations_own_copy(run_dir, tmp_path):
    """The README's `fedpriv audit RUN node/ledger.jsonl`: the node's copy and its ledger.pub outrank the folder."""
    truth = rdp_epsilons([(2.0, Q, STEPS)] * 4, DELTA)  # sigma 2.0, consistent epsilons
    _forge_with_a_new_key(run_dir, [{"noise_multiplier": 2.0, "epsilon": e} for e in truth])
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["privacy"]["org-a"].update(noise_multiplier=2.0, epsilon=truth[-1])
    for record, epsilon in zip(summary["rounds"], truth, strict=True):
        record["epsilon"]["org-a"] = epsilon
    summary["final"]["epsilon"]["org-a"] = truth[-1]
    (run_dir / "summary.json").write_text(json.dumps(summary))
    assert audit(load_ledger_set([run_dir]), pld=False).checks_hold  # self-consistent on its own keys...
    node = tmp_path / "nodes" / "org-a"
    (node / "ledger.pub").write_text((tmp_path / "nodes" / "org-a.pub").read_text())  # the kit's ledger.pub
    result = audit(load_ledger_set([run_dir, node / "ledger.jsonl"]), pld=False)
    found = _problems(result)
    assert ("org-a", "key", "substituted") in found and ("org-a", "signature", "edited") in found
    (org,) = [o for o in result.orgs if o.org == "org-a"]
    assert org.key_source.startswith("beside the ledger copy") and org.key_trust == "the organisation's own key"


def test_an_organisations_copy_that_does_not_verify_is_a_finding_never_dropped(run_dir, tmp_path):
    stranger = Ed25519PrivateKey.generate()
    copy = tmp_path / "copy" / "ledger.jsonl"
    copy.parent.mkdir()
    _rewrite(copy, [sign(entry, stranger) for entry in read_entries(_ledger(run_dir))])
    result = audit(load_ledger_set([run_dir, copy]), pld=False)
    assert ("org-a", "key", "copy_unverified") in _problems(result)


def test_trust_on_first_use_is_said_first_and_strict_fails_it(run_dir, tmp_path, capsys):
    result = audit(load_ledger_set([run_dir]), pld=False)
    assert result.ok and result.tofu == ["org-a", "org-b"]
    assert "TRUST ON FIRST USE" in result.verdict()
    assert main(["audit", str(run_dir), "--no-pld"]) == 0
    assert "TRUST ON FIRST USE" in capsys.readouterr().out.splitlines()[0]
    assert "TRUST ON FIRST USE" in (run_dir / "audit.md").read_text().split("\n## ")[0]
    assert main(["audit", str(run_dir), "--no-pld", "--strict"]) == 1
    capsys.readouterr()
    assert main(["audit", str(run_dir), "--no-pld", "--strict", "--keys", str(_own_keys(tmp_path))]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert "TRUST ON FIRST USE" not in first and "its organisation's own key" in first
    # keys copied into the audited folder are still the folder's
    inside = run_dir / "auditor-keys"
    shutil.copytree(_own_keys(tmp_path), inside)
    assert audit(load_ledger_set([run_dir], inside), pld=False).tofu == ["org-a", "org-b"]


def test_keys_may_come_from_the_organisations_kits(run_dir, tmp_path):
    kits = tmp_path / "kits"
    for org in ("org-a", "org-b"):
        (kits / org).mkdir(parents=True)
        shutil.copy(tmp_path / "nodes" / f"{org}.pub", kits / org / "ledger.pub")
    result = audit(load_ledger_set([run_dir], kits), pld=False, strict=True)
    assert result.ok and not result.tofu


def test_the_independent_recomputation_runs_without_opacus(run_dir):
    """The second accountant is dp-accounting's code: an honest audit never loads Opacus's analyses."""
    import subprocess
    import sys

    probe = (
        "import sys; from fedpriv.privacy.audit import audit, load_ledger_set;"
        f"r = audit(load_ledger_set([{str(run_dir)!r}]), pld=True); assert r.ok;"
        "print(sorted(m for m in sys.modules if 'opacus' in m))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_a_recomputation_that_fails_fails_the_check(run_dir, monkeypatch):
    from fedpriv.privacy import independent

    def refuse(events, delta):
        raise independent.RecomputationError("refused for the test")

    monkeypatch.setattr(independent, "rdp_epsilons", refuse)
    result = audit(load_ledger_set([run_dir]), pld=False)
    assert ("org-a", "epsilon", "not_recomputable") in _problems(result) and not result.ok


def test_a_round_that_stopped_on_a_non_finite_loss_may_hold_part_of_an_epoch_and_only_then():
    """A node that diverged mid-round records the steps it took (``stopped: diverged``, issue 27)."""
    from fedpriv.privacy.audit_entries import parameter_problems

    entry = {
        "kind": "dp_round", "noise_multiplier": 1.0, "sample_rate": 0.25, "local_steps": 3, "num_examples": 40,
        "delta": 1e-5, "epsilon": 1.0, "local_epochs": 1,
    }  # fmt: skip
    assert any("whole number of epochs" in p for p in parameter_problems(entry))
    assert parameter_problems({**entry, "stopped": "diverged"}) == []
    assert parameter_problems({**entry, "stopped": "diverged", "local_steps": 5})  # more than the round's 4 steps
    assert parameter_problems({**entry, "stopped": "diverged", "local_steps": 0})  # nothing taken: no entry


def test_a_run_with_dp_off_says_in_one_line_that_there_is_no_guarantee_to_audit(tmp_path, capsys):
    # what a DP-off run leaves: its summary and no ledgers (its nodes keep no privacy ledger)
    (tmp_path / "summary.json").write_text(json.dumps({"dp_enabled": False, "status": "completed", "privacy": {}}))
    assert main(["audit", str(tmp_path)]) == 3
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err == (
        f"error: {tmp_path}: this run had DP off (summary.json: dp_enabled false): it carries no privacy guarantee"
        " to audit, and its nodes kept no privacy ledger"
    )
    assert not (tmp_path / "audit.json").exists()
    (tmp_path / "summary.json").write_text(json.dumps({"dp_enabled": True}))  # a DP run without ledgers: unreadable
    assert main(["audit", str(tmp_path)]) == 2
    assert "no ledger files (*.jsonl)" in capsys.readouterr().err
