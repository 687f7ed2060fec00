"""Drift detection: is the data a model now sees still like the data it was checked on?

Each detector compares a sliding window of recent values of one statistic (an input's pixel
mean, the model's confidence, its predicted class...) with a reference window, every `step`
values, and raises an alert when they differ by more than its threshold. A `DriftMonitor`
runs a set of detectors over the statistics of each inference, on the device or at the
collector.
"""

from __future__ import annotations

import importlib.util
import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class DriftScore:
    detector: str
    statistic: str
    sample: int       # how many values the detector had seen when it scored
    score: float
    alert: bool


class DriftDetector(Protocol):
    name: str

    def update(self, value: float) -> DriftScore | None:
        """Take one value; a score every `step` values once both windows are full."""


class _Windowed:
    """Reference = the first `reference_size` values (or those given); current = the last
    `window_size` values; scored every `step` values."""

    name = "windowed"

    def __init__(self, statistic: str, *, reference: Iterable[float] | None = None,
                 reference_size: int = 500, window_size: int = 200, step: int = 25) -> None:
        self.statistic = statistic
        self.reference_size = reference_size
        self.window_size = window_size
        self.step = step
        self.reference: list[float] = list(reference) if reference is not None else []
        self.window: deque[float] = deque(maxlen=window_size)
        self.seen = 0
        if self.reference:
            self._reference_ready()

    def update(self, value: float) -> DriftScore | None:
        self.seen += 1
        if len(self.reference) < self.reference_size:
            self.reference.append(float(value))
            if len(self.reference) == self.reference_size:
                self._reference_ready()
            return None
        self.window.append(float(value))
        if len(self.window) < self.window_size or self.seen % self.step:
            return None
        score = self._score(np.fromiter(self.window, dtype=np.float64))
        return DriftScore(self.name, self.statistic, self.seen, score, self._alert(score))

    def _reference_ready(self) -> None:
        pass

    def _score(self, window: np.ndarray) -> float:
        raise NotImplementedError

    def _alert(self, score: float) -> bool:
        raise NotImplementedError


class PopulationStabilityIndex(_Windowed):
    """PSI = Σ (current% − reference%) · ln(current% / reference%) over `bins` bins cut at the
    reference's quantiles (Siddiqi, *Credit Risk Scorecards*, 2006). Rule of thumb: < 0.1 no
    change, 0.1–0.25 some, > 0.25 a shift; alert above `threshold` (default 0.25). With
    `categorical=True` (a predicted class), each value is its own bin."""

    name = "psi"

    def __init__(self, statistic: str, *, bins: int = 10, threshold: float = 0.25,
                 categorical: bool = False, **window: object) -> None:
        self.bins = bins
        self.threshold = threshold
        self.categorical = categorical
        self.edges = np.array([])
        self.expected = np.array([])
        super().__init__(statistic, **window)  # type: ignore[arg-type]

    def _reference_ready(self) -> None:
        reference = np.asarray(self.reference, dtype=np.float64)
        if self.categorical:
            values = np.unique(reference)
            self.edges = (values[:-1] + values[1:]) / 2  # one bin per class
        else:
            self.edges = np.unique(np.quantile(reference, np.linspace(0, 1, self.bins + 1)[1:-1]))
        self.expected = self._shares(reference)

    def _shares(self, values: np.ndarray) -> np.ndarray:
        counts = np.bincount(np.searchsorted(self.edges, values, side="right"),
                             minlength=len(self.edges) + 1).astype(np.float64)
        return np.maximum(counts / counts.sum(), 1e-4)  # an empty bin must not make it ∞

    def _score(self, window: np.ndarray) -> float:
        actual = self._shares(window)
        return float(np.sum((actual - self.expected) * np.log(actual / self.expected)))

    def _alert(self, score: float) -> bool:
        return score > self.threshold


class KolmogorovSmirnov(_Windowed):
    """The two-sample Kolmogorov–Smirnov test between the reference and the current window:
    the score is the KS statistic D (the largest gap between the two empirical CDFs), and it
    alerts when the p-value (scipy.stats.kstwo at the effective sample size, what
    `scipy.stats.ks_2samp(method="asymp")` computes) is below `alpha` (default 0.001: the
    test runs every `step` values, so a loose alpha would raise false alarms on unchanged
    data). D is computed here with numpy against the sorted reference: several times cheaper
    than calling ks_2samp, which matters on a device checking every 25 inferences."""

    name = "ks"

    def __init__(self, statistic: str, *, alpha: float = 0.001, **window: object) -> None:
        self.alpha = alpha
        self.p_value = 1.0
        self._reference_sorted = np.array([])
        super().__init__(statistic, **window)  # type: ignore[arg-type]

    def _reference_ready(self) -> None:
        self._reference_sorted = np.sort(np.asarray(self.reference, dtype=np.float64))

    def _score(self, window: np.ndarray) -> float:
        try:
            from scipy.stats import kstwo
        except ImportError:
            raise ImportError("the KS drift detector needs scipy: pip install "
                              "'tierwise[monitor]'") from None
        reference, current = self._reference_sorted, np.sort(window)
        values = np.concatenate([reference, current])
        gap = np.abs(np.searchsorted(reference, values, side="right") / len(reference)
                     - np.searchsorted(current, values, side="right") / len(current))
        statistic = float(gap.max())
        effective_n = len(reference) * len(current) / (len(reference) + len(current))
        self.p_value = float(kstwo.sf(statistic, round(effective_n)))
        return statistic

    def _alert(self, score: float) -> bool:
        return self.p_value < self.alpha


# The statistics of one inference that drift is watched on, and whether each is a class.
STATISTICS = {"input_mean": False, "input_std": False, "confidence": False, "label": True}


@dataclass
class DriftMonitor:
    """PSI and KS on every statistic in `STATISTICS` (KS only on continuous ones, and only
    where scipy is installed)."""

    window_size: int = 200
    reference_size: int = 500
    step: int = 25
    history: int = 20_000  # scores and alerts kept, the newest
    detectors: list[DriftDetector] = field(default_factory=list)
    alerts: list[DriftScore] = field(default_factory=list)
    scores: list[DriftScore] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.detectors:
            window = {"window_size": self.window_size, "reference_size": self.reference_size,
                      "step": self.step}
            # a device may run without scipy (the `monitor` extra): PSI alone then
            with_ks = importlib.util.find_spec("scipy") is not None
            for statistic, categorical in STATISTICS.items():
                self.detectors.append(PopulationStabilityIndex(
                    statistic, categorical=categorical, **window))
                if not categorical and with_ks:
                    self.detectors.append(KolmogorovSmirnov(statistic, **window))

    def update(self, statistics: Mapping[str, float | None]) -> list[DriftScore]:
        """Take one inference's statistics; the alerts this raised."""
        raised = []
        for detector in self.detectors:
            value = statistics.get(detector.statistic)  # type: ignore[attr-defined]
            if value is None or (isinstance(value, float) and math.isnan(value)):
                continue
            score = detector.update(float(value))
            if score is not None:
                _keep(self.scores, score, self.history)
                if score.alert:
                    _keep(self.alerts, score, self.history)
                    raised.append(score)
        return raised


def _keep(history: list[DriftScore], score: DriftScore, most: int) -> None:
    """Append, dropping the oldest beyond `most`: a monitor runs for the life of a device."""
    history.append(score)
    if len(history) > most:
        del history[:len(history) - most]
