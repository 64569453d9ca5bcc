"""Round trips between fedpriv's records and the legacy fit/evaluate records SecAgg+ uses."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from flwr.compat.common.typing import EvaluateIns, FitIns
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from fedpriv.kernel import protocol
from fedpriv.kernel.legacy_messages import (
    LegacyMessageError,
    evaluate_reply_to_legacy,
    fit_reply_to_legacy,
    flat_vector,
    is_legacy_evaluate,
    is_legacy_fit,
    legacy_evaluate_metrics_to_content,
    legacy_evaluate_to_content,
    legacy_fit_metrics_to_content,
    legacy_fit_to_content,
    split_vector,
)
from fedpriv.server.round_tracker import RoundTracker

NAMES = ["layer.lora_A.weight", "layer.lora_B.weight", "classifier.bias"]
ARRAYS = [np.arange(6, dtype=np.float32).reshape(2, 3), np.ones((3, 2), np.float32), np.array([0.5, -0.5], np.float32)]
LAYOUT = [(name, array.shape) for name, array in zip(NAMES, ARRAYS, strict=True)]
REPORT = {"org": "hospital-a", "dp_enabled": True, "epsilon": 2.5, "delta": 1e-5, "target_epsilon": 8.0,
          "noise_multiplier": 0.9, "sample_rate": 0.1, "steps": 10, "accountant": "rdp", "max_grad_norm": 1.0,
          "redaction": '{"enabled": false}'}  # fmt: skip


def _legacy_fit_message(ndarrays=None):
    ndarrays = [flat_vector(ARRAYS)] if ndarrays is None else ndarrays  # what the coordinator sends
    ins = FitIns(parameters=ndarrays_to_parameters(ndarrays), config={"server-round": 2, "proximal_mu": 0.1})
    return compat.fitins_to_recorddict(ins, keep_input=True)


@pytest.mark.parametrize("wire", ["one flat vector", "one array per tensor"])
def test_legacy_fit_becomes_named_arrays_and_our_config(wire):
    legacy = _legacy_fit_message(None if wire == "one flat vector" else ARRAYS)
    assert is_legacy_fit(legacy) and not is_legacy_evaluate(legacy)
    content = legacy_fit_to_content(legacy, LAYOUT)
    arrays = content[protocol.ARRAYS]
    assert list(arrays.keys()) == NAMES
    for name, expected in zip(NAMES, ARRAYS, strict=True):
        np.testing.assert_array_equal(arrays[name].numpy(), expected)
        assert arrays[name].numpy().dtype == expected.dtype
    assert content[protocol.CONFIG][protocol.SERVER_ROUND] == 2
    assert content[protocol.CONFIG][protocol.PROXIMAL_MU] == 0.1


def test_the_flat_vector_is_a_few_objects_on_the_wire_not_two_per_tensor():
    tensors = [np.full((8, 4), i, np.float32) for i in range(26)]  # LoRA r=8 on 6 layers x 2 + head, roughly
    count = lambda content: len(get_all_nested_objects(content))  # noqa: E731 - what Flower pushes/pulls one by one
    many, one = _legacy_fit_message(tensors), _legacy_fit_message([flat_vector(tensors)])
    assert count(many) - count(one) == 2 * 25  # an Array and its chunk per tensor


@pytest.mark.parametrize(
    "ndarrays,match",
    [
        (ARRAYS[:2], r"2 arrays \(\(2, 3\), \(3, 2\)\), the model has 3 trainable tensors \(14 values\)"),
        ([np.zeros(13, np.float32)], "one vector of 14 values or one array per tensor"),
        ([np.zeros((2, 7), np.float32)], "1 arrays"),
    ],
)
def test_a_legacy_message_that_does_not_fit_the_model_is_one_clear_error(ndarrays, match):
    with pytest.raises(LegacyMessageError, match=match):
        legacy_fit_to_content(_legacy_fit_message(ndarrays), LAYOUT)


def test_fit_reply_round_trips_to_the_tracker_with_the_privacy_report():
    reply = RecordDict(
        {
            protocol.ARRAYS: legacy_fit_to_content(_legacy_fit_message(), LAYOUT)[protocol.ARRAYS],
            protocol.METRICS: MetricRecord(
                {protocol.NUM_EXAMPLES: 120, protocol.TRAIN_LOSS: 0.7, protocol.DP_STEPS: 10}
            ),
            protocol.PRIVACY: ConfigRecord(REPORT),
        }
    )
    legacy = fit_reply_to_legacy(reply, LAYOUT)
    fitres = compat.recorddict_to_fitres(legacy, keep_input=True)  # what secaggplus_mod / the server read
    assert fitres.num_examples == 120
    (vector,) = parameters_to_ndarrays(fitres.parameters)  # one vector for SecAgg+ to mask
    np.testing.assert_array_equal(vector, flat_vector(ARRAYS))
    for got, expected in zip(split_vector([vector], LAYOUT), ARRAYS, strict=True):
        np.testing.assert_array_equal(got, expected)
    content = legacy_fit_metrics_to_content(dict(fitres.metrics))
    assert dict(content[protocol.PRIVACY]) == REPORT
    tracker = RoundTracker(num_rounds=1, num_labels=2, dp_enabled=True, printer=lambda _: None)
    tracker.aggregate_train([content], protocol.NUM_EXAMPLES)
    assert tracker.privacy["hospital-a"]["epsilon"] == 2.5
    assert tracker.redaction == {"hospital-a": {"enabled": False}} and "redaction" not in tracker.privacy["hospital-a"]


def test_evaluate_round_trip_keeps_counts_and_org():
    ins = EvaluateIns(parameters=ndarrays_to_parameters(ARRAYS), config={"server-round": 1})
    legacy_in = compat.evaluateins_to_recorddict(ins, keep_input=True)
    assert is_legacy_evaluate(legacy_in)
    assert list(legacy_evaluate_to_content(legacy_in, LAYOUT)[protocol.ARRAYS].keys()) == NAMES
    counts = {protocol.NUM_EXAMPLES: 4, protocol.EVAL_LOSS_SUM: 2.0, protocol.EVAL_CORRECT: 3}
    for kind, values in (("tp", [2, 1]), ("fp", [1, 0]), ("fn", [0, 1])):
        counts.update({protocol.class_count_key(kind, i): v for i, v in enumerate(values)})
    redaction = {"enabled": True, "rules": "fedpriv-pii", "counts": {"email": 3, "person": 7}}
    org = ConfigRecord({"name": "hospital-b", protocol.REDACTION: json.dumps(redaction)})
    reply = RecordDict({protocol.METRICS: MetricRecord(counts), protocol.ORG: org})
    res = compat.recorddict_to_evaluateres(evaluate_reply_to_legacy(reply))
    assert res.loss == 0.5 and res.num_examples == 4
    content = legacy_evaluate_metrics_to_content(dict(res.metrics))
    tracker = RoundTracker(num_rounds=1, num_labels=2, dp_enabled=True, printer=lambda _: None)
    tracker.aggregate_evaluate([content], protocol.NUM_EXAMPLES)
    tracker.end_of_round(1, ArrayRecord())
    assert tracker.rounds[0].accuracy == 0.75 and tracker.rounds[0].org_accuracy == {"hospital-b": 0.75}
    assert tracker.redaction == {"hospital-b": redaction}  # the node's redaction report survives the legacy path
