"""Learned bottlenecks at a split (BottleNet++, Shao & Zhang, 2020; task-oriented
communication, Shao, Mao & Zhang, 2021): a small encoder on the device squeezes the features
at the cut into a few channels of `bits`-bit codes, and a decoder on the server expands them
back, trained end to end with the task loss rather than to reconstruct the features.

- encoder: 1×1 conv (C → width), batch norm, sigmoid, scaled to [0, 2^bits - 1] and rounded
  (straight-through gradient while training);
- decoder: codes / (2^bits - 1), 1×1 conv (width → C), batch norm, ReLU — the features the
  tail expects (post-ReLU activations).

The head (blocks [0, k)) stays frozen — it is shared with the plain split and its features
are computed once, by ONNX Runtime — while the encoder, decoder and the tail are trained on
the labels and on the uncompressed tail's softened logits (distillation, as in
`tierwise.optimize.distill`).
Each (width, bits) becomes:

- `<model>.head@k.bottleneck-w<width>-<bits>bit`: image -> uint8 codes, run on the device;
- `<model>.tail@k.bottleneck-w<width>-<bits>bit`: uint8 codes -> logits, served on the tier;
- `<model>.bottleneck@k-w<width>-<bits>bit/`: the encoder and decoder alone
  (`tierwise.codecs.LearnedBottleneck`), for measuring the codec by itself.

On the wire the codes travel packed, `bits` bits per value (`packed-4bit`, `packed-8bit`).
Only the (width, bits) on the rate–accuracy frontier (no other is both smaller and at least as
accurate on validation data) are registered for the planner; the report lists them all.
"""

from __future__ import annotations

import copy
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from rich.progress import Progress
from torch import nn

from tierwise.codecs import LearnedBottleneck, bottleneck_dir
from tierwise.config import BottleneckConfig
from tierwise.data import Splits
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
from tierwise.runtime.session import OnnxModel
from tierwise.zoo.build import load_trained
from tierwise.zoo.export import export_onnx
from tierwise.zoo.train import train_model

CODES = "codes"


class Encoder(nn.Module):
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
    def __init__(self, channels: int, width: int, bits: int) -> None:
        super().__init__()
        self.levels = float(2 ** bits - 1)
        self.expand = nn.Sequential(nn.Conv2d(width, channels, 1), nn.BatchNorm2d(channels),
                                    nn.ReLU())

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
    """Train a bottleneck for every split point × width × bits of `settings`, export them,
    and register those on the rate–accuracy frontier."""
    parent = parent_info(models_dir, settings.model)
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
                        val_features.numpy()[:64], head_onnx=head_path, register=registered,
                        val_accuracy=val_accuracy)
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


def _export(models_dir: Path, parent: ModelInfo, point: int, name: str, stack: nn.Sequential,
            bits: int, sample_features: np.ndarray, *, head_onnx: Path, register: bool,
            val_accuracy: float) -> LearnedBottleneck:
    """Write the codec (encoder, decoder) and, if `register`, the fused head and tail;
    `sample_features` (head outputs) check each export against torch."""
    import onnx
    from onnx import compose

    encoder, decoder, tail = stack[0], stack[1], stack[2]
    directory = bottleneck_dir(models_dir, parent.name, point, name)
    directory.mkdir(parents=True, exist_ok=True)
    export_onnx(encoder.eval(), directory / "encoder.onnx", sample_features,
                input_name="features", output_name=CODES)
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
                    input_name=CODES)
        encoder_model = onnx.load(str(directory / "encoder.onnx"))
        fused_head = compose.merge_models(
            onnx.load(str(head_onnx)), compose.add_prefix(encoder_model, "bottleneck/"),
            io_map=[("features", "bottleneck/features")])
        fused_tail = onnx.load(str(tail_path))
    codes_shape = [-1, *sample_codes.shape[1:]]
    codes = TensorSpec(name="bottleneck/" + CODES, datatype="UINT8", shape=codes_shape)
    common = {"version": parent.version, "calibration": parent.calibration,
              "parent": parent.name, "split_point": point, "batched": parent.batched,
              "bottleneck": full_name, "bytes": 0, "sha256": ""}
    head_info = ModelInfo(name=fused_head_name, role="head", task="generic",
                          inputs=parent.inputs, outputs=[codes], parameters=0, **common)
    tail_info = ModelInfo(name=fused_tail_name, role="tail", task=parent.task,
                          labels=parent.labels,
                          inputs=[codes.model_copy(update={"name": CODES})],
                          outputs=parent.outputs, parameters=0, **common)
    for model, info in ((fused_head, head_info), (fused_tail, tail_info)):
        path = models_dir / info.name / "model.onnx"
        path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(model, str(path))
        save_info(models_dir, info.model_copy(update={
            "bytes": path.stat().st_size, "sha256": sha256_file(path),
            "parameters": onnx_parameters(path)}))
    return codec

