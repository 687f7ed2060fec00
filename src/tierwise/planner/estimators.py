"""Online estimates of what a plan will take: link bandwidth and RTT, server queue delay, and
a correction of the profiled compute times. All are exponentially weighted moving averages
(EWMA) of real measurements; the config's link settings are only the starting point.

A transfer's network time (the round trip minus the server's own compute and queue time,
which the server reports in response headers) is modelled as

    network_ms = rtt_ms + bytes_up / bandwidth_up + bytes_down / bandwidth_down.

One transfer cannot separate the three, so each estimate learns from the transfers that
inform it: the RTT from small probes (`GET /v2/health/ready`) and from transfers whose
serialisation time is a small part of the whole; the bandwidths from what is left of a
transfer once the RTT is taken off, given to the direction that dominates the predicted
serialisation (requests are larger than answers here, so usually the uplink). A link with no
informative sample for `stale_after_s` is stale, and the client probes it
(`tierwise.client.prober`).
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
# A transfer whose predicted serialisation is below this share of its time informs the RTT.
RTT_INFORMATIVE_SHARE = 0.2
# ... and one whose serialisation is above this share informs the bandwidth.
BANDWIDTH_INFORMATIVE_SHARE = 0.2
# A direction whose predicted serialisation is this share of the total takes all the residual.
DOMINANT_SHARE = 0.8


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
        self._lock = threading.Lock()

    def snapshot(self) -> LinkEstimate:
        return LinkEstimate(self.rtt_ms.value, self.bandwidth_up.value, self.bandwidth_down.value,
                            self.overhead_up_bytes.value, self.response_bytes.value)

    def stale(self, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        return now - self.bandwidth_up.updated_at > self.stale_after_s

    def observe(self, bytes_up: int, bytes_down: int, network_ms: float,
                payload_up_bytes: int | None = None, now: float | None = None) -> None:
        """Learn from one transfer: its bytes each way and its network time (round trip minus
        the server's reported compute and queue time). `payload_up_bytes`, when given, is the
        encoded tensor's size: the rest of `bytes_up` is protocol overhead."""
        with self._lock:
            if payload_up_bytes is not None:
                self.overhead_up_bytes.update(max(0.0, bytes_up - payload_up_bytes), now)
                self.response_bytes.update(bytes_down, now)
            up_ms = bytes_up / self.bandwidth_up.value * 1e3
            down_ms = bytes_down / self.bandwidth_down.value * 1e3
            serial_ms = up_ms + down_ms
            predicted_ms = self.rtt_ms.value + serial_ms
            if serial_ms <= RTT_INFORMATIVE_SHARE * predicted_ms:
                self.rtt_ms.update(max(0.0, network_ms - serial_ms), now)
            if serial_ms >= BANDWIDTH_INFORMATIVE_SHARE * predicted_ms:
                # What the RTT does not explain is serialisation (never below a tenth of the
                # prediction: jitter must not imply an infinite rate). It goes to the direction
                # that dominates the prediction; when neither does, it is shared as predicted.
                measured_ms = max(network_ms - self.rtt_ms.value, 0.1 * serial_ms)
                if up_ms >= DOMINANT_SHARE * serial_ms:
                    up_share_ms = max(measured_ms - down_ms, 0.1 * up_ms)
                    self.bandwidth_up.update(bytes_up / up_share_ms * 1e3, now)
                elif down_ms >= DOMINANT_SHARE * serial_ms:
                    down_share_ms = max(measured_ms - up_ms, 0.1 * down_ms)
                    self.bandwidth_down.update(bytes_down / down_share_ms * 1e3, now)
                else:
                    scale = measured_ms / serial_ms
                    self.bandwidth_up.update(bytes_up / (up_ms * scale) * 1e3, now)
                    self.bandwidth_down.update(bytes_down / (down_ms * scale) * 1e3, now)

    def observe_rtt_probe(self, bytes_up: int, bytes_down: int, network_ms: float,
                          now: float | None = None) -> None:
        """A probe too small to say much about bandwidth: its time, less its predicted
        serialisation, is an RTT sample."""
        with self._lock:
            serial_ms = (bytes_up / self.bandwidth_up.value
                         + bytes_down / self.bandwidth_down.value) * 1e3
            self.rtt_ms.update(max(0.0, network_ms - serial_ms), now)

    def observe_timeout(self, bytes_up: int, waited_network_ms: float) -> None:
        """A request abandoned after `waited_network_ms` with no answer: the link is at least
        that slow for this size. Pull the uplink estimate down so the prediction for such a
        request is no lower than what was seen (a censored sample)."""
        with self._lock:
            predicted = self.snapshot()
            serial_ms = waited_network_ms - predicted.rtt_ms
            if serial_ms <= 0:
                return
            implied_up = bytes_up / serial_ms * 1e3
            if implied_up < self.bandwidth_up.value:
                self.bandwidth_up.update(implied_up)


class ServerEstimator:
    """Per tier: queue delay (from the `tierwise-queue-ms` header), and per model the ratio of
    measured to profiled compute time, which corrects the profile online."""

    def __init__(self, alpha: float = 0.2) -> None:
        self.alpha = alpha
        self.queue_ms = Ewma(0.0, alpha)
        self.compute_ratio: dict[str, Ewma] = {}
        self._lock = threading.Lock()

    def observe(self, model: str, compute_ms: float, profiled_ms: float | None,
                queue_ms: float) -> None:
        with self._lock:
            self.queue_ms.update(queue_ms)
            if profiled_ms and profiled_ms > 0 and compute_ms > 0:
                ratio = self.compute_ratio.setdefault(model, Ewma(1.0, self.alpha))
                # bounded: one outlier (a GC pause, a cold cache) must not swing plans
                ratio.update(min(max(compute_ms / profiled_ms, 0.2), 5.0))

    def ratio(self, model: str) -> float:
        ewma = self.compute_ratio.get(model)
        return ewma.value if ewma else 1.0
