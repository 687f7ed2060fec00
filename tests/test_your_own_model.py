"""A third-party model through the whole system: built with onnx.helper (a residual DAG with
a fixed batch of 1, not tierwise's zoo), imported with its preprocessing, served, profiled on
unlabelled images with a reference model standing in for labels, split at the cut points
found in its graph, and placed per request by the planner over a real server on loopback."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from PIL import Image

from onnx_builders import BLOCK_BOUNDARIES, RESIDUAL_INTERIORS, residual_net
from tierwise.client import Client
from tierwise.config import Config, config_from_dict
from tierwise.data import Splits
from tierwise.models.importer import ModelImportError, add_model
from tierwise.models.inputs import InputError, as_batch
from tierwise.models.store import MODEL_FILE, list_models
from tierwise.planner.plans import Cascade, Local, Remote, Split
from tierwise.profile.model_profile import load_profile
from tierwise.profile.profiler import ensure_profiles
from tierwise.runtime.session import load_models
from tierwise.server.app import TierServer, serve_in_thread
from tierwise.tasks import ClassificationResult

CLASSES = [f"class-{index}" for index in range(10)]


@pytest.fixture(scope="module")
def own_models(tmp_path_factory: pytest.TempPathFactory, splits: Splits) -> tuple[Config, Path]:
    """`tiny` on the device, `big` on the edge: the user's own ONNX files, imported."""
    root = tmp_path_factory.mktemp("own-models")
    frames = root / "frames"
    frames.mkdir()
    for index, image in enumerate(splits.test_x[:48]):
        rgb = Image.fromarray(image[0]).convert("RGB")
        size = (28, 28) if index % 2 else (40, 31)  # frames of different sizes
        rgb.resize(size).save(frames / f"frame-{index:03d}.png")
    labels = root / "labels.txt"
    labels.write_text("\n".join(CLASSES) + "\n")
    models_dir = root / "models"
    for name, size, seed, tiers in (("tiny", 16, 1, ["device"]), ("big", 24, 2, ["edge"])):
        source = root / f"{name}.onnx"
        onnx.save(residual_net(batch=1, size=size, classes=10, seed=seed), str(source))
        add_model(models_dir, name, source, labels=labels, runs_on=tiers,
                  preprocess=f"resize={size}x{size},scale=1/255,mean=0.5,std=0.25",
                  eval_data=frames, reference="big")
    config = config_from_dict({"data_dir": str(root / "data"),
                               "tiers": {"device": {"compute_scale": 1.0}}})
    ensure_profiles(config, models_dir)
    return config, models_dir


def test_the_import_finds_cuts_batch_and_preprocessing(own_models: tuple[Config, Path]) -> None:
    _, models_dir = own_models
    big = list_models(models_dir)["big"][0]
    assert big.batched and big.inputs[0].shape == [-1, -1, -1, 3]
    assert big.inputs[0].datatype == "UINT8" and big.labels == CLASSES
    cuts = [cut.tensor for cut in big.cuts]
    assert set(BLOCK_BOUNDARIES) <= set(cuts) and not set(RESIDUAL_INTERIORS) & set(cuts)


def test_profiles_measure_fidelity_splits_and_the_cascade(own_models: tuple[Config, Path]
                                                          ) -> None:
    _, models_dir = own_models
    big, tiny = load_profile(models_dir, "big"), load_profile(models_dir, "tiny")
    assert big.quality_metric.startswith("fidelity to big on images in")
    assert big.accuracy == 1.0  # the reference agrees with itself
    assert 0.0 <= tiny.accuracy < 1.0
    info = list_models(models_dir)["big"][0]
    assert [split.split_point for split in big.splits] == info.split_points
    for split in big.splits:
        assert split.codecs["raw"].accuracy == 1.0  # a cut loses nothing
    assert "png" in big.input_codecs and big.input_codecs["png"].accuracy == 1.0
    assert big.input_codecs["png"].bytes_mean < 24 * 24 * 3  # an RGB image, compressed
    (curve,) = tiny.cascades
    assert curve.then == "big" and curve.accuracy[-1] == 1.0
    assert len(big.block_ms["device"]) == len(info.cuts) + 1


