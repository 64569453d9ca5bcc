"""The declaration of what leaves a node (client/disclosures.py) and the table in docs/threat-model.md agree."""

from __future__ import annotations

from pathlib import Path

from fedpriv.client import disclosures

THREAT_MODEL = Path(__file__).resolve().parents[2] / "docs" / "threat-model.md"


def test_the_threat_model_table_is_the_declaration():
    text = THREAT_MODEL.read_text(encoding="utf-8")
    assert disclosures.TABLE_BEGIN in text and disclosures.TABLE_END in text, "the generated table's markers"
    start = text.index(disclosures.TABLE_BEGIN)
    end = text.index(disclosures.TABLE_END) + len(disclosures.TABLE_END)
    assert text[start:end] == disclosures.table_block(), (
        "docs/threat-model.md's 'What leaves a node' table differs from client/disclosures.py:"
        " python -m fedpriv.client.disclosures --write"
    )


def test_every_reply_field_fedpriv_names_is_declared():
    """The protocol's reply keys, as the handlers build them, each find their declaration."""
    from fedpriv.kernel import protocol

    train = {
        protocol.ARRAYS: {"base.layer.0.lora_A.weight": 0},
        protocol.METRICS: {k: 0 for k in (protocol.NUM_EXAMPLES, protocol.TRAIN_LOSS, protocol.DP_STEPS,
                                          protocol.UNIT_WEIGHT)},
        protocol.PRIVACY: {"org": "a", "dp_enabled": True, "epsilon": 1.0, "clipping_mode": "bk",
                           protocol.REDACTION: "{}"},
    }  # fmt: skip
    assert disclosures.undeclared(disclosures.TRAIN_REPLY, train) == []
    evaluate = {protocol.METRICS: {"tp-0": 1, "fp-12": 0, "fn-3": 0, "correct": 1}, protocol.ORG: {"name": "a"}}
    assert disclosures.undeclared(disclosures.EVALUATE_REPLY, evaluate) == []
    assert disclosures.undeclared(disclosures.EVALUATE_REPLY, {protocol.METRICS: {"tp-x": 1}, "other": {}}) == [
        "metrics.tp-x",
        "other (record)",
    ]


def test_what_leaves_about_redaction_follows_the_setting():
    spec = {"enabled": True, "rules": "r", "kinds": ["email", "phone"]}
    counts = {"email": 3, "phone": 0}
    assert disclosures.shared_redaction(spec, counts, "kinds") == {**spec, "share": "kinds", "found": ["email"]}
    assert disclosures.shared_redaction(spec, counts, "counts") == {**spec, "share": "counts", "counts": counts}
    assert disclosures.shared_redaction(spec, counts, "none") == {**spec, "share": "none"}
