"""Learned bottlenecks at a split (BottleNet++, Shao & Zhang, ICC Workshops 2020; task-oriented
communication, Shao, Mao & Zhang, IEEE JSAC 2021): a small encoder on the device squeezes the
features at a cut into a few channels of `bits`-bit codes, and a decoder on the server expands
them back, trained end to end with the task's loss rather than to reconstruct the features.

- encoder: 1×1 conv (C → width), batch norm, sigmoid, scaled to [0, 2^bits - 1] and rounded
  (straight-through gradient while training);
- decoder: codes / (2^bits - 1), 1×1 conv (width → C), batch norm, then ReLU where the tail
  expects post-ReLU activations (a zoo model's cuts; an imported model's where every
  training feature is >= 0).

The head (up to the cut) stays frozen — it is shared with the plain split and its features
are computed once, by ONNX Runtime. Two ways to train the rest:

- `train_bottlenecks`, the Fashion-MNIST zoo: the tail is the zoo's own torch network, and
  encoder, decoder and tail learn from the labels and from the uncompressed tail's softened
  logits (distillation, as in `tierwise.optimize.distill`).
- `train_imported_bottlenecks`, any imported classifier: the tail is the model's ONNX tail
  made trainable in torch by onnx2torch; there are no labels, so encoder and decoder (and
  the tail, if asked) learn by distillation (Hinton, Vinyals & Dean, 2015) from the model's
  reference (`tierwise models add --reference`, e.g. the cloud model) on unlabelled frames:
  T² · KL(softmax(reference / T) ‖ softmax(student / T)). A short reconstruction fit of
  encoder and decoder comes first (see `_fit_reconstruction` for the measurement that made
  it necessary), and whichever of the two — reconstruction alone or distilled — is better
  on the model's validation data is kept.

Each (width, bits) becomes:

- `<model>.head@k.bottleneck-w<width>-<bits>bit`: image -> uint8 codes, run on the device;
- `<model>.tail@k.bottleneck-w<width>-<bits>bit`: uint8 codes -> logits, served on the tier;
- `<model>.bottleneck@k-w<width>-<bits>bit/`: the encoder and decoder alone
  (`tierwise.codecs.LearnedBottleneck`), for measuring the codec by itself.

On the wire the codes travel packed, `bits` bits per value (`packed-4bit`, `packed-8bit`):
width × H × W × bits / 8 bytes per sample, rounded up. Only the (width, bits) on the
rate–quality frontier (no other is both smaller and at least as good on validation data) are
registered for the planner; the outcomes list them all.
"""

from __future__ import annotations

import copy
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import Progress
from torch import nn

from tierwise.codecs import LearnedBottleneck, bottleneck_dir
from tierwise.config import BottleneckConfig
from tierwise.data import Splits
from tierwise.models.inputs import as_batch, image_size
from tierwise.models.store import ModelInfo, TensorSpec, list_models, save_info, sha256_file
from tierwise.optimize.distill import SoftTargets
from tierwise.optimize.split import (
    bottleneck_name,
    export_split,
    head_name,
    split_points,
    tail_name,
)
from tierwise.optimize.variants import onnx_parameters, parent_info
from tierwise.profile.evaluation import EVAL_LIMIT, EvalSet, Judge, eval_set_for
from tierwise.runtime.session import OnnxModel
from tierwise.zoo.build import load_trained
from tierwise.zoo.export import export_onnx
from tierwise.zoo.train import train_model

CODES = "codes"


class Encoder(nn.Module):
    """features float32 [N, C, H, W] -> codes [N, width, H, W]: float in [0, 2^bits - 1]
    while training (rounded forward, straight-through backward), uint8 in eval mode."""

    def __init__(self, channels: int, width: int, bits: int) -> None:
        super().__init__()
        self.levels = float(2 ** bits - 1)
        self.project = nn.Sequential(nn.Conv2d(channels, width, 1, bias=False),
                                     nn.BatchNorm2d(width), nn.Sigmoid())

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        scaled = self.project(features) * self.levels
        if self.training:  # round forward, identity backward (straight-through estimator)
            return scaled + (torch.round(scaled) - scaled).detach()
        return torch.round(scaled).to(torch.uint8)


class Decoder(nn.Module):
    """codes (uint8 or float) [N, width, H, W] -> features float32 [N, C, H, W], through a
    ReLU when `nonnegative` (the features the tail expects are post-ReLU activations)."""

    def __init__(self, channels: int, width: int, bits: int, nonnegative: bool = True) -> None:
        super().__init__()
        self.levels = float(2 ** bits - 1)
        self.expand = nn.Sequential(nn.Conv2d(width, channels, 1), nn.BatchNorm2d(channels),
                                    *([nn.ReLU()] if nonnegative else []))

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return self.expand(codes.to(torch.float32) * (1.0 / self.levels))


@dataclass
class BottleneckOutcome:
    model: str
    split_point: int
    width: int
    bits: int
    name: str
    codes_per_image: int
    bytes_per_image: int
    validation_accuracy: float
    test_accuracy: float
    uncompressed_test_accuracy: float
    registered: bool
    seconds: float

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self), "reduction_vs_raw_image": 784 / self.bytes_per_image}


