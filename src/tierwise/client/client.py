"""`tierwise.Client`: the device SDK. numpy + onnxruntime + httpx, no torch.

It runs device models with ONNX Runtime, calls edge and cloud servers over OIP v2 (binary
tensors, keep-alive) through their links, and answers every request with its `Trace`.

With no plan given, each request is placed by the policy (`tierwise.planner.policy`) from the
model profiles and the online estimates, which every transfer updates. A remote stage that
fails, times out or would miss the request's deadline falls back to the next feasible plan
without that tier, at worst the device model: a request is always answered, exactly once. A
tier that does not answer is marked down until the prober (`tierwise.client.prober`) sees it
healthy again; meanwhile the client runs offline.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from tierwise.client.prober import Prober
from tierwise.client.trace import StageTrace, Trace
from tierwise.codecs import RAW, encode_rows
from tierwise.config import DEVICE_TIER, Config, load_config
from tierwise.models.inputs import as_batch
from tierwise.models.store import ModelInfo, list_models, tier_models
from tierwise.monitor.drift import DriftMonitor
from tierwise.monitor.metrics import ClientMetrics
from tierwise.monitor.telemetry import Telemetry
from tierwise.net.shaping import (
    ABORT_AT_EXTENSION,
    TRANSFER_EXTENSION,
    EmulatedLink,
    Transfer,
    shaped_client,
)
from tierwise.planner.cost import compute_cost_usd, device_energy_cost_usd, transfer_cost_usd
from tierwise.planner.estimators import Ewma, LinkEstimator, ServerEstimator
from tierwise.planner.plans import Local, Plan, RemoteStageError, StageOutcome
from tierwise.planner.policy import (
    SLO,
    Decision,
    PlanningState,
    Policy,
    candidates_from_profiles,
)
from tierwise.profile.model_profile import ModelProfile, load_tier_profiles
from tierwise.protocol.oip import (
    HEADER_LENGTH,
    ProtocolError,
    decode_infer_response,
    encode_infer_request,
    infer_path,
    parse_header_length,
)
from tierwise.registry.subscriber import (
    DeviceView,
    InstalledVersion,
    RegistryUnavailableError,
    Subscriber,
    SubscriberState,
    check_device_id,
    default_device_id,
    registry_token,
    subscriber_for,
)
from tierwise.runtime.session import OnnxModel
from tierwise.tasks import ClassificationResult, Task, task_for

log = logging.getLogger("tierwise.client")
# Time kept in hand, beyond the device model's own, for the device fallback when a remote
# stage is given a deadline: scheduling jitter on a busy device.
FALLBACK_MARGIN_MS = 2.0
FALLBACK_MARGIN_SHARE = 0.05
# An OIP request's HTTP request line and headers, near enough (measured on loopback).
HTTP_HEADER_BYTES = 300
MONITOR_PERIOD_S = 0.1

__all__ = ["Client", "InferenceResult", "RemoteStageError", "emulation_labels"]


@dataclass
class InferenceResult:
    """One answer: the task's `result` (`tierwise.tasks`: a ClassificationResult,
    DetectionResult, embedding vector, or generic outputs) and its `trace`. For a
    classification, `label`, `probabilities` (calibrated, float64 [classes]) and
    `confidence` read through to the result."""

    result: Any
    trace: Trace
    confidence: float | None = None

    @property
    def label(self) -> int:
        return int(self._classification().label)

    @property
    def probabilities(self) -> np.ndarray:
        return self._classification().probabilities

    def _classification(self) -> ClassificationResult:
        if not isinstance(self.result, ClassificationResult):
            raise AttributeError(f"a {type(self.result).__name__} has no label or class "
                                 "probabilities; read `result`")
        return self.result


def compute_labels(config: Config) -> list[str]:
    """Which tiers' compute speed is emulated (`compute_scale`)."""
    return [f"{tier} compute: emulated at {settings.compute_scale:g}x this host's compute time"
            for tier, settings in config.tiers.items() if settings.compute_scale != 1.0]


def emulation_labels(config: Config, links: dict[str, EmulatedLink | None] | None = None
                     ) -> list[str]:
    """What is emulated under `config`: every output that depends on it must print these."""
    labels = compute_labels(config)
    for tier, link in config.links.items():
        emulated = (links or {}).get(tier) or (EmulatedLink(link) if link.emulate else None)
        if emulated is not None:
            labels.append(f"link device->{tier}: {emulated.describe()}")
    return labels


