"""The sample upload (device → label queue at the cloud), one pydantic model for both ends.

    POST /active/v1/samples   {"device": id, "samples": [sample, ...],
                               "feedback": [verdict, ...]}

A sample is one input a device's sampler selected (`tierwise.active.samplers`), as a NumPy
`.npy` file in base64 (`data`), with the sha256 of those bytes (its content address at the
cloud) and its trace: the model and version that answered, the sampler and its score, the
confidence, the device's and a server's answers and the user's feedback where known. The
label queue checks every sample before it stores any: the digest matches the bytes, the bytes
are an `.npy` array (no pickles), every label is one of the model's classes. A batch with one
bad sample is refused whole with 400 naming the field (`samples[2].data: ...`), so the device
sets it aside instead of sending it again. The user's verdicts on answers (`feedback`) travel
in the same request, outside the sample budget: they carry no input.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
from typing import Annotated

import numpy as np
from pydantic import Field, StringConstraints, ValidationError

from tierwise.protocol.traces import DeviceId, Name, _Document, describe_errors

MAX_SAMPLES_PER_BATCH = 1000
MAX_SAMPLE_BYTES = 16 * 1024 * 1024  # one input as .npy: a 2048x2048x3 uint8 frame fits
MAX_CLASSES = 1_000_000

Probability = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
ClassIndex = Annotated[int, Field(ge=0, lt=MAX_CLASSES)]
Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]


class SampleRecord(_Document):
    """One selected input and its trace (`tierwise.active.queue.QueuedSample`)."""

    trace_id: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    sampler: Annotated[str, StringConstraints(pattern=r"^[a-z0-9_-]{1,64}$")]
    score: Probability
    model: Name
    model_version: Annotated[str, StringConstraints(max_length=256)] = ""
    confidence: Probability | None = None
    device_label: ClassIndex | None = None
    server_label: ClassIndex | None = None
    feedback_correct: bool | None = None
    feedback_label: ClassIndex | None = None
    classes: Annotated[int, Field(ge=0, le=MAX_CLASSES)] = 0
    sha256: Sha256
    data: Annotated[str, StringConstraints(max_length=(MAX_SAMPLE_BYTES * 4) // 3 + 4)]


class FeedbackRecord(_Document):
    """What a user said of one answer (`client.feedback`): no input, only the verdict, so
    that the cloud can compare a canary's answers with the stable version's."""

    trace_id: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    model: Name
    model_version: Annotated[str, StringConstraints(max_length=256)] = ""
    correct: bool
    at: Annotated[float, Field(ge=0, le=1e10, allow_inf_nan=False)]  # epoch s


class SampleBatch(_Document):
    device: DeviceId
    samples: Annotated[list[SampleRecord], Field(max_length=MAX_SAMPLES_PER_BATCH)]
    feedback: Annotated[list[FeedbackRecord], Field(max_length=10 * MAX_SAMPLES_PER_BATCH,
                                                    default_factory=list)]


def encode_sample(sample: np.ndarray | bytes) -> tuple[str, str]:
    """(sha256, base64) of `sample` as the bytes of an `.npy` file (an array is saved first)."""
    if isinstance(sample, np.ndarray):
        buffer = io.BytesIO()
        np.save(buffer, sample, allow_pickle=False)
        sample = buffer.getvalue()
    return hashlib.sha256(sample).hexdigest(), base64.b64encode(sample).decode("ascii")


def decode_sample(record: SampleRecord, where: str = "sample") -> tuple[bytes, np.ndarray]:
    """(the `.npy` bytes, the array) of `record`; ValueError naming `where`'s field that is
    wrong: data not base64, not an `.npy` array, or not what its sha256 says."""
    try:
        raw = base64.b64decode(record.data, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{where}.data: not base64") from None
    if hashlib.sha256(raw).hexdigest() != record.sha256:
        raise ValueError(f"{where}.sha256: not the digest of data (sent {record.sha256})")
    try:
        array = np.load(io.BytesIO(raw), allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise ValueError(f"{where}.data: not a NumPy .npy array without objects ({error})") \
            from None
    if not isinstance(array, np.ndarray) or array.dtype.hasobject:
        raise ValueError(f"{where}.data: not a NumPy .npy array without objects")
    for field in ("device_label", "server_label", "feedback_label"):
        value = getattr(record, field)
        if value is not None and not value < record.classes:
            raise ValueError(f"{where}.{field}: {value} is not one of the model's "
                             f"{record.classes} classes (0...{record.classes - 1})")
    return raw, array


def parse_samples(body: bytes) -> tuple[SampleBatch, list[tuple[bytes, np.ndarray]]]:
    """The batch in `body` (JSON) and each sample's (bytes, array); ValueError naming the
    first field that is wrong (nothing of the batch is to be kept then)."""
    try:
        batch = SampleBatch.model_validate_json(body)
    except ValidationError as error:
        raise ValueError(describe_errors(error)) from None
    return batch, [decode_sample(record, f"samples[{i}]")
                   for i, record in enumerate(batch.samples)]
