"""Drift detectors on a known shift and on none, and the drift benchmark end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from tierwise.config import Config
from tierwise.monitor.drift import DriftMonitor, KolmogorovSmirnov, PopulationStabilityIndex


def _feed(detector: PopulationStabilityIndex | KolmogorovSmirnov,
          values: np.ndarray) -> list[int]:
    """The samples at which `detector` alerted."""
    alerts = []
    for value in values:
        score = detector.update(float(value))
        if score is not None and score.alert:
            alerts.append(score.sample)
    return alerts


@pytest.mark.parametrize("make", [
    lambda: PopulationStabilityIndex("x", reference_size=500, window_size=200, step=25),
    lambda: KolmogorovSmirnov("x", reference_size=500, window_size=200, step=25),
], ids=["psi", "ks"])
def test_a_detector_stays_quiet_without_a_shift_and_alerts_soon_after_one(make) -> None:
    rng = np.random.default_rng(0)
    quiet = make()
    assert _feed(quiet, rng.normal(0, 1, 5000)) == []  # 4,500 values, 173 checks: no alarm
    shifted = make()
    before = rng.normal(0, 1, 1500)
    after = rng.normal(0.6, 1, 1000)  # the mean moves by 0.6 standard deviations
    alerts = _feed(shifted, np.concatenate([before, after]))
    assert alerts and all(sample > 1500 for sample in alerts)
    assert alerts[0] - 1500 <= 200  # within one window of the shift


def test_ks_agrees_with_scipy() -> None:
    from scipy.stats import ks_2samp

    rng = np.random.default_rng(3)
    detector = KolmogorovSmirnov("x", reference_size=500, window_size=200, step=100)
    reference, window = rng.normal(0, 1, 500), rng.normal(0.2, 1.1, 200)
    score = [detector.update(v) for v in np.concatenate([reference, window])][-1]
    expected = ks_2samp(reference, window, method="asymp")
    assert score is not None
    assert score.score == pytest.approx(expected.statistic)
    assert detector.p_value == pytest.approx(expected.pvalue)


def test_psi_on_classes_sees_a_change_in_class_mix() -> None:
    rng = np.random.default_rng(1)
    detector = PopulationStabilityIndex("label", categorical=True, reference_size=500,
                                        window_size=200, step=25)
    balanced = rng.integers(0, 10, 2000)
    assert _feed(detector, balanced) == []
    few_classes = rng.integers(0, 3, 400)
    alerts = _feed(detector, few_classes)
    assert alerts and alerts[0] - 2000 <= 100


def test_the_monitor_watches_every_statistic_and_keeps_its_alerts() -> None:
    rng = np.random.default_rng(2)
    monitor = DriftMonitor(reference_size=500, window_size=200, step=25)
    assert {(d.name, d.statistic) for d in monitor.detectors} == {  # type: ignore[attr-defined]
        ("psi", "input_mean"), ("ks", "input_mean"), ("psi", "input_std"),
        ("ks", "input_std"), ("psi", "confidence"), ("ks", "confidence"), ("psi", "label")}
    for _ in range(1500):
        monitor.update({"input_mean": rng.normal(0.3, 0.05), "input_std": rng.normal(0.2, 0.02),
                        "confidence": rng.uniform(0.5, 1.0),
                        "label": float(rng.integers(0, 10))})
    assert monitor.alerts == [] and len(monitor.scores) > 100
    quiet_alerts = len(monitor.alerts)
    for _ in range(300):
        monitor.update({"input_mean": rng.normal(0.5, 0.05), "confidence": None})
    moved = {a.statistic for a in monitor.alerts[quiet_alerts:]}
    assert moved == {"input_mean"}  # only what moved; None values are skipped


def test_bench_drift_detects_every_shift_without_false_alarms(
        small_config: Config, models_dir: Path, tmp_path: Path) -> None:
    from tierwise.bench.drift import run_bench_drift

    results = run_bench_drift(small_config, tmp_path, clean=600, shifted=400,
                              console=Console(width=160))
    rows = {(row["shift"], row["detector"]): row for row in results["rows"]}
    assert len(rows) == 8
    for (shift, detector), row in rows.items():
        assert row["false_alarms"] == 0, (shift, detector)
        if detector == "psi":  # PSI also watches the predicted class: it sees every shift
            assert row["delay_samples"] is not None and row["delay_samples"] <= 200, shift
    assert (tmp_path / "drift.png").is_file() and (tmp_path / "results.json").is_file()
