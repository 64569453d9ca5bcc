"""A classifier's scores from per-class counts summed over organisations: macro-F1 and per-class precision /
recall / F1.

Plain arithmetic on counts, with no model in sight: a node scores its own evaluation (client/evaluation.py) and
the server the federation's sums (server/round_tracker.py) with the same definitions, and the server never needs
torch for it.
"""

from __future__ import annotations


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator else None


def per_class_scores(labels: list[str], tp: list[float], fp: list[float], fn: list[float]) -> list[dict]:
    """Precision, recall, F1 and support of each class from summed counts; None where a ratio is undefined
    (no prediction of the class, no example of it), as :func:`macro_f1` leaves such a class out."""
    return [
        {
            "label": label,
            "precision": _ratio(t, t + p),
            "recall": _ratio(t, t + n),
            "f1": _ratio(2 * t, 2 * t + p + n),
            "support": int(t + n),
        }
        for label, t, p, n in zip(labels, tp, fp, fn, strict=True)
    ]


def macro_f1(tp: list[float], fp: list[float], fn: list[float]) -> float:
    """Mean F1 over classes that occur in the labels or the predictions."""
    scores = []
    for t, p, n in zip(tp, fp, fn, strict=True):
        if t + p + n == 0:
            continue
        scores.append(2 * t / (2 * t + p + n))
    return sum(scores) / len(scores) if scores else 0.0
