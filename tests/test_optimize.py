"""`tierwise optimize`: INT8, pruning, distillation, learned bottlenecks, and the planner using
what they make — on real ONNX models trained on real Fashion-MNIST (a small subset)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest

from tierwise.bench.processes import tier_server
from tierwise.client import Client
from tierwise.codecs import PackedBits, load_bottleneck
from tierwise.config import (
    BottleneckConfig,
    Config,
    DistillConfig,
    LinkConfig,
    TrainConfig,
    config_from_dict,
)
from tierwise.data import Splits
from tierwise.models.store import list_models
from tierwise.net.shaping import EmulatedLink
from tierwise.optimize.bottleneck import train_bottlenecks
from tierwise.optimize.distill import distill
from tierwise.optimize.prune import prune_model
from tierwise.optimize.quantize import quantize_model
from tierwise.optimize.report import build_report
from tierwise.planner.cost import PriceTable
from tierwise.planner.estimators import LinkEstimator
from tierwise.planner.plans import Remote, Split
from tierwise.planner.policy import SLO, PlanningState, Policy, candidates_from_profiles
from tierwise.profile.model_profile import load_tier_profiles
from tierwise.profile.profiler import ensure_profiles
from tierwise.runtime.session import load_models

QUICK = TrainConfig(epochs=1, learning_rate=0.005, train_subset=3000)


@pytest.fixture(scope="module")
def config(small_config: Config, models_dir: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Config:
    """The session's small zoo, copied: variants registered here stay out of other tests."""
    data_dir = tmp_path_factory.mktemp("optimize-data")
    shutil.copytree(models_dir, data_dir / "models")
    return config_from_dict({**small_config.model_dump(), "data_dir": str(data_dir)})


@pytest.fixture(scope="module")
def bottlenecks(config: Config, splits: Splits) -> Iterator[list]:
    settings = BottleneckConfig(model="fmnist-cloud", widths=[2], bits=[4], train=QUICK)
    outcomes = train_bottlenecks(config.models_dir, settings, splits)
    ensure_profiles(config)
    yield outcomes


def test_int8_variant_is_registered_smaller_and_profiled(config: Config, splits: Splits) -> None:
    outcomes = quantize_model(config.models_dir, "fmnist-edge", splits, calibration_images=128,
                              accuracy_budget=0.05)
    found = list_models(config.models_dir)
    parent_bytes = found["fmnist-edge"][0].bytes
    for outcome in outcomes:
        assert outcome.kept, outcome.reason
        info, path = found[outcome.name]
        assert (info.parent, info.variant) == ("fmnist-edge", outcome.variant)
        assert path.stat().st_size < 0.4 * parent_bytes
        ops = {node.op_type for node in onnx.load(str(path)).graph.node}
        assert ops & {"QuantizeLinear", "DynamicQuantizeLinear", "ConvInteger", "MatMulInteger"}
    ensure_profiles(config)
    profiles = load_tier_profiles(config, config.models_dir)
    assert {o.name for o in outcomes} <= set(profiles)
    plans = {c.plan for c in candidates_from_profiles(config, profiles)}
    assert Remote("edge", "fmnist-edge.int8-static") in plans  # the planner may choose it


def test_a_variant_over_the_accuracy_budget_is_rejected_and_removed(
        config: Config, splits: Splits) -> None:
    kept = quantize_model(config.models_dir, "fmnist-device", splits, kinds=("int8-dynamic",),
                          accuracy_budget=0.05)[0]
    assert kept.kept and kept.name in list_models(config.models_dir)
    # a budget no variant can meet (it would have to gain 50 points): rejected, and the
    # variant an earlier run registered under that name is no longer served
    rejected = quantize_model(config.models_dir, "fmnist-device", splits,
                              kinds=("int8-dynamic",), accuracy_budget=-0.5)[0]
    assert not rejected.kept and "budget" in rejected.reason
    assert rejected.name not in list_models(config.models_dir)
    assert not (config.models_dir / rejected.name).exists()


