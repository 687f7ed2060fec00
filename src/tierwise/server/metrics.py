"""Prometheus metrics of a tier server, exposed at GET /metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Inference on this tier takes from ~100 µs to seconds (emulated slow tiers).
SECONDS_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                    0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
UNKNOWN_MODEL = "(unknown)"  # a label for requests naming no served model: bounded cardinality
CONTENT_TYPE = CONTENT_TYPE_LATEST


class ModelMetrics:
    """The metric children of one model, bound once so the hot path only observes."""

    def __init__(self, metrics: ServerMetrics, model: str) -> None:
        self._metrics = metrics
        self.model = model
        self.ok = metrics.requests.labels(model, "200")
        self.request_seconds = metrics.request_seconds.labels(model)
        self.queue_seconds = metrics.queue_seconds.labels(model)
        self.compute_seconds = metrics.compute_seconds.labels(model)
        self.batch_size = metrics.batch_size.labels(model)
        self.bytes_in = metrics.request_bytes.labels(model)
        self.bytes_out = metrics.response_bytes.labels(model)
        self.last_compute_ms = 0.0  # per row, of the last batch: what Retry-After reads

    def observe_request(self, seconds: float, queue_ms: float, bytes_in: int,
                        bytes_out: int) -> None:
        self.ok.inc()
        self.request_seconds.observe(seconds)
        self.queue_seconds.observe(queue_ms * 1e-3)
        self.bytes_in.inc(bytes_in)
        self.bytes_out.inc(bytes_out)

    def observe_batch(self, batch_size: int, compute_ms: float) -> None:
        self.last_compute_ms = compute_ms / max(batch_size, 1)
        self.batch_size.observe(batch_size)
        self.compute_seconds.observe(compute_ms * 1e-3)

    def observe_error(self, status: int, bytes_in: int) -> None:
        self._metrics.requests.labels(self.model, str(status)).inc()
        self.bytes_in.inc(bytes_in)


class ServerMetrics:
    """One registry per server (not the global one), so several servers fit in one process."""

    def __init__(self, tier_name: str, compute_scale: float) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "tierwise_requests", "Inference requests by model and HTTP status",
            ["model", "status"], registry=self.registry)
        self.request_seconds = Histogram(
            "tierwise_request_duration_seconds",
            "Inference request time in the server, from the request reaching the app to the answer",
            ["model"], buckets=SECONDS_BUCKETS, registry=self.registry)
        self.queue_seconds = Histogram(
            "tierwise_queue_duration_seconds", "Time a request waited for its batch to start",
            ["model"], buckets=SECONDS_BUCKETS, registry=self.registry)
        self.compute_seconds = Histogram(
            "tierwise_compute_duration_seconds",
            "Compute time of each batch (stretched by compute_scale when emulated)",
            ["model"], buckets=SECONDS_BUCKETS, registry=self.registry)
        self.batch_size = Histogram(
            "tierwise_batch_size", "Rows per ONNX Runtime call", ["model"],
            buckets=_BATCH_BUCKETS, registry=self.registry)
        self.request_bytes = Counter(
            "tierwise_request_bytes", "Inference request body bytes received", ["model"],
            registry=self.registry)
        self.response_bytes = Counter(
            "tierwise_response_bytes", "Inference response body bytes sent", ["model"],
            registry=self.registry)
        tier = Gauge("tierwise_tier_info", "This server's tier and its emulated compute scale",
                     ["tier", "compute_scale"], registry=self.registry)
        tier.labels(tier_name, f"{compute_scale:g}").set(1)
        self._models: dict[str, ModelMetrics] = {}

    def model(self, name: str) -> ModelMetrics:
        metrics = self._models.get(name)
        if metrics is None:
            metrics = self._models[name] = ModelMetrics(self, name)
        return metrics

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
