"""The telemetry collector at the cloud: traces from every device, each stored once.

`Collector` is the store (SQLite by default): one row per trace, keyed by the trace id, so a
batch a device sends again is not stored twice. Its HTTP API is the control plane's
(`tierwise.cloud.telemetry`).
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import orjson

from tierwise.database import Connection, Database
from tierwise.protocol.traces import TraceBatch, TraceRecord, parse_batch

_SCHEMA = """
CREATE TABLE IF NOT EXISTS traces (
    id TEXT PRIMARY KEY, device TEXT NOT NULL, received_at DOUBLE PRECISION NOT NULL,
    started_at DOUBLE PRECISION NOT NULL, plan TEXT NOT NULL, tier TEXT NOT NULL,
    model TEXT NOT NULL, model_version TEXT NOT NULL, total_ms DOUBLE PRECISION NOT NULL,
    bytes_up BIGINT NOT NULL, bytes_down BIGINT NOT NULL, cost_usd DOUBLE PRECISION NOT NULL,
    escalated INTEGER NOT NULL, fallback INTEGER NOT NULL, deadline_missed INTEGER NOT NULL,
    label BIGINT, confidence DOUBLE PRECISION, input_mean DOUBLE PRECISION,
    input_std DOUBLE PRECISION, record {blob} NOT NULL);
CREATE INDEX IF NOT EXISTS traces_started ON traces (started_at);
"""


class Collector:
    """The trace store at `location`: an SQLite path, or a postgresql:// URL that several
    cloud servers share (`telemetry.collector_db`)."""

    def __init__(self, location: str | Path) -> None:
        self.database = Database(location, _SCHEMA, "collector")

    def _db(self) -> contextlib.AbstractContextManager[Connection]:
        return self.database.transaction()

    def ingest(self, device: str, traces: list[dict[str, Any]]) -> tuple[int, int]:
        """Store `traces` from `device`: (stored, already there). ValueError naming the
        first field of the first trace that is not one (`tierwise.protocol.traces`);
        nothing is stored then."""
        # through JSON, exactly as a batch arrives over HTTP
        return self.store(parse_batch(orjson.dumps({"device": device, "traces": traces})))

    def store(self, batch: TraceBatch) -> tuple[int, int]:
        """Store a validated batch: (stored, already there)."""
        received_at = time.time()
        rows = [_row(batch.device, received_at, trace) for trace in batch.traces]
        with self._db() as db:
            stored = db.executemany("INSERT INTO traces VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, "
                                    "?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
                                    rows)
        return stored, len(rows) - stored

    def count(self) -> int:
        with self._db() as db:
            row = db.execute("SELECT COUNT(*) FROM traces").fetchone()
        assert row is not None  # an aggregate query always gives one row
        return int(row[0])

    def summary(self) -> dict[str, Any]:
        with self._db() as db:
            row = db.execute(
                "SELECT COUNT(*), COUNT(DISTINCT device), MAX(started_at) FROM traces"
            ).fetchone()
        assert row is not None  # an aggregate query always gives one row
        count, devices, last = row
        return {"requests": count, "devices": devices, "last_started_at": last}

    def records(self, since: float = 0.0) -> list[dict[str, Any]]:
        """The stored traces started after `since` (epoch s), oldest first, as columns."""
        with self._db() as db:
            cursor = db.execute("SELECT * FROM traces WHERE started_at > ? ORDER BY started_at",
                                (since,))
            names = [column[0] for column in cursor.description]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def _row(device: str, received_at: float, trace: TraceRecord) -> tuple[Any, ...]:
    answered = trace.answered_by
    return (
        trace.id, device, received_at, trace.started_at, trace.plan,
        answered.tier if answered else "", answered.model if answered else "",
        answered.model_version if answered else "", trace.total_ms, trace.bytes_up,
        trace.bytes_down, trace.cost_usd, int(trace.escalated), int(trace.fallback is not None),
        int(trace.deadline_missed), trace.label, trace.confidence, trace.input_mean,
        trace.input_std, orjson.dumps(trace.model_dump(mode="json")))
