"""OIP v2 REST encoding and decoding, checked against the spec and against tritonclient."""

from __future__ import annotations

import numpy as np
import orjson
import pytest
import tritonclient.http as triton

from tierwise.protocol.oip import (
    BINARY_CONTENT_TYPE,
    DATATYPES,
    HEADER_LENGTH,
    JSON_CONTENT_TYPE,
    ProtocolError,
    datatype_of,
    decode_infer_request,
    decode_infer_response,
    encode_infer_request,
    encode_infer_response,
    error_message,
    infer_path,
    numpy_dtype,
    parse_header_length,
)

NUMPY_OF = {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32,
    "UINT64": np.uint64, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32,
    "INT64": np.int64, "FP16": np.float16, "FP32": np.float32, "FP64": np.float64,
}


def sample(datatype: str, shape: tuple[int, ...] = (2, 3)) -> np.ndarray:
    rng = np.random.default_rng(len(datatype))
    dtype = np.dtype(NUMPY_OF[datatype])
    if dtype.kind == "b":
        return rng.random(shape) > 0.5
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
    return (rng.standard_normal(shape) * 1e3).astype(dtype)


def header_length(headers: dict[str, str]) -> int | None:
    return parse_header_length(headers.get(HEADER_LENGTH))


def test_every_datatype_maps_both_ways() -> None:
    assert set(DATATYPES) == set(NUMPY_OF)
    for datatype, numpy_type in NUMPY_OF.items():
        assert numpy_dtype(datatype) == np.dtype(numpy_type)
        assert datatype_of(np.dtype(numpy_type)) == datatype
    assert datatype_of(np.zeros(2, dtype=">f4")) == "FP32"  # big-endian input is still FP32


@pytest.mark.parametrize("datatype", sorted(NUMPY_OF))
@pytest.mark.parametrize("binary", [True, False])
def test_request_and_response_round_trip_exactly(datatype: str, binary: bool) -> None:
    array = sample(datatype)
    body, headers = encode_infer_request({"x": array, "y": array[:1]}, binary=binary,
                                         request_id="r-1", parameters={"deadline_ms": 20})
    request = decode_infer_request(body, header_length(headers))
    assert request.id == "r-1" and request.parameters["deadline_ms"] == 20
    for name, expected in (("x", array), ("y", array[:1])):
        assert request.inputs[name].dtype == expected.dtype
        np.testing.assert_array_equal(request.inputs[name], expected)

    body, headers = encode_infer_response({"out": array}, model_name="m", model_version="3",
                                          binary_outputs=binary, request_id="r-1",
                                          parameters={"tierwise_compute_ms": 1.5})
    response = decode_infer_response(body, header_length(headers))
    assert (response.model_name, response.model_version, response.id) == ("m", "3", "r-1")
    assert response.parameters == {"tierwise_compute_ms": 1.5}
    assert response.outputs["out"].dtype == array.dtype
    np.testing.assert_array_equal(response.outputs["out"], array)


def test_binary_body_layout_follows_the_extension() -> None:
    first = np.arange(6, dtype=np.float32).reshape(2, 3)
    second = np.array([True, False, True])
    body, headers = encode_infer_request({"a": first, "b": second}, binary=True)
    assert headers["Content-Type"] == BINARY_CONTENT_TYPE
    length = int(headers[HEADER_LENGTH])
    header = orjson.loads(body[:length])
    assert [tensor["parameters"]["binary_data_size"] for tensor in header["inputs"]] == [24, 3]
    assert "data" not in header["inputs"][0]
    # Little-endian, row-major, in input order, BOOL as one byte each.
    assert body[length:] == first.astype("<f4").tobytes() + b"\x01\x00\x01"
    assert header["parameters"] == {"binary_data_output": True}


