"""End to end: identifiers planted in one organisation's text never reach training, a message, or a run file.

One organisation ("hospital") gets sentences carrying unique fake identifiers
of every kind. After a short DP simulation with redaction on, no file the run
wrote holds any of them (summary, ledgers, node state, checkpoints, exported
model, audit files), the node's tokenised training and test inputs do not
contain their token sequences, and the replies the node sends (run here with
the same ClientApp handlers, serialised as Flower sends them) do not either.
With ``redaction.share: counts`` the counts per kind reach summary.json,
every ledger entry and the audit report; the exported model names the rules and `fedpriv predict` applies them.
"""

from __future__ import annotations

import csv
import json
import random
import subprocess
import sys

import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.serde import recorddict_to_proto

from fedpriv.client.client_app import handle_evaluate, handle_train
from fedpriv.client.node import fresh_model, local_node
from fedpriv.data.corpora import load_bbc_news
from fedpriv.data.partitioning import plan_partitions
from fedpriv.kernel import protocol
from fedpriv.kernel.config import load_config
from fedpriv.privacy.person_names import census_names
from fedpriv.shared_models.builder import build_tokenizer
from fedpriv.shared_models.weights import trainable_arrays
from tests.shared_runs import simulate

pytestmark = pytest.mark.integration


def _luhn(digits: str) -> str:
    """``digits`` + the Luhn check digit (a payment card number that passes validation)."""
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = int(char) * (2 if index % 2 == 0 else 1)
        total += value - 9 if value > 9 else value
    return digits + str((10 - total % 10) % 10)


def _nhs(nine: str) -> str:
    """An NHS number: nine digits + the modulus 11 check digit (chosen so that it is not 10)."""
    check = 11 - sum(int(d) * w for d, w in zip(nine, range(10, 1, -1), strict=True)) % 11
    assert check != 10
    return f"{nine[:3]} {nine[3:6]} {nine[6:]}{0 if check == 11 else check}"


CARD = _luhn("491633801122334")
# kind -> (the identifier as planted, a sentence carrying it); each identifier occurs nowhere else
PLANTED = {
    "email": ("tessaly.okonkwo@riverside-health-example.org", "Write to {} about the results."),
    "phone": ("020 7946 0374", "The ward phone is {} for relatives."),
    "url": ("https://portal.riverside-health-example.org/chart/55210", "The chart is at {} today."),
    "ip_address": ("198.51.100.23", "The scan uploaded from {} overnight."),
    "payment_card": (f"{CARD[:4]} {CARD[4:8]} {CARD[8:12]} {CARD[12:]}", "Parking was paid with card {} on arrival."),
    "bank_account": ("GB29 NWBK 6016 1331 9268 19", "Refunds go to IBAN {} within a week."),
    "national_id": (_nhs("401023213"), "Her NHS number {} was checked at admission."),
    "date_of_birth": ("2 August 1961", "The patient, born {}, was seen by the team."),
    "handle": ("@tessaly_okonkwo61", "She posted as {} about the long wait."),
    "person": ("Harriet Pemberton", "{} was discharged after two days on the ward."),
}


