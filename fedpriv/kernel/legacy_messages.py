"""Translate between fedpriv's records and the legacy fit/evaluate records that SecAgg+ speaks.

Flower 1.41 offers secure aggregation only through its legacy workflow
(``DefaultWorkflow`` + ``SecAggPlusWorkflow``), whose messages carry
``fitins.*`` / ``evaluateins.*`` records with unnamed arrays. These functions,
built on Flower's own ``recorddict_compat`` converters, let the ClientApp's
handlers and the server's round tracker stay exactly as they are on both
paths. See docs/design/secure-aggregation.md.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from flwr.compat.common.typing import Code, EvaluateRes, FitRes, Status

from fedpriv.kernel import protocol

LEGACY_FIT_ARRAYS = "fitins.parameters"
LEGACY_EVALUATE_ARRAYS = "evaluateins.parameters"
PRIVACY_PREFIX = "privacy."  # per-organisation privacy report, flattened into the (unmasked) fit metrics
ORG_NAME_KEY = "org.name"
ORG_REDACTION_KEY = "org.redaction"  # the node's redaction report (JSON), beside its name
LEDGER_PREFIX = "ledger."  # the node's new signed ledger entries, flattened likewise (never masked)
_LEGACY_KEYS = {"proximal_mu": protocol.PROXIMAL_MU}  # legacy FedProx spells it with an underscore


class LegacyMessageError(ValueError):
    """A legacy message does not fit the model (wrong number of arrays)."""


def is_legacy_fit(content: RecordDict) -> bool:
    return LEGACY_FIT_ARRAYS in content.array_records


def is_legacy_evaluate(content: RecordDict) -> bool:
    return LEGACY_EVALUATE_ARRAYS in content.array_records


Layout = list[tuple[str, tuple[int, ...]]]  # the model's trainable tensors, in model order: name and shape


def flat_vector(ndarrays: list[np.ndarray]) -> np.ndarray:
    """The trainable tensors as the one vector legacy (SecAgg+) messages carry.

    Flower moves every Array of a message as objects of its own, one request each at every hop
    (coordinator -> SuperLink -> SuperNode -> ClientApp and back): LoRA's 26 small tensors made a SecAgg+
    message 35 to 56 objects, and ten nodes' requests queued at the SuperLink for seconds. One vector is
    a couple of objects; SecAgg+ masks and quantises it element by element all the same.
    """
    dtype = np.result_type(*ndarrays)
    return np.concatenate([np.asarray(array, dtype=dtype).ravel() for array in ndarrays])


def split_vector(ndarrays: list[np.ndarray], layout: Layout) -> list[np.ndarray]:
    """The model's tensors from a legacy message: one flat vector (``flat_vector``), or one array per tensor."""
    shapes = [tuple(shape) for _, shape in layout]
    if [tuple(array.shape) for array in ndarrays] == shapes:
        return list(ndarrays)
    sizes = [math.prod(shape) for shape in shapes]
    if len(ndarrays) == 1 and ndarrays[0].ndim == 1 and ndarrays[0].size == sum(sizes):
        pieces = np.split(ndarrays[0], np.cumsum(sizes)[:-1])
        return [piece.reshape(shape) for piece, shape in zip(pieces, shapes, strict=True)]
    got = ", ".join(str(tuple(array.shape)) for array in ndarrays[:4]) + (" ..." if len(ndarrays) > 4 else "")
    raise LegacyMessageError(
        f"legacy message: {len(ndarrays)} arrays ({got}), the model has {len(layout)} trainable tensors"
        f" ({sum(sizes)} values): expected one vector of {sum(sizes)} values or one array per tensor"
    )


def _named(ndarrays: list, layout: Layout) -> ArrayRecord:
    tensors = split_vector(ndarrays, layout)
    return ArrayRecord(array_dict={name: Array(t) for (name, _), t in zip(layout, tensors, strict=True)})


def _config(config: dict[str, Any]) -> ConfigRecord:
    return ConfigRecord({_LEGACY_KEYS.get(key, key): value for key, value in config.items()})


def legacy_fit_to_content(content: RecordDict, layout: Layout) -> RecordDict:
    """``fitins.*`` -> ``{"arrays", "config"}`` as the train handler expects (named by the model's layout)."""
    ins = compat.recorddict_to_fitins(content, keep_input=True)
    arrays = _named(parameters_to_ndarrays(ins.parameters), layout)
    return RecordDict({protocol.ARRAYS: arrays, protocol.CONFIG: _config(ins.config)})


