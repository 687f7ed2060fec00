"""Wire formats. `oip`: the Open Inference Protocol v2 over REST, with binary tensor data."""

from tierwise.protocol.oip import (
    InferRequest,
    InferResponse,
    ProtocolError,
    decode_infer_request,
    decode_infer_response,
    encode_infer_request,
    encode_infer_response,
)

__all__ = [
    "InferRequest",
    "InferResponse",
    "ProtocolError",
    "decode_infer_request",
    "decode_infer_response",
    "encode_infer_request",
    "encode_infer_response",
]
