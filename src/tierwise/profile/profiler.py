"""`tierwise profile`: measure each model for the planner and store `profile.json` beside it.

For every whole model, on its own evaluation data (`tierwise.profile.evaluation`): its
batch-1 compute time on this host, stretched by each tier's `compute_scale`; for the models
edge and cloud serve, at most `profile.max_cuts` split candidates (exported first) with the
head and tail time of each, the bytes per sample of each feature codec and the task's
quality with that codec in the path; the bytes and quality of each input codec; and, for
the device's models, cascade curves towards every model it can escalate to.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import Progress

from tierwise.codecs import RAW, codec_fits, codec_names, get_codec, packed_codec_name
from tierwise.config import DEVICE_TIER, Config, ConfigError
from tierwise.data import load_splits
from tierwise.models.store import ModelInfo, bottleneck_bits, list_models, tier_models
from tierwise.profile.cascade import cascade_curve
from tierwise.profile.evaluation import EvalSet, Judge, eval_set_for
from tierwise.profile.model_profile import (
    CascadeCurve,
    CodecProfile,
    ModelProfile,
    SplitProfile,
    profile_path,
    save_profile,
)
from tierwise.runtime.session import OnnxModel

TIMING_RUNS = 300
WARMUP_RUNS = 30
MIN_TIMING_RUNS = 30
TIMING_BUDGET_S = 1.5  # per measurement, past MIN_TIMING_RUNS: big models take fewer runs
CODEC_TIMING_IMAGES = 200


def batch1_ms(run: Callable[[np.ndarray], object], sample: np.ndarray,
              runs: int = TIMING_RUNS) -> float:
    """Median time of `run` on one input at a time (ms), after a warm-up: `runs` runs, or
    fewer (at least MIN_TIMING_RUNS) once TIMING_BUDGET_S has passed."""
    for index in range(min(WARMUP_RUNS, runs)):
        run(sample[index % len(sample)][None])
    times: list[float] = []
    budget_ends = time.perf_counter() + TIMING_BUDGET_S
    for index in range(runs):
        one = sample[index % len(sample)][None]
        started = time.perf_counter()
        run(one)
        times.append(time.perf_counter() - started)
        if index + 1 >= MIN_TIMING_RUNS and started > budget_ends:
            break
    return float(np.median(times) * 1e3)


def codec_profile(codec_name: str, tensors: np.ndarray,
                  accuracy_of: Callable[[np.ndarray], float]) -> CodecProfile:
    """Bytes, accuracy and timing of one codec on `tensors` (one row per image)."""
    if codec_name == RAW:
        size = float(tensors[0].nbytes)
        return CodecProfile(bytes_mean=size, bytes_p95=size, accuracy=accuracy_of(tensors),
                            encode_ms=0.0, decode_ms=0.0)
    codec = get_codec(codec_name)
    row_shape, dtype = tensors.shape[1:], tensors.dtype
    payloads = [codec.encode(row) for row in tensors]
    decoded = np.stack([codec.decode(payload, row_shape, dtype) for payload in payloads])
    sizes = np.array([len(payload) for payload in payloads], dtype=np.float64)
    timed = tensors[:CODEC_TIMING_IMAGES]
    started = time.perf_counter()
    timed_payloads = [codec.encode(row) for row in timed]
    encode_ms = (time.perf_counter() - started) * 1e3 / len(timed)
    started = time.perf_counter()
    for payload in timed_payloads:
        codec.decode(payload, row_shape, dtype)
    decode_ms = (time.perf_counter() - started) * 1e3 / len(timed)
    return CodecProfile(bytes_mean=float(sizes.mean()), bytes_p95=float(np.percentile(sizes, 95)),
                        accuracy=accuracy_of(decoded), encode_ms=encode_ms, decode_ms=decode_ms)


def thin_curve(then: str, confidence: np.ndarray, first_correct: np.ndarray,
               then_correct: np.ndarray, steps: int = 100) -> CascadeCurve:
    """The cascade curve at about `steps` evenly spaced escalation rates (both ends kept)."""
    thresholds, accuracy, escalation = cascade_curve(confidence, first_correct, then_correct)
    picks = np.unique(np.searchsorted(escalation, np.linspace(0, 1, steps + 1)).clip(
        0, len(escalation) - 1))
    return CascadeCurve(then=then, thresholds=thresholds[picks].tolist(),
                        accuracy=accuracy[picks].tolist(),
                        escalation_rate=escalation[picks].tolist())


class _Profiler:
    """Measures the models of one models directory against one config, each on its own
    evaluation data (`tierwise.profile.evaluation`)."""

    def __init__(self, config: Config, models_dir: Path, progress: Progress) -> None:
        self.config = config
        self.models_dir = models_dir
        self.progress = progress
        self.scales = {tier: settings.compute_scale for tier, settings in config.tiers.items()}
        self.found = list_models(models_dir)
        self.loaded: dict[str, OnnxModel] = {}
        self.judges: dict[str, Judge] = {}
        self._default: EvalSet | None = None

    def model(self, name: str) -> OnnxModel:
        if name not in self.loaded:
            info, path = self.found[name]
            self.loaded[name] = OnnxModel(path, info)
        return self.loaded[name]

    def judge(self, name: str) -> Judge:
        """The judge of the data `name` is measured on: its `eval_data`, else the config's
        dataset. Models that share data share a judge (and cached outputs)."""
        info, _ = self.found[name]
        if info.reference and info.reference not in self.found:
            raise ConfigError(f"{name}: its reference model {info.reference!r} is not in "
                              f"{self.models_dir}; import it, or re-import {name} with "
                              "another --reference")
        if info.eval_data:
            key = f"{info.eval_data}|{info.reference or ''}"
            if key not in self.judges:
                self.judges[key] = Judge(eval_set_for(info, self.config.profile.eval_limit),
                                         self.model)
            return self.judges[key]
        if "" not in self.judges:
            self._check_takes_dataset(info)
            data = self.config.data
            splits = load_splits(data.path, data.validation_size, data.seed)
            self.judges[""] = Judge(EvalSet(
                samples=splits.val_x, targets=splits.val_y,
                source=f"Fashion-MNIST validation split ({len(splits.val_x)} images)"),
                self.model)
        return self.judges[""]

    def _check_takes_dataset(self, info: ModelInfo) -> None:
        """A model with no eval data is measured on the config's dataset (Fashion-MNIST
        images, uint8 [1, 28, 28]); one that cannot take them needs its own."""
        spec = info.inputs[0]
        if spec.datatype != "UINT8" or spec.shape[1:] != [1, 28, 28]:
            raise ConfigError(
                f"{info.name}: no evaluation data, and its input {spec.describe()} does not "
                "take the config's dataset (Fashion-MNIST, UINT8 [?, 1, 28, 28]); import it "
                "with --eval DATA (`tierwise models add NAME FILE --eval DIR --replace`)")

    def per_tier(self, host_ms: float) -> dict[str, float]:
        return {tier: host_ms * scale for tier, scale in self.scales.items()}

    def profile(self, name: str, split: bool, cascade_to: list[str]) -> ModelProfile:
        from tierwise.client.client import emulation_labels
        from tierwise.optimize.split import candidate_split_points, export_split

        info, _ = self.found[name]
        judge = self.judge(name)
        inputs = judge.inputs(name)
        task = self.progress.add_task(f"profiling {name}", total=None)
        model = self.model(name)
        full_ms = batch1_ms(model.run, inputs)
        quality = judge.quality(name, judge.results(name))
        input_codecs = {codec: codec_profile(codec, inputs, judge.quality_of(name))
                        for codec in codec_names("input") if codec_fits(codec, inputs[0])}
        splits: list[SplitProfile] = []
        head_ms = [0.0]
        if split:
            for point in candidate_split_points(info, self.config.profile.max_cuts):
                self.progress.update(task, description=f"profiling {name} split @{point}")
                try:
                    head_info, tail_info = export_split(self.models_dir, name, point,
                                                        inputs[:32])
                except Exception as error:
                    self.progress.console.print(f"[yellow]{name}: split @{point} skipped[/]: "
                                                f"{str(error).splitlines()[0][:200]}")
                    continue
                self.found = list_models(self.models_dir)
                head = self.model(head_info.name)
                head_ms.append(batch1_ms(head.run, inputs))
                features = head.run_batched(inputs)
                splits.append(SplitProfile(
                    split_point=point, head=head_info.name, tail=tail_info.name,
                    features_shape=list(features.shape[1:]),
                    codecs={codec: codec_profile(codec, features,
                                                 judge.quality_of(name, tail_info.name))
                            for codec in codec_names("feature")
                            if codec_fits(codec, features[0])}))
        # learned bottlenecks of any model, a device model's included (its tail is served)
        splits += self.bottleneck_splits(name)
        head_ms.append(full_ms)
        blocks = np.maximum(np.diff(head_ms), 0.0) if split else np.array([full_ms])
        # timing noise can make a longer head measure faster than a shorter one; clipping
        # that at 0 must not change the whole: rescale so the blocks add up to the model
        blocks *= full_ms / max(float(blocks.sum()), 1e-12)
        cut_splits = [profiled for profiled in splits if profiled.bottleneck is None]
        for index, profiled in enumerate(cut_splits):  # its head runs segments 0..index
            profiled.head_ms = self.per_tier(float(blocks[:index + 1].sum()))
            profiled.tail_ms = self.per_tier(float(blocks[index + 1:].sum()))
        cascades = []
        first_correct = judge.correct(name) if judge.task(name).has_confidence else None
        for then in cascade_to:
            then_correct = judge.correct(then) if self.judge(then) is judge else None
            if first_correct is None or then_correct is None:
                continue  # a cascade pairs models of one task measured on the same samples
            cascades.append(thin_curve(then, judge.confidence(name), first_correct,
                                       then_correct))
        self.progress.update(task, total=1, completed=1, description=f"profiled {name}")
        return ModelProfile(
            model=name, parent=info.parent, variant=info.variant, version=info.version,
            sha256=info.sha256,
            measured_at=datetime.now(UTC).isoformat(timespec="seconds"),
            host=f"{platform.node()} {platform.machine()} {platform.processor() or ''}".strip(),
            validation_images=len(inputs), quality_metric=judge.quality_name(name),
            accuracy=quality, runs_on=info.runs_on,
            compute_ms=self.per_tier(full_ms),
            block_ms={tier: (blocks * scale).tolist() for tier, scale in self.scales.items()},
            compute_scales=self.scales, emulated=emulation_labels(self.config),
            input_codecs=input_codecs, splits=splits, cascades=cascades)

    def bottleneck_splits(self, name: str) -> list[SplitProfile]:
        """The learned-bottleneck splits of `name` (`tierwise optimize bottleneck`): their fused
        heads and tails timed as they are, their codes' bytes, and the accuracy through them."""
        out = []
        for head_info, tail_info in bottleneck_parts(self.found, name):
            head, tail = self.model(head_info.name), self.model(tail_info.name)
            inputs = self.judge(name).inputs(name)
            codes = head.run_batched(inputs)
            codec = packed_codec_name(bottleneck_bits(head_info.bottleneck or ""))
            out.append(SplitProfile(
                split_point=head_info.split_point or 0, head=head_info.name,
                tail=tail_info.name, features_shape=list(codes.shape[1:]),
                codecs={codec: codec_profile(codec, codes, self.judge(name).quality_of(
                    name, tail_info.name))},
                bottleneck=head_info.bottleneck,
                head_ms=self.per_tier(batch1_ms(head.run, inputs)),
                tail_ms=self.per_tier(batch1_ms(tail.run, codes))))
        return out


