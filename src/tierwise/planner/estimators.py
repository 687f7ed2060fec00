"""Online estimates of what a plan will take: link bandwidth and RTT, server queue delay, and
a correction of the profiled compute times. All are exponentially weighted moving averages
(EWMA) of real measurements; the config's link settings are only the starting point.

A transfer's network time (the round trip minus the server's own compute and queue time,
which the server reports in response headers) is modelled as

    network_ms = rtt_ms + bytes_up / bandwidth_up + bytes_down / bandwidth_down.

One transfer cannot tell RTT from bandwidth: 25 ms for 1 KB is a 24 ms RTT on a fast link or
a 4 ms RTT at 50 KB/s. So the prober sends pairs of transfers of different sizes (a small
`GET /v2/health/ready` and a request-sized inference) over the same link, back to back, and
solves the two equations for RTT and uplink bandwidth (`observe_probe_pair`). Between probes,
every real transfer refines the uplink bandwidth from what the RTT does not explain
(`observe`); a transfer that is too small to say anything about bandwidth still confirms the
estimate is current. A link with no transfer at all for `stale_after_s` is stale, which is
when the client probes it — typically because the planner stopped sending there, and only a
probe can tell when sending there pays again. The downlink keeps its configured value
unless answers dominate a transfer's time (answers here are a few hundred bytes).
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass

from tierwise.config import LinkConfig

# Protocol overhead per request/response before any transfer is seen: HTTP request line and
# headers plus the OIP JSON header (measured on loopback: ~330 B up, ~270 B down).
DEFAULT_OVERHEAD_UP_BYTES = 330.0
DEFAULT_RESPONSE_BYTES = 270.0
# A transfer informs the bandwidth when the RTT leaves this much of its time unexplained.
MIN_SERIAL_SHARE = 0.1
MIN_SERIAL_MS = 0.3
# After a timeout the uplink estimate drops to this share of what the wait implies.
TIMEOUT_BACKOFF = 0.5


class Ewma:
    """An exponentially weighted moving average that knows when it last moved."""

    def __init__(self, initial: float, alpha: float) -> None:
        self.value = initial
        self.alpha = alpha
        self.samples = 0
        self.updated_at = -math.inf  # time.monotonic() of the last sample

    def update(self, sample: float, now: float | None = None) -> float:
        # The first real sample replaces the prior outright: a config guess is not a sample.
        weight = 1.0 if self.samples == 0 else self.alpha
        self.value += weight * (sample - self.value)
        self.samples += 1
        self.updated_at = time.monotonic() if now is None else now
        return self.value


@dataclass(frozen=True)
class LinkEstimate:
    """A snapshot, for one decision."""

    rtt_ms: float
    bandwidth_up: float    # bytes/s
    bandwidth_down: float  # bytes/s
    overhead_up_bytes: float
    response_bytes: float

    def transfer_ms(self, payload_up_bytes: float) -> float:
        """Predicted network time of one request carrying `payload_up_bytes`."""
        return (self.rtt_ms + (payload_up_bytes + self.overhead_up_bytes) / self.bandwidth_up
                * 1e3 + self.response_bytes / self.bandwidth_down * 1e3)


class LinkEstimator:
    """RTT and bandwidth of one device→tier link, learned from real transfers."""

    def __init__(self, prior: LinkConfig, alpha: float = 0.3, stale_after_s: float = 2.0) -> None:
        self.rtt_ms = Ewma(prior.rtt_ms, alpha)
        self.bandwidth_up = Ewma(prior.bandwidth_up, alpha)
        self.bandwidth_down = Ewma(prior.bandwidth_down, alpha)
        self.overhead_up_bytes = Ewma(DEFAULT_OVERHEAD_UP_BYTES, alpha)
        self.response_bytes = Ewma(DEFAULT_RESPONSE_BYTES, alpha)
        self.stale_after_s = stale_after_s
        self.seen_at = -math.inf  # time.monotonic() of the last transfer of any kind
        self._lock = threading.Lock()

    def snapshot(self) -> LinkEstimate:
        return LinkEstimate(self.rtt_ms.value, self.bandwidth_up.value, self.bandwidth_down.value,
                            self.overhead_up_bytes.value, self.response_bytes.value)

    def stale(self, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        return now - self.seen_at > self.stale_after_s

    def observe(self, bytes_up: int, bytes_down: int, network_ms: float,
                payload_up_bytes: int | None = None, now: float | None = None) -> None:
        """Learn from one transfer: its bytes each way and its network time (round trip minus
        the server's reported compute and queue time). `payload_up_bytes`, when given, is the
        encoded tensor's size: the rest of `bytes_up` is protocol overhead."""
        with self._lock:
            self.seen_at = time.monotonic() if now is None else now
            if payload_up_bytes is not None:
                self.overhead_up_bytes.update(max(0.0, bytes_up - payload_up_bytes), now)
                self.response_bytes.update(bytes_down, now)
            up_ms = bytes_up / self.bandwidth_up.value * 1e3
            down_ms = bytes_down / self.bandwidth_down.value * 1e3
            if network_ms < self.rtt_ms.value:
                # faster than the RTT alone: the RTT has come down
                self.rtt_ms.update(max(0.0, network_ms - up_ms - down_ms), now)
                return
            unexplained_ms = network_ms - self.rtt_ms.value
            if unexplained_ms < max(MIN_SERIAL_SHARE * network_ms, MIN_SERIAL_MS):
                return  # too small a transfer to say anything about bandwidth
            if down_ms > up_ms:
                self.bandwidth_down.update(bytes_down / max(unexplained_ms - up_ms, 0.1 * down_ms)
                                           * 1e3, now)
            else:
                self.bandwidth_up.update(bytes_up / max(unexplained_ms - down_ms, 0.1 * up_ms)
                                         * 1e3, now)

    def observe_probe_pair(self, small: tuple[int, int, float], large: tuple[int, int, float],
                           now: float | None = None) -> None:
        """Two transfers of different sizes, (bytes_up, bytes_down, network_ms) each, sent
        back to back: solve `network - down/bw_down = rtt + up/bw_up` for RTT and uplink."""
        with self._lock:
            self.seen_at = time.monotonic() if now is None else now
            down = self.bandwidth_down.value
            (up_1, down_1, ms_1), (up_2, down_2, ms_2) = small, large
            net_1 = ms_1 - down_1 / down * 1e3
            net_2 = ms_2 - down_2 / down * 1e3
            if up_2 <= up_1:
                return
            if net_2 - net_1 > MIN_SERIAL_MS:
                bandwidth_up = (up_2 - up_1) / (net_2 - net_1) * 1e3
                self.bandwidth_up.update(bandwidth_up, now)
            # else: the sizes' difference was lost in jitter: a fast link; keep the estimate
            rtt = net_1 - up_1 / self.bandwidth_up.value * 1e3
            self.rtt_ms.update(max(0.0, rtt), now)

    def observe_timeout(self, bytes_up: int, waited_network_ms: float) -> None:
        """A request abandoned after `waited_network_ms` with no answer: the link is slower
        than that for this size, by how much nobody knows. Like TCP after a loss, cut the
        uplink estimate to half of what the wait implies; the next transfers or probes
        (which a stale link gets) bring it back up."""
        with self._lock:
            self.seen_at = time.monotonic()
            serial_ms = max(waited_network_ms - self.rtt_ms.value, 0.1 * waited_network_ms)
            implied_up = bytes_up / serial_ms * 1e3
            ewma = self.bandwidth_up
            ewma.value = TIMEOUT_BACKOFF * min(implied_up, ewma.value)
            ewma.samples += 1
            ewma.updated_at = self.seen_at


QUEUE_STALE_S = 1.0  # a server's queue estimate older than this is history, not a state


class ServerEstimator:
    """Per tier: queue delay (from the `tierwise-queue-ms` header), and per model the ratio of
    measured to profiled compute time, which corrects the profile online."""

    def __init__(self, alpha: float = 0.2) -> None:
        self.alpha = alpha
        self.queue_ms = Ewma(0.0, alpha)
        self.compute_ratio: dict[str, Ewma] = {}
        self.busy_until = 0.0  # time.monotonic() before which the server asked not to send
        self._lock = threading.Lock()

    def observe_overload(self, retry_after_s: float, now: float | None = None) -> None:
        """The server answered 429 with Retry-After: load, not an outage. Until then its
        queue counts as that much longer (`queue_estimate_ms`), so plans move elsewhere, and
        the penalty runs out by itself."""
        now = time.monotonic() if now is None else now
        with self._lock:
            self.busy_until = max(self.busy_until, now + max(retry_after_s, 0.0))

    def queue_estimate_ms(self, now: float | None = None) -> float:
        """The queue delay a request sent now should expect: the learned one, or the time
        left of a Retry-After, whichever is longer."""
        now = time.monotonic() if now is None else now
        return max(self.queue_ms.value, (self.busy_until - now) * 1e3)

    def observe(self, model: str, compute_ms: float, profiled_ms: float | None,
                queue_ms: float, now: float | None = None) -> None:
        """One answer's headers: its queue delay and, at batch 1, its compute time."""
        with self._lock:
            self._queue_reading(queue_ms, now)
            if profiled_ms and profiled_ms > 0 and compute_ms > 0:
                ratio = self.compute_ratio.setdefault(model, Ewma(1.0, self.alpha))
                # bounded: one outlier (a GC pause, a cold cache) must not swing plans
                ratio.update(min(max(compute_ms / profiled_ms, 0.2), 5.0))

    def observe_queue(self, queue_ms: float, now: float | None = None) -> None:
        """A queue reading alone, from a probe (`tierwise.client.prober`): a site that lost
        its traffic to an overload is only seen again by its probes."""
        with self._lock:
            self._queue_reading(queue_ms, now)

    def _queue_reading(self, queue_ms: float, now: float | None) -> None:
        # After QUEUE_STALE_S without a reading the estimate is the queue of a moment long
        # gone: the reading replaces it, so a site whose queue drained wins traffic back at
        # its first probe instead of after a dozen
        now = time.monotonic() if now is None else now
        if now - self.queue_ms.updated_at > QUEUE_STALE_S:
            self.queue_ms.samples = 0
        self.queue_ms.update(queue_ms, now)

    def ratio(self, model: str) -> float:
        ewma = self.compute_ratio.get(model)
        return ewma.value if ewma else 1.0
