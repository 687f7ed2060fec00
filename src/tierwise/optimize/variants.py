"""Registering what `tierwise optimize` makes: a model variant is an ordinary model in the
store, named `<parent>.<variant>` (e.g. `fmnist-cloud.int8-static`), with `parent` and
`variant` in its metadata, so that `tierwise profile` measures it and the planner may use it
wherever its parent runs (`tiers.*.variants`).

A variant is kept only if its validation accuracy is within the configured budget of its
parent's (`optimize.accuracy_budget`); otherwise nothing is written, and whatever an earlier
run registered under that name is removed — a rejected variant must never be served.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx

from tierwise.config import ConfigError
from tierwise.data import Splits
from tierwise.models.store import (
    MODEL_FILE,
    Calibration,
    ModelInfo,
    list_models,
    model_dir,
    save_info,
    sha256_file,
)
from tierwise.profile.calibration import expected_calibration_error, fit_temperature, softmax
from tierwise.profile.evaluation import EvalSet, Judge
from tierwise.runtime.session import OnnxModel

if TYPE_CHECKING:  # torch only where a trained module is registered: quantize needs none
    from torch import nn


@dataclass
class VariantOutcome:
    """What one optimization step produced, kept or not; one row of `tierwise optimize`'s
    output and of its JSON."""

    name: str
    parent: str
    variant: str
    kept: bool
    bytes: int
    parameters: int
    validation_accuracy: float
    parent_validation_accuracy: float
    test_accuracy: float
    reason: str = ""
    details: dict[str, object] = field(default_factory=dict)  # step-specific measurements

    @property
    def accuracy_drop(self) -> float:
        return self.parent_validation_accuracy - self.validation_accuracy

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "accuracy_drop": self.accuracy_drop}


def variant_name(parent: str, variant: str) -> str:
    return f"{parent}.{variant}"


def onnx_parameters(path: Path) -> int:
    """Weights in an ONNX file, quantized ones included (one per element)."""
    graph = onnx.load(str(path), load_external_data=False).graph
    return int(sum(int(np.prod(tensor.dims)) for tensor in graph.initializer
                   if len(tensor.dims) > 1 or tensor.data_type == onnx.TensorProto.FLOAT))


def register_variant(
    models_dir: Path, parent: ModelInfo, variant: str, onnx_path: Path,
    splits: Splits | EvalSet, accuracy_budget: float, *, parameters: int | None = None,
    training: dict[str, float] | None = None,
) -> VariantOutcome:
    """Evaluate the model at `onnx_path` (a scratch file, consumed) as `<parent>.<variant>`;
    register it if it is within `accuracy_budget` of `parent` on validation data: the
    Fashion-MNIST `splits` for a model trained here, else the parent's evaluation data (an
    `EvalSet`: its task's quality, e.g. fidelity to the parent itself where unlabelled)."""
    if isinstance(splits, EvalSet):
        return _register_measured(models_dir, parent, variant, onnx_path, splits,
                                  accuracy_budget, parameters)
    name = variant_name(parent.name, variant)
    provisional = parent.model_copy(update={"name": name})
    model = OnnxModel(onnx_path, provisional, threads=2)
    val_logits = model.run_batched(splits.val_x)
    test_logits = model.run_batched(splits.test_x)
    val_accuracy = float((val_logits.argmax(1) == splits.val_y).mean())
    test_accuracy = float((test_logits.argmax(1) == splits.test_y).mean())
    parent_accuracy = parent.training_record().validation_accuracy
    drop = parent_accuracy - val_accuracy
    outcome = VariantOutcome(
        name=name, parent=parent.name, variant=variant, kept=drop <= accuracy_budget,
        bytes=onnx_path.stat().st_size,
        parameters=parameters if parameters is not None else onnx_parameters(onnx_path),
        validation_accuracy=val_accuracy, parent_validation_accuracy=parent_accuracy,
        test_accuracy=test_accuracy)
    reason = (f"validation accuracy {val_accuracy:.2%} is {drop * 100:.2f} points below "
              f"{parent.name}'s; the budget is {accuracy_budget * 100:g}")

    def metadata() -> dict[str, object]:
        temperature = fit_temperature(val_logits, splits.val_y)
        return {"trained": parent.training_record().model_copy(update={
                    "test_accuracy": test_accuracy, "validation_accuracy": val_accuracy,
                    "record": training or {}}),
                "calibration": Calibration(
                    temperature=temperature, fitted_on="Fashion-MNIST validation split",
                    expected_calibration_error=expected_calibration_error(
                        softmax(val_logits, temperature), splits.val_y))}
    return _settle(models_dir, parent, outcome, onnx_path, reason, metadata)


