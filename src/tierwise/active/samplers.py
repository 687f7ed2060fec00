"""Samplers: which inputs are worth a label. One class per method, behind one interface.

On the device, a `Sampler` scores each inference it has seen (an `Observation`: the task's
confidence, a classifier's class probabilities, the answers of the device and of a server
model, the user's feedback) and `select` keeps the best within a budget; nothing it does
not select leaves the device. At the cloud, `CoreSet` picks a batch of the candidates the
devices sent that covers them best, so a labelling budget is not spent on near-duplicates.

Every device sampler works for any task with a confidence (`Task.has_confidence`): where an
observation has no class probabilities (a detector), the uncertainty samplers fall back to
least confidence, 1 − confidence (Lewis & Gale, SIGIR 1994).

  entropy        Shannon entropy of the class probabilities, normalized to [0, 1]
                 (uncertainty sampling; Settles, "Active Learning Literature Survey", 2009)
  margin         1 − (p₁ − p₂), the two most probable classes' gap (Scheffer, Decomain &
                 Wrobel, "Active Hidden Markov Models for Information Extraction", IDA 2001)
  disagreement   the device model and a server model answered differently (query by
                 committee with a committee of two; Seung, Opper & Sompolinsky, COLT 1992);
                 free wherever a cascade escalated, since both answers are at hand
  feedback       the user said the answer was wrong (`client.feedback`)
  random         uniform, seeded: the baseline every other sampler is measured against
  core-set       (cloud) greedy k-center over embeddings (Sener & Savarese, "Active Learning
                 for Convolutional Neural Networks: A Core-Set Approach", ICLR 2018)
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np


@dataclass(frozen=True)
class Feedback:
    """What the user said of an answer: `correct`, and the right `label` when known."""

    correct: bool
    label: int | None = None


@dataclass(frozen=True)
class Observation:
    """One inference as a sampler sees it.

    confidence: the task's confidence in the answer, in [0, 1] (None: the task has none).
    probabilities: a classifier's calibrated class probabilities, float [classes], or None.
    device_label, server_label: the device model's and a server model's answers (class
        indices), each where it is known (both: a cascade that escalated); else None.
    feedback: the user's, if any.
    classes: how many classes the answer's model has (0: a task without classes)."""

    trace_id: str
    confidence: float | None = None
    probabilities: np.ndarray | None = None
    device_label: int | None = None
    server_label: int | None = None
    feedback: Feedback | None = None
    classes: int = 0


class Sampler(ABC):
    """Scores observations: higher is more worth a label, None is not a candidate at all.
    `select` takes the best `budget` of a window of them."""

    name: ClassVar[str]
    method: ClassVar[str]  # the paper or rule it implements

    @abstractmethod
    def score(self, observation: Observation) -> float | None:
        """How much a label for this input is worth, in [0, 1]; None: never selected."""

    def select(self, observations: Sequence[Observation], budget: int) -> list[int]:
        """Indices of the at most `budget` observations of highest score (earliest first
        among equal scores), in that order; never one scored None. ValueError for a
        negative budget."""
        if budget < 0:
            raise ValueError(f"budget: expected a count ≥ 0, got {budget}")
        scored = [(score, index) for index, observation in enumerate(observations)
                  if (score := self.score(observation)) is not None]
        scored.sort(key=lambda pair: (-pair[0], pair[1]))
        return [index for _, index in scored[:budget]]


class Uncertainty(Sampler):
    """An uncertainty sampler: a score from a classifier's class probabilities, else least
    confidence, 1 − confidence (Lewis & Gale 1994), for tasks without them."""

    def score(self, observation: Observation) -> float | None:
        p = observation.probabilities
        if p is not None and len(p) >= 2:
            return self.from_probabilities(np.asarray(p, dtype=np.float64))
        if observation.confidence is None:
            return None
        return float(min(max(1.0 - observation.confidence, 0.0), 1.0))

    @abstractmethod
    def from_probabilities(self, p: np.ndarray) -> float:
        """The score, in [0, 1], of class probabilities `p` (float64 [classes], classes ≥ 2)."""


