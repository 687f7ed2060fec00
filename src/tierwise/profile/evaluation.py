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


def eval_set_for(info: ModelInfo, limit: int = EVAL_LIMIT) -> EvalSet:
    """The evaluation data of `info` (its `eval_data`), as its task reads it: a
    classifier's ImageFolder labels are mapped by class name to the model's own label
    indices (folder `dog` is the class the model's labels call `dog`); a detector's COCO
    boxes likewise by category name. Labels the task cannot use (class folders for a
    detector, any labels for an embedding) are left out, and `info.reference` (else the
    model itself) stands in for them.

    Raises EvalDataError naming the data and what does not fit: a class name the model's
    labels do not have, a folder count that is not the model's class count where it has
    no labels, COCO boxes for a classifier, no labels and no reference for a classifier
    or detector."""
    from tierwise.data.images import EvalDataError, load_frames

    frames = load_frames(info.eval_data or "", limit=limit)
    targets: Any = None
    if info.task == "classification" and frames.labels is not None:
        targets = _relabelled(frames.labels, frames.classes, info, frames.source)
    elif info.task == "classification" and frames.boxes is not None:
        raise EvalDataError(f"{frames.source}: detection boxes for the classifier "
                            f"{info.name}; expected an ImageFolder, or images with --reference")
    elif info.task == "detection" and frames.boxes is not None:
        targets = [(boxes, _relabelled(classes, frames.classes, info, frames.source))
                   for boxes, classes in frames.boxes]
    if targets is None and info.task in ("classification", "detection") and \
            not info.reference:
        raise EvalDataError(f"{frames.source}: no {info.task} labels here for {info.name}; "
                            "pass --reference MODEL, whose results stand in for them")
    return EvalSet(samples=frames.images, source=frames.source, targets=targets,
                   reference=None if targets is not None else info.reference)


def _relabelled(indices: np.ndarray, classes: list[str], info: ModelInfo,
                source: str) -> np.ndarray:
    """Class indices of the data (into `classes`) as indices into the model's labels."""
    from tierwise.data.images import EvalDataError

    if not info.labels:
        return indices
    position = {label: index for index, label in enumerate(info.labels)}
    unknown = sorted({name for name in classes if name not in position})
    if unknown:
        shown = ", ".join(info.labels[:6]) + (" ..." if len(info.labels) > 6 else "")
        raise EvalDataError(f"{source}: classes {unknown[:5]} are not labels of {info.name} "
                            f"({shown}); name each folder or category by the model's label")
    mapping = np.array([position[name] for name in classes], np.int64)
    return mapping[np.asarray(indices, np.int64)] if len(indices) else np.asarray(indices)


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
