"""Train, calibrate, export and cache the default zoo (device, edge, cloud)."""

from __future__ import annotations

from pathlib import Path

import torch
from rich.console import Console
from torch import nn

from tierwise.config import Config, TrainConfig
from tierwise.data import Splits, load_splits
from tierwise.profile.calibration import expected_calibration_error, fit_temperature, softmax
from tierwise.zoo.architectures import ARCHITECTURES, build, parameter_count
from tierwise.zoo.export import INPUT_NAME, OUTPUT_NAME, export_onnx
from tierwise.zoo.store import (
    MODEL_FILE,
    WEIGHTS_FILE,
    ModelInfo,
    TensorSpec,
    list_models,
    model_dir,
    model_name,
    save_info,
    sha256_file,
)
from tierwise.zoo.train import predict_logits, train_model


def build_model(
    architecture: str, splits: Splits, settings: TrainConfig, models_dir: Path, seed: int = 0
) -> ModelInfo:
    """Train one architecture, fit its temperature on validation data, export, and store it."""
    result = train_model(architecture, splits.train_x, splits.train_y, settings, seed=seed)
    val_logits = predict_logits(result.model, splits.val_x)
    test_logits = predict_logits(result.model, splits.test_x)
    temperature = fit_temperature(val_logits, splits.val_y)
    name = model_name(architecture)
    onnx_path = model_dir(models_dir, name) / MODEL_FILE
    export_onnx(result.model, onnx_path, splits.test_x[:64])
    torch.save(result.model.state_dict(), onnx_path.parent / WEIGHTS_FILE)
    info = ModelInfo(
        name=name,
        architecture=architecture,
        blocks=[block for block, _ in result.model.named_children()],
        inputs=[TensorSpec(name=INPUT_NAME, datatype="UINT8", shape=[-1, 1, 28, 28])],
        outputs=[TensorSpec(name=OUTPUT_NAME, datatype="FP32", shape=[-1, 10])],
        parameters=parameter_count(result.model),
        bytes=onnx_path.stat().st_size,
        sha256=sha256_file(onnx_path),
        test_accuracy=float((test_logits.argmax(1) == splits.test_y).mean()),
        validation_accuracy=float((val_logits.argmax(1) == splits.val_y).mean()),
        temperature=temperature,
        expected_calibration_error=expected_calibration_error(
            softmax(val_logits, temperature), splits.val_y
        ),
        training={"epochs": result.epochs, "seconds": result.seconds,
                  "images_seen": float(result.images_seen)},
    )
    save_info(models_dir, info)
    return info


def load_trained(models_dir: Path, name: str) -> tuple[nn.Sequential, ModelInfo]:
    """A zoo model as the torch module it was trained as (eval mode), with its metadata."""
    found = list_models(models_dir)
    if name not in found:
        raise FileNotFoundError(f"{models_dir}: no model {name!r}; found {sorted(found)}")
    info, path = found[name]
    weights = path.parent / WEIGHTS_FILE
    if info.role != "full" or info.variant or not weights.is_file():
        raise FileNotFoundError(
            f"{name}: no trained torch weights ({weights}); only zoo models trained by this "
            f"version keep them: retrain with `tierwise zoo train --retrain`")
    model = build(info.architecture)
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model.eval(), info


def ensure_zoo(
    config: Config, architectures: tuple[str, ...] = ARCHITECTURES, retrain: bool = False,
    console: Console | None = None,
) -> dict[str, ModelInfo]:
    """Train whatever of the zoo is not cached under `config.models_dir`; return all of it."""
    console = console or Console()
    found = list_models(config.models_dir)
    cached = {a: found[model_name(a)][0] for a in ARCHITECTURES if model_name(a) in found}
    missing = [a for a in architectures if retrain or a not in cached]
    if missing:
        splits = load_splits(config.data.path, config.data.validation_size, config.data.seed)
        for architecture in missing:
            settings: TrainConfig = getattr(config.zoo, architecture)
            info = build_model(architecture, splits, settings, config.models_dir, config.zoo.seed)
            console.print(
                f"[green]trained[/] {info.name}: test accuracy {info.test_accuracy:.2%}, "
                f"{info.parameters:,} parameters, {info.bytes / 1024:.0f} KiB, "
                f"T={info.temperature:.2f}, {info.training['seconds']:.0f} s"
            )
            cached[architecture] = info
    return {a: cached[a] for a in architectures}


__all__ = ["build_model", "ensure_zoo", "load_trained"]