class Client:
    """The device side of tierwise.

    Args:
        config: the tierwise config (tiers, links, prices, SLOs); default `load_config()`.
        models_dir: where the device's models and the metadata and profiles of remote models
            live; default `<config.data_dir>/models`.
        tier_urls: base URL per remote tier; default `http://{host}:{port}` from the config.
        device_model: the model every fallback ends at; default the first model the device
            tier runs (`tiers.device.models`, else a model imported `--runs-on device`).
        plan: a fixed plan for every request; default None: the policy places each request.
        slo: this client's default SLO; default the config's `slo` (deadline, accuracy floor).
        links: the link per tier (default: emulated from `config.links`); pass your own to
            change rates while it runs, or `EmulatedLink(..., pace=False)` under `tc`.
        timeout_s: the longest a remote stage may take when no deadline bounds it.
        probe: run the background prober (health of down tiers, stale link estimates).
        registry_url: take the models from this registry (the cloud server) instead of
            `models_dir`: verified, kept current by polling, swapped in while requests run;
            default `registry.url` unless `models_dir` is given. Remote stages then ask for
            the version this device was given, and every trace records it.
        channel, device_id: the registry channel and this device's id (its canary cohort,
            the name its telemetry goes by); default `registry.channel`,
            `registry.device_id` (else the host name).
        collector_url: send every trace to this collector (the cloud server), stored and
            forwarded: nothing is lost across outages; default `telemetry.url`, else
            `registry.url`, else no telemetry.
        drift: watch the inputs, confidences and answers for drift (PSI and KS against the
            first 500 inferences; a `DriftMonitor` of your own, or False); alerts go into the
            trace, the metrics and the telemetry.
        metrics_port: serve this client's Prometheus metrics at http://127.0.0.1:<port>/metrics
            (`client.metrics.exposition()` has them either way).
    """

    def __init__(
        self,
        config: Config | None = None,
        *,
        models_dir: str | Path | None = None,
        tier_urls: dict[str, str] | None = None,
        device_model: str | None = None,
        plan: Plan | None = None,
        slo: SLO | None = None,
        links: dict[str, EmulatedLink | None] | None = None,
        timeout_s: float = 10.0,
        threads: int = 1,
        probe: bool = True,
        registry_url: str | None = None,
        channel: str | None = None,
        device_id: str | None = None,
        collector_url: str | None = None,
        drift: DriftMonitor | bool = True,
        metrics_port: int | None = None,
    ) -> None:
        self.config = config or load_config()
        self.device_id = check_device_id(
            device_id or self.config.registry.device_id or default_device_id())
        device_id = self.device_id
        url = registry_url if registry_url is not None else \
            ("" if models_dir else self.config.registry.url)
        self.subscriber: Subscriber | None = None
        if url:
            self.subscriber, models_dir = self._subscribe(url, channel, device_id, timeout_s)
        self.models_dir = Path(models_dir) if models_dir else self.config.models_dir
        self.models: dict[str, ModelInfo] = {}
        self._paths: dict[str, Path] = {}
        self._list_models()
        if device_model is None:
            on_device = tier_models(self.config, self.models).get(DEVICE_TIER, [])
            if not on_device:
                raise FileNotFoundError(
                    f"device_model: no model under {self.models_dir} runs on the device "
                    f"(found {sorted(self.models)}); import one with `tierwise models add "
                    "NAME FILE --runs-on device` or list it in tiers.device.models")
            device_model = on_device[0]
        if device_model not in self.models:
            raise FileNotFoundError(
                f"device_model: {device_model!r} not found under {self.models_dir} "
                f"(found {sorted(self.models)}); import it with `tierwise models add`"
            )
        self.device_model = device_model
        self.plan = plan
        self.slo = slo or SLO(self.config.slo.deadline_ms, self.config.slo.min_accuracy)
        self.timeout_s = timeout_s
        self.threads = threads
        self.tier_urls = dict(tier_urls or {})
        if links is None:
            links = {tier: EmulatedLink(link) if link.emulate else None
                     for tier, link in self.config.links.items()}
        self.links = links
        self.link_estimators = {tier: LinkEstimator(link)
                                for tier, link in self.config.links.items()}
        self.server_estimators = {tier: ServerEstimator() for tier in self.config.links}
        self._device_ratio: dict[str, Ewma] = {}
        self.down: set[str] = set()
        self._lock = threading.Lock()
        self._sessions: dict[Path, OnnxModel] = {}  # by the resolved path of model.onnx
        self._http: dict[str, httpx.Client] = {}
        self._policy: Policy | None = None
        self._profiled_ms: dict[tuple[str, str], float] = {}
        self._tasks: dict[tuple[str, str, str], Task[Any]] = {}
        self._emulated = tuple(emulation_labels(self.config, links))
        self.session(device_model)  # load eagerly: the fallback must always be ready
        self.prober = Prober(self) if probe else None
        collector_url = collector_url if collector_url is not None else \
            (self.config.telemetry.url or self.config.registry.url)
        self.telemetry = self._telemetry(collector_url) if collector_url else None
        self.drift = DriftMonitor() if drift is True else (drift or None)
        self.metrics = ClientMetrics()
        self._monitored: collections.deque[Trace] = collections.deque()
        self._monitor_lock = threading.Lock()
        self._monitor_stop = threading.Event()
        self._monitor_thread = threading.Thread(target=self._monitor_loop, daemon=True,
                                                name="tierwise-monitor")
        self._monitor_thread.start()
        if metrics_port is not None:
            self.metrics.serve(metrics_port)
        if self.subscriber is not None:
            self.subscriber.start()

    # -- the public API --------------------------------------------------------------------

    def infer(self, image: np.ndarray, plan: Plan | None = None, *,
              deadline_ms: float | None = None, min_quality: float | None = None,
              keep_input_on_device: bool = False,
              min_accuracy: float | None = None) -> InferenceResult:
        """Answer one input (an image of any size for a model with an image preprocessing,
        else one sample of the device model's input spec) with the task's result.

        Raises InputError, naming the expected shape and dtype, for an input the device
        model cannot take, before anything runs.

        With a `plan` (or the client's), that plan runs, and a failed remote stage falls back
        to the device model. Without one, the policy picks the cheapest plan meeting the SLO:
        `deadline_ms` and `min_quality` (the quality floor in the task's metric as the
        profiles measured it: accuracy, mAP@0.5 or fidelity to a reference model;
        `min_accuracy` is its older name; default: the client's `slo`), and
        `keep_input_on_device` (only local and split plans qualify).
        """
        batch = as_batch(self.models[self.device_model], image)
        slo = SLO(deadline_ms if deadline_ms is not None else self.slo.deadline_ms,
                  next((floor for floor in (min_quality, min_accuracy) if floor is not None),
                       self.slo.min_accuracy),
                  keep_input_on_device or self.slo.keep_input_on_device)
        started = time.perf_counter()
        plan = plan or self.plan
        decision = None
        if plan is None:
            decision = self.decide(slo)
            plan = decision.plan
        elif keep_input_on_device and plan.sends_raw_input:
            raise ValueError(f"plan: {plan.describe()} sends the input off the device, which "
                             "keep_input_on_device forbids")
        trace = Trace(plan=plan.describe(), emulated=self._emulated,
                      slo={"deadline_ms": slo.deadline_ms, "min_accuracy": slo.min_accuracy,
                           "keep_input_on_device": slo.keep_input_on_device},
                      decision=decision.to_dict() if decision else None)
        excluded: set[str] = set()
        while True:
            execution = _Execution(self, trace, self._abort_at(started, slo, decision))
            try:
                outcome = plan.execute(execution, np.asarray(image))
                break
            except RemoteStageError as error:
                excluded.add(error.tier)
                plan, why = self._fallback(slo, started, excluded, decision is not None)
                trace.fallback = f"{error.tier} failed ({error}); fell back to {why}"
                trace.attempts.append(plan.describe())
        if outcome.fallback:
            trace.fallback = outcome.fallback
        trace.total_ms = (time.perf_counter() - started) * 1e3
        result = outcome.result
        trace.label = int(result.label) if isinstance(result, ClassificationResult) else None
        trace.confidence = outcome.confidence
        self._monitor(trace, batch)
        return InferenceResult(result, trace, outcome.confidence)

    def decide(self, slo: SLO, exclude: set[str] | None = None) -> Decision:
        """What the policy would run now for `slo` (no request is made)."""
        policy = self.policy()
        with self._lock:
            state = PlanningState(
                links={tier: estimator.snapshot()
                       for tier, estimator in self.link_estimators.items()},
                queue_ms={tier: server.queue_ms.value
                          for tier, server in self.server_estimators.items()},
                compute_ratio=self._compute_ratios(),
                unavailable=self.down | (exclude or set()),
            )
        return policy.choose(slo, state)

    def policy(self) -> Policy:
        """The policy over every plan the profiles support (loaded on first use)."""
        if self._policy is None:
            profiles = self._profiles()
            self._policy = Policy(candidates_from_profiles(self.config, profiles),
                                  self.config.prices)
            if self.prober is not None:
                self.prober.start()
        return self._policy

    def probe_now(self) -> None:
        """Probe every remote tier once, now (health, RTT, bandwidth): an app-start warm-up."""
        (self.prober or Prober(self)).probe_all(force=True)

    def emulation_labels(self) -> list[str]:
        """What this client emulates, for every output that depends on it."""
        return list(self._emulated)

    def close(self) -> None:
        self._monitor_stop.set()
        self._monitor_thread.join(timeout=30)
        self._monitor_batch()  # what an infer racing with close added
        if self.subscriber is not None:
            self.subscriber.stop()
        if self.telemetry is not None:
            self.telemetry.close()
        if self.prober is not None:
            self.prober.stop()
        for http in self._http.values():
            http.close()
        self._http.clear()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _monitor(self, trace: Trace, batch: np.ndarray) -> None:
        """Hand one answered inference to the monitor thread, with its input statistics (the
        only thing about the input that is kept)."""
        pixels = batch.astype(np.float32) * (1 / 255)
        trace.input_mean = float(pixels.mean())
        trace.input_std = float(pixels.std())
        self._monitored.append(trace)  # no wake-up: the monitor thread polls

    def _monitor_loop(self) -> None:
        """Drift, metrics and telemetry, off the request path, in batches every
        `MONITOR_PERIOD_S`: a drift check (a KS test every 25 inferences) must not delay the
        request that triggers it, and a thread woken per request would cost every request a
        GIL hand-over."""
        while not self._monitor_stop.wait(MONITOR_PERIOD_S):
            self._monitor_batch()
        self._monitor_batch()

    def _monitor_batch(self) -> None:
        with self._monitor_lock:
            while self._monitored:
                trace = self._monitored.popleft()
                alerts = []
                try:  # monitoring must never take the client down, nor one step the next
                    if self.drift is not None:
                        alerts = self.drift.update({"input_mean": trace.input_mean,
                                                    "input_std": trace.input_std,
                                                    "confidence": trace.confidence,
                                                    "label": trace.label})
                        trace.drift_alerts = [alert.__dict__ for alert in alerts]
                    self.metrics.observe(trace, alerts)
                except Exception:
                    log.exception("drift or metrics of an inference failed")
                if self.telemetry is not None:
                    self.telemetry.record(trace)

    def monitor_drain(self) -> None:
        """Run drift, metrics and telemetry over every inference answered so far, now."""
        self._monitor_batch()

    def _telemetry(self, url: str) -> Telemetry:
        settings = self.config.telemetry
        return Telemetry(
            url, device_id=self.device_id,
            token=registry_token(self.config.registry.token, self.config.registry_dir),
            outbox_path=Path(self.config.data_dir) / "telemetry" / f"outbox-{self.device_id}.db",
            flush_s=settings.flush_s, batch_size=settings.batch_size)

    # -- models: from a directory, or kept current from a registry --------------------------

    def _list_models(self) -> None:
        """Metadata of every model in `models_dir`; weights where this device has them."""
        found = list_models(self.models_dir, weights=False)
        # Both dicts are replaced, never changed in place: a request holds the pair it
        # started with. Paths are resolved, so a path names one version's file.
        self.models = {name: info for name, (info, _) in found.items()}
        self._paths = {name: path.resolve() for name, (_, path) in found.items()
                       if path.is_file()}

    def _subscribe(self, url: str, channel: str | None, device_id: str | None,
                   timeout_s: float) -> tuple[Subscriber, Path]:
        """Start from the registry (or, when it cannot be reached, from what an earlier run
        installed): (the subscriber, the models directory it keeps current)."""
        subscriber = subscriber_for(self.config, DEVICE_TIER, url, channel=channel,
                                    device_id=device_id)
        view = DeviceView(subscriber.cache_dir / "models")
        try:
            view.update(subscriber.wait_until_ready(timeout_s))
        except RegistryUnavailableError:
            if not any(view.directory.glob("*/metadata.json")):
                subscriber.stop()
                raise
            log.warning("registry %s unreachable: starting offline with the models installed "
                        "earlier", url)

        shown = dict(subscriber.state.current)

        def swap(state: SubscriberState) -> bool:
            taken, waiting = self._servable(state, shown)
            shown.clear()
            shown.update(taken)
            with self._lock:
                view.update(SubscriberState(current=taken))
                self._swap()
            self.session(self.device_model)
            return not waiting

        subscriber.on_change = swap
        return subscriber, view.directory

    def _servable(self, state: SubscriberState, shown: dict[str, InstalledVersion]
                  ) -> tuple[dict[str, InstalledVersion], list[str]]:
        """The versions in `state` this device can switch to now: (versions, models still
        waiting). A new version of a model that runs on a server is taken once every such
        tier answers ready for it; until then the device keeps the version it `shown`, so
        its remote stages never ask a server for a version it does not have yet."""
        taken = {model: kept for model, kept in shown.items() if model not in state.current}
        waiting = []
        for model, installed in state.current.items():
            previous = shown.get(model)
            if previous is None or previous.version == installed.version or \
                    self._served_everywhere(installed):
                taken[model] = installed
            else:
                taken[model] = previous
                waiting.append(model)
        return taken, waiting

    def _served_everywhere(self, installed: InstalledVersion) -> bool:
        for member, tiers in installed.runs_on.items():
            for tier in tiers:
                if tier == DEVICE_TIER or tier not in self.config.links:
                    continue
                try:
                    ready = self.http(tier).get(
                        f"/v2/models/{member}/versions/{installed.version}/ready", timeout=2.0)
                except (httpx.HTTPError, RemoteStageError):
                    return False
                if ready.status_code != 200:
                    return False
        return True

    def _swap(self) -> None:
        """New versions are in the models directory (called under the lock): requests
        already running finish on the models and sessions they started with; the next ones
        use the new versions and a policy re-planned from their profiles."""
        self._list_models()
        current = set(self._paths.values())
        self._sessions = {path: session for path, session in self._sessions.items()
                          if path in current}
        self._policy = None

    # -- planning helpers ------------------------------------------------------------------

    def _profiles(self) -> dict[str, ModelProfile]:
        profiles = load_tier_profiles(self.config, self.models_dir)
        if not profiles:
            raise FileNotFoundError(f"{self.models_dir}: no model profiles; run `tierwise "
                                    "profile` (the policy reads nothing else about a model)")
        for name, profile in profiles.items():
            for tier, compute_ms in profile.compute_ms.items():
                self._profiled_ms[(tier, name)] = compute_ms
            for split in profile.splits:
                for tier, blocks in profile.block_ms.items():
                    self._profiled_ms[(tier, split.head)] = sum(blocks[:split.split_point])
                    self._profiled_ms[(tier, split.tail)] = sum(blocks[split.split_point:])
        return profiles

    def _compute_ratios(self) -> dict[tuple[str, str], float]:
        ratios = {(DEVICE_TIER, model): ewma.value for model, ewma in self._device_ratio.items()}
        for tier, server in self.server_estimators.items():
            for model, ewma in server.compute_ratio.items():
                ratios[(tier, model)] = ewma.value
        return ratios

    def _abort_at(self, started: float, slo: SLO, decision: Decision | None) -> float:
        """When a remote stage must give up: in time for the device fallback to still meet
        the deadline when the plan was predicted to, else after `timeout_s`."""
        if decision is not None and decision.feasible:
            local_ms = self._profiled_ms.get((DEVICE_TIER, self.device_model), 0.0)
            margin_ms = max(FALLBACK_MARGIN_MS, FALLBACK_MARGIN_SHARE * slo.deadline_ms)
            budget_ms = slo.deadline_ms - local_ms - margin_ms
            if budget_ms > 0:
                return started + budget_ms / 1e3
        return started + self.timeout_s

    def _fallback(self, slo: SLO, started: float, excluded: set[str],
                  adaptive: bool) -> tuple[Plan, str]:
        """The next plan after a remote failure: the policy's choice without the failed tiers
        for what is left of the deadline, or the device model."""
        if adaptive:
            left_ms = slo.deadline_ms - (time.perf_counter() - started) * 1e3
            if left_ms > 0:
                decision = self.decide(SLO(left_ms, slo.min_accuracy, slo.keep_input_on_device),
                                       exclude=excluded)
                if decision.feasible:
                    return decision.plan, f"{decision.plan.describe()} (next feasible plan)"
        return Local(self.device_model), "the device model"

    # -- stages ---------------------------------------------------------------------------

    def session(self, model: str, paths: dict[str, Path] | None = None,
                models: dict[str, ModelInfo] | None = None) -> OnnxModel:
        """The loaded `model`, as this client has it now, or as in `paths` and `models` (what
        a request started with)."""
        paths = paths if paths is not None else self._paths
        models = models if models is not None else self.models
        path = paths.get(model)
        if path is None:
            raise FileNotFoundError(f"model {model!r} is not on this device ({self.models_dir})")
        session = self._sessions.get(path)
        if session is None:
            with self._lock:
                session = self._sessions.get(path)
                if session is None:
                    session = OnnxModel(path, models[model], self.threads)
                    self._sessions[path] = session
        return session

    def http(self, tier: str) -> httpx.Client:
        client = self._http.get(tier)
        if client is None:
            url = self.tier_urls.get(tier)
            if url is None:
                settings = self.config.tier(tier)
                if settings.port == 0:
                    raise RemoteStageError(f"tier {tier!r}: no URL (set tiers.{tier}.port or "
                                           "pass tier_urls)", tier)
                url = f"http://{settings.host}:{settings.port}"
            with self._lock:
                client = self._http.get(tier)
                if client is None:
                    client = shaped_client(url, self.links.get(tier), self.timeout_s)
                    self._http[tier] = client
        return client

    def task(self, model: str, models: dict[str, ModelInfo] | None = None) -> Task[Any]:
        """The task that reads `model`'s outputs (by its metadata; cached per version)."""
        info = (models if models is not None else self.models).get(model)
        if info is None:
            raise FileNotFoundError(f"model {model!r}: no metadata on this device "
                                    f"({self.models_dir})")
        key = (info.name, info.version, info.sha256)
        task = self._tasks.get(key)
        if task is None:
            task = self._tasks[key] = task_for(info)
        return task

    def mark(self, tier: str, up: bool) -> None:
        with self._lock:
            if up:
                self.down.discard(tier)
            else:
                self.down.add(tier)

    def observe_device(self, model: str, compute_ms: float) -> None:
        profiled = self._profiled_ms.get((DEVICE_TIER, model))
        if profiled:
            with self._lock:
                ewma = self._device_ratio.setdefault(model, Ewma(1.0, 0.2))
                ewma.update(min(max(compute_ms / profiled, 0.2), 5.0))