class Entropy(Uncertainty):
    name = "entropy"
    method = "uncertainty sampling by entropy (Settles 2009); least confidence without " \
             "class probabilities (Lewis & Gale 1994)"

    def from_probabilities(self, p: np.ndarray) -> float:
        p = np.clip(p, 0.0, 1.0)
        p = p / p.sum() if p.sum() > 0 else np.full(len(p), 1.0 / len(p))
        nonzero = p[p > 0]
        return float(-(nonzero * np.log(nonzero)).sum() / math.log(len(p)))


class Margin(Uncertainty):
    name = "margin"
    method = "margin sampling (Scheffer, Decomain & Wrobel 2001); least confidence without " \
             "class probabilities (Lewis & Gale 1994)"

    def from_probabilities(self, p: np.ndarray) -> float:
        first, second = np.sort(p)[::-1][:2]
        return float(min(max(1.0 - (first - second), 0.0), 1.0))


class Disagreement(Sampler):
    name = "disagreement"
    method = "query by committee, a committee of the device and a server model (Seung, " \
             "Opper & Sompolinsky 1992)"

    def score(self, observation: Observation) -> float | None:
        if observation.server_label is None or observation.device_label is None:
            return None
        return 1.0 if observation.server_label != observation.device_label else None


class UserFeedback(Sampler):
    name = "feedback"
    method = "the user said the answer was wrong"

    def score(self, observation: Observation) -> float | None:
        feedback = observation.feedback
        if feedback is None:
            return None
        answered = observation.device_label if observation.server_label is None else \
            observation.server_label
        wrong = not feedback.correct or (
            feedback.label is not None and answered is not None and feedback.label != answered)
        return 1.0 if wrong else None


class Random(Sampler):
    """Uniform: each observation's score is drawn once, from a generator seeded with
    `seed` and the observation's trace id, so a selection is reproducible."""

    name = "random"
    method = "uniform random sampling (the baseline)"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def score(self, observation: Observation) -> float | None:
        digest = int.from_bytes(observation.trace_id.encode()[-16:].rjust(16, b"\0"), "big")
        return float(np.random.default_rng([self.seed, digest % (2**63)]).random())


class Combined(Sampler):
    """Several samplers as one: an observation's score is the best of theirs, and `best`
    says whose it was. A device's configured samplers (`active.samplers`) run this way, so
    feedback and disagreement (score 1) come before uncertainty."""

    name = "combined"
    method = "the best score of several samplers"

    def __init__(self, samplers: Sequence[Sampler]) -> None:
        if not samplers:
            raise ValueError("samplers: expected at least one sampler")
        self.samplers = list(samplers)

    def best(self, observation: Observation) -> tuple[float, str] | None:
        """(score, sampler name) of the sampler that scores `observation` highest (the
        first among equals); None when none makes it a candidate."""
        best: tuple[float, str] | None = None
        for sampler in self.samplers:
            score = sampler.score(observation)
            if score is not None and (best is None or score > best[0]):
                best = (score, sampler.name)
        return best

    def score(self, observation: Observation) -> float | None:
        best = self.best(observation)
        return None if best is None else best[0]


DEVICE_SAMPLERS: dict[str, type[Sampler]] = {
    sampler.name: sampler for sampler in (Entropy, Margin, Disagreement, UserFeedback, Random)}


def device_sampler(name: str) -> Sampler:
    """The device sampler called `name`; ValueError naming the known ones."""
    if name not in DEVICE_SAMPLERS:
        raise ValueError(f"sampler: expected one of {sorted(DEVICE_SAMPLERS)}, got {name!r}")
    return DEVICE_SAMPLERS[name]()