def train_bottlenecks(
    models_dir: Path, settings: BottleneckConfig, splits: Splits, *, seed: int = 0,
    progress: Progress | None = None,
) -> list[BottleneckOutcome]:
    """Train a bottleneck for every split point × width × bits of `settings` on a zoo model
    (trained here: its torch network gives the tail), export them, and register those on
    the rate–accuracy frontier. An imported model: `train_imported_bottlenecks`."""
    parent = parent_info(models_dir, settings.model)
    if parent.trained is None:
        raise ValueError(f"optimize.bottleneck.model: {parent.name} was imported, not trained "
                         "here; its bottlenecks are trained from its ONNX tail "
                         "(`train_imported_bottlenecks`, `--workload camera`)")
    points = settings.split_points or split_points(parent)[-1:]
    outcomes = []
    for point in points:
        if point not in split_points(parent):
            raise ValueError(f"optimize.bottleneck.split_points: {settings.model} can be cut at "
                             f"{split_points(parent)}, not {point}")
        outcomes += _train_at(models_dir, parent, point, settings, splits, seed, progress)
    return outcomes


def _train_at(models_dir: Path, parent: ModelInfo, point: int, settings: BottleneckConfig,
              splits: Splits, seed: int, progress: Progress | None) -> list[BottleneckOutcome]:
    network, _ = load_trained(models_dir, parent.name)
    export_split(models_dir, parent.name, point, splits.val_x[:32])
    found = list_models(models_dir)
    head_info, head_path = found[head_name(parent.name, point)]
    head = OnnxModel(head_path, head_info, threads=2)
    train_features = head.run_batched(splits.train_x, 512)
    val_features = torch.from_numpy(head.run_batched(splits.val_x, 512))
    test_features = head.run_batched(splits.test_x, 512)
    channels = int(train_features.shape[1])
    blocks = list(network.children())
    uncompressed_tail = nn.Sequential(*blocks[point:]).eval()
    trained = []
    for width in settings.widths:
        for bits in settings.bits:
            torch.manual_seed(seed)
            encoder, decoder = Encoder(channels, width, bits), Decoder(channels, width, bits)
            tail = copy.deepcopy(nn.Sequential(*blocks[point:]))
            stack = nn.Sequential(encoder, decoder, tail)
            # The uncompressed tail teaches the compressed one, besides the labels
            # (BottleNet++ trains on the task loss alone).
            teacher = SoftTargets(uncompressed_tail, settings.temperature, settings.alpha)
            started = time.perf_counter()
            # Features are fixed inputs here: no flips (the frozen head already saw them).
            architecture = parent.training_record().architecture
            result = train_model(architecture, train_features, splits.train_y,
                                 settings.train, seed=seed, progress=progress, model=stack,
                                 description=f"bottleneck w{width} {bits}-bit @{point}",
                                 augment=False, objective=teacher)
            stack = result.model.eval()
            with torch.inference_mode():
                val_accuracy = _accuracy(stack, val_features, splits.val_y)
            trained.append((width, bits, stack, val_accuracy, time.perf_counter() - started))
    with torch.inference_mode():
        uncompressed = _accuracy(uncompressed_tail, torch.from_numpy(test_features),
                                 splits.test_y)
    frontier = _frontier([(w * b, -acc) for w, b, _, acc, _ in trained])
    outcomes = []
    for index, (width, bits, stack, val_accuracy, seconds) in enumerate(trained):
        name = f"w{width}-{bits}bit"
        registered = index in frontier
        codec = _export(models_dir, parent, point, name, stack, bits,
                        val_features.numpy()[:64], head_onnx=head_path, register=registered)
        payloads = codec.encode_batch(test_features)
        decoded = codec.decode_batch(payloads)
        with torch.inference_mode():
            test_accuracy = _accuracy(stack[2], torch.from_numpy(decoded), splits.test_y)
        outcomes.append(BottleneckOutcome(
            model=parent.name, split_point=point, width=width, bits=bits,
            name=bottleneck_name(parent.name, point, name),
            codes_per_image=codec.codes_per_image, bytes_per_image=len(payloads[0]),
            validation_accuracy=val_accuracy, test_accuracy=test_accuracy,
            uncompressed_test_accuracy=uncompressed, registered=registered, seconds=seconds))
    return outcomes


def _accuracy(model: nn.Module, features: torch.Tensor, labels: np.ndarray) -> float:
    model.eval()
    logits = torch.cat([model(features[i:i + 1024]) for i in range(0, len(features), 1024)])
    return float((logits.argmax(1).numpy() == labels).mean())


def _frontier(points: list[tuple[float, float]]) -> set[int]:
    """Indices of the points no other point weakly dominates (smaller is better in both)."""
    keep = set()
    for index, (cost, loss) in enumerate(points):
        dominated = any((other_cost <= cost and other_loss <= loss)
                        and (other_cost, other_loss) != (cost, loss)
                        for other_cost, other_loss in points)
        if not dominated:
            keep.add(index)
    return keep


