"""Confidence calibration by temperature scaling (Guo et al., 2017, "On Calibration of Modern
Neural Networks"): one scalar T fitted on validation logits so that softmax(logits / T) is an
honest probability. numpy only, so devices can apply it."""

from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    scaled -= scaled.max(axis=-1, keepdims=True)
    np.exp(scaled, out=scaled)
    scaled /= scaled.sum(axis=-1, keepdims=True)
    return scaled


def negative_log_likelihood(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    probs = softmax(logits, temperature)
    picked = probs[np.arange(len(labels)), labels]
    return float(-np.log(np.clip(picked, 1e-12, None)).mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T in [0.05, 20] minimising validation NLL (golden-section search on log T; the NLL
    is unimodal in T)."""
    low, high = np.log(0.05), np.log(20.0)
    ratio = (np.sqrt(5) - 1) / 2
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    nll_a = negative_log_likelihood(logits, labels, float(np.exp(a)))
    nll_b = negative_log_likelihood(logits, labels, float(np.exp(b)))
    for _ in range(60):
        if nll_a < nll_b:
            high, b, nll_b = b, a, nll_a
            a = high - ratio * (high - low)
            nll_a = negative_log_likelihood(logits, labels, float(np.exp(a)))
        else:
            low, a, nll_a = a, b, nll_b
            b = low + ratio * (high - low)
            nll_b = negative_log_likelihood(logits, labels, float(np.exp(b)))
    return float(np.exp((low + high) / 2))


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """ECE: the gap between confidence and accuracy, averaged over equal-width confidence bins."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        mask = index == b
        if mask.any():
            total += mask.mean() * abs(correct[mask].mean() - confidence[mask].mean())
    return float(total)
