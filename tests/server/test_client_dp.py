"""Organisation-level DP (``client_dp``): the released aggregate's sensitivity matches what the ledger accounts.

Neighbouring relation: add or remove one organisation's whole contribution to a round. The mechanism is checked
from the outside (noise captured, aggregates compared with and without one organisation) and its epsilon
recomputed with an independent accountant (Google's ``dp_accounting``), never with fedpriv's own code.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
from dp_accounting import dp_event
from dp_accounting.rdp import RdpAccountant
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg

from fedpriv.kernel import protocol
from fedpriv.kernel.config import ClientDPConfig
from fedpriv.kernel.errors import ConfigError
from fedpriv.server import client_dp

pytestmark = pytest.mark.usefixtures("flower_task_identity")

DIM = 8
PLANNED = 4
CLIP = 1.0
DELTA = 1e-5


def rdp_epsilon(events, delta=DELTA) -> float:
    """Independent RDP accounting (no amplification by sampling): epsilon of composed Gaussian mechanisms."""
    accountant = RdpAccountant()
    for event in events:
        accountant.compose(event)
    return accountant.get_epsilon(delta)


class CapturedNoise:
    """Stands in for the noise source: records every standard deviation asked for and adds nothing."""

    def __init__(self):
        self.scales: list[float] = []  # noise added to the arrays
        self.scalar_scales: list[float] = []  # noise added to one number (adaptive clipping's count)

    def normal(self, loc=0.0, scale=1.0, size=None):
        if size is None:
            self.scalar_scales.append(float(scale))
            return float(loc)
        self.scales.append(float(scale))
        return np.zeros(size) + loc


@pytest.fixture
def noise(monkeypatch):
    captured = CapturedNoise()
    monkeypatch.setattr(np.random, "normal", captured.normal)  # Flower's wrappers draw from numpy's global RNG
    return captured


class Grid:
    def __init__(self, nodes):
        self.nodes = list(nodes)

    def get_node_ids(self):
        return self.nodes


def dp_strategy(cfg: ClientDPConfig, noise: CapturedNoise, inner=None):
    inner = inner or FedAvg(weighted_by_key=protocol.UNIT_WEIGHT, min_available_nodes=1, min_train_nodes=1)
    strategy = client_dp.wrap(cfg, inner, PLANNED)
    strategy.rng = noise  # fedpriv's own noise source (ignored by Flower's wrappers, which the fixture covers)
    return strategy


def model(values) -> ArrayRecord:
    return ArrayRecord({"w": Array(np.asarray(values, dtype=np.float64))})


def reply(to: Message, values) -> Message:
    content = RecordDict(
        {
            protocol.ARRAYS: model(values),
            protocol.METRICS: MetricRecord({protocol.UNIT_WEIGHT: 1, protocol.NUM_EXAMPLES: 10}),
        }
    )
    return Message(content, reply_to=to)


def release(strategy, server_round: int, current, updates) -> np.ndarray:
    """The aggregate ``strategy`` releases when the organisations send ``current + update`` (one each)."""
    sent = list(strategy.configure_train(server_round, model(current), ConfigRecord({}), Grid(range(1, 9))))
    replies = [reply(message, np.asarray(current) + u) for message, u in zip(sent, updates, strict=False)]
    arrays, _ = strategy.aggregate_train(server_round, replies)
    return arrays["w"].numpy().astype(np.float64)


def unit(i=0) -> np.ndarray:
    u = np.zeros(DIM)
    u[i] = 1.0
    return u


def fixed_cfg(**kw) -> ClientDPConfig:
    return ClientDPConfig(enabled=True, noise_multiplier=1.0, clipping_norm=CLIP, delta=DELTA, **kw)


def sensitivity_and_noise(cfg, noise) -> tuple[float, float]:
    """The adversarial example: three organisations send +u, the fourth -u (each far beyond the clip norm).

    Returns the L2 distance between the released (pre-noise) aggregates with and without the fourth
    organisation, and the noise standard deviation the mechanism added."""
    current = np.full(DIM, 0.5)
    big = 5.0 * unit()
    with_fourth = release(dp_strategy(cfg, noise), 1, current, [big, big, big, -big])
    without = release(dp_strategy(cfg, noise), 1, current, [big, big, big])
    scales = set(noise.scales)
    assert len(scales) == 1, noise.scales
    return float(np.linalg.norm(with_fourth - without)), scales.pop()


def test_removing_one_organisation_moves_the_release_by_at_most_c_over_n_planned(noise):
    """Fixed-denominator estimator (McMahan et al. 2018): sum of clipped deltas / n_planned, whoever answers."""
    cfg = fixed_cfg()
    distance, std = sensitivity_and_noise(cfg, noise)
    assert distance <= CLIP / PLANNED + 1e-9  # averaging over the replies received gives 2C/n = 0.5 here
    assert std == pytest.approx(cfg.noise_multiplier * CLIP / PLANNED)


def test_the_recorded_epsilon_bounds_the_mechanism_that_runs(noise, tmp_path):
    cfg = fixed_cfg()
    distance, std = sensitivity_and_noise(cfg, noise)
    true_sigma = std / distance  # noise in units of the measured add/remove sensitivity
    account = client_dp.ClientDPAccount(cfg, tmp_path, PLANNED, say=lambda _: None)
    entry = account.record(1, PLANNED, model(np.zeros(DIM)), CLIP)
    assert entry["epsilon"] >= rdp_epsilon([dp_event.GaussianDpEvent(true_sigma)]) - 1e-9
    assert entry["epsilon"] == pytest.approx(rdp_epsilon([dp_event.GaussianDpEvent(entry["noise_multiplier"])]))


def test_released_sum_of_random_updates_has_sensitivity_c_over_n_planned(noise):
    """Any organisation removed, any updates (clipped or not): the release moves by at most C/n_planned."""
    rng = np.random.default_rng(7)
    cfg = fixed_cfg()
    current = rng.normal(size=DIM)
    for _ in range(5):
        updates = [rng.normal(size=DIM) * rng.uniform(0.1, 3.0) for _ in range(PLANNED)]
        full = release(dp_strategy(cfg, noise), 1, current, updates)
        for gone in range(PLANNED):
            rest = [u for i, u in enumerate(updates) if i != gone]
            assert np.linalg.norm(full - release(dp_strategy(cfg, noise), 1, current, rest)) <= CLIP / PLANNED + 1e-9


def test_fewer_answers_than_planned_keep_the_denominator_and_the_recorded_sigma(noise, tmp_path):
    cfg = fixed_cfg()
    current = np.zeros(DIM)
    released = release(dp_strategy(cfg, noise), 1, current, [3 * unit(), 3 * unit(), 3 * unit()])  # 3 of 4
    np.testing.assert_allclose(released, 3 * CLIP * unit() / PLANNED)  # sum / n_planned, not the mean
    assert noise.scales == [pytest.approx(cfg.noise_multiplier * CLIP / PLANNED)]
    said = []
    account = client_dp.ClientDPAccount(cfg, tmp_path, PLANNED, say=said.append)
    entry = account.record(1, 3, model(released), CLIP)
    assert entry["noise_multiplier"] == cfg.noise_multiplier
    assert entry["epsilon"] == pytest.approx(rdp_epsilon([dp_event.GaussianDpEvent(cfg.noise_multiplier)]))
    assert entry["num_examples"] == 3  # the organisations that answered
    assert entry["organisations_planned"] == PLANNED and entry["estimator"] == "fixed_denominator"
    assert entry["neighbouring"] == "add/remove one organisation"


@pytest.mark.parametrize("max_epsilon", [4.0, 10.0, 11.0])
def test_round_one_is_refused_when_its_true_epsilon_passes_the_budget(noise, tmp_path, max_epsilon):
    """The budget check uses the epsilon of the mechanism that runs: one round at sigma=1 must fit max_epsilon."""
    cfg = fixed_cfg(max_epsilon=max_epsilon)
    distance, std = sensitivity_and_noise(cfg, noise)
    one_round = rdp_epsilon([dp_event.GaussianDpEvent(std / distance)])
    account = client_dp.ClientDPAccount(cfg, tmp_path, PLANNED, say=lambda _: None)
    reason = account.refusal_reason()
    assert (reason is not None) == (one_round > max_epsilon), (one_round, reason)
    if reason is not None:
        assert "client_dp.max_epsilon" in reason


def test_a_budget_for_two_rounds_refuses_the_third(tmp_path):
    cfg = fixed_cfg(max_epsilon=8.0)  # sigma 1: 4.73 after one round, 7.08 after two, 9.01 after three
    account = client_dp.ClientDPAccount(cfg, tmp_path, PLANNED, say=lambda _: None)
    for server_round in (1, 2):
        assert account.refusal_reason() is None
        account.record(server_round, PLANNED, model(np.zeros(DIM)), CLIP)
    assert "client_dp.max_epsilon=8" in account.refusal_reason()
    assert account.epsilon() == pytest.approx(rdp_epsilon([dp_event.GaussianDpEvent(1.0)] * 2))


# --------------------------------------------------------------------------- adaptive clipping (Andrew et al. 2021)


def adaptive_cfg(**kw) -> ClientDPConfig:
    return fixed_cfg(clipping="adaptive", clipped_count_stddev=2.0, clip_norm_lr=0.2, **kw)


def adaptive_round(cfg, noise, updates, current=None):
    """(released pre-noise aggregate, clip norm used, clip norm after, update noise std, count noise std)."""
    strategy = dp_strategy(cfg, noise)
    used = strategy.clipping_norm
    noise.scales.clear()
    noise.scalar_scales.clear()
    released = release(strategy, 1, np.zeros(DIM) if current is None else current, updates)
    assert len(noise.scales) == 1 and len(noise.scalar_scales) == 1, (noise.scales, noise.scalar_scales)
    return released, used, strategy.clipping_norm, noise.scales[0], noise.scalar_scales[0]


def test_adaptive_clipping_accounts_for_the_noised_count(noise, tmp_path):
    """Update sum with multiplier z_delta and the count of unclipped updates with std sigma_b: together they
    must be no less private than one Gaussian mechanism with the recorded multiplier (Andrew et al. 2021)."""
    cfg = adaptive_cfg()
    small, big = 0.5 * unit(), -5.0 * unit()  # three unclipped, the fourth clipped and opposite
    with_fourth, used, after_with, update_std, count_std = adaptive_round(cfg, noise, [small, small, small, big])
    without, _, after_without, _, _ = adaptive_round(cfg, noise, [small, small, small])
    # the update: noise std over the measured add/remove sensitivity
    z_update = update_std / max(float(np.linalg.norm(with_fourth - without)), 1e-12)
    # the count, read back from the clip-norm step (geometric update), in count units (fraction x n_planned)
    fraction = lambda after: cfg.target_clipped_quantile - math.log(after / used) / cfg.clip_norm_lr  # noqa: E731
    count_sensitivity = abs(fraction(after_with) - fraction(after_without)) * PLANNED
    z_count = count_std / count_sensitivity
    true = rdp_epsilon([dp_event.GaussianDpEvent(z_update), dp_event.GaussianDpEvent(z_count)])
    account = client_dp.ClientDPAccount(cfg, tmp_path, PLANNED, say=lambda _: None)
    entry = account.record(1, PLANNED, model(with_fourth), used)
    assert entry["epsilon"] >= true - 1e-9, (z_update, z_count, entry["noise_multiplier"])
    assert entry["epsilon"] == pytest.approx(true, rel=1e-6)  # tight: the pair is exactly one Gaussian with z
    assert entry["max_grad_norm"] == used


def test_adaptive_clip_norm_grows_when_most_updates_are_clipped(noise):
    """Andrew et al.: the norm tracks the target quantile of the update norms (here all far above it)."""
    _, used, after, _, _ = adaptive_round(adaptive_cfg(), noise, [5.0 * unit()] * PLANNED)
    assert after > used
    _, used, after, _, _ = adaptive_round(adaptive_cfg(), noise, [0.01 * unit()] * PLANNED)
    assert after < used


def test_adaptive_noise_uses_the_clip_norm_of_the_round(noise):
    cfg = adaptive_cfg()
    _, used, after, update_std, count_std = adaptive_round(cfg, noise, [5.0 * unit()] * PLANNED)
    assert after != used
    z_update = (cfg.noise_multiplier**-2 - (2 * cfg.clipped_count_stddev) ** -2) ** -0.5  # Andrew et al. 2021
    assert update_std == pytest.approx(z_update * used / PLANNED)  # the norm the updates were clipped to
    assert count_std == pytest.approx(cfg.clipped_count_stddev)


def test_adaptive_with_too_little_count_noise_is_refused_naming_the_field():
    cfg = dataclasses.replace(adaptive_cfg(), clipped_count_stddev=0.4)  # 2 * 0.4 < noise_multiplier 1
    with pytest.raises(ConfigError, match=r"^config: client_dp\.clipped_count_stddev: ") as caught:
        client_dp.wrap(cfg, FedAvg(weighted_by_key=protocol.UNIT_WEIGHT), PLANNED)
    assert "\n" not in str(caught.value)
    default = ClientDPConfig(enabled=True, clipping="adaptive")  # sigma_b = n/20 = 0.2: too small for z = 1
    with pytest.raises(ConfigError, match=r"client_dp\.clipped_count_stddev"):
        client_dp.wrap(default, FedAvg(weighted_by_key=protocol.UNIT_WEIGHT), PLANNED)


# --------------------------------------------------------------------------- what the inner strategy sees


def test_fedadam_only_post_processes_the_release(noise):
    """The server optimiser sees the noised release, never one organisation's update."""
    cfg = fixed_cfg()
    inner = FedAdam(weighted_by_key=protocol.UNIT_WEIGHT, min_available_nodes=1, min_train_nodes=1, eta=0.1)
    current = np.zeros(DIM)
    strategy = dp_strategy(cfg, noise, inner)
    seen = []
    aggregate = inner.aggregate_train

    def spy(server_round, replies):
        replies = list(replies)
        seen.extend(r.content[protocol.ARRAYS]["w"].numpy().copy() for r in replies if not r.has_error())
        return aggregate(server_round, replies)

    inner.aggregate_train = spy
    release(strategy, 1, current, [3 * unit(0), -3 * unit(0), 0.5 * unit(1)])
    expected = (CLIP * unit(0) - CLIP * unit(0) + 0.5 * unit(1)) / PLANNED
    assert len(seen) == 3 and all(np.allclose(s, expected) for s in seen)


