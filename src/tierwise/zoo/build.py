"""Train, calibrate, export and cache the default zoo (device, edge, cloud)."""

from __future__ import annotations

from pathlib import Path

import torch
from rich.console import Console
from torch import nn

from tierwise.config import Config, TrainConfig
from tierwise.data import CLASS_NAMES, Splits, load_splits
from tierwise.models.importer import add_model
from tierwise.models.store import (
    WEIGHTS_FILE,
    Calibration,
    ModelInfo,
    Provenance,
    TrainingRecord,
    list_models,
    save_info,
)
from tierwise.profile.calibration import expected_calibration_error, fit_temperature, softmax
from tierwise.zoo.architectures import ARCHITECTURES, build
from tierwise.zoo.export import export_onnx
from tierwise.zoo.names import model_name
from tierwise.zoo.train import predict_logits, train_model


def block_boundaries(onnx_path: Path, blocks: list[str]) -> list[str]:
    """The tensors between consecutive blocks of an exported `nn.Sequential` (its nodes are
    scoped `/<block>/...`; the last node of a block produces what the next one reads): the
    zoo's split candidates, each a cut point of the graph."""
    import onnx

    graph = onnx.load(str(onnx_path)).graph
    boundaries = []
    for block in blocks[:-1]:
        produced = [node.output[0] for node in graph.node if node.name.startswith(f"/{block}/")]
        if not produced:
            raise ValueError(f"{onnx_path}: no nodes scoped /{block}/ in the graph")
        boundaries.append(produced[-1])
    return boundaries


def register_trained(
    model: nn.Module, name: str, architecture: str, splits: Splits, models_dir: Path,
    record: dict[str, float], runs_on: list[str] | None = None, replace: bool = True,
) -> ModelInfo:
    """Fit the temperature of a trained Fashion-MNIST module on validation data, export it to
    ONNX, and import it into the store the way any model is imported (`add_model`), with its
    training record, its block boundaries as cut points and its torch weights beside it."""
    import tempfile

    model.eval()
    val_logits = predict_logits(model, splits.val_x)
    test_logits = predict_logits(model, splits.test_x)
    temperature = fit_temperature(val_logits, splits.val_y)
    blocks = [block for block, _ in model.named_children()]
    with tempfile.TemporaryDirectory() as scratch:
        exported = Path(scratch) / "model.onnx"
        export_onnx(model, exported, splits.test_x[:64])
        info = add_model(
            models_dir, name, exported, task="classification", labels=list(CLASS_NAMES),
            runs_on=runs_on, replace=replace, cuts=block_boundaries(exported, blocks),
            calibration=Calibration(
                temperature=temperature, fitted_on="Fashion-MNIST validation split",
                expected_calibration_error=expected_calibration_error(
                    softmax(val_logits, temperature), splits.val_y)),
            trained=TrainingRecord(
                architecture=architecture, blocks=blocks,
                test_accuracy=float((test_logits.argmax(1) == splits.test_y).mean()),
                validation_accuracy=float((val_logits.argmax(1) == splits.val_y).mean()),
                record=record),
            provenance=Provenance(source=f"trained by tierwise ({architecture}, Fashion-MNIST)"))
    torch.save(model.state_dict(), Path(models_dir) / name / WEIGHTS_FILE)
    return info


def build_model(
    architecture: str, splits: Splits, settings: TrainConfig, models_dir: Path, seed: int = 0
) -> ModelInfo:
    """Train one architecture, fit its temperature on validation data, export, and import it
    as the model that tier runs (`runs_on`: the architecture names its tier)."""
    result = train_model(architecture, splits.train_x, splits.train_y, settings, seed=seed)
    return register_trained(
        result.model, model_name(architecture), architecture, splits, models_dir,
        {"epochs": result.epochs, "seconds": result.seconds,
         "images_seen": float(result.images_seen)}, runs_on=[architecture])


def load_trained(models_dir: Path, name: str) -> tuple[nn.Sequential, ModelInfo]:
    """A zoo model as the torch module it was trained as (eval mode), with its metadata."""
    found = list_models(models_dir)
    if name not in found:
        raise FileNotFoundError(f"{models_dir}: no model {name!r}; found {sorted(found)}")
    info, path = found[name]
    weights = path.parent / WEIGHTS_FILE
    if info.role != "full" or info.variant or info.trained is None or not weights.is_file():
        raise FileNotFoundError(
            f"{name}: no trained torch weights ({weights}); only zoo models trained by this "
            f"version keep them: retrain with `tierwise zoo train --retrain`")
    model = _module(info.trained.architecture)
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model.eval(), info


def _module(architecture: str) -> nn.Sequential:
    """A fresh module of `architecture`: the zoo's, or the federated model's
    (`tierwise fl run` exports it with its weights too)."""
    from tierwise.learn.publish import ARCHITECTURE as FEDERATED

    if architecture == FEDERATED:
        from tierwise.learn.model import fedavg_cnn

        return fedavg_cnn()
    return build(architecture)


def ensure_zoo(
    config: Config, architectures: tuple[str, ...] = ARCHITECTURES, retrain: bool = False,
    console: Console | None = None,
) -> dict[str, ModelInfo]:
    """Train whatever of the zoo is not cached under `config.models_dir`; return all of it."""
    console = console or Console()
    found = list_models(config.models_dir)
    cached = {a: found[model_name(a)][0] for a in ARCHITECTURES if model_name(a) in found}
    for architecture, info in cached.items():  # cached before models said where they run
        if not info.runs_on:
            cached[architecture] = info.model_copy(update={"runs_on": [architecture]})
            save_info(config.models_dir, cached[architecture])
    missing = [a for a in architectures if retrain or a not in cached]
    if missing:
        splits = load_splits(config.data.path, config.data.validation_size, config.data.seed)
        for architecture in missing:
            settings: TrainConfig = getattr(config.zoo, architecture)
            info = build_model(architecture, splits, settings, config.models_dir, config.zoo.seed)
            trained = info.trained
            assert trained is not None
            console.print(
                f"[green]trained[/] {info.name}: test accuracy {trained.test_accuracy:.2%}, "
                f"{info.parameters:,} parameters, {info.bytes / 1024:.0f} KiB, "
                f"T={info.temperature:.2f}, {trained.record['seconds']:.0f} s"
            )
            cached[architecture] = info
    return {a: cached[a] for a in architectures}


__all__ = ["build_model", "ensure_zoo", "load_trained"]