def test_json_request_is_plain_json_and_asks_for_named_outputs() -> None:
    body, headers = encode_infer_request({"a": np.array([[1, 2]], dtype=np.int32)},
                                         binary=False, outputs=["logits"],
                                         binary_outputs=False)
    assert headers == {"Content-Type": JSON_CONTENT_TYPE}
    assert orjson.loads(body) == {
        "inputs": [{"name": "a", "datatype": "INT32", "shape": [1, 2], "data": [1, 2]}],
        "outputs": [{"name": "logits", "parameters": {"binary_data": False}}],
    }
    request = decode_infer_request(body, None)
    assert request.outputs == {"logits": False} and not request.output_binary("logits")


def test_output_binary_flag_defaults_to_binary_data_output() -> None:
    body = orjson.dumps({"parameters": {"binary_data_output": True},
                         "inputs": [{"name": "a", "datatype": "UINT8", "shape": [1],
                                     "data": [1]}],
                         "outputs": [{"name": "p"}, {"name": "q",
                                                     "parameters": {"binary_data": False}}]})
    request = decode_infer_request(body, None)
    assert request.output_binary("p") and not request.output_binary("q")
    assert request.output_binary("not-listed")


def test_nested_json_data_is_accepted() -> None:
    body = orjson.dumps({"inputs": [{"name": "a", "datatype": "FP32", "shape": [2, 2],
                                     "data": [[1.5, 2], [3, 4]]}]})
    np.testing.assert_array_equal(decode_infer_request(body, None).inputs["a"],
                                  np.array([[1.5, 2], [3, 4]], dtype=np.float32))


def test_response_mixes_binary_and_json_outputs() -> None:
    outputs = {"p": np.ones((1, 2), np.float32), "q": np.arange(3, dtype=np.int64)}
    body, headers = encode_infer_response(outputs, model_name="m", binary_outputs={"q"})
    header = orjson.loads(body[:int(headers[HEADER_LENGTH])])
    assert header["outputs"][0]["data"] == [1.0, 1.0]
    assert header["outputs"][1]["parameters"] == {"binary_data_size": 24}
    decoded = decode_infer_response(body, header_length(headers))
    for name, array in outputs.items():
        np.testing.assert_array_equal(decoded.outputs[name], array)


def test_tritonclient_request_bodies_decode() -> None:
    image = sample("UINT8", (2, 1, 28, 28))
    for binary in (True, False):
        tensor = triton.InferInput("image", list(image.shape), "UINT8")
        tensor.set_data_from_numpy(image, binary_data=binary)
        wanted = [triton.InferRequestedOutput("logits", binary_data=binary)]
        body, json_size = triton.InferenceServerClient.generate_request_body(
            [tensor], outputs=wanted, request_id="abc")
        request = decode_infer_request(body, json_size)
        np.testing.assert_array_equal(request.inputs["image"], image)
        assert request.id == "abc" and request.output_binary("logits") is binary


def test_tritonclient_parses_our_responses() -> None:
    logits = sample("FP32", (4, 10))
    for binary in (True, False):
        body, headers = encode_infer_response({"logits": logits}, model_name="m",
                                              model_version="1", binary_outputs=binary,
                                              parameters={"tierwise_queue_ms": 0.2})
        result = triton.InferenceServerClient.parse_response_body(
            body, header_length=header_length(headers))
        np.testing.assert_array_equal(result.as_numpy("logits"), logits)
        assert result.get_response()["model_name"] == "m"


