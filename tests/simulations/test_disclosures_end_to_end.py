"""Every field a node sends in a short simulation is declared in client/disclosures.py (issue 26).

The ClientApp that ``fedpriv simulate`` builds is wrapped at its boundary (what Flower's runtime calls with
each message and gets back, every mod included), so every reply of every kind is seen as it leaves the node:
the pre-flight (query), train and evaluate replies of two organisations, with redaction on. Each record and
key of each reply must be declared for its message kind; each signed ledger entry the replies carry and the
coordinator keeps, and each nested redaction report, field by field. With the organisations' defaults the
training loss and the redaction counts never leave a node; with the settings turned the other way they do
(and the per-class counts do not), and the run's files and output say what was not shared.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from fedpriv.client import disclosures
from fedpriv.kernel import protocol
from tests.handler_messages import HANDLER_RUN

pytestmark = pytest.mark.integration

RUN = [*HANDLER_RUN, "redaction.enabled=true", "strategy.preflight=always", "output.export_model=true"]
TURNED = ["privacy.share_training_loss=true", "privacy.share_per_class_eval=false", "redaction.share=counts"]

# runs `fedpriv simulate` in one process with the ClientApp wrapped: each reply, as it leaves, one JSON line
SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path

    from flwr.clientapp import ClientApp

    import fedpriv.client.client_app as client_app
    from fedpriv.cli import main

    runs = json.loads(sys.argv[1])
    build = client_app.build_client_app


    def plain(record):
        return {key: (value if isinstance(value, (int, float, str, bool)) else repr(value)[:40])
                for key, value in record.items()}


    class Recording(ClientApp):
        def __init__(self, inner, log):
            super().__init__()
            self.inner, self.log = inner, log

        def __call__(self, message, context):
            reply = self.inner(message, context)
            line = {"type": str(message.metadata.message_type), "error": None, "records": {}}
            if reply.has_content():
                content = reply.content
                for kind in (content.array_records, content.metric_records, content.config_records):
                    for name, record in kind.items():
                        line["records"][name] = plain(record) if kind is not content.array_records else {
                            key: "array" for key in record}
            else:
                line["error"] = str(reply.error)
            with open(self.log, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(line) + "\\n")
            return reply


    for name, args in runs:
        out = Path(name)
        log = str(out.parent / (out.name + "-replies.jsonl"))
        client_app.build_client_app = lambda cfg=None, log=log: Recording(build(cfg), log)
        code = main(["simulate", *args, "--out", name])
        print("=== exit", name, code, flush=True)
    """
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("disclosures")
    todo = [[str(cwd / "defaults"), RUN], [str(cwd / "turned"), [*RUN, *TURNED]]]
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(todo)], cwd=cwd, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "=== exit " + str(cwd / "defaults") + " 0" in proc.stdout, proc.stdout[-3000:]
    assert "=== exit " + str(cwd / "turned") + " 0" in proc.stdout, proc.stdout[-3000:]
    output = {name: part for name, part in zip(("defaults", "turned"), proc.stdout.split("=== exit "), strict=False)}
    result = {}
    for name in ("defaults", "turned"):
        lines = (cwd / f"{name}-replies.jsonl").read_text(encoding="utf-8").splitlines()
        result[name] = ([json.loads(line) for line in lines], cwd / name, output[name])
    return result


def _ledger_entries(replies):
    for reply in replies:
        ledger = reply["records"].get(protocol.LEDGER)
        if ledger:
            yield from json.loads(ledger[protocol.LEDGER_ENTRIES])


def _redaction_reports(replies):
    for reply in replies:
        for record in (protocol.PRIVACY, protocol.ORG):
            if protocol.REDACTION in reply["records"].get(record, {}):
                yield json.loads(reply["records"][record][protocol.REDACTION])
    for entry in _ledger_entries(replies):
        if "redaction" in entry:
            yield entry["redaction"]


