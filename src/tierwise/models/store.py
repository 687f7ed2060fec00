"""The on-disk model store: one directory per model, `model.onnx` beside `metadata.json`.

Every model, imported or trained here, has the same metadata (`ModelInfo`): what it is
(name, task, input and output specs read from the graph, labels, preprocessing), how far to
trust its scores (calibration), where it came from (provenance), where it may be cut (cut
points found in the graph) and, for a head, tail or variant, how it was derived. A model
trained by tierwise also carries its training record (`TrainingRecord`); nothing in the
serving, planning or shipping path reads that.

numpy-free and torch-free, so servers and devices read it too.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import BaseModel, ConfigDict, Field, model_validator

if TYPE_CHECKING:
    from tierwise.config import Config

MODEL_FILE = "model.onnx"
METADATA_FILE = "metadata.json"
# The trained torch module (its state dict), kept where a model was trained so that
# `tierwise optimize` can prune, fine-tune or distil it. Servers and devices never read it.
WEIGHTS_FILE = "weights.pt"
TASKS = ("classification", "detection", "embedding", "generic")
ROLES = ("full", "head", "tail")


class TensorSpec(BaseModel):
    """One input or output of a model, as OIP v2 model metadata states it."""

    name: str
    datatype: str = Field(description="OIP v2 datatype, e.g. UINT8, FP32")
    shape: list[int] = Field(description="-1 marks a dynamic dimension")

    def describe(self) -> str:
        dims = ", ".join("?" if dim < 0 else str(dim) for dim in self.shape)
        return f"{self.name}: {self.datatype} [{dims}]"


class CutPoint(BaseModel):
    """A tensor through which every path from the model's inputs to its outputs passes: the
    graph splits there into a head (inputs -> tensor) and a tail (tensor -> outputs)."""

    tensor: str = Field(description="the tensor's name in the model's graph")
    datatype: str = Field(description="OIP v2 datatype of the tensor")
    shape: list[int] = Field(description="with the batch dimension; -1 where dynamic")
    node: int = Field(description="index, in the graph's topological order, of its producer")

    @property
    def sample_bytes(self) -> int | None:
        """Bytes of one sample's tensor (batch dimension excluded), None if not static."""
        from tierwise.protocol.oip import numpy_dtype

        elements = 1
        for dim in self.shape[1:]:
            if dim < 0:
                return None
            elements *= dim
        return elements * numpy_dtype(self.datatype).itemsize


class Calibration(BaseModel):
    """softmax(logits / temperature) is calibrated (Guo et al., "On Calibration of Modern
    Neural Networks", ICML 2017); fitted on `fitted_on`."""

    temperature: float = Field(1.0, gt=0)
    expected_calibration_error: float | None = None
    fitted_on: str | None = Field(None, description="the data the temperature was fitted on")


class Provenance(BaseModel):
    """Where a model came from."""

    source: str = Field(description="'imported from <file>', 'trained by tierwise zoo', ...")
    source_sha256: str | None = Field(None, description="of the file as the user gave it")
    created_at: str | None = None
    tool: str | None = Field(None, description="the tierwise version that wrote it")


class TrainingRecord(BaseModel):
    """What only a model trained by tierwise has: how it was built and how it scored."""

    model_config = ConfigDict(extra="ignore")

    architecture: str
    blocks: list[str] = Field(description="its named blocks (nn.Sequential children)")
    test_accuracy: float
    validation_accuracy: float
    record: dict[str, float] = Field(default_factory=dict,
                                     description="epochs, seconds, images seen...")