def test_error_replies_leave_the_others_in_the_release(noise):
    cfg = fixed_cfg()
    strategy = dp_strategy(cfg, noise)
    sent = list(strategy.configure_train(1, model(np.zeros(DIM)), ConfigRecord({}), Grid(range(1, 5))))
    from flwr.app import Error

    replies = [reply(sent[0], unit()), reply(sent[1], unit()), Message(Error(code=0, reason="gone"), reply_to=sent[2])]
    arrays, _ = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["w"].numpy(), 2 * unit() / PLANNED)


def test_summary_states_the_estimator_and_the_neighbouring_relation(tmp_path):
    summary = client_dp.ClientDPAccount(fixed_cfg(), tmp_path, PLANNED, say=lambda _: None).summary()
    assert summary["estimator"] == "fixed_denominator" and summary["organisations_planned"] == PLANNED
    assert summary["neighbouring"] == "add/remove one organisation"
    for name in ("level", "clipping", "noise_multiplier", "delta", "epsilon", "max_epsilon", "rounds"):
        assert name in summary  # the contract's fields stay
    assert summary["organisations_per_round"] == PLANNED


# --------------------------------------------------------------------------- one whole simulation


@pytest.mark.integration
def test_simulation_records_the_epsilon_an_independent_accountant_finds(tmp_path):
    """``fedpriv simulate`` with client_dp: each ledger entry's epsilon is dp_accounting's RDP for the recorded
    noise multipliers, composed over the rounds."""
    from tests.shared_runs import simulate

    proc, out = simulate(
        tmp_path,
        "model.name=tiny",
        "training.rounds=2",
        "client_dp.enabled=true",
        "partitioning.num_orgs=2",
        "partitioning.scheme=iid",
        "data.max_examples=120",
        "training.batch_size=16",
        "data.max_length=32",
        "privacy.enabled=false",  # organisation-level DP alone: no Opacus, a few seconds a round
        "output.export_model=false",
    )
    entries = [
        json.loads(line)
        for line in (out / "ledgers" / "coordinator.jsonl").read_text().splitlines()
        if json.loads(line)["kind"] == "client_dp_round"
    ]
    assert [e["round"] for e in entries] == [1, 2]
    for upto, entry in enumerate(entries, start=1):
        assert entry["noise_multiplier"] == 1.0 and entry["estimator"] == "fixed_denominator"
        assert entry["organisations_planned"] == 2 and entry["sample_rate"] == 1.0
        events = [dp_event.GaussianDpEvent(e["noise_multiplier"]) for e in entries[:upto]]
        assert entry["epsilon"] == pytest.approx(rdp_epsilon(events, entry["delta"]), rel=1e-9)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["client_dp"]["epsilon"] == pytest.approx(entries[-1]["epsilon"])
    assert summary["client_dp"]["neighbouring"] == "add/remove one organisation"


