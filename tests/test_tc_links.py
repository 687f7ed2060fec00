"""Kernel-enforced links: real TCP through real veth pairs, shaped by tc tbf in the kernel.

Skipped where they cannot run (not root, no iproute2, no network namespaces or tbf).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import tierwise.net.tc as tc_module
from tierwise.bench.processes import namespaced_tier_server
from tierwise.net.tc import (
    NamespaceLinks,
    TcUnavailableError,
    tc_unavailable_reason,
)

_reason = tc_unavailable_reason()
if _reason is not None:
    pytest.skip(_reason, allow_module_level=True)

SINK_PORT = 9000
# A plain TCP peer inside the namespace. Request: b"u" or b"d", then 8 bytes of n.
# "u": read n bytes and discard them, answer with the count; "d": send n bytes.
SINK = r"""
import socket, sys
server = socket.create_server((sys.argv[1], int(sys.argv[2])))
while True:
    conn, _ = server.accept()
    with conn:
        mode = conn.recv(1)
        n = int.from_bytes(conn.recv(8, socket.MSG_WAITALL), "big")
        if mode == b"u":
            got = 0
            while got < n:
                chunk = conn.recv(1 << 16)
                if not chunk:
                    break
                got += len(chunk)
            conn.sendall(got.to_bytes(8, "big"))
        else:
            conn.sendall(b"d" * n)
