"""`tierwise.Client`: the device SDK. numpy + onnxruntime + httpx, no torch.

It runs the device model with ONNX Runtime, calls edge and cloud servers over OIP v2 (binary
tensors, keep-alive) through the emulated links, executes plans, and returns every answer
with its `Trace`. A remote stage that fails falls back to the device model: a request is
never lost.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

from tierwise.client.trace import StageTrace, Trace
from tierwise.config import Config, load_config
from tierwise.net.shaping import TRANSFER_EXTENSION, EmulatedLink, Transfer, shaped_client
from tierwise.planner.cost import compute_cost_usd, device_energy_cost_usd, transfer_cost_usd
from tierwise.planner.plans import Local, Plan, StageOutcome
from tierwise.profile.calibration import softmax
from tierwise.protocol.oip import (
    HEADER_LENGTH,
    ProtocolError,
    decode_infer_response,
    encode_infer_request,
    infer_path,
    parse_header_length,
)
from tierwise.runtime.session import OnnxModel
from tierwise.zoo.store import ModelInfo, list_models, model_name

DEVICE_TIER = "device"


class RemoteStageError(RuntimeError):
    """A remote stage gave no usable answer (unreachable, timed out, or an error status)."""


@dataclass
class InferenceResult:
    label: int
    probabilities: np.ndarray  # calibrated, [classes]
    trace: Trace

    @property
    def confidence(self) -> float:
        return float(self.probabilities.max())


def emulation_labels(config: Config) -> list[str]:
    """What is emulated under `config`: every output that depends on it must print these."""
    labels = []
    for tier, settings in config.tiers.items():
        if settings.compute_scale != 1.0:
            labels.append(f"{tier} compute: emulated at {settings.compute_scale:g}x this host's "
                          "compute time")
    for tier, link in config.links.items():
        if link.emulate:
            labels.append(f"link device->{tier}: {EmulatedLink(link).describe()}")
    return labels


def _as_batch(image: np.ndarray) -> np.ndarray:
    """One image as a batch of one: [28, 28] or [1, 28, 28] -> [1, 1, 28, 28], uint8."""
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise TypeError(f"image: expected uint8 pixels, got dtype {array.dtype}")
    while array.ndim < 4:
        array = array[None]
    if array.shape[0] != 1:
        raise ValueError(f"image: expected one image, got shape {np.asarray(image).shape}")
    return np.ascontiguousarray(array)


class Client:
    """The device side of tierwise.

    Args:
        config: the tierwise config (links, tiers, prices); default `load_config()`.
        models_dir: where the device's models and the metadata of remote models live;
            default `<config.data_dir>/models`.
        tier_urls: base URL per remote tier; default `http://{host}:{port}` from the config.
        device_model: the model `Local` falls back to; default `fmnist-device`.
        plan: the plan `infer` runs when it is given none; default `Local(device_model)`.
        timeout_s: per remote request.
    """

    def __init__(
        self,
        config: Config | None = None,
        *,
        models_dir: str | Path | None = None,
        tier_urls: dict[str, str] | None = None,
        device_model: str = model_name("device"),
        plan: Plan | None = None,
        timeout_s: float = 10.0,
        threads: int = 1,
    ) -> None:
        self.config = config or load_config()
        self.models_dir = Path(models_dir) if models_dir else self.config.models_dir
        found = list_models(self.models_dir)
        self.models: dict[str, ModelInfo] = {name: info for name, (info, _) in found.items()}
        self._paths = {name: path for name, (_, path) in found.items()}
        if device_model not in self.models:
            raise FileNotFoundError(
                f"device_model: {device_model!r} not found under {self.models_dir} "
                f"(found {sorted(self.models)}); run `tierwise zoo train` first"
            )
        self.device_model = device_model
        self.plan = plan or Local(device_model)
        self.timeout_s = timeout_s
        self.threads = threads
        self.tier_urls = dict(tier_urls or {})
        self._sessions: dict[str, OnnxModel] = {}
        self._http: dict[str, httpx.Client] = {}
        self._emulated = tuple(emulation_labels(self.config))  # once: every trace carries it
        self.session(device_model)  # load eagerly: the fallback must always be ready

    # -- the public API --------------------------------------------------------------------

    def infer(self, image: np.ndarray, plan: Plan | None = None) -> InferenceResult:
        """Classify one uint8 image with `plan` (default: the client's plan)."""
        plan = plan or self.plan
        batch = _as_batch(image)
        execution = _Execution(self, plan.describe())
        started = time.perf_counter()
        outcome = plan.execute(execution, batch)
        execution.trace.total_ms = (time.perf_counter() - started) * 1e3
        probabilities = outcome.probabilities
        return InferenceResult(int(probabilities.argmax()), probabilities, execution.trace)

    def emulation_labels(self) -> list[str]:
        """What this client emulates, for every output that depends on it."""
        return list(self._emulated)

    def close(self) -> None:
        for http in self._http.values():
            http.close()
        self._http.clear()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- stages ---------------------------------------------------------------------------

    def session(self, model: str) -> OnnxModel:
        if model not in self._sessions:
            if model not in self._paths:
                raise FileNotFoundError(
                    f"model {model!r} is not on this device ({self.models_dir})"
                )
            self._sessions[model] = OnnxModel(self._paths[model], self.models[model], self.threads)
        return self._sessions[model]

    def http(self, tier: str) -> httpx.Client:
        if tier not in self._http:
            url = self.tier_urls.get(tier)
            if url is None:
                settings = self.config.tier(tier)
                if settings.port == 0:
                    raise RemoteStageError(f"tier {tier!r}: no URL (set tiers.{tier}.port or "
                                           "pass tier_urls)")
                url = f"http://{settings.host}:{settings.port}"
            self._http[tier] = shaped_client(url, self.config.links.get(tier), self.timeout_s)
        return self._http[tier]

    def temperature(self, model: str) -> float:
        info = self.models.get(model)
        return info.temperature if info else 1.0


class _Execution:
    """Runs the stages of one inference for its plan and records them in its trace."""

    def __init__(self, client: Client, plan: str) -> None:
        self.client = client
        self.trace = Trace(plan=plan, emulated=client._emulated)

    def run_local(self, model: str, image: np.ndarray) -> StageOutcome:
        client = self.client
        session = client.session(model)
        started = time.perf_counter()
        logits, compute_ms = session.run_timed(image)
        scale = client.config.tier(DEVICE_TIER).compute_scale
        if scale > 1.0:  # emulate a slower device: stretch the measured compute time
            time.sleep(compute_ms * (scale - 1.0) / 1e3)
            compute_ms *= scale
        total_ms = (time.perf_counter() - started) * 1e3
        self.trace.stages.append(StageTrace(
            kind="local", tier=DEVICE_TIER, model=model, model_version=session.info.version,
            total_ms=total_ms, compute_ms=compute_ms,
            cost_usd=device_energy_cost_usd(client.config.prices, compute_ms),
        ))
        return StageOutcome(softmax(logits[0], client.temperature(model)))

    def run_remote(self, tier: str, model: str, image: np.ndarray) -> StageOutcome:
        try:
            return self._call_remote(tier, model, image)
        except (httpx.HTTPError, RemoteStageError, ProtocolError) as error:
            self.trace.stages.append(StageTrace(
                kind="remote", tier=tier, model=model, model_version="", total_ms=0.0,
                compute_ms=0.0, error=f"{type(error).__name__}: {error}",
            ))
            self.trace.fallback = f"{tier} failed ({type(error).__name__}); answered on device"
            return self.run_local(self.client.device_model, image)

    def _call_remote(self, tier: str, model: str, image: np.ndarray) -> StageOutcome:
        client = self.client
        body, headers = encode_infer_request({"image": image}, binary=True,
                                             outputs=["logits"], binary_outputs=True)
        started = time.perf_counter()
        response = client.http(tier).post(infer_path(model), content=body, headers=headers)
        total_ms = (time.perf_counter() - started) * 1e3
        if response.status_code != 200:
            raise RemoteStageError(f"{tier} answered {response.status_code}: {response.text[:200]}")
        decoded = decode_infer_response(
            response.content, parse_header_length(response.headers.get(HEADER_LENGTH))
        )
        transfer: Transfer = response.extensions[TRANSFER_EXTENSION]
        compute_ms = float(response.headers.get("tierwise-compute-ms", 0.0))
        queue_ms = float(response.headers.get("tierwise-queue-ms", 0.0))
        batch_size = int(response.headers.get("tierwise-batch-size", 1))
        # A batch's compute is shared by its requests; each pays its share.
        billed_ms = compute_ms / max(batch_size, 1)
        prices = client.config.prices
        self.trace.stages.append(StageTrace(
            kind="remote", tier=tier, model=model,
            model_version=response.headers.get(
                "tierwise-model-version", decoded.model_version or ""
            ),
            total_ms=total_ms, compute_ms=compute_ms, queue_ms=queue_ms,
            network_ms=max(0.0, total_ms - compute_ms - queue_ms),
            bytes_up=transfer.bytes_up, bytes_down=transfer.bytes_down, batch_size=batch_size,
            cost_usd=compute_cost_usd(prices, tier, billed_ms)
            + transfer_cost_usd(prices, tier, transfer.bytes_up, transfer.bytes_down),
        ))
        logits = decoded.outputs["logits"]
        return StageOutcome(softmax(logits[0], client.temperature(model)))
