"""Link emulation in the client transport: real transfers over real sockets, only slowed.

`ShapedTransport` wraps a real httpx transport. Each direction of a link is a FIFO pipe
(`LinkDirection`) whose rate may change at any moment, 0 included (an outage): the bytes
queued on it drain in order at the rate in force while they drain (a fluid queue), so a rate
change takes effect at once for every byte still queued, and a transfer caught in an outage
resumes where it stopped when the rate comes back. The pipe is shared by every request on
the link, as on a real bottleneck, with no burst allowance (an idle pipe saves nothing up),
counted from when the transport is handed the request. Half the RTT is added each way as
propagation delay. The request body really leaves the socket at the link's pace (in paced
chunks; the next chunk queues as soon as the previous one is through the pipe, so the
propagation delay is paid once, not per chunk); the response is read off the socket and
handed over when the emulated downlink would have delivered it.

Every wait on the link ends by the request's abort time (`ABORT_AT_EXTENSION`; without one,
its httpx timeout, the largest of its read and write values, counted from when the transport
got the request: a socket that made no progress for that long would have timed out): the
transfer is then abandoned, its bytes not yet through leave the pipe (the requests behind it
move up), and the request raises `httpx.WriteTimeout` (uplink) or `httpx.ReadTimeout`
(downlink). So no request outlives its bound on a dead or near-dead link, at any rate ≥ 0.
`EmulatedLink.close()` abandons every transfer still on the link at once (for when an
emulation ends while a probe is stuck behind an outage).

The same wrapper measures what each transfer actually took (`Transfer`), which is what the
bandwidth and RTT estimators learn from.
"""

from __future__ import annotations

import math
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import httpx

from tierwise.config import LinkConfig

CHUNK_BYTES = 4096
TRANSFER_EXTENSION = "tierwise_transfer"
# request extension: a time.perf_counter() by which the answer must be in, else
# httpx.TimeoutException (the client's deadline, enforced while the link is still sending)
ABORT_AT_EXTENSION = "tierwise_abort_at"
# bytes still queued below this count as through (float rounding in rate x time)
_ROUNDING_BYTES = 1e-6


def _check_rate(rate_bytes_per_s: float) -> float:
    rate = float(rate_bytes_per_s)
    if not (rate >= 0 and math.isfinite(rate)):
        raise ValueError(f"rate_bytes_per_s: expected a finite rate ≥ 0 (0: an outage), got "
                         f"{rate_bytes_per_s!r}")
    return rate


class Hold:
    """Bytes queued on a `LinkDirection`: `remaining` still to go through the pipe;
    `through_at`, once they are all through, the `time.perf_counter()` the last one was."""

    __slots__ = ("remaining", "through_at")

    def __init__(self, nbytes: float) -> None:
        self.remaining = float(nbytes)
        self.through_at: float | None = None


