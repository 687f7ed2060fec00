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
from tierwise.models.importer import add_model
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
        # the quality floor only the edge model meets: the policy must leave the device
        placed = client.infer(frame, min_quality=0.99, deadline_ms=5000)
        decision = placed.trace.decision
        assert decision is not None and decision["feasible"], decision
        assert not placed.trace.plan.startswith("local"), placed.trace.plan
        if placed.trace.answered_by.tier == "edge":  # a cascade may stop at a sure device
            assert placed.label == remote.label and placed.trace.fallback is None
        # with the input kept on the device, only a split of big (maybe after tiny) qualifies
        private = client.infer(frame, min_accuracy=0.99, keep_input_on_device=True)
        assert "split(big@" in private.trace.plan, private.trace.plan
        assert all(stage.kind == "local" or stage.model.startswith("big.tail@")
                   for stage in private.trace.stages)  # only features left the device
        if private.trace.answered_by.tier == "edge":
            assert private.label == remote.label and private.trace.fallback is None
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
