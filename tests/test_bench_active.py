"""`tierwise bench active` on a small scale: the curves, the label and byte accounting, the
files it writes, and its arguments checked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tierwise.bench.active import labels_to_reach, run_bench_active
from tierwise.config import Config


def test_labels_to_reach_interpolates_and_says_never() -> None:
    curve = [(0.0, 0.3), (40.0, 0.6), (80.0, 0.7)]
    assert labels_to_reach(curve, 0.3) == 0.0
    assert labels_to_reach(curve, 0.65) == pytest.approx(60.0)
    assert labels_to_reach(curve, 0.7) == pytest.approx(80.0)
    assert labels_to_reach(curve, 0.71) is None


def test_a_small_bench_spends_its_budget_and_counts_bytes(
        small_config: Config, models_dir: Path, tmp_path: Path) -> None:
    config = small_config.model_copy(deep=True)
    config.active.retrain.replay = 300
    config.active.retrain.train.epochs = 1
    out = tmp_path / "bench"
    results = run_bench_active(config, out, devices=2, rounds=2, stream=30, budget=8,
                               seeds=1, test_size=200,
                               samplers=("random", "margin", "margin+core-set", "all"))
    samplers = results["samplers"]
    sample_bytes = 128 + 28 * 28
    for name in ("random", "margin", "margin+core-set"):
        labels = samplers[name]["labels"]
        assert labels[0] == 0 and 0 < labels[1] <= 8 and labels[1] <= labels[2] <= 16
        assert len(samplers[name]["accuracy"]) == 3
    # devices send their picks; core-set's devices send three candidates per label
    assert samplers["margin"]["bytes_per_device"] == [2 * 4 * sample_bytes] * 2
    assert samplers["margin+core-set"]["bytes_per_device"] == [2 * 12 * sample_bytes] * 2
    # "all" labels every distinct image seen: 60 in the first round
    assert samplers["all"]["labels"][1] == 60
    assert samplers["all"]["bytes_per_device"] == [2 * 30 * sample_bytes] * 2
    written = json.loads((out / "results.json").read_text())
    assert written["setting"]["labels_per_round"] == 8 and written["emulated"]
    assert "random_final_accuracy" in written
    assert (out / "label-efficiency.png").stat().st_size > 10_000
    with pytest.raises(ValueError, match="samplers"):
        run_bench_active(config, out, samplers=("bogus",))
    with pytest.raises(ValueError, match="budget"):
        run_bench_active(config, out, devices=4, budget=2)
