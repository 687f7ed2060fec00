"""`tierwise optimize quantize`: INT8 variants with ONNX Runtime's quantization tools.

Two kinds, one variant each:

- `int8-dynamic`: weights quantized ahead of time (per channel), activations quantized at run
  time from their observed range (`quantize_dynamic`). No calibration data.
- `int8-static`: weights and activations quantized, activation ranges calibrated ahead of time
  on validation images (`quantize_static`, QDQ format: QuantizeLinear/DequantizeLinear pairs
  around each quantized op, per-channel weight scales; Jacob et al., CVPR 2018). The graph is
  first pre-processed (`quant_pre_process`: shape inference and graph optimization, which
  folds what can be folded before ranges are taken).

A variant is registered only within the accuracy budget (`tierwise.optimize.variants`). Nothing
here claims INT8 is faster: on a CPU without VNNI ONNX Runtime's INT8 kernels can be slower
than fp32, so `tierwise profile` measures every variant and the planner uses that.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_dynamic,
    quantize_static,
)

from tierwise.data import Splits
from tierwise.models.store import ModelInfo, list_models
from tierwise.optimize.variants import VariantOutcome, parent_info, register_variant
from tierwise.profile.evaluation import EvalSet

KINDS = ("int8-dynamic", "int8-static")
CALIBRATION_BATCH = 64


class ImageCalibration(CalibrationDataReader):
    """Feeds validation images to the calibrator, `CALIBRATION_BATCH` at a time."""

    def __init__(self, input_name: str, images: np.ndarray) -> None:
        self.input_name = input_name
        self.images = images
        self._batches: Iterator[np.ndarray] = iter(())
        self.rewind()

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {self.input_name: batch}

    def rewind(self) -> None:
        self._batches = (self.images[start:start + CALIBRATION_BATCH]
                         for start in range(0, len(self.images), CALIBRATION_BATCH))


def _calibration(parent: ModelInfo, data: Splits | EvalSet, count: int) -> np.ndarray:
    if isinstance(data, EvalSet):
        return data.inputs_for(parent)[:count]
    return data.val_x[:count]


def quantize_model(
    models_dir: Path, model: str, splits: Splits | EvalSet, *, kinds: tuple[str, ...] = KINDS,
    calibration_images: int = 512, accuracy_budget: float = 0.01,
) -> list[VariantOutcome]:
    """Make each of `kinds` from `model`; register those within `accuracy_budget` of it on
    validation data: Fashion-MNIST's `splits` for the zoo, or any model's own evaluation
    data (an `EvalSet`: `eval_set_for`), whose first images also calibrate `int8-static`."""
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        raise ValueError(f"kinds: expected some of {KINDS}, got {unknown}")
    parent = parent_info(models_dir, model)
    source = list_models(models_dir)[model][1]
    outcomes = []
    with tempfile.TemporaryDirectory(prefix="tierwise-quantize-") as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        for kind in kinds:
            output = Path(scratch) / f"{kind}.onnx"
            if kind == "int8-dynamic":
                quantize_dynamic(prepared, output, weight_type=QuantType.QInt8, per_channel=True)
            else:
                quantize_static(
                    prepared, output,
                    ImageCalibration(parent.inputs[0].name, _calibration(
                        parent, splits, calibration_images)),
                    quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)
            outcomes.append(register_variant(models_dir, parent, kind, output, splits,
                                             accuracy_budget))
    return outcomes