class LinkDirection:
    """One direction of a link: a FIFO pipe that carries `rate_bytes_per_s` (≥ 0; 0 is an
    outage), which may change while bytes are queued on it (`set_rate`).

    `enqueue` queues bytes, `wait` blocks until they are through (or an abort time passes,
    when they are dropped from the pipe), `reserve` queues bytes and says when they will be
    through if the rate holds (for callers that pace themselves, like the shaping proxy).
    """

    def __init__(self, rate_bytes_per_s: float) -> None:
        self._rate = _check_rate(rate_bytes_per_s)
        self._queue: deque[Hold] = deque()
        now = time.perf_counter()
        self._updated_at = now    # the queue is drained up to this time
        self._idle_since = now    # the pipe has carried nothing since (when the queue is empty)
        self._closed = False
        self._changed = threading.Condition()

    @property
    def rate_bytes_per_s(self) -> float:
        return self._rate

    @rate_bytes_per_s.setter
    def rate_bytes_per_s(self, rate_bytes_per_s: float) -> None:
        self.set_rate(rate_bytes_per_s)

    def set_rate(self, rate_bytes_per_s: float) -> None:
        """Change the rate now: the bytes queued so far drained at the old rate until now,
        the rest drain at the new one (0: not at all, until the rate comes back)."""
        rate = _check_rate(rate_bytes_per_s)
        with self._changed:
            now = time.perf_counter()
            self._drain(now)
            self._rate = rate
            if not self._queue:  # no idle time carried across a rate change
                self._idle_since = now
            self._changed.notify_all()

    def _drain(self, now: float) -> None:
        """Move the pipe on to `now` at the current rate: the queue's head drains first."""
        carried = self._rate * max(0.0, now - self._updated_at)
        clock = self._updated_at
        while self._queue:
            head = self._queue[0]
            if head.remaining > carried + _ROUNDING_BYTES:
                head.remaining -= carried
                break
            if self._rate > 0:
                clock += head.remaining / self._rate
            carried = max(0.0, carried - head.remaining)
            head.remaining, head.through_at = 0.0, min(clock, now)
            self._queue.popleft()
            if not self._queue:
                self._idle_since = min(clock, now)
        self._updated_at = now

    def enqueue(self, nbytes: float, ready_at: float | None = None) -> Hold:
        """Queue `nbytes` behind what is on the pipe. `ready_at` (a past `perf_counter()`)
        says they were ready to go earlier: if the pipe has been idle since, they are
        credited with that idle time, as if queued then."""
        with self._changed:
            now = time.perf_counter()
            self._drain(now)
            hold = Hold(nbytes)
            if self._closed:
                return hold  # never through: `wait` reports it abandoned
            if not self._queue and ready_at is not None and ready_at < now:
                began = max(ready_at, self._idle_since)
                hold.remaining = max(0.0, nbytes - self._rate * (now - began))
                if hold.remaining <= _ROUNDING_BYTES:
                    hold.remaining = 0.0
                    hold.through_at = began + (nbytes / self._rate if self._rate > 0 else 0.0)
                    self._idle_since = hold.through_at
                    return hold
            self._queue.append(hold)
            return hold

    def _through_estimate(self, hold: Hold, now: float) -> float:
        """When `hold` is through if the rate holds (inf in an outage)."""
        ahead = 0.0
        for queued in self._queue:
            ahead += queued.remaining
            if queued is hold:
                break
        if ahead <= _ROUNDING_BYTES:
            return now
        return now + ahead / self._rate if self._rate > 0 else math.inf

    def wait(self, hold: Hold, abort_at: float = math.inf) -> bool:
        """Block until `hold` is through (True), or until `abort_at` (a `perf_counter()`)
        passes or the link is closed (False: its bytes still queued are dropped)."""
        with self._changed:
            while True:
                now = time.perf_counter()
                self._drain(now)
                if hold.through_at is not None:
                    return True
                if self._closed or now >= abort_at:
                    self._drop(hold, now)
                    return False
                wake_at = min(self._through_estimate(hold, now), abort_at)
                # woken early by any rate change, a dropped transfer ahead, or close()
                self._changed.wait(None if wake_at == math.inf
                                   else min(wake_at - now, threading.TIMEOUT_MAX))

    def drop(self, hold: Hold) -> None:
        """Abandon `hold`: its bytes not yet through leave the pipe."""
        with self._changed:
            self._drop(hold, time.perf_counter())

    def _drop(self, hold: Hold, now: float) -> None:
        self._drain(now)
        if hold in self._queue:
            self._queue.remove(hold)
            if not self._queue:
                self._idle_since = now
            self._changed.notify_all()  # the holds behind it move up

    def reserve(self, nbytes: int, ready_at: float | None = None) -> float:
        """Queue `nbytes`, ready to go at `ready_at` (default now); return the perf_counter
        time their last byte is through if the rate holds (inf in an outage)."""
        hold = self.enqueue(nbytes, ready_at)
        with self._changed:
            if hold.through_at is not None:
                return hold.through_at
            return self._through_estimate(hold, time.perf_counter())

    def close(self) -> None:
        """Abandon every transfer on the pipe (their `wait` returns False) and every later one."""
        with self._changed:
            self._closed = True
            self._queue.clear()
            self._changed.notify_all()


