"""Prometheus metrics of a device (`Client(metrics_port=...)`): where its requests ran, how
long they took, what they moved and cost, how often they escalated, fell back or saw drift."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from tierwise.server.metrics import SECONDS_BUCKETS

if TYPE_CHECKING:  # the client imports this module
    from tierwise.client.trace import Trace
    from tierwise.monitor.drift import DriftScore


def plan_kind(plan: str) -> str:
    """local, remote, split or cascade: a bounded label (plan descriptions are many)."""
    return plan.split("(", 1)[0]


class ClientMetrics:
    """One registry per client; `serve(port)` exposes it over HTTP (prometheus_client)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("tierwise_client_requests", "Inferences by plan kind and the "
                                "tier that answered", ["plan", "tier"], registry=self.registry)
        self.latency = Histogram("tierwise_client_latency_seconds", "Inference latency as the "
                                 "app saw it, by plan kind", ["plan"],
                                 buckets=SECONDS_BUCKETS, registry=self.registry)
        self.bytes = Counter("tierwise_client_bytes", "Bytes on the links by tier and "
                             "direction", ["tier", "direction"], registry=self.registry)
        self.cost = Counter("tierwise_client_cost_usd", "Cost from the price book by the tier "
                            "that incurred it", ["tier"], registry=self.registry)
        self.escalations = Counter("tierwise_client_escalations", "Cascades that went past "
                                   "their first stage", registry=self.registry)
        self.fallbacks = Counter("tierwise_client_fallbacks", "Inferences that fell back from "
                                 "their plan", registry=self.registry)
        self.drift_alerts = Counter("tierwise_client_drift_alerts", "Drift alerts by detector "
                                    "and statistic", ["detector", "statistic"],
                                    registry=self.registry)
        self.samples_sent = Counter("tierwise_client_samples_sent", "Samples the cloud's label "
                                    "queue took from this device (active learning)",
                                    registry=self.registry)
        self.sample_bytes_sent = Counter("tierwise_client_sample_bytes_sent", "Their bytes "
                                         "(.npy)", registry=self.registry)

    def count_samples_sent(self, samples: int, size: int) -> None:
        self.samples_sent.inc(samples)
        self.sample_bytes_sent.inc(size)

    def observe(self, trace: Trace, alerts: Sequence[DriftScore] = ()) -> None:
        kind = plan_kind(trace.plan)
        answered = trace.answered_stages
        self.requests.labels(kind, answered[-1].tier if answered else "none").inc()
        self.latency.labels(kind).observe(trace.total_ms / 1e3)
        for stage in trace.stages:
            if stage.bytes_up or stage.bytes_down:
                self.bytes.labels(stage.tier, "up").inc(stage.bytes_up)
                self.bytes.labels(stage.tier, "down").inc(stage.bytes_down)
            self.cost.labels(stage.tier).inc(stage.cost_usd)
        if trace.escalated:
            self.escalations.inc()
        if trace.fallback is not None:
            self.fallbacks.inc()
        for alert in alerts:
            self.drift_alerts.labels(alert.detector, alert.statistic).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        """Expose the metrics at http://host:port/metrics (a background thread)."""
        from prometheus_client import start_http_server

        start_http_server(port, addr=host, registry=self.registry)
