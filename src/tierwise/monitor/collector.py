"""The telemetry collector at the cloud: traces from every device, each stored once.

`Collector` is the store (SQLite by default): one row per trace, keyed by the trace id, so a
batch a device sends again is not stored twice. `TelemetryApp` is its HTTP side, mounted in
front of the cloud tier server:

  POST /telemetry/v1/traces   {"device": id, "traces": [trace, ...]}  -> {"accepted", "duplicates"}
  GET  /telemetry/v1/summary  request count, devices, the last trace's time

Both need the cloud API's bearer token.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import orjson
from prometheus_client import CollectorRegistry, Counter

from tierwise.monitor.drift import STATISTICS, DriftMonitor
from tierwise.protocol.oip import encode_error
from tierwise.protocol.traces import TraceBatch, TraceRecord, parse_batch
from tierwise.registry.credentials import Credentials, as_http_errors, bearer
from tierwise.server.app import HTTPError, Receive, Scope, Send, send_response
from tierwise.sqlite import transaction

PREFIX = "/telemetry/v1/"
MAX_BATCH_BYTES = 64 * 1024 * 1024
_JSON = (b"content-type", b"application/json")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS traces (
    id TEXT PRIMARY KEY, device TEXT NOT NULL, received_at REAL NOT NULL,
    started_at REAL NOT NULL, plan TEXT NOT NULL, tier TEXT NOT NULL, model TEXT NOT NULL,
    model_version TEXT NOT NULL, total_ms REAL NOT NULL, bytes_up INTEGER NOT NULL,
    bytes_down INTEGER NOT NULL, cost_usd REAL NOT NULL, escalated INTEGER NOT NULL,
    fallback INTEGER NOT NULL, deadline_missed INTEGER NOT NULL, label INTEGER,
    confidence REAL, input_mean REAL, input_std REAL, record BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS traces_started ON traces (started_at);
"""


class Collector:
    """The trace store at `path`."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def _db(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        return transaction(self.path, _SCHEMA)

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
            before = db.total_changes
            db.executemany("INSERT OR IGNORE INTO traces VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, "
                           "?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
            stored = db.total_changes - before
        return stored, len(rows) - stored

    def count(self) -> int:
        with self._db() as db:
            return int(db.execute("SELECT COUNT(*) FROM traces").fetchone()[0])

    def summary(self) -> dict[str, Any]:
        with self._db() as db:
            count, devices, last = db.execute(
                "SELECT COUNT(*), COUNT(DISTINCT device), MAX(started_at) FROM traces"
            ).fetchone()
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


class TelemetryApp:
    """ASGI: the collector's API under /telemetry/v1/, everything else to `app`."""

    def __init__(self, collector: Collector, token: str | None, app: Any,
                 credentials: Credentials) -> None:
        """`token`: the operator's (None: not made yet, 503); `credentials`: who may write
        which device's traces (the registry's, `tierwise.cloud.hosted`)."""
        self.collector = collector
        self._token = token
        self.credentials = credentials
        self.app = app
        # drift over all the traffic, as it arrives; alerts counted in the server's metrics
        self.drift = DriftMonitor()
        self._drift_lock = threading.Lock()
        registry = getattr(getattr(app, "metrics", None), "registry", None) or \
            CollectorRegistry()
        self._traces = Counter("tierwise_collector_traces", "Traces stored by the collector",
                               registry=registry)
        self._duplicates = Counter("tierwise_collector_duplicates", "Traces sent again and "
                                   "not stored twice", registry=registry)
        self._alerts = Counter("tierwise_collector_drift_alerts", "Drift alerts at the "
                               "collector by detector and statistic",
                               ["detector", "statistic"], registry=registry)

    def __getattr__(self, name: str) -> Any:  # the wrapped server's API (tier, update, ...)
        return getattr(self.app, name)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(PREFIX):
            await self.app(scope, receive, send)
            return
        try:
            await self._handle(scope, receive, send)
        except HTTPError as error:
            await send_response(send, error.status, encode_error(error.message),
                                [_JSON, *error.headers])

    async def _handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._token is None:
            raise HTTPError(503, "the collector has no API token yet: run `tierwise registry "
                                 "keygen` at the cloud")
        with as_http_errors():
            principal = await asyncio.to_thread(self.credentials.authenticate, bearer(scope))
        path, method = scope["path"], scope["method"]
        if path == PREFIX + "traces":
            if method != "POST":
                raise HTTPError(405, f"{path}: use POST", [(b"allow", b"POST")])
            body = await _read(receive)
            try:  # parsed and checked off the event loop: a batch may be megabytes
                batch = await asyncio.to_thread(parse_batch, body)
            except ValueError as error:
                raise HTTPError(400, f"not a trace batch: {error}") from None
            with as_http_errors():  # a device writes its own traces, no one else's
                principal.require("device", "edge")
                principal.require_self(batch.device, "traces")
            stored, duplicates = await asyncio.to_thread(self.collector.store, batch)
            if stored:
                await asyncio.to_thread(self._watch, batch.traces, stored)
            self._duplicates.inc(duplicates)
            answer = orjson.dumps({"accepted": stored, "duplicates": duplicates})
            await send_response(send, 200, answer, [_JSON])
        elif path == PREFIX + "summary":
            with as_http_errors():
                principal.require("operator")
            summary = await asyncio.to_thread(self.collector.summary)
            summary["drift_alerts"] = [alert.__dict__ for alert in self.drift.alerts[-20:]]
            await send_response(send, 200, orjson.dumps(summary), [_JSON])
        else:
            raise HTTPError(404, f"no such endpoint: {path}")


    def _watch(self, traces: list[TraceRecord], stored: int) -> None:
        self._traces.inc(stored)
        with self._drift_lock:
            for trace in sorted(traces, key=lambda t: t.started_at):
                for alert in self.drift.update({key: getattr(trace, key) for key in STATISTICS}):
                    self._alerts.labels(alert.detector, alert.statistic).inc()


async def _read(receive: Receive) -> bytes:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise HTTPError(400, "the client disconnected before sending the whole body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BATCH_BYTES:
            raise HTTPError(413, f"a trace batch is at most {MAX_BATCH_BYTES} bytes")
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)
