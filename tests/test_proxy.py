"""The shaping TCP proxy, against real servers on loopback: rates, sharing, delay, failures."""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from tierwise.net.proxy import ShapingProxy
from waiting import wait_for

TOLERANCE = 0.15


class LoopbackServer:
    """A TCP server on 127.0.0.1 that runs `handle` on each connection in its own thread."""

    def __init__(self, handle: Callable[[socket.socket], None],
                 listener: socket.socket | None = None) -> None:
        if listener is None:
            listener = socket.socket()
            listener.bind(("127.0.0.1", 0))
        listener.listen()
        self.listener = listener
        self.handle = handle
        self.address: tuple[str, int] = listener.getsockname()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(connection,), daemon=True).start()

    def _serve(self, connection: socket.socket) -> None:
        with connection, contextlib.suppress(OSError):
            self.handle(connection)

    def close(self) -> None:
        # shutdown wakes the blocked accept(); close alone does not on Linux
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self._thread.join(2)


def sink(received: queue.Queue[tuple[int, float]]) -> Callable[[socket.socket], None]:
    """Reads to EOF; reports (bytes, perf_counter time the last of them arrived)."""

    def handle(connection: socket.socket) -> None:
        total, last_at = 0, 0.0
        while data := connection.recv(65536):
            total, last_at = total + len(data), time.perf_counter()
        received.put((total, last_at))

    return handle


def source(nbytes: int) -> Callable[[socket.socket], None]:
    def handle(connection: socket.socket) -> None:
        connection.sendall(os.urandom(nbytes))

    return handle


def echo(connection: socket.socket) -> None:
    while data := connection.recv(65536):
        connection.sendall(data)
    connection.shutdown(socket.SHUT_WR)


def receive_all(connection: socket.socket) -> tuple[bytes, float]:
    """Everything up to EOF, and the perf_counter time its last byte arrived."""
    chunks, last_at = [], 0.0
    while data := connection.recv(65536):
        chunks.append(data)
        last_at = time.perf_counter()
    return b"".join(chunks), last_at


@pytest.fixture
def servers() -> Iterator[Callable[..., LoopbackServer]]:
    started: list[LoopbackServer] = []

    def start(handle: Callable[[socket.socket], None],
              listener: socket.socket | None = None) -> LoopbackServer:
        started.append(LoopbackServer(handle, listener))
        return started[-1]

    yield start
    for server in started:
        server.close()


def assert_close_to(measured_s: float, expected_s: float) -> None:
    assert abs(measured_s - expected_s) <= TOLERANCE * expected_s, (
        f"took {measured_s:.3f} s, expected {expected_s:.3f} s ± {TOLERANCE:.0%}")


def test_upload_crosses_at_the_uplink_rate(servers: Callable[..., LoopbackServer]) -> None:
    received: queue.Queue[tuple[int, float]] = queue.Queue()
    target = servers(sink(received))
    with ShapingProxy(target.address, 250_000, None) as proxy, \
            socket.create_connection(proxy.address) as client:
        started = time.perf_counter()
        client.sendall(os.urandom(200_000))
        client.shutdown(socket.SHUT_WR)
        total, last_at = received.get(timeout=5)
        print(f"200 KB up at 250 KB/s: {last_at - started:.3f} s (expected 0.800 s)")
        assert total == 200_000
        assert_close_to(last_at - started, 0.8)
        assert (proxy.bytes_up, proxy.bytes_down) == (200_000, 0)


def test_download_crosses_at_the_downlink_rate(servers: Callable[..., LoopbackServer]) -> None:
    target = servers(source(400_000))
    with ShapingProxy(target.address, None, 500_000) as proxy:
        started = time.perf_counter()
        with socket.create_connection(proxy.address) as client:
            data, last_at = receive_all(client)
        print(f"400 KB down at 500 KB/s: {last_at - started:.3f} s (expected 0.800 s)")
        assert len(data) == 400_000
        assert_close_to(last_at - started, 0.8)
        assert (proxy.bytes_up, proxy.bytes_down) == (0, 400_000)


def test_unshaped_proxy_passes_bytes_through_unchanged(
        servers: Callable[..., LoopbackServer]) -> None:
    target = servers(echo)
    payload = os.urandom(1_000_000)
    with ShapingProxy(target.address, None, None, name="plain") as proxy, \
            socket.create_connection(proxy.address) as client:

        def send() -> None:
            client.sendall(payload)
            client.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send)
        sender.start()
        echoed, _ = receive_all(client)
        sender.join()
        assert echoed == payload
        assert proxy.counters() == {
            "name": "plain", "bytes_up": 1_000_000, "bytes_down": 1_000_000, "connections": 1,
            "up_bytes_per_s": None, "down_bytes_per_s": None, "emulated": True,
        }