def test_adaptive_clip_norm_is_saved_and_restored_for_a_resume(noise, tmp_path):
    from fedpriv.server.resume import capture_strategy_state, restore_strategy_state

    strategy = dp_strategy(adaptive_cfg(), noise)
    release(strategy, 1, np.zeros(DIM), [5.0 * unit()] * PLANNED)
    saved = capture_strategy_state(strategy)
    assert saved == {"L0/clipping_norm": np.asarray(strategy.clipping_norm)}
    np.savez(tmp_path / "state.npz", **saved)
    fresh = dp_strategy(adaptive_cfg(), noise)
    assert restore_strategy_state(fresh, tmp_path / "state.npz") == ["OrganisationDP.clipping_norm"]
    assert fresh.clipping_norm == strategy.clipping_norm != adaptive_cfg().clipping_norm


def test_replies_that_do_not_fit_the_model_are_left_out_and_nothing_unnoised_is_released(noise):
    strategy = dp_strategy(fixed_cfg(), noise)
    sent = list(strategy.configure_train(1, model(np.zeros(DIM)), ConfigRecord({}), Grid(range(1, 5))))
    misfit = reply(sent[0], np.ones(DIM + 1))
    assert strategy.aggregate_train(1, [misfit]) == (None, None)
    arrays, _ = strategy.aggregate_train(1, [reply(sent[1], unit()), reply(sent[2], np.ones(DIM + 1))])
    np.testing.assert_allclose(arrays["w"].numpy(), unit() / PLANNED)
    assert strategy.released_organisations == 1 and strategy.released_clipping_norm == CLIP