def call_tier(client: Client, tier: str, model: str, tensor: np.ndarray, codec: str,
              abort_at: float, learn: bool = True, version: str | None = None
              ) -> tuple[dict[str, np.ndarray], StageTrace]:
    """One OIP v2 inference on `tier` (of `version`, else the server's default): (its
    outputs by name, its stage trace). Learns from the transfer unless `learn` is False (a probe,
    whose caller learns from it its own way); raises RemoteStageError when there is no
    usable answer."""
    info = client.models.get(model)
    input_name = info.inputs[0].name if info else "image"
    if codec == RAW:
        inputs, parameters, payload = {input_name: tensor}, None, tensor.nbytes
    else:
        encoded = encode_rows(codec, tensor)
        inputs = {input_name: encoded}
        parameters = {input_name: {"content_type": codec}}
        payload = sum(len(row) for row in encoded)
    body, headers = encode_infer_request(inputs, binary=True, outputs=None, binary_outputs=True,
                                         input_parameters=parameters)
    started = time.perf_counter()
    link = client.link_estimators[tier]
    try:
        response = client.http(tier).post(
            infer_path(model, version), content=body, headers=headers,
            timeout=max(abort_at - started, 0.001),
            extensions={ABORT_AT_EXTENSION: abort_at})
    except httpx.TimeoutException as error:
        waited_ms = (time.perf_counter() - started) * 1e3
        if learn:
            link.observe_timeout(len(body) + HTTP_HEADER_BYTES, waited_ms)
        raise RemoteStageError(f"no answer in {waited_ms:.0f} ms ({type(error).__name__})",
                               tier) from None
    except httpx.HTTPError as error:
        raise RemoteStageError(f"{type(error).__name__}: {error}", tier, tier_down=True) from None
    total_ms = (time.perf_counter() - started) * 1e3
    if response.status_code != 200:
        raise RemoteStageError(f"{tier} answered {response.status_code}: {response.text[:200]}",
                               tier, tier_down=response.status_code >= 500)
    try:
        decoded = decode_infer_response(
            response.content, parse_header_length(response.headers.get(HEADER_LENGTH)))
    except ProtocolError as error:
        raise RemoteStageError(f"undecodable answer: {error}", tier) from None
    transfer: Transfer = response.extensions[TRANSFER_EXTENSION]
    compute_ms = float(response.headers.get("tierwise-compute-ms", 0.0))
    queue_ms = float(response.headers.get("tierwise-queue-ms", 0.0))
    batch_size = int(response.headers.get("tierwise-batch-size", 1))
    network_ms = max(0.0, total_ms - compute_ms - queue_ms)
    if learn:
        link.observe(transfer.bytes_up, transfer.bytes_down, network_ms,
                     payload_up_bytes=payload)
        # batch-1 compute is what the profile measured: only that corrects it
        client.server_estimators[tier].observe(
            model, compute_ms if batch_size == 1 else 0.0,
            client._profiled_ms.get((tier, model)), queue_ms)
    # A batch's compute is shared by its rows; this request pays for its own rows.
    rows = len(tensor)
    billed_ms = compute_ms * rows / max(batch_size, rows)
    prices = client.config.prices
    stage = StageTrace(
        kind="remote", tier=tier, model=model,
        model_version=response.headers.get("tierwise-model-version", decoded.model_version or ""),
        total_ms=total_ms, compute_ms=compute_ms, queue_ms=queue_ms, network_ms=network_ms,
        bytes_up=transfer.bytes_up, bytes_down=transfer.bytes_down, batch_size=batch_size,
        codec=codec, cost_usd=compute_cost_usd(prices, tier, billed_ms)
        + transfer_cost_usd(prices, tier, transfer.bytes_up, transfer.bytes_down))
    return decoded.outputs, stage


