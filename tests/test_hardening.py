"""Faults found by trying tierwise the way an attacker and a bad network would, each kind as
a test against real servers on loopback: decoder bombs and oversized payloads, requests of
too many rows, oversized headers and stalled bodies, malformed telemetry, markup in stored
ids, and overload answered 429 (issue "Hardening")."""

from __future__ import annotations

import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest

from tierwise.config import Config, TierConfig
from tierwise.planner.cost import PriceTable
from tierwise.planner.estimators import ServerEstimator
from tierwise.protocol.oip import encode_infer_request
from tierwise.runtime.session import load_models
from tierwise.server.app import create_app, serve_in_thread

MODEL = "fmnist-edge"
INFER = f"/v2/models/{MODEL}/infer"
LIMITS = TierConfig(max_rows_per_request=64, max_header_bytes=8 * 1024, body_timeout_s=1.0,
                    body_deadline_s=3.0, max_in_flight_per_client=2, compute_scale=100.0)


@pytest.fixture(scope="module")
def server(models_dir: Path) -> Iterator[str]:
    app = create_app("edge", LIMITS, load_models(models_dir, names=[MODEL]))
    with serve_in_thread(app) as url:
        yield url


def _codec_request(payloads: list[bytes], codec: str) -> tuple[bytes, dict[str, str]]:
    tensor = np.array(payloads, dtype=object)
    return encode_infer_request({"image": tensor}, binary=True,
                                input_parameters={"image": {"content_type": codec}})


def _png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims `width` x `height` 8-bit grey pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + \
            struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + \
        chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def _alive(url: str) -> None:
    image = np.zeros((1, 1, 28, 28), np.uint8)
    body, headers = encode_infer_request({"image": image}, binary=True)
    answer = httpx.post(url + INFER, content=body, headers=headers, timeout=30)
    assert answer.status_code == 200, answer.text


@pytest.mark.parametrize("payload, codec, expected", [
    (_png_header_only(20000, 20000), "png", "png"),        # a decompression bomb's header
    (_png_header_only(10000, 10000), "png", "expects"),    # big, not a bomb: the wrong size
    (b"\x00" * 200_000, "zstd", "more than any encoding"),  # longer than the tensor itself
    (b"\x28\xb5\x2f\xfd" + b"\x00" * 50, "zstd", "zstd"),  # not a zstd frame
], ids=["png-bomb-20000px", "png-10000px", "zstd-200KB", "zstd-garbage"])
def test_a_codec_payload_that_cannot_be_the_input_is_refused_with_400(
        server: str, payload: bytes, codec: str, expected: str) -> None:
    body, headers = _codec_request([payload], codec)
    answer = httpx.post(server + INFER, content=body, headers=headers, timeout=30)
    print(answer.status_code, answer.text[:200])
    assert answer.status_code == 400
    assert "'image'" in answer.text and expected in answer.text
    _alive(server)


def test_a_request_of_too_many_rows_is_refused_before_it_runs(server: str) -> None:
    for rows in (65, 20_000):
        body, headers = encode_infer_request(
            {"image": np.zeros((rows, 1, 28, 28), np.uint8)}, binary=True)
        answer = httpx.post(server + INFER, content=body, headers=headers, timeout=30)
        assert answer.status_code == 400, answer.text
        assert f"{rows:,} rows" in answer.text and "max_rows_per_request" in answer.text
    body, headers = encode_infer_request({"image": np.zeros((64, 1, 28, 28), np.uint8)},
                                         binary=True)
    assert httpx.post(server + INFER, content=body, headers=headers,
                      timeout=30).status_code == 200


def test_a_json_request_is_parsed_off_the_event_loop(server: str) -> None:
    # 64 rows as JSON numbers (~190 KB): parsed in a worker thread while /v2/health/live
    # keeps answering; the answer is right either way
    body, headers = encode_infer_request({"image": np.ones((64, 1, 28, 28), np.uint8)},
                                         binary=False)
    live_ms: list[float] = []
    stop = threading.Event()

    def poll() -> None:
        with httpx.Client(base_url=server) as http:
            while not stop.is_set():
                started = time.perf_counter()
                http.get("/v2/health/live")
                live_ms.append((time.perf_counter() - started) * 1e3)
    poller = threading.Thread(target=poll)
    poller.start()
    try:
        for _ in range(5):
            answer = httpx.post(server + INFER, content=body, headers=headers, timeout=30)
            assert answer.status_code == 200
    finally:
        stop.set()
        poller.join()
    print(f"{len(body):,} B JSON; /v2/health/live p50 {np.median(live_ms):.2f} ms, "
          f"max {max(live_ms):.1f} ms")
    assert live_ms


