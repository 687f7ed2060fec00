"""Codecs on real data, and on the wire: OIP BYTES inputs named by `content_type`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest

from tierwise.codecs import CodecError, decode_rows, encode_rows, get_codec
from tierwise.config import TierConfig
from tierwise.data import Splits
from tierwise.protocol.oip import (
    HEADER_LENGTH,
    decode_infer_response,
    encode_infer_request,
    parse_header_length,
)
from tierwise.runtime.session import OnnxModel, load_models
from tierwise.server.app import create_app, serve_in_thread


@pytest.fixture(scope="module")
def models(models_dir: Path) -> dict[str, OnnxModel]:
    return load_models(models_dir)


@pytest.fixture(scope="module")
def http(models: dict[str, OnnxModel]) -> Iterator[httpx.Client]:
    with serve_in_thread(create_app("edge", TierConfig(), models)) as url, \
            httpx.Client(base_url=url, timeout=30) as client:
        yield client


def features(models: dict[str, OnnxModel], splits: Splits, head: str) -> np.ndarray:
    return models[head].run(splits.test_x[:32])


@pytest.mark.parametrize("codec", ["zstd", "png"])
def test_input_codecs_are_lossless_and_smaller_than_raw(codec: str, splits: Splits) -> None:
    images = splits.test_x[:200]
    rows = encode_rows(codec, images)
    assert np.array_equal(decode_rows(codec, rows, (1, 28, 28), np.dtype(np.uint8)), images)
    assert np.mean([len(row) for row in rows]) < images[0].nbytes


@pytest.mark.parametrize(("codec", "bound"), [("fp16-zstd", 1e-3), ("int8-zstd", 1 / 255 + 2e-3)])
def test_feature_codecs_stay_within_their_error_bound(codec: str, bound: float,
                                                      models: dict[str, OnnxModel],
                                                      splits: Splits) -> None:
    tensors = features(models, splits, "fmnist-cloud.head@2")  # [32, 64, 7, 7], post-ReLU
    decoded = decode_rows(codec, encode_rows(codec, tensors), tensors.shape[1:],
                          np.dtype(np.float32))
    for original, back in zip(tensors, decoded, strict=True):
        span = original.reshape(len(original), -1)
        scale = (span.max(axis=1) - span.min(axis=1)).max()
        assert np.abs(back - original).max() <= bound * max(scale, 1e-6)
    assert np.mean([len(p) for p in encode_rows(codec, tensors)]) < tensors[0].nbytes / 2


def test_a_corrupt_payload_or_unknown_codec_is_named() -> None:
    with pytest.raises(CodecError, match="zstd"):
        get_codec("zstd").decode(b"not zstd at all", (1, 28, 28), np.dtype(np.uint8))
    with pytest.raises(CodecError, match="png"):
        get_codec("png").decode(b"\x89PNG broken", (1, 28, 28), np.dtype(np.uint8))
    with pytest.raises(CodecError, match="known"):
        get_codec("jpeg-xl")


def _post(http: httpx.Client, model: str, name: str, rows: np.ndarray,
          codec: str | None) -> httpx.Response:
    parameters = {name: {"content_type": codec}} if codec else None
    body, headers = encode_infer_request({name: rows}, binary=True,
                                         input_parameters=parameters)
    return http.post(f"/v2/models/{model}/infer", content=body, headers=headers)


def _logits(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    decoded = decode_infer_response(response.content,
                                    parse_header_length(response.headers.get(HEADER_LENGTH)))
    return decoded.outputs["logits"]


@pytest.mark.parametrize("codec", ["zstd", "png"])
def test_the_server_decodes_encoded_inputs(codec: str, http: httpx.Client,
                                           models: dict[str, OnnxModel],
                                           splits: Splits) -> None:
    images = splits.test_x[:5]
    got = _logits(_post(http, "fmnist-edge", "image", encode_rows(codec, images), codec))
    np.testing.assert_allclose(got, models["fmnist-edge"].run(images), atol=1e-5)


def test_a_split_tail_takes_encoded_features(http: httpx.Client, models: dict[str, OnnxModel],
                                             splits: Splits) -> None:
    tensors = features(models, splits, "fmnist-edge.head@2")[:4]
    got = _logits(_post(http, "fmnist-edge.tail@2", "features",
                        encode_rows("fp16-zstd", tensors), "fp16-zstd"))
    whole = models["fmnist-edge"].run(splits.test_x[:4])
    np.testing.assert_allclose(got, whole, atol=1e-2)


def test_bad_encoded_inputs_get_a_400_that_says_why(http: httpx.Client,
                                                    splits: Splits) -> None:
    good = encode_rows("zstd", splits.test_x[:1])
    corrupt = np.array([b"garbage"], dtype=object)
    cases = [
        (corrupt, "zstd", "input 'image': zstd"),
        (good, None, "needs parameters.content_type"),
        (good, "webp", "unknown codec 'webp'"),
    ]
    for rows, codec, message in cases:
        response = _post(http, "fmnist-edge", "image", rows, codec)
        assert response.status_code == 400 and message in response.json()["error"], message
    # BYTES tensors travel as binary data only
    body = orjson.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                     "data": ["abc"], "parameters": {"content_type": "png"}}]})
    response = http.post("/v2/models/fmnist-edge/infer", content=body,
                         headers={"content-type": "application/json"})
    assert response.status_code == 400 and "binary" in response.json()["error"]
