"""The trace document (device → collector), one pydantic model for both ends.

A device writes `Trace.to_dict()` (`tierwise.client.trace`) and the collector validates each
batch it is sent against `TraceBatch` before storing anything: every field typed, every
number finite and within a bound a real inference can reach, every string and list of a
bounded length. A batch with one bad trace is refused whole with 400, naming the field
(`traces[3].stages[0].tier: Field required`), so the device sets it aside instead of sending
it again; what is stored can always be read back by the report and the dashboard.

Unknown fields are dropped (a newer device may send more); the collector stores the
validated document, not the bytes it was sent.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

# Bounds no real inference reaches; they keep stored numbers summable and printable.
MAX_MS = 1e9               # ~11.6 days
MAX_BYTES = 2**50          # 1 PiB
MAX_USD = 1e6
MAX_STAGES = 32
MAX_TRACES_PER_BATCH = 10_000

Milliseconds = Annotated[float, Field(ge=0, le=MAX_MS, allow_inf_nan=False)]
ByteCount = Annotated[int, Field(ge=0, le=MAX_BYTES)]
Usd = Annotated[float, Field(ge=0, le=MAX_USD, allow_inf_nan=False)]
Finite = Annotated[float, Field(ge=-1e12, le=1e12, allow_inf_nan=False)]
Name = Annotated[str, StringConstraints(min_length=1, max_length=256)]
Text = Annotated[str, StringConstraints(max_length=4096)]
# The one rule for names that become file names and get printed (device ids, model names,
# versions): these characters only (`tierwise.registry.subscriber.check_device_id`).
PLAIN_CHARACTERS = "A-Za-z0-9._@-"
DeviceId = Annotated[str, StringConstraints(pattern=rf"^[{PLAIN_CHARACTERS}]{{1,128}}$")]


class _Document(BaseModel):
    # strict: "abc" is not a batch size and 1.5 is not a label; JSON numbers still fill floats
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


class StageRecord(_Document):
    """One stage of an inference (`tierwise.client.trace.StageTrace`)."""

    kind: Literal["local", "remote"]
    tier: Name
    model: Name
    model_version: Annotated[str, StringConstraints(max_length=256)]
    total_ms: Milliseconds
    compute_ms: Milliseconds
    queue_ms: Milliseconds = 0.0
    network_ms: Milliseconds = 0.0
    bytes_up: ByteCount = 0
    bytes_down: ByteCount = 0
    batch_size: Annotated[int, Field(ge=1, le=1_000_000)] = 1
    codec: Name | None = None
    cost_usd: Usd = 0.0
    error: Text | None = None


class SloRecord(_Document):
    # a deadline of infinity travels as null: no deadline
    deadline_ms: Milliseconds | None = None
    min_accuracy: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] = 0.0
    keep_input_on_device: bool = False
    regions: Annotated[list[Text], Field(max_length=64)] | None = None  # data residency


class TraceRecord(_Document):
    """One inference (`tierwise.client.trace.Trace.to_dict()`)."""

    id: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    plan: Text
    stages: Annotated[list[StageRecord], Field(max_length=MAX_STAGES)]
    started_at: Annotated[float, Field(ge=0, le=1e10, allow_inf_nan=False)]  # epoch s
    total_ms: Milliseconds
    label: Annotated[int, Field(ge=-(2**31), le=2**31 - 1)] | None = None
    confidence: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] | None = None
    input_mean: Finite | None = None
    input_std: Finite | None = None
    drift_alerts: Annotated[list[dict[str, Any]], Field(max_length=64)] = []
    fallback: Text | None = None
    attempts: Annotated[list[Text], Field(max_length=MAX_STAGES)] = []
    slo: SloRecord | None = None
    decision: dict[str, Any] | None = None
    hedge: dict[str, Any] | None = None
    emulated: Annotated[list[Text], Field(max_length=32)] = []
    escalated: bool = False
    bytes_up: ByteCount = 0
    bytes_down: ByteCount = 0
    cost_usd: Usd = 0.0

    @property
    def answered_by(self) -> StageRecord | None:
        """The last stage that answered (None if every stage failed)."""
        answered = [stage for stage in self.stages if stage.error is None]
        return answered[-1] if answered else None

    @property
    def deadline_missed(self) -> bool:
        deadline = self.slo.deadline_ms if self.slo else None
        return deadline is not None and math.isfinite(deadline) and self.total_ms > deadline


class TraceBatch(_Document):
    """`POST /telemetry/v1/traces`: {"device": id, "traces": [trace, ...]}."""

    device: DeviceId
    traces: Annotated[list[TraceRecord], Field(max_length=MAX_TRACES_PER_BATCH)]


def parse_batch(body: bytes) -> TraceBatch:
    """The batch in `body` (JSON); ValueError naming the first fields that are wrong."""
    try:
        return TraceBatch.model_validate_json(body)
    except ValidationError as error:
        raise ValueError(describe_errors(error)) from None


def describe_errors(error: ValidationError, most: int = 3) -> str:
    """`traces[3].stages[0].tier: Field required; ...` (the first `most` problems)."""
    problems = []
    for item in error.errors()[:most]:
        where = ""
        for part in item["loc"]:
            where += f"[{part}]" if isinstance(part, int) else (f".{part}" if where else part)
        problems.append(f"{where or 'body'}: {item['msg']}")
    more = error.error_count() - len(problems)
    return "; ".join(problems) + (f" (and {more} more)" if more > 0 else "")
