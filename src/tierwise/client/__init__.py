"""The device SDK: `Client`, `Trace`."""

from tierwise.client.client import Client, FeedbackError, InferenceResult, RemoteStageError
from tierwise.client.trace import StageTrace, Trace

__all__ = ["Client", "FeedbackError", "InferenceResult", "RemoteStageError", "StageTrace",
           "Trace"]