@pytest.fixture(scope="module")
def redacted_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("redaction")
    texts, labels = load_bbc_news()
    first, last, _ = census_names()
    assert "Harriet" in first and "Pemberton" in last  # the planted name is findable offline
    rows = []
    chosen = random.Random(0).sample(range(len(texts)), 240)  # the corpus is sorted by class
    for index, (text, label) in enumerate((texts[i], labels[i]) for i in chosen):
        org = ("hospital", "bank", "school")[index % 3]
        excerpt = " ".join(text.split()[:40])
        if org == "hospital" and index // 3 < 3 * len(PLANTED):  # each identifier in three training candidates
            identifier, sentence = list(PLANTED.values())[(index // 3) % len(PLANTED)]
            excerpt = sentence.format(identifier) + " " + excerpt
        rows.append({"text": excerpt, "label": label, "org": org})
    data = cwd / "orgs.csv"
    with open(data, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["text", "label", "org"])
        writer.writeheader()
        writer.writerows(rows)
    overrides = [
        "model.name=tiny",
        "data.source=file",
        f"data.path={data}",
        "partitioning.scheme=natural",
        "partitioning.column=org",
        "partitioning.num_orgs=3",
        "training.rounds=2",
        "training.batch_size=16",
        "data.max_length=64",
        "redaction.enabled=true",
        "redaction.share=counts",  # the organisations share their counts here (default: only the kinds found)
    ]
    proc, run = simulate(cwd, *overrides)
    assert "Redaction ON before tokenisation (rules fedpriv-pii" in proc.stdout  # said before training starts
    assert "Redacted before tokenisation" in proc.stdout and "email 3" in proc.stdout.split("  hospital: ")[-1]
    return cwd, run, load_config(overrides=overrides)


def _forms(identifier: str) -> list[bytes]:
    """How an identifier could sit in a file: as written, lower-cased (uncased tokenizers), digits run together."""
    forms = {identifier, identifier.lower()}
    digits = "".join(c for c in identifier if c.isdigit())
    if len(digits) >= 8:
        forms.add(digits)
    return [form.encode() for form in forms]


def _holds_sequence(rows, sequence: list[int]) -> bool:
    return any(row[i : i + len(sequence)] == sequence for row in rows for i in range(len(row) - len(sequence) + 1))


def test_planted_identifiers_are_in_no_file_the_run_writes_and_counted_everywhere(redacted_run):
    _, run, _ = redacted_run
    files = [path for path in run.rglob("*") if path.is_file()]
    assert any(path.name == "ledger.jsonl" for path in files) and (run / "model" / "merged").is_dir()
    for kind, (identifier, _) in PLANTED.items():
        for path in files:
            content = path.read_bytes()
            for form in _forms(identifier):
                assert form not in content, f"{kind} identifier {form!r} found in {path}"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed"
    hospital = summary["redaction"]["hospital"]
    assert hospital["enabled"] is True and hospital["rules"] == "fedpriv-pii" and hospital["version"]
    for kind in PLANTED:
        assert hospital["counts"][kind] >= 3, (kind, hospital["counts"])  # each planted in three rows
    assert set(summary["redaction"]) == {"hospital", "bank", "school"}
    entries = [json.loads(line) for line in (run / "nodes" / "hospital" / "ledger.jsonl").read_text().splitlines()]
    assert [e["kind"] for e in entries] == ["dp_round", "dp_round"]
    assert all(e["redaction"] == hospital for e in entries)  # the rule set and counts, signed with the round


def test_the_node_tokenised_inputs_and_its_messages_hold_none_of_them(redacted_run, tmp_path, monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_node_id", 1), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)
    _, _, cfg = redacted_run
    plan = plan_partitions(cfg)
    partition = next(pid for pid in range(cfg.partitioning.num_orgs) if plan.org(pid).name == "hospital")
    raw = plan.org(partition)
    planted_rows = sum(any(identifier in text for identifier, _ in PLANTED.values()) for text in raw.train.texts)
    assert planted_rows >= len(PLANTED), "the hospital's raw training text should hold the planted identifiers"
    context = Context(run_id=1, node_id=1, node_config={"partition-id": partition}, state=RecordDict(), run_config={})
    node = local_node(cfg, context)
    tokenizer = build_tokenizer(cfg.model.name)
    rows = [ids.tolist() for ids in [*node.train.input_ids, *node.test.input_ids]]
    unredacted = tokenizer([*raw.train.texts, *raw.test.texts], truncation=True, max_length=cfg.data.max_length)
    for kind, (identifier, _) in PLANTED.items():
        sequence = tokenizer(identifier, add_special_tokens=False)["input_ids"]
        assert _holds_sequence(unredacted["input_ids"], sequence), kind  # the check finds them when they are there
        assert not _holds_sequence(rows, sequence), f"{kind}: {identifier!r} reached the tokenised inputs"
    # the same organisation's replies, as the ClientApp sends them
    model, digest = fresh_model(cfg.model, plan.label_names)
    config = ConfigRecord({protocol.SERVER_ROUND: 1, protocol.RUN_DIR: str(tmp_path), protocol.BASE_DIGEST: digest})
    replies = []
    for message_type in (MessageType.TRAIN, MessageType.EVALUATE):
        content = RecordDict({protocol.ARRAYS: trainable_arrays(model), protocol.CONFIG: config})
        message = Message(content=content, dst_node_id=1, message_type=message_type)
        handler = handle_train if message_type == MessageType.TRAIN else handle_evaluate
        replies.append(handler(cfg, message, context).content)
    assert json.loads(replies[1][protocol.ORG][protocol.REDACTION])["counts"]["person"] >= 3
    for reply in replies:
        wire = recorddict_to_proto(reply).SerializeToString()
        for kind, (identifier, _) in PLANTED.items():
            for form in _forms(identifier):
                assert form not in wire, f"{kind}: {form!r} is in a reply the node sends"


def test_the_audit_shows_the_rules_and_the_exported_model_applies_them(redacted_run):
    cwd, run, _ = redacted_run
    audit = subprocess.run(
        [sys.executable, "-m", "fedpriv.cli", "audit", str(run), "--no-prv"], capture_output=True, text=True
    )
    assert audit.returncode == 0, audit.stdout[-2000:] + audit.stderr[-2000:]
    report = json.loads((run / "audit.json").read_text())
    hospital = report["organisations"]["hospital"]["redaction"]
    assert hospital["status"] == "on" and hospital["rounds_on"] == 2 and hospital["counts"]["email"] >= 3
    assert hospital["rule_sets"] and hospital["rule_sets"][0].startswith("fedpriv-pii v")
    assert "## Redaction" in audit.stdout and "| hospital | on | 2 of 2 | fedpriv-pii v" in audit.stdout
    rules = json.loads((run / "model" / "redaction.json").read_text())
    assert rules["prediction"]["enabled"] is True and rules["prediction"]["kinds"] == sorted(PLANTED)
    assert "fedpriv-pii" in (run / "model" / "README.md").read_text()
    text = "Write to tessaly.okonkwo@riverside-health-example.org or call 020 7946 0374."
    predicted = subprocess.run(
        [sys.executable, "-m", "fedpriv.cli", "predict", str(run / "model"), text], capture_output=True, text=True
    )
    assert predicted.returncode == 0, predicted.stderr[-2000:]
    line = json.loads(predicted.stdout.strip().splitlines()[-1])
    assert line["text"] == "Write to [EMAIL] or call [PHONE]." and line["redacted"]["email"] == 1
    assert line["label"] in set(load_bbc_news()[1]) and 0.0 < line["score"] <= 1.0
