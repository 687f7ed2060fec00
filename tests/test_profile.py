"""`tierwise profile` and profile.json: what the planner knows about each model, measured on
the real models of the `models_dir` fixture; and the split heads/tails it is measured with."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from tierwise.cli import main
from tierwise.codecs import codec_names
from tierwise.config import Config
from tierwise.data import Splits
from tierwise.models.store import ModelInfo, list_models
from tierwise.optimize.split import export_split, head_name, tail_name
from tierwise.profile.model_profile import ModelProfile, load_profile, profile_path

WHOLE = ("fmnist-device", "fmnist-edge", "fmnist-cloud")
SERVED = ("fmnist-edge", "fmnist-cloud")  # the models edge and cloud run: split and measured
FEATURE_CODECS = set(codec_names("feature"))


def _info(models_dir: Path, name: str) -> ModelInfo:
    return list_models(models_dir)[name][0]


def _session(models_dir: Path, name: str) -> ort.InferenceSession:
    path = list_models(models_dir)[name][1]
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _run(session: ort.InferenceSession, inputs: np.ndarray) -> np.ndarray:
    return session.run(None, {session.get_inputs()[0].name: inputs})[0]


def test_every_whole_model_has_a_profile_of_the_file_it_measured(models_dir: Path) -> None:
    for name in WHOLE:
        assert profile_path(models_dir, name).is_file()
        profile = load_profile(models_dir, name)
        info = _info(models_dir, name)
        assert (profile.model, profile.version, profile.sha256) == (name, info.version,
                                                                    info.sha256)
        assert profile.validation_images == 2000
        assert 0.5 < profile.accuracy <= 1.0
    with pytest.raises(FileNotFoundError, match="tierwise profile"):
        load_profile(models_dir, "fmnist-edge.head@1")  # parts are profiled with their model


def test_the_profiled_accuracy_is_the_models_validation_accuracy(models_dir: Path,
                                                                 splits: Splits) -> None:
    for name in WHOLE:
        session = _session(models_dir, name)
        logits = np.concatenate([_run(session, splits.val_x[i:i + 256])
                                 for i in range(0, len(splits.val_x), 256)])
        accuracy = float(np.mean(logits.argmax(1) == splits.val_y))
        # at most one near-tie image may fall the other way
        assert load_profile(models_dir, name).accuracy == pytest.approx(accuracy, abs=1 / 2000)


def test_compute_time_is_measured_for_every_tier_and_scaled(small_config: Config,
                                                            models_dir: Path) -> None:
    scales = {tier: settings.compute_scale for tier, settings in small_config.tiers.items()}
    for name in WHOLE:
        profile = load_profile(models_dir, name)
        assert profile.compute_scales == scales
        assert set(profile.compute_ms) == set(scales) == set(profile.block_ms)
        assert all(ms > 0 for ms in profile.compute_ms.values())
        host_ms = profile.compute_ms["device"] / scales["device"]
        for tier, scale in scales.items():
            # host median × the tier's compute_scale: tiers differ by their scales' ratio
            assert profile.compute_ms[tier] == pytest.approx(host_ms * scale, rel=1e-9)
            assert profile.block_ms[tier] == pytest.approx(
                [ms * scale / scales["device"] for ms in profile.block_ms["device"]], rel=1e-9)
            assert all(ms >= 0 for ms in profile.block_ms[tier])
            # the blocks add up to the whole model (timing noise aside)
            assert sum(profile.block_ms[tier]) == pytest.approx(profile.compute_ms[tier],
                                                                rel=0.25)
        # this config's scales are all 1: every tier is charged the same
        assert len(set(profile.compute_ms.values())) == 1
        blocks = len(_info(models_dir, name).cuts) + 1 if name in SERVED else 1
        assert len(profile.block_ms["device"]) == blocks


def test_served_models_have_every_split_point_and_feature_codec(models_dir: Path) -> None:
    for name in SERVED:
        profile = load_profile(models_dir, name)
        info = _info(models_dir, name)
        assert [s.split_point for s in profile.splits] == info.split_points
        for split in profile.splits:
            k = split.split_point
            assert (split.head, split.tail) == (head_name(name, k), tail_name(name, k))
            assert profile.split(k) is split
            head, tail = _info(models_dir, split.head), _info(models_dir, split.tail)
            assert (head.role, tail.role) == ("head", "tail")
            assert head.parent == tail.parent == name
            assert head.split_point == tail.split_point == k
            assert head.inputs == info.inputs and tail.outputs == info.outputs
            assert head.outputs[0].shape == [-1, *split.features_shape]
            assert set(split.codecs) == FEATURE_CODECS
            raw = split.codecs["raw"]
            assert raw.bytes_mean == 4 * math.prod(split.features_shape)
            # a cut is lossless: the raw features give exactly the whole model's answers
            assert abs(raw.accuracy - profile.accuracy) <= 1e-9
            for codec in ("fp16-zstd", "int8-zstd"):
                measured = split.codecs[codec]
                assert 0 < measured.bytes_mean < raw.bytes_mean
                assert measured.bytes_mean <= measured.bytes_p95
                assert abs(measured.accuracy - profile.accuracy) < 0.02
        with pytest.raises(KeyError, match="no profiled split"):
            profile.split(len(info.cuts) + 1)
    # the device's model runs on the device only: nothing to split
    assert load_profile(models_dir, "fmnist-device").splits == []


def _check_curve(device: ModelProfile, then: ModelProfile, thresholds: list[float],
                 accuracy: list[float], escalation: list[float]) -> None:
    assert len(thresholds) == len(accuracy) == len(escalation) >= 2
    assert escalation[0] == 0 and escalation[-1] == 1
    assert escalation == sorted(escalation) and thresholds == sorted(thresholds)
    assert all(0 <= a <= 1 for a in accuracy)
    assert accuracy[0] == pytest.approx(device.accuracy, abs=1e-9)
    assert accuracy[-1] == pytest.approx(then.accuracy, abs=1e-9)


def test_the_device_model_has_cascade_curves_to_edge_and_cloud(models_dir: Path) -> None:
    device = load_profile(models_dir, "fmnist-device")
    curves = {curve.then: curve for curve in device.cascades}
    assert set(curves) == set(SERVED)
    for then, curve in curves.items():
        _check_curve(device, load_profile(models_dir, then), curve.thresholds, curve.accuracy,
                     curve.escalation_rate)
    for name in SERVED:  # only the device escalates
        assert load_profile(models_dir, name).cascades == []


@pytest.mark.parametrize("name", SERVED)
def test_export_split_refuses_a_cut_that_is_not_inside_the_model(name: str, models_dir: Path,
                                                                  splits: Splits) -> None:
    cuts = len(_info(models_dir, name).cuts)
    for bad in (0, cuts + 1, -1, cuts + 3):
        with pytest.raises(ValueError, match=rf"1\.\.{cuts}, got {bad}"):
            export_split(models_dir, name, bad, splits.test_x[:4])
    with pytest.raises(FileNotFoundError, match="no model 'fmnist-nope'"):
        export_split(models_dir, "fmnist-nope", 1, splits.test_x[:4])


@pytest.mark.parametrize("name", SERVED)
def test_head_then_tail_reproduces_the_model_at_every_cut(name: str, models_dir: Path,
                                                          splits: Splits) -> None:
    images = splits.test_x[:64]
    whole = _run(_session(models_dir, name), images)
    for k in _info(models_dir, name).split_points:
        features = _run(_session(models_dir, head_name(name, k)), images)
        assert features.dtype == np.float32 and features.shape[0] == len(images)
        logits = _run(_session(models_dir, tail_name(name, k)), features)
        np.testing.assert_allclose(logits, whole, rtol=0, atol=1e-4)


def test_the_profile_command_finds_every_profile_current(
        small_config: Config, models_dir: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    before = {name: profile_path(models_dir, name).read_text() for name in WHOLE}
    config_file = tmp_path / "tierwise.toml"
    config_file.write_text(f"data_dir = {str(small_config.data_dir)!r}\n"
                           "[data]\nvalidation_size = 2000\n")
    assert main(["--config", str(config_file), "profile"]) == 0
    assert "every profile is current" in capsys.readouterr().out
    assert {name: profile_path(models_dir, name).read_text() for name in WHOLE} == before
