"""Classification: one score per class per sample, read as calibrated probabilities.

Calibration is temperature scaling (Guo et al., "On Calibration of Modern Neural Networks",
ICML 2017): probabilities = softmax(logits / T), with T from the model's metadata. A model
that already outputs probabilities is calibrated the same way on log-probabilities, since
softmax(log p / T) = softmax(logits / T) when p = softmax(logits).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Self

import numpy as np

from tierwise.models.store import ModelInfo, TensorSpec
from tierwise.profile.calibration import softmax
from tierwise.tasks.base import (
    FLOAT_DATATYPES,
    LABELS,
    Outputs,
    Quality,
    Task,
    TaskError,
    against_reference,
    check_paired,
    pick_output,
    pick_spec,
)

OUTPUTS_ARE = ("auto", "logits", "probabilities")
# a row is read as probabilities (auto) when it is non-negative and sums to 1 within this
_PROBABILITY_SUM_TOLERANCE = 1e-3
_TOP_K_FIDELITY = 5


def _descending(values: np.ndarray) -> np.ndarray:
    """Indices of `values` [..., C] from highest to lowest; ties keep the lower index first."""
    return np.argsort(-np.asarray(values, dtype=np.float64), axis=-1, kind="stable")


@dataclass(frozen=True, eq=False)
class ClassificationResult:
    """One sample's answer: `label` (the class index with the highest probability),
    `probabilities` [classes] float64 (calibrated, summing to 1) and `label_name` (None when
    the model has no labels). `labels` names every class, for `top_k`."""

    label: int
    probabilities: np.ndarray
    label_name: str | None = None
    labels: tuple[str, ...] = field(default=(), repr=False)

    @property
    def confidence(self) -> float:
        """The calibrated probability of `label`: the largest one."""
        return float(self.probabilities[self.label])

    def top_k(self, k: int) -> list[tuple[int, str | None, float]]:
        """The `k` most probable classes as (index, name or None, probability), most
        probable first (ties: lower index first); fewer when there are fewer classes."""
        order = _descending(self.probabilities)[:k]
        return [(int(index), self.labels[index] if index < len(self.labels) else None,
                 float(self.probabilities[index])) for index in order]


def classification_strings(probabilities: np.ndarray, k: int,
                           labels: Sequence[str] = ()) -> list[list[str]]:
    """The OIP classification extension's answer (as Triton serves it): per row of
    `probabilities` [batch, classes], the `k` highest values (fewer when there are fewer
    classes), highest first, each as "<value>:<index>" or "<value>:<index>:<label>" when
    `labels` names the class.

    Triton formats the value with C++ `std::to_string` — six decimals for floats ("0.700000"),
    plain digits for integers — and reports the output's own values; any per-class scores
    (probabilities, logits) may be passed. Raises TaskError for a non-2-D array or k < 1.
    """
    values = np.asarray(probabilities)
    if values.ndim != 2:
        raise TaskError(f"classification: probabilities: shape {list(values.shape)}; expected "
                        f"[batch, classes]")
    if k < 1:
        raise TaskError(f"classification: k: {k}; expected a class count of at least 1")
    integral = np.issubdtype(values.dtype, np.integer)
    rows = []
    for row, order in zip(values, _descending(values)[:, :k], strict=True):
        strings = []
        for index in order:
            value = str(int(row[index])) if integral else f"{float(row[index]):f}"
            name = f":{labels[index]}" if index < len(labels) else ""
            strings.append(f"{value}:{int(index)}{name}")
        rows.append(strings)
    return rows


class Classification(Task[ClassificationResult]):
    """Class scores [batch, classes] -> the most probable class, with calibrated
    probabilities (temperature scaling, Guo et al. 2017).

    Parameters:
        labels: class names by index; () when the model has none.
        temperature: T > 0 of softmax(logits / T); 1.0 leaves the scores as they are.
        output: the output holding the class scores; None reads the first output.
        outputs_are: "logits", "probabilities" or "auto" (default): a batch whose every row
            is non-negative and sums to 1 within 1e-3 is read as probabilities.

    Confidence is the largest calibrated probability. Quality is accuracy against integer
    labels; fidelity is top-1 agreement with a reference model, with top-5 containment (the
    reference's top-1 among our five most probable) beside it.
    """

    name = "classification"
    has_confidence = True

    def __init__(self, labels: Sequence[str] = (), temperature: float = 1.0,
                 output: str | None = None, outputs_are: str = "auto") -> None:
        if outputs_are not in OUTPUTS_ARE:
            raise TaskError(f"classification: outputs_are: {outputs_are!r}; expected one of "
                            f"{', '.join(OUTPUTS_ARE)}")
        if not temperature > 0:
            raise TaskError(f"classification: temperature: {temperature}; expected > 0")
        self.labels = tuple(labels)
        self.temperature = temperature
        self.output = output
        self.outputs_are = outputs_are

    @classmethod
    def from_info(cls, info: ModelInfo, **options: Any) -> Self:
        """Labels, temperature and the first output's name from the metadata."""
        settings: dict[str, Any] = {
            "labels": info.labels, "temperature": info.calibration.temperature,
            "output": info.outputs[0].name if info.outputs else None}
        return cls(**(settings | options))

    def check_outputs(self, outputs: list[TensorSpec]) -> None:
        spec = pick_spec(self.name, outputs, self.output)
        expected = "expected [batch, classes] logits or probabilities"
        if len(spec.shape) != 2:
            raise TaskError(f"classification: output {spec.describe()}; {expected}")
        if spec.datatype not in FLOAT_DATATYPES:
            raise TaskError(f"classification: output {spec.describe()}; {expected} in one of "
                            f"{', '.join(FLOAT_DATATYPES)}")
        classes = spec.shape[1]
        if classes == 1:
            raise TaskError(f"classification: output {spec.describe()} holds one score per "
                            f"sample (a sigmoid?); expected one per class, at least 2")
        if self.labels and classes > 0 and len(self.labels) != classes:
            raise TaskError(f"classification: labels: {len(self.labels)} names for the "
                            f"{classes} classes of output {spec.describe()}; expected one "
                            f"per class")

    def are_probabilities(self, scores: np.ndarray) -> bool:
        """Whether `scores` [batch, classes] are read as probabilities (see outputs_are)."""
        if self.outputs_are != "auto":
            return self.outputs_are == "probabilities"
        sums = scores.sum(axis=-1, dtype=np.float64)
        return bool((scores >= 0).all() and
                    (np.abs(sums - 1.0) <= _PROBABILITY_SUM_TOLERANCE).all())

    def calibrated_probabilities(self, scores: np.ndarray) -> np.ndarray:
        """softmax(logits / T) [batch, classes] float64 of class scores [batch, classes]."""
        scores = np.asarray(scores)
        if self.are_probabilities(scores):
            with np.errstate(divide="ignore"):  # log 0 = -inf is exact: softmax gives 0 back
                scores = np.log(scores.astype(np.float64))
        return softmax(scores, self.temperature)

    def decode(self, outputs: Outputs) -> list[ClassificationResult]:
        scores = pick_output(self.name, outputs, self.output)
        if scores.ndim != 2:
            raise TaskError(f"classification: output {self.output or '(first)'}: shape "
                            f"{list(scores.shape)}; expected [batch, classes]")
        probabilities = self.calibrated_probabilities(scores)
        return [ClassificationResult(
            label=int(label), probabilities=row,
            label_name=self.labels[label] if label < len(self.labels) else None,
            labels=self.labels)
            for label, row in zip(probabilities.argmax(axis=1), probabilities, strict=True)]

    def confidence(self, result: ClassificationResult) -> float:
        return result.confidence

    def quality(self, results: Sequence[ClassificationResult],
                targets: Sequence[int] | np.ndarray) -> Quality:
        """Accuracy: the share of results whose label equals the target class index."""
        check_paired(self.name, results, targets, "targets")
        predicted = np.array([result.label for result in results])
        accuracy = float(np.mean(predicted == np.asarray(targets, dtype=np.int64)))
        return Quality("accuracy", accuracy, len(results), LABELS)

    def fidelity(self, results: Sequence[ClassificationResult],
                 reference_results: Sequence[ClassificationResult],
                 reference_name: str) -> Quality:
        """Top-1 agreement with the reference; extra["top5_containment"] is the share of
        samples whose reference label is among our five most probable classes."""
        check_paired(self.name, results, reference_results, "reference_results")
        ours = np.stack([result.probabilities for result in results])
        theirs = np.array([result.label for result in reference_results])
        if ours.shape[1] != reference_results[0].probabilities.shape[0]:
            raise TaskError(f"classification: reference_results: "
                            f"{reference_results[0].probabilities.shape[0]} classes against "
                            f"our {ours.shape[1]}; expected the same classes")
        agreement = float(np.mean(ours.argmax(axis=1) == theirs))
        top = _descending(ours)[:, :_TOP_K_FIDELITY]
        containment = float(np.mean((top == theirs[:, None]).any(axis=1)))
        return Quality(f"fidelity (top-1 agreement with {reference_name})", agreement,
                       len(results), against_reference(reference_name),
                       {"top5_containment": containment})

    def changed(self, results: Sequence[ClassificationResult],
                unchanged_results: Sequence[ClassificationResult]) -> dict[str, float]:
        """top1_agreement with the unchanged results, and max_abs_probability_error: the
        largest change of any calibrated probability."""
        check_paired(self.name, results, unchanged_results, "unchanged_results")
        ours = np.stack([result.probabilities for result in results])
        theirs = np.stack([result.probabilities for result in unchanged_results])
        return {"top1_agreement": float(np.mean(ours.argmax(axis=1) == theirs.argmax(axis=1))),
                "max_abs_probability_error": float(np.abs(ours - theirs).max())}