def _check_declared(replies):
    assert {reply["type"] for reply in replies} == {"query", "train", "evaluate"}, "every kind of reply was seen"
    for reply in replies:
        assert reply["error"] is None, reply
        message = disclosures.REPLIES[reply["type"].split(".")[0]]
        assert disclosures.undeclared(message, reply["records"]) == [], (reply["type"], reply["records"])
    entries = list(_ledger_entries(replies))
    assert entries, "the DP rounds' ledger entries travelled"
    for entry in entries:
        assert disclosures.undeclared(disclosures.LEDGER_ENTRY, {"": entry}) == [], entry
    reports = list(_redaction_reports(replies))
    assert reports
    for report in reports:
        assert disclosures.undeclared(disclosures.REDACTION_REPORT, {"": report}) == [], report
    return entries, reports


def _coordinator_entries(run_dir):
    entries = []
    for path in sorted((run_dir / "ledgers").glob("*.jsonl")):
        entries += [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert entries
    for entry in entries:
        assert disclosures.undeclared(disclosures.LEDGER_ENTRY, {"": entry}) == [], entry
        assert disclosures.undeclared(disclosures.REDACTION_REPORT, {"": entry["redaction"]}) == [], entry
    return entries


def test_with_the_defaults_every_field_is_declared_and_no_loss_or_redaction_count_leaves(runs):
    replies, run_dir, output = runs["defaults"]
    entries, reports = _check_declared(replies)
    for reply in replies:
        assert protocol.TRAIN_LOSS not in reply["records"].get(protocol.METRICS, {}), reply
    for report in [*reports, *(e["redaction"] for e in _coordinator_entries(run_dir))]:
        assert "counts" not in report and report["share"] == "kinds" and isinstance(report["found"], list), report
    evaluate = [r for r in replies if r["type"] == "evaluate"]
    assert all("tp-0" in r["records"][protocol.METRICS] for r in evaluate)  # per-class counts: on by default

    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    assert all(record["train_loss"] is None for record in summary["rounds"])  # the field stays, null
    assert all(record["macro_f1"] is not None for record in summary["rounds"])
    assert all("counts" not in report and "found" in report for report in summary["redaction"].values())
    for org, report in summary["redaction"].items():  # the coordinator's per-node records: only what was sent
        assert disclosures.undeclared(disclosures.REDACTION_REPORT, {"": report}) == [], org
    for org, report in summary["privacy"].items():
        assert disclosures.undeclared(disclosures.TRAIN_REPLY, {protocol.PRIVACY: report}) == [], org
    for ready in summary["preflight"]["ready"]:
        sent = {key.replace("_", "-"): value for key, value in ready.items() if key != "node_id"}
        assert disclosures.undeclared(disclosures.QUERY_REPLY, {protocol.READY: sent}) == [], ready
    keys = sorted((run_dir / "ledgers" / "keys").glob("*.pub"))
    assert len(keys) == 2 and all(k.read_text().startswith("-----BEGIN PUBLIC KEY-----") for k in keys)
    assert "mean training loss: not shared by the organisations" in output.lower()
    card = (run_dir / "model" / "README.md").read_text(encoding="utf-8")
    assert "found" in card
    redaction_json = json.loads((run_dir / "model" / "redaction.json").read_text(encoding="utf-8"))
    assert all("counts" not in spec for spec in redaction_json["organisations"].values())


def test_turned_on_the_loss_and_counts_leave_and_without_per_class_counts_macro_f1_is_null(runs):
    replies, run_dir, output = runs["turned"]
    _, reports = _check_declared(replies)
    train = [r for r in replies if r["type"] == "train"]
    assert train and all(protocol.TRAIN_LOSS in r["records"][protocol.METRICS] for r in train)
    assert all(report["share"] == "counts" and "counts" in report for report in reports)
    evaluate = [r for r in replies if r["type"] == "evaluate"]
    assert evaluate and not any(
        key.startswith(("tp-", "fp-", "fn-", "cm-")) for r in evaluate for key in r["records"]["metrics"]
    )
    _coordinator_entries(run_dir)

    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    assert all(record["train_loss"] is not None for record in summary["rounds"])
    assert all(record["macro_f1"] is None and record["accuracy"] is not None for record in summary["rounds"])
    assert all(record["per_class"] is None and record["confusion_matrix"] is None for record in summary["rounds"])
    assert not (run_dir / "confusion.png").exists()
    assert "macro-F1 not shared by the organisations" in output
    assert "Per class: not shared by the organisations" in output