def _alike(*models: Any) -> list[Any]:
    """ONNX models at one opset and IR version, the newest of theirs, as
    `onnx.compose.merge_models` needs (an imported head is often at a newer opset than the
    encoder torch exports). The default domain's opset is raised by onnx's version
    converter; a model already there is returned as it is."""
    from onnx import version_converter

    def opset(model: Any) -> int:
        return next((entry.version for entry in model.opset_import if entry.domain in ("",
                     "ai.onnx")), 0)

    newest = max(opset(model) for model in models)
    ir_version = max(model.ir_version for model in models)
    out = []
    for model in models:
        if opset(model) < newest:
            model = version_converter.convert_version(model, newest)
        model.ir_version = ir_version
        out.append(model)
    return out


def _export_encoder(encoder: Encoder, path: Path, sample_features: np.ndarray) -> None:
    """`export_onnx` for the encoder (features -> uint8 codes), whose check allows what
    rounding allows: where the scaled sigmoid lands within a float's last bit of a tie
    (x.5), ONNX Runtime and torch may round to neighbouring levels. RuntimeError if any
    code moves by more than one level, or more than one code in 1,000 moves."""
    import onnxruntime as ort

    from tierwise.zoo.export import OPSET

    encoder.eval()
    torch.onnx.export(encoder, (torch.from_numpy(np.array(sample_features[:2])),), str(path),
                      input_names=["features"], output_names=[CODES],
                      dynamic_axes={"features": {0: "batch"}, CODES: {0: "batch"}},
                      opset_version=OPSET, dynamo=False)
    with torch.inference_mode():
        expected = encoder(torch.from_numpy(np.array(sample_features))).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"features": np.ascontiguousarray(sample_features)})[0]
    moved = np.abs(got.astype(np.int16) - expected.astype(np.int16))
    if moved.max() > 1 or moved.mean() > 1e-3:
        raise RuntimeError(f"{path}: ONNX export differs from torch: codes moved by up to "
                           f"{int(moved.max())} levels in {float((moved > 0).mean()):.2%}")


def _export(models_dir: Path, parent: ModelInfo, point: int, name: str, stack: nn.Sequential,
            bits: int, sample_features: np.ndarray, *, head_onnx: Path,
            register: bool) -> LearnedBottleneck:
    """Write the codec (encoder, decoder) and, if `register`, the fused head and tail;
    `sample_features` (head outputs) check each export against torch (RuntimeError beyond
    1e-3). The fused tail answers with `parent`'s first output."""
    import onnx
    from onnx import compose

    encoder, decoder, tail = stack[0], stack[1], stack[2]
    assert isinstance(encoder, Encoder)  # every stack is (Encoder, Decoder, tail)
    directory = bottleneck_dir(models_dir, parent.name, point, name)
    directory.mkdir(parents=True, exist_ok=True)
    _export_encoder(encoder, directory / "encoder.onnx", sample_features)
    sample_codes = encoder(torch.from_numpy(sample_features)).numpy()
    export_onnx(decoder.eval(), directory / "decoder.onnx", sample_codes, input_name=CODES,
                output_name="features")
    codec = LearnedBottleneck(directory / "encoder.onnx", directory / "decoder.onnx", bits)
    full_name = f"bottleneck-{name}"
    fused_head_name = f"{head_name(parent.name, point)}.{full_name}"
    fused_tail_name = f"{tail_name(parent.name, point)}.{full_name}"
    if not register:  # off the frontier now: whatever an earlier run registered must go
        for stale in (fused_head_name, fused_tail_name):
            shutil.rmtree(models_dir / stale, ignore_errors=True)
        return codec
    with tempfile.TemporaryDirectory(prefix="tierwise-bottleneck-") as scratch:
        tail_path = Path(scratch) / "tail.onnx"
        export_onnx(nn.Sequential(decoder, tail).eval(), tail_path, sample_codes,
                    input_name=CODES, output_name=parent.outputs[0].name)
        head_model, encoder_model = _alike(onnx.load(str(head_onnx)),
                                           onnx.load(str(directory / "encoder.onnx")))
        fused_head = compose.merge_models(
            head_model, compose.add_prefix(encoder_model, "bottleneck/"),
            io_map=[("features", "bottleneck/features")])
        fused_tail = onnx.load(str(tail_path))
    codes_shape = [-1, *sample_codes.shape[1:]]
    codes = TensorSpec(name="bottleneck/" + CODES, datatype="UINT8", shape=codes_shape)
    common = {"version": parent.version, "calibration": parent.calibration,
              "parent": parent.name, "split_point": point, "batched": parent.batched,
              "bottleneck": full_name, "bytes": 0, "sha256": "",
              "provenance": parent.provenance}
    # the head takes the parent's images; the tail takes codes
    head_info = ModelInfo(name=fused_head_name, role="head", task="generic",
                          inputs=parent.inputs, outputs=[codes], parameters=0,
                          preprocessing=parent.preprocessing, **common)
    tail_info = ModelInfo(name=fused_tail_name, role="tail", task=parent.task,
                          labels=parent.labels,
                          inputs=[codes.model_copy(update={"name": CODES})],
                          outputs=parent.outputs[:1], parameters=0, **common)
    for model, info in ((fused_head, head_info), (fused_tail, tail_info)):
        path = models_dir / info.name / "model.onnx"
        path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(model, str(path))
        save_info(models_dir, info.model_copy(update={
            "bytes": path.stat().st_size, "sha256": sha256_file(path),
            "parameters": onnx_parameters(path)}))
    return codec



