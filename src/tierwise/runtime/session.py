"""One ONNX Runtime session per model, with the model's metadata beside it.

Which files are models (`load_repository`): under a models directory, `<name>/model.onnx`
with its `metadata.json` (`tierwise models add`), and also any ONNX file nobody wrote
metadata for, `<name>/model.onnx` alone or a bare `<name>.onnx`: those are described by ONNX
Runtime alone (`describe_onnx`), as task "generic". A file that does not load is reported
(`LoadFailure`), never fatal, so one broken file does not take a server down; the server
lists it as Triton's repository index does, state UNAVAILABLE with the reason.

Memory with varying input shapes: ONNX Runtime's CPU arena keeps the memory of the largest
request it has seen, and its memory patterns are cached per input shape, so a model that
takes images of any size grows with every new size (Triton issues on varying image sizes).
A model with a dynamic dimension besides the batch therefore runs without the arena and
without memory patterns; fixed-shape models keep both, which is the fast path. Measured with
`python scripts/serve_memory.py` (a Conv 3->32 + GlobalAveragePool served over HTTP, 200
requests of 200 new sizes up to 768x768, server RSS after a warm-up -> after the 200):
ONNX Runtime's defaults 100 -> 336 MiB; arena off alone 100 -> 521 MiB, still growing
(memory patterns are cached per shape); both off 100 -> 178 MiB, flat after the first 50.
The price is time: 2.1 s instead of 1.4 s for the 200 requests (2-core VM), as buffers now
come from malloc every run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from tierwise.models.store import (
    METADATA_FILE,
    MODEL_FILE,
    ModelInfo,
    Provenance,
    TensorSpec,
    load_info,
    sha256_file,
)

log = logging.getLogger("tierwise.runtime")

ONNX_SUFFIX = ".onnx"

# ONNX Runtime's type strings -> OIP v2 datatypes. tensor(string) is left out: the server
# carries BYTES only as codec payloads, so a model with text tensors is reported, not served.
_OIP_DATATYPES = {
    "tensor(bool)": "BOOL", "tensor(uint8)": "UINT8", "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32", "tensor(uint64)": "UINT64", "tensor(int8)": "INT8",
    "tensor(int16)": "INT16", "tensor(int32)": "INT32", "tensor(int64)": "INT64",
    "tensor(float16)": "FP16", "tensor(float)": "FP32", "tensor(double)": "FP64",
}

Inputs = np.ndarray | Mapping[str, np.ndarray]


class OnnxModel:
    """A loaded model. `run` is thread-safe (ONNX Runtime sessions are) and releases the GIL."""

    def __init__(self, path: Path, info: ModelInfo, threads: int = 1) -> None:
        self.path = Path(path)
        self.info = info
        self.session = ort.InferenceSession(
            str(path), sess_options=session_options(info, threads),
            providers=["CPUExecutionProvider"])
        self.input_names = [spec.name for spec in self.session.get_inputs()]
        self.input_name = self.input_names[0]
        self.output_names = [output.name for output in self.session.get_outputs()]

    @property
    def name(self) -> str:
        return self.info.name

    def run(self, inputs: Inputs) -> np.ndarray:
        """The first output for a batch of inputs: one array for a one-input model, or a
        mapping input name -> array (every input of the model)."""
        return self.session.run(self.output_names[:1], self._feeds(inputs))[0]

    def run_all(self, inputs: Inputs) -> dict[str, np.ndarray]:
        """Every output, by name, for a batch of inputs (as `run` takes them)."""
        outputs = self.session.run(self.output_names, self._feeds(inputs))
        return dict(zip(self.output_names, outputs, strict=True))

    def _feeds(self, inputs: Inputs) -> Mapping[str, np.ndarray]:
        return {self.input_name: inputs} if isinstance(inputs, np.ndarray) else inputs

    def run_batched(self, inputs: Inputs, batch_size: int = 256) -> np.ndarray:
        """The first output for any number of inputs, `batch_size` at a time (one at a time
        for an unbatched model)."""
        batch_size = batch_size if self.info.batched else 1
        return np.concatenate([self.run(chunk) for chunk in _chunks(inputs, batch_size)])

    def run_all_batched(self, inputs: Inputs, batch_size: int = 256) -> dict[str, np.ndarray]:
        """Every output, by name, for any number of inputs, `batch_size` at a time (one at
        a time for an unbatched model)."""
        batch_size = batch_size if self.info.batched else 1
        parts = [self.run_all(chunk) for chunk in _chunks(inputs, batch_size)]
        return {name: np.concatenate([part[name] for part in parts])
                for name in self.output_names}

    def run_timed(self, inputs: Inputs) -> tuple[np.ndarray, float]:
        """(first output, compute time in ms)."""
        started = time.perf_counter()
        out = self.run(inputs)
        return out, (time.perf_counter() - started) * 1e3

    def run_all_timed(self, inputs: Inputs) -> tuple[dict[str, np.ndarray], float]:
        """(every output by name, compute time in ms)."""
        started = time.perf_counter()
        out = self.run_all(inputs)
        return out, (time.perf_counter() - started) * 1e3


def _chunks(inputs: Inputs, batch_size: int) -> list[Inputs]:
    """`inputs` cut into batches of at most `batch_size` rows (one empty batch for none)."""
    if isinstance(inputs, np.ndarray):
        return [inputs[start:start + batch_size]
                for start in range(0, max(len(inputs), 1), batch_size)]
    rows = len(next(iter(inputs.values())))
    return [{name: array[start:start + batch_size] for name, array in inputs.items()}
            for start in range(0, max(rows, 1), batch_size)]


def varies_beyond_batch(info: ModelInfo) -> bool:
    """Whether an input has a dynamic dimension other than the batch (images of any size,
    sequences of any length): each new shape would then grow the CPU arena."""
    for spec in info.inputs:
        dims = spec.shape[1:] if info.batched else spec.shape
        if any(dim < 0 for dim in dims):
            return True
    return False


def session_options(info: ModelInfo, threads: int = 1) -> ort.SessionOptions:
    """The session options tierwise serves `info`'s model with: `threads` intra-op threads,
    sequential execution; no CPU arena and no memory patterns where input shapes vary beyond
    the batch (see the module docstring)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if varies_beyond_batch(info):
        # Both: without the arena, cached memory patterns alone still grow with every shape.
        options.enable_cpu_mem_arena = False
        options.enable_mem_pattern = False
    return options