BAD_REQUESTS = [
    (b"{not json", None, "not valid JSON"),
    (b"[1, 2]", None, "expected a JSON object"),
    (b'{"inputs": []}', None, "'inputs' must be a non-empty list"),
    (b'{"inputs": [{"shape": [1], "datatype": "UINT8", "data": [1]}]}', None, "'name'"),
    (b'{"inputs": [{"name": "a", "shape": [-1], "datatype": "UINT8", "data": [1]}]}', None,
     "'shape' must be a list of non-negative integers"),
    (b'{"inputs": [{"name": "a", "shape": [2], "datatype": "UINT8", "data": [1]}]}', None,
     "'data' has 1 values but the shape needs 2"),
    (b'{"inputs": [{"name": "a", "shape": [1], "datatype": "UINT8", "data": [256]}]}', None,
     "out of range for UINT8"),
    (b'{"inputs": [{"name": "a", "shape": [1], "datatype": "INT8", "data": [1.5]}]}', None,
     "do not fit datatype INT8"),
    (b'{"inputs": [{"name": "a", "shape": [1], "datatype": "BOOL", "data": [1]}]}', None,
     "do not fit datatype BOOL"),
    (b'{"inputs": [{"name": "a", "shape": [1], "datatype": "FP32", "data": ["x"]}]}', None,
     "do not fit datatype FP32"),
    (b'{"inputs": [{"name": "a", "shape": [1], "datatype": "BYTES", "data": ["x"]}]}', None,
     "BYTES tensors must be sent as binary"),
    (b'{"inputs": [{"name": "a", "shape": [1], "datatype": "FP8", "data": [1]}]}', None,
     "unknown datatype 'FP8'"),
    (b'{"inputs": [{"name": "a", "shape": [1], "datatype": "UINT8"}]}', None,
     "neither 'data' nor parameters.binary_data_size"),
    (b'{"inputs": [{"name": "a", "shape": [1], "datatype": "UINT8", "data": [1]},'
     b' {"name": "a", "shape": [1], "datatype": "UINT8", "data": [1]}]}', None, "given twice"),
]


@pytest.mark.parametrize(("body", "length", "expected"), BAD_REQUESTS)
def test_bad_requests_raise_errors_that_name_the_problem(body: bytes, length: int | None,
                                                         expected: str) -> None:
    with pytest.raises(ProtocolError, match=expected) as caught:
        decode_infer_request(body, length)
    assert caught.value.status == 400


def binary_body(size: int, data: bytes) -> tuple[bytes, int]:
    header = orjson.dumps({"inputs": [{"name": "image", "datatype": "FP32", "shape": [2],
                                       "parameters": {"binary_data_size": size}}]})
    return header + data, len(header)


def test_binary_sizes_must_match_shape_and_body() -> None:
    body, length = binary_body(8, b"\0" * 8)
    assert decode_infer_request(body, length).inputs["image"].shape == (2,)
    with pytest.raises(ProtocolError, match="binary_data_size is 4 bytes but shape"):
        decode_infer_request(*binary_body(4, b"\0" * 4))
    with pytest.raises(ProtocolError, match="runs past the end of the body"):
        decode_infer_request(*binary_body(8, b"\0" * 5))
    with pytest.raises(ProtocolError, match="binary_data_size add up to 8"):
        decode_infer_request(*binary_body(8, b"\0" * 12))
    with pytest.raises(ProtocolError, match="only"):
        decode_infer_request(body, len(body) + 1)
    with pytest.raises(ProtocolError, match=HEADER_LENGTH):
        decode_infer_request(body, None)  # binary bytes but no header length


def test_header_length_parsing() -> None:
    assert parse_header_length(None) is None
    assert parse_header_length(b"12") == 12
    for bad in ("x", "-1"):
        with pytest.raises(ProtocolError, match=HEADER_LENGTH):
            parse_header_length(bad)


def test_unsupported_numpy_dtypes_are_refused_when_encoding() -> None:
    with pytest.raises(ProtocolError, match="BYTES"):
        encode_infer_request({"a": np.array(["text"])}, binary=True)
    with pytest.raises(ProtocolError, match="complex"):
        encode_infer_request({"a": np.zeros(2, np.complex64)}, binary=False)


def test_error_bodies() -> None:
    with pytest.raises(ProtocolError, match="server answered an error: no such model"):
        decode_infer_response(b'{"error": "no such model"}', None)
    assert error_message(b'{"error": "bad shape"}') == "bad shape"
    assert error_message(b"plain text") == "plain text"


def test_infer_path() -> None:
    assert infer_path("fmnist-edge") == "/v2/models/fmnist-edge/infer"
    assert infer_path("fmnist-edge", "2") == "/v2/models/fmnist-edge/versions/2/infer"