# -- any imported classifier ----------------------------------------------------------------

# The warm start (`_fit_reconstruction`): epochs over the training features, Adam's peak
# learning rate, batch size. A few seconds per (width, bits) at EfficientNet-Lite0's 7×7 cuts.
RECONSTRUCTION_EPOCHS = 30
RECONSTRUCTION_LEARNING_RATE = 0.01
RECONSTRUCTION_BATCH = 32
CHUNK = 64  # samples resized and run at a time: bounds memory (64 × 292² × 3 B = 16 MB)


@dataclass
class ImportedBottleneckOutcome:
    """One learned bottleneck of an imported classifier, measured through ONNX Runtime (the
    codec's encoder and decoder, the packed codes, the model's tail) on the model's own
    evaluation data (validation) and, where given, on test data.

    Quality is the task's on that data (`validation_metric`, `test_metric`: accuracy where
    the data has labels, else fidelity to the model's reference); `*_changed` says how far
    the answers moved from the uncompressed model's on the same samples (`Task.changed`:
    for a classifier top1_agreement and max_abs_probability_error)."""

    model: str
    split_point: int
    width: int
    bits: int
    name: str
    features_shape: list[int]       # [C, H, W] at the cut, float32
    codes_per_sample: int           # width × H × W
    bytes_per_sample: int           # the packed codes on the wire
    raw_input_bytes: int            # the uint8 input the client sends instead (resized frame)
    teacher: str
    validation_metric: str
    validation_quality: float
    validation_quality_reconstruction: float  # after the warm start alone (torch)
    validation_quality_distilled: float       # after the distillation that followed (torch)
    uncompressed_validation_quality: float    # the plain split (= the whole model)
    validation_changed: dict[str, float]
    test_metric: str | None
    test_quality: float | None
    uncompressed_test_quality: float | None
    test_changed: dict[str, float] | None
    kept: str                       # "distilled" or "reconstruction": better on validation
    tail_trained: bool
    registered: bool
    seconds: float                  # training this (width, bits): warm start + distillation

    def to_dict(self) -> dict[str, object]:
        return {**asdict(self),
                "reduction_vs_raw_input": self.raw_input_bytes / self.bytes_per_sample}


class ReferenceDistillation:
    """T² · KL(softmax(reference / T) ‖ softmax(student / T)) (Hinton, Vinyals & Dean,
    2015): the reference model's logits for each sample, float32 [N, classes], take the
    place of labels (`train_model` hands them over as the batch's labels)."""

    def __init__(self, temperature: float) -> None:
        self.temperature = temperature

    def __call__(self, logits: torch.Tensor, features: torch.Tensor,
                 reference_logits: torch.Tensor) -> torch.Tensor:
        from torch.nn import functional

        soft = self.temperature
        return functional.kl_div(functional.log_softmax(logits / soft, dim=1),
                                 functional.log_softmax(reference_logits / soft, dim=1),
                                 reduction="batchmean", log_target=True) * soft ** 2


class _FrozenTail(nn.Module):
    """A tail kept as imported while the modules around it train: no gradient reaches its
    weights, and it stays in eval mode (a batch norm keeps its statistics)."""

    def __init__(self, tail: nn.Module) -> None:
        super().__init__()
        self.tail = tail.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> _FrozenTail:
        super().train(mode)
        self.tail.eval()
        return self

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.tail(features)


class _Models:
    """ONNX Runtime sessions by model name, reading the store again for models written
    since (heads, tails, fused bottlenecks)."""

    def __init__(self, models_dir: Path, threads: int) -> None:
        self.models_dir = models_dir
        self.threads = threads
        self.loaded: dict[str, OnnxModel] = {}

    def load(self, name: str) -> OnnxModel:
        if name not in self.loaded:
            found = list_models(self.models_dir)
            if name not in found:
                raise FileNotFoundError(f"{self.models_dir}: no model {name!r}")
            info, path = found[name]
            self.loaded[name] = OnnxModel(path, info, threads=self.threads)
        return self.loaded[name]

    def forget(self, *names: str) -> None:
        for name in names:
            self.loaded.pop(name, None)


@dataclass
class _Cut:
    """One split point, its features computed once by the frozen head (float32
    [N, C, H, W]): on the training samples, the validation data and the test data."""

    point: int
    head: OnnxModel
    tail: OnnxModel            # the plain tail@k
    train: np.ndarray
    validation: np.ndarray
    test: np.ndarray | None
    uncompressed_validation: float  # quality through the plain split
    uncompressed_test: float | None


@dataclass
class _Trained:
    cut: _Cut
    width: int
    bits: int
    stack: nn.Sequential       # encoder, decoder, tail (torch)
    tail_trained: bool
    kept: str
    validation_reconstruction: float
    validation_distilled: float
    seconds: float

    @property
    def name(self) -> str:
        return f"w{self.width}-{self.bits}bit"


