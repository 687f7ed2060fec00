"""Importing a model: any ONNX file becomes a model in the store, the same way for a user's
model and for the zoo's (`tierwise models add`, `add_model`).

What import does, in order, before anything is written:
1. load the file and check it (onnx.checker): not ONNX, no inputs, no outputs -> ImportError;
2. prepend the declared preprocessing (`tierwise.models.preprocess`);
3. make a fixed batch of 1 dynamic where the graph allows it (else: served unbatched);
4. infer shapes and find the cut points (`tierwise.models.graph`);
5. load it in ONNX Runtime and run one sample (operators it cannot run -> ImportError);
6. check the task fits the outputs and the labels fit the classes (`tierwise.tasks`).
Then the model is written to a temporary directory beside its final place and renamed into
it: a failed import leaves nothing half-written in the models directory.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tierwise import __version__
from tierwise.models.store import (
    METADATA_FILE,
    MODEL_FILE,
    TASKS,
    Calibration,
    CutPoint,
    ModelInfo,
    Provenance,
    TrainingRecord,
    list_models,
    model_dir,
    sha256_file,
)

if TYPE_CHECKING:
    from tierwise.profile.evaluation import EvalSet

PLAIN_NAME = "a plain name: letters, digits, '.', '_', '-', '@' (no '/' or spaces)"


class ModelImportError(ValueError):
    """A model that cannot be imported: the message names the file and what was expected."""


def check_name(name: str) -> str:
    allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-@")
    if not name or name in (".", "..") or name.startswith(".") or set(name) - allowed:
        raise ModelImportError(f"name: expected {PLAIN_NAME}, got {name!r}")
    return name


def read_labels(path: Path) -> list[str]:
    """One class name per line (blank lines at the end ignored); ImportError if unreadable."""
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ModelImportError(f"--labels {path}: cannot read it ({error})") from None
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise ModelImportError(f"--labels {path}: no labels in it (one class name per line)")
    return [line.strip() for line in lines]


def add_model(
    models_dir: str | Path,
    name: str,
    source: str | Path | Any,
    *,
    task: str = "classification",
    labels: list[str] | str | Path | None = None,
    preprocess: Any = None,
    runs_on: list[str] | None = None,
    calibration: Calibration | None = None,
    trained: TrainingRecord | None = None,
    provenance: Provenance | None = None,
    cuts: list[str] | None = None,
    eval_data: str | Path | None = None,
    reference: str | None = None,
    task_options: dict[str, Any] | None = None,
    version: str = "1",
    replace: bool = False,
) -> ModelInfo:
    """Import the ONNX model `source` (a path, or an `onnx.ModelProto`) as `name` into
    `models_dir`; return its metadata.

    Args:
        task: one of classification, detection, embedding, generic.
        labels: class names (a list, or a file with one per line); their count must match
            the classes of the first output.
        preprocess: a `Preprocessing` or its spec string (`resize=256x256,crop=224x224,...`):
            prepended to the graph, which then takes uint8 NHWC images.
        runs_on: the tiers that may run it (device, edge, cloud); empty: as the config says.
        calibration: the temperature a caller already fitted (the zoo's training).
        trained: the training record a caller already has (the zoo's).
        provenance: where the model came from, as a caller knows it.
        cuts: restrict the split candidates to these tensors (each must be a cut point of the
            graph); default every cut point the graph has.
        eval_data: what `tierwise profile` measures it on (an ImageFolder, COCO-style JSON,
            images or a video), read now as the task reads it (`eval_set_for`); default:
            the config's dataset.
        reference: the model whose results stand in for labels where `eval_data` has none.
        task_options: how the task reads the outputs where the graph does not say
            (`ModelInfo.task_options`; e.g. {"box_order": "yxyx"} for a detector).
        replace: overwrite a model of that name; otherwise an existing one is an error.

    Raises:
        ModelImportError: naming the file and what was expected; nothing is written.
    """
    from tierwise.models import graph
    from tierwise.models.preprocess import PreprocessError, Preprocessing, parse_preprocessing

    models_dir = Path(models_dir)
    check_name(name)
    where = f"{source}" if isinstance(source, (str, Path)) else f"model {name!r}"
    if task not in TASKS:
        raise ModelImportError(f"--task: expected one of {', '.join(TASKS)}, got {task!r}")
    final = model_dir(models_dir, name)
    if final.exists() and not replace:
        raise ModelImportError(f"{final}: a model named {name!r} exists; pass --replace "
                               "(replace=True) or pick another name")
    model = _load(source, where)
    source_sha256 = sha256_file(Path(source)) if isinstance(source, (str, Path)) else None
    try:
        inputs, outputs = graph.specs(model)
    except graph.GraphError as error:
        raise ModelImportError(f"{where}: {error}") from None
    pre: Preprocessing | None = None
    prepended = 0  # nodes of the preprocessing, first in the graph
    if preprocess is not None:
        try:
            pre = preprocess if isinstance(preprocess, Preprocessing) else \
                parse_preprocessing(str(preprocess))
            from tierwise.models.preprocess import prepend

            nodes = len(model.graph.node)
            model = prepend(model, pre)
            prepended = len(model.graph.node) - nodes
        except PreprocessError as error:
            raise ModelImportError(f"{where}: {error}") from None
    try:
        model = graph.infer_shapes(model)
        model, batched = graph.make_batch_dynamic(model)
        model = graph.infer_shapes(model)
        inputs, outputs = graph.specs(model)
        # a cut inside the preprocessing would send a float image: never better than the
        # uint8 image itself (a Remote plan), so the candidates start after it
        found_cuts = [cut for cut in graph.cut_points(model) if cut.node >= prepended]
    except graph.GraphError as error:
        raise ModelImportError(f"{where}: {error}") from None
    if cuts is not None:
        by_tensor = {cut.tensor: cut for cut in found_cuts}
        missing = [tensor for tensor in cuts if tensor not in by_tensor]
        if missing:
            raise ModelImportError(f"{where}: cuts {missing} are not cut points of the graph "
                                   f"(found {[cut.tensor for cut in found_cuts]})")
        found_cuts = [by_tensor[tensor] for tensor in cuts]
    first = inputs[0].shape[:1]
    if first and first[0] > 1:
        raise ModelImportError(
            f"{where}: input {inputs[0].name!r} {inputs[0].shape} has no batch dimension (its "
            "first is neither dynamic nor 1); tierwise sends one sample per request with a "
            "batch dimension first: export it with one")
    found_cuts = _check_runs(model, inputs, where, found_cuts)
    label_names = read_labels(Path(labels)) if isinstance(labels, (str, Path)) else \
        list(labels or [])
    info = ModelInfo(
        name=name, version=version, task=task, inputs=inputs, outputs=outputs, batched=batched,
        parameters=graph.parameter_count(model), bytes=0, sha256="", labels=label_names,
        preprocessing=pre.model_dump(mode="json") if pre else None,
        calibration=calibration or Calibration(),
        provenance=provenance or Provenance(
            source=f"imported from {source}" if isinstance(source, (str, Path))
            else "imported from an in-memory ONNX model", source_sha256=source_sha256),
        cuts=found_cuts, runs_on=list(runs_on or []), trained=trained,
        task_options=dict(task_options or {}),
        eval_data=str(Path(eval_data).resolve()) if eval_data is not None else None,
        reference=reference)
    info.provenance = (info.provenance or Provenance(source="")).model_copy(update={
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "tool": f"tierwise {__version__}"})
    _check_task(info, where)
    if info.eval_data:
        data = check_eval_data(info)
        if calibration is None and info.task == "classification":
            info.calibration = _calibrate(model, info, data)
    return _write(models_dir, info, model, replace)


def check_eval_data(info: ModelInfo) -> EvalSet:
    """Reads all of `info.eval_data` as the model's task would, and one sample through the
    model's input: an unreadable, empty or unfitting folder fails now, not at profile time.
    Returns what it read (calibration uses it: the data is read once)."""
    from tierwise.data.images import EvalDataError
    from tierwise.models.inputs import InputError, as_batch
    from tierwise.profile.evaluation import EVAL_LIMIT, eval_set_for

    try:
        data = eval_set_for(info, EVAL_LIMIT)
        as_batch(info, data.samples[0])
    except EvalDataError as error:
        raise ModelImportError(f"--eval: {error}") from None
    except InputError as error:
        raise ModelImportError(f"--eval {info.eval_data}: its images do not fit the model: "
                               f"{error} (is a --preprocess missing?)") from None
    return data


def _calibrate(model: Any, info: ModelInfo, data: EvalSet) -> Calibration:
    """A classifier's temperature fitted on its labelled evaluation data (Guo et al., ICML
    2017: the T minimising the NLL of softmax(logits / T)); T = 1 where the data has no
    labels (a reference model's answers are not ground truth to calibrate against)."""
    import onnxruntime as ort

    from tierwise.models.inputs import as_batch
    from tierwise.profile.calibration import expected_calibration_error, fit_temperature
    from tierwise.profile.calibration import softmax as calibrated
    from tierwise.tasks import Classification

    if data.targets is None:
        return Calibration()
    labels = np.asarray(data.targets, np.int64)
    session = ort.InferenceSession(model.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    scores = np.concatenate([
        session.run([info.outputs[0].name], {info.inputs[0].name: as_batch(info, image)})[0]
        for image in data.samples]).astype(np.float64)
    task = Classification.from_info(info)
    logits = np.log(np.clip(scores, 1e-12, None)) if task.are_probabilities(scores) else scores
    temperature = fit_temperature(logits, labels)
    return Calibration(temperature=temperature, fitted_on=f"{data.source} "
                       f"({len(data)} images)", expected_calibration_error=
                       expected_calibration_error(calibrated(logits, temperature), labels))


def _load(source: Any, where: str) -> Any:
    import onnx

    if isinstance(source, onnx.ModelProto):
        model = source
    else:
        path = Path(source)
        if not path.is_file():
            raise ModelImportError(f"{path}: no such file (expected an ONNX model)")
        try:
            model = onnx.load(str(path))
        except Exception as error:
            raise ModelImportError(f"{path}: not an ONNX model ({type(error).__name__}: "
                                   f"{error})") from None
    if not model.graph.node and not model.graph.output:
        raise ModelImportError(f"{where}: not an ONNX model (an empty graph)")
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as error:
        first = str(error).strip().splitlines()[0]
        raise ModelImportError(f"{where}: not a valid ONNX model ({first})") from None
    return model


def _check_runs(model: Any, inputs: list[Any], where: str,
                cuts: list[CutPoint]) -> list[CutPoint]:
    """ONNX Runtime loads the model and runs it once on a random sample; return `cuts` with
    the dimensions shape inference left unknown (e.g. behind a Pad whose widths are computed
    from the input's shape) filled in from that run, the batch dimension still -1.

    Where the preprocessing resizes every frame to one size these are the sizes of every
    request; otherwise the sample's, a guide for which cuts to profile (the profile measures
    each cut's bytes itself)."""
    import onnx
    import onnxruntime as ort

    from tierwise.runtime.session import trial_input

    unknown = [cut for cut in cuts if any(dim < 0 for dim in cut.shape[1:])]
    if unknown:  # expose them as outputs of a copy, so that one run measures them all
        exposed = onnx.ModelProto()
        exposed.CopyFrom(model)
        model = exposed
        model.graph.output.extend(onnx.ValueInfoProto(name=cut.tensor) for cut in unknown)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(model.SerializeToString(), sess_options=options,
                                       providers=["CPUExecutionProvider"])
        names = [output.name for output in session.get_outputs()]
        results = session.run(None, {spec.name: trial_input(spec, seed=0) for spec in inputs})
    except Exception as error:
        message = str(error).strip().splitlines()[0][:400]
        raise ModelImportError(f"{where}: ONNX Runtime cannot run it: {message}") from None
    measured = dict(zip(names, results, strict=True))
    return [cut.model_copy(update={"shape": [-1, *measured[cut.tensor].shape[1:]]})
            if cut in unknown else cut for cut in cuts]


def _check_task(info: ModelInfo, where: str) -> None:
    from tierwise.tasks import TaskError, task_for

    try:
        task_for(info).check_outputs(info.outputs)
    except TaskError as error:
        raise ModelImportError(f"{where}: --task {info.task}: {error}") from None


def _write(models_dir: Path, info: ModelInfo, model: Any, replace: bool) -> ModelInfo:
    """Write into a temporary directory, then rename it into place."""
    import onnx

    models_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=models_dir, prefix=f".importing-{info.name}-"))
    try:
        path = staging / MODEL_FILE
        onnx.save(model, str(path))
        info = info.model_copy(update={"bytes": path.stat().st_size, "sha256": sha256_file(path)})
        (staging / METADATA_FILE).write_text(info.model_dump_json(indent=2) + "\n")
        final = model_dir(models_dir, info.name)
        if final.exists():
            if not replace:
                raise ModelImportError(f"{final}: a model named {info.name!r} appeared "
                                       "meanwhile")
            # heads, tails and variants cut from the old model do not fit the new one
            for name, (member, _) in list_models(models_dir, weights=False).items():
                if member.parent == info.name:
                    shutil.rmtree(model_dir(models_dir, name), ignore_errors=True)
            retired = Path(tempfile.mkdtemp(dir=models_dir, prefix=f".replaced-{info.name}-"))
            os.replace(final, retired / "old")
            os.replace(staging, final)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return info


def remove_model(models_dir: str | Path, name: str) -> list[str]:
    """Remove `name` and the heads, tails and variants made from it; return what was
    removed. Raises ModelImportError when there is no such model."""
    models_dir = Path(models_dir)
    found = list_models(models_dir, weights=False)
    if name not in found:
        raise ModelImportError(f"{models_dir}: no model {name!r}; found {sorted(found)}")
    doomed = [name, *sorted(other for other, (info, _) in found.items()
                             if info.parent == name)]
    for model in doomed:
        shutil.rmtree(model_dir(models_dir, model), ignore_errors=True)
    return doomed


__all__ = ["ModelImportError", "add_model", "check_eval_data", "check_name", "read_labels",
           "remove_model"]
