"""Wire formats. `oip`: the Open Inference Protocol v2 over REST, with binary tensor data."""

from tierwise.protocol.oip import (
    HEADER_LENGTH,
    InferRequest,
    InferResponse,
    ProtocolError,
    datatype_of,
    decode_infer_request,
    decode_infer_response,
    encode_error,
    encode_infer_request,
    encode_infer_response,
    error_message,
    infer_path,
    numpy_dtype,
    parse_header_length,
)

__all__ = [
    "HEADER_LENGTH",
    "InferRequest",
    "InferResponse",
    "ProtocolError",
    "datatype_of",
    "decode_infer_request",
    "decode_infer_response",
    "encode_error",
    "encode_infer_request",
    "encode_infer_response",
    "error_message",
    "infer_path",
    "numpy_dtype",
    "parse_header_length",
]
