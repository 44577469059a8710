"""Accuracy and macro-F1 of predicted label ids."""

from __future__ import annotations

from typing import Sequence

__all__ = ["accuracy", "macro_f1"]


def accuracy(predicted: Sequence[int], expected: Sequence[int]) -> float:
    """Fraction of positions where ``predicted`` equals ``expected``."""
    return sum(p == e for p, e in zip(predicted, expected)) / len(expected)


def macro_f1(predicted: Sequence[int], expected: Sequence[int]) -> float:
    """The unweighted mean over labels of ``F1 = 2 TP / (2 TP + FP + FN)``.

    The mean runs over the labels that occur in ``expected`` or ``predicted``
    (as scikit-learn's ``f1_score(average="macro")`` without ``labels=``), so
    a label absent from a small held-out set neither helps nor hurts.
    """
    scores = []
    for label in sorted(set(expected) | set(predicted)):
        tp = sum(p == label and e == label for p, e in zip(predicted, expected))
        fp = sum(p == label and e != label for p, e in zip(predicted, expected))
        fn = sum(p != label and e == label for p, e in zip(predicted, expected))
        scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores)
