"""Empirical privacy audit with one training run (Steinke, Nasr and Jagielski, NeurIPS 2023).

m canaries are drawn; each is included in one organisation's training with
probability 1/2, independently: random word sequences with random labels put
into its data (text canaries, below), or gradient-space Dirac canaries added to
its clipped gradient sums (privacy/gradient_canaries.py). After training, the
auditor scores every canary (how well the final model fits a text canary; how
far a gradient canary's coordinate moved in its direction), guesses "in" for
the k best and "out" for the k worst, and counts right guesses. Under (epsilon, delta)-DP the count of right
guesses among r is dominated by Binomial(r, e^eps / (1 + e^eps)) up to a delta
term (their Theorem 3.1); the largest epsilon that this rejects at the chosen
confidence is an empirical lower bound on the real epsilon. A correct DP
implementation can never be caught with a bound above its claimed epsilon
(except with probability 1 - confidence); a model that memorises shows a bound
well above zero.

The bound can never exceed what ``max_reachable_epsilon`` gives (every guess
right): with m canaries and k guesses each way, that caps what the audit can
say. 200 canaries and 20 guesses cannot show more than 2.55, so they can never
contradict a claim of epsilon 8; 16,000 canaries all guessed reach 8.11 (at
95% confidence and delta 1e-5), and more canaries add little beyond that,
because the delta term grows with m.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

CANARY_PREFIX = "canary"


@dataclass(frozen=True)
class Canaries:
    texts: list[str]
    labels: list[int]  # class indices
    included: list[bool]  # drawn once, before training; only the "in" ones reach the organisation's data

    def inserted(self) -> tuple[list[str], list[int]]:
        pairs = [(t, y) for t, y, keep in zip(self.texts, self.labels, self.included, strict=True) if keep]
        return [t for t, _ in pairs], [y for _, y in pairs]


def make_canaries(count: int, num_labels: int, seed: int, vocabulary: list[str], length: int = 12) -> Canaries:
    """``count`` sentences of ``length`` random vocabulary words, random labels, inclusion by a fair coin each."""
    if len(vocabulary) < length:
        raise ValueError("the vocabulary for canaries is too small")
    rng = random.Random(f"fedpriv-canaries:{seed}")
    texts = [" ".join(rng.sample(vocabulary, length)) for _ in range(count)]
    labels = [rng.randrange(num_labels) for _ in range(count)]
    included = [rng.random() < 0.5 for _ in range(count)]
    return Canaries(texts, labels, included)


def word_vocabulary(tokenizer, limit: int = 5000) -> list[str]:
    """Whole lowercase words of the tokenizer's vocabulary (no sub-word pieces, no special tokens)."""
    words = sorted(token for token in tokenizer.get_vocab() if token.isalpha() and token.islower() and len(token) > 3)
    return words[:limit] if len(words) > limit else words


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P[at least v of r guesses right] under (epsilon, delta)-DP with m canaries (Theorem 3.1's bound)."""
    import numpy as np
    from scipy.stats import binom

    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    q = 1 / (1 + math.exp(-epsilon))  # accuracy of epsilon-DP randomised response
    tail = float(binom.sf(v - 1, r, q))  # P[Binomial(r, q) >= v]
    if v == 0 or delta == 0:
        return min(1.0, tail)
    # the delta term: the worst spread of P[v > Binomial(r, q) >= v - i] per extra right guess i
    windows = np.cumsum(binom.pmf(np.arange(v - 1, -1, -1), r, q))
    worst = float(np.max(windows / np.arange(1, v + 1)))
    return min(1.0, tail + 2 * m * delta * worst)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, confidence: float) -> float:
    """The largest epsilon rejected at ``confidence`` (0 when even epsilon = 0 is not rejected)."""
    alpha = 1 - confidence
    if p_value(m, r, v, 0.0, delta) > alpha:
        return 0.0
    low, high = 0.0, 1.0
    while p_value(m, r, v, high, delta) <= alpha and high < 100:
        low, high = high, high * 2
    for _ in range(40):  # bisection: p_value grows with epsilon (to 2^-40 of the bracket)
        mid = (low + high) / 2
        if p_value(m, r, v, mid, delta) <= alpha:
            low = mid
        else:
            high = mid
    return low


@lru_cache(maxsize=64)
def max_reachable_epsilon(m: int, guesses: int, delta: float, confidence: float) -> float:
    """The largest bound an audit with ``m`` canaries and ``guesses`` guesses each way can show at all: the one-run
    bound when all 2 x ``guesses`` guesses are right, at ``confidence``. No claim above it can be contradicted."""
    r = min(2 * guesses, m)
    return epsilon_lower_bound(m, r, r, delta, confidence)


def reach_note(reachable: float, claimed: float | None) -> str:
    """What the reachable bound means for the claim, in one sentence (empty when the audit can contradict it)."""
    if claimed is None:
        return f"this audit cannot show an epsilon above {reachable:.2f}, whatever the training does"
    if reachable < claimed:
        return (
            f"this audit cannot contradict a claim above {reachable:.2f}: the claimed epsilon {claimed:.3g} is out"
            " of its reach (more canaries or guesses raise the reach)"
        )
    return ""


def guess_and_bound(
    scores: list[float], included: list[bool], guesses: int, delta: float, confidence: float
) -> dict[str, Any]:
    """Guess "in" for the ``guesses`` highest scores and "out" for the lowest; the bound from the right ones."""
    m = len(scores)
    order = sorted(range(m), key=lambda i: scores[i])
    out_guesses, in_guesses = order[:guesses], order[m - guesses :]
    right = sum(included[i] for i in in_guesses) + sum(not included[i] for i in out_guesses)
    r = len(in_guesses) + len(out_guesses)
    return {
        "canaries": m,
        "included": sum(included),
        "guesses": r,
        "correct": right,
        "confidence": confidence,
        "delta": delta,
        "epsilon_lower_bound": epsilon_lower_bound(m, r, right, delta, confidence),
        "max_reachable_epsilon": max_reachable_epsilon(m, guesses, delta, confidence),
    }
