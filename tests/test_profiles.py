"""`tierwise profile`: what the planner knows about each model, measured."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tierwise.cli import main
from tierwise.codecs import codec_names
from tierwise.config import Config
from tierwise.data import Splits
from tierwise.optimize.split import export_split
from tierwise.profile.model_profile import load_profile
from tierwise.runtime.session import load_models


def test_every_whole_model_has_a_measured_profile(small_config: Config,
                                                  models_dir: Path) -> None:
    for name in ("fmnist-device", "fmnist-edge", "fmnist-cloud"):
        profile = load_profile(models_dir, name)
        assert 0.3 < profile.accuracy <= 1.0
        assert set(profile.compute_ms) == set(small_config.tiers)
        assert all(ms > 0 for ms in profile.compute_ms.values())
        assert set(profile.input_codecs) == set(codec_names("input"))
        assert all(c.accuracy == profile.accuracy for c in profile.input_codecs.values())
        raw = profile.input_codecs["raw"].bytes_mean
        assert raw == 784 and profile.input_codecs["zstd"].bytes_mean < raw


def test_served_models_are_split_at_every_block_and_codec(models_dir: Path) -> None:
    for name in ("fmnist-edge", "fmnist-cloud"):
        profile = load_profile(models_dir, name)
        blocks = len(profile.block_ms["device"])
        assert [s.split_point for s in profile.splits] == list(range(1, blocks))
        # the per-block times add up to the whole model (cumulative differences)
        assert sum(profile.block_ms["edge"]) == pytest.approx(profile.compute_ms["edge"],
                                                              rel=0.01)
        for split in profile.splits:
            assert set(split.codecs) == set(codec_names("feature"))
            # cutting is exact; only lossy codecs may move accuracy, and barely
            assert split.codecs["raw"].accuracy == pytest.approx(profile.accuracy, abs=1e-12)
            assert abs(split.codecs["int8-zstd"].accuracy - profile.accuracy) < 0.02
            assert (split.codecs["int8-zstd"].bytes_mean < split.codecs["fp16-zstd"].bytes_mean
                    < split.codecs["raw"].bytes_mean)


def test_the_device_model_has_cascade_curves_to_the_servers_models(models_dir: Path) -> None:
    device = load_profile(models_dir, "fmnist-device")
    assert {curve.then for curve in device.cascades} == {"fmnist-edge", "fmnist-cloud"}
    for curve in device.cascades:
        then = load_profile(models_dir, curve.then)
        assert curve.escalation_rate[0] == 0 and curve.escalation_rate[-1] == 1
        assert curve.accuracy[0] == pytest.approx(device.accuracy)
        assert curve.accuracy[-1] == pytest.approx(then.accuracy)
        assert curve.thresholds == sorted(curve.thresholds)


def test_a_split_reproduces_its_model_and_refuses_a_bad_cut(models_dir: Path,
                                                            splits: Splits) -> None:
    models = load_models(models_dir)
    images = splits.test_x[:16]
    features = models["fmnist-cloud.head@3"].run(images)
    np.testing.assert_allclose(models["fmnist-cloud.tail@3"].run(features),
                               models["fmnist-cloud"].run(images), atol=1e-4)
    for bad in (0, 5):
        with pytest.raises(ValueError, match=r"1\.\.4"):
            export_split(models_dir, "fmnist-cloud", bad, images)


def test_profile_command_skips_current_profiles(small_config: Config, models_dir: Path,
                                                tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    config_file = tmp_path / "tierwise.toml"
    config_file.write_text(f'data_dir = "{small_config.data_dir}"\n'
                           "[data]\nvalidation_size = 2000\n")
    assert main(["--config", str(config_file), "profile"]) == 0
    assert "every profile is current" in capsys.readouterr().out
