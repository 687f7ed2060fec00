"""The monitor loop: drift, metrics and telemetry of every answered inference, off the request
path.

A request only appends its trace (with its input's mean and standard deviation, the only
thing about the input that is kept) to a deque; a thread takes what is there every
`MONITOR_PERIOD_S` and runs the drift check, the metrics and the telemetry hand-off over it.
A drift check (a KS test every 25 inferences) must not delay the request that triggers it,
and a thread woken per request would cost every request a GIL hand-over: so no wake-up, the
thread polls.
"""

from __future__ import annotations

import collections
import logging
import threading
from pathlib import Path

import numpy as np

from tierwise.active.device import DeviceSampling
from tierwise.active.queue import SampleBudget, SampleQueue
from tierwise.active.samplers import device_sampler
from tierwise.client.trace import Trace
from tierwise.config import Config
from tierwise.monitor.drift import DriftMonitor
from tierwise.monitor.metrics import ClientMetrics
from tierwise.monitor.telemetry import Telemetry
from tierwise.net.tls import client_context
from tierwise.registry.subscriber import registry_token

log = logging.getLogger("tierwise.client")
# The monitor thread wakes when an inference is handed over, then lets the next ones gather
# for this long: telemetry sees a trace within about this much of its answer.
MONITOR_PERIOD_S = 0.01


def telemetry_for(config: Config, url: str, device_id: str) -> Telemetry:
    """Store-and-forward of this device's traces to the collector at `url` (its outbox under
    the data directory, one per device id)."""
    settings = config.telemetry
    return Telemetry(
        url, device_id=device_id,
        token=registry_token(config.registry.token, config.registry_dir),
        outbox_path=Path(config.data_dir) / "telemetry" / f"outbox-{device_id}.db",
        flush_s=settings.flush_s, batch_size=settings.batch_size,
        commit_s=settings.commit_s, verify=client_context(config.tls) or True)


def sampling_for(config: Config, url: str, device_id: str,
                 drift: DriftMonitor | None = None,
                 metrics: ClientMetrics | None = None) -> DeviceSampling:
    """Active learning on this device (the `active` config section): its samplers, its
    sample queue under the data directory (one per device id), sending to the label queue at
    `url` (empty: select and queue only); with `active.on_drift`, selecting once `drift` has
    raised an alert."""
    settings = config.active
    queue = SampleQueue(Path(config.data_dir) / "active" / f"queue-{device_id}.db",
                        SampleBudget(settings.max_samples, settings.max_bytes,
                                     settings.period_s), max_queued=settings.max_queued)
    token = registry_token(config.registry.token, config.registry_dir) if url else ""
    return DeviceSampling(
        [device_sampler(name) for name in settings.samplers], queue, url or None,
        device_id=device_id, token=token, min_score=settings.min_score,
        keep_inputs=settings.keep_inputs, flush_s=settings.flush_s,
        batch_size=settings.batch_size, verify=client_context(config.tls) or True,
        gate=(lambda: bool(drift.alerts)) if settings.on_drift and drift is not None else None,
        on_sent=metrics.count_samples_sent if metrics is not None else None)


class Monitor:
    """Watches the answered inferences of one client.

    Args:
        metrics: the client's Prometheus metrics; every trace is counted in them.
        drift: the drift detectors every trace's statistics go through (None: no drift
            check); their alerts go into the trace, the metrics and the telemetry.
    """

    def __init__(self, metrics: ClientMetrics, drift: DriftMonitor | None = None) -> None:
        self.metrics = metrics
        self.drift = drift
        self.telemetry: Telemetry | None = None
        self._answered: collections.deque[Trace] = collections.deque()
        self._lock = threading.Lock()  # one batch at a time, in answer order
        self._stop = threading.Event()
        self._handed_over = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, telemetry: Telemetry | None = None) -> None:
        """Start the thread; every trace then goes on to `telemetry` too, where given."""
        if self._thread is None:
            self.telemetry = telemetry
            self._thread = threading.Thread(target=self._loop, daemon=True,
                                            name="tierwise-monitor")
            self._thread.start()

    def submit(self, trace: Trace, batch: np.ndarray) -> None:
        """Hand one answered inference to the thread, with its input statistics: of the
        pixels in 0..1 for a uint8 image, of the values themselves for any other input
        (the input itself never leaves the device)."""
        values = batch.astype(np.float32)
        if batch.dtype == np.uint8:
            values *= 1 / 255
        trace.input_mean = float(values.mean())
        trace.input_std = float(values.std())
        self._answered.append(trace)
        self._handed_over.set()

    def drain(self) -> None:
        """Run drift, metrics and telemetry over every inference handed over so far, now."""
        with self._lock:
            while self._answered:
                trace = self._answered.popleft()
                alerts = []
                try:  # monitoring must never take the client down, nor one step the next
                    if self.drift is not None:
                        alerts = self.drift.update({"input_mean": trace.input_mean,
                                                    "input_std": trace.input_std,
                                                    "confidence": trace.confidence,
                                                    "label": trace.label})
                        trace.drift_alerts = [alert.__dict__ for alert in alerts]
                    self.metrics.observe(trace, alerts)
                except Exception:
                    log.exception("drift or metrics of an inference failed")
                if self.telemetry is not None:
                    self.telemetry.record(trace)

    def close(self) -> None:
        """Stop the thread, then drain what a request racing with the close handed over."""
        self._stop.set()
        self._handed_over.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.drain()

    def _loop(self) -> None:
        while True:
            self._handed_over.wait()
            if self._stop.is_set():
                break
            self._handed_over.clear()
            self.drain()
            self._stop.wait(MONITOR_PERIOD_S)  # let a burst gather into one drain
        self.drain()