class LoadError(ValueError):
    """A model file that cannot be served: the message names the file and says why (ONNX
    Runtime cannot load it, a tensor OIP cannot carry, unreadable metadata)."""


def _reason(error: BaseException) -> str:
    """An error's message on one line, at most 400 characters."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return "; ".join(lines)[:400] or type(error).__name__


def trial_input(spec: TensorSpec, seed: int, batch: int = 1, other_size: int = 32
                ) -> np.ndarray:
    """A random input of `spec` (dynamic dimensions: `batch` first, `other_size` elsewhere)
    of its datatype; different seeds give different values."""
    from tierwise.protocol.oip import numpy_dtype

    shape = [batch if index == 0 and dim < 0 else (dim if dim >= 0 else other_size)
             for index, dim in enumerate(spec.shape)]
    dtype = numpy_dtype(spec.datatype)
    rng = np.random.default_rng(seed)
    if dtype.kind in "ui":
        return rng.integers(0, 255 if dtype.itemsize == 1 else 10, size=shape).astype(dtype)
    if dtype.kind == "b":
        return rng.integers(0, 2, size=shape).astype(bool)
    return rng.random(size=shape, dtype=np.float64).astype(dtype)


def rows_independent(session: ort.InferenceSession, inputs: list[TensorSpec]) -> bool:
    """Whether the first dimension of every input is a batch whose rows do not mix: two
    different samples run together give, row by row, what each gives alone. A dynamic first
    dimension alone proves nothing (an any-size image [h, w, 3] has one; a model normalising
    by its input's maximum mixes rows)."""
    try:
        first = {spec.name: trial_input(spec, seed=1) for spec in inputs}
        second = {spec.name: trial_input(spec, seed=2) for spec in inputs}
        alone = [session.run(None, first), session.run(None, second)]
        together = session.run(None, {name: np.concatenate([first[name], second[name]])
                                      for name in first})
    except Exception:
        return False
    for index, both in enumerate(together):
        if both.shape[:1] != (2,):
            return False
        for row in range(2):
            if not np.allclose(both[row], alone[row][index][0], rtol=1e-4, atol=1e-5):
                return False
    return True


def describe_onnx(path: Path, name: str, version: str = "1") -> ModelInfo:
    """The metadata of the ONNX file `path` as ONNX Runtime alone sees it, for a model nobody
    wrote metadata.json for: its inputs and outputs (symbolic or unknown dimensions -> -1),
    task "generic", `batched` when every input's and output's first dimension is dynamic
    and a trial shows its rows independent (`rows_independent`), and the file's size and
    sha256.

    Raises LoadError (naming the file) when ONNX Runtime cannot load it or a tensor has no
    OIP datatype (sequences, maps, strings)."""
    path = Path(path)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    # Only the signature is read: skip the graph optimisations a serving session does.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        session = ort.InferenceSession(str(path), sess_options=options,
                                       providers=["CPUExecutionProvider"])
    except Exception as error:
        raise LoadError(f"{path}: ONNX Runtime cannot load it: {_reason(error)}") from None
    inputs = [_spec(path, "input", arg) for arg in session.get_inputs()]
    outputs = [_spec(path, "output", arg) for arg in session.get_outputs()]
    batched = all(spec.shape and spec.shape[0] == -1 for spec in inputs + outputs) and \
        rows_independent(session, inputs)
    return ModelInfo(
        name=name, version=version, task="generic", inputs=inputs, outputs=outputs,
        batched=batched, bytes=path.stat().st_size, sha256=sha256_file(path),
        provenance=Provenance(source=f"described by ONNX Runtime from {path.name} (no "
                                     f"{METADATA_FILE})"))