def bottleneck_parts(found: dict[str, tuple[ModelInfo, Path]],
                     model: str) -> list[tuple[ModelInfo, ModelInfo]]:
    """(fused head, fused tail) of every learned bottleneck registered for `model`."""
    heads = [info for info, _ in found.values()
             if info.parent == model and info.bottleneck and info.role == "head"]
    tails: dict[tuple[int | None, str | None], ModelInfo] = {
        (info.split_point, info.bottleneck): info for info, _ in found.values()
        if info.parent == model and info.bottleneck and info.role == "tail"}
    return [(head, tails[(head.split_point, head.bottleneck)]) for head in heads
            if (head.split_point, head.bottleneck) in tails]


def _is_current(models_dir: Path, info: ModelInfo,
                found: dict[str, tuple[ModelInfo, Path]]) -> bool:
    """Profiled from this very file, with the learned bottlenecks registered now."""
    path = profile_path(models_dir, info.name)
    if not path.is_file():
        return False
    stored = ModelProfile.model_validate_json(path.read_text())
    profiled = sorted(split.head for split in stored.splits if split.bottleneck)
    registered = sorted(head.name for head, _ in bottleneck_parts(found, info.name))
    return stored.sha256 == info.sha256 and profiled == registered


def ensure_profiles(config: Config, models_dir: Path | None = None, *,
                    only: list[str] | None = None, force: bool = False,
                    console: Console | None = None) -> list[str]:
    """Profile every whole model that has no current profile (or all, with `force`); return
    the names profiled. The models the device runs get cascade curves towards every model of
    the other tiers; the models of the other tiers get their splits exported and measured."""
    console = console or Console()
    models_dir = Path(models_dir or config.models_dir)
    found = list_models(models_dir)
    whole = [name for name, (info, _) in found.items() if info.role == "full"]
    placed = tier_models(config, {name: info for name, (info, _) in found.items()})
    device_models = set(placed.get(DEVICE_TIER, []))
    # splits are cut from the models the tiers run; their variants run whole
    cascade_targets = list(dict.fromkeys(  # a model two tiers run is one target
        m for tier, names in placed.items() if tier != DEVICE_TIER for m in names if m in found))
    remote_models = [m for m in cascade_targets if not found[m][0].variant]
    todo = [name for name in whole if (only is None or name in only)
            and (force or not _is_current(models_dir, found[name][0], found))]
    if not todo:
        return []
    with Progress(console=console, transient=True) as progress:
        profiler = _Profiler(config, models_dir, progress)
        for name in todo:
            cascade_to = cascade_targets if name in device_models else []
            profile = profiler.profile(name, split=name in remote_models, cascade_to=cascade_to)
            save_profile(models_dir, profile)
            console.print(f"[green]profiled[/] {name}: {profile.quality_metric} "
                          f"{profile.accuracy:.2%}, {profile.compute_ms['device']:.3f} ms "
                          f"on the device, {len(profile.splits)} split points")
    return todo
