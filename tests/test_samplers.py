"""The samplers: each method's score on inputs whose answer is known by construction, and
the cloud's core-set against the covering radius it promises."""

from __future__ import annotations

import numpy as np
import pytest

from tierwise.active.samplers import (
    DEVICE_SAMPLERS,
    CoreSet,
    Disagreement,
    Entropy,
    Feedback,
    Margin,
    Observation,
    Random,
    UserFeedback,
    device_sampler,
)


def _probabilities(*rows: list[float]) -> list[Observation]:
    return [Observation(f"t{i}", confidence=max(row), probabilities=np.array(row),
                        device_label=int(np.argmax(row))) for i, row in enumerate(rows)]


def test_entropy_prefers_the_flattest_answer_and_is_normalized() -> None:
    sure, unsure, flat = _probabilities([0.98, 0.01, 0.01], [0.5, 0.4, 0.1],
                                        [1 / 3, 1 / 3, 1 / 3])
    entropy = Entropy()
    assert entropy.score(flat) == pytest.approx(1.0)
    assert entropy.score(sure) < entropy.score(unsure) < entropy.score(flat)
    assert entropy.select([sure, unsure, flat], 2) == [2, 1]


def test_margin_ranks_by_the_gap_between_the_two_most_probable_classes() -> None:
    # entropy and margin disagree here: a close two-way call beats a spread-out one
    close_pair, spread = _probabilities([0.45, 0.44, 0.11], [0.4, 0.2, 0.2, 0.2])
    assert Margin().score(close_pair) == pytest.approx(0.99)
    assert Margin().score(spread) == pytest.approx(0.8)
    assert Margin().select([spread, close_pair], 1) == [1]
    assert Entropy().select([spread, close_pair], 1) == [0]


def test_without_probabilities_uncertainty_is_least_confidence() -> None:
    # a detector: a confidence, no class probabilities
    boxes = [Observation("a", confidence=0.9), Observation("b", confidence=0.2),
             Observation("c")]  # a task without a confidence: never a candidate
    for sampler in (Entropy(), Margin()):
        assert sampler.score(boxes[1]) == pytest.approx(0.8)
        assert sampler.select(boxes, 5) == [1, 0]


def test_disagreement_selects_only_where_the_two_models_answered_differently() -> None:
    observations = [Observation("same", device_label=3, server_label=3),
                    Observation("differ", device_label=3, server_label=5),
                    Observation("not escalated", device_label=3)]
    assert Disagreement().select(observations, 10) == [1]


def test_feedback_selects_what_the_user_called_wrong() -> None:
    observations = [Observation("ok", device_label=1, feedback=Feedback(True)),
                    Observation("wrong", device_label=1, feedback=Feedback(False)),
                    Observation("relabelled", device_label=1, feedback=Feedback(True, 4)),
                    Observation("silent", device_label=1)]
    assert UserFeedback().select(observations, 10) == [1, 2]


def test_random_is_reproducible_and_uniform() -> None:
    observations = [Observation(f"trace-{i}") for i in range(2000)]
    first = Random(seed=7).select(observations, 100)
    assert first == Random(seed=7).select(observations, 100)
    assert first != Random(seed=8).select(observations, 100)
    scores = np.array([Random(seed=7).score(o) for o in observations])
    assert 0.45 < scores.mean() < 0.55 and scores.min() >= 0 and scores.max() < 1
    # no bias towards early or late arrivals
    assert 800 < np.mean(first) * 2 < 3200


def test_a_selection_never_exceeds_the_budget_and_a_bad_budget_is_named() -> None:
    observations = _probabilities(*([[0.5, 0.5]] * 10))
    assert len(Entropy().select(observations, 3)) == 3
    assert Entropy().select(observations, 0) == []
    assert Entropy().select(observations, 3) == [0, 1, 2]  # ties: earliest first
    with pytest.raises(ValueError, match="budget: expected a count ≥ 0, got -1"):
        Entropy().select(observations, -1)
    assert set(DEVICE_SAMPLERS) == {"entropy", "margin", "disagreement", "feedback", "random"}
    assert isinstance(device_sampler("margin"), Margin)
    with pytest.raises(ValueError, match=r"sampler: expected one of \[.*'random'.*\], "
                                         r"got 'badge'"):
        device_sampler("badge")


def test_core_set_covers_the_candidates_better_than_random_picks() -> None:
    rng = np.random.default_rng(0)
    # five tight clusters, very unequal in size: random picks land in the big one
    centers = rng.normal(0, 10, size=(5, 8))
    sizes = [400, 20, 20, 20, 20]
    points = np.vstack([center + rng.normal(0, 0.1, size=(n, 8))
                        for center, n in zip(centers, sizes, strict=True)])
    cluster = np.repeat(np.arange(5), sizes)
    picked = CoreSet().select(points, 5)
    assert len(picked) == 5 and sorted(set(cluster[picked])) == [0, 1, 2, 3, 4]

    def radius(chosen: list[int]) -> float:
        return float(np.max(np.min(np.linalg.norm(
            points[:, None] - points[chosen][None], axis=2), axis=1)))

    randoms = [radius(list(rng.choice(len(points), 5, replace=False))) for _ in range(20)]
    assert radius(picked) < 1.0 < np.median(randoms)
    # what is already labelled need not be covered again
    labelled = points[cluster == 0][:3]
    again = CoreSet().select(points, 4, labelled=labelled)
    assert 0 not in set(cluster[again]) and sorted(set(cluster[again])) == [1, 2, 3, 4]
    # duplicates end the batch early rather than picking the same point twice
    assert CoreSet().select(np.zeros((10, 3)), 5) == [0]
    with pytest.raises(ValueError, match=r"labelled: expected \[m, 8\] embeddings"):
        CoreSet().select(points, 2, labelled=np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"candidates: expected \[n, d\] embeddings"):
        CoreSet().select(np.zeros(4), 2)
