"""Scores of an explanation from a model's yes/no answers on examples whose truth is known."""

from __future__ import annotations

from typing import Any, Sequence


def balanced_accuracy(truth: Sequence[int], answers: Sequence[int]) -> float:
    """(TPR + TNR) / 2 = (TP / #positives + TN / #negatives) / 2, with truth and answers 0/1 per example.
    Needs at least one positive and one negative; 0.5 is chance, 1 is perfect."""
    if len(truth) != len(answers):
        raise ValueError(f"{len(truth)} truths but {len(answers)} answers")
    pos = [a for t, a in zip(truth, answers) if t]
    neg = [a for t, a in zip(truth, answers) if not t]
    if not pos or not neg:
        raise ValueError("balanced accuracy needs at least one positive and one negative example")
    return 0.5 * (sum(1 for a in pos if a) / len(pos) + sum(1 for a in neg if not a) / len(neg))


def score_detail(truth: Sequence[int], answers: Sequence[int]) -> dict[str, Any]:
    """{"balanced_accuracy", "tpr", "tnr", "n_positive", "n_negative", "truth", "answers"} of one feature."""
    n_pos = sum(1 for t in truth if t)
    n_neg = len(truth) - n_pos
    tp = sum(1 for t, a in zip(truth, answers) if t and a)
    tn = sum(1 for t, a in zip(truth, answers) if not t and not a)
    return {"balanced_accuracy": balanced_accuracy(truth, answers), "tpr": tp / n_pos, "tnr": tn / n_neg,
            "n_positive": n_pos, "n_negative": n_neg, "truth": list(truth), "answers": list(answers)}