def test_concurrent_connections_share_one_link(servers: Callable[..., LoopbackServer]) -> None:
    received: queue.Queue[tuple[int, float]] = queue.Queue()
    target = servers(sink(received))
    with ShapingProxy(target.address, 250_000, None) as proxy, \
            socket.create_connection(proxy.address) as first, \
            socket.create_connection(proxy.address) as second:
        started = time.perf_counter()
        for client in (first, second):
            client.sendall(os.urandom(100_000))
            client.shutdown(socket.SHUT_WR)
        reports = [received.get(timeout=5) for _ in range(2)]
        finished = sorted(last_at - started for _, last_at in reports)
        print(f"2 x 100 KB up at 250 KB/s: finished at {finished[0]:.3f} s and "
              f"{finished[1]:.3f} s (expected 0.800 s together)")
        assert [total for total, _ in reports] == [100_000, 100_000]
        # never faster than one 250 KB/s link for both: 200 KB take at least 0.8 s (a loaded
        # machine may only add time, so the upper bound is loose)
        assert 0.8 * (1 - TOLERANCE) <= finished[1] <= 0.8 * 3, finished
        # interleaved on the link, not one after the other (that would end the first at
        # half the time of the second)
        assert finished[0] >= 0.75 * finished[1], finished
        assert proxy.counters()["connections"] == 2
        assert proxy.bytes_up == 200_000


def test_delay_adds_half_the_rtt_each_way_without_slowing_the_rate(
        servers: Callable[..., LoopbackServer]) -> None:
    target = servers(echo)
    with ShapingProxy(target.address, 250_000, None, rtt_ms=200) as proxy, \
            socket.create_connection(proxy.address) as client:
        started = time.perf_counter()
        client.sendall(b"x")
        assert client.recv(1) == b"x"
        round_trip_s = time.perf_counter() - started
        print(f"1-byte round trip at RTT 200 ms: {round_trip_s * 1e3:.0f} ms")
        assert 0.2 <= round_trip_s < 0.25

    received: queue.Queue[tuple[int, float]] = queue.Queue()
    target = servers(sink(received))
    with ShapingProxy(target.address, 250_000, None, rtt_ms=200) as proxy, \
            socket.create_connection(proxy.address) as client:
        started = time.perf_counter()
        client.sendall(os.urandom(200_000))
        client.shutdown(socket.SHUT_WR)
        _, last_at = received.get(timeout=5)
        print(f"200 KB up at 250 KB/s, RTT 200 ms: {last_at - started:.3f} s "
              f"(expected 0.900 s)")
        assert_close_to(last_at - started, 0.8 + 0.1)


def test_slow_link_pushes_back_on_the_sender(servers: Callable[..., LoopbackServer]) -> None:
    received: queue.Queue[tuple[int, float]] = queue.Queue()
    target = servers(sink(received))
    block = bytes(65536)
    with ShapingProxy(target.address, 250_000, None) as proxy, \
            socket.create_connection(proxy.address) as client:
        client.setblocking(False)
        accepted, until = 0, time.perf_counter() + 0.4
        while time.perf_counter() < until:
            try:
                accepted += client.send(block)
            except BlockingIOError:
                time.sleep(0.005)
        print(f"sender got {accepted / 1e6:.1f} MB into a 250 KB/s link in 0.4 s")
        # kernel buffers on both sides of the loopback hop, and a chunk in the proxy; a
        # proxy that read eagerly would take hundreds of MB in that time
        assert accepted < 16_000_000
        assert proxy.bytes_up < 0.6 * 250_000


def test_refused_target_closes_the_client_and_the_proxy_serves_on(
        servers: Callable[..., LoopbackServer]) -> None:
    # bound but not yet listening: connections to it are refused until listen()
    parked = socket.socket()
    parked.bind(("127.0.0.1", 0))
    with ShapingProxy(parked.getsockname(), 250_000, 250_000) as proxy:
        with socket.create_connection(proxy.address) as client:
            client.settimeout(2)
            started = time.perf_counter()
            with contextlib.suppress(ConnectionResetError):  # a FIN or a reset will do
                assert client.recv(1) == b""
            assert time.perf_counter() - started < 0.5

        servers(echo, listener=parked)
        with socket.create_connection(proxy.address) as client:
            client.settimeout(2)
            client.sendall(b"still serving")
            client.shutdown(socket.SHUT_WR)
            assert receive_all(client)[0] == b"still serving"
        assert proxy.counters()["connections"] == 2


def test_close_returns_promptly_with_an_idle_connection_open(
        servers: Callable[..., LoopbackServer], caplog: pytest.LogCaptureFixture) -> None:
    target = servers(echo)
    proxy = ShapingProxy(target.address, 250_000, 250_000, rtt_ms=50).start()
    with socket.create_connection(proxy.address) as client:
        client.settimeout(2)
        client.sendall(b"ping")
        assert client.recv(4) == b"ping"
        wait_for(lambda: proxy.bytes_down == 4, timeout_s=2, what="the echo to be counted")
        started = time.perf_counter()
        proxy.close()
        assert time.perf_counter() - started < 2
        assert client.recv(1) == b""  # the proxy closed its end
    proxy.close()  # idempotent
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]
    with pytest.raises(OSError):
        socket.create_connection(proxy.address, timeout=1)


def test_bad_rate_names_the_argument() -> None:
    with pytest.raises(ValueError, match="down_bytes_per_s"):
        ShapingProxy(("127.0.0.1", 9), 250_000, 0)
