"""The on-disk model store: one directory per model, `model.onnx` beside `metadata.json`.

numpy-free and torch-free, so servers and devices read it too.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

MODEL_FILE = "model.onnx"
METADATA_FILE = "metadata.json"
# The trained torch module (torch.save of the whole nn.Module), kept where a model was trained
# so that `tierwise optimize` can prune, fine-tune or distil it. Servers and devices never
# read it.
WEIGHTS_FILE = "weights.pt"
DATASET_PREFIX = "fmnist"


class TensorSpec(BaseModel):
    name: str
    datatype: str = Field(description="OIP v2 datatype, e.g. UINT8, FP32")
    shape: list[int] = Field(description="-1 marks a dynamic dimension")


class ModelInfo(BaseModel):
    """Everything tierwise knows about a model, besides its weights."""

    model_config = ConfigDict(extra="ignore")

    name: str
    architecture: str
    version: str = "1"
    blocks: list[str]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    parameters: int
    bytes: int
    sha256: str
    test_accuracy: float
    validation_accuracy: float
    temperature: float = Field(gt=0, description="softmax(logits / T) is calibrated")
    expected_calibration_error: float | None = None
    training: dict[str, float] = Field(default_factory=dict)
    role: str = Field("full", pattern="^(full|head|tail)$",
                      description="a whole model, or one side of a split (tierwise.optimize.split)")
    parent: str | None = Field(None, description="the model a head or tail was cut from")
    split_point: int | None = Field(None, description="blocks [0, k) are the head")
    variant: str | None = Field(
        None, description="how `tierwise optimize` made it from `parent` (int8-static, "
        "pruned-50, distilled...); a variant runs wherever its parent does")
    bottleneck: str | None = Field(
        None, description="a split head/tail with a learned bottleneck (e.g. w2-4bit) at the cut")

    @property
    def confidence_input(self) -> str:
        return self.inputs[0].name


def model_name(architecture: str) -> str:
    return f"{DATASET_PREFIX}-{architecture}"


def model_dir(models_dir: Path, name: str) -> Path:
    return Path(models_dir) / name


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_info(models_dir: Path, info: ModelInfo) -> Path:
    directory = model_dir(models_dir, info.name)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / METADATA_FILE).write_text(json.dumps(info.model_dump(), indent=2) + "\n")
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
        onnx_file = directory / MODEL_FILE
        if (onnx_file.is_file() or not weights) and (directory / METADATA_FILE).is_file():
            info = load_info(directory)
            found[info.name] = (info, onnx_file)
    return found