class ModelInfo(BaseModel):
    """Everything tierwise knows about a model, besides its weights."""

    model_config = ConfigDict(extra="ignore")

    name: str
    version: str = "1"
    task: str = Field("classification", description=f"one of {', '.join(TASKS)}")
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    batched: bool = Field(True, description="the first dimension is a dynamic batch; when "
                          "False the model takes exactly one sample per run")
    parameters: int = 0
    bytes: int
    sha256: str
    labels: list[str] = Field(default_factory=list, description="class names, by index")
    task_options: dict[str, Any] = Field(
        default_factory=dict, description="how the task reads the outputs, where the graph "
        "does not say: e.g. detection's box_order (xyxy, yxyx, cxcywh), image_size_px, "
        "boxes/scores/classes output names, score_threshold, iou_threshold, suppression; "
        "classification's outputs_are (logits, probabilities)")
    preprocessing: dict[str, Any] | None = Field(
        None, description="the preprocessing prepended to the graph "
        "(tierwise.models.preprocess.Preprocessing, as a dict)")
    calibration: Calibration = Field(default_factory=Calibration)
    provenance: Provenance | None = None
    eval_data: str | None = Field(
        None, description="what `tierwise profile` measures it on: an ImageFolder, images or "
        "a video; None: the config's dataset")
    reference: str | None = Field(
        None, description="the model whose results stand in for labels where `eval_data` "
        "has none (quality is then fidelity to it)")
    cuts: list[CutPoint] = Field(
        default_factory=list, description="where the graph may be split, in topological "
        "order: split point k cuts at cuts[k-1]")
    runs_on: list[str] = Field(
        default_factory=list, description="the tiers that may run it (device, edge, cloud); "
        "empty: those whose tiers.*.models list it")
    role: str = Field("full", pattern="^(full|head|tail)$",
                      description="a whole model, or one side of a split (tierwise.optimize.split)")
    parent: str | None = Field(None, description="the model a head, tail or variant came from")
    split_point: int | None = Field(None, description="the head runs up to the parent's "
                                    "cuts[split_point - 1]")
    variant: str | None = Field(
        None, description="how `tierwise optimize` made it from `parent` (int8-static, "
        "pruned-50, distilled...); a variant runs wherever its parent does")
    bottleneck: str | None = Field(
        None, description="a split head/tail with a learned bottleneck (e.g. w2-4bit) at the cut")
    trained: TrainingRecord | None = Field(None, description="only for models trained here")

    @model_validator(mode="before")
    @classmethod
    def _from_flat_layout(cls, data: Any) -> Any:
        """Metadata written before the split of common and training fields (tierwise <= 0.1:
        `architecture`, `blocks`, accuracies and `temperature` at the top level) still
        loads, so a cached zoo and stored registry versions stay readable."""
        if not isinstance(data, dict) or "architecture" not in data:
            return data
        data = dict(data)
        record = data.pop("training", None) or {}
        data["trained"] = {
            "architecture": data.pop("architecture"), "blocks": data.pop("blocks", []),
            "test_accuracy": data.pop("test_accuracy", 0.0),
            "validation_accuracy": data.pop("validation_accuracy", 0.0),
            "record": record if isinstance(record, dict) else {}}
        if "calibration" not in data:
            data["calibration"] = {
                "temperature": data.pop("temperature", 1.0),
                "expected_calibration_error": data.pop("expected_calibration_error", None)}
        return data

    @property
    def temperature(self) -> float:
        return self.calibration.temperature

    def training_record(self) -> TrainingRecord:
        """The training record; ValueError for a model not trained by tierwise (an imported
        one), which steps that retrain from torch weights cannot take."""
        if self.trained is None:
            raise ValueError(f"{self.name}: no training record (it was imported, not trained "
                             "by tierwise); this step retrains from tierwise's torch weights")
        return self.trained

    @property
    def split_points(self) -> list[int]:
        """Every split point of this model: 1..len(cuts)."""
        return list(range(1, len(self.cuts) + 1))


def model_dir(models_dir: Path, name: str) -> Path:
    return Path(models_dir) / name


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(handle, "w") as stream:
        stream.write(text)
    os.replace(temporary, path)


def save_info(models_dir: Path, info: ModelInfo) -> Path:
    directory = model_dir(models_dir, info.name)
    _write_atomically(directory / METADATA_FILE, json.dumps(info.model_dump(), indent=2) + "\n")
    return directory


def load_info(directory: Path) -> ModelInfo:
    return ModelInfo.model_validate_json((Path(directory) / METADATA_FILE).read_text())


def variants_of(models: list[str], parents: Mapping[str, str | None]) -> list[str]:
    """`models` and, after each, its variants (`parents`: variant name -> the model it was
    made from)."""
    out: list[str] = []
    for name in models:
        out.append(name)
        out += sorted(variant for variant, parent in parents.items() if parent == name)
    return out


class _Placed(Protocol):
    """What `tier_models` reads of a model: ModelInfo and ModelProfile both have it."""

    runs_on: list[str]
    parent: str | None
    variant: str | None


def tier_models(config: Config, models: Mapping[str, _Placed]) -> dict[str, list[str]]:
    """tier -> the whole models it runs, in order: those `tiers.<tier>.models` lists, then
    those whose own metadata names the tier (`runs_on`); where `tiers.<tier>.variants` is on,
    each followed by its variants (a variant runs wherever its parent does). Heads and tails
    are never listed: they go with their model. The one rule for which tier runs what."""
    parents = {name: model.parent for name, model in models.items() if model.variant}
    whole = {name: model for name, model in models.items()
             if getattr(model, "role", "full") == "full" and not model.variant}
    out: dict[str, list[str]] = {}
    for tier, settings in config.tiers.items():
        # a site runs what its own name or its kind is named for (`edge-paris`: edge's)
        names = {tier, config.kind(tier)}
        listed = list(settings.models)
        listed += sorted(name for name, model in whole.items()
                         if names & set(model.runs_on) and name not in listed)
        out[tier] = variants_of(listed, parents) if settings.variants else listed
    return out


def bottleneck_bits(bottleneck: str) -> int:
    """Bits per code of a bottleneck named like `bottleneck-w2-4bit`."""
    suffix = bottleneck.rsplit("-", 1)[-1]
    if not suffix.endswith("bit") or not suffix[:-3].isdigit():
        raise ValueError(f"bottleneck: expected a name like 'bottleneck-w2-4bit', got "
                         f"{bottleneck!r}")
    return int(suffix[:-3])


def list_models(models_dir: Path, weights: bool = True) -> dict[str, tuple[ModelInfo, Path]]:
    """name -> (metadata, path of model.onnx) for every complete model under `models_dir`;
    with `weights=False` also those whose model.onnx is elsewhere (a device holds only the
    metadata and profile of a model that runs on a server)."""
    found: dict[str, tuple[ModelInfo, Path]] = {}
    root = Path(models_dir)
    if not root.is_dir():
        return found
    for directory in sorted(root.iterdir()):
        if directory.name.startswith("."):  # an import or a replace in progress
            continue
        onnx_file = directory / MODEL_FILE
        if (onnx_file.is_file() or not weights) and (directory / METADATA_FILE).is_file():
            info = load_info(directory)
            found[info.name] = (info, onnx_file)
    return found
