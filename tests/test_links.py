import threading

import pytest

from tierwise.config import LinkConfig
from tierwise.net.shaping import TRANSFER_EXTENSION, shaped_client


def test_uplink_takes_bytes_over_rate(echo_url: str) -> None:
    link = LinkConfig(bandwidth_up="250KB/s", bandwidth_down="10MB/s", rtt_ms=0)
    with shaped_client(echo_url, link) as client:
        client.post("/", content=b"w")  # connect outside the measurement
        response = client.post("/", content=b"u" * 100_000)
    transfer = response.extensions[TRANSFER_EXTENSION]
    expected_ms = transfer.bytes_up / 250_000 * 1e3  # 4 ms per KB: ~400 ms
    assert transfer.bytes_up >= 100_000
    assert transfer.upload_ms == pytest.approx(expected_ms, rel=0.15)


def test_downlink_and_rtt_are_enforced(echo_url: str) -> None:
    link = LinkConfig(bandwidth_up="10MB/s", bandwidth_down="500KB/s", rtt_ms=40)
    with shaped_client(echo_url, link) as client:
        client.post("/", content=b"w")
        response = client.post("/", content=b"u", headers={"X-Reply-Bytes": "100000"})
    transfer = response.extensions[TRANSFER_EXTENSION]
    assert len(response.content) == 100_000
    expected_ms = 40 + transfer.bytes_down / 500_000 * 1e3  # ~240 ms
    assert transfer.total_ms == pytest.approx(expected_ms, rel=0.15)


def test_concurrent_transfers_share_the_link(echo_url: str) -> None:
    link = LinkConfig(bandwidth_up="500KB/s", bandwidth_down="10MB/s", rtt_ms=0)
    with shaped_client(echo_url, link) as client:
        client.post("/", content=b"w")
        times: list[float] = []

        def send() -> None:
            response = client.post("/", content=b"u" * 50_000)
            times.append(response.extensions[TRANSFER_EXTENSION].total_ms)

        threads = [threading.Thread(target=send) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    # four 50 KB bodies on one 500 KB/s pipe: the last is through after ~400 ms, not ~100 ms
    assert max(times) == pytest.approx(400, rel=0.2)
