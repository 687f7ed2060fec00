"""The emulated link at rate 0 (an outage) and at tiny rates: bytes wait for the rate to come
back, and every wait ends by the request's abort time. Real HTTP on loopback."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from tierwise.config import LinkConfig
from tierwise.net.shaping import (
    ABORT_AT_EXTENSION,
    TRANSFER_EXTENSION,
    EmulatedLink,
    shaped_client,
)


def _link(up: str = "100KB/s", down: str = "10MB/s") -> EmulatedLink:
    return EmulatedLink(LinkConfig(bandwidth_up=up, bandwidth_down=down, rtt_ms=0))


def _later(delay_s: float, action: object) -> None:
    timer = threading.Timer(delay_s, action)  # type: ignore[arg-type]
    timer.daemon = True
    timer.start()


def test_a_transfer_caught_in_an_outage_resumes_when_it_ends(echo_url: str) -> None:
    link = _link(up="100KB/s")
    with shaped_client(echo_url, link) as client:
        client.post("/", content=b"w")
        _later(0.2, lambda: link.set_rates(bandwidth_up=0))
        _later(0.7, lambda: link.set_rates(bandwidth_up=100_000))
        response = client.post("/", content=b"u" * 50_000)
    transfer = response.extensions[TRANSFER_EXTENSION]
    # 0.5 s of bytes at 100 KB/s plus the 0.5 s outage in the middle
    expected_ms = transfer.bytes_up / 100_000 * 1e3 + 500
    assert response.status_code == 200
    assert transfer.upload_ms == pytest.approx(expected_ms, rel=0.15)


@pytest.mark.parametrize("rate", [0.0, 1.0, 1e-9])
def test_a_dead_or_near_dead_uplink_gives_up_at_the_abort_time(echo_url: str,
                                                                rate: float) -> None:
    link = _link()
    with shaped_client(echo_url, link) as client:
        client.post("/", content=b"w")
        link.set_rates(bandwidth_up=rate)
        began = time.perf_counter()
        with pytest.raises(httpx.WriteTimeout):
            client.post("/", content=b"u" * 20_000,
                        extensions={ABORT_AT_EXTENSION: began + 0.3})
        waited_s = time.perf_counter() - began
        assert 0.29 <= waited_s < 0.6
        # the abandoned bytes left the pipe: nothing is booked behind them
        link.set_rates(bandwidth_up=1e6)
        began = time.perf_counter()
        assert client.post("/", content=b"u" * 1000).status_code == 200
        assert time.perf_counter() - began < 0.2


def test_without_an_abort_time_the_httpx_timeout_bounds_the_link(echo_url: str) -> None:
    link = _link(up="1B/s")  # a 1 KB request would take 17 minutes
    with shaped_client(echo_url, link, timeout_s=0.3) as client:
        began = time.perf_counter()
        with pytest.raises(httpx.TimeoutException):
            client.post("/", content=b"u" * 1000)
        assert time.perf_counter() - began < 0.6


def test_a_dead_downlink_gives_up_at_the_abort_time(echo_url: str) -> None:
    link = _link(down="10MB/s")
    with shaped_client(echo_url, link) as client:
        client.post("/", content=b"w")
        link.set_rates(bandwidth_down=0)
        began = time.perf_counter()
        with pytest.raises(httpx.ReadTimeout):
            client.post("/", content=b"u", headers={"X-Reply-Bytes": "5000"},
                        extensions={ABORT_AT_EXTENSION: began + 0.3})
        assert 0.29 <= time.perf_counter() - began < 0.6


def test_closing_a_link_abandons_a_transfer_stuck_in_an_outage(echo_url: str) -> None:
    link = _link(up="0.001B/s")
    with shaped_client(echo_url, link, timeout_s=60) as client:
        _later(0.2, link.close)
        began = time.perf_counter()
        with pytest.raises(httpx.WriteTimeout):
            client.post("/", content=b"u" * 100)
        assert time.perf_counter() - began < 0.5


def test_a_bad_rate_is_refused_with_its_value() -> None:
    link = _link()
    with pytest.raises(ValueError, match=r"expected a finite rate ≥ 0.*-5"):
        link.set_rates(bandwidth_up=-5)
    with pytest.raises(ValueError, match="nan"):
        link.set_rates(bandwidth_down=float("nan"))
