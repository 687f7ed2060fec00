"""The tier server, for real: uvicorn on loopback, real models, real clients."""

from __future__ import annotations

import asyncio
import socket
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest
import tritonclient.http as triton

from tierwise.config import TierConfig
from tierwise.data import Splits
from tierwise.protocol.oip import (
    HEADER_LENGTH,
    decode_infer_response,
    encode_infer_request,
    parse_header_length,
)
from tierwise.runtime.batcher import DynamicBatcher
from tierwise.runtime.session import OnnxModel, load_models
from tierwise.server.app import create_app, serve_in_thread

MODEL = "fmnist-edge"
INFER = f"/v2/models/{MODEL}/infer"
MAX_BODY_BYTES = 64 * 1024


@pytest.fixture(scope="module")
def models(models_dir: Path) -> dict[str, OnnxModel]:
    return load_models(models_dir)


@pytest.fixture(scope="module")
def server_url(models: dict[str, OnnxModel]) -> Iterator[str]:
    tier = TierConfig(max_batch_size=32, max_queue_delay_ms=0, max_body_bytes=MAX_BODY_BYTES)
    app = create_app("edge", tier, models)
    with serve_in_thread(app) as url:
        yield url


@pytest.fixture()
def client(server_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server_url, timeout=30) as http:
        yield http


def infer(client: httpx.Client, images: np.ndarray, *, binary: bool,
          binary_outputs: bool | None = None, path: str = INFER) -> httpx.Response:
    body, headers = encode_infer_request(
        {"image": images}, binary=binary,
        binary_outputs=binary if binary_outputs is None else binary_outputs)
    return client.post(path, content=body, headers=headers)


