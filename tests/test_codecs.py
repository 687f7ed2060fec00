"""Codecs on real data: lossless input codecs, feature codecs within their error bound, errors
that name the codec; and on a real tier server, BYTES inputs named by `content_type`."""

from __future__ import annotations

import re
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

IMAGE = (1, 28, 28)
RAW_IMAGE_BYTES = 784
FEATURE_HEAD = "fmnist-cloud.head@2"  # post-ReLU activations, [64, 7, 7] per image
KNOWN = ("raw", "zstd", "png", "fp16-zstd", "int8-zstd")


@pytest.fixture(scope="module")
def models(models_dir: Path) -> dict[str, OnnxModel]:
    return load_models(models_dir)


@pytest.fixture(scope="module")
def features(models: dict[str, OnnxModel], splits: Splits) -> np.ndarray:
    tensors = models[FEATURE_HEAD].run(splits.test_x[:64])
    assert tensors.dtype == np.float32 and tensors.shape == (64, 64, 7, 7)
    return tensors


@pytest.fixture(scope="module")
def http(models: dict[str, OnnxModel]) -> Iterator[httpx.Client]:
    with serve_in_thread(create_app("edge", TierConfig(), models)) as url, \
            httpx.Client(base_url=url, timeout=30) as client:
        yield client


# -- the codecs themselves -------------------------------------------------------------------


@pytest.mark.parametrize("codec", ["zstd", "png"])
def test_lossless_input_codecs_round_trip_real_images(codec: str, splits: Splits) -> None:
    images = splits.test_x[:300]
    assert images.dtype == np.uint8 and images.shape[1:] == IMAGE
    rows = encode_rows(codec, images)
    assert rows.dtype == object and len(rows) == len(images)
    assert all(isinstance(row, bytes) for row in rows)
    decoded = decode_rows(codec, rows, IMAGE, np.dtype(np.uint8))
    assert decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded, images)
    assert np.mean([len(row) for row in rows]) < RAW_IMAGE_BYTES


def test_fp16_zstd_stays_within_half_precision(features: np.ndarray) -> None:
    rows = encode_rows("fp16-zstd", features)
    decoded = decode_rows("fp16-zstd", rows, features.shape[1:], np.dtype(np.float32))
    assert decoded.dtype == np.float32 and decoded.shape == features.shape
    for original, back in zip(features, decoded, strict=True):
        assert np.abs(back - original).max() <= 1e-3 * np.abs(original).max()
    sizes = [len(row) for row in rows]
    assert np.mean(sizes) < features[0].nbytes  # 12,544 bytes raw float32


def test_int8_zstd_stays_within_one_step_per_channel(features: np.ndarray) -> None:
    rows = encode_rows("int8-zstd", features)
    decoded = decode_rows("int8-zstd", rows, features.shape[1:], np.dtype(np.float32))
    assert decoded.dtype == np.float32 and decoded.shape == features.shape
    for original, back in zip(features, decoded, strict=True):
        channels = original.reshape(len(original), -1)
        low, high = channels.min(axis=1), channels.max(axis=1)
        # one quantisation step, plus the float16 rounding of each channel's low and step
        fp16 = 2.0 ** -10 * np.maximum(np.abs(low), np.abs(high)) + 1e-7
        error = np.abs(back.reshape(len(back), -1) - channels).max(axis=1)
        assert np.all(error <= (high - low) / 255 + fp16), float((error - (high - low) / 255
                                                                  - fp16).max())
    int8 = np.mean([len(row) for row in rows])
    fp16_size = np.mean([len(row) for row in encode_rows("fp16-zstd", features)])
    assert int8 < fp16_size < features[0].nbytes