def _spec(path: Path, kind: str, arg: ort.NodeArg) -> TensorSpec:
    datatype = _OIP_DATATYPES.get(arg.type)
    if datatype is None:
        raise LoadError(f"{path}: {kind} {arg.name!r} is {arg.type}; served tensors are "
                            f"one of {', '.join(sorted(_OIP_DATATYPES))}")
    shape = [dim if isinstance(dim, int) and dim >= 0 else -1 for dim in (arg.shape or [])]
    return TensorSpec(name=arg.name, datatype=datatype, shape=shape)


@dataclass(frozen=True, slots=True)
class LoadFailure:
    """A model file that is not served, and why (Triton's state UNAVAILABLE)."""

    name: str
    version: str
    path: Path
    reason: str


@dataclass(frozen=True, slots=True)
class _Found:
    name: str
    path: Path  # the ONNX file
    info: ModelInfo | None  # None: to be described by ONNX Runtime
    problem: str | None = None  # why it cannot be loaded, known before trying


def _find(models_dir: Path) -> dict[str, _Found]:
    """name -> what is there, for every model file under `models_dir` (hidden entries, such
    as an import's staging directory, skipped). A directory wins over a bare file of the
    same name."""
    found: dict[str, _Found] = {}
    root = Path(models_dir)
    if not root.is_dir():
        return found
    bare: list[Path] = []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_file() and entry.suffix == ONNX_SUFFIX:
            bare.append(entry)
            continue
        onnx_file = entry / MODEL_FILE
        if not entry.is_dir() or not onnx_file.is_file():
            continue
        if not (entry / METADATA_FILE).is_file():
            found[entry.name] = _Found(entry.name, onnx_file, None)
            continue
        try:
            info = load_info(entry)
        except Exception as error:  # a hand-edited metadata.json: report it, serve the rest
            found[entry.name] = _Found(entry.name, onnx_file, None,
                                       f"{entry / METADATA_FILE}: unreadable: {_reason(error)}")
            continue
        found[info.name] = _Found(info.name, onnx_file, info)
    for path in bare:
        if path.stem in found:
            log.warning("%s: not served: the directory %s/ has the same name", path,
                        path.stem)
            continue
        found[path.stem] = _Found(path.stem, path, None)
    return found


def load_repository(
    models_dir: Path, threads: int = 1, names: list[str] | None = None
) -> tuple[dict[str, OnnxModel], list[LoadFailure]]:
    """(loaded models by name, the files that did not load) under `models_dir`, or only
    `names` (FileNotFoundError naming what is missing). Each failure is also logged."""
    found = _find(models_dir)
    if names is not None:
        missing = sorted(set(names) - set(found))
        if missing:
            raise FileNotFoundError(
                f"{models_dir}: no model(s) {missing}; found {sorted(found)}")
        found = {name: found[name] for name in names}
    models: dict[str, OnnxModel] = {}
    failures: list[LoadFailure] = []
    for name, entry in found.items():
        try:
            models[name] = _load(entry, threads)
        except LoadError as error:
            log.error("model %s not served: %s", name, error)
            version = entry.info.version if entry.info is not None else "1"
            failures.append(LoadFailure(name, version, entry.path, str(error)))
    return models, failures


def _load(entry: _Found, threads: int) -> OnnxModel:
    if entry.problem is not None:
        raise LoadError(entry.problem)
    info = entry.info or describe_onnx(entry.path, entry.name)
    try:
        return OnnxModel(entry.path, info, threads)
    except Exception as error:  # ONNX Runtime's own: a broken file, an operator it lacks
        raise LoadError(f"{entry.path}: ONNX Runtime cannot load it: {_reason(error)}") \
            from None


def load_models(
    models_dir: Path, threads: int = 1, names: list[str] | None = None
) -> dict[str, OnnxModel]:
    """Every model under `models_dir`, loaded; files that do not load are logged and skipped
    (`load_repository` returns them). With `names`, exactly those, or an error saying which
    are missing or do not load."""
    models, failures = load_repository(models_dir, threads, names)
    if names is not None and failures:
        raise RuntimeError("; ".join(f"model {failure.name}: {failure.reason}"
                                     for failure in failures))
    return models
