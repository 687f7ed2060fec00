"""Open Inference Protocol v2 (KServe v2, Triton, MLServer) REST bodies, both directions.

A body is one JSON object, optionally followed by raw tensor bytes: the binary tensor data
extension (Triton's `binary_tensor_data`, also in KServe). A tensor sent that way carries
`parameters.binary_data_size` instead of `data`; its bytes (little-endian, row-major, no
padding; BOOL as one byte) follow the JSON in the order of the tensors, and the HTTP header
`Inference-Header-Content-Length` says how many bytes of the body are JSON. A client asks for
binary outputs with `parameters.binary_data` on a requested output, or for all outputs with
the request parameter `binary_data_output`.

Specs: https://kserve.github.io/website/docs/concepts/architecture/data-plane/v2-protocol/
and Triton's docs/protocol/extension_binary_data.md.

Everything here maps numpy arrays to (body, headers) and back: no sockets, no HTTP client, so
the tier server and the device client share it.

BYTES tensors carry encoded payloads (`tierwise.codecs`): numpy object arrays of `bytes`,
sent as binary tensor data only, each element a 4-byte little-endian length and its bytes
(the binary layout of BYTES in Triton's extension). Text BYTES tensors are not served; only
a BYTES output of UTF-8 text (the classification extension's "<value>:<index>:<label>") may
also go as JSON strings, and is read back as bytes elements.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

HEADER_LENGTH = "Inference-Header-Content-Length"
JSON_CONTENT_TYPE = "application/json"
BINARY_CONTENT_TYPE = "application/octet-stream"
BYTES = "BYTES"

# Little-endian on the wire; on a little-endian host these are the native dtypes.
_NUMPY_DTYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
_DATATYPES: dict[np.dtype[Any], str] = {dtype: name for name, dtype in _NUMPY_DTYPES.items()}
DATATYPES = tuple(_NUMPY_DTYPES)

# Which numpy kinds a JSON `data` list may hold for a datatype's kind. JSON has no unsigned or
# small ints, so an integer datatype takes any integer list whose values fit.
_JSON_KINDS = {"b": "b", "u": "iu", "i": "iu", "f": "iuf"}
_NUMPY_OPTIONS = orjson.OPT_SERIALIZE_NUMPY


class ProtocolError(ValueError):
    """A body that does not follow the protocol, or asks for what cannot be done.

    `status` is the HTTP status a server answers with (400 unless said otherwise); the message
    names the tensor or field and what was expected.
    """

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def numpy_dtype(datatype: str) -> np.dtype[Any]:
    """The numpy dtype of an OIP datatype name ("FP32" -> float32)."""
    dtype = _NUMPY_DTYPES.get(datatype)
    if dtype is None:
        if datatype == BYTES:
            return np.dtype(object)
        raise ProtocolError(f"unknown datatype {datatype!r}; expected one of "
                            f"{', '.join(DATATYPES)}")
    return dtype


def datatype_of(dtype: np.dtype[Any] | np.ndarray) -> str:
    """The OIP datatype name of a numpy dtype or array (float32 -> "FP32")."""
    if isinstance(dtype, np.ndarray):
        dtype = dtype.dtype
    if dtype.kind == "O":
        return BYTES
    name = _DATATYPES.get(dtype) or _DATATYPES.get(dtype.newbyteorder("<"))
    if name is None:
        kind = "BYTES (strings: send bytes objects)" if dtype.kind in "SU" else str(dtype)
        raise ProtocolError(f"numpy dtype {kind} has no supported OIP datatype; expected one of "
                            f"{', '.join(str(d) for d in _DATATYPES)}")
    return name


def parse_header_length(value: str | bytes | None) -> int | None:
    """The `Inference-Header-Content-Length` header as an int (None when absent)."""
    if value is None:
        return None
    try:
        length = int(value)
    except ValueError:
        raise ProtocolError(f"{HEADER_LENGTH}: expected a byte count, got {value!r}") from None
    if length < 0:
        raise ProtocolError(f"{HEADER_LENGTH}: expected a byte count, got {length}")
    return length


@dataclass(slots=True)
class InferRequest:
    """A decoded `$inference_request`.

    `outputs` maps each requested output to its `binary_data` flag (None: not given, so the
    request's `binary_data_output` parameter decides); empty means "all outputs".
    `output_parameters` holds the `parameters` of the requested outputs that have any (e.g.
    {"scores": {"classification": 3}}: the classification extension).
    """

    inputs: dict[str, np.ndarray]
    outputs: dict[str, bool | None] = field(default_factory=dict)
    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    input_parameters: dict[str, dict[str, Any]] = field(default_factory=dict)
    output_parameters: dict[str, dict[str, Any]] = field(default_factory=dict)

    def output_binary(self, name: str) -> bool:
        """Whether output `name` should be answered as binary data."""
        flag = self.outputs.get(name)
        if flag is None:
            return self.parameters.get("binary_data_output") is True
        return flag


@dataclass(slots=True)
class InferResponse:
    """A decoded `$inference_response`."""

    outputs: dict[str, np.ndarray]
    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)


# -- encoding ------------------------------------------------------------------------------


def _bytes_elements(name: str, array: np.ndarray) -> bytes:
    parts = []
    for element in array.reshape(-1):
        if not isinstance(element, bytes | bytearray | memoryview):
            raise ProtocolError(f"tensor {name!r}: BYTES elements must be bytes, got "
                                f"{type(element).__name__}")
        parts += [len(element).to_bytes(4, "little"), bytes(element)]
    return b"".join(parts)


def _text_elements(name: str, array: np.ndarray) -> list[str]:
    """A BYTES tensor as JSON `data`: its elements as strings (the classification
    extension's "<value>:<index>:<label>"); binary payloads must go as binary tensor data."""
    texts = []
    for element in array.reshape(-1):
        try:
            texts.append(element.decode())
        except (AttributeError, UnicodeDecodeError):
            raise ProtocolError(f"tensor {name!r}: BYTES payloads that are not UTF-8 text go "
                                "as binary tensor data") from None
    return texts


def _tensor_header(name: str, array: np.ndarray, binary: bool, chunks: list[Any],
                   parameters: Mapping[str, Any] | None = None, text_bytes: bool = False
                   ) -> tuple[dict[str, Any], np.ndarray]:
    """A tensor's JSON header (its bytes appended to `chunks` when `binary`); `text_bytes`:
    a BYTES tensor may go as JSON strings (outputs only)."""
    datatype = datatype_of(array)
    if datatype == BYTES:
        if not binary:
            if not text_bytes:
                raise ProtocolError(f"tensor {name!r}: BYTES payloads go as binary tensor data")
            text: dict[str, Any] = {"name": name, "datatype": BYTES, "shape": list(array.shape),
                                    "data": _text_elements(name, array)}
            if parameters:
                text["parameters"] = dict(parameters)
            return text, array
        data = _bytes_elements(name, array)
        chunks.append(data)
        return {"name": name, "datatype": BYTES, "shape": list(array.shape),
                "parameters": {**(parameters or {}), "binary_data_size": len(data)}}, array
    wire = np.ascontiguousarray(array, dtype=_NUMPY_DTYPES[datatype])
    header: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(wire.shape)}
    if parameters:
        header["parameters"] = dict(parameters)
    if binary:
        header["parameters"] = {**(parameters or {}), "binary_data_size": wire.nbytes}
        if wire.nbytes:
            chunks.append(wire.reshape(-1).view(np.uint8))
    else:
        header["data"] = wire.reshape(-1)
    return header, wire


def _body(header: dict[str, Any], chunks: list[Any]) -> tuple[bytes, dict[str, str]]:
    text = orjson.dumps(header, option=_NUMPY_OPTIONS)
    if not chunks:
        return text, {"Content-Type": JSON_CONTENT_TYPE}
    body = b"".join([text, *chunks])
    return body, {"Content-Type": BINARY_CONTENT_TYPE, HEADER_LENGTH: str(len(text))}


def encode_infer_request(
    inputs: Mapping[str, np.ndarray],
    *,
    binary: bool,
    outputs: list[str] | None = None,
    binary_outputs: bool = True,
    request_id: str | None = None,
    parameters: Mapping[str, Any] | None = None,
    input_parameters: Mapping[str, Mapping[str, Any]] | None = None,
) -> tuple[bytes, dict[str, str]]:
    """(body, extra HTTP headers) of an inference request.

    binary: send the inputs as binary tensor data (else as JSON `data` lists).
    input_parameters: per-input `parameters` (e.g. {"image": {"content_type": "png"}}).
    outputs: the outputs to ask for (None: all of them).
    binary_outputs: ask for the outputs as binary tensor data.
    """
    chunks: list[Any] = []
    request: dict[str, Any] = {}
    if request_id is not None:
        request["id"] = request_id
    request_parameters = dict(parameters or {})
    if outputs is None and binary_outputs:
        request_parameters["binary_data_output"] = True
    if request_parameters:
        request["parameters"] = request_parameters
    per_input = input_parameters or {}
    request["inputs"] = [_tensor_header(name, array, binary, chunks, per_input.get(name))[0]
                         for name, array in inputs.items()]
    if outputs is not None:
        request["outputs"] = [{"name": name, "parameters": {"binary_data": binary_outputs}}
                              for name in outputs]
    return _body(request, chunks)


def encode_infer_response(
    outputs: Mapping[str, np.ndarray],
    *,
    model_name: str,
    model_version: str | None = None,
    binary_outputs: bool | Collection[str] = False,
    request_id: str | None = None,
    parameters: Mapping[str, Any] | None = None,
) -> tuple[bytes, dict[str, str]]:
    """(body, extra HTTP headers) of an inference response.

    binary_outputs: True for all outputs as binary tensor data, or the names of those to send
    so (the rest go as JSON `data`).
    """
    chunks: list[Any] = []
    response: dict[str, Any] = {"model_name": model_name}
    if model_version is not None:
        response["model_version"] = model_version
    if request_id is not None:
        response["id"] = request_id
    if parameters:
        response["parameters"] = dict(parameters)
    response["outputs"] = [
        _tensor_header(name, array,
                       binary_outputs if isinstance(binary_outputs, bool)
                       else name in binary_outputs, chunks, text_bytes=True)[0]
        for name, array in outputs.items()
    ]
    return _body(response, chunks)


def encode_error(message: str) -> bytes:
    """The JSON body of an error answer: `{"error": message}`."""
    return orjson.dumps({"error": message})


# -- decoding ------------------------------------------------------------------------------


def _split_body(body: bytes, header_length: int | None) -> tuple[Any, memoryview]:
    if header_length is None or header_length == len(body):
        header_length = len(body)
    elif header_length > len(body):
        raise ProtocolError(f"{HEADER_LENGTH} is {header_length} but the body has only "
                            f"{len(body)} bytes")
    view = memoryview(body)
    try:
        header = orjson.loads(view[:header_length])
    except orjson.JSONDecodeError as error:
        where = "the body" if header_length == len(body) else \
            f"the first {header_length} bytes of the body ({HEADER_LENGTH})"
        hint = ""
        if header_length == len(body) and "after document" in str(error):
            hint = f" (binary tensor data after the JSON needs the {HEADER_LENGTH} header)"
        raise ProtocolError(f"{where} is not valid JSON: {error}{hint}") from None
    if not isinstance(header, dict):
        raise ProtocolError(f"expected a JSON object, got {type(header).__name__}")
    return header, view[header_length:]


def _array_from_json(data: Any, dtype: np.dtype[Any], count: int, where: str) -> np.ndarray:
    if not isinstance(data, list):
        raise ProtocolError(f"{where}: 'data' must be a list, got {type(data).__name__}")
    try:
        array = np.array(data)
    except (ValueError, TypeError, OverflowError) as error:
        raise ProtocolError(f"{where}: 'data' is not a regular numeric list: {error}") from None
    if array.size != count:
        raise ProtocolError(f"{where}: 'data' has {array.size} values but the shape needs {count}")
    if count == 0:
        return np.empty(0, dtype)
    allowed = _JSON_KINDS[dtype.kind]
    if array.dtype.kind == "O" and dtype.kind == "f":
        # orjson writes NaN and infinities as null; read null back as NaN.
        try:
            array = np.array(data, dtype=np.float64)
        except (ValueError, TypeError) as error:
            raise ProtocolError(f"{where}: 'data' is not numeric: {error}") from None
    elif array.dtype.kind in "fO" and dtype.kind in "iu":
        # Integers past int64 (UINT64) make numpy guess float64 or object: redo it exactly.
        exact = np.array(data, dtype=object).reshape(-1)
        if all(type(value) is int for value in exact):
            try:
                return exact.astype(dtype)
            except OverflowError:
                raise ProtocolError(f"{where}: 'data' values are out of range for "
                                    f"{_DATATYPES[dtype]}") from None
    if array.dtype.kind not in allowed:
        raise ProtocolError(f"{where}: 'data' holds {array.dtype.kind!r}-kind values "
                            f"({array.dtype}) that do not fit datatype {_DATATYPES[dtype]}")
    if dtype.kind in "iu" and array.dtype != dtype:
        info = np.iinfo(dtype)
        low, high = array.min(), array.max()
        if low < info.min or high > info.max:
            raise ProtocolError(f"{where}: 'data' values [{low}, {high}] are out of range for "
                                f"{_DATATYPES[dtype]} [{info.min}, {info.max}]")
    return array.astype(dtype, copy=False).reshape(-1)


def _decode_tensor(tensor: Any, kind: str, binary: memoryview,
                   offset: int) -> tuple[str, np.ndarray, int]:
    """(name, array, offset past its binary data) of one `$request_input`/`$response_output`."""
    if not isinstance(tensor, dict):
        raise ProtocolError(f"each {kind} must be a JSON object, got {type(tensor).__name__}")
    name = tensor.get("name")
    if not isinstance(name, str):
        raise ProtocolError(f"{kind} without a 'name' string: {str(tensor)[:80]}")
    where = f"{kind} {name!r}"
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(type(dim) is int and dim >= 0 for dim in shape):
        raise ProtocolError(f"{where}: 'shape' must be a list of non-negative integers, "
                            f"got {shape!r}")
    datatype = tensor.get("datatype")
    if not isinstance(datatype, str):
        raise ProtocolError(f"{where}: 'datatype' must be a string, got {datatype!r}")
    try:
        dtype = numpy_dtype(datatype)
    except ProtocolError as error:
        raise ProtocolError(f"{where}: {error}") from None
    count = math.prod(shape)
    parameters = tensor.get("parameters")
    size = parameters.get("binary_data_size") if isinstance(parameters, dict) else None
    if datatype == BYTES:
        if kind == "output" and size is None and "data" in tensor:
            return name, _text_tensor(where, tensor["data"], shape, count), offset
        return name, _decode_bytes(where, shape, size, binary, offset), offset + (size or 0)
    if size is None:
        if "data" not in tensor:
            raise ProtocolError(f"{where}: has neither 'data' nor parameters.binary_data_size")
        array = _array_from_json(tensor["data"], dtype, count, where)
        return name, array.reshape(shape), offset
    if "data" in tensor:
        raise ProtocolError(f"{where}: has both 'data' and parameters.binary_data_size")
    if type(size) is not int or size < 0:
        raise ProtocolError(f"{where}: binary_data_size must be a byte count, got {size!r}")
    needed = count * dtype.itemsize
    if size != needed:
        raise ProtocolError(f"{where}: binary_data_size is {size} bytes but shape {shape} of "
                            f"{datatype} needs {needed}")
    if offset + size > len(binary):
        raise ProtocolError(f"{where}: binary_data_size {size} runs past the end of the body "
                            f"({len(binary) - offset} bytes of binary data left)")
    array = np.frombuffer(binary, dtype, count, offset).reshape(shape)
    return name, array, offset + size


def _text_tensor(where: str, data: Any, shape: list[int], count: int) -> np.ndarray:
    """A BYTES output sent as JSON strings (classification results), as bytes elements."""
    if not isinstance(data, list) or not all(isinstance(element, str) for element in data):
        raise ProtocolError(f"{where}: a BYTES tensor's 'data' must be a list of strings")
    if len(data) != count:
        raise ProtocolError(f"{where}: 'data' has {len(data)} values but the shape needs {count}")
    elements = np.empty(count, dtype=object)
    elements[:] = [element.encode() for element in data]
    return elements.reshape(shape)


def _decode_bytes(where: str, shape: list[int], size: Any, binary: memoryview,
                  offset: int) -> np.ndarray:
    """A BYTES tensor's elements (4-byte little-endian length, then the bytes, each)."""
    if type(size) is not int or size < 0:
        raise ProtocolError(f"{where}: BYTES tensors must be sent as binary tensor data "
                            "(parameters.binary_data_size)")
    if offset + size > len(binary):
        raise ProtocolError(f"{where}: binary_data_size {size} runs past the end of the body "
                            f"({len(binary) - offset} bytes of binary data left)")
    count = math.prod(shape)
    elements = np.empty(count, dtype=object)
    position, end = offset, offset + size
    for index in range(count):
        if position + 4 > end:
            raise ProtocolError(f"{where}: binary data ends inside element {index} of {count}")
        length = int.from_bytes(binary[position:position + 4], "little")
        position += 4
        if position + length > end:
            raise ProtocolError(f"{where}: element {index} says {length} bytes, only "
                                f"{end - position} are left")
        elements[index] = bytes(binary[position:position + length])
        position += length
    if position != end:
        raise ProtocolError(f"{where}: {end - position} bytes left after {count} BYTES elements")
    return elements.reshape(shape)


def _check_binary_consumed(binary: memoryview, used: int) -> None:
    if used != len(binary):
        raise ProtocolError(f"the body has {len(binary)} bytes of binary tensor data after the "
                            f"JSON header but the tensors' binary_data_size add up to {used}")


def _optional_str(header: dict[str, Any], key: str) -> str | None:
    value = header.get(key)
    if value is None or isinstance(value, str):
        return value
    raise ProtocolError(f"'{key}' must be a string, got {value!r}")


def _parameters(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ProtocolError(f"{where}'parameters' must be a JSON object, got {value!r}")
    return value


def decode_infer_request(body: bytes, header_length: int | None) -> InferRequest:
    """Decode an inference request; `header_length` is `Inference-Header-Content-Length`.

    Binary inputs are read-only views into `body` (no copy).
    """
    header, binary = _split_body(body, header_length)
    tensors = header.get("inputs")
    if not isinstance(tensors, list) or not tensors:
        raise ProtocolError("'inputs' must be a non-empty list of tensors")
    inputs: dict[str, np.ndarray] = {}
    input_parameters: dict[str, dict[str, Any]] = {}
    offset = 0
    for tensor in tensors:
        name, array, offset = _decode_tensor(tensor, "input", binary, offset)
        if name in inputs:
            raise ProtocolError(f"input {name!r} is given twice")
        inputs[name] = array
        input_parameters[name] = _parameters(tensor.get("parameters"), f"input {name!r}: ")
    _check_binary_consumed(binary, offset)
    outputs: dict[str, bool | None] = {}
    requested_parameters: dict[str, dict[str, Any]] = {}
    requested = header.get("outputs")
    if requested is not None:
        if not isinstance(requested, list):
            raise ProtocolError(f"'outputs' must be a list, got {requested!r}")
        for output in requested:
            given = output.get("name") if isinstance(output, dict) else None
            if not isinstance(given, str):
                raise ProtocolError(f"each requested output needs a 'name', got {output!r}")
            name = given
            output_parameters = _parameters(output.get("parameters"), f"output {name!r}: ")
            flag = output_parameters.get("binary_data")
            if flag is not None and not isinstance(flag, bool):
                raise ProtocolError(f"output {name!r}: binary_data must be true or false, "
                                    f"got {flag!r}")
            outputs[name] = flag
            if output_parameters:
                requested_parameters[name] = output_parameters
    return InferRequest(inputs=inputs, outputs=outputs, id=_optional_str(header, "id"),
                        parameters=_parameters(header.get("parameters"), ""),
                        input_parameters=input_parameters,
                        output_parameters=requested_parameters)


def decode_infer_response(body: bytes, header_length: int | None) -> InferResponse:
    """Decode an inference response (an `{"error": ...}` body raises ProtocolError)."""
    header, binary = _split_body(body, header_length)
    if "error" in header:
        raise ProtocolError(f"the server answered an error: {header['error']}", status=502)
    tensors = header.get("outputs")
    if not isinstance(tensors, list):
        raise ProtocolError("'outputs' must be a list of tensors")
    outputs: dict[str, np.ndarray] = {}
    offset = 0
    for tensor in tensors:
        name, array, offset = _decode_tensor(tensor, "output", binary, offset)
        outputs[name] = array
    _check_binary_consumed(binary, offset)
    model_name = header.get("model_name")
    if not isinstance(model_name, str):
        raise ProtocolError(f"'model_name' must be a string, got {model_name!r}")
    return InferResponse(outputs=outputs, model_name=model_name,
                         model_version=_optional_str(header, "model_version"),
                         id=_optional_str(header, "id"),
                         parameters=_parameters(header.get("parameters"), ""))


def error_message(body: bytes) -> str:
    """The message of an `{"error": ...}` body, else the body as text."""
    try:
        decoded = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body.decode("utf-8", "replace")
    if isinstance(decoded, dict) and isinstance(decoded.get("error"), str):
        return decoded["error"]
    return body.decode("utf-8", "replace")


def infer_path(model_name: str, model_version: str | None = None) -> str:
    """The REST path of a model's infer endpoint."""
    if model_version:
        return f"/v2/models/{model_name}/versions/{model_version}/infer"
    return f"/v2/models/{model_name}/infer"