def _corrupt_payloads(codec: str, valid: bytes) -> list[bytes]:
    return [b"", b"certainly not a " + codec.encode() + b" payload", valid[: len(valid) // 2]]


@pytest.mark.parametrize("codec", ["zstd", "png"])
def test_a_corrupt_image_payload_names_the_codec(codec: str, splits: Splits) -> None:
    valid = get_codec(codec).encode(splits.test_x[0])
    for payload in _corrupt_payloads(codec, valid):
        with pytest.raises(CodecError, match=f"^{re.escape(codec)}: "):
            get_codec(codec).decode(payload, IMAGE, np.dtype(np.uint8))
    # a valid payload of another shape is not this model's tensor either
    with pytest.raises(CodecError, match=f"^{re.escape(codec)}: "):
        get_codec(codec).decode(valid, (1, 14, 14), np.dtype(np.uint8))


@pytest.mark.parametrize("codec", ["fp16-zstd", "int8-zstd"])
def test_a_corrupt_feature_payload_names_the_codec(codec: str, features: np.ndarray) -> None:
    shape, dtype = features.shape[1:], np.dtype(np.float32)
    valid = get_codec(codec).encode(features[0])
    for payload in _corrupt_payloads(codec, valid):
        with pytest.raises(CodecError, match=f"^{re.escape(codec)}: "):
            get_codec(codec).decode(payload, shape, dtype)
    # a valid payload of another shape (a different cut) is not this tensor either
    with pytest.raises(CodecError, match=f"^{re.escape(codec)}: "):
        get_codec(codec).decode(valid, (32, 7, 7), dtype)
    # decode_rows passes the error on
    with pytest.raises(CodecError, match=re.escape(codec)):
        decode_rows(codec, np.array([valid, b"junk"], dtype=object), shape, dtype)


def test_png_refuses_what_is_not_a_grayscale_uint8_image(features: np.ndarray) -> None:
    with pytest.raises(CodecError, match=r"^png: expects a uint8"):
        get_codec("png").encode(features[0])


def test_an_unknown_codec_lists_the_known_ones(splits: Splits) -> None:
    for call in (lambda: get_codec("jpeg-xl"), lambda: encode_rows("jpeg-xl", splits.test_x[:1]),
                 lambda: decode_rows("jpeg-xl", np.array([b"x"], dtype=object), IMAGE,
                                     np.dtype(np.uint8))):
        with pytest.raises(CodecError, match="unknown codec 'jpeg-xl'") as error:
            call()
        assert all(f"'{name}'" in str(error.value) for name in KNOWN), str(error.value)


# -- on the wire -----------------------------------------------------------------------------


def _post(http: httpx.Client, model: str, name: str, tensor: np.ndarray,
          content_type: str | None) -> httpx.Response:
    parameters = {name: {"content_type": content_type}} if content_type is not None else None
    body, headers = encode_infer_request({name: tensor}, binary=True,
                                         input_parameters=parameters)
    return http.post(f"/v2/models/{model}/infer", content=body, headers=headers)


def _logits(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    decoded = decode_infer_response(response.content,
                                    parse_header_length(response.headers.get(HEADER_LENGTH)))
    return decoded.outputs["logits"]


def _error(response: httpx.Response) -> str:
    assert response.status_code == 400, (response.status_code, response.text)
    return str(response.json()["error"])


@pytest.mark.parametrize("codec", ["png", "zstd"])
def test_encoded_images_get_the_logits_of_raw_images(codec: str, http: httpx.Client,
                                                     splits: Splits) -> None:
    images = splits.test_x[:8]
    raw = _logits(_post(http, "fmnist-edge", "image", images, None))
    assert raw.shape == (8, 10)
    encoded = _logits(_post(http, "fmnist-edge", "image", encode_rows(codec, images), codec))
    np.testing.assert_allclose(encoded, raw, rtol=0, atol=1e-6)


def test_a_split_tail_answers_int8_zstd_features(http: httpx.Client,
                                                 models: dict[str, OnnxModel],
                                                 splits: Splits) -> None:
    images = splits.test_x[:32]
    tensors = models["fmnist-edge.head@2"].run(images)
    rows = encode_rows("int8-zstd", tensors)
    got = _logits(_post(http, "fmnist-edge.tail@2", "features", rows, "int8-zstd"))
    # the server runs the tail on exactly what the codec decodes to
    decoded = decode_rows("int8-zstd", rows, tensors.shape[1:], np.dtype(np.float32))
    np.testing.assert_allclose(got, models["fmnist-edge.tail@2"].run(decoded), atol=1e-5)
    # and quantising the cut barely moves the answers of the whole model
    whole = models["fmnist-edge"].run(images).argmax(1)
    assert np.mean(got.argmax(1) == whole) >= 0.9


def test_a_corrupt_payload_is_a_400_naming_the_input(http: httpx.Client, splits: Splits,
                                                     models: dict[str, OnnxModel]) -> None:
    garbage = np.array([b"garbage"], dtype=object)
    for codec in ("zstd", "png"):
        message = _error(_post(http, "fmnist-edge", "image", garbage, codec))
        assert f"input 'image': {codec}:" in message, message
    message = _error(_post(http, "fmnist-edge.tail@2", "features", garbage, "int8-zstd"))
    assert "input 'features': int8-zstd:" in message, message
    # a valid PNG of the wrong size
    small = encode_rows("png", splits.test_x[:1, :, :14, :14])
    message = _error(_post(http, "fmnist-edge", "image", small, "png"))
    assert "input 'image'" in message and "[1, 28, 28]" in message, message


def test_a_bytes_input_without_content_type_is_a_400(http: httpx.Client,
                                                     splits: Splits) -> None:
    message = _error(_post(http, "fmnist-edge", "image", encode_rows("zstd", splits.test_x[:1]),
                           None))
    assert "input 'image'" in message and "content_type" in message, message


def test_an_unknown_content_type_is_a_400_listing_the_codecs(http: httpx.Client,
                                                            splits: Splits) -> None:
    rows = encode_rows("zstd", splits.test_x[:1])
    message = _error(_post(http, "fmnist-edge", "image", rows, "webp"))
    assert "input 'image'" in message and "unknown codec 'webp'" in message, message
    assert "'png'" in message and "'zstd'" in message, message


def test_a_content_type_on_a_plain_tensor_is_a_400(http: httpx.Client, splits: Splits) -> None:
    message = _error(_post(http, "fmnist-edge", "image", splits.test_x[:1], "png"))
    assert "input 'image'" in message and "BYTES" in message, message


def test_bytes_sent_as_json_is_a_400(http: httpx.Client) -> None:
    body = orjson.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                     "data": ["abc"], "parameters": {"content_type": "png"}}]})
    response = http.post("/v2/models/fmnist-edge/infer", content=body,
                         headers={"content-type": "application/json"})
    message = _error(response)
    assert "input 'image'" in message and "binary" in message, message
    # the client side refuses to build such a request in the first place
    with pytest.raises(ValueError, match="binary"):
        encode_infer_request({"image": np.array([b"abc"], dtype=object)}, binary=False)


def test_the_server_still_answers_after_bad_payloads(http: httpx.Client, splits: Splits) -> None:
    _post(http, "fmnist-edge", "image", np.array([b"junk"], dtype=object), "png")
    rows = encode_rows("png", splits.test_x[:2])
    assert _logits(_post(http, "fmnist-edge", "image", rows, "png")).shape == (2, 10)


def test_a_malformed_content_type_is_a_400(http: httpx.Client, splits: Splits) -> None:
    rows = encode_rows("png", splits.test_x[:1])
    body, headers = encode_infer_request({"image": rows}, binary=True,
                                         input_parameters={"image": {"content_type": ["png"]}})
    response = http.post("/v2/models/fmnist-edge/infer", content=body, headers=headers)
    assert response.status_code == 400, (response.status_code, response.text)


def test_an_empty_batch_of_payloads_is_a_400(http: httpx.Client) -> None:
    response = _post(http, "fmnist-edge", "image", np.empty(0, dtype=object), "png")
    assert response.status_code == 400, (response.status_code, response.text)
