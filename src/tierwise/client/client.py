"""`tierwise.Client`: the device SDK. numpy + onnxruntime + httpx, no torch.

It runs device models with ONNX Runtime, calls edge and cloud servers over OIP v2 (binary
tensors, keep-alive) through their links, and answers every request with its `Trace`.

With no plan given, each request is placed by the policy (`tierwise.planner.policy`) from the
model profiles and the online estimates, which every transfer updates. A remote stage that
fails, times out or would miss the request's deadline falls back to the next feasible plan
without that tier, at worst the device model: a request is always answered, exactly once. A
tier that does not answer is marked down until the prober (`tierwise.client.prober`) sees it
healthy again; meanwhile the client runs offline.

This module is the front: requests, their fallbacks, and the client's lifecycle. Below it:
`stages` (a stage run, learned from and priced) over `remote` (one OIP call); `modelset` (the
models a request runs, kept current from a registry); `planning` (what the policy sees);
`monitoring` (drift, metrics and telemetry, off the request path).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from tierwise.active.device import DeviceSampling
from tierwise.active.samplers import Feedback, Observation
from tierwise.client.fleet import FleetWatcher
from tierwise.client.modelset import LoadedModels, ModelSet, follow, served_everywhere, subscribe
from tierwise.client.monitoring import (
    MONITOR_PERIOD_S,
    Monitor,
    sampling_for,
    telemetry_for,
)
from tierwise.client.planning import (
    FALLBACK_MARGIN_MS,
    FALLBACK_MARGIN_SHARE,
    planning_state,
    profiled_compute_ms,
    remote_abort_at,
)
from tierwise.client.prober import Prober
from tierwise.client.remote import HTTP_HEADER_BYTES, TierConnections
from tierwise.client.stages import Execution, call_tier
from tierwise.client.trace import Trace
from tierwise.config import DEVICE_TIER, Config, ConfigError, TierConfig, load_config
from tierwise.models.inputs import as_batch, input_key
from tierwise.models.store import ModelInfo
from tierwise.monitor.drift import DriftMonitor
from tierwise.monitor.metrics import ClientMetrics
from tierwise.monitor.telemetry import Telemetry
from tierwise.net.shaping import EmulatedLink
from tierwise.net.tls import client_context
from tierwise.planner.cost import PriceTable
from tierwise.planner.estimators import Ewma, LinkEstimator, ServerEstimator
from tierwise.planner.plans import Cascade, Local, Plan, RemoteStageError
from tierwise.planner.policy import (
    SLO,
    Decision,
    PlanningState,
    Policy,
    candidates_from_profiles,
)
from tierwise.profile.model_profile import load_tier_profiles
from tierwise.protocol.fleet import FleetSite
from tierwise.registry.subscriber import (
    DeviceView,
    InstalledVersion,
    Subscriber,
    SubscriberState,
    check_device_id,
    default_device_id,
    registry_token,
)
from tierwise.runtime.session import OnnxModel
from tierwise.tasks import ClassificationResult, Task

log = logging.getLogger(__name__)

# Measured escalation rates follow the last ~10 escalation decisions of a cascade.
ESCALATION_ALPHA = 0.2
ESCALATION_MIN_SAMPLES = 5  # before these, the profiled rate prices the cascade
FALLBACK_OVERRUN_ALPHA = 0.3
FALLBACK_OVERRUN_MAX_SHARE = 0.25  # of the deadline
RECENT_OBSERVATIONS = 1000  # inferences kept for samplers and feedback


class FeedbackError(ValueError):
    """Feedback that cannot be taken; the message names the argument."""

# Client, InferenceResult, RemoteStageError and the labels are the API; the rest stay
# importable from here for the callers that did before the split.
__all__ = ["FALLBACK_MARGIN_MS", "FALLBACK_MARGIN_SHARE", "HTTP_HEADER_BYTES", "MONITOR_PERIOD_S",
           "Client", "FeedbackError", "InferenceResult", "RemoteStageError", "call_tier",
           "compute_labels", "emulation_labels"]


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


class HedgeStats:
    """Hedged requests so far: how many, how many the hedge won, and what the losers cost
    (the stages that ran while the winner answered)."""

    def __init__(self) -> None:
        self.hedged = 0
        self.won = 0
        self.loser_cost_usd = 0.0
        self._lock = threading.Lock()

    def count(self, won: bool) -> None:
        with self._lock:
            self.hedged += 1
            self.won += int(won)

    def bill(self, cost_usd: float) -> None:
        with self._lock:
            self.loser_cost_usd += cost_usd

    def bill_loser(self, future: Future[tuple[Plan, Any, Trace, Exception | None]]) -> None:
        """What a losing branch's stages cost, failed ones included, once it ends."""
        self.bill(future.result()[2].cost_usd)

    def summary(self) -> dict[str, float]:
        with self._lock:
            return {"hedged": self.hedged, "hedge_won": self.won,
                    "hedge_loser_cost_usd": self.loser_cost_usd}