def logits_of(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    decoded = decode_infer_response(response.content,
                                    parse_header_length(response.headers.get(HEADER_LENGTH)))
    return decoded.outputs["logits"]


def assert_serves(client: httpx.Client, splits: Splits, models: dict[str, OnnxModel]) -> None:
    images = splits.test_x[:2]
    np.testing.assert_allclose(logits_of(infer(client, images, binary=True)),
                               models[MODEL].run(images), rtol=1e-6, atol=1e-6)


def test_health_and_server_metadata(client: httpx.Client) -> None:
    assert client.get("/v2/health/live").status_code == 200
    assert client.get("/v2/health/ready").status_code == 200
    metadata = client.get("/v2").json()
    assert metadata["name"] == "tierwise"
    assert metadata["version"]
    assert "binary_tensor_data" in metadata["extensions"]


def test_model_metadata_and_readiness(client: httpx.Client, models: dict[str, OnnxModel]) -> None:
    for path in (f"/v2/models/{MODEL}", f"/v2/models/{MODEL}/versions/1"):
        metadata = client.get(path).json()
        assert metadata == {
            "name": MODEL, "versions": ["1"], "platform": "onnxruntime_onnx",
            "inputs": [{"name": "image", "datatype": "UINT8", "shape": [-1, 1, 28, 28]}],
            "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}],
        }
    for name in models:
        assert client.get(f"/v2/models/{name}/ready").status_code == 200
        assert client.get(f"/v2/models/{name}/versions/1/ready").status_code == 200


@pytest.mark.parametrize("binary", [True, False])
def test_infer_round_trip_matches_onnx_runtime(client: httpx.Client, splits: Splits,
                                               models: dict[str, OnnxModel],
                                               binary: bool) -> None:
    images = splits.test_x[:16]
    expected = models[MODEL].run(images)
    for path in (INFER, f"/v2/models/{MODEL}/versions/1/infer"):
        response = infer(client, images, binary=binary, path=path)
        np.testing.assert_allclose(logits_of(response), expected, rtol=1e-6, atol=1e-6)
        expected_type = "application/octet-stream" if binary else "application/json"
        assert response.headers["content-type"] == expected_type
        assert float(response.headers["tierwise-compute-ms"]) > 0
        assert float(response.headers["tierwise-queue-ms"]) >= 0
        assert int(response.headers["tierwise-batch-size"]) >= 16
        assert response.headers["tierwise-model-version"] == "1"
        assert response.headers["tierwise-tier"] == "edge"
    # JSON in, binary out: each direction is chosen on its own.
    mixed = infer(client, images, binary=False, binary_outputs=True)
    assert HEADER_LENGTH.lower() in mixed.headers
    np.testing.assert_allclose(logits_of(mixed), expected, rtol=1e-6, atol=1e-6)


def test_every_model_serves_its_own_outputs(client: httpx.Client, splits: Splits,
                                            models: dict[str, OnnxModel]) -> None:
    images = splits.test_x[:4]
    for name, model in models.items():
        if model.info.role != "full":
            continue  # split halves: tests/test_planner.py runs them end to end
        response = infer(client, images, binary=True, path=f"/v2/models/{name}/infer")
        np.testing.assert_allclose(logits_of(response), model.run(images), rtol=1e-6,
                                   atol=1e-6)


def test_tritonclient_works_unchanged(server_url: str, splits: Splits,
                                      models: dict[str, OnnxModel]) -> None:
    triton_client = triton.InferenceServerClient(url=server_url.removeprefix("http://"))
    try:
        assert triton_client.is_server_live() and triton_client.is_server_ready()
        assert triton_client.is_model_ready(MODEL)
        assert "binary_tensor_data" in triton_client.get_server_metadata()["extensions"]
        metadata = triton_client.get_model_metadata(MODEL, model_version="1")
        assert metadata["inputs"][0]["datatype"] == "UINT8"
        images = splits.test_x[:8]
        expected = models[MODEL].run(images)
        for binary_in in (True, False):
            for binary_out in (True, False, None):
                tensor = triton.InferInput("image", list(images.shape), "UINT8")
                tensor.set_data_from_numpy(images, binary_data=binary_in)
                outputs = None if binary_out is None else [
                    triton.InferRequestedOutput("logits", binary_data=binary_out)]
                result = triton_client.infer(MODEL, [tensor], outputs=outputs, request_id="t1")
                np.testing.assert_allclose(result.as_numpy("logits"), expected, rtol=1e-6,
                                           atol=1e-6)
                assert result.get_response()["id"] == "t1"
        with pytest.raises(triton.InferenceServerException, match="unknown model"):
            triton_client.get_model_metadata("no-such-model")
    finally:
        triton_client.close()


def test_concurrent_requests_are_batched(server_url: str, splits: Splits,
                                         models: dict[str, OnnxModel]) -> None:
    images = splits.test_x[:96]
    expected = models[MODEL].run(images)

    async def one(http: httpx.AsyncClient, index: int) -> tuple[np.ndarray, int]:
        body, headers = encode_infer_request({"image": images[index:index + 1]},
                                             binary=index % 2 == 0)
        response = await http.post(INFER, content=body, headers=headers)
        return logits_of(response), int(response.headers["tierwise-batch-size"])

    async def all_at_once() -> list[tuple[np.ndarray, int]]:
        limits = httpx.Limits(max_connections=len(images))
        async with httpx.AsyncClient(base_url=server_url, limits=limits, timeout=60) as http:
            return await asyncio.gather(*(one(http, index) for index in range(len(images))))

    answers = asyncio.run(all_at_once())
    for index, (logits, _) in enumerate(answers):
        np.testing.assert_allclose(logits[0], expected[index], rtol=1e-5, atol=1e-5)
    batch_sizes = [size for _, size in answers]
    assert max(batch_sizes) > 1, batch_sizes
    assert max(batch_sizes) <= 32  # max_batch_size


def good_binary_body(images: np.ndarray) -> tuple[bytes, dict[str, str]]:
    return encode_infer_request({"image": images}, binary=True)


def bad_requests(splits: Splits) -> list[tuple[str, str, str, bytes, dict[str, str], int, str]]:
    """(case, method, path, body, headers, status, words of the message)."""
    image = splits.test_x[:1]
    body, headers = good_binary_body(image)
    length = int(headers[HEADER_LENGTH])
    header = orjson.loads(body[:length])

    def binary_with(size: int, data: bytes) -> tuple[bytes, dict[str, str]]:
        changed = dict(header)
        changed["inputs"] = [{**header["inputs"][0], "parameters": {"binary_data_size": size}}]
        text = orjson.dumps(changed)
        return text + data, {HEADER_LENGTH: str(len(text)),
                             "Content-Type": "application/octet-stream"}

    short_size = binary_with(100, body[length:length + 100])
    extra_bytes = binary_with(784, body[length:] + b"\0\0\0\0")
    json_body, json_headers = encode_infer_request({"image": image}, binary=False)
    wrong_shape, _ = encode_infer_request({"image": splits.test_x[:1, :, :27]}, binary=False)
    wrong_type, _ = encode_infer_request({"image": image.astype(np.float32)}, binary=False)
    wrong_name, _ = encode_infer_request({"picture": image}, binary=False)
    wrong_output, _ = encode_infer_request({"image": image}, binary=False, outputs=["probs"])
    return [
        ("bad json", "POST", INFER, b'{"inputs": [', json_headers, 400, "not valid JSON"),
        ("unknown model", "POST", "/v2/models/nope/infer", json_body, json_headers, 404,
         "unknown model 'nope'"),
        ("unknown version", "POST", f"/v2/models/{MODEL}/versions/7/infer", json_body,
         json_headers, 404, "no version '7'"),
        ("unknown model metadata", "GET", "/v2/models/nope", b"", {}, 404, "unknown model"),
        ("wrong shape", "POST", INFER, wrong_shape, json_headers, 400,
         "expected shape [-1, 1, 28, 28]"),
        ("wrong datatype", "POST", INFER, wrong_type, json_headers, 400,
         "expected datatype UINT8, got FP32"),
        ("wrong input name", "POST", INFER, wrong_name, json_headers, 400,
         "has no input 'picture'"),
        ("unknown output", "POST", INFER, wrong_output, json_headers, 400,
         "has no output 'probs'"),
        ("binary size vs shape", "POST", INFER, *short_size, 400,
         "binary_data_size is 100 bytes but shape"),
        ("binary size vs body", "POST", INFER, *extra_bytes, 400, "add up to 784"),
        ("header length past body", "POST", INFER, body,
         {**headers, HEADER_LENGTH: str(len(body) + 5)}, 400, "body has only"),
        ("header length not a number", "POST", INFER, body, {**headers, HEADER_LENGTH: "ten"},
         400, "expected a byte count"),
        ("body too large", "POST", INFER, b"{" + b" " * MAX_BODY_BYTES + b"}", json_headers,
         413, "max_body_bytes"),
        ("GET on infer", "GET", INFER, b"", {}, 405, "use POST"),
        ("POST on metadata", "POST", f"/v2/models/{MODEL}", json_body, json_headers, 405,
         "use GET"),
        ("unknown path", "GET", "/v1/models", b"", {}, 404, "no such endpoint"),
        ("unknown model action", "GET", f"/v2/models/{MODEL}/explain", b"", {}, 404,
         "no such endpoint"),
    ]


def test_bad_requests_get_4xx_and_the_server_keeps_serving(
        client: httpx.Client, splits: Splits, models: dict[str, OnnxModel]) -> None:
    for case, method, path, body, headers, status, words in bad_requests(splits):
        response = client.request(method, path, content=body or None, headers=headers)
        assert response.status_code == status, (case, response.text)
        assert words in response.json()["error"], (case, response.text)
        assert_serves(client, splits, models)


def test_oversized_chunked_body_is_refused_without_reading_it_all(
        server_url: str, client: httpx.Client, splits: Splits,
        models: dict[str, OnnxModel]) -> None:
    sent = 0

    def chunks() -> Iterator[bytes]:  # no Content-Length: httpx sends it chunked
        nonlocal sent
        for _ in range(1000):  # up to 16 MB, far over the 64 KiB limit
            sent += 16384
            yield b" " * 16384

    try:
        response = httpx.post(server_url + INFER, content=chunks(), timeout=30)
        assert response.status_code == 413
        assert "max_body_bytes" in response.json()["error"]
    except httpx.TransportError:
        pass  # the server may close the connection while we still send: also a refusal
    assert sent < 1000 * 16384
    # A raw client that declares too large a body is refused before it sends a byte of it.
    host, port = server_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        raw.sendall(f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n"
                    .encode())
        answer = raw.recv(65536)
        assert answer.startswith(b"HTTP/1.1 413"), answer
        assert b"connection: close" in answer.lower()
    assert_serves(client, splits, models)


def test_metrics_count_requests(client: httpx.Client, splits: Splits) -> None:
    infer(client, splits.test_x[:3], binary=True)
    client.post("/v2/models/fmnist-edge/infer", content=b"{", headers={})
    text = client.get("/metrics").text
    assert 'tierwise_requests_total{model="fmnist-edge",status="200"}' in text
    assert 'tierwise_requests_total{model="fmnist-edge",status="400"}' in text
    for name in ("tierwise_request_duration_seconds_bucket", "tierwise_queue_duration_seconds",
                 "tierwise_compute_duration_seconds", "tierwise_batch_size_bucket",
                 'tierwise_request_bytes_total{model="fmnist-edge"}',
                 'tierwise_response_bytes_total{model="fmnist-edge"}',
                 'tierwise_tier_info{compute_scale="1",tier="edge"} 1.0'):
        assert name in text, name
    served = [line for line in text.splitlines()
              if line.startswith('tierwise_requests_total{model="fmnist-edge",status="200"}')]
    assert float(served[0].split()[-1]) >= 1


# -- the batcher on its own ---------------------------------------------------------------


def run_concurrently(batcher: DynamicBatcher, images: np.ndarray) -> list[tuple[dict, object]]:
    async def main() -> list[tuple[dict, object]]:
        try:
            return await asyncio.gather(
                *(batcher.infer({"image": images[i:i + 1]}) for i in range(len(images))))
        finally:
            batcher.close()

    return asyncio.run(main())


def test_queue_delay_lets_batches_fill_up_to_max_batch_size(models: dict[str, OnnxModel],
                                                           splits: Splits) -> None:
    model = models[MODEL]
    images = splits.test_x[:10]
    batcher = DynamicBatcher(model, max_batch_size=4, max_queue_delay_ms=200)
    answers = run_concurrently(batcher, images)
    sizes = [timing.batch_size for _, timing in answers]  # type: ignore[attr-defined]
    assert sizes == [4] * 8 + [2] * 2
    expected = model.run(images)
    for index, (outputs, _) in enumerate(answers):
        np.testing.assert_allclose(outputs["logits"][0], expected[index], rtol=1e-5, atol=1e-5)
    # The last two waited for the delay (no more requests came), the first four did not.
    queued = [timing.queue_ms for _, timing in answers]  # type: ignore[attr-defined]
    assert max(queued[8:]) >= 190 and min(queued[:4]) < 150


def test_lone_requests_run_alone_and_bursts_still_batch(models: dict[str, OnnxModel],
                                                        splits: Splits) -> None:
    model = models[MODEL]
    images = splits.test_x[:24]
    expected = model.run(images)
    batcher = DynamicBatcher(model, max_batch_size=32, inline_max_ms=1e3)

    async def main() -> tuple[list, list]:
        one_by_one = [await batcher.infer({"image": images[i:i + 1]}) for i in range(8)]
        burst = await asyncio.gather(
            *(batcher.infer({"image": images[i:i + 1]}) for i in range(8, 24)))
        batcher.close()
        return one_by_one, list(burst)

    one_by_one, burst = asyncio.run(main())
    assert [timing.batch_size for _, timing in one_by_one] == [1] * 8
    # The first of the burst may run alone on the loop; the rest queue behind it and batch.
    assert sorted({timing.batch_size for _, timing in burst}) == [1, 15]
    for index, (outputs, _) in enumerate(one_by_one + burst):
        np.testing.assert_allclose(outputs["logits"][0], expected[index], rtol=1e-5, atol=1e-5)


def test_compute_scale_stretches_compute(models: dict[str, OnnxModel], splits: Splits) -> None:
    images = splits.test_x[:64]

    def median_compute_ms(scale: float) -> tuple[float, float, float]:
        batcher = DynamicBatcher(models["fmnist-cloud"], max_batch_size=64, compute_scale=scale)

        async def main() -> tuple[list[float], float]:
            computes = []
            started = time.perf_counter()
            for _ in range(5):
                _, timing = await batcher.infer({"image": images})
                computes.append(timing.compute_ms)
            batcher.close()
            return computes, (time.perf_counter() - started) * 1e3

        computes, wall_ms = asyncio.run(main())
        return statistics.median(computes), sum(computes), wall_ms

    plain_ms, _, _ = median_compute_ms(1.0)
    scaled_ms, scaled_total_ms, scaled_wall_ms = median_compute_ms(4.0)
    assert scaled_ms > 2.0 * plain_ms  # nominally 4x; loose for a busy machine
    assert scaled_wall_ms >= scaled_total_ms  # the time is really spent, not just reported
