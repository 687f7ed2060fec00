"""A shaping TCP proxy: link emulation for traffic we do not own (Flower's gRPC).

`ShapedTransport` (`tierwise.net.shaping`) shapes our own HTTP requests from inside the
client. A Flower SuperNode talks gRPC to its SuperLink through its own stack, so its link is
emulated on the wire instead: the SuperNode connects to this proxy on loopback, the proxy
connects on to the real target and carries the bytes both ways, each direction through one
`LinkDirection` shared by every connection through the proxy (a real bottleneck is shared the
same way), plus half the RTT each way as propagation delay.

A direction is read in chunks of at most `CHUNK_BYTES`. A chunk is read off the socket only
when the link has drained the one before it (so a sender blocks as on a slow link: the proxy
holds at most a chunk per direction plus the bytes in propagation), released when its
reservation on the link is through, and delivered half an RTT later. The proxy counts the
bytes it delivered: TCP payload, so gRPC and HTTP/2 framing included.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from types import TracebackType

from tierwise.net.shaping import LinkDirection

CHUNK_BYTES = 16 * 1024
# chunks through the link but still in propagation, per direction and connection: room for
# 4 MiB, i.e. a bandwidth-delay product of 40 MB/s x 100 ms one way
IN_FLIGHT_CHUNKS = 256
CONNECT_TIMEOUT_S = 10.0
CLOSE_TIMEOUT_S = 5.0

log = logging.getLogger("tierwise.proxy")

# one queue per direction and connection: (perf_counter time to deliver, bytes), None at EOF
_InFlight = asyncio.Queue[tuple[float, bytes] | None]


async def _sleep_until(deadline: float) -> None:
    remaining = deadline - time.perf_counter()
    if remaining > 0:
        await asyncio.sleep(remaining)


class ShapingProxy:
    """Forwards every TCP connection made to `listen` on to `target`, shaped both ways.

    target: (host, port) every connection is forwarded to.
    up_bytes_per_s: client → target rate, shared by all connections; None carries the bytes
        unshaped (they are still counted).
    down_bytes_per_s: target → client rate, likewise.
    rtt_ms: round-trip propagation delay; half is added to each direction (default 0).
    listen: where to listen (default 127.0.0.1 on a port the OS picks; see `address`).
    name: a label for logs and `counters()`.
    tap: called with ("up" | "down", bytes) for every chunk delivered: what really crossed the
    link, for tests that inspect it (called on the proxy's thread; keep it quick).

    `start()` serves from an asyncio loop in a background thread; `close()` stops it. A
    connection whose target cannot be reached is closed (and logged); others go on.
    """

    def __init__(self, target: tuple[str, int], up_bytes_per_s: float | None,
                 down_bytes_per_s: float | None, rtt_ms: float = 0.0,
                 listen: tuple[str, int] = ("127.0.0.1", 0), name: str = "",
                 tap: Callable[[str, bytes], None] | None = None) -> None:
        for argument, rate in (("up_bytes_per_s", up_bytes_per_s),
                               ("down_bytes_per_s", down_bytes_per_s)):
            if rate is not None and not rate > 0:
                raise ValueError(f"{argument}: expected a rate > 0 bytes/s or None, got {rate!r}")
        if not rtt_ms >= 0:
            raise ValueError(f"rtt_ms: expected a delay >= 0 ms, got {rtt_ms!r}")
        self.target = target
        self.up_bytes_per_s = up_bytes_per_s
        self.down_bytes_per_s = down_bytes_per_s
        self.rtt_ms = rtt_ms
        self.listen = listen
        self.name = name
        self.tap = tap  # sees every chunk as it is delivered: ("up" | "down", bytes)
        self._up = LinkDirection(up_bytes_per_s) if up_bytes_per_s is not None else None
        self._down = LinkDirection(down_bytes_per_s) if down_bytes_per_s is not None else None
        self._one_way_delay_s = rtt_ms / 2e3
        self._lock = threading.Lock()
        self._bytes_up = 0
        self._bytes_down = 0
        self._connections = 0
        self._address: tuple[str, int] | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    # -- the thread's side ------------------------------------------------------------------

    def start(self) -> ShapingProxy:
        """Listen and serve in a background thread; return once listening."""
        if self._thread is not None or self._closed:
            raise RuntimeError(f"proxy {self.name!r}: start() once, before close()")
        self._thread = threading.Thread(target=self._run, name=f"shaping-proxy {self.name}",
                                        daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._startup_error is not None:
            self._thread.join()
            raise self._startup_error
        return self

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:
            if self._ready.is_set():
                log.exception("proxy %r stopped on an error", self.name)
            else:
                self._startup_error = exc
        finally:
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._handle, *self.listen, limit=CHUNK_BYTES)
        host, port = server.sockets[0].getsockname()[:2]
        self._address = (host, port)
        self._ready.set()
        log.info("proxy %r: %s:%d → %s:%d, %s", self.name, host, port, *self.target,
                 self._describe())
        await self._stop.wait()
        server.close()
        for handler in list(self._handlers):
            handler.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await server.wait_closed()

    async def _handle(self, client_reader: asyncio.StreamReader,
                      client_writer: asyncio.StreamWriter) -> None:
        handler = asyncio.current_task()
        assert handler is not None
        self._handlers.add(handler)
        with self._lock:
            self._connections += 1
        target_writer: asyncio.StreamWriter | None = None
        tasks: list[asyncio.Task[None]] = []
        try:
            try:
                target_reader, opened = await asyncio.wait_for(
                    asyncio.open_connection(*self.target, limit=CHUNK_BYTES), CONNECT_TIMEOUT_S)
                target_writer = opened  # closed in `finally`
            except (OSError, TimeoutError) as exc:
                log.warning("proxy %r: cannot reach %s:%d (%s); closing the client connection",
                            self.name, *self.target, str(exc) or type(exc).__name__)
                return
            up: _InFlight = asyncio.Queue(IN_FLIGHT_CHUNKS)
            down: _InFlight = asyncio.Queue(IN_FLIGHT_CHUNKS)
            tasks = [
                asyncio.create_task(self._pace(client_reader, self._up, up)),
                asyncio.create_task(self._deliver(up, opened, "up")),
                asyncio.create_task(self._pace(target_reader, self._down, down)),
                asyncio.create_task(self._deliver(down, client_writer, "down")),
            ]
            # Both directions end at EOF on their own (half-close); an error on either
            # (a reset, a write to a closed peer) ends the connection.
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                if task.exception() is not None:
                    log.debug("proxy %r: connection ends: %r", self.name, task.exception())
        except asyncio.CancelledError:
            # close() cancels us. Ending normally rather than cancelled spares Python 3.11's
            # asyncio.streams a logged CancelledError (its done-callback asks a cancelled
            # task for its exception; fixed in 3.12).
            pass
        except Exception:
            log.exception("proxy %r: connection failed", self.name)
        finally:
            for task in tasks:
                task.cancel()
            client_writer.close()
            if target_writer is not None:
                target_writer.close()
            self._handlers.discard(handler)

    async def _pace(self, reader: asyncio.StreamReader, link: LinkDirection | None,
                    in_flight: _InFlight) -> None:
        """Read one direction no faster than its link drains; queue what is through."""
        while True:
            data = await reader.read(CHUNK_BYTES)
            if not data:
                await in_flight.put(None)
                return
            through = link.reserve(len(data)) if link is not None else time.perf_counter()
            await _sleep_until(through)
            await in_flight.put((through + self._one_way_delay_s, data))

    async def _deliver(self, in_flight: _InFlight, writer: asyncio.StreamWriter,
                       direction: str) -> None:
        """Write each chunk when its propagation delay is over; pass EOF on."""
        while True:
            item = await in_flight.get()
            if item is None:
                if writer.can_write_eof() and not writer.is_closing():
                    writer.write_eof()
                return
            deliver_at, data = item
            await _sleep_until(deliver_at)
            if writer.is_closing():
                raise ConnectionResetError(f"the {direction} peer has gone")
            # counted before the write: the peer may read the bytes before write() returns
            with self._lock:
                if direction == "up":
                    self._bytes_up += len(data)
                else:
                    self._bytes_down += len(data)
            if self.tap is not None:
                self.tap(direction, data)
            writer.write(data)
            await writer.drain()

    # -- the caller's side ------------------------------------------------------------------

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) the proxy listens on."""
        if self._address is None:
            raise RuntimeError(f"proxy {self.name!r} is not listening: call start() first")
        return self._address

    @property
    def bytes_up(self) -> int:
        """Bytes delivered to the target so far."""
        with self._lock:
            return self._bytes_up

    @property
    def bytes_down(self) -> int:
        """Bytes delivered to clients so far."""
        with self._lock:
            return self._bytes_down

    def counters(self) -> dict:
        """Bytes each way and connections accepted so far, with the rates they crossed at."""
        with self._lock:
            return {
                "name": self.name,
                "bytes_up": self._bytes_up,
                "bytes_down": self._bytes_down,
                "connections": self._connections,
                "up_bytes_per_s": self.up_bytes_per_s,
                "down_bytes_per_s": self.down_bytes_per_s,
                "emulated": True,
            }

    def _describe(self) -> str:
        def rate(bytes_per_s: float | None) -> str:
            return "unshaped" if bytes_per_s is None else f"{bytes_per_s:g} B/s"

        return (f"up {rate(self.up_bytes_per_s)}, down {rate(self.down_bytes_per_s)}, "
                f"RTT {self.rtt_ms:g} ms")

    def close(self) -> None:
        """Close the listener and every connection, and join the thread. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._thread is None:
            return
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has already ended
                loop.call_soon_threadsafe(stop.set)
        self._thread.join(CLOSE_TIMEOUT_S)
        if self._thread.is_alive():
            log.warning("proxy %r: its thread did not stop within %g s", self.name,
                        CLOSE_TIMEOUT_S)

    def __enter__(self) -> ShapingProxy:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()