class Client:
    """The device side of tierwise.

    Constructing a client only stores its settings; `start()` (or `with Client(...)`, or
    the first `infer`) reads the models, subscribes to the registry, loads the device model
    and starts the background threads. Errors about the models (`FileNotFoundError`,
    `RegistryUnavailableError`) come from there.

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
        threads: ONNX Runtime threads per device model session.
        probe: run the background prober (health of down tiers, stale link estimates).
        registry_url: take the models from this registry (the cloud server) instead of
            `models_dir`: verified, kept current by polling, swapped in while requests run;
            default `registry.url` unless `models_dir` is given. Remote stages then ask for
            the version this device was given, and every trace records it.
        channel: the registry channel (stable or canary); default `registry.channel`.
        device_id: this device's id: its canary cohort, the name its telemetry goes by;
            default `registry.device_id`, else the host name.
        collector_url: send every trace to this collector (the cloud server), stored and
            forwarded: nothing is lost across outages; default `telemetry.url`, else
            `registry.url`, else no telemetry.
        drift: watch the inputs, confidences and answers for drift (PSI and KS against the
            first 500 inferences; a `DriftMonitor` of your own, or False); alerts go into the
            trace, the metrics and the telemetry.
        metrics_port: serve this client's Prometheus metrics at http://127.0.0.1:<port>/metrics
            (`client.metrics.exposition()` has them either way).
        hedge: hedged requests (Dean & Barroso, "The Tail at Scale", CACM 2013): when the
            policy's plan has not answered by its predicted latency (computed at the p95
            payload), the policy's next plan without that plan's sites starts too, and the
            first answer wins. Each hedge is in the trace (`hedge`) and counted, the loser's
            cost too, in `hedges`.
        active: select the inputs worth a label and send them to the cloud's label queue
            within the budget (`tierwise.active.device`; the `active` config section);
            default `active.enabled`.
        fleet: also take the sites the cloud (`registry_url`, else `registry.url`)
            publishes (`GET /fleet/v1/sites`), kept current by polling: a site added there
            is planned here, one removed is not; default `registry.fleet`. A site the
            config names keeps the config's settings.
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
        hedge: bool = False,
        fleet: bool | None = None,
        active: bool | None = None,
    ) -> None:
        # The config is this client's parameters (its links and estimators are made from
        # it): the one file a constructor reads, and only when none is given.
        self.config = config or load_config()
        # unit prices per site: what the policy predicts with and each trace bills with
        self.prices = PriceTable.of(self.config)
        self.device_id = check_device_id(
            device_id or self.config.registry.device_id or default_device_id())
        self.registry_url = registry_url if registry_url is not None else \
            ("" if models_dir else self.config.registry.url)
        self.channel = channel
        self.collector_url = collector_url if collector_url is not None else \
            (self.config.telemetry.url or self.config.registry.url)
        self.metrics_port = metrics_port
        self._models_dir = Path(models_dir) if models_dir else self.config.models_dir
        self._requested_device_model = device_model
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
        # (tier, model) -> the compute time its profile measured; filled with the policy
        self.profiled_ms: dict[tuple[str, str], float] = {}
        self.down: set[str] = set()
        self.prober = Prober(self) if probe else None
        self.drift = DriftMonitor() if drift is True else (drift or None)
        self.metrics = ClientMetrics()
        self.monitor = Monitor(self.metrics, self.drift)
        self.subscriber: Subscriber | None = None  # from start(), with a registry
        self.telemetry: Telemetry | None = None    # from start(), with a collector
        self._emulated = tuple(emulation_labels(self.config, links))
        self._device_ratio: dict[str, Ewma] = {}
        # a cascade plan -> the share of its requests escalated (the profiled rate misleads
        # when the requests differ from the profiling data)
        self._escalation: dict[Plan, Ewma] = {}
        self._last_slo: SLO | None = None  # what the prober asks the policy about
        # ms from giving up on a remote stage at its abort time to the fallback's answer
        self._fallback_overrun = Ewma(0.0, FALLBACK_OVERRUN_ALPHA)
        self._lock = threading.Lock()
        self.hedge = hedge
        self.hedges = HedgeStats()
        self._start_lock = threading.Lock()
        self._started = False
        self._model_set: ModelSet | None = None  # replaced whole by a registry swap
        self._device_model: str | None = None
        self.loaded = LoadedModels(threads)  # sessions and tasks, by what a model set names
        self.connections = TierConnections(self.config, self.tier_urls, self.links,
                                           self.device_id)
        self._policy: Policy | None = None
        self._generation = 0  # bumped by every change the policy is built from
        # trace id -> the inference as samplers see it, the last RECENT_OBSERVATIONS
        self._observations: OrderedDict[str, Observation] = OrderedDict()
        self.fleet = self.config.registry.fleet if fleet is None else fleet
        # the cloud: the registry's, even when the models come from a directory
        self.fleet_url = self.registry_url or self.config.registry.url
        if self.fleet and not self.fleet_url:
            raise ConfigError("registry.fleet: the fleet list comes from the cloud; set "
                              "registry.url (or pass registry_url)")
        self.fleet_watcher: FleetWatcher | None = None  # from start(), with `fleet`
        self._own_sites = frozenset(self.config.tiers)  # the config's: the fleet's never change
        self._fleet_sites: frozenset[str] = frozenset()  # the sites the fleet list brought
        self.retired: frozenset[str] = frozenset()  # fleet sites that left the list
        self.active = self.config.active.enabled if active is None else active
        self.sampling: DeviceSampling | None = None  # from start(), with `active`

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> Client:
        """Read the models (subscribing to the registry, or from the models directory),
        resolve and load the device model, and start telemetry, the metrics server, the
        monitor thread and the registry updates. Once: later calls (from any thread) return
        at once. The methods that need a started client call it."""
        if self._started:
            return self
        with self._start_lock:
            if not self._started:
                self._open()
                self._started = True
        return self

    def _open(self) -> None:
        subscriber, telemetry, sampling = None, None, None
        try:  # everything that can fail, before any thread of this client starts
            directory = self._models_dir
            if self.registry_url:
                subscriber, view = subscribe(self.config, self.registry_url, self.channel,
                                             self.device_id, self.timeout_s)
                follow(subscriber, partial(served_everywhere, config=self.config, http=self.http),
                       partial(self._install, view))
                directory = view.directory
            model_set = ModelSet.read(directory)
            device_model = model_set.device_model(self.config, self._requested_device_model)
            self.session(device_model, model_set)  # load eagerly: the fallback must be ready
            if self.collector_url:
                telemetry = telemetry_for(self.config, self.collector_url, self.device_id)
            if self.active:
                sampling = sampling_for(self.config, self.config.active.url or
                                        self.collector_url, self.device_id, self.drift,
                                        self.metrics)
            if self.metrics_port is not None:
                self.metrics.serve(self.metrics_port)
            watcher = None
            if self.fleet:
                watcher = FleetWatcher(
                    self.fleet_url, registry_token(self.config.registry.token,
                                                   self.config.registry_dir),
                    self.apply_fleet, poll_s=self.config.registry.poll_s,
                    verify=client_context(self.config.tls) or True, timeout_s=self.timeout_s)
        except BaseException:  # leave nothing running: a later start() tries afresh
            if sampling is not None:
                sampling.close()
            if telemetry is not None:
                telemetry.close()
            if subscriber is not None:
                subscriber.stop()
            raise
        self._model_set, self._device_model = model_set, device_model
        self.subscriber, self.telemetry, self.sampling = subscriber, telemetry, sampling
        self.monitor.start(telemetry)
        if subscriber is not None:
            subscriber.start()
        if watcher is not None:  # a list it cannot have or read is logged, never raised
            self.fleet_watcher = watcher
            watcher.poll()
            watcher.start()

    def _install(self, view: DeviceView, taken: dict[str, InstalledVersion]) -> None:
        """New versions from the registry: requests already running finish on the model set
        and sessions they started with; the next ones use the new versions and a policy
        re-planned from their profiles."""
        with self._lock:
            view.update(SubscriberState(current=taken))
            self._model_set = ModelSet.read(view.directory)
            self.loaded.keep_only(self._model_set)
            self._policy = None
            self._generation += 1
            self._escalation.clear()  # new models: new cascade curves
        self.session(self.device_model)

    def close(self) -> None:
        if self.fleet_watcher is not None:
            self.fleet_watcher.stop()
        self.monitor.close()
        if self.subscriber is not None:
            self.subscriber.stop()
        if self.telemetry is not None:
            self.telemetry.close()
        if self.sampling is not None:
            self.sampling.close()
        if self.prober is not None:
            self.prober.stop()
        self.connections.close()

    def __enter__(self) -> Client:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the public API --------------------------------------------------------------------

    def infer(self, image: np.ndarray, plan: Plan | None = None, *,
              deadline_ms: float | None = None, min_quality: float | None = None,
              keep_input_on_device: bool = False, regions: Iterable[str] | None = None,
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
        `keep_input_on_device` (only local and split plans qualify), and `regions` (data
        residency: only sites whose `tiers.<site>.region` is one of them, and the device;
        a failed stage fails over only among them, else to the device). A `plan` that
        breaks `keep_input_on_device` or `regions` is a ValueError.
        """
        model_set = self.model_set  # this request's models, whatever a swap does meanwhile
        device_info = model_set.infos[self.device_model]
        batch = as_batch(device_info, image)  # checked before anything runs
        prepared = {input_key(device_info): batch}  # every stage reuses it
        slo = SLO(deadline_ms if deadline_ms is not None else self.slo.deadline_ms,
                  next((floor for floor in (min_quality, min_accuracy) if floor is not None),
                       self.slo.min_accuracy),
                  keep_input_on_device or self.slo.keep_input_on_device,
                  frozenset(regions) if regions is not None else self.slo.regions)
        started = time.perf_counter()
        plan = plan or self.plan
        decision = None
        if plan is None:
            decision = self.decide(slo)
            plan = decision.plan
        elif keep_input_on_device and plan.sends_raw_input:
            raise ValueError(f"plan: {plan.describe()} sends the input off the device, which "
                             "keep_input_on_device forbids")
        elif slo.regions is not None:
            outside = [tier for tier in plan.tiers if tier != DEVICE_TIER
                       and self.config.tier(tier).region not in slo.regions]
            if outside:
                raise ValueError(f"plan: {plan.describe()} runs at {outside}, outside the "
                                 f"regions {sorted(slo.regions)} this request allows")
        trace = Trace(plan=plan.describe(), emulated=self._emulated,
                      slo={"deadline_ms": slo.deadline_ms, "min_accuracy": slo.min_accuracy,
                           "keep_input_on_device": slo.keep_input_on_device,
                           **({"regions": sorted(slo.regions)} if slo.regions is not None
                              else {})},
                      decision=decision.to_dict() if decision else None)
        excluded: set[str] = set()
        while True:
            fallback_ms = self.profiled_ms.get((DEVICE_TIER, self.device_model), 0.0)
            abort_at = remote_abort_at(started, slo, decision, fallback_ms, self.timeout_s,
                                       self._fallback_overrun.value)
            try:
                if self.hedge and decision is not None and plan.tiers and not excluded:
                    plan, outcome = self._hedged(plan, decision, slo, started, abort_at,
                                                 trace, model_set, prepared, image, excluded)
                else:
                    execution = Execution(self, trace, abort_at, model_set, prepared)
                    outcome = plan.execute(execution, np.asarray(image))
                break
            except RemoteStageError as error:
                excluded.add(error.tier)
                plan, why = self._fallback(slo, started, excluded, decision is not None)
                trace.fallback = f"{error.tier} failed ({error}); fell back to {why}"
                trace.attempts.append(plan.describe())
        if outcome.fallback:
            trace.fallback = outcome.fallback
        overrun_s = time.perf_counter() - abort_at
        if trace.fallback and overrun_s > 0:  # a stage was given up on at abort_at
            with self._lock:  # what the next abort must leave for the fallback: at most
                # a share of the deadline, so one stall cannot stop every abort
                self._fallback_overrun.update(
                    min(overrun_s * 1e3, FALLBACK_OVERRUN_MAX_SHARE * slo.deadline_ms))
        if isinstance(plan, Cascade) and outcome.escalated is not None:
            self.observe_escalation(plan, outcome.escalated)
        trace.total_ms = (time.perf_counter() - started) * 1e3
        observation = self._observe(trace, outcome)
        if self.sampling is not None and not slo.keep_input_on_device and slo.regions is None:
            # (an input this request keeps on the device, or in some regions, is never a
            # sample: the label queue is at the cloud)
            answered = trace.answered_by
            self.sampling.consider(observation, np.asarray(image), self.device_model,
                                   device_info.version, (answered.model, answered.model_version))
        result = outcome.result
        trace.label = int(result.label) if isinstance(result, ClassificationResult) else None
        trace.confidence = outcome.confidence
        self.monitor.submit(trace, batch)
        return InferenceResult(result, trace, outcome.confidence)

    def _hedged(self, plan: Plan, decision: Decision, slo: SLO, started: float,
                abort_at: float, trace: Trace, model_set: ModelSet,
                prepared: dict[Any, np.ndarray], image: np.ndarray,
                excluded: set[str]) -> tuple[Plan, Any]:
        """(the plan that answered, its outcome): `plan`, or, when it has not answered by its
        predicted latency, whichever of it and the policy's next feasible plan (without its
        sites) answers first. Each runs in its own thread, so a stalled site holds only its
        own. Failed stages go into `trace` and their sites into `excluded`; when both fail,
        the first RemoteStageError is raised."""
        def run(chosen: Plan) -> tuple[Plan, Any, Trace, Exception | None]:
            own = Trace(plan=chosen.describe())  # its stages, merged into `trace`
            try:
                return chosen, chosen.execute(Execution(self, own, abort_at, model_set,
                                                        prepared), np.asarray(image)), own, None
            except Exception as error:  # recorded below; the other branch may answer
                return chosen, None, own, error

        def start(chosen: Plan) -> Future[tuple[Plan, Any, Trace, Exception | None]]:
            future: Future[tuple[Plan, Any, Trace, Exception | None]] = Future()
            future.set_running_or_notify_cancel()
            threading.Thread(target=lambda: future.set_result(run(chosen)), daemon=True,
                             name="tierwise-hedge").start()
            return future

        pending = {start(plan)}
        hedge_after_s = decision.latency_ms / 1e3 - (time.perf_counter() - started)
        done, _ = wait(pending, timeout=max(0.0, hedge_after_s))
        if not done:
            left_ms = slo.deadline_ms - (time.perf_counter() - started) * 1e3
            if left_ms > 0:
                second = self.decide(replace(slo, deadline_ms=left_ms),
                                     exclude=excluded | set(plan.tiers))
                if second.feasible and second.plan != plan:
                    pending.add(start(second.plan))
                    trace.hedge = {"plan": second.plan.describe(), "won": False, "after_ms":
                                   round((time.perf_counter() - started) * 1e3, 3)}
        errors: list[Exception] = []
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            answered = []
            for future in done:
                chosen, outcome, own, error = future.result()
                if error is None:
                    answered.append((chosen, outcome, own))
                    continue
                trace.stages.extend(own.stages)  # its failed stage, for the record
                errors.append(error)
                if isinstance(error, RemoteStageError):
                    excluded.add(error.tier)
            if not answered:
                continue
            chosen, outcome, own = answered[0]
            for _, _, late in answered[1:]:  # answered in the same instant: billed now
                self.hedges.bill(late.cost_usd)
            for loser in pending:  # billed when it ends
                loser.add_done_callback(self.hedges.bill_loser)
            trace.stages.extend(own.stages)
            if trace.hedge is not None:
                won = chosen is not plan
                trace.hedge["won"] = won
                if won:  # the trace describes what answered
                    trace.hedge["instead_of"] = plan.describe()
                    trace.plan = chosen.describe()
                self.hedges.count(won)
            return chosen, outcome
        if trace.hedge is not None:
            self.hedges.count(False)
        raise next((e for e in errors if isinstance(e, RemoteStageError)), errors[0])

    def _fallback(self, slo: SLO, started: float, excluded: set[str],
                  adaptive: bool) -> tuple[Plan, str]:
        """The next plan after a remote failure: the policy's choice without the failed tiers
        for what is left of the deadline, or the device model."""
        if adaptive:
            left_ms = slo.deadline_ms - (time.perf_counter() - started) * 1e3
            if left_ms > 0:
                decision = self.decide(replace(slo, deadline_ms=left_ms), exclude=excluded)
                if decision.feasible:
                    return decision.plan, f"{decision.plan.describe()} (next feasible plan)"
        return Local(self.device_model), "the device model"

    def decide(self, slo: SLO, exclude: set[str] | None = None) -> Decision:
        """What the policy would run now for `slo` (no request is made)."""
        policy = self.policy()
        with self._lock:  # the same two steps `tierwise bench decide` times
            state = self._planning_state(exclude)
            if not exclude:
                self._last_slo = slo
        return policy.choose(slo, state)

    def within_reach(self, tier: str) -> bool:
        """Whether `tier`'s link could change a decision for the last request's SLO (see
        `Policy.within_reach`); True before the first request or without profiles."""
        policy, slo = self._policy, self._last_slo
        if policy is None or slo is None:
            return True
        with self._lock:
            state = self._planning_state(None)
        return policy.within_reach(slo, state, tier)

    def _planning_state(self, exclude: set[str] | None) -> PlanningState:
        return planning_state(self.link_estimators, self.server_estimators,
                              self._device_ratio,
                              self.down | self.retired | (exclude or set()),
                              {plan: ewma.value for plan, ewma in self._escalation.items()
                               if ewma.samples >= ESCALATION_MIN_SAMPLES})

    def policy(self) -> Policy:
        """The policy over every plan the profiles support (loaded on first use)."""
        self.start()
        policy = self._policy
        if policy is None:
            # built from one snapshot, and kept only if no update (new models, a new fleet
            # list) came meanwhile: otherwise the next request builds it again
            with self._lock:
                generation, config, prices = self._generation, self.config, self.prices
            profiles = load_tier_profiles(config, self.models_dir)
            if not profiles:
                raise FileNotFoundError(f"{self.models_dir}: no model profiles; run `tierwise "
                                        "profile` (the policy reads nothing else about a model)")
            self.profiled_ms.update(profiled_compute_ms(profiles, {
                tier: config.tier(tier).compute_scale for tier in config.tiers}))
            # a site with no URL (no port in the config, none passed or published) is never
            # planned: every plan there would fail before it started
            candidates = [candidate for candidate in candidates_from_profiles(config, profiles)
                          if all(self.connections.has_url(tier)
                                 for tier in candidate.plan.tiers)]
            policy = Policy(candidates, prices,
                            {site: config.tier(site).region for site in config.sites()})
            with self._lock:
                if self._generation == generation:
                    self._policy = policy
            if self.prober is not None:
                self.prober.start()
        return policy

    def probe_now(self) -> None:
        """Probe every remote tier once, now (health, RTT, bandwidth): an app-start warm-up."""
        self.start()
        (self.prober or Prober(self)).probe_all(force=True)

    def emulation_labels(self) -> list[str]:
        """What this client emulates, for every output that depends on it."""
        return list(self._emulated)

    def monitor_drain(self) -> None:
        """Run drift, metrics and telemetry over every inference answered so far, now."""
        self.monitor.drain()

    # -- the models, as they are now (a request takes `model_set` once, at its start) -------

    @property
    def model_set(self) -> ModelSet:
        """The current snapshot of the models (replaced whole by a registry swap)."""
        self.start()
        assert self._model_set is not None  # start() sets it or raises
        return self._model_set

    @property
    def models(self) -> Mapping[str, ModelInfo]:
        """Name -> metadata of every model this device knows of."""
        return self.model_set.infos

    @property
    def models_dir(self) -> Path:
        """Where the models are read from (from a registry: the view it keeps current)."""
        return self.model_set.directory

    @property
    def device_model(self) -> str:
        """The model every fallback ends at."""
        self.start()
        assert self._device_model is not None  # start() sets it or raises
        return self._device_model

    # -- what the stages and the prober use ------------------------------------------------

    def session(self, model: str, model_set: ModelSet | None = None) -> OnnxModel:
        """The loaded `model`, as this client has it now, or as in `model_set` (what a request
        started with)."""
        return self.loaded.session(model_set or self.model_set, model)

    def http(self, tier: str) -> httpx.Client:
        """The keep-alive connection to `tier`, through its link."""
        return self.connections.get(tier, self.timeout_s)

    def task(self, model: str, model_set: ModelSet | None = None) -> Task[Any]:
        """The task that reads `model`'s outputs (by its metadata; cached per version), as
        this client has it now, or as in `model_set`."""
        return self.loaded.task(model_set or self.model_set, model)

    def apply_fleet(self, sites: Iterable[FleetSite]) -> None:
        """Plan with the fleet list's `sites` from the next request on: each new one gets
        its kind's link settings (emulation included) until its estimators learn its own,
        its published prices (else the price book's for its kind), its URL and whether it
        requires a token (the device's own is sent); a fleet site missing from the list is
        no longer planned. Sites the config names keep the config's settings. The config
        and the estimators' dictionaries are replaced whole, so a request never sees half
        a fleet; a site's link and URL are set before it can be planned."""
        with self._lock:
            tiers, links = dict(self.config.tiers), dict(self.config.links)
            link_estimators, server_estimators = dict(self.link_estimators), \
                dict(self.server_estimators)
            taken = set()
            for site in sites:
                if site.name in self._own_sites:
                    continue
                kind_link = links.get(site.kind)
                if kind_link is None:
                    log.warning("fleet site %s: no links.%s to start its link from; "
                                "skipped", site.name, site.kind)
                    continue
                before = tiers.get(site.name)
                tiers[site.name] = TierConfig(kind=site.kind, region=site.region,
                                              usd_per_hour=site.usd_per_hour,
                                              price_source=site.price_source,
                                              require_auth=site.require_auth)
                link = kind_link.model_copy(update={
                    "usd_per_gb_up": site.usd_per_gb_up, "usd_per_gb_down":
                    site.usd_per_gb_down, "price_source": site.price_source})
                new = site.name not in links
                links[site.name] = link  # prices may change; the shaping is the kind's
                if new:
                    link_estimators[site.name] = LinkEstimator(link)
                    self.links[site.name] = EmulatedLink(link) if link.emulate else None
                server_estimators.setdefault(site.name, ServerEstimator())
                if self.tier_urls.get(site.name) != site.url or before is None or \
                        before.require_auth != site.require_auth:
                    self.tier_urls[site.name] = site.url
                    self.connections.forget(site.name)  # reopened with the new settings
                taken.add(site.name)
            self.config = self.config.model_copy(update={"tiers": tiers, "links": links})
            self.connections.config = self.config
            self.prices = PriceTable.of(self.config)
            self.link_estimators, self.server_estimators = link_estimators, server_estimators
            self.retired = frozenset((self._fleet_sites | self.retired) - taken)
            self._fleet_sites = frozenset(taken)
            self._emulated = tuple(emulation_labels(self.config, self.links))
            self._policy = None  # re-planned over the new sites at the next request
            self._generation += 1

    # -- what active learning's samplers see (`tierwise.active.samplers`) ----------------

    def _observe(self, trace: Trace, outcome: Any) -> Observation:
        """Keep this inference as a sampler sees it (the last RECENT_OBSERVATIONS). Where
        the device model answered first (an escalated cascade), its confidence and class
        probabilities are the ones kept: it is the model labels would improve."""
        first = getattr(outcome, "first", None)
        own = first if first is not None else outcome  # the device model's, where it ran
        result = own.result
        classified = isinstance(result, ClassificationResult)
        label = int(result.label) if classified else None
        device_label = server_label = None
        if first is not None and classified and \
                isinstance(outcome.result, ClassificationResult):
            device_label, server_label = label, int(outcome.result.label)  # both answered
        elif trace.answered_by.tier == DEVICE_TIER:
            device_label = label
        else:
            server_label = label
        observation = Observation(
            trace.id, confidence=own.confidence,
            probabilities=result.probabilities if classified else None,
            device_label=device_label, server_label=server_label,
            classes=len(result.probabilities) if classified else 0)
        with self._lock:
            self._observations[trace.id] = observation
            while len(self._observations) > RECENT_OBSERVATIONS:
                self._observations.popitem(last=False)
        return observation

    def observations(self) -> list[Observation]:
        """The last RECENT_OBSERVATIONS inferences as samplers score them, oldest first:
        confidence, class probabilities, the device's and a server's answers where known,
        and the user's feedback (`feedback`)."""
        with self._lock:
            return list(self._observations.values())

    def feedback(self, trace_id: str, correct: bool | None = None,
                 label: int | None = None) -> None:
        """What the user said of the answer of inference `trace_id` (`result.trace.id`):
        whether it was `correct`, and the right class `label` (an index of the model's
        classes) when known; a label other than the answer means it was wrong. The feedback
        sampler selects what was called wrong.

        Raises FeedbackError naming the argument: an id not among this client's last
        RECENT_OBSERVATIONS inferences, neither `correct` nor `label`, a label outside the
        classes or for a task without classes, or a label that contradicts `correct=True`."""
        if correct is None and label is None:
            raise FeedbackError("feedback: give correct=True/False, or the right label=k")
        with self._lock:
            observation = self._observations.get(trace_id)
            if observation is None:
                raise FeedbackError(
                    f"trace_id: {trace_id!r} is not one of this client's last "
                    f"{RECENT_OBSERVATIONS:,} inferences (feedback must come while the "
                    "device still holds the inference)")
            if label is not None:
                if not observation.classes:
                    raise FeedbackError("label: this inference's task has no classes; give "
                                        "correct= only")
                if isinstance(label, bool) or not isinstance(label, int | np.integer) or \
                        not 0 <= label < observation.classes:
                    raise FeedbackError(f"label: expected a class index 0..."
                                        f"{observation.classes - 1}, got {label!r}")
                answered = observation.device_label if observation.server_label is None \
                    else observation.server_label
                if correct is True and label != answered:
                    raise FeedbackError(f"label: {label} is not the answer ({answered}), "
                                        "yet correct=True")
                correct = label == answered if correct is None else correct
            observation = self._observations[trace_id] = replace(
                observation, feedback=Feedback(bool(correct),
                                               None if label is None else int(label)))
        if self.sampling is not None:  # the feedback sampler may select it now
            self.sampling.reconsider(observation)

    def mark(self, tier: str, up: bool) -> None:
        """Mark `tier` up or down (a tier down is left out of every plan until it is up)."""
        with self._lock:
            if up:
                self.down.discard(tier)
            else:
                self.down.add(tier)

    def observe_escalation(self, plan: Cascade, escalated: bool) -> None:
        """Learn how often `plan` (its threshold set) hands a request on to its second
        stage; the policy prices the cascade by this once it has seen a few."""
        with self._lock:
            self._escalation.setdefault(plan, Ewma(float(escalated), ESCALATION_ALPHA)).update(
                float(escalated))

    def observe_device(self, model: str, compute_ms: float) -> None:
        """Learn how fast this device runs `model` compared with its profile."""
        profiled = self.profiled_ms.get((DEVICE_TIER, model))
        if profiled:
            with self._lock:
                ewma = self._device_ratio.setdefault(model, Ewma(1.0, 0.2))
                ewma.update(min(max(compute_ms / profiled, 0.2), 5.0))
