"""The coordinator's resume point: written after every round, checked on load, strategy state restored."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord
from flwr.serverapp.strategy import DifferentialPrivacyServerSideAdaptiveClipping, FedAdam, FedAvg

from fedpriv.kernel import protocol
from fedpriv.server.budget_gate import BudgetGatedStrategy, BudgetState
from fedpriv.server.ledger_store import LedgerStore
from fedpriv.server.resume import (
    ResumeError,
    ResumePoint,
    capture_strategy_state,
    load_resume_point,
    prune_checkpoints,
    restore_strategy_state,
    resumable,
    resume_path,
    save_strategy_state,
    write_resume_point,
)


def _point(run_dir, rounds=2, **changes) -> ResumePoint:
    folder = run_dir / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    for r in range(1, rounds + 1):
        (folder / f"round-{r:04d}.safetensors").write_bytes(b"weights")
    fields = dict(
        run_dir=run_dir.resolve(),
        round=rounds,
        config={"training": {"rounds": 3}},
        rounds=[{"round": r, "epsilon": {"org-0": 1.0 * r}} for r in range(1, rounds + 1)],
        privacy={"org-0": {"epsilon": 2.0}},
        rejected_updates=[{"round": 1, "node_id": 7, "org": "org-1", "reason": "value not finite"}],
        refusals=[],
        elapsed_s=12.5,
        checkpoint=f"round-{rounds:04d}.safetensors" if rounds else None,
        strategy_state=None,
        resumes=[1],
    )
    return ResumePoint(**{**fields, **changes})


def test_a_written_resume_point_loads_back_as_it_was(tmp_path):
    point = _point(tmp_path)
    write_resume_point(point)
    assert load_resume_point(tmp_path) == point
    assert resumable(point) is point  # no summary yet: the run never ended


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: p.unlink(), "no checkpoints/resume.json"),
        (lambda p: p.write_text("{not json"), "not a readable resume point"),
        (lambda p: p.write_text(json.dumps({"format": "other/9"})), "format 'other/9', expected 'fedpriv-resume/1'"),
        (lambda p: p.write_text(json.dumps({"format": "fedpriv-resume/1"})), "damaged resume point"),
        (lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "round": 1})), "names round 1 but holds 2"),
        (
            lambda p: (p.parent / "round-0002.safetensors").unlink(),
            "its checkpoint .*round-0002.safetensors is missing",
        ),
    ],
    ids=["missing", "not-json", "other-format", "fields-missing", "round-mismatch", "checkpoint-gone"],
)
def test_a_damaged_resume_point_is_one_line_naming_the_file(tmp_path, damage, message):
    write_resume_point(_point(tmp_path))
    damage(resume_path(tmp_path))
    with pytest.raises(ResumeError, match=message) as caught:
        load_resume_point(tmp_path)
    assert "\n" not in str(caught.value) and str(tmp_path) in str(caught.value)
    assert caught.value.exit_code == 2


@pytest.mark.parametrize("status", ["completed", "incomplete", "budget_exhausted"])
def test_a_run_that_ended_has_nothing_to_resume(tmp_path, status):
    point = _point(tmp_path)
    (tmp_path / "summary.json").write_text(json.dumps({"status": status}))
    with pytest.raises(ResumeError, match=f"already ended .*'{status}'.*nothing to resume"):
        resumable(point)
    (tmp_path / "summary.json").write_text(json.dumps({"status": "running"}))  # the coordinator died mid-run
    assert resumable(point) is point


def test_pruning_keeps_the_newest_checkpoints_and_always_those_the_resume_point_names(tmp_path):
    point = _point(tmp_path, rounds=4, strategy_state="strategy-0004.npz")
    for r in (3, 4):
        (tmp_path / "checkpoints" / f"strategy-{r:04d}.npz").write_bytes(b"state")
    (tmp_path / "checkpoints" / "round-0005.safetensors").write_bytes(b"written, not yet named")
    prune_checkpoints(tmp_path, point, keep_last=1)
    left = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert left == ["round-0004.safetensors", "round-0005.safetensors", "strategy-0004.npz"]
    prune_checkpoints(tmp_path, point, keep_last=0)  # 0 keeps every checkpoint
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == left


def _gated(strategy) -> BudgetGatedStrategy:
    return BudgetGatedStrategy(strategy, BudgetState(LedgerStore.__new__(LedgerStore)))


def test_fedadam_moments_and_adaptive_clipping_survive_a_restart(tmp_path):
    def build():
        inner = FedAdam(eta=0.1)
        wrapped = DifferentialPrivacyServerSideAdaptiveClipping(
            inner, 1.0, 3, initial_clipping_norm=0.5, clipped_count_stddev=1.0
        )
        return _gated(wrapped), inner, wrapped

    gate, inner, wrapped = build()
    assert capture_strategy_state(gate) == {"L1/clipping_norm": np.asarray(0.5)}
    rng = np.random.default_rng(0)
    inner.m_t = {"a.weight": rng.normal(size=(3, 2)).astype(np.float32), "b": rng.normal(size=4)}
    inner.v_t = {name: value**2 for name, value in inner.m_t.items()}
    wrapped.clipping_norm = 0.8125
    name = save_strategy_state(tmp_path, 3, gate)
    assert name == "strategy-0003.npz"

    fresh, fresh_inner, fresh_wrapped = build()
    restored = restore_strategy_state(fresh, tmp_path / "checkpoints" / name)
    assert restored == ["DifferentialPrivacyServerSideAdaptiveClipping.clipping_norm", "FedAdam.m_t", "FedAdam.v_t"]
    assert fresh_wrapped.clipping_norm == 0.8125
    for attribute in ("m_t", "v_t"):
        saved, back = getattr(inner, attribute), getattr(fresh_inner, attribute)
        assert list(back) == list(saved)
        assert all(np.array_equal(back[k], saved[k]) and back[k].dtype == saved[k].dtype for k in saved)


def test_legacy_fedadam_lists_are_restored_as_lists(tmp_path):
    from flwr.common import ndarrays_to_parameters
    from flwr.server.strategy import FedAdam as LegacyFedAdam

    def build():
        return LegacyFedAdam(initial_parameters=ndarrays_to_parameters([np.zeros(5, np.float32)]))

    strategy = build()
    strategy.m_t, strategy.v_t = [np.arange(5.0)], [np.arange(5.0) ** 2]
    name = save_strategy_state(tmp_path, 1, strategy)
    fresh = build()
    restore_strategy_state(fresh, tmp_path / "checkpoints" / name)
    assert isinstance(fresh.m_t, list) and np.array_equal(fresh.m_t[0], np.arange(5.0))
    assert np.array_equal(fresh.v_t[0], np.arange(5.0) ** 2)


def test_state_from_another_strategy_is_refused(tmp_path):
    adam = FedAdam()
    adam.m_t = {"w": np.ones(2)}
    name = save_strategy_state(tmp_path, 1, adam)
    assert save_strategy_state(tmp_path, 1, FedAvg()) is None  # nothing to keep
    with pytest.raises(ResumeError, match="holds L0/m_t/w, which this run's strategy does not keep"):
        restore_strategy_state(FedAvg(), tmp_path / "checkpoints" / name)


class _Nodes:
    """The part of Flower's Grid that a strategy's configure_* uses."""

    def get_node_ids(self):
        return [11, 12]


def test_a_resumed_gate_numbers_the_rounds_after_the_offset(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_node_id", 1), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)
    state = BudgetState(LedgerStore.__new__(LedgerStore))
    state.ledgers.heads = {}
    gate = BudgetGatedStrategy(FedAvg(min_available_nodes=2), state, round_offset=4)
    arrays = ArrayRecord({"w": Array(np.zeros(2, np.float32))})
    for configure in (gate.configure_train, gate.configure_evaluate):
        messages = list(configure(1, arrays, ConfigRecord({}), _Nodes()))
        assert {m.content["config"][protocol.SERVER_ROUND] for m in messages} == {5}
    assert gate.global_arrays is arrays
