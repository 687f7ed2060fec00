"""One ONNX Runtime session per model, with the model's metadata beside it."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from tierwise.zoo.store import ModelInfo, list_models


class OnnxModel:
    """A loaded model. `run` is thread-safe (ONNX Runtime sessions are) and releases the GIL."""

    def __init__(self, path: Path, info: ModelInfo, threads: int = 1) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.path = Path(path)
        self.info = info
        self.session = ort.InferenceSession(
            str(path), sess_options=options, providers=["CPUExecutionProvider"]
        )
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [output.name for output in self.session.get_outputs()]

    @property
    def name(self) -> str:
        return self.info.name

    def run(self, inputs: np.ndarray) -> np.ndarray:
        """The first output for a batch of inputs."""
        return self.session.run(self.output_names[:1], {self.input_name: inputs})[0]

    def run_batched(self, inputs: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """The first output for any number of inputs, `batch_size` at a time."""
        if len(inputs) == 0:
            return self.run(inputs)
        return np.concatenate([self.run(inputs[start:start + batch_size])
                               for start in range(0, len(inputs), batch_size)])

    def run_timed(self, inputs: np.ndarray) -> tuple[np.ndarray, float]:
        """(first output, compute time in ms)."""
        started = time.perf_counter()
        out = self.run(inputs)
        return out, (time.perf_counter() - started) * 1e3


def load_models(
    models_dir: Path, threads: int = 1, names: list[str] | None = None
) -> dict[str, OnnxModel]:
    """Every model under `models_dir` (or only `names`), loaded."""
    found = list_models(models_dir)
    if names is not None:
        missing = sorted(set(names) - set(found))
        if missing:
            raise FileNotFoundError(
                f"{models_dir}: no model(s) {missing}; found {sorted(found)}"
            )
        found = {name: found[name] for name in names}
    return {name: OnnxModel(path, info, threads) for name, (info, path) in found.items()}