class _Execution:
    """Runs the stages of one inference for its plan and records them in its trace."""

    def __init__(self, client: Client, trace: Trace, abort_at: float) -> None:
        self.client = client
        self.trace = trace
        self.abort_at = abort_at
        # The models as the request started (a swap replaces the client's dicts, not these):
        # its local stages run them and, from a registry, its remote stages ask for their
        # versions, so a head and its tail always match across a swap.
        self.models = client.models
        self.paths = client._paths
        self.pin_versions = client.subscriber is not None

    def prepared(self, model: str, tensor: np.ndarray) -> np.ndarray:
        """The request's input as `model` takes it (resized where it takes images); a
        tail's features as they are."""
        info = self.models.get(model)
        if info is None or info.role == "tail":
            return tensor
        return as_batch(info, tensor)

    def run_local(self, model: str, tensor: np.ndarray) -> dict[str, np.ndarray]:
        client = self.client
        session = client.session(model, self.paths, self.models)
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
            cost_usd=device_energy_cost_usd(client.config.prices, compute_ms),
        ))
        return output

    def run_remote(self, tier: str, model: str, tensor: np.ndarray,
                   codec: str) -> dict[str, np.ndarray]:
        tensor = self.prepared(model, tensor)
        try:
            output, stage = call_tier(self.client, tier, model, tensor, codec, self.abort_at,
                                      version=self._version(model))
        except RemoteStageError as error:
            self.trace.stages.append(StageTrace(
                kind="remote", tier=tier, model=model, model_version="", total_ms=0.0,
                compute_ms=0.0, codec=codec, error=str(error)))
            if error.tier_down:
                self.client.mark(tier, up=False)
            raise
        self.trace.stages.append(stage)
        return output

    def _version(self, model: str) -> str | None:
        info = self.models.get(model)
        return info.version if self.pin_versions and info is not None else None

    def outcome(self, model: str, outputs: dict[str, np.ndarray]) -> StageOutcome:
        task = self.client.task(model, self.models)
        result = task.decode(outputs)[0]
        return StageOutcome(result, task.confidence(result))
