"""Link emulation in the client transport: real transfers over real sockets, only slowed.

`ShapedTransport` wraps a real httpx transport. Each direction of a link is a FIFO pipe of a
fixed rate (`LinkDirection`): a transfer of n bytes occupies it for n / rate seconds after
whatever is already queued on it — serialisation delay, shared by every request on the link,
as on a real bottleneck (a token bucket with no burst allowance), counted from when the
transport is handed the request. Half the RTT is added each way as propagation delay. The
request body really leaves the socket at the link's pace (it is sent in paced chunks); the
response is read off the socket and handed over when the emulated
downlink would have delivered it.

The same wrapper measures what each transfer actually took (`Transfer`), which is what the
bandwidth and RTT estimators learn from.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx

from tierwise.config import LinkConfig

CHUNK_BYTES = 4096
TRANSFER_EXTENSION = "tierwise_transfer"
# request extension: a time.perf_counter() by which the answer must be in, else
# httpx.TimeoutException (the client's deadline, enforced while the link is still sending)
ABORT_AT_EXTENSION = "tierwise_abort_at"


class LinkDirection:
    """One direction of a link: a FIFO pipe that carries `rate_bytes_per_s`."""

    def __init__(self, rate_bytes_per_s: float) -> None:
        self.rate_bytes_per_s = rate_bytes_per_s
        self._free_at = 0.0
        self._lock = threading.Lock()

    def reserve(self, nbytes: int, ready_at: float | None = None) -> float:
        """Queue `nbytes`, ready to go at `ready_at` (default now); return the perf_counter
        time their last byte is through."""
        with self._lock:
            start = max(time.perf_counter() if ready_at is None else ready_at, self._free_at)
            self._free_at = start + nbytes / self.rate_bytes_per_s
            return self._free_at


class EmulatedLink:
    """Both directions and the RTT of one device→tier link, from its `LinkConfig`.

    `pace=False` adds only the RTT: the bandwidth is enforced elsewhere (the kernel's `tc`
    between network namespaces, `tierwise.net.tc`). `set_rates` changes the link while it
    carries traffic: the bandwidth benchmarks replay traces through it.
    """

    def __init__(self, config: LinkConfig, pace: bool = True) -> None:
        self.pace = pace
        self.up = LinkDirection(config.bandwidth_up)
        self.down = LinkDirection(config.bandwidth_down)
        self.rtt_s = config.rtt_ms / 1e3

    def set_rates(self, bandwidth_up: float | None = None, bandwidth_down: float | None = None,
                  rtt_ms: float | None = None) -> None:
        if bandwidth_up is not None:
            self.up.rate_bytes_per_s = bandwidth_up
        if bandwidth_down is not None:
            self.down.rate_bytes_per_s = bandwidth_down
        if rtt_ms is not None:
            self.rtt_s = rtt_ms / 1e3

    def describe(self) -> str:
        from tierwise.config import format_rate

        rates = (f"up {format_rate(self.up.rate_bytes_per_s)}, down "
                 f"{format_rate(self.down.rate_bytes_per_s)}" if self.pace
                 else "bandwidth by the kernel (tc)")
        return f"emulated: {rates}, RTT {self.rtt_s * 1e3:g} ms"


@dataclass
class Transfer:
    """What one request/response actually took on the wire, as the device saw it."""

    bytes_up: int
    bytes_down: int
    upload_ms: float   # first byte of the request until its last byte was sent
    total_ms: float    # request start until the response was delivered


def _sleep_until(deadline: float, abort_at: float = float("inf"),
                 request: httpx.Request | None = None) -> None:
    """Sleep until `deadline`; if that is past `abort_at`, sleep until then and time out."""
    remaining = min(deadline, abort_at) - time.perf_counter()
    if remaining > 0:
        time.sleep(remaining)
    if deadline > abort_at:
        raise httpx.ReadTimeout("the request's deadline passed on the link", request=request)


def _header_bytes(headers: httpx.Headers) -> int:
    # What HTTP/1.1 puts on the wire for the header block, near enough: "k: v\r\n" each.
    return sum(len(k) + len(v) + 4 for k, v in headers.raw) + 2


class _PacedBody(httpx.SyncByteStream):
    """The request body, released onto the socket no faster than the uplink carries it."""

    def __init__(self, body: bytes, link: EmulatedLink, overhead_bytes: int,
                 started: float, abort_at: float) -> None:
        self.body = body
        self.link = link
        self.overhead_bytes = overhead_bytes
        self.started = started
        self.abort_at = abort_at
        self.sent_at = 0.0

    def __iter__(self) -> Iterator[bytes]:
        # The request (header block included) was ready to go when the transport got it;
        # httpx's own work since then overlaps the emulated transmission, as a NIC would.
        ready_at: float | None = self.started
        extra = self.overhead_bytes
        for start in range(0, max(len(self.body), 1), CHUNK_BYTES):
            chunk = self.body[start:start + CHUNK_BYTES]
            through = (self.link.up.reserve(len(chunk) + extra, ready_at) if self.link.pace
                       else time.perf_counter())
            ready_at, extra = None, 0
            _sleep_until(through + self.link.rtt_s / 2, self.abort_at)
            if chunk:
                yield chunk
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
        abort_at = request.extensions.get(ABORT_AT_EXTENSION, float("inf"))
        if self.link is not None:
            paced = _PacedBody(body, self.link, overhead, started, abort_at)
            request.stream = paced
        response = self.inner.handle_request(request)
        try:
            content = response.read()
        finally:
            response.close()
        uploaded = time.perf_counter()
        if self.link is not None:
            uploaded = paced.sent_at or uploaded
            down_bytes = len(content) + _header_bytes(response.headers) + 17
            through = (self.link.down.reserve(down_bytes) if self.link.pace
                       else time.perf_counter())
            _sleep_until(through + self.link.rtt_s / 2, abort_at, request)
        finished = time.perf_counter()
        transfer = Transfer(
            bytes_up=len(body) + overhead,
            bytes_down=len(content) + _header_bytes(response.headers) + 17,
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
                  timeout_s: float = 10.0) -> httpx.Client:
    """A keep-alive httpx client to `base_url` whose traffic crosses the emulated `link`."""
    if isinstance(link, LinkConfig):
        emulated = EmulatedLink(link) if link.emulate else None
    else:
        emulated = link
    # TCP_NODELAY: the body follows the header block in a separate write, and Nagle's
    # algorithm would hold it back for the server's ACK.
    nodelay = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
    transport = ShapedTransport(httpx.HTTPTransport(retries=0, socket_options=nodelay), emulated)
    return httpx.Client(base_url=base_url, transport=transport, timeout=timeout_s)
