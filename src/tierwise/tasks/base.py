"""What every task does with a model's outputs, whatever the model is for.

A task reads a batch of raw outputs into one result per sample (`decode`), says how sure a
result is (`confidence`: a cascade escalates when it is low; None means the task has no
confidence, so no cascade), and says how good a batch of results is: against labels
(`quality`), against a reference model's results (`fidelity`, where there are no labels), and
how far a lossy plan — a codec, a quantised variant — moved them (`changed`).

numpy only: devices decode their own outputs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence, Sized
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, Self, TypeVar

import numpy as np

from tierwise.models.store import ModelInfo, TensorSpec

LABELS = "labels"
FLOAT_DATATYPES = ("FP16", "BF16", "FP32", "FP64")

ResultT = TypeVar("ResultT")

# A batch of raw model outputs: output name -> array with the batch first, or one array
# (the model's first output) where the task reads a single output.
Outputs = Mapping[str, np.ndarray] | np.ndarray


class TaskError(ValueError):
    """Outputs, options or targets a task cannot take: the message names the output, option
    or argument, what it was and what was expected."""


def against_reference(model: str) -> str:
    """The `Quality.against` of a score measured against `model`'s results."""
    return f"reference:{model}"


@dataclass(frozen=True)
class Quality:
    """How good a batch of results is, by one metric.

    `metric` names it ("accuracy", "mAP@0.5", "cosine similarity", "fidelity (top-1 agreement
    with resnet50)"); `value` is in [0, 1] for every metric here; `samples` is how many
    results it was measured on; `against` is "labels" or "reference:<model name>"; `extra`
    holds the metric's companions (top-5 containment, per-class AP, max abs error...)."""

    metric: str
    value: float
    samples: int
    against: str
    extra: dict[str, float] = field(default_factory=dict)


class Task(ABC, Generic[ResultT]):
    """One kind of model output (class scores, boxes, vectors...) and how to judge it.

    A task is one small class: `__init__` stores its options, `from_info` reads them from a
    model's metadata, and a new task is a new subclass added to `tierwise.tasks.TASKS`.
    """

    name: ClassVar[str]
    has_confidence: ClassVar[bool]

    @classmethod
    @abstractmethod
    def from_info(cls, info: ModelInfo, **options: Any) -> Self:
        """The task for the model `info` describes; `options` override what the metadata
        says (labels, temperature, output names, thresholds...)."""

    @abstractmethod
    def check_outputs(self, outputs: list[TensorSpec]) -> None:
        """Raises TaskError, naming the output and the shape expected, when a model with
        these outputs (OIP specs, batch first, -1 where dynamic) cannot be read by this
        task."""

    @abstractmethod
    def decode(self, outputs: Outputs) -> list[ResultT]:
        """One result per sample of a batch of raw outputs (output name -> array, batch
        first; or the model's first output alone, where the task reads one output)."""

    def confidence(self, result: ResultT) -> float | None:
        """How sure `result` is, in [0, 1]; None where the task has no confidence."""
        return None

    @abstractmethod
    def quality(self, results: Sequence[ResultT], targets: Sequence[Any]) -> Quality:
        """`results` scored against ground truth, one target per result."""

    @abstractmethod
    def fidelity(self, results: Sequence[ResultT], reference_results: Sequence[ResultT],
                 reference_name: str) -> Quality:
        """`results` scored against the results of the model `reference_name` on the same
        inputs, standing in for labels where there are none."""

    @abstractmethod
    def changed(self, results: Sequence[ResultT],
                unchanged_results: Sequence[ResultT]) -> dict[str, float]:
        """How far a lossy plan moved the results from `unchanged_results` (the same model
        on the same inputs without the loss): metric name -> value."""


def pick_output(task: str, outputs: Outputs, name: str | None) -> np.ndarray:
    """The array of output `name` (the first output when None) from a batch of outputs."""
    if isinstance(outputs, np.ndarray):
        return outputs
    if not outputs:
        raise TaskError(f"{task}: outputs: empty; expected at least one output array")
    if name is None:
        return np.asarray(next(iter(outputs.values())))
    if name not in outputs:
        raise TaskError(f"{task}: no output named {name!r}; got {sorted(outputs)}")
    return np.asarray(outputs[name])


def pick_spec(task: str, specs: list[TensorSpec], name: str | None) -> TensorSpec:
    """The spec of output `name` (the first output when None)."""
    if not specs:
        raise TaskError(f"{task}: the model has no outputs; expected at least one")
    if name is None:
        return specs[0]
    for spec in specs:
        if spec.name == name:
            return spec
    raise TaskError(f"{task}: no output named {name!r}; the model's outputs are "
                    f"{', '.join(spec.describe() for spec in specs)}")


def check_paired(task: str, results: Sequence[Any], others: Sized,
                 argument: str) -> None:
    """Raises TaskError unless `others` holds one entry per result, and there are results."""
    if len(results) == 0:
        raise TaskError(f"{task}: results: empty; expected at least one result to score")
    if len(others) != len(results):
        raise TaskError(f"{task}: {argument}: {len(others)} entries for {len(results)} "
                        f"results; expected one per result")
