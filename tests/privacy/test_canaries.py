"""The one-run empirical bound: valid (never above the truth beyond its confidence) and with power."""

from __future__ import annotations

import math
import random

import pytest

from privacy.canaries import epsilon_lower_bound, guess_and_bound, make_canaries, p_value


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
