"""The stages of one inference, run, learned from and priced.

`call_tier` is a remote stage: a remote call (`tierwise.client.remote`) whose answer updates
the tier's link and server estimators and becomes a priced `StageTrace`. `Execution` is what a
plan runs its stages through (`tierwise.planner.plans.StageRunner`): local stages on ONNX
Runtime, remote stages through `call_tier`, each recorded in the request's trace, all on the
one model set the request started with.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from tierwise.client.modelset import ModelSet
from tierwise.client.remote import RemoteTimeoutError, remote_infer
from tierwise.client.trace import StageTrace, Trace
from tierwise.config import DEVICE_TIER
from tierwise.models.inputs import as_batch, input_key
from tierwise.models.store import ModelInfo
from tierwise.planner.plans import RemoteStageError, StageOutcome

if TYPE_CHECKING:
    from tierwise.client.client import Client


def call_tier(client: Client, tier: str, model: str, tensor: np.ndarray, codec: str,
              abort_at: float, learn: bool = True, version: str | None = None, *,
              models: Mapping[str, ModelInfo] | None = None
              ) -> tuple[dict[str, np.ndarray], StageTrace]:
    """One OIP v2 inference on `tier` (of `version`, else the server's default): (its
    outputs by name, its stage trace). Learns from the transfer unless `learn` is False (a probe,
    whose caller learns from it its own way); raises RemoteStageError when there is no
    usable answer. `models` (default: the client's current ones) name the model's input."""
    info = (models if models is not None else client.models).get(model)
    input_name = info.inputs[0].name if info else "image"
    link = client.link_estimators[tier]
    try:
        answer = remote_infer(client.http(tier), model, tensor, codec, input_name, abort_at,
                              version, tier=tier)
    except RemoteTimeoutError as timeout:
        if learn:
            link.observe_timeout(timeout.request_bytes, timeout.waited_ms)
        raise
    if learn:
        link.observe(answer.bytes_up, answer.bytes_down, answer.network_ms,
                     payload_up_bytes=answer.payload_bytes)
        # batch-1 compute is what the profile measured: only that corrects it
        client.server_estimators[tier].observe(
            model, answer.compute_ms if answer.batch_size == 1 else 0.0,
            client.profiled_ms.get((tier, model)), answer.queue_ms)
    # A batch's compute is shared by its rows; this request pays for its own rows.
    rows = len(tensor)
    billed_ms = answer.compute_ms * rows / max(answer.batch_size, rows)
    prices = client.prices
    stage = StageTrace(
        kind="remote", tier=tier, model=model, model_version=answer.model_version,
        total_ms=answer.total_ms, compute_ms=answer.compute_ms, queue_ms=answer.queue_ms,
        network_ms=answer.network_ms, bytes_up=answer.bytes_up, bytes_down=answer.bytes_down,
        batch_size=answer.batch_size, codec=codec,
        cost_usd=prices.compute_usd(tier, billed_ms)
        + prices.transfer_usd(tier, answer.bytes_up, answer.bytes_down))
    return answer.outputs, stage


class Execution:
    """Runs the stages of one inference for its plan and records them in its `trace`.

    Args:
        client: whose sessions, links and estimators the stages use.
        trace: the request's trace; every stage, answered or failed, is appended to it.
        abort_at: when a remote stage must give up (a `time.perf_counter()`).
        model_set: the models as the request started. A registry swap replaces the client's
            snapshot, not this one: local stages run these models and, from a registry,
            remote stages ask for their versions, so a head and its tail always match.
    """

    def __init__(self, client: Client, trace: Trace, abort_at: float,
                 model_set: ModelSet, prepared: dict[Any, np.ndarray] | None = None) -> None:
        self.client = client
        self.trace = trace
        self.abort_at = abort_at
        self.model_set = model_set
        self.pin_versions = client.subscriber is not None
        # the request's input as each input spec takes it (a frame is resized once per size,
        # not once per stage: a cascade's first stage and a fallback share it)
        self._prepared = prepared if prepared is not None else {}

    def prepared(self, model: str, tensor: np.ndarray) -> np.ndarray:
        """The request's input as `model` takes it (resized where it takes images); a
        tail's features as they are."""
        info = self.model_set.infos.get(model)
        if info is None or info.role == "tail":
            return tensor
        key = input_key(info)
        batch = self._prepared.get(key)
        if batch is None:
            batch = self._prepared[key] = as_batch(info, tensor)
        return batch

    def run_local(self, model: str, tensor: np.ndarray) -> dict[str, np.ndarray]:
        client = self.client
        session = client.session(model, self.model_set)
        tensor = self.prepared(model, tensor)
        started = time.perf_counter()
        output, compute_ms = session.run_all_timed(tensor)
        scale = client.config.tier(DEVICE_TIER).compute_scale
        if scale > 1.0:  # emulate a slower device: stretch the measured compute time
            time.sleep(compute_ms * (scale - 1.0) / 1e3)
            compute_ms *= scale
        client.observe_device(model, compute_ms)
        total_ms = (time.perf_counter() - started) * 1e3
        self.trace.stages.append(StageTrace(
            kind="local", tier=DEVICE_TIER, model=model, model_version=session.info.version,
            total_ms=total_ms, compute_ms=compute_ms,
            cost_usd=client.prices.device_energy_usd(compute_ms),
        ))
        return output

    def run_remote(self, tier: str, model: str, tensor: np.ndarray,
                   codec: str) -> dict[str, np.ndarray]:
        tensor = self.prepared(model, tensor)
        try:
            output, stage = call_tier(self.client, tier, model, tensor, codec, self.abort_at,
                                      version=self._version(model), models=self.model_set.infos)
        except RemoteStageError as error:
            self.trace.stages.append(StageTrace(
                kind="remote", tier=tier, model=model, model_version="", total_ms=0.0,
                compute_ms=0.0, codec=codec, error=str(error)))
            if error.tier_down:
                self.client.mark(tier, up=False)
            elif error.retry_after_s is not None:
                self.client.server_estimators[tier].observe_overload(error.retry_after_s)
            raise
        self.trace.stages.append(stage)
        return output

    def _version(self, model: str) -> str | None:
        info = self.model_set.infos.get(model)
        return info.version if self.pin_versions and info is not None else None

    def outcome(self, model: str, outputs: dict[str, np.ndarray]) -> StageOutcome:
        task = self.client.task(model, self.model_set)
        result = task.decode(outputs)[0]
        return StageOutcome(result, task.confidence(result))
