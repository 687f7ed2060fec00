"""Tasks without a confidence: embeddings (one vector per sample) and generic outputs (any
tensors). Neither can drive a cascade; both are judged by how close their outputs stay to
a target, a reference model's outputs, or the outputs before a lossy plan: cosine similarity
(the usual measure of embedding agreement) beside the largest absolute error.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Self

import numpy as np

from tierwise.models.store import ModelInfo, TensorSpec
from tierwise.tasks.base import (
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


def cosine_similarity(vectors: np.ndarray, others: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity [N] float64 of [N, D] and [N, D], in [-1, 1]. Two zero
    vectors are identical (1.0); a zero vector against a non-zero one is 0.0."""
    a = np.asarray(vectors, dtype=np.float64)
    b = np.asarray(others, dtype=np.float64)
    if a.shape != b.shape:
        raise TaskError(f"vectors {list(a.shape)} against {list(b.shape)}; expected the same "
                        f"shape")
    norm_a, norm_b = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    norms = norm_a * norm_b
    dots = np.einsum("nd,nd->n", a, b)
    both_zero = (norm_a == 0) & (norm_b == 0)
    similarity = np.divide(dots, norms, out=np.zeros_like(dots), where=norms > 0)
    return np.where(both_zero, 1.0, np.clip(similarity, -1.0, 1.0))


def compare_vectors(vectors: np.ndarray, others: np.ndarray) -> dict[str, float]:
    """cosine_mean, cosine_min (over rows) and max_abs_error (over every element) of
    [N, D] against [N, D]."""
    similarity = cosine_similarity(vectors, others)
    error = np.abs(np.asarray(vectors, np.float64) - np.asarray(others, np.float64))
    return {"cosine_mean": float(similarity.mean()), "cosine_min": float(similarity.min()),
            "max_abs_error": float(error.max()) if error.size else 0.0}


def _stack(task: str, vectors: Sequence[np.ndarray], argument: str) -> np.ndarray:
    rows = [np.asarray(vector, dtype=np.float64).reshape(-1) for vector in vectors]
    if len({row.size for row in rows}) > 1:
        raise TaskError(f"{task}: {argument}: vectors of sizes {sorted({r.size for r in rows})};"
                        f" expected one size")
    return np.stack(rows)


def _closeness(vectors: np.ndarray, others: np.ndarray, against: str, metric: str) -> Quality:
    compared = compare_vectors(vectors, others)
    return Quality(metric, compared["cosine_mean"], len(vectors), against,
                   {"cosine_min": compared["cosine_min"],
                    "max_abs_error": compared["max_abs_error"]})


class Embedding(Task[np.ndarray]):
    """One vector per sample: output [batch, dim] -> a float32 vector [dim] per sample.

    No confidence. Quality is the mean cosine similarity to target vectors; fidelity the
    same against a reference model's vectors; extra holds cosine_min and max_abs_error.

    Parameters:
        output: the output holding the vectors; None reads the first output.
    """

    name = "embedding"
    has_confidence = False

    def __init__(self, output: str | None = None) -> None:
        self.output = output

    @classmethod
    def from_info(cls, info: ModelInfo, **options: Any) -> Self:
        settings = {"output": info.outputs[0].name if info.outputs else None}
        return cls(**(settings | options))

    def check_outputs(self, outputs: list[TensorSpec]) -> None:
        spec = pick_spec(self.name, outputs, self.output)
        if len(spec.shape) != 2:
            raise TaskError(f"embedding: output {spec.describe()}; expected [batch, dim] (one "
                            f"vector per sample; the generic task takes any shape)")

    def decode(self, outputs: Outputs) -> list[np.ndarray]:
        vectors = pick_output(self.name, outputs, self.output)
        if vectors.ndim != 2:
            raise TaskError(f"embedding: output {self.output or '(first)'}: shape "
                            f"{list(vectors.shape)}; expected [batch, dim]")
        return list(vectors.astype(np.float32))

    def quality(self, results: Sequence[np.ndarray],
                targets: Sequence[np.ndarray]) -> Quality:
        """Mean cosine similarity to the target vectors, one per result."""
        check_paired(self.name, results, targets, "targets")
        return _closeness(_stack(self.name, results, "results"),
                          _stack(self.name, targets, "targets"), LABELS, "cosine similarity")

    def fidelity(self, results: Sequence[np.ndarray], reference_results: Sequence[np.ndarray],
                 reference_name: str) -> Quality:
        """Mean cosine similarity to the reference model's vectors."""
        check_paired(self.name, results, reference_results, "reference_results")
        return _closeness(_stack(self.name, results, "results"),
                          _stack(self.name, reference_results, "reference_results"),
                          against_reference(reference_name),
                          f"fidelity (cosine similarity with {reference_name})")

    def changed(self, results: Sequence[np.ndarray],
                unchanged_results: Sequence[np.ndarray]) -> dict[str, float]:
        """cosine_mean, cosine_min and max_abs_error against the unchanged vectors."""
        check_paired(self.name, results, unchanged_results, "unchanged_results")
        return compare_vectors(_stack(self.name, results, "results"),
                               _stack(self.name, unchanged_results, "unchanged_results"))


