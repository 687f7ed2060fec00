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
from typing import TypedDict

import numpy as np
import orjson

from tierwise.active.samplers import Observation
from tierwise.database import Database

_SCHEMA = """CREATE TABLE IF NOT EXISTS samples (
    seq {serial}, trace_id TEXT UNIQUE NOT NULL, sampler TEXT NOT NULL,
    score DOUBLE PRECISION NOT NULL, queued_at DOUBLE PRECISION NOT NULL,
    sample {blob} NOT NULL, observation {blob} NOT NULL);
CREATE TABLE IF NOT EXISTS sent (
    trace_id TEXT NOT NULL, bytes INTEGER NOT NULL, sent_at DOUBLE PRECISION NOT NULL);
CREATE TABLE IF NOT EXISTS feedback (
    trace_id TEXT PRIMARY KEY, model TEXT NOT NULL, model_version TEXT NOT NULL,
    correct INTEGER NOT NULL, at DOUBLE PRECISION NOT NULL);
CREATE TABLE IF NOT EXISTS refused (
    trace_id TEXT NOT NULL, reason TEXT NOT NULL, sample {blob} NOT NULL,
    observation {blob} NOT NULL)"""


class FeedbackRecord(TypedDict):
    correct: bool
    label: int | None


class ObservationRecord(TypedDict):
    """What the queue keeps of a sample's observation (JSON in its `observation` column)."""

    trace_id: str
    confidence: float | None
    device_label: int | None
    server_label: int | None
    classes: int
    feedback: FeedbackRecord | None
    model: str
    model_version: str


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
    observation: ObservationRecord

    @property
    def size(self) -> int:
        return len(self.sample)

    def array(self) -> np.ndarray:
        return np.load(io.BytesIO(self.sample), allow_pickle=False)