def test_pruning_really_removes_channels(config: Config, splits: Splits) -> None:
    outcome = prune_model(config.models_dir, "fmnist-device", splits, 0.5, QUICK,
                          accuracy_budget=1.0)
    assert outcome.kept
    details = outcome.details
    assert details["conv_widths"] == [w // 2 for w in details["conv_widths_before"]]
    assert outcome.parameters < 0.4 * details["parameters_before"]
    assert details["macs"] < 0.4 * details["macs_before"]
    found = list_models(config.models_dir)
    pruned, parent = found[outcome.name], found["fmnist-device"]
    assert pruned[1].stat().st_size < 0.5 * parent[1].stat().st_size
    # the tensors themselves are smaller: the first conv's weight has half the filters
    first_conv = next(i for i in onnx.load(str(pruned[1])).graph.initializer if len(i.dims) == 4)
    assert first_conv.dims[0] == 8
    model = load_models(config.models_dir, names=[outcome.name])[outcome.name]
    assert model.run(splits.test_x[:4]).shape == (4, 10)


def test_distillation_registers_the_student_beside_a_label_only_twin(
        config: Config, splits: Splits) -> None:
    settings = DistillConfig(teacher="fmnist-cloud", student="device", train=QUICK)
    result = distill(config.models_dir, settings, splits, accuracy_budget=1.0)
    assert result.distilled.name == "fmnist-device.distilled" and result.distilled.kept
    # both learned (chance is 10%): this budget is far too small to rank them
    assert result.label_only_test_accuracy > 0.3 and result.distilled.test_accuracy > 0.3
    info = list_models(config.models_dir)["fmnist-device.distilled"][0]
    assert info.parent == "fmnist-device"
    assert info.training_record().record["alpha"] == settings.alpha


def test_learned_bottleneck_round_trips_what_it_claims(
        config: Config, splits: Splits, bottlenecks: list) -> None:
    (outcome,) = bottlenecks
    assert outcome.registered and outcome.bytes_per_image == 9  # 2 × 3 × 3 codes of 4 bits
    codec = load_bottleneck(config.models_dir, "fmnist-cloud", 4, "w2-4bit", 4)
    models = load_models(config.models_dir)
    features = models["fmnist-cloud.head@4"].run(splits.test_x[:32])
    payloads = codec.encode_batch(features)
    assert all(len(p) == 9 for p in payloads)
    # the codes round-trip exactly through the packing
    codes = models["fmnist-cloud.head@4.bottleneck-w2-4bit"].run(splits.test_x[:32])
    packing = PackedBits(4)
    for row, payload in zip(codes, payloads, strict=True):
        assert payload == packing.encode(row)
        np.testing.assert_array_equal(packing.decode(payload, row.shape, np.uint8), row)
    # the fused head/tail compute what the codec and the fine-tuned tail compute
    logits = models["fmnist-cloud.tail@4.bottleneck-w2-4bit"].run(codes)
    decoded = codec.decode_batch(payloads)
    assert decoded.shape == features.shape
    assert (logits.argmax(1) == splits.test_y[:32]).mean() >= 0.5
    assert abs(outcome.test_accuracy - outcome.uncompressed_test_accuracy) < 0.2


def test_planner_picks_the_learned_bottleneck_when_bandwidth_is_low(
        config: Config, splits: Splits, bottlenecks: list) -> None:
    # the floor is the bottleneck split's accuracy, above the device model's: at 2 KB/s only
    # the 9-byte bottleneck split meets it in time
    profiles = load_tier_profiles(config, config.models_dir)
    floor = profiles["fmnist-cloud"].split(4, "bottleneck-w2-4bit").codecs["packed-4bit"].accuracy
    assert profiles["fmnist-device"].accuracy < floor - 0.02  # the zoo's premise, checked
    policy = Policy(candidates_from_profiles(config, profiles), PriceTable.of(config))
    slow = LinkConfig(bandwidth_up="2KB/s", bandwidth_down="2KB/s", rtt_ms=20)
    state = PlanningState(links={t: LinkEstimator(slow).snapshot() for t in ("edge", "cloud")})
    # at 2 KB/s the bottleneck's 9 bytes are the smallest payload of any remote plan: give
    # the request just the time that plan is predicted to need
    predicted = policy.predict(SLO(deadline_ms=1e6, min_accuracy=floor), state)
    bottleneck_ms = next(latency for plan, (latency, _, _) in predicted.items()
                         if isinstance(plan, Split) and plan.bottleneck)
    decision = policy.choose(SLO(deadline_ms=bottleneck_ms * 1.05, min_accuracy=floor), state)
    assert decision.feasible
    assert isinstance(decision.plan, Split) and decision.plan.bottleneck == "bottleneck-w2-4bit"
    # and executed over a real, emulated 2 KB/s link, it answers within the deadline
    with tier_server("cloud", config.models_dir) as cloud, Client(
            config, tier_urls={"cloud": cloud}, probe=False,
            links={"cloud": EmulatedLink(slow), "edge": None}) as client:
        for image in splits.test_x[:3]:
            result = client.infer(image, decision.plan)
            assert result.trace.fallback is None
            remote = result.trace.stages[-1]
            assert remote.model == "fmnist-cloud.tail@4.bottleneck-w2-4bit"
            assert remote.codec == "packed-4bit"


def test_report_writes_the_frontier_and_the_variants(
        config: Config, bottlenecks: list, tmp_path: Path) -> None:
    report = build_report(config, tmp_path, test_images=500)
    kinds = {row["kind"] for row in report["rate_accuracy"]}
    assert kinds == {"input", "feature", "learned"}
    learned = [r for r in report["rate_accuracy"] if r["kind"] == "learned"]
    assert learned[0]["bytes"] == 9 and learned[0]["reduction_vs_raw_image"] > 80
    assert {"fmnist-device", "fmnist-edge", "fmnist-cloud"} <= {
        r["model"] for r in report["models"]}
    for name in ("optimize_report.json", "rate_accuracy.png", "latency_accuracy.png"):
        assert (tmp_path / name).stat().st_size > 1000


def test_optimize_bottleneck_runs_from_the_command_line(config: Config, tmp_path: Path) -> None:
    from tierwise.cli import main

    config_file = tmp_path / "tierwise.toml"
    config_file.write_text(
        f'data_dir = "{config.data_dir}"\n'
        f"[data]\nvalidation_size = {config.data.validation_size}\n"
        "[optimize.bottleneck]\nwidths = [1]\nbits = [8]\n"
        "[optimize.bottleneck.train]\nepochs = 0.2\ntrain_subset = 1000\n")
    out = tmp_path / "out"
    assert main(["--config", str(config_file), "optimize", "bottleneck", "--out", str(out)]) == 0
    (row,) = json.loads((out / "bottleneck.json").read_text())
    assert (row["width"], row["bits"], row["bytes_per_image"]) == (1, 8, 9)
