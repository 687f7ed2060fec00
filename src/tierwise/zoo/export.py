"""ONNX export of a zoo model: dynamic batch, one self-contained file, checked against torch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

INPUT_NAME = "image"
OUTPUT_NAME = "logits"
OPSET = 17


def export_onnx(model: nn.Module, path: Path, sample: np.ndarray, *,
                input_name: str = INPUT_NAME, output_name: str = OUTPUT_NAME) -> float:
    """Write `model` to `path` and return the largest |torch - onnxruntime| on `sample`.

    Raises if the two disagree by more than 1e-3 (a broken export must never be cached).
    """
    model.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.from_numpy(np.array(sample[:2]))  # a writable copy
    torch.onnx.export(
        model, (example,), str(path), input_names=[input_name], output_names=[output_name],
        dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}},
        opset_version=OPSET, dynamo=False,
    )
    with torch.inference_mode():
        expected = model(torch.from_numpy(np.array(sample))).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {input_name: np.ascontiguousarray(sample)})[0]
    error = float(np.abs(expected.astype(np.float64) - got.astype(np.float64)).max())
    if error > 1e-3:
        raise RuntimeError(f"{path}: ONNX export differs from torch by {error:.2e}")
    return error
