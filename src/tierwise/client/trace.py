"""`Trace`: where each stage of one inference ran, what it took, what it moved, what it cost."""

from __future__ import annotations

import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class StageTrace:
    """One stage. For a remote stage, `network_ms` is the round trip minus the server's time."""

    kind: str              # "local" or "remote"
    tier: str              # "device", "edge", "cloud"
    model: str
    model_version: str
    total_ms: float        # as the device saw it, start to answer
    compute_ms: float      # model execution (device: × compute_scale; server: from its header)
    queue_ms: float = 0.0  # waiting in the server's batcher
    network_ms: float = 0.0
    bytes_up: int = 0
    bytes_down: int = 0
    batch_size: int = 1
    codec: str | None = None  # how the tensor travelled (remote stages)
    cost_usd: float = 0.0
    error: str | None = None


def _trace_id() -> str:
    return uuid.uuid4().hex


@dataclass
class Trace:
    plan: str
    stages: list[StageTrace] = field(default_factory=list)
    id: str = field(default_factory=_trace_id)  # unique: the collector stores each id once
    started_at: float = field(default_factory=time.time)  # epoch seconds
    label: int | None = None        # the answer, and how sure of it (calibrated)
    confidence: float | None = None
    input_mean: float | None = None  # of the input's pixels, 0..1: drift statistics (the
    input_std: float | None = None   # input itself never leaves the device)
    drift_alerts: list[dict[str, Any]] = field(default_factory=list)  # raised by this one
    total_ms: float = 0.0
    fallback: str | None = None  # why the plan did not run as chosen, if it did not
    attempts: list[str] = field(default_factory=list)  # plans tried after the first failed
    slo: dict[str, Any] = field(default_factory=dict)
    decision: dict[str, Any] | None = None  # the policy's prediction, when it chose the plan
    # a hedged request: the second plan, when it started, and whether it answered first
    hedge: dict[str, Any] | None = None
    emulated: tuple[str, ...] = ()

    @property
    def escalated(self) -> bool:
        """A cascade that went past its first stage."""
        return self.plan.startswith("cascade") and len(self.answered_stages) > 1

    @property
    def answered_stages(self) -> list[StageTrace]:
        return [stage for stage in self.stages if stage.error is None]

    @property
    def answered_by(self) -> StageTrace:
        return self.answered_stages[-1]

    @property
    def deadline_missed(self) -> bool:
        return bool(self.slo) and self.total_ms > self.slo["deadline_ms"]

    @property
    def bytes_up(self) -> int:
        return sum(stage.bytes_up for stage in self.stages)

    @property
    def bytes_down(self) -> int:
        return sum(stage.bytes_down for stage in self.stages)

    @property
    def cost_usd(self) -> float:
        return sum(stage.cost_usd for stage in self.stages)

    def to_dict(self) -> dict[str, Any]:
        record = asdict(self)
        record.update(escalated=self.escalated, bytes_up=self.bytes_up,
                      bytes_down=self.bytes_down, cost_usd=self.cost_usd)
        return record
