"""`tierwise optimize distill`: a device-size student taught by the cloud model's softened
logits (knowledge distillation, Hinton, Vinyals & Dean, 2015), against the same student
trained on labels alone with the same budget (architecture, epochs, schedule, seed and
augmentation), so the comparison isolates what the teacher adds.

The loss is alpha · T² · KL(softmax(teacher / T) ‖ softmax(student / T)) + (1 - alpha) · the
label loss the zoo trains with. The teacher is the published ONNX model, run by ONNX Runtime
on each augmented batch as the student sees it — no torch weights of the teacher are needed.
The student is registered as `<zoo device model>.distilled`, a variant that runs wherever the
device model does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.progress import Progress
from torch.nn import functional

from tierwise.config import DistillConfig
from tierwise.data import Splits
from tierwise.models.store import list_models
from tierwise.optimize.variants import VariantOutcome, parent_info, register_module
from tierwise.runtime.session import OnnxModel
from tierwise.zoo.names import model_name
from tierwise.zoo.train import LabelLoss, predict_logits, train_model


class SoftTargets:
    """The distillation objective: the teacher's softened distribution, plus the labels.

    `teacher` maps the batch the student sees to the teacher's logits (no gradient)."""

    def __init__(self, teacher: Callable[[torch.Tensor], torch.Tensor], temperature: float,
                 alpha: float) -> None:
        self.teacher = teacher
        self.temperature = temperature
        self.alpha = alpha
        self.labels = LabelLoss()

    def __call__(self, logits: torch.Tensor, images: torch.Tensor,
                 labels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            teacher = self.teacher(images)
        soft = functional.kl_div(
            functional.log_softmax(logits / self.temperature, dim=1),
            functional.log_softmax(teacher / self.temperature, dim=1),
            reduction="batchmean", log_target=True) * self.temperature ** 2
        return self.alpha * soft + (1 - self.alpha) * self.labels(logits, images, labels)


def onnx_teacher(model: OnnxModel) -> Callable[[torch.Tensor], torch.Tensor]:
    """A published model as a teacher: ONNX Runtime on the batch as the student sees it."""
    return lambda images: torch.from_numpy(model.run(np.ascontiguousarray(images.numpy())))


@dataclass
class DistillResult:
    distilled: VariantOutcome
    label_only_test_accuracy: float
    label_only_validation_accuracy: float
    teacher: str
    teacher_test_accuracy: float
    seconds: dict[str, float]

    def to_dict(self) -> dict[str, object]:
        return {"distilled": self.distilled.to_dict(),
                "label_only": {"test_accuracy": self.label_only_test_accuracy,
                               "validation_accuracy": self.label_only_validation_accuracy},
                "teacher": self.teacher, "teacher_test_accuracy": self.teacher_test_accuracy,
                "gain_test_points": 100 * (self.distilled.test_accuracy
                                           - self.label_only_test_accuracy),
                "seconds": self.seconds}


def distill(models_dir: Path, settings: DistillConfig, splits: Splits, *,
            accuracy_budget: float = 0.01, seed: int = 0,
            progress: Progress | None = None) -> DistillResult:
    """Train the student twice (labels alone; the teacher's soft labels too), register the
    distilled one as `<student model>.distilled`, and return both results."""
    found = list_models(models_dir)
    if settings.teacher not in found:
        raise FileNotFoundError(f"optimize.distill.teacher: no model {settings.teacher!r} in "
                                f"{models_dir}; found {sorted(found)}")
    parent = parent_info(models_dir, model_name(settings.student))
    teacher_info, teacher_path = found[settings.teacher]
    teacher = OnnxModel(teacher_path, teacher_info, threads=1)
    label_only = train_model(settings.student, splits.train_x, splits.train_y, settings.train,
                             seed=seed, progress=progress,
                             description=f"train {settings.student} on labels alone")
    soft_targets = SoftTargets(onnx_teacher(teacher), settings.temperature, settings.alpha)
    taught = train_model(settings.student, splits.train_x, splits.train_y, settings.train,
                         seed=seed, progress=progress, objective=soft_targets,
                         description=f"distil {settings.teacher} into {settings.student}")
    outcome = register_module(
        models_dir, parent, "distilled", taught.model, splits, accuracy_budget,
        training={"epochs": taught.epochs, "seconds": taught.seconds,
                  "temperature": settings.temperature, "alpha": settings.alpha})
    val_logits = predict_logits(label_only.model, splits.val_x)
    test_logits = predict_logits(label_only.model, splits.test_x)
    return DistillResult(
        distilled=outcome,
        label_only_test_accuracy=float((test_logits.argmax(1) == splits.test_y).mean()),
        label_only_validation_accuracy=float((val_logits.argmax(1) == splits.val_y).mean()),
        teacher=settings.teacher,
        teacher_test_accuracy=teacher_info.training_record().test_accuracy,
        seconds={"label_only": label_only.seconds, "distilled": taught.seconds})
