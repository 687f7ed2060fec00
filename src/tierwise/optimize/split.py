"""Split a model at one of its cut points into a device head and a server tail (Neurosurgeon,
Kang et al., ASPLOS 2017: run the first layers on the device, ship the activations).

A model's cut points are found in its graph when it is imported (`tierwise.models.graph`:
tensors every input-to-output path passes through); split point k cuts at `cuts[k-1]`.
Cutting there with `onnx.utils.Extractor` gives two ordinary models:

- `<model>.head@k`: input -> features (up to the cut), run on the device;
- `<model>.tail@k`: features -> outputs, served like any model on a tier.

Both are checked: tail(head(x)) must equal model(x) on sample inputs, or nothing is written.
Needs `onnx` (publish time, not on devices); the results need only onnxruntime.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from tierwise.models.graph import extract, parameter_count, rename_tensor
from tierwise.models.store import (
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
    """Every split point of `info`: 1..len(info.cuts)."""
    return info.split_points


def candidate_split_points(info: ModelInfo, max_cuts: int) -> list[int]:
    """The split points worth profiling, at most `max_cuts`: all of them when there are
    that few; else those on the falling envelope of bytes per sample (Neurosurgeon's
    observation, Kang et al. 2017: moving the cut later costs device compute, so it pays
    only where the features shrink; of equal sizes in a row, the later, post-activation one
    compresses better), then evenly spaced, the smallest cut always kept."""
    points = split_points(info)
    if len(points) <= max_cuts:
        return points
    envelope: list[int] = []
    smallest = float("inf")
    for point, cut in zip(points, info.cuts, strict=True):
        size = cut.sample_bytes if cut.sample_bytes is not None else float("inf")
        if size < smallest:
            envelope.append(point)
            smallest = size
        elif size == smallest and envelope:
            envelope[-1] = point
    if not envelope:  # no cut has a known size: evenly spaced over all of them
        envelope = points
    if len(envelope) <= max_cuts:
        return envelope
    picks = np.unique(np.round(np.linspace(0, len(envelope) - 1, max_cuts)).astype(int))
    return [envelope[index] for index in picks]


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

    Raises ValueError when `model` has no cut point k, and RuntimeError when the two halves
    do not reproduce the whole model on `sample` (inputs of the model's first input).
    """
    found = list_models(models_dir)
    if model not in found:
        raise FileNotFoundError(f"{models_dir}: no model {model!r}; found {sorted(found)}")
    info, path = found[model]
    if split_point not in split_points(info):
        raise ValueError(f"split_point: {model} has {len(info.cuts)} cut points, so 1.."
                         f"{len(info.cuts)}, got {split_point}")
    if len(info.inputs) != 1:
        raise ValueError(f"{model}: splits need a model with one input, it has "
                         f"{[spec.name for spec in info.inputs]}")
    cut = info.cuts[split_point - 1]
    full = onnx.load(str(path))
    input_name = info.inputs[0].name
    head = extract(full, [input_name], [cut.tensor])
    tail = extract(full, [cut.tensor], [spec.name for spec in info.outputs])
    rename_tensor(head, cut.tensor, FEATURES)
    rename_tensor(tail, cut.tensor, FEATURES)
    features = TensorSpec(name=FEATURES, datatype=cut.datatype,
                          shape=[-1 if info.batched else 1, *cut.shape[1:]])
    common = {"version": info.version, "calibration": info.calibration, "parent": model,
              "split_point": split_point, "batched": info.batched, "bytes": 0, "sha256": "",
              "provenance": info.provenance, "preprocessing": info.preprocessing}
    head_info = ModelInfo(name=head_name(model, split_point), role="head", task="generic",
                          inputs=info.inputs, outputs=[features],
                          parameters=parameter_count(head), **common)
    tail_info = ModelInfo(name=tail_name(model, split_point), role="tail", task=info.task,
                          labels=info.labels, inputs=[features], outputs=info.outputs,
                          parameters=parameter_count(tail),
                          **{**common, "preprocessing": None})  # it takes features
    _check(full, head, tail, input_name, sample)
    return _store(head, head_info, models_dir), _store(tail, tail_info, models_dir)


def _check(full: onnx.ModelProto, head: onnx.ModelProto, tail: onnx.ModelProto,
           input_name: str, sample: np.ndarray) -> None:
    """tail(head(x)) == model(x) on every output, within 1e-4 of the output's scale."""
    def session(model: onnx.ModelProto) -> ort.InferenceSession:
        return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])

    expected = session(full).run(None, {input_name: sample})
    features = session(head).run(None, {input_name: sample})[0]
    got = session(tail).run(None, {FEATURES: features})
    for whole, parts in zip(expected, got, strict=True):
        error = float(np.abs(whole.astype(np.float64) - parts).max()) if whole.size else 0.0
        scale = max(1.0, float(np.abs(whole).max())) if whole.size else 1.0
        if error > 1e-4 * scale:
            raise RuntimeError(f"head+tail differ from the whole model by {error:.2e}")


def export_all_splits(models_dir: Path, model: str, sample: np.ndarray) -> list[int]:
    """Every split of `model`; returns the split points written."""
    info, _ = list_models(models_dir)[model]
    points = split_points(info)
    for point in points:
        export_split(models_dir, model, point, sample)
    return points