class EmulatedLink:
    """Both directions and the RTT of one device→tier link, from its `LinkConfig`.

    `pace=False` adds only the RTT: the bandwidth is enforced elsewhere (the kernel's `tc`
    between network namespaces, `tierwise.net.tc`). `set_rates` changes the link while it
    carries traffic (rates ≥ 0, 0 an outage): the bandwidth benchmarks replay traces through
    it.
    """

    def __init__(self, config: LinkConfig, pace: bool = True) -> None:
        self.pace = pace
        self.up = LinkDirection(config.bandwidth_up)
        self.down = LinkDirection(config.bandwidth_down)
        self.rtt_s = config.rtt_ms / 1e3
        self._closed = threading.Event()

    def set_rates(self, bandwidth_up: float | None = None, bandwidth_down: float | None = None,
                  rtt_ms: float | None = None) -> None:
        if bandwidth_up is not None:
            self.up.set_rate(bandwidth_up)
        if bandwidth_down is not None:
            self.down.set_rate(bandwidth_down)
        if rtt_ms is not None:
            if not (rtt_ms >= 0 and math.isfinite(rtt_ms)):
                raise ValueError(f"rtt_ms: expected a finite time ≥ 0, got {rtt_ms!r}")
            self.rtt_s = rtt_ms / 1e3

    def propagate(self, until: float, abort_at: float = math.inf) -> bool:
        """Wait out propagation delay until `until` (a `perf_counter()`): False, early, when
        `abort_at` comes first or the link is closed."""
        remaining = min(until, abort_at) - time.perf_counter()
        if remaining > 0 and self._closed.wait(remaining):
            return False
        return not self._closed.is_set() and until <= abort_at

    def close(self) -> None:
        """Abandon every transfer on the link, now and later: the emulation is over."""
        self._closed.set()
        self.up.close()
        self.down.close()

    def describe(self) -> str:
        from tierwise.config import format_rate

        def rate(direction: LinkDirection) -> str:
            value = direction.rate_bytes_per_s
            return format_rate(value) if value > 0 else "0 (outage)"

        rates = (f"up {rate(self.up)}, down {rate(self.down)}" if self.pace
                 else "bandwidth by the kernel (tc)")
        return f"emulated: {rates}, RTT {self.rtt_s * 1e3:g} ms"


@dataclass
class Transfer:
    """What one request/response actually took on the wire, as the device saw it."""

    bytes_up: int
    bytes_down: int
    upload_ms: float   # first byte of the request until its last byte was sent
    total_ms: float    # request start until the response was delivered


def _abort_at(request: httpx.Request, started: float) -> float:
    """When the link gives up on `request`: its abort time, else its httpx timeout (the
    largest read or write value) after `started`, else never."""
    abort_at = request.extensions.get(ABORT_AT_EXTENSION)
    if abort_at is not None:
        return float(abort_at)
    timeouts = request.extensions.get("timeout") or {}
    bounds = [timeouts[key] for key in ("read", "write") if timeouts.get(key) is not None]
    return started + max(bounds) if bounds else math.inf


def _header_bytes(headers: httpx.Headers) -> int:
    # What HTTP/1.1 puts on the wire for the header block, near enough: "k: v\r\n" each.
    return sum(len(k) + len(v) + 4 for k, v in headers.raw) + 2


