"""Workloads: what the demo and the network benchmarks run — the models each tier runs, their
profiles, and the requests with the answer each should get.

- `fashion-mnist`: the zoo trained here (`tierwise.zoo`) on Fashion-MNIST test images, scored
  against their labels (accuracy). A 784-byte image: bandwidth only bites below ~10 KB/s.
- `camera`: real pretrained ImageNet classifiers (`tierwise.pretrained`) on frames of a real
  street camera (opencv-doc's `vtest.avi`, 768×576): EfficientNet-Lite0 on the device (at a
  `compute_scale` standing in for a Jetson Nano-class board), Lite1 and Lite2 at the edge,
  Lite2 in the cloud. No labels exist for these frames, so quality is **fidelity**: top-1
  agreement with Lite2 on the unmodified frame (and top-5 containment: Lite2's top-1 among
  the answer's five best), computed once and cached beside the frames. A raw frame at
  Lite1's input is 272×272×3 = 222 KB, the size of the instances in Shen et al. (IEEE
  Communications Magazine 62(10), 2024, arXiv:2307.02779).

The camera's frames are split by time and source: frames 0–399 of `vtest.avi` (every 4th) are
what `tierwise profile` measures the models on and the planner calibrates with; frames
400–794 (every 2nd) are the test requests; other videos and photographs (`Megamind.avi`,
`tree.avi`, opencv-doc's photos) train learned bottlenecks, so no test frame is seen in
training. The frames are written once as lossless PNG under `<data_dir>/camera/frames/`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.markup import escape

from tierwise.config import Config, TierConfig
from tierwise.models.store import list_models

WORKLOADS = ("fashion-mnist", "camera")
OPENCV_DATA = Path("/usr/share/doc/opencv-doc/examples/data")
CAMERA_VIDEO = OPENCV_DATA / "vtest.avi"
TRAIN_VIDEOS = (OPENCV_DATA / "Megamind.avi", OPENCV_DATA / "tree.avi")
# installed in this order: the reference first, since the others name it
CAMERA_MODELS = {"efficientnet-lite2": ["edge", "cloud"], "efficientnet-lite1": ["edge"],
                 "efficientnet-lite0": ["device"]}
REFERENCE = "efficientnet-lite2"
# Assumed, not measured: a Jetson Nano-class board's CPU (4x Cortex-A57, 1.43 GHz) takes
# about 4x this 2-core x86 host's time for a small CNN. Every output says it is emulated.
DEVICE_COMPUTE_SCALE = 4.0
# (first frame, end, every) of vtest.avi
PROFILE_FRAMES = (0, 400, 4)
TEST_FRAMES = (400, 795, 2)


class WorkloadError(RuntimeError):
    """A workload that cannot be set up here; the message says what to install."""


@dataclass
class Samples:
    """Test requests: `inputs[i]` what the app passes to `Client.infer`, `labels[i]` the
    class it should answer (int64 [N]: the label, or the reference model's top-1)."""

    inputs: np.ndarray | list[np.ndarray]
    labels: np.ndarray
    source: str

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Workload:
    """One workload, set up: its config (own models directory, tiers, SLO) and the models
    the fixed strategies use on each tier."""

    name: str
    config: Config
    title: str
    quality: str        # "accuracy" or "fidelity": what `Samples.labels` are
    quality_note: str   # one sentence for tables and plots
    device: str
    edge: str
    cloud: str
    # the network benchmarks' default SLO: a deadline (ms) and a quality floor
    bench_deadline_ms: float = 100.0
    bench_floor: float = 0.93

    def samples(self, limit: int) -> Samples:
        if self.name == "camera":
            return camera_samples(self.config, limit)
        from tierwise.data import load_splits

        data = self.config.data
        splits = load_splits(data.path, data.validation_size, data.seed)
        return Samples(splits.test_x[:limit], splits.test_y[:limit].astype(np.int64),
                       f"the first {min(limit, len(splits.test_x)):,} Fashion-MNIST test images")


def load_workload(name: str, config: Config, console: Console | None = None) -> Workload:
    """Set up workload `name` (train or install its models, profile them; cached) and return
    it. Raises WorkloadError naming what to install when a part is missing."""
    from tierwise.profile.profiler import ensure_profiles

    console = console or Console()
    if name == "fashion-mnist":
        from tierwise.zoo.names import model_name

        names = [model_name(tier) for tier in ("device", "edge", "cloud")]
        if not all(n in list_models(config.models_dir) for n in names):
            try:
                from tierwise.zoo.build import ensure_zoo
            except ImportError as error:
                raise WorkloadError(f"the zoo is not cached under {config.models_dir} and "
                                    f"training needs torch ({error}): pip install "
                                    "'tierwise[train]'") from None
            console.rule("training the zoo (cached afterwards)")
            ensure_zoo(config, console=console)
        ensure_profiles(config, console=console)
        device, edge, cloud = names
        return Workload(name, config, "Fashion-MNIST test images", "accuracy",
                        "accuracy: against the test labels", device, edge, cloud)
    if name == "camera":
        camera = camera_config(config)
        install_camera(camera, console)
        ensure_profiles(camera, console=console)
        # the benches' floor: the cloud model's fidelity (1: it is the reference) less the
        # cascade margin, as the demo's cascade and adaptive are asked for
        return Workload(name, camera, "street-camera frames (vtest.avi)", "fidelity",
                        f"fidelity: top-1 agreement with {REFERENCE} on the unmodified frame "
                        "(no labels exist for these frames)",
                        "efficientnet-lite0", REFERENCE, REFERENCE,
                        bench_deadline_ms=camera.slo.deadline_ms,
                        bench_floor=1 - camera.slo.cascade_accuracy_margin_points / 100)
    raise WorkloadError(f"--workload: expected one of {', '.join(WORKLOADS)}, got {name!r}")


def camera_config(base: Config) -> Config:
    """The camera workload's config: `base` with its own data directory
    (`<data_dir>/camera`: models, registry, telemetry), a device at `DEVICE_COMPUTE_SCALE`,
    a 1 s deadline, and profiling sized for 100 frames."""
    update: dict[str, Any] = {
        "data_dir": str(Path(base.data_dir) / "camera"),
        "tiers": {"device": TierConfig(compute_scale=DEVICE_COMPUTE_SCALE),
                  "edge": base.tier("edge").model_copy(update={"max_batch_size": 16}),
                  "cloud": base.tier("cloud").model_copy(update={"max_batch_size": 16})},
        "profile": base.profile.model_copy(update={"max_cuts": 4, "eval_limit": 100}),
        "slo": base.slo.model_copy(update={"deadline_ms": 1000.0,
                                           "cascade_accuracy_margin_points": 5.0}),
        "demo": base.demo.model_copy(update={"images": 200,
                                             "report_dir": base.demo.report_dir + "-camera"}),
    }
    # Lite0's learned bottlenecks: after its last block (320x7x7), the widths and the short
    # training that fit ~4 minutes on 2 cores (`tierwise optimize bottleneck --workload camera`)
    bottleneck = base.optimize.bottleneck.model_copy(update={
        "model": "efficientnet-lite0", "split_points": [52], "widths": [64, 96, 128, 192, 256],
        "bits": [4, 8],
        "train": base.optimize.bottleneck.train.model_copy(update={"epochs": 2,
                                                                    "batch_size": 32})})
    update["optimize"] = base.optimize.model_copy(update={
        "models": ["efficientnet-lite0"], "bottleneck": bottleneck})
    return base.model_copy(update=update)


def frames_dir(config: Config) -> Path:
    return Path(config.data_dir) / "frames"


def _need_opencv_doc() -> None:
    if not CAMERA_VIDEO.is_file():
        raise WorkloadError(f"{CAMERA_VIDEO}: the camera workload's frames come from Debian's "
                            "opencv-doc: apt-get install opencv-doc (or `make photos`)")


def write_frames(directory: Path, frames: list[tuple[str, np.ndarray]]) -> int:
    """Write `frames` (name, uint8 RGB) as lossless PNG into `directory`, atomically (a
    complete folder or none); return how many."""
    import shutil

    from PIL import Image

    staging = directory.with_name(f".{directory.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name, frame in frames:
        Image.fromarray(frame).save(staging / f"{name}.png", compress_level=1)
    shutil.rmtree(directory, ignore_errors=True)
    staging.rename(directory)
    return len(frames)


def _video_frames(path: Path, start: int, stop: int, every: int,
                  skipped: list[str]) -> list[tuple[str, np.ndarray]]:
    from tierwise.data.images import iter_video

    return [(f"{path.stem}-{start + index * every:04d}", frame) for index, frame in
            enumerate(iter_video(path, every=every, start=start, stop=stop, skipped=skipped))]


def ensure_frames(config: Config, console: Console) -> dict[str, Path]:
    """The camera workload's frame folders (profile, test, train), written on first use."""
    _need_opencv_doc()
    root = frames_dir(config)
    folders = {"profile": root / "profile", "test": root / "test", "train": root / "train"}
    if all(folder.is_dir() for folder in folders.values()):
        return folders
    from tierwise.data.images import load_frames

    console.print(f"camera frames: writing {root} (once)")
    skipped: list[str] = []
    if not folders["profile"].is_dir():
        write_frames(folders["profile"], _video_frames(CAMERA_VIDEO, *PROFILE_FRAMES, skipped))
    if not folders["test"].is_dir():
        write_frames(folders["test"], _video_frames(CAMERA_VIDEO, *TEST_FRAMES, skipped))
    if not folders["train"].is_dir():
        train = [item for video in TRAIN_VIDEOS
                 for item in _video_frames(video, 0, 10**6, 1, skipped)]
        photos = load_frames(OPENCV_DATA, recursive=False)
        skipped += photos.skipped
        train += [(f"photo-{index:03d}", image) for index, image in enumerate(photos.images)]
        write_frames(folders["train"], train)
    for line in skipped:  # corrupt or truncated material: left out, and said
        console.print(f"[yellow]skipped[/]: {escape(line)}")
    for name, folder in folders.items():
        console.print(f"  {name}: {sum(1 for _ in folder.glob('*.png'))} frames in {folder}")
    return folders


def install_camera(config: Config, console: Console) -> None:
    """EfficientNet-Lite0/1/2 in the camera workload's store (converted and checked once),
    measured on the profile frames against Lite2, and Lite0's INT8 variants."""
    from tierwise.pretrained import CATALOGUE, PretrainedError, install_one

    folders = ensure_frames(config, console)
    try:
        for name, tiers in CAMERA_MODELS.items():
            install_one(config.models_dir, CATALOGUE[name], runs_on=tiers,
                        eval_data=folders["profile"], reference=REFERENCE, console=console)
    except (PretrainedError, ImportError) as error:
        raise WorkloadError(str(error)) from None
    found = list_models(config.models_dir)
    if not any(info.parent == "efficientnet-lite0" and info.variant for info, _ in
               found.values()) and not (Path(config.models_dir) / ".quantized").exists():
        from tierwise.optimize.quantize import quantize_model
        from tierwise.profile.evaluation import eval_set_for

        lite0 = found["efficientnet-lite0"][0]
        console.print("efficientnet-lite0: INT8 variants (static and dynamic), judged on the "
                      "profile frames")
        for outcome in quantize_model(config.models_dir, lite0.name,
                                      eval_set_for(lite0, config.profile.eval_limit),
                                      calibration_images=64,
                                      accuracy_budget=config.optimize.accuracy_budget):
            verdict = "kept" if outcome.kept else f"rejected ({outcome.reason})"
            console.print(f"  {outcome.name}: fidelity {outcome.validation_accuracy:.1%} "
                          f"(parent {outcome.parent_validation_accuracy:.1%}), {verdict}")
        # rejected variants leave nothing behind: remember that the attempt was made
        (Path(config.models_dir) / ".quantized").write_text("done\n")


def camera_samples(config: Config, limit: int) -> Samples:
    """The test frames (at most `limit`, evenly spaced over the test span) and Lite2's top-1
    on each unmodified frame, cached in `reference.json` beside them (keyed by Lite2's
    sha256)."""
    from tierwise.data.images import load_frames

    folder = frames_dir(config) / "test"
    frames = load_frames(folder)
    picks = np.unique(np.linspace(0, len(frames) - 1, min(limit, len(frames))).astype(int))
    reference = reference_answers(config, folder, frames.images)
    return Samples([frames.images[i] for i in picks], reference["top1"][picks],
                   f"{len(picks)} frames of {CAMERA_VIDEO.name} (frames "
                   f"{TEST_FRAMES[0]}-{TEST_FRAMES[1] - 1}, not profiled on)")


def reference_answers(config: Config, folder: Path, images: list[np.ndarray]
                      ) -> dict[str, np.ndarray]:
    """{"top1": int64 [N], "top5": int64 [N, 5]}: Lite2 on each unmodified image in
    `folder`, computed once."""
    from tierwise.models.inputs import as_batch
    from tierwise.runtime.session import OnnxModel

    info, path = list_models(config.models_dir)[REFERENCE]
    cache = folder / "reference.json"
    if cache.is_file():
        stored = json.loads(cache.read_text())
        if stored.get("sha256") == info.sha256 and len(stored["top1"]) == len(images):
            return {"top1": np.array(stored["top1"], np.int64),
                    "top5": np.array(stored["top5"], np.int64)}
    model = OnnxModel(path, info)
    logits = model.run_all_batched(np.concatenate([as_batch(info, image)
                                                   for image in images]))
    scores = next(iter(logits.values()))
    top5 = np.argsort(-scores, axis=1)[:, :5]
    cache.write_text(json.dumps({"model": REFERENCE, "sha256": info.sha256,
                                 "top1": top5[:, 0].tolist(), "top5": top5.tolist()}))
    return {"top1": top5[:, 0].astype(np.int64), "top5": top5.astype(np.int64)}
