"""Learned bottlenecks for an imported ONNX model (`train_imported_bottlenecks`): a small
third-party network (tests/onnx_builders.py) imported with evaluation images and a reference
model, its tail made trainable by onnx2torch, a bottleneck distilled from the reference on
unlabelled images (real Fashion-MNIST pictures), exported, registered, run in ONNX Runtime
against torch, and profiled for the planner."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from onnx_builders import residual_net
from tierwise.codecs import load_bottleneck
from tierwise.config import BottleneckConfig, TrainConfig, config_from_dict
from tierwise.data import Splits
from tierwise.models.importer import add_model
from tierwise.models.inputs import as_batch
from tierwise.models.store import ModelInfo, list_models
from tierwise.optimize.bottleneck import torch_tail, train_imported_bottlenecks
from tierwise.optimize.report import bottleneck_report
from tierwise.profile.evaluation import Judge, eval_set_for
from tierwise.profile.model_profile import load_profile
from tierwise.profile.profiler import ensure_profiles
from tierwise.runtime.session import OnnxModel

PREPROCESS = "resize=16x16,scale=1/255"
QUICK = TrainConfig(epochs=1, batch_size=16, learning_rate=0.01)


def _write_images(folder: Path, images: np.ndarray) -> list[np.ndarray]:
    """Fashion-MNIST pictures ([N, 1, 28, 28] uint8) as RGB PNG files; returns them as
    uint8 [28, 28, 3], as a camera would hand them to the client."""
    folder.mkdir(parents=True)
    rgb = [np.repeat(image[0][..., None], 3, axis=2) for image in images]
    for index, image in enumerate(rgb):
        Image.fromarray(image).save(folder / f"{index:04d}.png")
    return rgb


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, splits: Splits) -> dict[str, object]:
    """`net` (runs at the edge) judged by its fidelity to `reference` on 40 validation
    images; 48 unlabelled training images; 40 test images."""
    root = tmp_path_factory.mktemp("imported-bottleneck")
    train = _write_images(root / "train", splits.train_x[:48])
    _write_images(root / "validation", splits.val_x[:40])
    _write_images(root / "test", splits.test_x[:40])
    models_dir = root / "models"
    add_model(models_dir, "reference", residual_net(batch="N", classes=10, seed=4),
              preprocess=PREPROCESS, eval_data=root / "validation", reference="reference",
              runs_on=["cloud"])
    info = add_model(models_dir, "net", residual_net(batch="N", classes=10, seed=3),
                     preprocess=PREPROCESS, eval_data=root / "validation",
                     reference="reference", runs_on=["edge"])
    return {"root": root, "models_dir": models_dir, "info": info, "train": train}


def _point(info: ModelInfo, tensor: str) -> int:
    return next(point for point, cut in zip(info.split_points, info.cuts, strict=True)
                if cut.tensor == tensor)


def test_an_imported_model_gets_a_distilled_bottleneck_that_runs_in_onnx_runtime(
        store: dict[str, object]) -> None:
    models_dir, info = Path(str(store["models_dir"])), store["info"]
    assert isinstance(info, ModelInfo)
    point = _point(info, "b1_out")  # features [N, 8, 8, 8] after the second residual block
    settings = BottleneckConfig(model="net", split_points=[point], widths=[2], bits=[4],
                                train=QUICK)
    test = eval_set_for(info.model_copy(update={"eval_data": str(Path(str(store["root"]))
                                                                   / "test")}))
    (outcome,) = train_imported_bottlenecks(models_dir, settings, store["train"], test=test)

    # 2 channels × 8 × 8 codes of 4 bits: 64 bytes, against a 16×16×3 uint8 frame
    assert (outcome.codes_per_sample, outcome.bytes_per_sample) == (128, 64)
    assert outcome.raw_input_bytes == 16 * 16 * 3 and outcome.registered
    assert outcome.teacher == "reference" and outcome.kept in ("distilled", "reconstruction")
    assert outcome.validation_metric.startswith("fidelity to reference on images in")
    assert outcome.test_metric is not None and outcome.test_metric.endswith("test")
    # the plain split answers as the whole model does
    whole = Judge(eval_set_for(info), lambda name: OnnxModel(*reversed(
        list_models(models_dir)[name])))
    assert outcome.uncompressed_validation_quality == pytest.approx(
        whole.quality("net", whole.results("net")))
    for value in (outcome.validation_quality, outcome.test_quality,
                  outcome.validation_changed["top1_agreement"]):
        assert value is not None and 0.0 <= value <= 1.0

    # registered: image -> uint8 codes on the device, codes -> logits on the server
    found = list_models(models_dir)
    head_info, head_path = found[f"net.head@{point}.bottleneck-w2-4bit"]
    tail_info, tail_path = found[f"net.tail@{point}.bottleneck-w2-4bit"]
    assert head_info.preprocessing == info.preprocessing and tail_info.preprocessing is None
    images = np.concatenate([as_batch(head_info, image) for image in store["train"][:8]])
    codes = OnnxModel(head_path, head_info).run(images)
    assert codes.dtype == np.uint8 and codes.shape == (8, 2, 8, 8) and codes.max() < 16
    logits = OnnxModel(tail_path, tail_info).run(codes)
    assert logits.shape == (8, 10)

    # the fused halves are the codec around the plain split, and agree with torch
    codec = load_bottleneck(models_dir, "net", point, "w2-4bit", 4)
    plain_head = OnnxModel(*reversed(found[f"net.head@{point}"]))
    features = plain_head.run(images)
    np.testing.assert_array_equal(np.stack([codec.packing.decode(payload, (2, 8, 8),
                                                                 np.dtype(np.uint8))
                                            for payload in codec.encode_batch(features)]),
                                  codes)
    assert len(codec.encode_batch(features)[0]) == outcome.bytes_per_sample
    with torch.inference_mode():
        expected = torch_tail(found[f"net.tail@{point}"][1])(
            torch.from_numpy(codec.decode_batch(codec.encode_batch(features)))).numpy()
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-5)

    # `tierwise profile` measures it for the planner, judged as fidelity to the reference
    config = config_from_dict({"data_dir": str(models_dir.parent)})
    ensure_profiles(config, only=["net"], force=True)
    (split,) = [s for s in load_profile(models_dir, "net").splits if s.bottleneck]
    assert split.bottleneck == "bottleneck-w2-4bit" and split.features_shape == [2, 8, 8]
    assert split.codecs["packed-4bit"].bytes_mean == 64
    assert split.codecs["packed-4bit"].accuracy == pytest.approx(outcome.validation_quality)

    # the report: every codec of the profiled models beside the bottleneck, bytes per frame
    # against the quality, saying what the quality is
    out = Path(str(store["root"])) / "report"
    bottleneck_report(config, [outcome], out, test=test, name="bottleneck")
    document = json.loads((out / "bottleneck.json").read_text())
    assert document["validation_metric"].startswith("fidelity to reference (top-1) on images")
    assert {row["kind"] for row in document["rows"]} == {"input", "feature", "learned"}
    (learned,) = [row for row in document["rows"] if row["kind"] == "learned"]
    assert (learned["bytes"], learned["vs_raw"], learned["registered"]) == (64, 12.0, True)
    assert learned["test"] == pytest.approx(outcome.test_quality)
    assert "fidelity to reference (top-1) on" in (out / "bottleneck.md").read_text()
    assert (out / "bottleneck.png").stat().st_size > 10_000


def test_a_split_point_without_a_feature_map_is_refused_naming_the_option(
        store: dict[str, object]) -> None:
    models_dir, info = Path(str(store["models_dir"])), store["info"]
    assert isinstance(info, ModelInfo)
    for point, says in ((len(info.cuts) + 7, "can be cut at"),
                        (_point(info, "flat"), "feature map")):
        settings = BottleneckConfig(model="net", split_points=[point], train=QUICK)
        with pytest.raises(ValueError, match=f"optimize.bottleneck.split_points: .*{says}"):
            train_imported_bottlenecks(models_dir, settings, store["train"])


def test_only_the_bottleneck_step_takes_the_camera_workload(
        capsys: pytest.CaptureFixture[str]) -> None:
    from tierwise.cli import main

    assert main(["optimize", "prune", "--workload", "camera"]) == 2
    assert "only `bottleneck` takes the camera workload" in capsys.readouterr().err