def test_the_planner_places_requests_over_a_real_server(own_models: tuple[Config, Path],
                                                         splits: Splits) -> None:
    config, models_dir = own_models
    frame = np.asarray(Image.fromarray(splits.test_x[100][0]).convert("RGB").resize((45, 37)))
    app = TierServer("edge", config.tier("edge"), load_models(models_dir))
    big = ort.InferenceSession(str(models_dir / "big" / MODEL_FILE),
                               providers=["CPUExecutionProvider"])
    info = list_models(models_dir)["big"][0]
    expected = big.run(None, {"image": as_batch(info, frame)})[0][0]
    with serve_in_thread(app) as url, Client(config, models_dir=models_dir,
                                             tier_urls={"edge": url}, probe=False,
                                             collector_url="", drift=False) as client:
        assert client.device_model == "tiny"
        remote = client.infer(frame, Remote("edge", "big"))
        assert isinstance(remote.result, ClassificationResult)
        assert remote.label == int(expected.argmax())
        assert remote.result.label_name == CLASSES[remote.label]
        assert remote.trace.answered_by.tier == "edge"
        # every input codec the profile measured is decoded by the server at the image size
        for codec in load_profile(models_dir, "big").input_codecs:
            coded = client.infer(frame, Remote("edge", "big", codec))
            assert coded.trace.fallback is None and coded.trace.answered_by.tier == "edge", \
                (codec, coded.trace.fallback)
        # the quality floor only the edge model meets: the policy must leave the device
        placed = client.infer(frame, min_quality=0.99, deadline_ms=5000)
        decision = placed.trace.decision
        assert decision is not None and decision["feasible"], decision
        assert not placed.trace.plan.startswith("local"), placed.trace.plan
        assert placed.trace.fallback is None, placed.trace.fallback
        if placed.trace.answered_by.tier == "edge":  # a cascade may stop at a sure device
            assert placed.label == remote.label
        # with the input kept on the device, only a split of big (maybe after tiny) qualifies
        private = client.infer(frame, min_accuracy=0.99, keep_input_on_device=True)
        assert "split(big@" in private.trace.plan, private.trace.plan
        assert all(stage.kind == "local" or stage.model.startswith("big.tail@")
                   for stage in private.trace.stages)  # only features left the device
        assert private.trace.fallback is None, private.trace.fallback
        if private.trace.answered_by.tier == "edge":
            assert private.label == remote.label
        candidates = client.policy().candidates
        kinds = {type(candidate.plan) for candidate in candidates}
        assert {Local, Remote, Split, Cascade} <= kinds
        with pytest.raises(InputError, match=r"expected dtype uint8"):
            client.infer(frame.astype(np.float32))
        with pytest.raises(InputError, match=r"expected an image \[height, width, 3\]"):
            client.infer(np.zeros((4, 5, 6, 7), np.uint8))


def test_an_imported_model_is_pushed_signed_with_its_heads_and_tails(
        own_models: tuple[Config, Path], tmp_path: Path) -> None:
    from tierwise.registry.signing import PRIVATE_KEY_FILE, keygen, load_private_key
    from tierwise.registry.store import Registry

    config, models_dir = own_models
    registry = Registry(tmp_path / "registry")
    keygen(registry.keys_dir)
    key = load_private_key(registry.keys_dir / PRIVATE_KEY_FILE)
    pushed = registry.push(config, models_dir, "big", key)
    assert (pushed.version, pushed.channel, pushed.new) == (1, "stable", True)
    (version,) = registry.versions("big")
    assert version["runs_on"] == ["edge"]  # from the model's own metadata
    assert version["test_accuracy"] is None  # imported: no training record
    manifest, _ = registry.manifest("big", 1)
    info = list_models(models_dir)["big"][0]
    for point in info.split_points:
        assert manifest["runs_on"][f"big.head@{point}"] == ["device"]
        assert manifest["runs_on"][f"big.tail@{point}"] == ["edge"]
    assert registry.push(config, models_dir, "big", key).new is False  # same content


def test_a_detector_is_profiled_against_coco_annotations(tmp_path: Path) -> None:
    """A detector measured on COCO-style JSON: mAP@0.5 against the boxes, by hand 0.5 here
    (its one box is right on the first image and wrong on the second: TP then FP over two
    true boxes, all-point AP = 0.5)."""
    import json

    from onnx_builders import fixed_box_detector
    from tierwise.profile.profiler import ensure_profiles

    for name in ("a.png", "b.png"):
        Image.fromarray(np.zeros((20, 40, 3), np.uint8)).save(tmp_path / name)
    coco = tmp_path / "instances.json"
    coco.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.png", "width": 40, "height": 20},
                   {"id": 2, "file_name": "b.png", "width": 40, "height": 20}],
        # image a: the detector's box (x 0.25..0.75, y 0.25..0.75) in pixels; b: elsewhere
        "annotations": [{"id": 1, "image_id": 1, "bbox": [10, 5, 20, 10], "category_id": 7},
                        {"id": 2, "image_id": 2, "bbox": [0, 0, 4, 4], "category_id": 7}],
        "categories": [{"id": 7, "name": "face"}]}))
    models_dir = tmp_path / "models"
    info = add_model(models_dir, "boxes", fixed_box_detector((0.25, 0.25, 0.75, 0.75)),
                     task="detection", preprocess="resize=16x16,scale=1/255", eval_data=coco,
                     runs_on=["device"])
    assert info.eval_data == str(coco.resolve())
    config = config_from_dict({"data_dir": str(tmp_path / "data")})
    ensure_profiles(config, models_dir)
    profile = load_profile(models_dir, "boxes")
    assert profile.quality_metric == f"mAP@0.5 on COCO annotations {coco.resolve()}"
    assert profile.accuracy == pytest.approx(0.5)
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"images": [], "categories": []}) + "junk")
    with pytest.raises(ModelImportError, match=r"broken\.json: not COCO-style annotations"):
        add_model(models_dir, "other", fixed_box_detector((0, 0, 1, 1)), task="detection",
                  preprocess="resize=16x16", eval_data=broken)