def train_imported_bottlenecks(
    models_dir: Path, settings: BottleneckConfig, train_images: Sequence[np.ndarray], *,
    test: EvalSet | None = None, validation_limit: int = EVAL_LIMIT, mirror: bool = True,
    train_tail: bool = False, seed: int = 0, threads: int = 2,
    progress: Progress | None = None,
) -> list[ImportedBottleneckOutcome]:
    """Train a bottleneck for every split point × width × bits of `settings` on the imported
    classifier `settings.model`, export each codec, and register the fused head and tail of
    those on the rate–quality frontier (validation quality against bytes per sample).

    Args:
        train_images: unlabelled samples as the client passes them: for a model with an
            image preprocessing, uint8 images [H, W, 3] of any size (resized as `as_batch`
            does); else samples of its input spec. Never the test data.
        test: data to report quality on besides validation (e.g. another span of the
            camera); judged as validation is (its labels, else the reference's answers).
        validation_limit: samples read from the model's `eval_data`; the frontier is chosen
            on them, as `tierwise profile` measures (`profile.eval_limit`).
        mirror: also train on every image mirrored left-right (head and teacher both see
            the mirrored image).
        train_tail: let the converted tail learn too (else encoder and decoder only).
        threads: ONNX Runtime threads for the head, the teacher and the evaluation.

    The teacher is the model's `reference` (the model whose answers define its quality,
    e.g. the cloud model), else the model itself. With `settings.split_points` empty, the
    model is cut at the deepest cut whose features are a map [N, C, H, W] with H·W > 1.
    `settings.temperature` softens both distributions; `settings.alpha` (soft against hard
    labels) does not apply, there being no labels; `settings.train` sizes the
    distillation (epochs over the training samples, batch size, learning rate).

    Raises:
        ValueError: naming the option: a split point the model does not have, or whose
            features are not a map [N, C, H, W]; a model that is not a classifier or has no
            evaluation data; a teacher with another number of classes; fewer training
            samples than a batch.
        RuntimeError: an export, or the fused head and tail, disagreeing with torch.
    """
    parent = parent_info(models_dir, settings.model)
    _check_imported(parent, settings, train_images, mirror)
    points = settings.split_points or [_deepest_map(parent)]
    for point in points:
        _check_point(parent, point)
    teacher = parent.reference or parent.name
    models = _Models(Path(models_dir), threads)
    judge = Judge(eval_set_for(parent, validation_limit), models.load)
    test_judge = Judge(test, models.load) if test is not None else None
    views = _views(parent, train_images, mirror)
    teacher_logits = _run_on(models.load(teacher), views)
    classes = parent.outputs[0].shape[-1]
    if teacher_logits.ndim != 2 or teacher_logits.shape[1] != classes:
        raise ValueError(f"{parent.name}: its reference {teacher!r} answers "
                         f"{list(teacher_logits.shape[1:])}, the model {classes} classes; "
                         "a teacher must have the model's classes (--reference)")
    trained: list[_Trained] = []
    for point in points:
        cut = _prepare_cut(Path(models_dir), parent, point, views, judge, test_judge, models)
        template = torch_tail(cut.tail.path)
        for width in settings.widths:
            for bits in settings.bits:
                trained.append(_train_one(cut, parent, width, bits, template, teacher_logits,
                                          settings, judge, train_tail=train_tail, seed=seed,
                                          progress=progress))
    raw_input_bytes = int(judge.inputs(parent.name)[0].nbytes)
    codecs = [_export_codec(Path(models_dir), parent, one) for one in trained]
    measured = [_measure(judge, parent, one, codec, one.cut.validation)
                for one, codec in zip(trained, codecs, strict=True)]
    frontier = _frontier([(len(payload), -quality) for quality, _, payload in measured])
    outcomes = []
    for index, (one, codec) in enumerate(zip(trained, codecs, strict=True)):
        registered = index in frontier
        if registered:  # `_export_codec` removed what an earlier run registered
            _export(Path(models_dir), parent, one.cut.point, one.name, one.stack, one.bits,
                    one.cut.validation[:64], head_onnx=one.cut.head.path, register=True)
            _check_fused(models, parent, one, judge.inputs(parent.name)[:16])
        quality, changed, payload = measured[index]
        test_quality = test_changed = None
        if test_judge is not None and one.cut.test is not None:
            test_quality, test_changed, _ = _measure(test_judge, parent, one, codec,
                                                     one.cut.test)
        outcomes.append(ImportedBottleneckOutcome(
            model=parent.name, split_point=one.cut.point, width=one.width, bits=one.bits,
            name=bottleneck_name(parent.name, one.cut.point, one.name),
            features_shape=list(one.cut.train.shape[1:]),
            codes_per_sample=codec.codes_per_image, bytes_per_sample=len(payload),
            raw_input_bytes=raw_input_bytes, teacher=teacher,
            validation_metric=judge.quality_name(parent.name), validation_quality=quality,
            validation_quality_reconstruction=one.validation_reconstruction,
            validation_quality_distilled=one.validation_distilled,
            uncompressed_validation_quality=one.cut.uncompressed_validation,
            validation_changed=changed,
            test_metric=test_judge.quality_name(parent.name) if test_judge else None,
            test_quality=test_quality, uncompressed_test_quality=one.cut.uncompressed_test,
            test_changed=test_changed, kept=one.kept, tail_trained=one.tail_trained,
            registered=registered, seconds=one.seconds))
    _remove_unmeasured(Path(models_dir), parent, {(one.cut.point, f"bottleneck-{one.name}")
                                                  for one in trained})
    return outcomes


