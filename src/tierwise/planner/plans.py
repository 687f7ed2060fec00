"""Plans: where one inference runs. Each plan kind is one small class behind `Plan`.

A plan owns the control flow of an inference (run here, send there, escalate when unsure);
the client owns the stages (`StageRunner`): running a model locally, calling a tier over
OIP v2, measuring both. A new kind of plan is one new class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass
class StageOutcome:
    """One stage's answer: calibrated class probabilities for the input."""

    probabilities: np.ndarray  # [classes], float64, sums to 1


class StageRunner(Protocol):
    """What a plan needs from whoever executes it (the device client)."""

    def run_local(self, model: str, image: np.ndarray) -> StageOutcome: ...

    def run_remote(self, tier: str, model: str, image: np.ndarray) -> StageOutcome: ...


class Plan(Protocol):
    """Where an inference runs. `describe` is the label traces and reports use."""

    def describe(self) -> str: ...

    def execute(self, runner: StageRunner, image: np.ndarray) -> StageOutcome: ...


@dataclass(frozen=True)
class Local:
    """Run `model` on the device."""

    model: str

    def describe(self) -> str:
        return f"local({self.model})"

    def execute(self, runner: StageRunner, image: np.ndarray) -> StageOutcome:
        return runner.run_local(self.model, image)


@dataclass(frozen=True)
class Remote:
    """Send the input to `tier` and run `model` there (OIP v2, binary tensors)."""

    tier: str
    model: str

    def describe(self) -> str:
        return f"remote({self.tier}:{self.model})"

    def execute(self, runner: StageRunner, image: np.ndarray) -> StageOutcome:
        return runner.run_remote(self.tier, self.model, image)


@dataclass(frozen=True)
class Cascade:
    """Run `first`; escalate to `then` only when its calibrated confidence is below
    `threshold` (Teerapittayanon et al., "BranchyNet", 2016; the joint inference of KubeEdge
    Sedna). The threshold comes from `tierwise.profile.cascade.choose_threshold`."""

    first: Local
    then: Remote
    threshold: float

    def describe(self) -> str:
        return f"cascade({self.first.describe()} -> {self.then.describe()} @ {self.threshold:.3f})"

    def execute(self, runner: StageRunner, image: np.ndarray) -> StageOutcome:
        outcome = self.first.execute(runner, image)
        if float(outcome.probabilities.max()) >= self.threshold:
            return outcome
        return self.then.execute(runner, image)
