"""ML tasks: how a model's raw outputs become results, how sure each result is, and how good
a batch of them is. One class per task behind `Task`; `TASKS` lists them, and `task_for`
picks one from a model's metadata (`ModelInfo.task`). The model store keeps their names too
(`tierwise.models.store.TASKS`, below this package), and a test keeps the two equal.
numpy only.
"""

from __future__ import annotations

from typing import Any

from tierwise.models.store import ModelInfo
from tierwise.tasks.base import LABELS, Quality, Task, TaskError, against_reference
from tierwise.tasks.classification import (
    Classification,
    ClassificationResult,
    classification_strings,
)
from tierwise.tasks.detection import (
    BoxLayout,
    DecodedBoxes,
    Detection,
    DetectionResult,
    SsdAnchorBoxes,
    SsdAnchors,
    average_precision,
    box_iou,
    mean_average_precision,
    non_max_suppression,
)
from tierwise.tasks.embedding import Embedding, Generic, compare_vectors, cosine_similarity

TASKS: dict[str, type[Task[Any]]] = {
    task.name: task for task in (Classification, Detection, Embedding, Generic)}


def task_for(info: ModelInfo, **options: Any) -> Task[Any]:
    """The task of the model `info` describes, its options read from the metadata and
    overridden by `options`, checked against the model's outputs.

    Raises TaskError for an unknown task (naming the known ones), an option the task does
    not have (naming the ones it has), or outputs the task cannot read (naming the output
    and the shape expected)."""
    if info.task not in TASKS:
        raise TaskError(f"{info.name}: task: {info.task!r}; expected one of "
                        f"{', '.join(TASKS)}")
    kind = TASKS[info.task]
    try:
        task = kind.from_info(info, **(info.task_options | options))
    except TypeError as error:  # an unknown keyword: name what the task takes
        import inspect

        known = [name for name in inspect.signature(kind.__init__).parameters
                 if name != "self"]
        known += list(getattr(kind, "LAYOUT_OPTIONS", ()))
        raise TaskError(f"{info.name}: task options {sorted(info.task_options | options)}: "
                        f"{error}; {kind.name} takes {', '.join(known)}") from None
    task.check_outputs(info.outputs)
    return task


__all__ = [
    "LABELS",
    "TASKS",
    "BoxLayout",
    "Classification",
    "ClassificationResult",
    "DecodedBoxes",
    "Detection",
    "DetectionResult",
    "Embedding",
    "Generic",
    "Quality",
    "SsdAnchorBoxes",
    "SsdAnchors",
    "Task",
    "TaskError",
    "against_reference",
    "average_precision",
    "box_iou",
    "classification_strings",
    "compare_vectors",
    "cosine_similarity",
    "mean_average_precision",
    "non_max_suppression",
    "task_for",
]
