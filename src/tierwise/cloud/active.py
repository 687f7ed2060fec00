"""The label queue's HTTP API (`/active/v1`), a route table of the control plane.

  POST /active/v1/samples   {"device": id, "samples": [sample, ...]}    samples:write
                            -> {"accepted", "duplicates"}               (its own id)
  GET  /active/v1/summary   samples per state, and per device the       telemetry:read
                            samples and bytes it uploaded

An upload is checked whole (`tierwise.protocol.samples`) before anything is stored: 400
naming the first bad field, and nothing of that upload is kept.
"""

from __future__ import annotations

import asyncio

import orjson
from prometheus_client import CollectorRegistry, Counter
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from tierwise.active.labels import LabelStore
from tierwise.cloud.auth import principal, scoped
from tierwise.cloud.http import read_body
from tierwise.protocol.samples import MAX_SAMPLE_BYTES, MAX_SAMPLES_PER_BATCH, parse_samples
from tierwise.server.app import HTTPError

PREFIX = "/active/v1"
SAMPLES_PATH = f"{PREFIX}/samples"
# base64 of the largest batch of the largest samples would be far more: a device sends
# batches of a few samples, and the limit keeps one request's memory bounded
MAX_UPLOAD_BYTES = 64 * 1024 * 1024
assert MAX_SAMPLE_BYTES * 4 // 3 < MAX_UPLOAD_BYTES and MAX_SAMPLES_PER_BATCH > 0


class ActiveAPI:
    """The label queue's routes over `store`, counted in `metrics` (the tier server's
    Prometheus registry)."""

    def __init__(self, store: LabelStore, metrics: CollectorRegistry | None = None) -> None:
        self.store = store
        metrics = metrics or CollectorRegistry()
        self._samples = Counter("tierwise_active_samples_received", "Samples devices uploaded "
                                "to the label queue (stored or duplicates)", ["device"],
                                registry=metrics)
        self._bytes = Counter("tierwise_active_sample_bytes_received", "Bytes of the samples "
                              "devices uploaded (.npy)", ["device"], registry=metrics)

    @property
    def routes(self) -> list[BaseRoute]:
        return [Route(SAMPLES_PATH, self.samples, methods=["POST"]),
                Route(f"{PREFIX}/summary", self.summary, methods=["GET"])]

    @scoped("samples:write")
    async def samples(self, request: Request) -> Response:
        """Add a device's selected samples to the label queue, `{"device": id, "samples":
        [...]}`: `{"accepted", "duplicates"}` (scope samples:write; a device or edge server
        only for its own id, else 403; 400 for a bad upload, nothing of it kept; 413 over
        64 MiB)."""
        body = await read_body(request, MAX_UPLOAD_BYTES, "a sample upload")
        try:  # decoded and checked off the event loop: an upload may be megabytes
            batch, decoded = await asyncio.to_thread(parse_samples, body)
        except ValueError as error:
            raise HTTPError(400, f"not a sample upload: {error}") from None
        principal(request).require_self(batch.device, "samples")  # its own samples only
        stored, duplicates = await asyncio.to_thread(self.store.add, batch,
                                                     [raw for raw, _ in decoded])
        self._samples.labels(batch.device).inc(len(decoded))
        self._bytes.labels(batch.device).inc(sum(len(raw) for raw, _ in decoded))
        return Response(orjson.dumps({"accepted": stored, "duplicates": duplicates}),
                        media_type="application/json")

    @scoped("telemetry:read")
    async def summary(self, request: Request) -> Response:
        """The label queue as JSON: samples per state, and per device the samples and bytes
        it uploaded (scope telemetry:read: an operator)."""
        counts, uploads = await asyncio.gather(asyncio.to_thread(self.store.counts),
                                               asyncio.to_thread(self.store.uploads))
        return Response(orjson.dumps({"samples": counts, "uploads": uploads}),
                        media_type="application/json")
