"""The coordinator's checks of each node's update: every malformed kind is named; a sound update passes."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedpriv.kernel import protocol
from fedpriv.server.update_checks import update_problem

GLOBAL = {"head.weight": np.zeros((3, 4), dtype=np.float32), "head.bias": np.zeros(3, dtype=np.float32)}


def _arrays(tensors: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: Array(value) for name, value in tensors.items()})


def _reply(**changes) -> RecordDict:
    tensors = {name: value + 0.01 for name, value in GLOBAL.items()}
    for name, value in changes.items():
        name = name.replace("__", ".")
        if value is None:
            del tensors[name]
        else:
            tensors[name] = value
    return RecordDict({protocol.ARRAYS: _arrays(tensors), protocol.METRICS: MetricRecord({"num-examples": 10})})


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        (_reply(head__bias=np.array([0.0, np.nan, 0.0], dtype=np.float32)), "head.bias: 1 value(s) not finite"),
        (_reply(head__weight=np.full((3, 4), np.inf, dtype=np.float32)), "head.weight: 12 value(s) not finite"),
        (_reply(head__weight=np.zeros((4, 3), dtype=np.float32)), "head.weight: shape (4, 3), expected (3, 4)"),
        (_reply(head__bias=np.zeros(3, dtype=np.float64)), "head.bias: dtype float64, expected float32"),
        (_reply(head__bias=None), "missing tensor(s) head.bias"),
        (_reply(**{"lora__extra": np.zeros(2, dtype=np.float32)}), "unknown tensor(s) lora.extra"),
        (RecordDict({protocol.METRICS: MetricRecord({"num-examples": 10})}), "no 'arrays' record"),
    ],
    ids=["nan", "inf", "shape", "dtype", "missing", "extra", "no-arrays"],
)
def test_each_malformed_update_is_refused_with_its_reason(reply, reason):
    problem = update_problem(reply, _arrays(GLOBAL), max_update_norm=None)
    assert problem is not None and reason in problem


def test_the_norm_bound_measures_the_distance_from_the_global_weights():
    near = _reply()  # every one of the 15 values moved by 0.01: L2 distance 0.0387
    assert update_problem(near, _arrays(GLOBAL), max_update_norm=0.04) is None
    problem = update_problem(near, _arrays(GLOBAL), max_update_norm=0.03)
    assert problem == "update norm 0.03873 exceeds strategy.max_update_norm 0.03"
    huge = _reply(head__weight=np.full((3, 4), 1e6, dtype=np.float32))
    assert "exceeds" in update_problem(huge, _arrays(GLOBAL), max_update_norm=100.0)
    assert update_problem(huge, _arrays(GLOBAL), max_update_norm=None) is None  # no bound configured


def test_bytes_that_do_not_match_the_header_are_refused():
    reply = _reply()
    broken = reply.array_records[protocol.ARRAYS]["head.bias"]
    broken.data = broken.data[:-4]
    assert "head.bias: unreadable" in update_problem(reply, _arrays(GLOBAL), max_update_norm=None)


def test_the_gated_strategy_aggregates_only_the_sound_updates_and_records_the_rest(flower_task_identity, tmp_path):
    from fedpriv.server.budget_gate import BudgetGatedStrategy, BudgetState
    from fedpriv.server.ledger_store import LedgerStore

    class Inner:
        def configure_train(self, server_round, arrays, config, grid):
            return []

        def aggregate_train(self, server_round, replies):
            self.got = [reply.metadata.src_node_id for reply in replies]
            return ArrayRecord(), MetricRecord()

    def message(content: RecordDict, node_id: int) -> Message:
        msg = Message(content, dst_node_id=node_id, message_type="train")
        msg.metadata.__dict__["_src_node_id"] = node_id  # as a reply pulled from the SuperLink
        return msg

    said: list[str] = []
    inner = Inner()
    state = BudgetState(LedgerStore(tmp_path), say=said.append)
    state.org_of[12] = "clinic-b"
    gated = BudgetGatedStrategy(inner, state, max_update_norm=10.0)
    gated.configure_train(3, _arrays(GLOBAL), ConfigRecord(), grid=None)
    nan = _reply(head__bias=np.array([np.nan, 0, 0], dtype=np.float32))
    gated.aggregate_train(3, [message(_reply(), 11), message(nan, 12), message(_reply(head__bias=None), 13)])
    assert inner.got == [11]
    assert [(r.round, r.node_id, r.org) for r in gated.rejections] == [(3, 12, "clinic-b"), (3, 13, None)]
    assert said[0].startswith("[round 3]  update from clinic-b (node 12) rejected: tensor head.bias: 1 value(s)")
    assert gated.rejections[1].to_dict()["reason"] == "missing tensor(s) head.bias"


def test_under_secagg_only_the_unmasked_aggregate_s_finiteness_can_be_checked():
    from fedpriv.server.secure_rounds import aggregate_is_finite

    assert aggregate_is_finite(_arrays({"flat": np.linspace(-8, 8, 50)}))
    assert not aggregate_is_finite(_arrays({"flat": np.array([0.0, np.inf])}))
    assert not aggregate_is_finite(_arrays({"a": np.zeros(2), "b": np.array([np.nan])}))


# trimmed mean of 2, 3, 4; median; Krum picks one honest update (2: closest to its neighbours, first of a tie)
@pytest.mark.parametrize(("name", "expected"), [("fedtrimmedavg", 3.0), ("fedmedian", 3.0), ("krum", 2.0)])
def test_robust_strategies_outvote_an_outlier_that_passes_the_checks(flower_task_identity, tmp_path, name, expected):
    from fedpriv.kernel.config import load_config
    from fedpriv.server.budget_gate import BudgetGatedStrategy, BudgetState
    from fedpriv.server.ledger_store import LedgerStore
    from fedpriv.server.round_tracker import RoundTracker
    from fedpriv.server.strategy import build_strategy

    cfg = load_config(overrides=[f"strategy.name={name}", "strategy.num_malicious_nodes=1"])
    tracker = RoundTracker(num_rounds=1, num_labels=2, dp_enabled=False)
    inner = build_strategy(cfg.strategy, tracker, 5)
    assert type(inner).__name__ == {"fedtrimmedavg": "FedTrimmedAvg", "fedmedian": "FedMedian", "krum": "Krum"}[name]
    gated = BudgetGatedStrategy(inner, BudgetState(LedgerStore(tmp_path)))
    gated.global_arrays = _arrays(GLOBAL)
    replies = []
    for node_id, level in enumerate([1.0, 2.0, 3.0, 4.0, 1000.0], start=1):  # finite, right shapes: an outlier
        content = RecordDict(
            {
                protocol.ARRAYS: _arrays({k: np.full_like(v, level) for k, v in GLOBAL.items()}),
                protocol.METRICS: MetricRecord({protocol.NUM_EXAMPLES: 10, protocol.TRAIN_LOSS: 0.5}),
                protocol.PRIVACY: ConfigRecord({"org": f"org-{node_id}", "dp_enabled": False}),
            }
        )
        msg = Message(content, dst_node_id=node_id, message_type="train")
        msg.metadata.__dict__["_src_node_id"] = node_id
        replies.append(msg)
    arrays, _ = gated.aggregate_train(1, replies)
    assert np.allclose(arrays["head.weight"].numpy(), expected) and not gated.rejections


def test_robust_strategies_are_refused_with_secure_aggregation():
    from fedpriv.kernel.config import load_config
    from fedpriv.kernel.errors import ConfigError

    with pytest.raises(ConfigError, match="strategy.name: krum compares the organisations' individual updates"):
        load_config(overrides=["strategy.name=krum", "secure_aggregation.enabled=true"])
    with pytest.raises(ConfigError, match=r"strategy.trim_fraction: expected a number in \[0, 0.5\)"):
        load_config(overrides=["strategy.trim_fraction=0.5"])


def test_an_aggregate_in_float64_goes_back_to_the_models_dtype():
    """FedAdam and Flower's DP wrappers return float64: round 2's updates (float32) must still match it."""
    from fedpriv.server.budget_gate import in_dtypes_of

    like = ArrayRecord({"w": Array(np.zeros((2, 2), np.float32)), "b": Array(np.zeros(2, np.float32))})
    aggregate = ArrayRecord({"w": Array(np.full((2, 2), 0.1)), "b": Array(np.ones(2, np.float32))})
    cast = in_dtypes_of(aggregate, like)
    assert {name: array.dtype for name, array in cast.items()} == {"w": "float32", "b": "float32"}
    assert np.array_equal(cast["w"].numpy(), np.full((2, 2), 0.1, np.float32))
    assert in_dtypes_of(cast, like) is cast  # nothing to do: no copy
    update = RecordDict({protocol.ARRAYS: ArrayRecord({n: Array(a.numpy() + 1) for n, a in cast.items()})})
    assert update_problem(update, cast, None) is None
