"""The device's sample queue: inputs a sampler selected, kept on disk until they may be
sent, and sent only within the device's budget.

A budget is a count and a number of bytes per sliding window (an hour, a day): what was sent
in the last `period_s` counts against it, so a device never uploads more than the budget in
any window of that length. What is due goes highest score first (the most informative
samples, by the sampler that chose them), oldest first among equal scores. The queue is an
SQLite file (`tierwise.database`), so it survives restarts and outages: a sample leaves it
only when `mark_sent` records that the cloud took it. Only what a sampler selected is ever
put in it (`offer`); nothing else of the device's inputs is stored.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson

from tierwise.active.samplers import Observation
from tierwise.database import Database

_SCHEMA = """CREATE TABLE IF NOT EXISTS samples (
    seq {serial}, trace_id TEXT UNIQUE NOT NULL, sampler TEXT NOT NULL,
    score DOUBLE PRECISION NOT NULL, queued_at DOUBLE PRECISION NOT NULL,
    sample {blob} NOT NULL, observation {blob} NOT NULL);
CREATE TABLE IF NOT EXISTS sent (
    trace_id TEXT NOT NULL, bytes INTEGER NOT NULL, sent_at DOUBLE PRECISION NOT NULL)"""


@dataclass(frozen=True)
class SampleBudget:
    """At most `max_samples` samples and `max_bytes` bytes sent per `period_s` seconds."""

    max_samples: int
    max_bytes: int
    period_s: float = 86_400.0

    def __post_init__(self) -> None:
        for name in ("max_samples", "max_bytes"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: expected a count ≥ 0, got {getattr(self, name)}")
        if not self.period_s > 0:
            raise ValueError(f"period_s: expected seconds > 0, got {self.period_s}")


@dataclass(frozen=True)
class QueuedSample:
    trace_id: str
    sampler: str
    score: float
    queued_at: float       # epoch seconds
    sample: bytes          # the input as a .npy file
    observation: dict[str, object]

    @property
    def size(self) -> int:
        return len(self.sample)

    def array(self) -> np.ndarray:
        return np.load(io.BytesIO(self.sample), allow_pickle=False)


class SampleQueue:
    """Selected samples on disk at `path`, released within `budget`."""

    def __init__(self, path: Path, budget: SampleBudget) -> None:
        self.path = Path(path)
        self.budget = budget
        self._db = Database(self.path, _SCHEMA, "samples")
        with self._db.transaction():
            pass  # made now: a bad path fails here

    def offer(self, observation: Observation, sample: np.ndarray, sampler: str,
              score: float, now: float | None = None) -> bool:
        """Queue `sample` (the inference's input), which `sampler` selected with `score`;
        False when it is already queued or sent (a trace is queued once)."""
        buffer = io.BytesIO()
        np.save(buffer, np.asarray(sample), allow_pickle=False)
        record = orjson.dumps({
            "trace_id": observation.trace_id, "confidence": observation.confidence,
            "device_label": observation.device_label,
            "server_label": observation.server_label, "classes": observation.classes,
            "feedback": None if observation.feedback is None else {
                "correct": observation.feedback.correct, "label": observation.feedback.label},
        })
        with self._db.transaction() as db:
            if db.execute("SELECT 1 FROM sent WHERE trace_id = ?",
                          (observation.trace_id,)).fetchone():
                return False
            cursor = db.execute(
                "INSERT INTO samples (trace_id, sampler, score, queued_at, sample, "
                "observation) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (trace_id) DO NOTHING",
                (observation.trace_id, sampler, float(score),
                 time.time() if now is None else now, buffer.getvalue(), record))
            return cursor.rowcount == 1

    def due(self, now: float | None = None) -> list[QueuedSample]:
        """The queued samples that may be sent now: highest score first (oldest first among
        equal scores), as many as fit in what the budget leaves of its window."""
        now = time.time() if now is None else now
        with self._db.transaction(write=False) as db:
            count, size = db.execute(
                "SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM sent WHERE sent_at > ?",
                (now - self.budget.period_s,)).fetchone()
            rows = db.execute("SELECT trace_id, sampler, score, queued_at, sample, "
                              "observation FROM samples ORDER BY score DESC, seq").fetchall()
        samples_left = self.budget.max_samples - int(count)
        bytes_left = self.budget.max_bytes - int(size)
        chosen: list[QueuedSample] = []
        for trace_id, sampler, score, queued_at, sample, observation in rows:
            if len(chosen) >= samples_left:
                break
            if len(sample) > bytes_left:
                continue  # a smaller one may still fit
            chosen.append(QueuedSample(trace_id, sampler, float(score), float(queued_at),
                                       bytes(sample), orjson.loads(observation)))
            bytes_left -= len(sample)
        return chosen

    def mark_sent(self, samples: list[QueuedSample], now: float | None = None) -> None:
        """The cloud took `samples`: out of the queue, and counted against the budget."""
        now = time.time() if now is None else now
        with self._db.transaction() as db:
            for sample in samples:
                db.execute("DELETE FROM samples WHERE trace_id = ?", (sample.trace_id,))
                db.execute("INSERT INTO sent VALUES (?, ?, ?)",
                           (sample.trace_id, sample.size, now))

    def backlog(self) -> int:
        """Samples queued and not yet sent."""
        with self._db.transaction(write=False) as db:
            return int(db.execute("SELECT COUNT(*) FROM samples").fetchone()[0])

    def sent(self, since: float = 0.0) -> tuple[int, int]:
        """(samples, bytes) sent after `since` (epoch seconds)."""
        with self._db.transaction(write=False) as db:
            count, size = db.execute("SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM sent "
                                     "WHERE sent_at > ?", (since,)).fetchone()
        return int(count), int(size)