def test_an_imported_model_is_quantized_against_its_own_eval_data(
        own_models: tuple[Config, Path], tmp_path: Path) -> None:
    """INT8 variants of a user's model, measured on its unlabelled frames by its fidelity
    to the fp32 reference (`big`): kept within the budget, registered as a variant that
    runs where its parent does."""
    import shutil

    from tierwise.optimize.quantize import quantize_model
    from tierwise.profile.evaluation import eval_set_for

    _, models_dir = own_models
    copy = tmp_path / "models"
    shutil.copytree(models_dir / "big", copy / "big")
    info = list_models(copy)["big"][0]
    data = eval_set_for(info, 48)
    outcomes = {o.variant: o for o in quantize_model(copy, "big", data, accuracy_budget=0.5)}
    for kind, outcome in outcomes.items():
        print(f"{kind}: fidelity {outcome.validation_accuracy:.3f} "
              f"({outcome.details['quality']}), {outcome.bytes} bytes")
        assert outcome.parent_validation_accuracy == 1.0
        assert 0.5 <= outcome.validation_accuracy <= 1.0 and outcome.kept
    variant = list_models(copy)["big.int8-static"][0]
    assert (variant.parent, variant.variant, variant.runs_on) == ("big", "int8-static", ["edge"])
    assert variant.preprocessing == info.preprocessing and variant.labels == CLASSES
    strict = quantize_model(copy, "big", data, kinds=("int8-dynamic",), accuracy_budget=-1.0)
    assert not strict[0].kept and "fidelity to big" in strict[0].reason


def test_task_options_say_what_the_graph_does_not(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """A detector whose boxes are (y_min, x_min, y_max, x_max), as TensorFlow's detection
    API writes them: imported with box_order=yxyx, its boxes come out as x_min, y_min..."""
    import onnx

    from onnx_builders import fixed_box_detector
    from tierwise.cli import main
    from tierwise.tasks import task_for

    source = tmp_path / "tf-style.onnx"
    onnx.save(fixed_box_detector((0.1, 0.2, 0.3, 0.6)), str(source))
    store = ["--models", str(tmp_path / "models")]
    assert main(["models", "add", "tf", str(source), "--task", "detection", "--task-option",
                 "box_order=yxyx", "--task-option", "score_threshold=0.6", *store]) == 0
    info = list_models(tmp_path / "models")["tf"][0]
    assert info.task_options == {"box_order": "yxyx", "score_threshold": 0.6}
    task = task_for(info)
    (result,) = task.decode({"boxes": np.array([[[0.1, 0.2, 0.3, 0.6]]], np.float32),
                             "scores": np.array([[0.9]], np.float32)})
    np.testing.assert_allclose(result.boxes[0], [0.2, 0.1, 0.6, 0.3], atol=1e-6)
    assert main(["models", "add", "bad", str(source), "--task", "detection", "--task-option",
                 "box_orde=yxyx", *store]) == 2
    assert "box_orde" in capsys.readouterr().err


def test_inferences_of_an_imported_model_are_monitored(own_models: tuple[Config, Path],
                                                       splits: Splits) -> None:
    """Metrics and the drift monitor's statistics for a user's model: input statistics of
    the frame, the calibrated confidence and the label go to the monitor off the request
    path; the metrics count each answer by plan and tier."""
    config, models_dir = own_models
    app = TierServer("edge", config.tier("edge"), load_models(models_dir))
    with serve_in_thread(app) as url, Client(config, models_dir=models_dir,
                                             tier_urls={"edge": url}, probe=False,
                                             collector_url="") as client:
        answers = [client.infer(np.asarray(Image.fromarray(image[0]).convert("RGB")),
                                Remote("edge", "big")) for image in splits.test_x[:12]]
        client.monitor_drain()
        exposition = client.metrics.exposition().decode()
    assert 'tierwise_client_requests_total{plan="remote",tier="edge"} 12.0' in exposition
    for answer in answers:
        trace = answer.trace
        assert trace.input_mean is not None and 0.0 <= trace.input_mean <= 1.0
        assert trace.label == answer.label and trace.confidence == answer.confidence
