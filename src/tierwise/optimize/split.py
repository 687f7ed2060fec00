"""Split a model at a block boundary into a device head and a server tail (Neurosurgeon,
Kang et al., ASPLOS 2017: run the first layers on the device, ship the activations).

A zoo model is an ONNX graph exported from an `nn.Sequential` of named blocks, so every
node is scoped `/<block>/...` and the tensor that leaves block k-1 is the input of block k.
Cutting there with `onnx.utils.Extractor` gives two ordinary models:

- `<model>.head@k`: image -> features (blocks [0, k)), run on the device;
- `<model>.tail@k`: features -> logits (blocks [k, n)), served like any model on a tier.

Both are checked: tail(head(x)) must equal model(x) on sample inputs, or nothing is written.
Needs `onnx` (publish time, not on devices); the results need only onnxruntime.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx.utils import Extractor

from tierwise.zoo.store import (
    MODEL_FILE,
    ModelInfo,
    TensorSpec,
    list_models,
    model_dir,
    save_info,
    sha256_file,
)

FEATURES = "features"


def head_name(model: str, split_point: int) -> str:
    return f"{model}.head@{split_point}"


def tail_name(model: str, split_point: int) -> str:
    return f"{model}.tail@{split_point}"


def bottleneck_name(model: str, split_point: int, name: str) -> str:
    """`fmnist-cloud@4 bottleneck-w2-4bit`: how reports name one learned bottleneck."""
    return f"{model}@{split_point} bottleneck-{name}"


def split_points(info: ModelInfo) -> list[int]:
    """Every cut that leaves at least one block on each side."""
    return list(range(1, len(info.blocks)))


def _boundary_tensor(graph: onnx.GraphProto, block: str) -> str:
    """The tensor the last node of `block` produces: what the next block consumes."""
    produced = [node.output[0] for node in graph.node if node.name.startswith(f"/{block}/")]
    if not produced:
        raise ValueError(f"no nodes scoped /{block}/ in the graph: not a zoo model")
    return produced[-1]


def _rename(model: onnx.ModelProto, old: str, new: str) -> None:
    for node in model.graph.node:
        node.input[:] = [new if name == old else name for name in node.input]
        node.output[:] = [new if name == old else name for name in node.output]
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        if value.name == old:
            value.name = new


def _shape(value: onnx.ValueInfoProto) -> list[int]:
    dims = value.type.tensor_type.shape.dim
    return [dim.dim_value if dim.HasField("dim_value") else -1 for dim in dims]


def _parameters(model: onnx.ModelProto) -> int:
    return int(sum(np.prod(tensor.dims) for tensor in model.graph.initializer))


def _store(model: onnx.ModelProto, info: ModelInfo, models_dir: Path) -> ModelInfo:
    path = model_dir(models_dir, info.name) / MODEL_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    info = info.model_copy(update={"bytes": path.stat().st_size, "sha256": sha256_file(path)})
    save_info(models_dir, info)
    return info


def export_split(models_dir: Path, model: str, split_point: int,
                 sample: np.ndarray) -> tuple[ModelInfo, ModelInfo]:
    """Write `<model>.head@k` and `<model>.tail@k` beside `model`; return their metadata.

    Raises ValueError when the cut is not a block boundary of `model`, and RuntimeError when
    the two halves do not reproduce the whole model on `sample` (uint8 images).
    """
    found = list_models(models_dir)
    if model not in found:
        raise FileNotFoundError(f"{models_dir}: no model {model!r}; found {sorted(found)}")
    info, path = found[model]
    if split_point not in split_points(info):
        raise ValueError(f"split_point: {model} has blocks {info.blocks}; a cut leaves at least "
                         f"one on each side, so 1..{len(info.blocks) - 1}, got {split_point}")
    full = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    boundary = _boundary_tensor(full.graph, info.blocks[split_point - 1])
    extractor = Extractor(full)
    input_name, output_name = info.inputs[0].name, info.outputs[0].name
    head = extractor.extract_model([input_name], [boundary])
    tail = extractor.extract_model([boundary], [output_name])
    _rename(head, boundary, FEATURES)
    _rename(tail, boundary, FEATURES)
    features_shape = [-1, *_shape(head.graph.output[0])[1:]]
    features = TensorSpec(name=FEATURES, datatype="FP32", shape=features_shape)
    common = {"version": info.version, "test_accuracy": info.test_accuracy,
              "validation_accuracy": info.validation_accuracy,
              "temperature": info.temperature, "parent": model, "split_point": split_point,
              "architecture": info.architecture, "bytes": 0, "sha256": ""}
    head_info = ModelInfo(name=head_name(model, split_point), role="head",
                          blocks=info.blocks[:split_point], inputs=info.inputs,
                          outputs=[features], parameters=_parameters(head), **common)
    tail_info = ModelInfo(name=tail_name(model, split_point), role="tail",
                          blocks=info.blocks[split_point:], inputs=[features],
                          outputs=info.outputs, parameters=_parameters(tail), **common)
    _check(full, head, tail, input_name, sample)
    return _store(head, head_info, models_dir), _store(tail, tail_info, models_dir)


def _check(full: onnx.ModelProto, head: onnx.ModelProto, tail: onnx.ModelProto,
           input_name: str, sample: np.ndarray) -> None:
    def session(model: onnx.ModelProto) -> ort.InferenceSession:
        return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])

    expected = session(full).run(None, {input_name: sample})[0]
    features = session(head).run(None, {input_name: sample})[0]
    got = session(tail).run(None, {FEATURES: features})[0]
    error = float(np.abs(expected - got).max())
    if error > 1e-4:
        raise RuntimeError(f"head+tail differ from the whole model by {error:.2e}")


def export_all_splits(models_dir: Path, model: str, sample: np.ndarray) -> list[int]:
    """Every split of `model`; returns the split points written."""
    info, _ = list_models(models_dir)[model]
    points = split_points(info)
    for point in points:
        export_split(models_dir, model, point, sample)
    return points