class _PacedBody(httpx.SyncByteStream):
    """The request body, released onto the socket no faster than the uplink carries it:
    chunk k leaves half an RTT after its last byte is through the pipe."""

    def __init__(self, body: bytes, link: EmulatedLink, overhead_bytes: int,
                 started: float, abort_at: float, request: httpx.Request) -> None:
        self.body = body
        self.link = link
        self.overhead_bytes = overhead_bytes
        self.started = started
        self.abort_at = abort_at
        self.request = request
        self.sent_at = 0.0

    def _give_up(self) -> httpx.WriteTimeout:
        return httpx.WriteTimeout("the request's deadline passed on the link (uplink)",
                                  request=self.request)

    def __iter__(self) -> Iterator[bytes]:
        link, up = self.link, self.link.up
        starts = range(0, max(len(self.body), 1), CHUNK_BYTES)
        sizes = [len(self.body[start:start + CHUNK_BYTES]) for start in starts]
        sizes[0] += self.overhead_bytes  # the header block goes first
        if not link.pace:  # the kernel paces: only the propagation delay, once
            if not link.propagate(self.started + link.rtt_s / 2, self.abort_at):
                raise self._give_up()
            yield from (self.body[start:start + CHUNK_BYTES] for start in starts)
            self.sent_at = time.perf_counter()
            return
        # The request (header block included) was ready to go when the transport got it;
        # httpx's own work since then overlaps the emulated transmission, as a NIC would.
        hold: Hold | None = up.enqueue(sizes[0], ready_at=self.started)
        try:
            for index, start in enumerate(starts):
                assert hold is not None
                if not up.wait(hold, self.abort_at):
                    raise self._give_up()
                through = hold.through_at
                assert through is not None
                # the next chunk queues now, so the pipe does not idle while this one
                # propagates
                hold = (up.enqueue(sizes[index + 1], ready_at=through)
                        if index + 1 < len(sizes) else None)
                if not link.propagate(through + link.rtt_s / 2, self.abort_at):
                    raise self._give_up()
                chunk = self.body[start:start + CHUNK_BYTES]
                if chunk:
                    yield chunk
        finally:  # abandoned (deadline, or httpx stopped reading us): free the pipe
            if hold is not None:
                up.drop(hold)
        self.sent_at = time.perf_counter()


class ShapedTransport(httpx.BaseTransport):
    """An httpx transport that enforces an `EmulatedLink` around a real transport.

    `link=None` passes traffic through unshaped but still measures it.
    """

    def __init__(self, inner: httpx.BaseTransport, link: EmulatedLink | None) -> None:
        self.inner = inner
        self.link = link

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        started = time.perf_counter()
        body = request.read()
        # the request line: "POST /path HTTP/1.1\r\n"
        overhead = _header_bytes(request.headers) + len(request.method) + len(request.url.raw_path)
        overhead += 12
        abort_at = _abort_at(request, started)
        if self.link is not None:
            paced = _PacedBody(body, self.link, overhead, started, abort_at, request)
            request.stream = paced
        response = self.inner.handle_request(request)
        try:
            content = response.read()
        finally:
            response.close()
        uploaded = time.perf_counter()
        down_bytes = len(content) + _header_bytes(response.headers) + 17
        if self.link is not None:
            uploaded = paced.sent_at or uploaded
            through = time.perf_counter()
            if self.link.pace:
                hold = self.link.down.enqueue(down_bytes)
                if not self.link.down.wait(hold, abort_at):
                    raise httpx.ReadTimeout("the request's deadline passed on the link "
                                            "(downlink)", request=request)
                assert hold.through_at is not None
                through = hold.through_at
            if not self.link.propagate(through + self.link.rtt_s / 2, abort_at):
                raise httpx.ReadTimeout("the request's deadline passed on the link (downlink)",
                                        request=request)
        finished = time.perf_counter()
        transfer = Transfer(
            bytes_up=len(body) + overhead,
            bytes_down=down_bytes,
            upload_ms=(uploaded - started) * 1e3,
            total_ms=(finished - started) * 1e3,
        )
        shaped = httpx.Response(
            status_code=response.status_code,
            headers=response.headers,
            content=content,
            request=request,
            extensions={**response.extensions, TRANSFER_EXTENSION: transfer},
        )
        return shaped

    def close(self) -> None:
        self.inner.close()


def shaped_client(base_url: str, link: LinkConfig | EmulatedLink | None,
                  timeout_s: float = 10.0, verify: ssl.SSLContext | bool = True
                  ) -> httpx.Client:
    """A keep-alive httpx client to `base_url` whose traffic crosses the emulated `link`;
    `verify`: the TLS context an https URL is checked with (`tierwise.net.tls`)."""
    if isinstance(link, LinkConfig):
        emulated = EmulatedLink(link) if link.emulate else None
    else:
        emulated = link
    # TCP_NODELAY: the body follows the header block in a separate write, and Nagle's
    # algorithm would hold it back for the server's ACK.
    nodelay = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
    transport = ShapedTransport(httpx.HTTPTransport(retries=0, socket_options=nodelay,
                                                    verify=verify), emulated)
    return httpx.Client(base_url=base_url, transport=transport, timeout=timeout_s)
