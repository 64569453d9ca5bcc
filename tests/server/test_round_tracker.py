"""Round tracking: exact global metrics from per-organisation counts, privacy per org, progress line."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedpriv.kernel import protocol
from fedpriv.server.checkpoints import load_checkpoint, save_checkpoint
from fedpriv.server.round_tracker import RoundTracker
from fedpriv.shared_models.class_scores import macro_f1


def _eval_reply(org, labels, predictions, loss_sum):
    values = {
        protocol.NUM_EXAMPLES: len(labels),
        protocol.EVAL_LOSS_SUM: loss_sum,
        protocol.EVAL_CORRECT: sum(int(a == b) for a, b in zip(labels, predictions, strict=True)),
    }
    for c in range(3):
        values[protocol.class_count_key("tp", c)] = sum(
            p == c and y == c for y, p in zip(labels, predictions, strict=False)
        )
        values[protocol.class_count_key("fp", c)] = sum(
            p == c and y != c for y, p in zip(labels, predictions, strict=False)
        )
        values[protocol.class_count_key("fn", c)] = sum(
            p != c and y == c for y, p in zip(labels, predictions, strict=False)
        )
    return RecordDict({protocol.METRICS: MetricRecord(values), protocol.ORG: ConfigRecord({"name": org})})


def _train_reply(org, n, loss, eps):
    report = {
        "org": org, "dp_enabled": True, "epsilon": eps, "delta": 1e-5, "target_epsilon": 8.0,
        "noise_multiplier": 0.9, "sample_rate": 0.1, "steps": 10, "accountant": "rdp", "max_grad_norm": 1.0,
    }  # fmt: skip
    return RecordDict(
        {
            protocol.METRICS: MetricRecord(
                {protocol.NUM_EXAMPLES: n, protocol.TRAIN_LOSS: loss, protocol.DP_STEPS: 10}
            ),
            protocol.PRIVACY: ConfigRecord(report),
        }
    )


def test_global_metrics_are_computed_from_summed_counts_not_averaged_ratios():
    lines = []
    tracker = RoundTracker(num_rounds=2, num_labels=3, dp_enabled=True, printer=lines.append)
    a_labels, a_pred = [0, 0, 1, 2], [0, 1, 1, 2]
    b_labels, b_pred = [2, 2, 2, 1, 0, 0], [2, 0, 2, 1, 1, 0]
    tracker.aggregate_train([_train_reply("org-a", 40, 1.0, 2.5), _train_reply("org-b", 60, 2.0, 3.0)], "num-examples")
    agg = tracker.aggregate_evaluate(
        [_eval_reply("org-a", a_labels, a_pred, 2.0), _eval_reply("org-b", b_labels, b_pred, 9.0)], "num-examples"
    )
    tracker.end_of_round(1, ArrayRecord())
    record = tracker.rounds[0]
    labels, preds = a_labels + b_labels, a_pred + b_pred
    tp = [sum(p == c and y == c for y, p in zip(labels, preds, strict=False)) for c in range(3)]
    fp = [sum(p == c and y != c for y, p in zip(labels, preds, strict=False)) for c in range(3)]
    fn = [sum(p != c and y == c for y, p in zip(labels, preds, strict=False)) for c in range(3)]
    assert record.accuracy == sum(y == p for y, p in zip(labels, preds, strict=False)) / 10
    assert record.macro_f1 == macro_f1(tp, fp, fn)
    assert abs(record.loss - 11.0 / 10) < 1e-12
    assert abs(record.train_loss - (40 * 1.0 + 60 * 2.0) / 100) < 1e-12
    assert record.org_accuracy == {"org-a": 0.75, "org-b": 4 / 6}
    assert record.epsilon == {"org-a": 2.5, "org-b": 3.0}
    assert agg["accuracy"] == record.accuracy
    assert tracker.privacy["org-b"]["noise_multiplier"] == 0.9 and "org" not in tracker.privacy["org-b"]
    assert lines[0].startswith("[round 1/2]") and "eps max 3.00" in lines[0] and "org-a 2.50" in lines[0]


def test_macro_f1_matches_a_direct_computation():
    # class 0: tp 2 fp 1 fn 0 -> 0.8; class 1: tp 1 fp 0 fn 2 -> 0.5; class 2 absent -> ignored
    assert abs(macro_f1([2, 1, 0], [1, 0, 0], [0, 2, 0]) - 0.65) < 1e-12


def test_epsilon_of_an_org_left_out_of_a_round_is_carried_over():
    tracker = RoundTracker(num_rounds=2, num_labels=3, dp_enabled=True, printer=lambda _: None)
    tracker.aggregate_train([_train_reply("org-a", 10, 1.0, 1.0), _train_reply("org-b", 10, 1.0, 1.5)], "num-examples")
    tracker.end_of_round(1, ArrayRecord())
    tracker.aggregate_train([_train_reply("org-a", 10, 1.0, 2.0)], "num-examples")
    tracker.end_of_round(2, ArrayRecord())
    assert tracker.rounds[1].epsilon == {"org-a": 2.0, "org-b": 1.5}
    assert tracker.rounds[1].trained_orgs == ["org-a"]


def test_round_zero_is_not_a_round_and_dp_off_is_said_plainly():
    lines = []
    tracker = RoundTracker(num_rounds=1, num_labels=3, dp_enabled=False, printer=lines.append)
    assert tracker.end_of_round(0, ArrayRecord()) is None and not tracker.rounds
    reply = _train_reply("org-a", 10, 1.0, 0.0)
    reply[protocol.PRIVACY] = ConfigRecord({"org": "org-a", "dp_enabled": False})
    tracker.aggregate_train([reply], "num-examples")
    tracker.end_of_round(1, ArrayRecord())
    assert lines[0].startswith("training: 1 round(s)")
    assert "DP OFF" in lines[-1]
    assert tracker.privacy["org-a"]["epsilon"] is None


def test_checkpoints_round_trip(tmp_path):
    arrays = ArrayRecord(torch_state_dict={"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2)})
    path = save_checkpoint(tmp_path, 3, arrays)
    assert path.name == "round-0003.safetensors"
    restored = load_checkpoint(path).to_torch_state_dict()
    assert torch.equal(restored["w"], torch.arange(6.0).reshape(2, 3))


def test_a_round_where_nobody_trained_is_reported_as_such():
    lines = []
    tracker = RoundTracker(num_rounds=1, num_labels=3, dp_enabled=True, printer=lines.append)
    tracker.end_of_round(1, ArrayRecord())  # every train reply was an error: no aggregate_train call
    assert tracker.rounds[0].trained_orgs == []
    assert "NO organisation trained" in lines[0] and "acc" not in lines[0]


def _without(reply, *keys):
    """``reply`` as a node that does not share ``keys`` of its metrics sends it (client/disclosures.py)."""
    metrics = {key: value for key, value in reply[protocol.METRICS].items() if key not in keys}
    return RecordDict(
        {**{name: reply[name] for name in reply if name != protocol.METRICS}, "metrics": MetricRecord(metrics)}
    )


def test_a_training_loss_not_shared_is_null_and_a_partly_shared_one_names_who_sent_it():
    from fedpriv.server.reports import build_summary

    tracker = RoundTracker(num_rounds=2, num_labels=3, dp_enabled=True, printer=lambda _: None)
    agg = tracker.aggregate_train(
        [_without(_train_reply("org-a", 40, 1.0, 2.5), protocol.TRAIN_LOSS),
         _without(_train_reply("org-b", 60, 2.0, 3.0), protocol.TRAIN_LOSS)], "num-examples"
    )  # fmt: skip
    assert protocol.TRAIN_LOSS not in agg and agg[protocol.NUM_EXAMPLES] == 100
    tracker.end_of_round(1, ArrayRecord())
    assert tracker.rounds[0].train_loss is None and tracker.rounds[0].train_loss_orgs == []
    tracker.aggregate_train(
        [_without(_train_reply("org-a", 40, 1.0, 2.5), protocol.TRAIN_LOSS), _train_reply("org-b", 60, 2.0, 3.0)],
        "num-examples",
    )
    tracker.end_of_round(2, ArrayRecord())
    assert tracker.rounds[1].train_loss == 2.0 and tracker.rounds[1].train_loss_orgs == ["org-b"]
    summary = build_summary(tracker, {}, {})
    assert summary["rounds"][0]["train_loss"] is None and "train_loss_orgs" in summary["rounds"][0]


def test_without_every_organisations_per_class_counts_macro_f1_is_null_and_said_so():
    lines = []
    tracker = RoundTracker(num_rounds=1, num_labels=3, dp_enabled=True, printer=lines.append)
    tracker.aggregate_train([_train_reply("org-a", 40, 1.0, 2.5)], "num-examples")
    per_class = [protocol.class_count_key(kind, c) for kind in ("tp", "fp", "fn") for c in range(3)]
    agg = tracker.aggregate_evaluate(
        [_eval_reply("org-a", [0, 1], [0, 1], 1.0), _without(_eval_reply("org-b", [2, 2], [2, 0], 1.0), *per_class)],
        "num-examples",
    )
    tracker.end_of_round(1, ArrayRecord())
    record = tracker.rounds[0]
    assert record.macro_f1 is None and "macro_f1" not in agg  # never the macro-F1 of org-a alone
    assert record.accuracy == 0.75 and record.org_accuracy == {"org-a": 1.0, "org-b": 0.5}
    assert "macro-F1 not shared by the organisations" in lines[-1]


def _with_confusion(reply, labels, predictions, num_labels=3):
    for t in range(num_labels):
        for p in range(num_labels):
            cell = sum(y == t and q == p for y, q in zip(labels, predictions, strict=True))
            reply[protocol.METRICS][protocol.confusion_key(t, p)] = cell
    return reply


def test_per_class_scores_and_the_confusion_matrix_are_summed_over_the_organisations():
    tracker = RoundTracker(
        num_rounds=1, num_labels=3, dp_enabled=False, printer=lambda _: None, label_names=["x", "y", "z"]
    )
    a_labels, a_pred = [0, 0, 1, 2], [0, 1, 1, 2]
    b_labels, b_pred = [2, 2, 2, 1, 0, 0], [2, 0, 2, 1, 1, 0]
    tracker.aggregate_evaluate(
        [
            _with_confusion(_eval_reply("org-a", a_labels, a_pred, 1.0), a_labels, a_pred),
            _with_confusion(_eval_reply("org-b", b_labels, b_pred, 1.0), b_labels, b_pred),
        ],
        "num-examples",
    )
    tracker.end_of_round(1, ArrayRecord())
    record = tracker.rounds[0].to_dict()
    # rows: true class, columns: predicted; over both organisations' 10 test examples
    assert record["confusion_matrix"] == [[2, 2, 0], [0, 2, 0], [1, 0, 3]]
    x, y, z = record["per_class"]
    assert (x["label"], x["precision"], x["recall"], x["support"]) == ("x", 2 / 3, 0.5, 4)
    assert (y["label"], y["precision"], y["recall"], y["f1"], y["support"]) == ("y", 0.5, 1.0, 2 / 3, 2)
    assert (z["precision"], z["recall"], z["support"]) == (1.0, 0.75, 4)
    assert record["macro_f1"] == pytest.approx(sum(row["f1"] for row in record["per_class"]) / 3)


def test_an_organisation_that_does_not_share_per_class_counts_leaves_both_null():
    tracker = RoundTracker(num_rounds=1, num_labels=3, dp_enabled=False, printer=lambda _: None)
    shared = _with_confusion(_eval_reply("org-a", [0, 1], [0, 1], 1.0), [0, 1], [0, 1])
    private = RecordDict(
        {
            protocol.METRICS: MetricRecord(
                {protocol.NUM_EXAMPLES: 2, protocol.EVAL_LOSS_SUM: 1.0, protocol.EVAL_CORRECT: 1}
            ),
            protocol.ORG: ConfigRecord({"name": "org-b"}),
        }
    )
    tracker.aggregate_evaluate([shared, private], "num-examples")
    tracker.end_of_round(1, ArrayRecord())
    record = tracker.rounds[0].to_dict()
    assert record["per_class"] is None and record["confusion_matrix"] is None and record["macro_f1"] is None
    # a class that was neither predicted nor present has no precision / recall / F1, never a made-up 0
    tracker.aggregate_evaluate([shared], "num-examples")
    tracker.end_of_round(2, ArrayRecord())
    assert tracker.rounds[1].per_class[2] == {"label": "2", "precision": None, "recall": None, "f1": None, "support": 0}