def _remove_unmeasured(models_dir: Path, parent: ModelInfo,
                       measured: set[tuple[int, str]]) -> None:
    """Unregister the fused bottlenecks of `parent` that an earlier run registered and this
    one did not train: the frontier is drawn over this run's alone."""
    for info, path in list_models(models_dir).values():
        if info.parent == parent.name and info.bottleneck and \
                (info.split_point or 0, info.bottleneck) not in measured:
            shutil.rmtree(path.parent, ignore_errors=True)


def torch_tail(path: Path) -> nn.Module:
    """The ONNX model at `path` (a tail: features -> outputs) as a torch module, by
    onnx2torch; in eval mode, float32, its outputs those of the ONNX graph."""
    import onnx

    return _onnx2torch().convert(onnx.load(str(path))).eval()


def _onnx2torch() -> Any:
    """The onnx2torch module, importable here and able to read Pad from opset 18 on.

    - onnx2torch imports torchvision for its NMS and RoiAlign converters only. Where
      torchvision is missing, or cannot load against this torch (PyPI's CUDA build of
      torchvision beside a CPU-only torch: its ops library needs libtorch_cuda), a stand-in
      lets the import through; only those two converters are lost (they raise if used).
    - onnx2torch 1.5 converts Pad up to opset 13. From opset 18 Pad takes an optional
      `axes` input; without it, it means what opset 13's does, and is converted the same
      way (with `axes` it is an error naming it).
    """
    import importlib.util
    import sys
    import types

    if importlib.util.find_spec("onnx2torch") is None:
        from tierwise.config import ConfigError

        raise ConfigError("learned bottlenecks of an imported model need onnx2torch: pip "
                          "install --no-deps onnx2torch==1.5.15 (its torchvision is not needed)")
    try:
        import onnx2torch
    except (ImportError, RuntimeError, OSError):
        for name in [n for n in sys.modules if n.split(".")[0] in ("torchvision", "onnx2torch")]:
            del sys.modules[name]

        def unavailable(*args: object, **kwargs: object) -> None:
            raise RuntimeError("onnx2torch: torchvision does not load here; NMS and RoiAlign "
                               "cannot be converted")

        vision, ops = types.ModuleType("torchvision"), types.ModuleType("torchvision.ops")
        ops.nms = ops.box_convert = ops.roi_align = unavailable  # type: ignore[attr-defined]
        vision.ops = ops  # type: ignore[attr-defined]
        sys.modules.update({"torchvision": vision, "torchvision.ops": ops})
        try:
            import onnx2torch
        finally:
            del sys.modules["torchvision"], sys.modules["torchvision.ops"]
    _convert_pad_without_axes()
    return onnx2torch


def _convert_pad_without_axes() -> None:
    from onnx import defs
    from onnx2torch.node_converters.registry import add_converter, get_converter

    opset_13 = get_converter("Pad", 13)

    def pad(node: Any, graph: Any) -> Any:
        if len(node.input_values) > 3 and node.input_values[3]:
            raise NotImplementedError(f"onnx2torch: Pad {node.name!r} pads along `axes`; "
                                      "only a Pad over every axis converts")
        return opset_13(node, graph)

    versions = {schema.since_version for schema in defs.get_all_schemas_with_history()
                if schema.name == "Pad" and schema.domain == ""}
    for version in sorted(v for v in versions if v > 13):
        try:
            get_converter("Pad", version)
        except NotImplementedError:
            add_converter("Pad", version)(pad)


def _check_imported(parent: ModelInfo, settings: BottleneckConfig,
                    train_images: Sequence[np.ndarray], mirror: bool) -> None:
    if parent.task != "classification" or len(parent.outputs) != 1:
        raise ValueError(f"optimize.bottleneck.model: {parent.name} is a {parent.task} model "
                         f"with outputs {[spec.name for spec in parent.outputs]}; a learned "
                         "bottleneck is distilled on a classifier's one output, its logits")
    if not parent.eval_data:
        raise ValueError(f"optimize.bottleneck.model: {parent.name} has no evaluation data "
                         "to choose the frontier on; import it with --eval DATA "
                         "(`tierwise models add NAME FILE --eval DIR --replace`)")
    samples = len(train_images) * (2 if mirror and image_size(parent) else 1)
    if samples < settings.train.batch_size:
        raise ValueError(f"optimize.bottleneck.train.batch_size: {settings.train.batch_size} "
                         f"is more than the {samples} training samples")


