"""Plans: where one inference runs. Each plan kind is one small class behind `Plan`.

A plan owns the control flow of an inference (run here, send there, cut the model, escalate
when unsure); the client owns the stages (`StageRunner`): running a model on the device,
calling a tier over OIP v2 through its link, measuring both. A new kind of plan is one new
class, and the policy (`tierwise.planner.policy`) scores it from the `Candidate` that
`candidates_from_profiles` makes of it (predicted quality, compute and payload bytes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from tierwise.codecs import RAW


class RemoteStageError(RuntimeError):
    """A remote stage gave no usable answer: unreachable, timed out, past its deadline, or an
    error status. `tier_down` says whether the tier itself looks unreachable."""

    def __init__(self, message: str, tier: str, tier_down: bool = False,
                 retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.tier = tier
        self.tier_down = tier_down
        # the tier is up but overloaded (429): it asked for this long before the next try
        self.retry_after_s = retry_after_s


@dataclass
class StageOutcome:
    """One stage's answer: the task's result for the input (`tierwise.tasks`: a
    ClassificationResult, DetectionResult, ...) and how sure it is (None where the task has no
    confidence: such a result is never escalated)."""

    result: Any
    confidence: float | None
    fallback: str | None = None  # set when the plan answered other than it was meant to
    escalated: bool | None = None  # a cascade's: whether its first stage handed the input on
    first: StageOutcome | None = None  # an escalated cascade's first stage: its answer too


class StageRunner(Protocol):
    """What a plan needs from whoever executes it (the device client)."""

    def run_local(self, model: str, tensor: np.ndarray) -> dict[str, np.ndarray]:
        """The model's outputs on the device (output name -> batch). A whole model or a head
        takes the request's input (prepared for it: resized where it takes images); a tail
        takes the features its head made."""
        ...

    def run_remote(self, tier: str, model: str, tensor: np.ndarray,
                   codec: str) -> dict[str, np.ndarray]:
        """The model's outputs on `tier`, the input sent encoded with `codec`."""
        ...

    def outcome(self, model: str, outputs: dict[str, np.ndarray]) -> StageOutcome:
        """`model`'s outputs read by its task: the result and its confidence."""
        ...


class Plan(Protocol):
    """Where an inference runs. `describe` is the label traces and reports use."""

    def describe(self) -> str: ...

    def execute(self, runner: StageRunner, image: np.ndarray) -> StageOutcome: ...

    @property
    def tiers(self) -> frozenset[str]:
        """The remote tiers it may call."""
        ...

    @property
    def sends_raw_input(self) -> bool:
        """Whether the input itself may leave the device."""
        ...


@dataclass(frozen=True)
class Local:
    """Run `model` on the device."""

    model: str

    def describe(self) -> str:
        return f"local({self.model})"

    def execute(self, runner: StageRunner, image: np.ndarray) -> StageOutcome:
        return runner.outcome(self.model, runner.run_local(self.model, image))

    @property
    def tiers(self) -> frozenset[str]:
        return frozenset()

    @property
    def sends_raw_input(self) -> bool:
        return False


@dataclass(frozen=True)
class Remote:
    """Send the input to `tier`, encoded with `input_codec`, and run `model` there."""

    tier: str
    model: str
    input_codec: str = RAW

    def describe(self) -> str:
        codec = "" if self.input_codec == RAW else f", {self.input_codec}"
        return f"remote({self.tier}:{self.model}{codec})"

    def execute(self, runner: StageRunner, image: np.ndarray) -> StageOutcome:
        outputs = runner.run_remote(self.tier, self.model, image, self.input_codec)
        return runner.outcome(self.model, outputs)

    @property
    def tiers(self) -> frozenset[str]:
        return frozenset((self.tier,))

    @property
    def sends_raw_input(self) -> bool:
        return True


@dataclass(frozen=True)
class Split:
    """Run blocks [0, split_point) of `model` on the device, send the features encoded with
    `feature_codec`, and run the rest on `tier` as the model `<model>.tail@<k>` (Neurosurgeon,
    Kang et al. 2017; feature compression as in BottleNet++, Shao & Zhang 2020). The raw
    input never leaves the device."""

    tier: str
    model: str
    split_point: int
    feature_codec: str = RAW
    # a learned bottleneck at the cut (`tierwise optimize bottleneck`): its encoder is fused
    # into the head, its decoder into the tail, and `feature_codec` packs its codes
    bottleneck: str | None = None

    @property
    def head(self) -> str:
        suffix = f".{self.bottleneck}" if self.bottleneck else ""
        return f"{self.model}.head@{self.split_point}{suffix}"

    @property
    def tail(self) -> str:
        suffix = f".{self.bottleneck}" if self.bottleneck else ""
        return f"{self.model}.tail@{self.split_point}{suffix}"

    def describe(self) -> str:
        codec = self.bottleneck or self.feature_codec
        return f"split({self.model}@{self.split_point} -> {self.tier}, {codec})"

    def execute(self, runner: StageRunner, image: np.ndarray) -> StageOutcome:
        (features,) = runner.run_local(self.head, image).values()
        outputs = runner.run_remote(self.tier, self.tail, features, self.feature_codec)
        return runner.outcome(self.model, outputs)

    @property
    def tiers(self) -> frozenset[str]:
        return frozenset((self.tier,))

    @property
    def sends_raw_input(self) -> bool:
        return False


@dataclass(frozen=True)
class Cascade:
    """Run `first`; escalate to `then` only when its task's confidence is below `threshold`
    (BranchyNet, Teerapittayanon et al. 2016; the joint inference of KubeEdge Sedna;
    FrugalGPT's cascade). The threshold comes from the first model's cascade curve.

    If the escalation fails, the first stage's answer stands: it is already in hand."""

    first: Local
    then: Remote | Split
    threshold: float

    def describe(self) -> str:
        return f"cascade({self.first.describe()} -> {self.then.describe()} @ {self.threshold:.3f})"

    def execute(self, runner: StageRunner, image: np.ndarray) -> StageOutcome:
        outcome = self.first.execute(runner, image)
        if outcome.confidence is None or outcome.confidence >= self.threshold:
            outcome.escalated = False
            return outcome
        outcome.escalated = True
        try:
            escalated = self.then.execute(runner, image)
        except RemoteStageError as error:
            outcome.fallback = (f"escalation to {error.tier} failed ({error}); answered with "
                                f"the first stage")
            return outcome
        escalated.escalated = True
        escalated.first = outcome  # both models' answers: free disagreement for sampling
        return escalated

    @property
    def tiers(self) -> frozenset[str]:
        return self.then.tiers

    @property
    def sends_raw_input(self) -> bool:
        return self.then.sends_raw_input