class SampleQueue:
    """Selected samples on disk at `path`, released within `budget`; at most `max_queued`
    wait (beyond it, the lowest-scored one makes room)."""

    def __init__(self, path: Path, budget: SampleBudget, max_queued: int = 10_000) -> None:
        if max_queued < 1:
            raise ValueError(f"max_queued: expected a count ≥ 1, got {max_queued}")
        self.path = Path(path)
        self.budget = budget
        self.max_queued = max_queued
        self.evicted = 0  # lower-scored samples that made room for better ones
        self._db = Database(self.path, _SCHEMA, "samples")
        with self._db.transaction():
            pass  # made now: a bad path fails here

    def offer(self, observation: Observation, sample: np.ndarray, sampler: str,
              score: float, now: float | None = None, model: str = "",
              model_version: str = "") -> bool:
        """Queue `sample` (the inference's input), which `sampler` selected with `score`
        (`model` and `model_version`: what answered it); False when it is already queued or
        sent (a trace is queued once), or when the queue is full of higher scores."""
        buffer = io.BytesIO()
        np.save(buffer, np.asarray(sample), allow_pickle=False)
        kept: ObservationRecord = {
            "trace_id": observation.trace_id, "confidence": observation.confidence,
            "device_label": observation.device_label,
            "server_label": observation.server_label, "classes": observation.classes,
            "feedback": None if observation.feedback is None else {
                "correct": observation.feedback.correct, "label": observation.feedback.label},
            "model": model, "model_version": model_version,
        }
        record = orjson.dumps(kept)
        with self._db.transaction() as db:
            if db.execute("SELECT 1 FROM sent WHERE trace_id = ? UNION ALL SELECT 1 FROM "
                          "refused WHERE trace_id = ?", (observation.trace_id,
                                                         observation.trace_id)).fetchone():
                return False  # the cloud has it, or refused it for good
            queued = db.execute("SELECT score FROM samples WHERE trace_id = ?",
                                (observation.trace_id,)).fetchone()
            if queued is not None:  # selected again (the user's feedback came): the newer
                # observation, and the better of the two scores
                if score > queued[0]:
                    db.execute("UPDATE samples SET sampler = ?, score = ?, observation = ? "
                               "WHERE trace_id = ?",
                               (sampler, float(score), record, observation.trace_id))
                else:
                    db.execute("UPDATE samples SET observation = ? WHERE trace_id = ?",
                               (record, observation.trace_id))
                return False
            db.execute("INSERT INTO samples (trace_id, sampler, score, queued_at, sample, "
                       "observation) VALUES (?, ?, ?, ?, ?, ?)",
                       (observation.trace_id, sampler, float(score),
                        time.time() if now is None else now, buffer.getvalue(), record))
            # full: the lowest score leaves (the newest among equals), perhaps this one
            queued_count = db.execute("SELECT COUNT(*) FROM samples").fetchone()
            assert queued_count is not None  # an aggregate query always gives one row
            over = int(queued_count[0]) - self.max_queued
            if over <= 0:
                return True
            lowest = [(seq, trace_id) for seq, trace_id in db.execute(
                "SELECT seq, trace_id FROM samples ORDER BY score, seq DESC LIMIT ?", (over,))]
            db.executemany("DELETE FROM samples WHERE seq = ?", [(seq,) for seq, _ in lowest])
            made_room = [trace_id for _, trace_id in lowest
                         if trace_id != observation.trace_id]
            self.evicted += len(made_room)  # queued before, and now not
            return len(made_room) == len(lowest)

    def due(self, now: float | None = None) -> list[QueuedSample]:
        """The queued samples that may be sent now: highest score first (oldest first among
        equal scores), as many as fit in what the budget leaves of its window."""
        now = time.time() if now is None else now
        with self._db.transaction(write=False) as db:
            spent = db.execute(
                "SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM sent WHERE sent_at > ?",
                (now - self.budget.period_s,)).fetchone()
            assert spent is not None  # an aggregate query always gives one row
            count, size = spent
            samples_left = self.budget.max_samples - int(count)
            bytes_left = self.budget.max_bytes - int(size)
            if samples_left <= 0 or bytes_left <= 0:
                return []
            picked: list[int] = []
            for seq, length in db.execute("SELECT seq, LENGTH(sample) FROM samples "
                                          "ORDER BY score DESC, seq").fetchall():
                if len(picked) >= samples_left:
                    break
                if length <= bytes_left:  # else a smaller one may still fit
                    picked.append(seq)
                    bytes_left -= length
            rows = []
            for seq in picked:  # read in this transaction just above: each is there
                row = db.execute("SELECT trace_id, sampler, score, queued_at, sample, "
                                 "observation FROM samples WHERE seq = ?", (seq,)).fetchone()
                assert row is not None
                rows.append(row)
        return [QueuedSample(trace_id, sampler, float(score), float(queued_at), bytes(sample),
                             orjson.loads(observation))
                for trace_id, sampler, score, queued_at, sample, observation in rows]

    def mark_sent(self, samples: list[QueuedSample], now: float | None = None) -> None:
        """The cloud took `samples`: out of the queue, and counted against the budget."""
        now = time.time() if now is None else now
        with self._db.transaction() as db:
            for sample in samples:
                db.execute("DELETE FROM samples WHERE trace_id = ?", (sample.trace_id,))
                db.execute("INSERT INTO sent VALUES (?, ?, ?)",
                           (sample.trace_id, sample.size, now))

    def set_aside(self, samples: list[QueuedSample], reason: str) -> None:
        """The cloud refused `samples` for good (sending them again cannot change that):
        out of the queue into the `refused` table, with why, so later samples still go."""
        with self._db.transaction() as db:
            for sample in samples:
                db.execute("DELETE FROM samples WHERE trace_id = ?", (sample.trace_id,))
                db.execute("INSERT INTO refused VALUES (?, ?, ?, ?)",
                           (sample.trace_id, reason, sample.sample,
                            orjson.dumps(sample.observation)))

    def note_feedback(self, trace_id: str, model: str, model_version: str, correct: bool,
                      now: float | None = None) -> None:
        """Keep a user's verdict on an answer until the cloud takes it (the last one per
        trace); it carries no input, so no budget holds it back."""
        with self._db.transaction() as db:
            db.execute("INSERT INTO feedback VALUES (?, ?, ?, ?, ?) ON CONFLICT (trace_id) DO "
                       "UPDATE SET correct = excluded.correct, at = excluded.at",
                       (trace_id, model, model_version, int(correct),
                        time.time() if now is None else now))

    def feedback_due(self, limit: int = 10_000) -> list[dict[str, object]]:
        """The verdicts not yet taken, oldest first, as the upload carries them."""
        with self._db.transaction(write=False) as db:
            rows = db.execute("SELECT trace_id, model, model_version, correct, at FROM "
                              "feedback ORDER BY at LIMIT ?", (limit,)).fetchall()
        return [{"trace_id": trace_id, "model": model, "model_version": version,
                 "correct": bool(correct), "at": at}
                for trace_id, model, version, correct, at in rows]

    def feedback_sent(self, verdicts: list[dict[str, object]]) -> None:
        with self._db.transaction() as db:
            for verdict in verdicts:  # unless changed since it was read
                db.execute("DELETE FROM feedback WHERE trace_id = ? AND at = ?",
                           (verdict["trace_id"], verdict["at"]))

    def backlog(self) -> int:
        """Samples queued and not yet sent."""
        with self._db.transaction(write=False) as db:
            row = db.execute("SELECT COUNT(*) FROM samples").fetchone()
        assert row is not None  # an aggregate query always gives one row
        return int(row[0])

    def sent(self, since: float = 0.0) -> tuple[int, int]:
        """(samples, bytes) sent after `since` (epoch seconds)."""
        with self._db.transaction(write=False) as db:
            row = db.execute("SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM sent "
                             "WHERE sent_at > ?", (since,)).fetchone()
        assert row is not None  # an aggregate query always gives one row
        count, size = row
        return int(count), int(size)
