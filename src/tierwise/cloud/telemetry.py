"""The telemetry collector's HTTP API (`/telemetry/v1`), a route table of the control plane.

  POST /telemetry/v1/traces   {"device": id, "traces": [trace, ...]}    traces:write
                              -> {"accepted", "duplicates"}             (its own id)
  GET  /telemetry/v1/summary  request count, devices, the last trace's  telemetry:read
                              time, the latest drift alerts

A batch is checked against one schema (`tierwise.protocol.traces`) before anything is
stored: 400 naming the first bad field, and nothing of that batch is kept.
"""

from __future__ import annotations

import asyncio
import threading

import orjson
from prometheus_client import CollectorRegistry, Counter
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from tierwise.cloud.auth import principal, scoped
from tierwise.cloud.http import read_body
from tierwise.monitor.collector import Collector
from tierwise.monitor.drift import STATISTICS, DriftMonitor
from tierwise.protocol.traces import TraceRecord, parse_batch
from tierwise.server.app import HTTPError

PREFIX = "/telemetry/v1"
MAX_BATCH_BYTES = 64 * 1024 * 1024


class TelemetryAPI:
    """The collector's routes over `collector`; drift over all the traffic as it arrives,
    counted in `metrics` (the tier server's Prometheus registry)."""

    def __init__(self, collector: Collector, metrics: CollectorRegistry | None = None) -> None:
        self.collector = collector
        self.drift = DriftMonitor()
        self._drift_lock = threading.Lock()
        metrics = metrics or CollectorRegistry()
        self._traces = Counter("tierwise_collector_traces", "Traces stored by the collector",
                               registry=metrics)
        self._duplicates = Counter("tierwise_collector_duplicates", "Traces sent again and "
                                   "not stored twice", registry=metrics)
        self._alerts = Counter("tierwise_collector_drift_alerts", "Drift alerts at the "
                               "collector by detector and statistic",
                               ["detector", "statistic"], registry=metrics)

    @property
    def routes(self) -> list[BaseRoute]:
        return [Route(f"{PREFIX}/traces", self.traces, methods=["POST"]),
                Route(f"{PREFIX}/summary", self.summary, methods=["GET"])]

    @scoped("traces:write")
    async def traces(self, request: Request) -> Response:
        """Store a device's batch of traces, `{"device": id, "traces": [...]}`, and watch
        them for drift: `{"accepted", "duplicates"}` (scope traces:write; a device or edge
        server only for its own id, else 403; 400 for a bad batch, nothing of it kept; 413
        over 64 MiB)."""
        body = await read_body(request, MAX_BATCH_BYTES, "a trace batch")
        try:  # parsed and checked off the event loop: a batch may be megabytes
            batch = await asyncio.to_thread(parse_batch, body)
        except ValueError as error:
            raise HTTPError(400, f"not a trace batch: {error}") from None
        principal(request).require_self(batch.device, "traces")  # its own traces only
        stored, duplicates = await asyncio.to_thread(self.collector.store, batch)
        if stored:
            await asyncio.to_thread(self._watch, batch.traces, stored)
        self._duplicates.inc(duplicates)
        return Response(orjson.dumps({"accepted": stored, "duplicates": duplicates}),
                        media_type="application/json")

    @scoped("telemetry:read")
    async def summary(self, request: Request) -> Response:
        """The collector's summary as JSON: requests stored, devices, the last trace's start
        (epoch s) and the latest 20 drift alerts (scope telemetry:read: an operator)."""
        summary = await asyncio.to_thread(self.collector.summary)
        summary["drift_alerts"] = [alert.__dict__ for alert in self.drift.alerts[-20:]]
        return Response(orjson.dumps(summary), media_type="application/json")

    def _watch(self, traces: list[TraceRecord], stored: int) -> None:
        self._traces.inc(stored)
        with self._drift_lock:
            for trace in sorted(traces, key=lambda t: t.started_at):
                for alert in self.drift.update({key: getattr(trace, key) for key in STATISTICS}):
                    self._alerts.labels(alert.detector, alert.statistic).inc()
