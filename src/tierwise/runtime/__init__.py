"""ONNX Runtime sessions and dynamic batching (numpy + onnxruntime only)."""

from tierwise.runtime.session import OnnxModel

__all__ = ["OnnxModel"]
