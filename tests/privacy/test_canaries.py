"""The one-run empirical bound: valid (never above the truth beyond its confidence) and with power."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from fedpriv.kernel.config import load_config
from fedpriv.kernel.errors import ConfigError
from fedpriv.privacy.canaries import (
    epsilon_lower_bound,
    guess_and_bound,
    make_canaries,
    max_reachable_epsilon,
    p_value,
    reach_note,
)
from fedpriv.privacy.gradient_canaries import (
    CanaryHookError,
    CanaryInjector,
    attach_to_dp_optimizer,
    attach_to_plain_optimizer,
    dirac_scores,
    flat_trainable,
    make_dirac_canaries,
)


def test_chance_level_guessing_gives_no_bound():
    assert epsilon_lower_bound(200, 40, 20, 1e-5, 0.95) == 0.0


def test_all_guesses_right_gives_the_largest_bound_this_many_guesses_allow():
    bound = epsilon_lower_bound(200, 40, 40, 1e-5, 0.95)
    # 40 right out of 40 rejects epsilon while q(eps)^40 <= 0.05, i.e. eps <= log(q / (1 - q)) for q = 0.05^(1/40)
    q = 0.05 ** (1 / 40)
    assert bound == pytest.approx(math.log(q / (1 - q)), rel=0.02)
    assert epsilon_lower_bound(200, 40, 35, 1e-5, 0.95) < bound
    assert epsilon_lower_bound(200, 40, 40, 1e-5, 0.99) < bound  # more confidence, lower bound


def test_p_value_grows_with_epsilon_and_delta():
    values = [p_value(100, 20, 17, eps, 1e-5) for eps in (0.0, 0.5, 1.0, 2.0, 4.0)]
    assert values == sorted(values) and values[0] < 0.01 < values[-1]
    assert p_value(100, 20, 17, 1.0, 1e-3) > p_value(100, 20, 17, 1.0, 1e-6)


@pytest.mark.parametrize("epsilon", [0.5, 2.0])
def test_the_bound_is_valid_against_a_mechanism_that_is_exactly_epsilon_dp(epsilon):
    """Randomised response is epsilon-DP and each guess is right with probability e^eps / (1 + e^eps):
    the 95% lower bound may exceed the true epsilon in at most about 5% of runs."""
    rng = random.Random(7)
    q = 1 / (1 + math.exp(-epsilon))
    trials, above = 200, 0
    for _ in range(trials):
        right = sum(rng.random() < q for _ in range(100))
        above += epsilon_lower_bound(1000, 100, right, 0.0, 0.95) > epsilon
    assert above / trials <= 0.08, above


def test_guessing_uses_the_top_and_bottom_scores():
    included = [True] * 10 + [False] * 10
    perfect = [1.0] * 10 + [-1.0] * 10
    result = guess_and_bound(perfect, included, guesses=5, delta=1e-5, confidence=0.95)
    assert (result["guesses"], result["correct"], result["included"]) == (10, 10, 10)
    assert result["epsilon_lower_bound"] > 0
    flipped = guess_and_bound([-s for s in perfect], included, guesses=5, delta=1e-5, confidence=0.95)
    assert flipped["correct"] == 0 and flipped["epsilon_lower_bound"] == 0.0


def test_canaries_are_a_deterministic_fair_draw():
    vocabulary = [f"word{i}" for i in range(500)]
    first = make_canaries(400, 5, seed=3, vocabulary=vocabulary)
    assert first == make_canaries(400, 5, seed=3, vocabulary=vocabulary)  # the scorer rebuilds the node's set
    assert first != make_canaries(400, 5, seed=4, vocabulary=vocabulary)
    assert 150 < sum(first.included) < 250 and set(first.labels) == set(range(5))
    texts, labels = first.inserted()
    assert len(texts) == len(labels) == sum(first.included)


# ----------------------------------------------------------------------------- what an audit can show at all


def test_the_reachable_bound_is_the_bound_of_all_guesses_right():
    # delta 0: r right guesses of r reject epsilon while q(eps)^r <= 1 - confidence: eps = log(q / (1 - q))
    for m, k in ((200, 20), (1000, 500), (16000, 8000)):
        q = 0.05 ** (1 / (2 * k))
        assert max_reachable_epsilon(m, k, 0.0, 0.95) == pytest.approx(math.log(q / (1 - q)), rel=1e-3)
        assert max_reachable_epsilon(m, k, 1e-5, 0.95) == epsilon_lower_bound(m, 2 * k, 2 * k, 1e-5, 0.95)
    # known values at delta 1e-5 and 95%: the old defaults cap the bound at 2.55, the new ones reach past 8
    assert max_reachable_epsilon(200, 20, 1e-5, 0.95) == pytest.approx(2.548, abs=0.002)
    assert max_reachable_epsilon(16000, 8000, 1e-5, 0.95) == pytest.approx(8.112, abs=0.002)
    # the delta term (2 m delta) caps what more canaries add
    assert max_reachable_epsilon(50000, 25000, 1e-5, 0.95) < 8.25
    assert max_reachable_epsilon(16000, 8000, 1e-5, 0.99) < max_reachable_epsilon(16000, 8000, 1e-5, 0.95)


def test_a_bound_never_passes_the_reachable_bound():
    for right in (0, 20, 30, 39, 40):
        assert epsilon_lower_bound(200, 40, right, 1e-5, 0.95) <= max_reachable_epsilon(200, 20, 1e-5, 0.95)


def test_the_report_says_plainly_when_a_claim_is_out_of_reach():
    note = reach_note(2.548, 8.0)
    assert "cannot contradict a claim above 2.55" in note
    assert reach_note(8.11, 8.0) == ""
    assert "cannot show an epsilon above 8.11" in reach_note(8.11, None)
    result = guess_and_bound([1.0] * 10 + [-1.0] * 10, [True] * 10 + [False] * 10, 5, 1e-5, 0.95)
    assert result["max_reachable_epsilon"] == pytest.approx(max_reachable_epsilon(20, 5, 1e-5, 0.95))
    assert result["epsilon_lower_bound"] <= result["max_reachable_epsilon"]


def test_the_default_audit_has_power_against_epsilon_8_and_text_canaries_are_configurable():
    cfg = load_config(None, ["canary_audit.enabled=true"]).canary_audit
    assert (cfg.kind, cfg.count, cfg.guesses_each_way) == ("gradient", 16000, 8000)
    assert max_reachable_epsilon(cfg.count, cfg.guesses_each_way, 1e-5, cfg.confidence) >= 8.0
    text = load_config(None, ["canary_audit.enabled=true", "canary_audit.kind=text"]).canary_audit
    assert (text.count, text.guesses_each_way) == (200, 20)
    mine = load_config(None, ["canary_audit.kind=gradient", "canary_audit.canaries=1000"]).canary_audit
    assert (mine.count, mine.guesses_each_way) == (1000, 500)
    with pytest.raises(ConfigError, match="canary_audit.kind"):
        load_config(None, ["canary_audit.kind=pixels"])
    with pytest.raises(ConfigError, match="canary_audit.guesses"):
        load_config(None, ["canary_audit.enabled=true", "canary_audit.canaries=100", "canary_audit.guesses=51"])


# ----------------------------------------------------------------------------- gradient (Dirac) canaries


def test_dirac_canaries_are_a_deterministic_fair_draw_of_distinct_coordinates():
    first = make_dirac_canaries(4000, 100_000, seed=1, norm=1.0)
    assert first.coordinates.tolist() == make_dirac_canaries(4000, 100_000, seed=1, norm=1.0).coordinates.tolist()
    assert first.included == make_dirac_canaries(4000, 100_000, seed=1, norm=1.0).included
    assert first.coordinates.tolist() != make_dirac_canaries(4000, 100_000, seed=2, norm=1.0).coordinates.tolist()
    assert len(set(first.coordinates.tolist())) == 4000 and first.coordinates.max() < 100_000
    assert 1800 < sum(first.included) < 2200 and set(first.signs.tolist()) == {-1.0, 1.0}
    with pytest.raises(ValueError, match="trainable coordinates"):
        make_dirac_canaries(4000, 3999, seed=1, norm=1.0)


SPARSE_FEATURES = 10  # the data uses 10 of the 100 inputs: most weights are coordinates it never touches


def _train_with_canaries(canaries, *, noise_multiplier: float | None, mode: str = "hooks", steps: int = 60):
    """A linear model on sparse data, DP-SGD through Opacus (None: plain SGD), canaries attached; its flat weights
    before and after."""
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    features = torch.zeros(200, 100)
    features[:, :SPARSE_FEATURES] = torch.randn(200, SPARSE_FEATURES)
    labels = (features[:, 0] > 0).long() + 2 * (features[:, 1] > 0).long()
    model = torch.nn.Linear(100, 50)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.5)
    loader = DataLoader(TensorDataset(features, labels), batch_size=20)
    sample_rate = 20 / 200
    before = flat_trainable(model)
    generator = torch.Generator().manual_seed(1)
    injector = CanaryInjector(canaries, params, norm=1.0, sample_rate=sample_rate, generator=generator)
    criterion = torch.nn.CrossEntropyLoss()
    if noise_multiplier is None:
        attach_to_plain_optimizer(optimizer, injector, batch_size=20)
    else:
        extra = {"criterion": criterion} if mode == "ghost" else {}
        wrapped = PrivacyEngine().make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=noise_multiplier,
            max_grad_norm=1.0, poisson_sampling=True, grad_sample_mode=mode, **extra,
        )  # fmt: skip
        model, optimizer, *rest = wrapped
        criterion, loader = (rest[0], rest[1]) if mode == "ghost" else (criterion, rest[0])
        attach_to_dp_optimizer(optimizer, injector)
    done = 0
    while done < steps:
        for x, y in loader:
            optimizer.zero_grad()
            if len(y):
                criterion(model(x), y).backward()
            else:  # an empty Poisson batch is still a (noise-only) step
                for p in params:
                    p.grad_sample, p.grad = torch.zeros((0, *p.shape)), torch.zeros_like(p)
            optimizer.step()
            done += 1
            if done == steps:
                break
    assert injector.steps == steps  # sampled once per step, as an example is
    assert injector.added == pytest.approx(sample_rate * steps * sum(canaries.included), rel=0.15)
    return before, flat_trainable(model)


def _bound(canaries, before, after) -> dict:
    scores = dirac_scores(before, after, canaries)
    return guess_and_bound(scores, canaries.included, canaries.count // 2, 1e-5, 0.95)


def test_without_noise_gradient_canaries_are_found_and_under_dp_the_bound_stays_below_the_claim():
    canaries = make_dirac_canaries(4000, 100 * 50 + 50, seed=0, norm=1.0)
    # no noise (plain SGD, canaries as examples of the batch mean): nearly every guess right
    plain = _bound(canaries, *_train_with_canaries(canaries, noise_multiplier=None))
    assert plain["correct"] >= 0.97 * plain["guesses"], plain
    assert plain["epsilon_lower_bound"] > 3.0, plain  # measured: 3940 of 4000 right, 3.96
    # clipped but noiseless DP-SGD: the canaries stand out as much
    noiseless = _bound(canaries, *_train_with_canaries(canaries, noise_multiplier=0.0))
    assert noiseless["epsilon_lower_bound"] > 3.0, noiseless
    # DP-SGD calibrated to epsilon 8 over these 60 steps: the bound stays below the claim (which it could reach)
    from opacus.accountants.utils import get_noise_multiplier

    sigma = get_noise_multiplier(target_epsilon=8.0, target_delta=1e-5, sample_rate=0.1, steps=60, accountant="rdp")
    private = _bound(canaries, *_train_with_canaries(canaries, noise_multiplier=sigma))
    assert private["epsilon_lower_bound"] <= 8.0, private
    assert private["correct"] < noiseless["correct"]


def test_the_canaries_go_into_the_clipped_sum_in_ghost_mode_too():
    canaries = make_dirac_canaries(4000, 100 * 50 + 50, seed=0, norm=1.0)
    result = _bound(canaries, *_train_with_canaries(canaries, noise_multiplier=0.0, mode="ghost"))
    assert result["epsilon_lower_bound"] > 3.0, result  # measured 4.1 (hooks, same steps)


def test_the_hook_refuses_what_it_cannot_audit():
    model = torch.nn.Linear(4, 2)
    params = list(model.parameters())
    canaries = make_dirac_canaries(5, 10, seed=0, norm=1.0)
    injector = CanaryInjector(canaries, params, norm=1.0, sample_rate=0.5, generator=torch.Generator())
    with pytest.raises(CanaryHookError, match="DPOptimizer"):
        attach_to_dp_optimizer(torch.optim.SGD(params, lr=0.1), injector)
    with pytest.raises(CanaryHookError, match="trainable coordinates"):
        CanaryInjector(canaries, params[:1], norm=1.0, sample_rate=0.5, generator=torch.Generator())
    from opacus.optimizers import DPOptimizer

    optimizer = DPOptimizer(torch.optim.SGD(params, lr=0.1), noise_multiplier=1.0, max_grad_norm=1.0,
                            expected_batch_size=4)  # fmt: skip
    attach_to_dp_optimizer(optimizer, injector)
    with pytest.raises(CanaryHookError, match="already wrapped"):
        attach_to_dp_optimizer(optimizer, injector)


def test_only_the_audited_simulated_organisation_gets_canaries(tmp_path):
    from types import SimpleNamespace

    from fedpriv.client import node as nodes
    from fedpriv.client.task import _gradient_canaries

    base = ["model.name=tiny", "model.finetuning=full", "partitioning.num_orgs=2", "partitioning.scheme=iid",
            "data.max_examples=80", "data.max_length=16", "training.batch_size=8", "canary_audit.enabled=true",
            "canary_audit.org=1"]  # fmt: skip
    cfg = load_config(None, base)
    assert [nodes._load_partition(cfg, pid).audited for pid in (0, 1)] == [False, True]
    off = load_config(None, [*base, "canary_audit.enabled=false"])
    assert not nodes._load_partition(off, 1).audited
    # text canaries join the audited organisation's data only; gradient canaries leave every organisation's data
    text = load_config(None, [*base, "canary_audit.kind=text", "canary_audit.canaries=20", "canary_audit.guesses=5"])
    sizes = [len(nodes._load_partition(text, pid).train) for pid in (0, 1)]
    plain = [len(nodes._load_partition(cfg, pid).train) for pid in (0, 1)]
    assert sizes[0] == plain[0] and sizes[1] > plain[1]
    model = torch.nn.Linear(200, 100)  # 20,100 coordinates
    assert _gradient_canaries(cfg, SimpleNamespace(audited=False), model) is None
    assert _gradient_canaries(text, SimpleNamespace(audited=True), model) is None
    drawn = _gradient_canaries(cfg, SimpleNamespace(audited=True), model)
    assert drawn.count == 16000 and drawn.num_coordinates == 20100 and drawn.norm == cfg.privacy.max_grad_norm


@pytest.mark.parametrize("kind", ["gradient", "text"])
def test_the_scorer_writes_the_bound_and_the_reach_for_either_kind(tmp_path, kind):
    """An untrained final model (the initial weights as round 1's checkpoint): no canary stands out."""
    from flwr.app import ArrayRecord

    from fedpriv.server.checkpoints import save_checkpoint
    from fedpriv.shared_models.builder import build_model
    from fedpriv.shared_models.weights import trainable_state
    from fedpriv.simulations.canary_audit import EMPIRICAL_FILE, describe, run_canary_audit

    cfg = load_config(None, ["model.name=tiny", "model.finetuning=full", "partitioning.num_orgs=2",
                             "data.max_examples=80", "training.batch_size=8", "canary_audit.enabled=true",
                             f"canary_audit.kind={kind}"])  # fmt: skip
    labels = ["business", "entertainment", "politics", "sport", "tech"]
    save_checkpoint(tmp_path, 1, ArrayRecord(torch_state_dict=trainable_state(build_model(cfg.model, labels))))
    summary = {"label_names": labels, "rounds": [{"round": 1}], "dp_enabled": False, "privacy": {}}
    result = run_canary_audit(cfg, tmp_path, summary)
    assert result == json.loads((tmp_path / EMPIRICAL_FILE).read_text())
    assert result["kind"] == kind and result["org"] == "org-0" and result["claimed_epsilon"] is None
    expected = {"gradient": (16000, 16000, 8.112), "text": (200, 40, 2.548)}[kind]
    assert (result["canaries"], result["guesses"]) == expected[:2]
    assert result["max_reachable_epsilon"] == pytest.approx(expected[2], abs=0.002)
    assert result["epsilon_lower_bound"] < 1.0 and result["can_contradict_claim"] is None
    assert f"cannot show an epsilon above {expected[2]:.2f}" in describe(result)
