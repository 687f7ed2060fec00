"""The device SDK: `Client`, `Trace`."""

from tierwise.client.client import Client, InferenceResult, RemoteStageError
from tierwise.client.trace import StageTrace, Trace

__all__ = ["Client", "InferenceResult", "RemoteStageError", "StageTrace", "Trace"]