"""


@pytest.fixture(scope="module")
def links() -> Iterator[NamespaceLinks]:
    with NamespaceLinks(["edge"], {"edge": (1e6, 1e6)}) as links:
        address = links.address("edge")
        links.popen("edge", [sys.executable, "-c", SINK, address, str(SINK_PORT)])
        deadline = time.monotonic() + 10
        while True:  # until the sink listens
            try:
                socket.create_connection((address, SINK_PORT), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield links


def _connect(links: NamespaceLinks) -> socket.socket:
    """Connected (handshake done) before any clock starts."""
    return socket.create_connection((links.address("edge"), SINK_PORT), timeout=30)


def upload_seconds(links: NamespaceLinks, nbytes: int) -> float:
    with _connect(links) as conn:
        conn.sendall(b"u" + nbytes.to_bytes(8, "big"))
        start = time.perf_counter()
        conn.sendall(b"x" * nbytes)
        received = int.from_bytes(conn.recv(8, socket.MSG_WAITALL), "big")
        elapsed = time.perf_counter() - start
    assert received == nbytes
    return elapsed


def download_seconds(links: NamespaceLinks, nbytes: int) -> float:
    with _connect(links) as conn:
        start = time.perf_counter()
        conn.sendall(b"d" + nbytes.to_bytes(8, "big"))
        received = 0
        while received < nbytes:
            chunk = conn.recv(1 << 16)
            assert chunk, "the sink closed early"
            received += len(chunk)
        return time.perf_counter() - start


def assert_rate(nbytes: int, seconds: float, rate: float) -> None:
    measured = nbytes / seconds
    assert 0.75 * rate <= measured <= 1.25 * rate, (
        f"{nbytes} B in {seconds:.3f} s = {measured:.0f} B/s, set {rate:.0f} B/s")


def test_uplink_is_shaped_and_rate_changes(links: NamespaceLinks) -> None:
    links.set_rate("edge", 200_000, 10_000_000)
    assert_rate(300_000, upload_seconds(links, 300_000), 200_000)
    links.set_rate("edge", 50_000, 10_000_000)
    assert_rate(75_000, upload_seconds(links, 75_000), 50_000)
    assert "edge up 50KB/s down 10MB/s" in links.describe()


def test_downlink_is_shaped_and_rate_changes(links: NamespaceLinks) -> None:
    links.set_rate("edge", 10_000_000, 500_000)
    assert_rate(750_000, download_seconds(links, 750_000), 500_000)
    links.set_rate("edge", 10_000_000, 100_000)
    assert_rate(150_000, download_seconds(links, 150_000), 100_000)


def test_directions_are_independent(links: NamespaceLinks) -> None:
    """A slower reverse direction leaves a transfer alone: it only carries the ACKs."""
    links.set_rate("edge", 2_000_000, 200_000)
    assert_rate(1_000_000, upload_seconds(links, 1_000_000), 2_000_000)
    links.set_rate("edge", 200_000, 2_000_000)
    assert_rate(1_000_000, download_seconds(links, 1_000_000), 2_000_000)


def test_rate_changes_while_traffic_flows(links: NamespaceLinks) -> None:
    """100 KB at 50 KB/s for 1 s, then the rest at 500 KB/s: about 1.1 s, not 2 s."""
    links.set_rate("edge", 10_000_000, 50_000)
    speed_up = threading.Timer(1.0, links.set_rate, args=("edge", 10_000_000, 500_000))
    speed_up.start()
    try:
        seconds = download_seconds(links, 100_000)
    finally:
        speed_up.join()
    assert 0.9 < seconds < 1.5


def test_one_kilobyte_per_second_still_carries_full_packets(links: NamespaceLinks) -> None:
    """The bucket holds a full frame, so full-size packets pass (a smaller one stalls TCP).

    The first ~1.5 KB after idle pass at once (the bucket's credit), so 2 KB take well under
    2 s; the point is that they arrive at all, and not instantly.
    """
    links.set_rate("edge", 1000, 1000)  # a full bucket, as after any idle period
    assert 0.2 < upload_seconds(links, 2000) < 3.0
    links.set_rate("edge", 1000, 1000)
    assert 0.2 < download_seconds(links, 2000) < 3.0


def test_namespaced_tier_server_serves_a_model(models_dir: Path) -> None:
    image = {"name": "image", "datatype": "UINT8", "shape": [1, 1, 28, 28], "data": [0] * 784}
    with NamespaceLinks(["edge"], {"edge": (2e6, 5e6)}) as links, namespaced_tier_server(
        links, "edge", models_dir
    ) as url:
        assert url == f"http://{links.address('edge')}:8000"
        response = httpx.post(f"{url}/v2/models/fmnist-device/infer",
                              json={"inputs": [image]}, timeout=30, trust_env=False)
        assert response.status_code == 200, response.text
        (logits,) = [out for out in response.json()["outputs"] if out["name"] == "logits"]
        assert logits["shape"] == [1, 10]


def test_cleanup_removes_namespaces_veths_and_processes() -> None:
    with NamespaceLinks(["edge", "cloud"], {"edge": (1e6, 1e6), "cloud": (1e5, 1e5)}) as links:
        namespaces = [links.namespace("edge"), links.namespace("cloud")]
        addresses = [links.address("edge"), links.address("cloud")]
        assert len(set(addresses)) == 2
        assert set(namespaces) <= set(_netns_list())
        sleeper = links.popen("cloud", [sys.executable, "-c", "import time; time.sleep(60)"])
    assert sleeper.poll() is not None
    assert not set(namespaces) & set(_netns_list())
    root_addresses = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True,
                                    text=True, check=True).stdout
    for address in addresses:
        assert f"{address[:-1]}1/" not in root_addresses


def test_unsupported_rates_are_refused_up_front() -> None:
    with pytest.raises(ValueError, match="below the supported"):
        NamespaceLinks(["edge"], {"edge": (10, 1e6)})
    with pytest.raises(ValueError, match="no rates"):
        NamespaceLinks(["edge"], {})


def test_a_failed_setup_cleans_up_and_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    real_run = tc_module._run

    def tc_fails(command: list[str]) -> str:
        if command[0] == "tc":
            raise TcUnavailableError(f"`{' '.join(command)}` failed (2): no tbf here")
        return real_run(command)

    monkeypatch.setattr(tc_module, "_run", tc_fails)
    before = set(_netns_list())
    with pytest.raises(TcUnavailableError, match="no tbf here"), NamespaceLinks(
        ["edge"], {"edge": (1e6, 1e6)}
    ):
        pass
    assert set(_netns_list()) <= before


def _netns_list() -> list[str]:
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return [line.split()[0] for line in listing.stdout.splitlines() if line.strip()]