@pytest.mark.parametrize("header_bytes", [64 * 1024, 1024 * 1024])
def test_an_oversized_header_block_is_answered_431(server: str, header_bytes: int) -> None:
    answer = httpx.get(server + "/v2/health/live", headers={"x-padding": "a" * header_bytes},
                       timeout=30)
    assert answer.status_code == 431
    assert "max_header_bytes" in answer.text
    assert httpx.get(server + "/v2/health/live", timeout=30).status_code == 200


def test_a_stalled_body_is_answered_408_and_frees_the_server(server: str) -> None:
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(f"POST {INFER} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     f"content-length: 1000\r\n\r\n".encode() + b'{"inputs": [')
        started = time.perf_counter()
        answer = sock.recv(65536)
        waited = time.perf_counter() - started
    print(f"answered after {waited:.2f} s: {answer[:60]!r}")
    assert answer.startswith(b"HTTP/1.1 408")
    assert b"body_timeout_s" in answer
    assert 0.5 < waited < 20  # body_timeout_s 1 s, on a loaded machine
    _alive(server)


def test_a_header_still_arriving_is_refused_once_past_the_limit(server: str) -> None:
    # the head never ends: the server must answer while it arrives, not hold it all first
    host, port = server.removeprefix("http://").split(":")
    sent = 0
    answer = b""
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nhost: x\r\nx-padding: ")
        try:
            while sent < 1024 * 1024:
                sock.sendall(b"a" * 1024)
                sent += 1024
                time.sleep(0.002)
                sock.setblocking(False)
                try:
                    answer = sock.recv(65536)
                except BlockingIOError:
                    continue
                finally:
                    sock.setblocking(True)
                break
        except (BrokenPipeError, ConnectionResetError):
            pass
        if not answer:
            answer = sock.recv(65536)
    print(f"answered after {sent:,} header bytes: {answer[:60]!r}")
    assert answer.startswith(b"HTTP/1.1 431") and b"max_header_bytes" in answer
    assert sent < 512 * 1024  # refused within a few reads of the 8 KB limit, not at the end
    _alive(server)


def test_a_keep_alive_request_behind_a_long_body_is_not_taken_for_a_long_head(
        server: str) -> None:
    # one read holds the end of request 1's 20 KB body and the start of request 2's head:
    # the body's bytes are not the head's (the limit is 8 KB)
    host, port = server.removeprefix("http://").split(":")
    body = orjson.dumps({"ready": False, "padding": "a" * 20_000})
    first = (f"POST /v2/repository/index HTTP/1.1\r\nhost: x\r\ncontent-type: "
             f"application/json\r\ncontent-length: {len(body)}\r\n\r\n").encode() + body
    second = b"GET /v2/health/live HTTP/1.1\r\nhost: x\r\n"
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(first + second)
        time.sleep(0.2)
        sock.sendall(b"\r\n")
        answers = b""
        while answers.count(b"HTTP/1.1 ") < 2:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answers += chunk
    print(answers[:200])
    assert answers.startswith(b"HTTP/1.1 200") and answers.count(b"HTTP/1.1 200") == 2


def test_a_malformed_binary_header_outside_infer_is_a_400(server: str) -> None:
    # found by the fuzzer: the repository index reads the body as infer does
    answer = httpx.post(server + "/v2/repository/index", content=b"{}",
                        headers={"inference-header-content-length": "abc"}, timeout=30)
    assert answer.status_code == 400 and "Inference-Header-Content-Length" in answer.text


def test_a_body_that_trickles_in_is_answered_408_at_its_deadline(server: str) -> None:
    # a byte every 0.3 s never stalls for body_timeout_s (1 s); the deadline (3 s) ends it
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(f"POST {INFER} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     f"content-length: 1000\r\n\r\n".encode())
        started = time.perf_counter()
        sock.setblocking(False)
        answer = b""
        while not answer and time.perf_counter() - started < 20:
            try:
                sock.send(b" ")
                answer = sock.recv(65536)
            except BlockingIOError:
                time.sleep(0.3)
            except (BrokenPipeError, ConnectionResetError):
                break
        waited = time.perf_counter() - started
    print(f"answered after {waited:.2f} s: {answer[:80]!r}")
    assert answer.startswith(b"HTTP/1.1 408") and b"body_deadline_s" in answer
    assert 2.5 < waited < 20
    _alive(server)


def test_one_client_over_its_in_flight_limit_is_answered_429_with_retry_after(
        server: str) -> None:
    # compute_scale 100 keeps each request in the server for tens of ms; one device sends
    # 8 at once, more than its 2: the rest are refused at once, with a time to come back
    image = np.zeros((1, 1, 28, 28), np.uint8)
    body, headers = encode_infer_request({"image": image}, binary=True)
    answers: list[httpx.Response] = []

    def send(device: str) -> None:
        answers.append(httpx.post(server + INFER, content=body, timeout=30,
                                  headers={**headers, "tierwise-device": device}))
    threads = [threading.Thread(target=send, args=("busy",)) for _ in range(8)]
    threads.append(threading.Thread(target=send, args=("other",)))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    statuses = sorted(answer.status_code for answer in answers)
    print("statuses:", statuses)
    assert statuses.count(200) >= 3 and 429 in statuses and set(statuses) <= {200, 429}
    for answer in answers:
        if answer.status_code == 429:
            assert int(answer.headers["retry-after"]) >= 1
            assert "max_in_flight_per_client" in answer.text


def test_the_client_takes_429_as_load_not_an_outage(small_config: Config, models_dir: Path,
                                                    splits: object) -> None:
    from tierwise.client import Client
    from tierwise.planner.plans import Remote

    limits = TierConfig(max_in_flight_per_client=1, compute_scale=100.0)
    app = create_app("edge", limits, load_models(models_dir, names=[MODEL, "fmnist-device"]))
    with serve_in_thread(app) as url, Client(
            small_config, tier_urls={"edge": url}, plan=Remote("edge", MODEL),
            probe=False, device_id="one-device") as client:
        images = splits.test_x[:6]  # type: ignore[attr-defined]
        results = []

        def infer(image: np.ndarray) -> None:
            results.append(client.infer(image))
        threads = [threading.Thread(target=infer, args=(image,)) for image in images]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        refused = [r for r in results if r.trace.fallback and "429" in r.trace.fallback]
        print(f"{len(refused)} of {len(results)} answered on the device after a 429; queue "
              f"estimate {client.server_estimators['edge'].queue_estimate_ms():.0f} ms")
        assert len(results) == len(images)  # every request answered
        assert refused  # some were over the limit ...
        assert "edge" not in client.down  # ... and the tier is not taken for down
        assert client.server_estimators["edge"].queue_estimate_ms() > 0


def test_a_retry_after_penalty_runs_out() -> None:
    server = ServerEstimator()
    server.observe_overload(2.0, now=100.0)
    assert server.queue_estimate_ms(now=100.5) == pytest.approx(1500.0)
    assert server.queue_estimate_ms(now=103.0) == 0.0


def test_a_queue_reading_after_a_silence_replaces_the_old_estimate() -> None:
    server = ServerEstimator()
    for at in range(10):  # an overloaded site: every answer waited 80 ms in its queue
        server.observe("m", 0.0, None, 80.0, now=100.0 + at * 0.1)
    assert server.queue_estimate_ms(now=101.0) == pytest.approx(80.0)
    server.observe_queue(0.0, now=101.2)  # within QUEUE_STALE_S: smoothed, still high
    assert server.queue_estimate_ms(now=101.2) == pytest.approx(64.0)
    # the client moved away; its probe, seconds later, finds the queue drained
    server.observe_queue(0.5, now=105.0)
    assert server.queue_estimate_ms(now=105.0) == pytest.approx(0.5)


def test_the_abort_leaves_the_fallback_what_giving_up_has_taken() -> None:
    from tierwise.client.planning import remote_abort_at
    from tierwise.planner.plans import Remote
    from tierwise.planner.policy import SLO, Decision

    decision = Decision(Remote("edge", "m"), 20.0, 0.9, 0.0, True, "test", 3)
    slo = SLO(40.0, 0.9)
    # as profiled: 40 ms less the 1 ms fallback and the 2 ms margin
    assert remote_abort_at(100.0, slo, decision, 1.0, 10.0) == pytest.approx(100.037)
    # giving up and falling back has taken 9 ms on this (loaded) device: abort sooner
    assert remote_abort_at(100.0, slo, decision, 1.0, 10.0, overrun_ms=9.0) == \
        pytest.approx(100.029)
    # an infeasible plan has no deadline to keep: the timeout bounds it
    late = Decision(Remote("edge", "m"), 80.0, 0.9, 0.0, False, "test", 3)
    assert remote_abort_at(100.0, slo, late, 1.0, 10.0, overrun_ms=9.0) == 110.0


# -- telemetry and stored text --------------------------------------------------------------

def _good_trace() -> dict:
    from tierwise.client.trace import StageTrace, Trace

    return Trace(plan="local(m)", stages=[StageTrace("local", "device", "m", "1", 1.0, 1.0)],
                 total_ms=1.0, slo={"deadline_ms": 100.0, "min_accuracy": 0.5,
                                    "keep_input_on_device": False}).to_dict()


@pytest.mark.parametrize("change, field", [
    ({"emulated": 5}, "emulated"),
    ({"stages": [{"kind": "remote", "model": "m", "model_version": "", "total_ms": 0.0,
                  "compute_ms": 0.0, "error": "timeout"}]}, "stages[0].tier"),
    ({"stages": [{"kind": "local", "tier": "device", "model": "m", "model_version": "1",
                  "total_ms": 1.0, "compute_ms": 1.0, "batch_size": "abc"}]},
     "stages[0].batch_size"),
    ({"bytes_up": 1e19}, "bytes_up"),
    ({"label": 1e300}, "label"),
    ({"total_ms": None}, "total_ms"),
    ({"id": "[link=https://x]"}, "id"),
    ({"confidence": 7}, "confidence"),
])
def test_the_collector_refuses_a_malformed_trace_naming_the_field(
        cloud_config: Config, change: dict, field: str) -> None:
    from tierwise.cloud import hosted
    from tierwise.monitor.collector import Collector
    from tierwise.monitor.report import compute_views
    from tierwise.registry.subscriber import registry_token
    from tierwise.server.app import TierServer

    config = cloud_config
    token = registry_token("", config.registry_dir)
    good, bad = _good_trace(), {**_good_trace(), **change}
    app = hosted(TierServer("cloud", config.tier("cloud"), {}), config)
    with serve_in_thread(app) as url, httpx.Client(
            base_url=url, headers={"authorization": f"Bearer {token}"}) as http:
        refused = http.post("/telemetry/v1/traces",
                            content=orjson.dumps({"device": "d1", "traces": [good, bad]}))
        assert refused.status_code == 400, refused.text
        assert f"traces[1].{field}" in refused.text
        taken = http.post("/telemetry/v1/traces",
                          content=orjson.dumps({"device": "d1", "traces": [good]}))
        assert taken.status_code == 200 and taken.json()["accepted"] == 1
        http.post("/dashboard/login", data={"token": token})  # a session cookie
        data = http.get("/dashboard/data")
        assert data.status_code == 200, data.text  # the views over what was stored
    records = Collector(config.telemetry.collector_path(config.data_dir)).records()
    assert [r["id"] for r in records] == [good["id"]]  # the refused batch stored nothing
    views = compute_views(records, PriceTable.of(config), None)
    assert views.summary()["requests"] == 1


def test_the_report_skips_a_stored_record_that_is_not_a_trace(small_config: Config) -> None:
    from tierwise.monitor.report import compute_views

    good = _good_trace()
    records = [{"id": "a", "device": "d", "started_at": 1.0, "total_ms": 1.0, "tier": "device",
                "plan": "local(m)", "escalated": 0, "fallback": 0, "deadline_missed": 0,
                "model": "m", "model_version": "1", "input_mean": None, "input_std": None,
                "confidence": None, "label": None, "cost_usd": 0.0,
                "record": orjson.dumps(trace)} for trace in ({**good, "emulated": 5}, good)]
    views = compute_views(records, PriceTable.of(small_config), None)
    summary = views.summary()
    assert summary["requests"] == 1 and summary["unreadable_records"] == 1


@pytest.mark.parametrize("device", ["[/]", "[link=https://evil]x", "a\x1bb", "../x", ""])
def test_a_device_id_that_is_not_plain_is_refused_by_the_registry(
        cloud_config: Config, device: str) -> None:
    from tierwise.cloud import hosted
    from tierwise.registry.store import Registry
    from tierwise.registry.subscriber import registry_token
    from tierwise.server.app import TierServer

    config = cloud_config
    Registry(config.registry_dir).rollouts()  # an empty registry index
    assert Registry(config.registry_dir).index_location.is_file()
    token = registry_token("", config.registry_dir)
    app = hosted(TierServer("cloud", config.tier("cloud"), {}), config)
    with serve_in_thread(app) as url:
        answer = httpx.get(url + "/registry/v1/deployments/stable", params={"device": device},
                           headers={"authorization": f"Bearer {token}"}, timeout=30)
    assert answer.status_code == 400, answer.text
    assert "device" in answer.text


def test_stored_text_is_printed_as_text_not_markup() -> None:
    from rich.console import Console

    from tierwise.registry.cli import _plain

    console = Console(record=True, width=200, force_terminal=True)
    for stored in ("[/]", "[link=https://evil]click[/link]", "a\x1b[31mred", "[bold]x"):
        console.print(_plain(stored))  # no MarkupError, no link, no colour
    text = console.export_text()
    assert "[/]" in text and "[link=https://evil]" in text and "\\x1b" in text
    assert "\x1b[31m" not in console.export_text(styles=True)
