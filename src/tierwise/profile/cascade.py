"""Cascade curves and threshold choice (the confidence-threshold rule of BranchyNet /
"joint inference": answer on the device when it is confident, escalate otherwise).

Given, on validation data, the first model's calibrated confidence and correctness and the
second model's correctness, escalating every input whose confidence is below a threshold t
gives accuracy(t) and escalation_rate(t). We pick the smallest t — the fewest escalations —
whose accuracy is within a stated margin of the second model alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CascadeChoice:
    threshold: float
    expected_accuracy: float
    expected_escalation_rate: float
    target_accuracy: float
    first_accuracy: float
    then_accuracy: float


def cascade_curve(
    confidence: np.ndarray, first_correct: np.ndarray, then_correct: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(thresholds, accuracy, escalation_rate), one point per distinct number of escalations.

    Point k escalates the k least confident inputs; its threshold is the confidence of the
    (k+1)-th least confident one (escalate iff confidence < threshold), or just above 1 for k=n.
    """
    order = np.argsort(confidence, kind="stable")
    conf = np.asarray(confidence, dtype=np.float64)[order]
    first = np.asarray(first_correct, dtype=np.float64)[order]
    then = np.asarray(then_correct, dtype=np.float64)[order]
    n = len(conf)
    # correct answers when the k lowest are escalated: then[:k].sum() + first[k:].sum()
    then_prefix = np.concatenate([[0.0], np.cumsum(then)])
    first_suffix = np.concatenate([np.cumsum(first[::-1])[::-1], [0.0]])
    accuracy = (then_prefix + first_suffix) / n
    thresholds = np.concatenate([conf, [np.nextafter(1.0, 2.0)]])
    # ties: escalating "confidence < t" cannot split equal confidences, keep first of each run
    keep = np.concatenate([[True], thresholds[1:] != thresholds[:-1]])
    escalation = np.arange(n + 1) / n
    return thresholds[keep], accuracy[keep], escalation[keep]


def choose_threshold(
    confidence: np.ndarray,
    first_correct: np.ndarray,
    then_correct: np.ndarray,
    margin_points: float,
) -> CascadeChoice:
    """The lowest-escalation threshold whose accuracy is ≥ then-model accuracy − margin."""
    thresholds, accuracy, escalation = cascade_curve(confidence, first_correct, then_correct)
    then_accuracy = float(np.mean(then_correct))
    target = then_accuracy - margin_points / 100.0
    feasible = np.flatnonzero(accuracy >= target - 1e-12)
    # escalating everything always reaches the then-model's accuracy, so feasible is non-empty
    best = int(feasible[0])
    return CascadeChoice(
        threshold=float(thresholds[best]),
        expected_accuracy=float(accuracy[best]),
        expected_escalation_rate=float(escalation[best]),
        target_accuracy=target,
        first_accuracy=float(np.mean(first_correct)),
        then_accuracy=then_accuracy,
    )