def legacy_evaluate_to_content(content: RecordDict, layout: Layout) -> RecordDict:
    ins = compat.recorddict_to_evaluateins(content, keep_input=True)
    arrays = _named(parameters_to_ndarrays(ins.parameters), layout)
    return RecordDict({protocol.ARRAYS: arrays, protocol.CONFIG: _config(ins.config)})


def fit_reply_to_legacy(reply: RecordDict, layout: Layout) -> RecordDict:
    """The train handler's reply -> ``fitres.*`` (one flat vector); only the arrays get masked by SecAgg+."""
    arrays = reply[protocol.ARRAYS]
    metrics: dict[str, Any] = dict(reply[protocol.METRICS])
    metrics.update({PRIVACY_PREFIX + key: value for key, value in reply[protocol.PRIVACY].items()})
    metrics.update(_flat_ledger(reply))
    fitres = FitRes(
        status=Status(code=Code.OK, message=""),
        parameters=ndarrays_to_parameters([flat_vector([arrays[name].numpy() for name, _ in layout])]),
        num_examples=int(metrics[protocol.NUM_EXAMPLES]),
        metrics=metrics,
    )
    return compat.fitres_to_recorddict(fitres, keep_input=True)


def evaluate_reply_to_legacy(reply: RecordDict) -> RecordDict:
    metrics: dict[str, Any] = dict(reply[protocol.METRICS])
    num_examples = int(metrics[protocol.NUM_EXAMPLES])
    metrics[ORG_NAME_KEY] = str(reply[protocol.ORG]["name"])
    if protocol.REDACTION in reply[protocol.ORG]:
        metrics[ORG_REDACTION_KEY] = str(reply[protocol.ORG][protocol.REDACTION])
    metrics.update(_flat_ledger(reply))
    loss = float(metrics[protocol.EVAL_LOSS_SUM]) / num_examples if num_examples else 0.0
    evaluateres = EvaluateRes(
        status=Status(code=Code.OK, message=""), loss=loss, num_examples=num_examples, metrics=metrics
    )
    return compat.evaluateres_to_recorddict(evaluateres)


def _flat_ledger(reply: RecordDict) -> dict[str, Any]:
    if protocol.LEDGER not in reply:
        return {}
    return {LEDGER_PREFIX + key: value for key, value in reply[protocol.LEDGER].items()}


def _with_ledger(records: dict[str, Any], metrics: dict[str, Any]) -> RecordDict:
    ledger = {key[len(LEDGER_PREFIX) :]: value for key, value in metrics.items() if key.startswith(LEDGER_PREFIX)}
    if ledger:
        records[protocol.LEDGER] = ConfigRecord(ledger)
    return RecordDict(records)


def legacy_fit_metrics_to_content(metrics: dict[str, Any]) -> RecordDict:
    """Server side: a legacy fit result's metrics -> the records ``RoundTracker.aggregate_train`` reads."""
    privacy = {key[len(PRIVACY_PREFIX) :]: value for key, value in metrics.items() if key.startswith(PRIVACY_PREFIX)}
    plain = {key: value for key, value in metrics.items() if not key.startswith((PRIVACY_PREFIX, LEDGER_PREFIX))}
    return _with_ledger({protocol.METRICS: MetricRecord(plain), protocol.PRIVACY: ConfigRecord(privacy)}, metrics)


def legacy_evaluate_metrics_to_content(metrics: dict[str, Any]) -> RecordDict:
    """Server side: a legacy evaluate result's metrics -> the records ``RoundTracker.aggregate_evaluate`` reads."""
    org_keys = (ORG_NAME_KEY, ORG_REDACTION_KEY)
    plain = {key: value for key, value in metrics.items() if key not in org_keys and not key.startswith(LEDGER_PREFIX)}
    org = ConfigRecord({"name": str(metrics[ORG_NAME_KEY])})
    if ORG_REDACTION_KEY in metrics:
        org[protocol.REDACTION] = str(metrics[ORG_REDACTION_KEY])
    return _with_ledger({protocol.METRICS: MetricRecord(plain), protocol.ORG: org}, metrics)