def _feature_maps(parent: ModelInfo) -> list[int]:
    """Split points whose features are a map [N, C, H, W] with H·W > 1 (or unknown)."""
    return [point for point, cut in zip(split_points(parent), parent.cuts, strict=True)
            if len(cut.shape) == 4 and cut.datatype == "FP32" and cut.shape[2:] != [1, 1]]


def _deepest_map(parent: ModelInfo) -> int:
    maps = _feature_maps(parent)
    if not maps:
        raise ValueError(f"optimize.bottleneck.split_points: {parent.name} has no cut with a "
                         "float feature map [N, C, H, W]; a learned bottleneck needs one")
    return maps[-1]


def _check_point(parent: ModelInfo, point: int) -> None:
    points = split_points(parent)
    if point not in points:
        raise ValueError(f"optimize.bottleneck.split_points: {parent.name} can be cut at "
                         f"1..{len(points)}, not {point}")
    if point not in _feature_maps(parent):
        cut = parent.cuts[point - 1]
        maps = _feature_maps(parent)
        raise ValueError(f"optimize.bottleneck.split_points: cut {point} of {parent.name} "
                         f"({cut.tensor}) gives {cut.datatype} {cut.shape}; a learned "
                         "bottleneck needs a float feature map [N, C, H, W] with H·W > 1 "
                         f"(cuts with one: {maps[-8:] if maps else 'none'})")


def _views(parent: ModelInfo, images: Sequence[np.ndarray], mirror: bool) -> list[np.ndarray]:
    """The training samples, and each image mirrored left-right where the model takes
    images and `mirror` is on."""
    views = list(images)
    if mirror and image_size(parent) is not None:
        views += [np.ascontiguousarray(np.asarray(image)[:, ::-1]) for image in images]
    return views


def _run_on(model: OnnxModel, samples: Sequence[np.ndarray]) -> np.ndarray:
    """`model`'s first output on every sample (resized as the client does), CHUNK at a time."""
    return np.concatenate([
        model.run_batched(np.concatenate([as_batch(model.info, sample)
                                          for sample in samples[start:start + CHUNK]]), CHUNK)
        for start in range(0, len(samples), CHUNK)])


def _prepare_cut(models_dir: Path, parent: ModelInfo, point: int, views: list[np.ndarray],
                 judge: Judge, test_judge: Judge | None, models: _Models) -> _Cut:
    sample = np.concatenate([as_batch(parent, view) for view in views[:2]])
    head_info, tail_info = export_split(models_dir, parent.name, point, sample)
    models.forget(head_info.name, tail_info.name)
    head, tail = models.load(head_info.name), models.load(tail_info.name)

    def quality(judge: Judge, features: np.ndarray) -> float:
        results = judge.task(parent.name).decode(tail.run_all_batched(features, CHUNK))
        return judge.quality(parent.name, results)

    validation = head.run_batched(judge.inputs(parent.name), CHUNK)
    test = head.run_batched(test_judge.inputs(parent.name), CHUNK) if test_judge else None
    return _Cut(point=point, head=head, tail=tail, train=_run_on(head, views),
                validation=validation, test=test,
                uncompressed_validation=quality(judge, validation),
                uncompressed_test=(quality(test_judge, test)
                                   if test_judge is not None and test is not None else None))


