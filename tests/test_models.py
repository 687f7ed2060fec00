"""Bringing your own model: import any ONNX file (specs from the graph, batch made dynamic,
cut points found, preprocessing prepended), list, show and remove it; bad input is a clear
error that names the file and leaves nothing half-written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from PIL import Image

from onnx_builders import BLOCK_BOUNDARIES, RESIDUAL_INTERIORS, pinned_batch_net, residual_net
from tierwise.cli import main
from tierwise.models import graph
from tierwise.models.importer import ModelImportError, add_model, remove_model
from tierwise.models.preprocess import (
    PreprocessError,
    parse_preprocessing,
    prepend,
    reference,
)
from tierwise.models.store import METADATA_FILE, MODEL_FILE, ModelInfo, list_models
from tierwise.optimize.split import export_split


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _images(count: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, height, width, 3), np.uint8)


def test_cut_points_skip_residual_interiors_and_keep_block_boundaries() -> None:
    model = graph.infer_shapes(residual_net())
    cuts = graph.cut_points(model)
    names = [cut.tensor for cut in cuts]
    for interior in RESIDUAL_INTERIORS:
        assert interior not in names
    for boundary in BLOCK_BOUNDARIES:
        assert boundary in names
    assert names == sorted(names, key=lambda name: next(
        index for index, node in enumerate(model.graph.node) if name in node.output))
    assert "pixels" not in names and "logits" not in names
    stem = cuts[names.index("stem_relu")]
    assert stem.datatype == "FP32" and stem.shape == [1, 8, 8, 8]
    assert stem.sample_bytes == 4 * 8 * 8 * 8


def test_a_chain_cuts_everywhere_and_a_skip_from_the_input_nowhere_before_it() -> None:
    from onnx import TensorProto, helper

    chain = helper.make_model(helper.make_graph(
        [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Neg", ["a"], ["b"]),
         helper.make_node("Abs", ["b"], ["y"])], "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])]))
    assert [cut.tensor for cut in graph.cut_points(graph.infer_shapes(chain))] == ["a", "b"]
    skip = helper.make_model(helper.make_graph(
        [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Neg", ["a"], ["b"]),
         helper.make_node("Add", ["b", "x"], ["c"]), helper.make_node("Abs", ["c"], ["y"])],
        "skip", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])]))
    assert [cut.tensor for cut in graph.cut_points(graph.infer_shapes(skip))] == ["c"]


def test_import_makes_a_fixed_batch_of_one_dynamic_and_finds_the_cuts(tmp_path: Path) -> None:
    source = tmp_path / "resnet.onnx"
    onnx.save(residual_net(batch=1), str(source))
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\nbird\nfish\nfrog\n")
    info = add_model(tmp_path / "models", "resnet", source, labels=labels,
                     runs_on=["edge", "cloud"])
    assert info.batched and info.inputs[0].shape == [-1, 3, 16, 16]
    assert info.outputs[0].shape == [-1, 5] and info.labels[1] == "dog"
    assert info.runs_on == ["edge", "cloud"] and info.task == "classification"
    assert info.provenance is not None and info.provenance.source_sha256
    assert {cut.tensor for cut in info.cuts} >= set(BLOCK_BOUNDARIES)
    assert not {cut.tensor for cut in info.cuts} & set(RESIDUAL_INTERIORS)
    stored = tmp_path / "models" / "resnet"
    assert sorted(path.name for path in stored.iterdir()) == [METADATA_FILE, MODEL_FILE]
    x = np.random.default_rng(1).random((5, 3, 16, 16), dtype=np.float32)
    batched = _session(stored / MODEL_FILE).run(None, {"pixels": x})[0]
    one_by_one = np.concatenate([_session(source).run(None, {"pixels": x[i:i + 1]})[0]
                                 for i in range(5)])
    np.testing.assert_allclose(batched, one_by_one, rtol=1e-5, atol=1e-6)
    # every cut splits into a head and tail that reproduce the model
    for point in info.split_points:
        head, tail = export_split(tmp_path / "models", "resnet", point, x)
        assert head.outputs[0].shape[0] == -1 and tail.outputs == info.outputs
    assert set(list_models(tmp_path / "models")) == {
        "resnet", *(f"resnet.{side}@{k}" for k in info.split_points for side in ("head", "tail"))}
    assert remove_model(tmp_path / "models", "resnet")[0] == "resnet"
    assert list_models(tmp_path / "models") == {}


def test_a_batch_pinned_by_the_graph_is_served_unbatched(tmp_path: Path) -> None:
    info = add_model(tmp_path, "pinned", pinned_batch_net(), task="generic")
    assert not info.batched and info.inputs[0].shape == [1, 3, 2, 2]


def test_preprocessing_in_the_graph_matches_numpy_and_pillow(tmp_path: Path) -> None:
    spec = parse_preprocessing("resize=20x24,crop=16x16,bgr,scale=1/255,"
                               "mean=0.485:0.456:0.406,std=0.229:0.224:0.225")
    info = add_model(tmp_path, "pre", residual_net(batch="N", opset=18), preprocess=spec)
    assert info.inputs[0].datatype == "UINT8" and info.inputs[0].shape == [-1, -1, -1, 3]
    assert info.preprocessing is not None and info.preprocessing["crop"] == [16, 16]
    # the preprocessing alone, as a model that returns what it feeds the network
    network = residual_net(batch="N", opset=18)
    network.graph.output.insert(0, onnx.helper.make_tensor_value_info(
        "pixels", onnx.TensorProto.FLOAT, ["N", 3, 16, 16]))
    probe = ort.InferenceSession(prepend(network, spec).SerializeToString(),
                                 providers=["CPUExecutionProvider"])
    for height, width in ((20, 24), (41, 53), (300, 200)):  # as sent, larger, other aspect
        images = _images(3, height, width)
        got = probe.run(["pixels"], {"image": images})[0]
        error = float(np.abs(got - reference(spec, images)).max())
        bound = 1e-5 if (height, width) == (20, 24) else spec.tolerance()
        print(f"{height}x{width}: max |graph - Pillow| = {error:.2e} (bound {bound:.2e})")
        assert got.shape == (3, 3, 16, 16) and error <= bound
    logits = _session(tmp_path / "pre" / MODEL_FILE).run(None, {"image": _images(2, 20, 24)})[0]
    assert logits.shape == (2, 5)


@pytest.mark.parametrize(("spec", "message"), [
    ("resize=32x32", "model input .* has height 16"),
    ("crop=8x8,resize=4x4", "larger than resize"),
    ("layout=nhwc", "channels"),
    ("mean=1:2", "2 values for 3 channels"),
    ("size=3", "unknown key 'size'"),
    ("std=0", "std"),
])
def test_a_preprocessing_that_does_not_fit_names_what(spec: str, message: str,
                                                      tmp_path: Path) -> None:
    with pytest.raises((ModelImportError, PreprocessError), match=message):
        add_model(tmp_path, "bad", residual_net(), preprocess=spec)
    assert not any(tmp_path.iterdir())


def _not_onnx(tmp_path: Path) -> Path:
    path = tmp_path / "notes.onnx"
    path.write_bytes(b"this is not a protobuf \xff\xfe")
    return path


def _no_inputs(tmp_path: Path) -> Path:
    from onnx import TensorProto, helper

    model = helper.make_model(helper.make_graph(
        [helper.make_node("Constant", [], ["y"], value=helper.make_tensor(
            "c", TensorProto.FLOAT, [1], [1.0]))], "constant", [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])]))
    path = tmp_path / "constant.onnx"
    onnx.save(model, str(path))
    return path


def _unknown_operator(tmp_path: Path) -> Path:
    from onnx import TensorProto, helper

    model = helper.make_model(helper.make_graph(
        [helper.make_node("FancyOp", ["x"], ["y"], domain="com.example")], "custom",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1, 4])]),
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    path = tmp_path / "custom.onnx"
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize(("make", "kwargs", "message"), [
    (_not_onnx, {}, r"notes\.onnx: not an ONNX model"),
    (_no_inputs, {}, r"constant\.onnx: .*no inputs"),
    (_unknown_operator, {"task": "generic"}, r"custom\.onnx: ONNX Runtime cannot run it"),
    (lambda p: p / "missing.onnx", {}, r"missing\.onnx: no such file"),
    (lambda p: _saved(p, residual_net()), {"labels": ["a", "b"]},
     r"model-in\.onnx: .*labels: 2 names for the 5 classes of output logits"),
    (lambda p: _saved(p, residual_net()), {"task": "detection"}, r"--task detection"),
    (lambda p: _saved(p, residual_net()), {"task": "segmentation"}, r"--task: expected one of"),
])
def test_bad_models_are_refused_with_the_file_named_and_nothing_written(
        make, kwargs, message: str, tmp_path: Path) -> None:
    source = make(tmp_path)
    models_dir = tmp_path / "models"
    with pytest.raises(ModelImportError, match=message):
        add_model(models_dir, "bad", source, **kwargs)
    assert not models_dir.exists() or not any(models_dir.iterdir())


def _saved(directory: Path, model: onnx.ModelProto) -> Path:
    path = directory / "model-in.onnx"
    onnx.save(model, str(path))
    return path


def test_an_existing_model_is_replaced_only_when_asked(tmp_path: Path) -> None:
    add_model(tmp_path, "net", residual_net(seed=1))
    with pytest.raises(ModelImportError, match="exists; pass --replace"):
        add_model(tmp_path, "net", residual_net(seed=2))
    first = (tmp_path / "net" / MODEL_FILE).read_bytes()
    info = add_model(tmp_path, "net", residual_net(seed=2), replace=True)
    assert (tmp_path / "net" / MODEL_FILE).read_bytes() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net"]
    assert info.sha256 == ModelInfo.model_validate_json(
        (tmp_path / "net" / METADATA_FILE).read_text()).sha256
    with pytest.raises(ModelImportError, match="name: expected a plain name"):
        add_model(tmp_path, "../escape", residual_net())


def test_metadata_written_before_the_split_still_loads() -> None:
    legacy = {"name": "fmnist-edge", "architecture": "edge", "version": "3",
              "blocks": ["stem", "stage1", "head"], "inputs": [], "outputs": [],
              "parameters": 10, "bytes": 5, "sha256": "ab", "test_accuracy": 0.9,
              "validation_accuracy": 0.91, "temperature": 1.5,
              "training": {"epochs": 2.0}}
    info = ModelInfo.model_validate(legacy)
    assert info.temperature == 1.5 and info.trained is not None
    assert info.trained.blocks == ["stem", "stage1", "head"]
    assert info.training_record().record == {"epochs": 2.0}
    imported = ModelInfo(name="x", inputs=[], outputs=[], bytes=0, sha256="")
    with pytest.raises(ValueError, match="x: no training record"):
        imported.training_record()


def test_the_models_cli_adds_lists_shows_and_removes(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    source = _saved(tmp_path, residual_net())
    models = ["--models", str(tmp_path / "store")]
    assert main(["models", "add", "mine", str(source), "--runs-on", "edge", *models]) == 0
    assert "imported" in capsys.readouterr().out
    assert main(["models", "ls", *models]) == 0
    assert "mine" in capsys.readouterr().out
    assert main(["models", "show", "mine", "--json", *models]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["runs_on"] == ["edge"] and len(shown["cuts"]) >= 3
    assert main(["models", "show", "mine", *models]) == 0
    assert "b0_out" in capsys.readouterr().out
    assert main(["models", "add", "mine", str(source), "--runs-on", "moon", *models]) == 2
    assert "unknown tiers ['moon']" in capsys.readouterr().err
    assert main(["models", "rm", "mine", *models]) == 0
    assert main(["models", "show", "mine", *models]) == 2
    assert "no model 'mine'" in capsys.readouterr().err


def _image_folder(root: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    from PIL import Image

    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        folder = root / f"class-{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[0]).convert("RGB").save(folder / f"{index:04d}.png")
    return root


def test_a_labelled_image_folder_calibrates_the_imported_classifier(tmp_path: Path,
                                                                     splits) -> None:
    from tierwise.models.inputs import as_batch
    from tierwise.profile.calibration import negative_log_likelihood

    folder = _image_folder(tmp_path / "folder", splits.test_x[:60], splits.test_y[:60])
    info = add_model(tmp_path / "models", "net", residual_net(classes=10, seed=3),
                     preprocess="resize=16x16,scale=1/255", eval_data=folder)
    assert info.calibration.fitted_on is not None
    assert info.calibration.fitted_on.startswith(f"image folder {folder}")
    from tierwise.data.images import load_image_folder

    frames = load_image_folder(folder)
    session = _session(tmp_path / "models" / "net" / MODEL_FILE)
    logits = np.concatenate([session.run(None, {"image": as_batch(info, image)})[0]
                             for image in frames.images]).astype(np.float64)
    fitted = negative_log_likelihood(logits, frames.labels, info.calibration.temperature)
    print(f"T={info.calibration.temperature:.3f}: NLL {fitted:.4f} "
          f"(T=1: {negative_log_likelihood(logits, frames.labels, 1.0):.4f})")
    assert fitted <= negative_log_likelihood(logits, frames.labels, 1.0) + 1e-9
    assert info.calibration.temperature != 1.0


def test_evaluation_data_is_read_from_folders_and_videos_with_clear_errors(
        tmp_path: Path, splits) -> None:
    import cv2

    from tierwise.data.images import EvalDataError, load_frames, load_image_folder

    folder = _image_folder(tmp_path / "folder", splits.test_x[:9], np.array([0, 0, 0, 0, 0, 0,
                                                                             1, 1, 2]))
    frames = load_image_folder(folder, limit=4)
    # round-robin over the classes: a small limit still covers them all
    assert frames.labels is not None and sorted(set(frames.labels.tolist())) == [0, 1, 2]
    assert frames.classes == ["class-0", "class-1", "class-2"]
    assert frames.images[0].shape == (28, 28, 3) and frames.images[0].dtype == np.uint8
    video = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (32, 24))
    for index in range(12):
        writer.write(np.full((24, 32, 3), index * 20, np.uint8))
    writer.release()
    clip = load_frames(video, every=3)
    assert len(clip) == 4 and clip.labels is None and clip.images[0].shape == (24, 32, 3)
    assert clip.source == "frames of clip.avi (every 3)"
    (folder / "class-2" / "broken.png").write_bytes(b"not a png")
    # a corrupt image is left out and counted, never a crash; the rest still load
    partial = load_image_folder(folder)
    assert len(partial) == 9 and len(partial.skipped) == 1
    assert "broken.png: not a readable image" in partial.skipped[0]
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "broken.png").write_bytes(b"not a png")
    with pytest.raises(EvalDataError, match=r"none of its 1 images decode"):
        load_frames(lone)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(EvalDataError, match="no images in it"):
        load_frames(empty)
    with pytest.raises(ModelImportError, match=r"--eval: .*no images in it"):
        add_model(tmp_path / "models", "net", residual_net(), eval_data=empty)
    with pytest.raises(ModelImportError, match=r"no classification labels here for net; pass "
                                               r"--reference"):
        add_model(tmp_path / "models", "net", residual_net(), eval_data=video)


def test_many_cut_points_are_thinned_to_the_falling_envelope_of_bytes() -> None:
    from tierwise.models.store import CutPoint
    from tierwise.optimize.split import candidate_split_points

    sizes = [100, 100, 80, 90, 50, 50, 60, 20, 30, 10]  # floats per sample at each cut
    info = ModelInfo(name="m", inputs=[], outputs=[], bytes=0, sha256="", cuts=[
        CutPoint(tensor=f"t{index}", datatype="FP32", shape=[-1, size], node=index)
        for index, size in enumerate(sizes)])
    assert candidate_split_points(info, max_cuts=10) == list(range(1, 11))  # few: all
    # the envelope: 100 (the later of two, post-activation), 80, 50 (later), 20, 10
    assert candidate_split_points(info, max_cuts=6) == [2, 3, 6, 8, 10]
    assert candidate_split_points(info, max_cuts=3) == [2, 6, 10]  # evenly, smallest kept


@pytest.mark.parametrize("opset", [11, 13, 17])
def test_preprocessing_works_on_older_opsets(opset: int, tmp_path: Path) -> None:
    info = add_model(tmp_path, "old", residual_net(batch=1, opset=opset),
                     preprocess="resize=16x16,scale=1/255")
    assert info.batched and info.inputs[0].shape == [-1, -1, -1, 3]
    logits = _session(tmp_path / "old" / MODEL_FILE).run(None, {"image": _images(3, 30, 20)})[0]
    assert logits.shape == (3, 5)


def test_a_dynamic_first_dimension_that_mixes_rows_is_not_a_batch(tmp_path: Path) -> None:
    """x / max(x) over the whole tensor: its first dimension is dynamic, but a row's answer
    depends on the other rows, so batching requests would mix them."""
    from onnx import TensorProto, helper

    mixing = helper.make_model(helper.make_graph(
        [helper.make_node("ReduceMax", ["x"], ["top"], keepdims=1),
         helper.make_node("Div", ["x", "top"], ["y"])], "mixing",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])]),
        opset_imports=[helper.make_opsetid("", 17)])
    assert not add_model(tmp_path, "mixing", mixing, task="generic").batched
    assert add_model(tmp_path, "resnet", residual_net(batch="N")).batched


def test_image_folder_classes_map_to_the_model_labels_by_name(tmp_path: Path, splits) -> None:
    """Folders are named by class; the model's label order is its own: a folder `dog` is the
    class the model calls `dog`, whatever the sorted order of the folders."""
    from tierwise.profile.evaluation import eval_set_for

    labels = [f"label-{index}" for index in range(10)][::-1]  # not the folders' sorted order
    folder = tmp_path / "folder"
    for index, (image, label) in enumerate(zip(splits.test_x[:20], splits.test_y[:20],
                                               strict=True)):
        (folder / f"label-{label}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[0]).convert("RGB").save(folder / f"label-{label}" / f"{index}.png")
    info = add_model(tmp_path / "models", "net", residual_net(classes=10), labels=labels,
                     preprocess="resize=16x16,scale=1/255", eval_data=folder)
    data = eval_set_for(info)
    # each target names, through the model's labels, the folder its image came from
    from tierwise.data.images import load_image_folder

    frames = load_image_folder(folder)
    assert [labels[target] for target in data.targets] == \
        [frames.classes[label] for label in frames.labels]
    (folder / "cat").mkdir()
    Image.fromarray(splits.test_x[0][0]).save(folder / "cat" / "x.png")
    with pytest.raises(ModelImportError, match=r"classes \['cat'\] are not labels of net"):
        add_model(tmp_path / "models", "net", residual_net(classes=10), labels=labels,
                  preprocess="resize=16x16,scale=1/255", eval_data=folder, replace=True)


def test_profile_works_on_a_store_of_your_own_models_alone(tmp_path: Path, splits,
                                                           capsys: pytest.CaptureFixture[str]
                                                           ) -> None:
    """No zoo is trained for a store that has models: one without evaluation data is a clear
    error, one with it is profiled."""
    config = tmp_path / "tierwise.toml"
    config.write_text(f'data_dir = "{tmp_path / "data"}"\n')
    source = _saved(tmp_path, residual_net(classes=10))
    base = ["--config", str(config)]
    assert main([*base, "models", "add", "mine", str(source), "--runs-on", "edge"]) == 0
    assert main([*base, "profile"]) == 2
    assert "mine: no evaluation data" in capsys.readouterr().err
    folder = _image_folder(tmp_path / "folder", splits.test_x[:20], splits.test_y[:20])
    assert main([*base, "models", "add", "mine", str(source), "--runs-on", "edge",
                 "--preprocess", "resize=16x16,scale=1/255", "--eval", str(folder),
                 "--replace"]) == 0
    assert main([*base, "profile"]) == 0
    assert not (tmp_path / "data" / "models" / "fmnist-device").exists()
    assert (tmp_path / "data" / "models" / "mine" / "profile.json").is_file()


def test_inputs_the_client_cannot_send_and_models_without_a_batch_are_named(
        tmp_path: Path) -> None:
    from onnx import TensorProto, helper

    from tierwise.models.inputs import InputError, as_batch

    grey = residual_net(classes=3)
    grey.graph.node[0].input[1] = "w_grey"
    grey.graph.initializer.append(onnx.numpy_helper.from_array(
        np.ones((8, 1, 3, 3), np.float32), "w_grey"))
    grey.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 1
    info = add_model(tmp_path, "grey", grey, preprocess="resize=16x16,scale=1/255")
    assert as_batch(info, _images(1, 30, 20)[0]).shape == (1, 16, 16, 1)  # RGB -> luma
    with pytest.raises(ModelImportError, match=r"order=bgr.*1 channel"):
        add_model(tmp_path, "grey2", grey, preprocess="resize=16x16,bgr")
    with pytest.raises(ModelImportError, match="scale: must not be 0"):
        add_model(tmp_path, "zero", residual_net(), preprocess="resize=16x16,scale=0")
    two = helper.make_model(helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["y"])], "two",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", 2]) for name in "ab"],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])]),
        opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(InputError, match="two takes 2 inputs"):
        as_batch(add_model(tmp_path, "two", two, task="generic"), np.zeros(2, np.float32))
    flat = helper.make_model(helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "flat",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [10])]),
        opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(ModelImportError, match=r"'x' \[10\] has no batch dimension"):
        add_model(tmp_path, "flat", flat, task="generic")
    # a model whose own input is called `image` takes the preprocessing all the same
    named = residual_net(input_name="image")
    info = add_model(tmp_path, "named", named, preprocess="resize=16x16,scale=1/255")
    out = _session(tmp_path / "named" / MODEL_FILE).run(None, {"image": _images(2, 20, 20)})
    assert info.inputs[0].name == "image" and out[0].shape == (2, 5)


def test_replacing_a_model_drops_the_heads_and_tails_of_the_old_one(tmp_path: Path) -> None:
    info = add_model(tmp_path, "net", residual_net(seed=1))
    x = np.zeros((2, 3, 16, 16), np.float32)
    export_split(tmp_path, "net", info.split_points[0], x)
    assert any(name.startswith("net.head@") for name in list_models(tmp_path))
    add_model(tmp_path, "net", residual_net(seed=2), replace=True)
    assert sorted(list_models(tmp_path)) == ["net"]


def test_a_tensor_a_subgraph_captures_is_never_a_cut() -> None:
    """`s` feeds an If whose branches read it from the outer scope: cutting at `s` would
    leave the tail's If reading a tensor its graph does not have."""
    from onnx import TensorProto, helper

    def branch(op: str) -> onnx.GraphProto:
        return helper.make_graph([helper.make_node(op, ["s"], [f"{op}_out"])], op, [],
                                 [helper.make_tensor_value_info(f"{op}_out", TensorProto.FLOAT,
                                                                [2])])

    model = helper.make_model(helper.make_graph(
        [helper.make_node("Relu", ["x"], ["s"]),
         helper.make_node("If", ["flag"], ["chosen"], then_branch=branch("Identity"),
                          else_branch=branch("Neg")),
         helper.make_node("Abs", ["chosen"], ["y"])], "captures",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        [onnx.numpy_helper.from_array(np.array(True), "flag")]),
        opset_imports=[helper.make_opsetid("", 17)])
    assert [cut.tensor for cut in graph.cut_points(graph.infer_shapes(model))] == ["chosen"]