class CoreSet:
    """Greedy k-center over embeddings (Sener & Savarese, ICLR 2018): each pick is the
    candidate farthest (Euclidean) from everything labelled or picked so far, so the batch
    covers the candidates with the smallest radius the greedy 2-approximation finds."""

    name = "core-set"
    method = "core-set by greedy k-center (Sener & Savarese 2018)"

    def select(self, candidates: np.ndarray, budget: int,
               labelled: np.ndarray | None = None) -> list[int]:
        """Indices of at most `budget` rows of `candidates` (float [n, d]), in the order
        picked. `labelled` (float [m, d]): what is already labelled, which the batch need
        not cover again. ValueError for a negative budget or mismatched widths."""
        candidates = np.asarray(candidates, dtype=np.float64)
        if budget < 0:
            raise ValueError(f"budget: expected a count ≥ 0, got {budget}")
        if candidates.ndim != 2:
            raise ValueError(f"candidates: expected [n, d] embeddings, got shape "
                             f"{candidates.shape}")
        n = len(candidates)
        if n == 0 or budget == 0:
            return []
        if labelled is not None and len(labelled):
            labelled = np.asarray(labelled, dtype=np.float64)
            if labelled.ndim != 2 or labelled.shape[1] != candidates.shape[1]:
                raise ValueError(f"labelled: expected [m, {candidates.shape[1]}] embeddings, "
                                 f"got shape {labelled.shape}")
            nearest = np.min(_distances(candidates, labelled), axis=1)
            picked: list[int] = []
        else:  # nothing to cover yet: start from the candidate nearest the mean
            first = int(np.argmin(np.linalg.norm(candidates - candidates.mean(0), axis=1)))
            nearest = np.linalg.norm(candidates - candidates[first], axis=1)
            picked = [first]
        while len(picked) < min(budget, n):
            choice = int(np.argmax(nearest))
            if nearest[choice] <= 0 and picked:
                break  # everything left is a duplicate of what is covered
            picked.append(choice)
            nearest = np.minimum(nearest, np.linalg.norm(candidates - candidates[choice],
                                                         axis=1))
        return picked


class Badge:
    """Batch Active learning by Diverse Gradient Embeddings (Ash, Zhang, Krishnamurthy,
    Langford & Agarwal, ICLR 2020): each candidate's embedding is the gradient of the loss,
    at the model's own answer, with respect to the last layer's weights, (p − onehot(ŷ)) ⊗ h
    (its norm is the uncertainty); k-means++ seeding over them picks a batch that is both
    uncertain and diverse."""

    name = "badge"
    method = "BADGE: k-means++ over gradient embeddings (Ash et al. 2020)"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    @staticmethod
    def embeddings(probabilities: np.ndarray, features: np.ndarray) -> np.ndarray:
        """Gradient embeddings, float [n, classes × d], of class probabilities (float
        [n, classes]) and last-layer inputs (float [n, d])."""
        p = np.asarray(probabilities, dtype=np.float64)
        h = np.asarray(features, dtype=np.float64).reshape(len(p), -1)
        residual = p.copy()
        residual[np.arange(len(p)), p.argmax(1)] -= 1.0
        return (residual[:, :, None] * h[:, None, :]).reshape(len(p), -1)

    def select(self, embeddings: np.ndarray, budget: int) -> list[int]:
        """Indices of at most `budget` rows of `embeddings` (float [n, D]), in the order
        picked: the largest gradient first, then each next drawn with probability ∝ its
        squared distance to the nearest picked (k-means++, Arthur & Vassilvitskii 2007)."""
        g = np.asarray(embeddings, dtype=np.float64)
        if budget < 0:
            raise ValueError(f"budget: expected a count ≥ 0, got {budget}")
        if g.ndim != 2:
            raise ValueError(f"embeddings: expected [n, D], got shape {g.shape}")
        if len(g) == 0 or budget == 0:
            return []
        rng = np.random.default_rng(self.seed)
        picked = [int(np.argmax((g * g).sum(1)))]
        nearest = ((g - g[picked[0]]) ** 2).sum(1)
        while len(picked) < min(budget, len(g)):
            total = nearest.sum()
            if total <= 0:
                break  # everything left is a duplicate of what is picked
            choice = int(rng.choice(len(g), p=nearest / total))
            picked.append(choice)
            nearest = np.minimum(nearest, ((g - g[choice]) ** 2).sum(1))
        return picked


def _distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distances, [len(a), len(b)]."""
    squared = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
    return np.sqrt(np.maximum(squared, 0.0))