class Generic(Task[dict[str, np.ndarray]]):
    """Any outputs: a result is one sample's outputs, output name -> array (batch dimension
    removed). No confidence. Compared — to targets, a reference or the unchanged outputs — on
    all outputs flattened and concatenated per sample: cosine similarity (mean; min in
    extra) and max absolute error. Outputs of very different magnitudes weigh unequally in
    the cosine; max_abs_error shows the worst element whatever its output.

    Parameters:
        outputs: the outputs to read, by name; None reads them all. A single array passed
            to `decode` is named "output".
    """

    name = "generic"
    has_confidence = False

    def __init__(self, outputs: Sequence[str] | None = None) -> None:
        self.outputs = None if outputs is None else tuple(outputs)

    @classmethod
    def from_info(cls, info: ModelInfo, **options: Any) -> Self:
        return cls(**options)

    def check_outputs(self, outputs: list[TensorSpec]) -> None:
        if not outputs:
            raise TaskError("generic: the model has no outputs; expected at least one")
        for name in self.outputs or ():
            pick_spec(self.name, outputs, name)

    def decode(self, outputs: Outputs) -> list[dict[str, np.ndarray]]:
        named: Mapping[str, np.ndarray] = (
            {"output": outputs} if isinstance(outputs, np.ndarray) else outputs)
        names = self.outputs if self.outputs is not None else tuple(named)
        arrays = {name: pick_output(self.name, named, name) for name in names}
        sizes = {name: len(array) for name, array in arrays.items()}
        if len(set(sizes.values())) > 1:
            raise TaskError(f"generic: outputs: batch sizes {sizes}; expected one batch size")
        batch = next(iter(sizes.values()), 0)
        return [{name: array[n] for name, array in arrays.items()} for n in range(batch)]

    def _flat(self, results: Sequence[dict[str, np.ndarray]], argument: str) -> np.ndarray:
        return _stack(self.name, [np.concatenate(
            [np.asarray(array, np.float64).reshape(-1) for _, array in sorted(result.items())])
            for result in results], argument)

    def quality(self, results: Sequence[dict[str, np.ndarray]],
                targets: Sequence[dict[str, np.ndarray]]) -> Quality:
        """Mean cosine similarity to the expected outputs, one dict per result."""
        check_paired(self.name, results, targets, "targets")
        return _closeness(self._flat(results, "results"),
                          self._flat(targets, "targets"), LABELS, "cosine similarity")

    def fidelity(self, results: Sequence[dict[str, np.ndarray]],
                 reference_results: Sequence[dict[str, np.ndarray]],
                 reference_name: str) -> Quality:
        """Mean cosine similarity to the reference model's outputs."""
        check_paired(self.name, results, reference_results, "reference_results")
        return _closeness(self._flat(results, "results"),
                          self._flat(reference_results, "reference_results"),
                          against_reference(reference_name),
                          f"fidelity (cosine similarity with {reference_name})")

    def changed(self, results: Sequence[dict[str, np.ndarray]],
                unchanged_results: Sequence[dict[str, np.ndarray]]) -> dict[str, float]:
        """cosine_mean, cosine_min and max_abs_error against the unchanged outputs."""
        check_paired(self.name, results, unchanged_results, "unchanged_results")
        return compare_vectors(self._flat(results, "results"),
                               self._flat(unchanged_results, "unchanged_results"))
