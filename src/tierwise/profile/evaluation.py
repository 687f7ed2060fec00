"""The data a model is measured on, and how its quality is judged there, for any task.

An `EvalSet` holds samples and, where there are labels, their targets. Where there are none,
a reference model's results stand in for them ("fidelity to <model>"), and every number that
depends on it says so (`EvalSet.quality_name`). With neither, a model is judged against
itself unchanged: what a lossy codec or a cut keeps of its outputs.

Which data: a model's `eval_data` (`tierwise models add --eval`: an ImageFolder, images or
a video), else the config's dataset (Fashion-MNIST's validation split by default).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tierwise.models.inputs import as_batch, image_size
from tierwise.models.store import ModelInfo
from tierwise.runtime.session import OnnxModel
from tierwise.tasks import ClassificationResult, DetectionResult, Task, box_iou, task_for

EVAL_LIMIT = 500  # images or frames read from eval data given as files


@dataclass
class EvalSet:
    """Samples to measure models on: `samples` a uint8 batch the models take as they are
    ([N, ...] of the input spec), or a list of images of any size (resized per model);
    `targets` the task's ground truth per sample (class indices for classification), or None.
    """

    samples: np.ndarray | list[np.ndarray]
    source: str
    targets: Sequence[Any] | np.ndarray | None = None
    reference: str | None = None  # the model whose results stand in for targets
    _prepared: dict[Any, np.ndarray] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def key(self) -> str:
        """Models measured on the same key saw the same samples: cascades pair them."""
        return self.source

    def inputs_for(self, info: ModelInfo) -> np.ndarray:
        """Every sample as `info`'s model takes it, one batch (cached per image size)."""
        size = image_size(info)
        if size is None and isinstance(self.samples, np.ndarray):
            return self.samples
        key = (size, info.inputs[0].shape[-1]) if size else info.name
        if key not in self._prepared:
            self._prepared[key] = np.concatenate([as_batch(info, sample)
                                                 for sample in self.samples])
        return self._prepared[key]


def eval_set_from_files(source: str | Path, limit: int = EVAL_LIMIT,
                        reference: str | None = None) -> EvalSet:
    """An ImageFolder (labelled: its class indices are the targets), or unlabelled images or
    a video (then `reference` must name the model whose results stand in for labels)."""
    from tierwise.data.images import load_frames

    frames = load_frames(source, limit=limit)
    targets = frames.labels if frames.labels is not None else frames.boxes
    return EvalSet(samples=frames.images, source=frames.source, targets=targets,
                   reference=None if frames.labelled else reference)


def detections_agree(result: DetectionResult, truth: DetectionResult,
                     iou_threshold: float = 0.5) -> bool:
    """Whether two detections of one image are the same answer: as many boxes, each matched
    one to one (greedily, best IoU first) to a box of the same class with IoU at least
    `iou_threshold` (the mAP@0.5 criterion, per image). What a cascade curve counts as a
    detector being right on an image."""
    if len(result.boxes) != len(truth.boxes):
        return False
    if len(truth.boxes) == 0:
        return True
    overlap = box_iou(result.boxes, truth.boxes)
    overlap[result.classes[:, None] != truth.classes[None, :]] = 0.0
    for _ in range(len(truth.boxes)):
        row, column = np.unravel_index(int(overlap.argmax()), overlap.shape)
        if overlap[row, column] < iou_threshold:
            return False
        overlap[row, :] = -1.0
        overlap[:, column] = -1.0
    return True


class Judge:
    """Runs models on one EvalSet and scores their outputs with their tasks."""

    def __init__(self, data: EvalSet, load: Callable[[str], OnnxModel]) -> None:
        self.data = data
        self.load = load
        self._outputs: dict[str, dict[str, np.ndarray]] = {}
        self._tasks: dict[str, Task[Any]] = {}

    def task(self, name: str) -> Task[Any]:
        if name not in self._tasks:
            self._tasks[name] = task_for(self.load(name).info)
        return self._tasks[name]

    def inputs(self, name: str) -> np.ndarray:
        return self.data.inputs_for(self.load(name).info)

    def outputs(self, name: str, inputs: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """The model's outputs on every sample (cached for the unchanged inputs)."""
        if inputs is None:
            if name not in self._outputs:
                self._outputs[name] = self.load(name).run_all_batched(self.inputs(name))
            return self._outputs[name]
        return self.load(name).run_all_batched(inputs)

    def results(self, name: str, outputs: dict[str, np.ndarray] | None = None,
                task_of: str | None = None) -> list[Any]:
        return self.task(task_of or name).decode(outputs or self.outputs(name))

    def quality_name(self, whole: str) -> str:
        """What `quality` measures for the whole model `whole`: the metric and against what."""
        task = self.task(whole).name
        if self.data.targets is not None:
            metric = {"classification": "accuracy", "detection": "mAP@0.5"}.get(
                task, "similarity")
            return f"{metric} on {self.data.source}"
        reference = self.data.reference or whole
        return f"fidelity to {reference} on {self.data.source}"

    def quality(self, whole: str, results: list[Any]) -> float:
        """`results` of the whole model `whole` (or of a plan standing in for it: a codec, a
        cut) scored against the targets, else the reference's results, else the unchanged
        model's."""
        task = self.task(whole)
        if self.data.targets is not None:
            return float(task.quality(results, list(self.data.targets)).value)
        reference = self.data.reference or whole
        return float(task.fidelity(results, self.results(reference), reference).value)

    def quality_of(self, whole: str, model: str | None = None
                   ) -> Callable[[np.ndarray], float]:
        """inputs of `model` (default `whole`; a tail for a cut) -> the quality of `whole`'s
        answers through it."""
        def measure(inputs: np.ndarray) -> float:
            outputs = self.outputs(model or whole, inputs)
            return self.quality(whole, self.task(whole).decode(outputs))
        return measure

    def correct(self, name: str) -> np.ndarray | None:
        """Per sample, whether `name` answers right: a classification's top-1 against the
        label (or the reference's top-1); a detection's boxes against the reference's, one
        to one (`detections_agree`). None where there is no per-sample answer."""
        results = self.results(name)
        if results and isinstance(results[0], DetectionResult):
            if self.data.targets is not None:
                truths = [DetectionResult(boxes=boxes, scores=np.ones(len(boxes), np.float32),
                                          classes=classes)
                          for boxes, classes in self.data.targets]
            else:
                truths = self.results(self.data.reference or name)
            return np.array([detections_agree(result, truth)
                             for result, truth in zip(results, truths, strict=True)])
        if not results or not isinstance(results[0], ClassificationResult):
            return None
        if self.data.targets is not None:
            truth = np.asarray(self.data.targets)
        else:
            reference = self.data.reference or name
            truth = np.array([result.label for result in self.results(reference)])
        return np.array([result.label for result in results]) == truth

    def confidence(self, name: str) -> np.ndarray:
        task = self.task(name)
        return np.array([task.confidence(result) or 0.0 for result in self.results(name)])
