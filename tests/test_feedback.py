"""What a client keeps for the samplers (`client.observations()`), and the user's feedback
(`client.feedback`), on real models: the device model alone, and a cascade escalating to a
real edge server on loopback, where both models' answers are at hand."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tierwise.active.samplers import Disagreement, Entropy, UserFeedback
from tierwise.client import Client, FeedbackError
from tierwise.config import Config, TierConfig
from tierwise.data import Splits
from tierwise.models.store import MODEL_FILE, load_info
from tierwise.planner.plans import Cascade, Local, Remote
from tierwise.runtime.session import OnnxModel, load_models
from tierwise.server.app import create_app, serve_in_thread

DEVICE, EDGE = "fmnist-device", "fmnist-edge"


def _client(config: Config, models_dir: Path, **kwargs: object) -> Client:
    return Client(config, models_dir=models_dir, probe=False, collector_url="", drift=False,
                  **kwargs)  # type: ignore[arg-type]


def test_feedback_marks_what_the_user_called_wrong(small_config: Config, models_dir: Path,
                                                   splits: Splits) -> None:
    with _client(small_config, models_dir) as client:
        results = [client.infer(image, Local(DEVICE)) for image in splits.test_x[:6]]
        observations = client.observations()
        assert [o.trace_id for o in observations] == [r.trace.id for r in results]
        for observation, result in zip(observations, results, strict=True):
            assert observation.device_label == result.label and observation.classes == 10
            np.testing.assert_allclose(observation.probabilities, result.probabilities)
            assert observation.confidence == pytest.approx(result.confidence)
        assert len(Entropy().select(client.observations(), 3)) == 3

        wrong = results[2]
        other = (wrong.label + 1) % 10
        client.feedback(wrong.trace.id, label=other)  # the right class: not the answer
        client.feedback(results[4].trace.id, correct=False)
        client.feedback(results[0].trace.id, correct=True, label=results[0].label)
        assert UserFeedback().select(client.observations(), 10) == [2, 4]
        assert client.observations()[2].feedback.label == other

        with pytest.raises(FeedbackError, match=r"trace_id: 'nope' is not one of this "
                                                r"client's last 1,000 inferences"):
            client.feedback("nope", correct=False)
        with pytest.raises(FeedbackError, match=r"label: expected a class index 0\.\.\.9, "
                                                r"got 10"):
            client.feedback(wrong.trace.id, label=10)
        with pytest.raises(FeedbackError, match="label: expected a class index"):
            client.feedback(wrong.trace.id, label=True)
        with pytest.raises(FeedbackError, match="give correct=True/False, or the right"):
            client.feedback(wrong.trace.id)
        with pytest.raises(FeedbackError, match=r"yet correct=True"):
            client.feedback(wrong.trace.id, correct=True, label=other)
        # nothing above changed what was recorded
        assert UserFeedback().select(client.observations(), 10) == [2, 4]


def test_an_escalated_cascade_keeps_both_answers_for_disagreement(
        small_config: Config, models_dir: Path, splits: Splits) -> None:
    images = splits.test_x[:40]
    device = OnnxModel(models_dir / DEVICE / MODEL_FILE, load_info(models_dir / DEVICE))
    edge = OnnxModel(models_dir / EDGE / MODEL_FILE, load_info(models_dir / EDGE))
    device_labels = device.run(images).argmax(1)
    edge_labels = edge.run(images).argmax(1)
    app = create_app("edge", TierConfig(), load_models(models_dir, names=[EDGE]))
    with serve_in_thread(app) as url, \
            _client(small_config, models_dir, tier_urls={"edge": url}) as client:
        always = Cascade(Local(DEVICE), Remote("edge", EDGE), threshold=1.01)
        for image in images:
            result = client.infer(image, always)
            assert result.trace.answered_by.tier == "edge"
        observations = client.observations()
    assert [o.device_label for o in observations] == list(device_labels)
    assert [o.server_label for o in observations] == list(edge_labels)
    # the device model's uncertainty is what is kept: it is the model labels improve
    probabilities = device.run(images[:1])[0]
    assert observations[0].probabilities.argmax() == probabilities.argmax()
    differ = [i for i in range(len(images)) if device_labels[i] != edge_labels[i]]
    print(f"{len(differ)} of {len(images)} answers differ")
    assert differ, "the one-epoch device and edge models disagree on some test images"
    assert sorted(Disagreement().select(observations, 100)) == differ
