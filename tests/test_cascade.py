from pathlib import Path

import numpy as np
import pytest

from tierwise.bench.processes import tier_server
from tierwise.client import Client
from tierwise.config import Config
from tierwise.data import Splits
from tierwise.planner.plans import Cascade, Local, Remote
from tierwise.profile.calibration import fit_temperature, softmax
from tierwise.profile.cascade import cascade_curve, choose_threshold
from tierwise.runtime.session import load_models


def test_threshold_is_the_fewest_escalations_meeting_the_target() -> None:
    confidence = np.array([0.30, 0.50, 0.55, 0.90, 0.95, 0.99])
    first_correct = np.array([0, 0, 1, 1, 1, 1], dtype=bool)
    then_correct = np.array([1, 1, 1, 1, 1, 0], dtype=bool)
    choice = choose_threshold(confidence, first_correct, then_correct, margin_points=0.0)
    # escalating the least confident one already reaches 5/6, the cloud model's accuracy
    assert choice.threshold == pytest.approx(0.50)
    assert choice.expected_escalation_rate == pytest.approx(1 / 6)
    assert choice.expected_accuracy == pytest.approx(5 / 6)
    # a 20-point margin needs no escalation at all (the device alone has 4/6)
    lenient = choose_threshold(confidence, first_correct, then_correct, margin_points=20.0)
    assert lenient.expected_escalation_rate == 0 and lenient.threshold == pytest.approx(0.30)
    _, accuracy, escalation = cascade_curve(confidence, first_correct, then_correct)
    assert escalation[0] == 0 and escalation[-1] == 1
    assert accuracy[0] == pytest.approx(4 / 6) and accuracy[-1] == pytest.approx(5 / 6)


def test_temperature_fit_recovers_the_scale_of_overconfident_logits() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=2.0, size=(5000, 10))
    # labels drawn from softmax(logits): these logits are calibrated at T=1 by construction
    probs = softmax(logits)
    labels = (probs.cumsum(axis=1) > rng.random((5000, 1))).argmax(axis=1)
    assert fit_temperature(logits * 5, labels) == pytest.approx(5.0, rel=0.1)
    assert fit_temperature(logits, labels) == pytest.approx(1.0, rel=0.1)


def test_cascade_escalates_exactly_the_low_confidence_inputs(
    small_config: Config, models_dir: Path, splits: Splits
) -> None:
    images = splits.test_x[:150]
    device = load_models(models_dir, names=["fmnist-device"])["fmnist-device"]
    confidence = softmax(device.run(images), device.info.temperature).max(axis=1)
    threshold = float(np.median(confidence))  # half should escalate
    plan = Cascade(Local("fmnist-device"), Remote("cloud", "fmnist-cloud"), threshold)
    with tier_server("cloud", models_dir) as url, Client(
        small_config, tier_urls={"cloud": url}
    ) as client:
        escalated = np.array([client.infer(image, plan).trace.escalated for image in images])
        results = [client.infer(image, plan) for image in images[:20]]
    np.testing.assert_array_equal(escalated, confidence < threshold)
    assert 0 < escalated.sum() < len(images)
    for result, conf in zip(results, confidence[:20], strict=True):
        tiers = [stage.tier for stage in result.trace.stages]
        assert tiers == (["device", "cloud"] if conf < threshold else ["device"])
        assert (result.trace.bytes_up > 784) == (conf < threshold)
