"""A model's profile: everything the planner knows about a model, stored beside it.

`tierwise profile` measures it (`tierwise.profile.profiler`); the planner reads nothing else
about a model. torch-free, numpy-free: devices and servers read it too.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from tierwise.config import Config
from tierwise.models.store import list_models, model_dir, tier_models

PROFILE_FILE = "profile.json"


class _Record(BaseModel):
    model_config = ConfigDict(extra="ignore")


class CodecProfile(_Record):
    """One codec on one tensor (the input, or the features at one cut), on validation data."""

    bytes_mean: float = Field(description="encoded payload bytes per image (no protocol overhead)")
    bytes_p95: float
    accuracy: float = Field(description="validation accuracy with this codec in the path")
    encode_ms: float = Field(description="per image, on this host (device side)")
    decode_ms: float = Field(description="per image, on this host (server side)")


class SplitProfile(_Record):
    split_point: int = Field(description="the head runs up to the model's cut point k "
                             "(`ModelInfo.cuts[k - 1]`)")
    head: str
    tail: str
    features_shape: list[int]
    codecs: dict[str, CodecProfile]
    bottleneck: str | None = Field(None, description="a learned bottleneck's fused head/tail")
    head_ms: dict[str, float] = Field(
        default_factory=dict, description="tier -> the head's time: the segments before the "
        "cut, or measured as it is where a bottleneck's encoder is fused into it")
    tail_ms: dict[str, float] = Field(default_factory=dict, description="likewise the tail")


class CascadeCurve(_Record):
    """This model first, `then` on escalation: accuracy and escalation rate per threshold
    (escalate iff calibrated confidence < threshold), thinned to ~1% steps of escalation."""

    then: str
    thresholds: list[float]
    accuracy: list[float]
    escalation_rate: list[float]


class ModelProfile(_Record):
    model: str
    parent: str | None = Field(None, description="the model this one is a variant of")
    runs_on: list[str] = Field(default_factory=list, description="as its metadata says")
    variant: str | None = None
    version: str
    sha256: str = Field(description="of the model.onnx profiled: a different file is stale")
    measured_at: str
    host: str
    validation_images: int
    quality_metric: str = Field(
        "accuracy", description="what `accuracy` and every codec's `accuracy` measure: the "
        "task's metric and against what (labels, or fidelity to a reference model)")
    accuracy: float = Field(description="quality on the evaluation data, raw input (the "
                            "task's metric: accuracy, mAP@0.5, fidelity...)")
    compute_ms: dict[str, float] = Field(
        description="tier -> whole-model time at batch 1: host median × the tier's compute_scale")
    block_ms: dict[str, list[float]] = Field(
        default_factory=dict, description="tier -> time per segment between the profiled cut "
        "points (cumulative differences of the heads' times, so the first i add up to what "
        "the i-th profiled split's head takes)")
    compute_scales: dict[str, float]
    emulated: list[str] = Field(default_factory=list)
    input_codecs: dict[str, CodecProfile]
    splits: list[SplitProfile] = Field(default_factory=list)
    cascades: list[CascadeCurve] = Field(default_factory=list)

    def site_ms(self, site: str, scale: float) -> tuple[float, list[float]]:
        """(whole-model ms, ms per block) at batch 1 on `site` at compute_scale `scale`: its
        own profiled numbers where it was profiled at that scale, else this host's
        (another tier's, over its scale) × `scale`. So a site added after profiling, or
        named otherwise (`edge-paris`), is planned without profiling again."""
        if self.compute_scales.get(site) == scale and site in self.compute_ms:
            return self.compute_ms[site], list(self.block_ms.get(site, []))
        reference = site if site in self.compute_ms else next(iter(self.compute_ms))
        factor = scale / self.compute_scales.get(reference, 1.0)
        return (self.compute_ms[reference] * factor,
                [ms * factor for ms in self.block_ms.get(reference, [])])

    def split_ms(self, split: SplitProfile, site: str, scale: float,
                 device_scale: float) -> tuple[float, float]:
        """(head ms on the device, tail ms on `site`) of `split` (its own timing where it was
        measured, else the sum of its blocks), at those compute scales."""
        def timed(measured: dict[str, float], tier: str, tier_scale: float,
                  blocks: list[float], part: slice) -> float:
            if tier in measured and self.compute_scales.get(tier) == tier_scale:
                return measured[tier]
            reference = next((t for t in measured if t in self.compute_scales), None)
            if reference is not None:
                return measured[reference] * tier_scale / self.compute_scales[reference]
            return sum(blocks[part])

        _, device_blocks = self.site_ms("device", device_scale)
        _, site_blocks = self.site_ms(site, scale)
        return (timed(split.head_ms, "device", device_scale, device_blocks,
                      slice(None, split.split_point)),
                timed(split.tail_ms, site, scale, site_blocks, slice(split.split_point, None)))

    def split(self, split_point: int, bottleneck: str | None = None) -> SplitProfile:
        for split in self.splits:
            if split.split_point == split_point and split.bottleneck == bottleneck:
                return split
        raise KeyError(f"{self.model}: no profiled split at {split_point}; profiled: "
                       f"{[s.split_point for s in self.splits]}")


def profile_path(models_dir: Path, model: str) -> Path:
    return model_dir(models_dir, model) / PROFILE_FILE


def save_profile(models_dir: Path, profile: ModelProfile) -> Path:
    path = profile_path(models_dir, profile.model)
    path.write_text(profile.model_dump_json(indent=1) + "\n")
    return path


def load_profile(models_dir: Path, model: str) -> ModelProfile:
    path = profile_path(models_dir, model)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: model {model!r} has no profile; run `tierwise profile`")
    return ModelProfile.model_validate_json(path.read_text())


def load_tier_profiles(config: Config, models_dir: Path) -> dict[str, ModelProfile]:
    """The profiles of every model the tiers run (`tier_models`). What the planner plans
    with."""
    found = list_models(models_dir, weights=False)
    placed = tier_models(config, {name: info for name, (info, _) in found.items()})
    names = {name for models in placed.values() for name in models}
    return {name: load_profile(models_dir, name) for name in sorted(names) if name in found}
