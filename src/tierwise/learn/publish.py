"""The federated global model as a device model: ONNX, calibrated, and a registry version.

The server keeps Fashion-MNIST's validation split (clients never see it) to fit the softmax
temperature, as every zoo model has one; the model card's test accuracy is on the full test
set. Where a registry exists (`tierwise registry keygen` made its keys), the model is pushed
as a new signed version that runs on the device tier.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tierwise.config import DEVICE_TIER, Config
from tierwise.data import load_splits
from tierwise.profile.calibration import expected_calibration_error, fit_temperature, softmax
from tierwise.zoo.store import (
    MODEL_FILE,
    ModelInfo,
    TensorSpec,
    model_dir,
    save_info,
    sha256_file,
)

ARCHITECTURE = "fedavg-cnn"


def load_weights(path: Path) -> list[np.ndarray]:
    """The arrays `np.savez(path, *weights)` wrote, in order."""
    with np.load(path) as archive:
        return [archive[f"arr_{i}"] for i in range(len(archive.files))]


def export_global(config: Config, weights_file: Path, models_dir: Path, name: str,
                  training: dict[str, float]) -> ModelInfo:
    from tierwise.learn.model import model_from
    from tierwise.zoo.architectures import parameter_count
    from tierwise.zoo.export import INPUT_NAME, OUTPUT_NAME, export_onnx
    from tierwise.zoo.train import predict_logits

    model = model_from(load_weights(weights_file))
    model.eval()
    splits = load_splits(config.data.path, config.data.validation_size, config.data.seed)
    val_logits = predict_logits(model, splits.val_x)
    test_logits = predict_logits(model, splits.test_x)
    temperature = fit_temperature(val_logits, splits.val_y)
    onnx_path = model_dir(models_dir, name) / MODEL_FILE
    export_onnx(model, onnx_path, splits.test_x[:64])
    info = ModelInfo(
        name=name, architecture=ARCHITECTURE,
        blocks=[block for block, _ in model.named_children()],
        inputs=[TensorSpec(name=INPUT_NAME, datatype="UINT8", shape=[-1, 1, 28, 28])],
        outputs=[TensorSpec(name=OUTPUT_NAME, datatype="FP32", shape=[-1, 10])],
        parameters=parameter_count(model), bytes=onnx_path.stat().st_size,
        sha256=sha256_file(onnx_path),
        test_accuracy=float((test_logits.argmax(1) == splits.test_y).mean()),
        validation_accuracy=float((val_logits.argmax(1) == splits.val_y).mean()),
        temperature=temperature,
        expected_calibration_error=expected_calibration_error(
            softmax(val_logits, temperature), splits.val_y),
        training=training,
    )
    save_info(models_dir, info)
    return info


def push_global(config: Config, models_dir: Path, name: str) -> dict[str, Any] | None:
    """Push `name` to the registry as a device model; None where there is no registry."""
    from tierwise.registry.signing import PRIVATE_KEY_FILE, load_private_key
    from tierwise.registry.store import Registry

    key_file = config.registry_dir / "keys" / PRIVATE_KEY_FILE
    if not key_file.is_file():
        return None
    result = Registry(config.registry_dir).push(
        config, models_dir, name, load_private_key(key_file), tiers=[DEVICE_TIER])
    return {"model": result.model, "version": result.version, "channel": result.channel,
            "new": result.new}
