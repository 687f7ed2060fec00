"""The prober: a background thread that keeps the client's picture of its tiers fresh.

- A tier marked down gets `GET /v2/health/ready` every `down_interval_s`; when it answers
  200 it is marked up and offloading resumes.
- Only a tier within reach is probed: one whose plans would win were its link perfect
  (`Policy.within_reach`). A link's estimate only moves the latency of its own plans, so
  when even a perfect link would lose (a cloud dearer than an edge that meets the SLO), a
  probe costs bytes and server time and cannot change a decision. When the picture moves
  (the edge goes down, the floor rises), the tier comes within reach and is probed again.
- A healthy tier whose link estimate is stale (no transfer for the estimator's
  `stale_after_s`, typically because the planner stopped sending there) gets a probe pair:
  the same small GET, then a real inference of a blank input of ~8 KB on the tier's model
  cheapest to run (`probe_model`), from which the estimator solves RTT and uplink
  bandwidth, and the server's queue header the queue estimate. Without it, a client that
  moved to the device when the link was poor, or away from a site whose queue rose, would
  never see the link or the site recover.

Probe traffic crosses the same (emulated) link as requests and is counted in `totals`, so
benchmarks charge it to the strategy that needs it.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import httpx
import numpy as np

from tierwise.client.stages import call_tier
from tierwise.codecs import RAW
from tierwise.models.inputs import image_size
from tierwise.models.store import ModelInfo, tier_models
from tierwise.net.shaping import TRANSFER_EXTENSION
from tierwise.planner.plans import RemoteStageError
from tierwise.protocol.oip import numpy_dtype

if TYPE_CHECKING:
    from tierwise.client.client import Client

HEALTH_PATH = "/v2/health/ready"
# A bandwidth probe's payload: a few KB, several times a health probe, so the pair separates
# RTT from bandwidth up to a few MB/s — and never a frame's worth: probing a camera model with
# four of its own 272x272 frames sent 0.9 MB per probe (on a 10 KB/s link, 90 s of it).
PROBE_BYTES = 8192
PROBE_IMAGES = 4  # at most, for a model of fixed-size inputs


@dataclass
class ProbeTotals:
    probes: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    cost_usd: float = 0.0


class Prober:
    def __init__(self, client: Client, down_interval_s: float = 0.5,
                 tick_s: float = 0.1) -> None:
        self.client = client
        self.down_interval_s = down_interval_s
        self.tick_s = tick_s
        self.totals = ProbeTotals()
        self.skipped = 0  # rounds that left a tier alone: out of reach (see probe_all)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_try: dict[str, float] = {}

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="tierwise-prober",
                                            daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=15)

    def _run(self) -> None:
        while not self._stop.wait(self.tick_s):
            self.probe_all()

    def probe_all(self, force: bool = False) -> None:
        """One round: health of down tiers, RTT and bandwidth of stale links."""
        client = self.client
        for tier, estimator in client.link_estimators.items():
            if tier in client.retired:
                continue  # left the fleet list
            server = client.server_estimators.get(tier)
            if server is not None and server.busy_until > time.monotonic():
                continue  # it answered 429 with Retry-After: not before then
            if tier not in client.tier_urls and client.config.tier(tier).port == 0:
                continue  # nowhere to probe
            now = time.monotonic()
            down = tier in client.down
            due = now - self._last_try.get(tier, -1e9) >= self.down_interval_s if down \
                else estimator.stale(now)
            if not (force or due):
                continue
            if not force and not client.within_reach(tier):  # asked only when a probe is due
                self.skipped += 1
                continue  # not even a perfect link there would change a decision
            if down:
                self._last_try[tier] = now
                if self.health(tier) is not None:
                    client.mark(tier, up=True)
            else:
                small = self.health(tier)
                large = self.bandwidth(tier) if small is not None else None
                if small is None:
                    client.mark(tier, up=False)
                elif large is not None:
                    estimator.observe_probe_pair(small, large)

    def health(self, tier: str) -> tuple[int, int, float] | None:
        """GET /v2/health/ready: (bytes up, bytes down, ms) when it answers 200, else None."""
        try:
            response = self.client.http(tier).get(HEALTH_PATH, timeout=5.0)
        except (httpx.HTTPError, RemoteStageError):
            return None
        transfer = response.extensions[TRANSFER_EXTENSION]
        self._count(transfer.bytes_up, transfer.bytes_down, 0.0)
        if response.status_code != 200:
            return None
        return transfer.bytes_up, transfer.bytes_down, transfer.total_ms

    def bandwidth(self, tier: str) -> tuple[int, int, float] | None:
        """A real inference on the tier's first model of a blank input of about PROBE_BYTES,
        raw: a small square image for a model that takes images of any size, else up to
        PROBE_IMAGES blank samples. (bytes up, bytes down, network ms) or None."""
        client = self.client
        info = self.probe_model(tier)
        if info is None:
            return None
        blank = probe_input(info)
        estimate_ms = client.link_estimators[tier].snapshot().transfer_ms(blank.nbytes)
        abort_at = time.perf_counter() + max(5.0, 4 * estimate_ms / 1e3)
        try:
            _, stage = call_tier(client, tier, info.name, blank, RAW, abort_at, learn=False)
        except RemoteStageError as error:
            if error.tier_down:
                client.mark(tier, up=False)
            return None
        self._count(stage.bytes_up, stage.bytes_down, stage.cost_usd)
        client.server_estimators[tier].observe_queue(stage.queue_ms)  # overloaded still?
        return stage.bytes_up, stage.bytes_down, stage.network_ms

    def probe_model(self, tier: str) -> ModelInfo | None:
        """The model of `tier` cheapest to run by the profiles — typically a late split's
        tail, a layer or two — since a probe measures the link, not the server (probing the
        camera's Lite2 itself cost 5-20x what the requests did); else the tier's first."""
        client = self.client
        served = tier_models(client.config, client.models).get(tier, [])
        profiled = [name for name, info in client.models.items()
                    if (tier, name) in client.profiled_ms
                    and (name in served or (info.role == "tail" and info.parent in served))]
        if profiled:
            return client.models[min(profiled, key=lambda n: client.profiled_ms[(tier, n)])]
        return client.models.get(served[0]) if served else None

    def _count(self, bytes_up: int, bytes_down: int, cost_usd: float) -> None:
        totals = self.totals
        totals.probes += 1
        totals.bytes_up += bytes_up
        totals.bytes_down += bytes_down
        totals.cost_usd += cost_usd


def probe_input(info: ModelInfo) -> np.ndarray:
    """A blank input of about PROBE_BYTES that `info`'s model takes."""
    spec, dtype = info.inputs[0], numpy_dtype(info.inputs[0].datatype)
    size = image_size(info)
    if size is not None and len(spec.shape) == 4 and spec.shape[1] < 0 and spec.shape[2] < 0:
        channels = spec.shape[-1]  # images of any size: the graph resizes them
        side = max(8, int((PROBE_BYTES / (channels * dtype.itemsize)) ** 0.5))
        return np.zeros([1, side, side, channels], dtype=dtype)
    row = [*size, spec.shape[-1]] if size else [max(dim, 1) for dim in spec.shape[1:]]
    row_bytes = int(np.prod(row)) * dtype.itemsize
    rows = max(1, min(PROBE_IMAGES, PROBE_BYTES // max(row_bytes, 1))) if info.batched else 1
    return np.zeros([rows, *row], dtype=dtype)