def _fit_reconstruction(encoder: Encoder, decoder: Decoder, features: np.ndarray,
                        seed: int) -> float:
    """Fit encoder and decoder alone to reproduce `features` (float32 [N, C, H, W]): mean
    squared error with each channel in units of its standard deviation, Adam on a one-cycle
    schedule, RECONSTRUCTION_EPOCHS over the samples. Returns the last batch's loss (about
    the share of the features' variance the codes miss).

    Why a warm start: trained by distillation alone from random weights, the codes carry
    only what the training frames' answers need, and frames unlike them lose everything.
    On the camera workload (EfficientNet-Lite0 cut at 52, after its last block; training
    frames from other videos and photos) codes of every width tried up to all 320 channels
    (8-bit) then gave one class for every validation frame of the camera: fidelity to Lite2
    0%, against 13% uncompressed. From this fit they keep the device model's features
    well enough to answer (`validation_quality_reconstruction`); the distillation that
    follows lowers validation fidelity there (`validation_quality_distilled`; w128 4-bit:
    33% -> 7%), so the warm start alone is kept (`tierwise optimize bottleneck --workload
    camera`, reports/optimize/bottleneck-camera.json)."""
    generator = torch.Generator().manual_seed(seed)
    data = torch.from_numpy(np.ascontiguousarray(features))
    scale = data.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    batch = min(RECONSTRUCTION_BATCH, len(data))
    steps_per_epoch = max(1, len(data) // batch)
    total_steps = RECONSTRUCTION_EPOCHS * steps_per_epoch
    optimizer = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()],
                                 lr=RECONSTRUCTION_LEARNING_RATE)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=RECONSTRUCTION_LEARNING_RATE, total_steps=total_steps)
    encoder.train()
    decoder.train()
    loss = torch.zeros(())
    order = torch.randperm(len(data), generator=generator)
    for step in range(total_steps):
        if step % steps_per_epoch == 0:
            order = torch.randperm(len(data), generator=generator)
        start = (step % steps_per_epoch) * batch
        target = data[order[start:start + batch]]
        loss = (((decoder(encoder(target)) - target) / scale) ** 2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return float(loss.detach())


def _train_one(cut: _Cut, parent: ModelInfo, width: int, bits: int, template: nn.Module,
               teacher_logits: np.ndarray, settings: BottleneckConfig, judge: Judge, *,
               train_tail: bool, seed: int, progress: Progress | None) -> _Trained:
    """The warm start, then distillation; keeps whichever is better on validation."""
    torch.manual_seed(seed)
    channels = int(cut.train.shape[1])
    encoder = Encoder(channels, width, bits)
    decoder = Decoder(channels, width, bits, nonnegative=bool(cut.train.min() >= 0))
    tail = copy.deepcopy(template).requires_grad_(True) if train_tail else _FrozenTail(template)
    stack = nn.Sequential(encoder, decoder, tail)
    learned = nn.ModuleList([encoder, decoder, tail] if train_tail else [encoder, decoder])
    started = time.perf_counter()
    _fit_reconstruction(encoder, decoder, cut.train, seed)
    reconstruction = _torch_quality(judge, parent, stack, cut.validation)
    warm = copy.deepcopy(learned.state_dict())
    train_model("bottleneck", cut.train, teacher_logits, settings.train, seed=seed,
                progress=progress, model=stack, augment=False,
                objective=ReferenceDistillation(settings.temperature),
                description=f"bottleneck w{width} {bits}-bit @{cut.point}")
    distilled = _torch_quality(judge, parent, stack, cut.validation)
    kept = "distilled"
    if reconstruction > distilled:
        learned.load_state_dict(warm)
        kept = "reconstruction"
    stack.eval()
    return _Trained(cut=cut, width=width, bits=bits, stack=stack, tail_trained=train_tail,
                    kept=kept,
                    validation_reconstruction=reconstruction,
                    validation_distilled=distilled,
                    seconds=time.perf_counter() - started)


def _torch_outputs(parent: ModelInfo, module: nn.Module,
                   inputs: np.ndarray) -> dict[str, np.ndarray]:
    module.eval()
    with torch.inference_mode():
        logits = torch.cat([module(torch.from_numpy(np.ascontiguousarray(
            inputs[start:start + CHUNK]))) for start in range(0, len(inputs), CHUNK)])
    return {parent.outputs[0].name: logits.numpy()}


def _torch_quality(judge: Judge, parent: ModelInfo, stack: nn.Module,
                   features: np.ndarray) -> float:
    task = judge.task(parent.name)
    return judge.quality(parent.name, task.decode(_torch_outputs(parent, stack, features)))


def _export_codec(models_dir: Path, parent: ModelInfo, one: _Trained) -> LearnedBottleneck:
    return _export(models_dir, parent, one.cut.point, one.name, one.stack, one.bits,
                   one.cut.validation[:64], head_onnx=one.cut.head.path, register=False)


def _measure(judge: Judge, parent: ModelInfo, one: _Trained, codec: LearnedBottleneck,
             features: np.ndarray) -> tuple[float, dict[str, float], bytes]:
    """Quality through the exported codec (ONNX Runtime, the codes packed and unpacked) and
    the tail, how far the answers moved from the whole model's, and one payload."""
    payloads = codec.encode_batch(features)
    decoded = codec.decode_batch(payloads)
    outputs = (_torch_outputs(parent, one.stack[2], decoded) if one.tail_trained
               else one.cut.tail.run_all_batched(decoded, CHUNK))
    task = judge.task(parent.name)
    results = task.decode(outputs)
    return (judge.quality(parent.name, results),
            task.changed(results, judge.results(parent.name)), payloads[0])


def _check_fused(models: _Models, parent: ModelInfo, one: _Trained,
                 images: np.ndarray) -> None:
    """The registered fused head and tail, in ONNX Runtime, against torch on `images` (the
    model's inputs): the same codes (a rounding tie may flip one code in a thousand by one
    level) and logits within 1e-3 of their scale. RuntimeError otherwise."""
    suffix = f"bottleneck-{one.name}"
    fused_head = f"{head_name(parent.name, one.cut.point)}.{suffix}"
    fused_tail = f"{tail_name(parent.name, one.cut.point)}.{suffix}"
    models.forget(fused_head, fused_tail)
    codes = models.load(fused_head).run(images)
    logits = models.load(fused_tail).run(codes)
    with torch.inference_mode():
        expected_codes = one.stack[0](torch.from_numpy(one.cut.head.run(images))).numpy()
        expected = one.stack[1:](torch.from_numpy(codes)).numpy()
    moved = np.abs(codes.astype(np.int16) - expected_codes.astype(np.int16))
    error = float(np.abs(logits.astype(np.float64) - expected).max())
    if moved.max() > 1 or moved.mean() > 1e-3 or error > 1e-3 * max(1.0, float(
            np.abs(expected).max())):
        raise RuntimeError(f"{fused_head} + {fused_tail}: ONNX Runtime differs from torch "
                           f"(codes moved in {float((moved > 0).mean()):.2%}, logits by "
                           f"{error:.2e})")