def _settle(models_dir: Path, parent: ModelInfo, outcome: VariantOutcome, onnx_path: Path,
            reason: str, metadata: Callable[[], dict[str, object]]) -> VariantOutcome:
    """Register a variant within budget (its file moved into the store, its metadata its
    parent's with `metadata()` over it), or drop it with `reason`, and whatever an earlier
    run registered under its name: a rejected variant must never be served."""
    directory = model_dir(models_dir, outcome.name)
    if not outcome.kept:
        outcome.reason = reason
        onnx_path.unlink()
        shutil.rmtree(directory, ignore_errors=True)
        return outcome
    directory.mkdir(parents=True, exist_ok=True)
    stored = directory / MODEL_FILE
    shutil.move(str(onnx_path), stored)
    save_info(models_dir, parent.model_copy(update={
        "name": outcome.name, "version": "1", "parent": parent.name,
        "variant": outcome.variant, "bytes": stored.stat().st_size,
        "sha256": sha256_file(stored), "parameters": outcome.parameters, "role": "full",
        "split_point": None, "bottleneck": None, **metadata()}))
    return outcome


def _register_measured(models_dir: Path, parent: ModelInfo, variant: str, onnx_path: Path,
                       data: EvalSet, accuracy_budget: float,
                       parameters: int | None) -> VariantOutcome:
    """`register_variant` for any model: quality by the parent's task on `data`, the
    variant keeping the parent's calibration, labels and preprocessing."""
    from tierwise.models.store import list_models

    name = variant_name(parent.name, variant)
    found = list_models(models_dir)
    loaded = {name: OnnxModel(onnx_path, parent.model_copy(update={"name": name}), threads=2)}

    def load(model: str) -> OnnxModel:  # the parent, and its reference model if it has one
        if model not in loaded:
            if model not in found:
                raise ConfigError(f"{parent.name}: its reference model {model!r} is not in "
                                  f"{models_dir}")
            loaded[model] = OnnxModel(found[model][1], found[model][0], threads=2)
        return loaded[model]

    judge = Judge(data if data.targets is not None or data.reference else EvalSet(
        samples=data.samples, source=data.source, reference=parent.name), load)
    parent_quality = judge.quality(parent.name, judge.results(parent.name))
    quality = judge.quality(parent.name, judge.results(name, task_of=parent.name))
    drop = parent_quality - quality
    outcome = VariantOutcome(
        name=name, parent=parent.name, variant=variant, kept=drop <= accuracy_budget,
        bytes=onnx_path.stat().st_size,
        parameters=parameters if parameters is not None else onnx_parameters(onnx_path),
        validation_accuracy=quality, parent_validation_accuracy=parent_quality,
        test_accuracy=quality, details={"quality": judge.quality_name(parent.name)})
    reason = (f"{judge.quality_name(parent.name)} {quality:.2%} is {drop * 100:.2f} points "
              f"below {parent.name}'s; the budget is {accuracy_budget * 100:g}")
    return _settle(models_dir, parent, outcome, onnx_path, reason, lambda: {"trained": None})


def register_module(
    models_dir: Path, parent: ModelInfo, variant: str, module: nn.Module, splits: Splits,
    accuracy_budget: float, training: dict[str, float],
) -> VariantOutcome:
    """Export a trained torch `module` (checked against torch) and register it as
    `<parent>.<variant>` if it is within `accuracy_budget`."""
    from tierwise.zoo.architectures import parameter_count
    from tierwise.zoo.export import export_onnx

    with tempfile.TemporaryDirectory(prefix="tierwise-variant-") as scratch:
        path = Path(scratch) / MODEL_FILE
        export_onnx(module, path, splits.test_x[:64])
        return register_variant(models_dir, parent, variant, path, splits, accuracy_budget,
                                parameters=parameter_count(module), training=training)


def parent_info(models_dir: Path, name: str) -> ModelInfo:
    """The whole, non-variant model `name`, or an error that says what there is."""
    found = list_models(models_dir)
    whole = sorted(n for n, (info, _) in found.items() if info.role == "full" and not info.variant)
    if name not in whole:
        raise FileNotFoundError(f"{models_dir}: no model {name!r} to optimize; found {whole} "
                                f"(run `tierwise zoo train`)")
    return found[name][0]
