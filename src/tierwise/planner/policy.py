"""The policy: for one request, the cheapest plan that meets its deadline and accuracy floor.

Candidates are built from the model profiles alone (`candidates_from_profiles`): every local
model, every remote model with every input codec, every split point with every feature codec,
and every cascade from a device model to a remote or split plan. Each is scored with the
current estimates (shared/DESIGN.md, "How a plan is scored"):

    latency  = device compute + [server compute + queue + RTT + bytes_up/bandwidth_up
               + bytes_down/bandwidth_down]            (a cascade counts its escalated path)
    accuracy = profiled on validation data (a cascade: at the threshold chosen for the floor)
    cost     = device energy + [escalation rate ×] (server compute-seconds × price + bytes ×
               link price)   (a cascade's escalation rate: measured by the client once it
                             has run the cascade, else the profiled one)

Latency uses the 95th-percentile payload of a codec (a request must fit its deadline), cost
the mean. The choice is the cheapest plan with latency ≤ deadline and accuracy ≥ floor; if
there is none, the one that misses least, where a miss is the relative overrun of the deadline
plus the relative shortfall of the floor (`miss = max(0, latency/deadline - 1) +
max(0, floor - accuracy)/floor`), and the decision says so. Scoring is vectorised over the
candidates: a decision takes tens of microseconds (`tierwise bench bandwidth` reports it).
"""

from __future__ import annotations

import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, replace

import numpy as np

from tierwise.codecs import RAW
from tierwise.config import DEVICE_TIER, Config
from tierwise.models.store import tier_models
from tierwise.planner.cost import FREE, PriceTable
from tierwise.planner.estimators import LinkEstimate
from tierwise.planner.plans import Cascade, Local, Plan, Remote, Split
from tierwise.profile.model_profile import CascadeCurve, ModelProfile

DEVICE = DEVICE_TIER


@dataclass(frozen=True)
class SLO:
    """What one request needs. `keep_input_on_device`: the raw input must not leave the
    device (privacy), so only local and split plans qualify. `regions`: where its data may
    be processed (data residency, as the GDPR and its equivalents require): only plans whose
    every remote stage runs at a site of one of these regions (`tiers.<site>.region`)
    qualify, the device always; None: anywhere."""

    deadline_ms: float
    min_accuracy: float = 0.0
    keep_input_on_device: bool = False
    regions: frozenset[str] | None = None

    def __post_init__(self) -> None:
        if not self.deadline_ms > 0:
            raise ValueError(f"deadline_ms: expected a positive number, got {self.deadline_ms!r}")
        if not 0.0 <= self.min_accuracy <= 1.0:
            raise ValueError(f"min_accuracy: expected a fraction in [0, 1], got "
                             f"{self.min_accuracy!r}")


@dataclass(frozen=True)
class Candidate:
    """One plan and what its profiles say about it (before any online estimate)."""

    plan: Plan
    accuracy: float
    device_model: str           # whose compute the device runs (head, first stage, model)
    device_ms: float            # profiled, × the device's compute_scale, + encoding
    escalated_device_ms: float = 0.0  # a cascade's: the part of device_ms run only on escalation
    tier: str | None = None     # the remote tier, if any
    server_model: str | None = None
    server_ms: float = 0.0      # profiled, × the tier's compute_scale, + decoding
    payload_mean_bytes: float = 0.0
    payload_p95_bytes: float = 0.0
    curve: CascadeCurve | None = None  # a cascade's; its threshold is chosen per floor


@dataclass(frozen=True)
class Decision:
    plan: Plan
    latency_ms: float
    accuracy: float
    cost_usd: float
    feasible: bool
    reason: str
    candidates: int
    decision_us: float = 0.0

    def to_dict(self) -> dict[str, object]:
        return {"plan": self.plan.describe(), "predicted_latency_ms": self.latency_ms,
                "predicted_accuracy": self.accuracy, "predicted_cost_usd": self.cost_usd,
                "feasible": self.feasible, "reason": self.reason,
                "candidates": self.candidates, "decision_us": self.decision_us}


@dataclass
class PlanningState:
    """The online estimates one decision uses."""

    links: Mapping[str, LinkEstimate]
    queue_ms: Mapping[str, float] = field(default_factory=dict)
    compute_ratio: Mapping[tuple[str, str], float] = field(default_factory=dict)  # (tier, model)
    unavailable: Collection[str] = ()  # tiers that are down
    # a cascade plan (threshold set) -> the share of its requests escalated, as measured
    escalation_rate: Mapping[Plan, float] = field(default_factory=dict)


def candidates_from_profiles(config: Config, profiles: Mapping[str, ModelProfile]
                             ) -> list[Candidate]:
    """Every plan the profiles support, for the models each tier runs (`tiers.*.models`, and
    their variants where `tiers.*.variants` is on), and the learned bottlenecks of the
    device's models (`tierwise optimize bottleneck` on a device-side network: its encoder
    runs on the device, its decoder and the tail on any server tier)."""
    placed = tier_models(config, profiles)

    def runs_on(tier: str) -> list[str]:
        return [model for model in placed.get(tier, []) if model in profiles]

    device_models = runs_on(DEVICE)
    device_scale = config.tier(DEVICE).compute_scale
    remote: list[Candidate] = []
    for tier in config.sites():
        if tier not in config.links:
            continue
        scale = config.tier(tier).compute_scale
        served = runs_on(tier)
        for model in [*served, *(m for m in device_models if m not in served)]:
            profile = profiles.get(model)
            if profile is None:
                continue
            bottlenecks_only = model not in served
            for codec, measured in ({} if bottlenecks_only else profile.input_codecs).items():
                remote.append(Candidate(
                    plan=Remote(tier, model, codec), accuracy=measured.accuracy,
                    device_model=model, device_ms=measured.encode_ms, tier=tier,
                    server_model=model,
                    server_ms=profile.site_ms(tier, scale)[0] + measured.decode_ms,
                    payload_mean_bytes=measured.bytes_mean,
                    payload_p95_bytes=measured.bytes_p95))
            for split in profile.splits:
                if bottlenecks_only and split.bottleneck is None:
                    continue
                head_ms, tail_ms = profile.split_ms(split, tier, scale, device_scale)
                for codec, measured in split.codecs.items():
                    remote.append(Candidate(
                        plan=Split(tier, model, split.split_point, codec, split.bottleneck),
                        accuracy=measured.accuracy, device_model=split.head,
                        device_ms=head_ms + measured.encode_ms, tier=tier,
                        server_model=split.tail, server_ms=tail_ms + measured.decode_ms,
                        payload_mean_bytes=measured.bytes_mean,
                        payload_p95_bytes=measured.bytes_p95))
    local = [Candidate(plan=Local(model), accuracy=profiles[model].accuracy, device_model=model,
                       device_ms=profiles[model].site_ms(DEVICE, device_scale)[0])
             for model in device_models]
    cascades = []
    for first in local:
        assert isinstance(first.plan, Local)
        curves = {curve.then: curve for curve in profiles[first.device_model].cascades}
        for then in remote:
            then_plan = then.plan
            assert isinstance(then_plan, Remote | Split)  # all `remote` holds
            # A lossy `then` would need its own curve; lossless ones share the model's.
            model = then_plan.model
            lossless = isinstance(then_plan, Remote) or then_plan.feature_codec == RAW
            if model in curves and lossless:
                cascades.append(Candidate(
                    plan=Cascade(first.plan, then_plan, threshold=0.0),
                    accuracy=0.0, device_model=first.device_model,
                    device_ms=first.device_ms + then.device_ms,
                    escalated_device_ms=then.device_ms, tier=then.tier,
                    server_model=then.server_model, server_ms=then.server_ms,
                    payload_mean_bytes=then.payload_mean_bytes,
                    payload_p95_bytes=then.payload_p95_bytes, curve=curves[model]))
    return local + remote + cascades


def cascade_point(curve: CascadeCurve, floor: float) -> tuple[float, float, float]:
    """(threshold, accuracy, escalation rate) of the fewest escalations reaching `floor`, or
    of the most accurate point when none does."""
    accuracy = np.asarray(curve.accuracy)
    reaching = np.flatnonzero(accuracy >= floor - 1e-12)
    index = int(reaching[0]) if len(reaching) else int(accuracy.argmax())
    return curve.thresholds[index], curve.accuracy[index], curve.escalation_rate[index]


class Policy:
    """Chooses among `candidates` per request. Construct once per client; `choose` is the hot
    path."""

    def __init__(self, candidates: list[Candidate], prices: PriceTable,
                 regions: Mapping[str, str] | None = None) -> None:
        """`prices`: unit prices per site (`PriceTable.of(config)`); `regions`: site -> the
        region it processes data in (`tiers.<site>.region`; a site without one qualifies
        for no request that limits regions)."""
        if not any(isinstance(c.plan, Local) for c in candidates):
            raise ValueError("candidates: need at least one local plan (the offline fallback)")
        self.candidates = candidates
        self.tiers = sorted({c.tier for c in candidates if c.tier})
        tier_index = {tier: i for i, tier in enumerate(self.tiers)}
        self._tier_of = np.array([tier_index.get(c.tier, -1) if c.tier else -1
                                  for c in candidates])
        self._remote = self._tier_of >= 0
        self._device_ms = np.array([c.device_ms for c in candidates])
        self._escalated_device_ms = np.array([c.escalated_device_ms for c in candidates])
        self._server_ms = np.array([c.server_ms for c in candidates])
        self._payload_p95 = np.array([c.payload_p95_bytes for c in candidates])
        self._payload_mean = np.array([c.payload_mean_bytes for c in candidates])
        self._accuracy = np.array([c.accuracy for c in candidates])
        self._raw_input = np.array([c.plan.sends_raw_input for c in candidates])
        self._cascades = [i for i, c in enumerate(candidates) if c.curve is not None]
        self._by_floor: dict[float, tuple[np.ndarray, np.ndarray, list[Plan]]] = {}
        # prices, per candidate: the table the trace bills with (`planner.cost`)
        site_prices = [prices.site(t) for t in self.tiers] + [FREE]
        per_candidate = np.array([[price.per_ms, price.per_byte_up, price.per_byte_down]
                                  for price in site_prices])[self._tier_of]
        self._usd_per_ms, self._usd_per_byte_up, self._usd_per_byte_down = per_candidate.T
        self._region = np.array([(regions or {}).get(t, "") for t in self.tiers] + [""]
                                )[self._tier_of]
        # compute corrections are keyed (tier, model); gather them by index per candidate
        keys = [(DEVICE, c.device_model) for c in candidates] + [
            (c.tier or DEVICE, c.server_model or "") for c in candidates]
        self._ratio_keys = list(dict.fromkeys(keys))
        index = {key: i for i, key in enumerate(self._ratio_keys)}
        self._device_key = np.array([index[key] for key in keys[:len(candidates)]])
        self._server_key = np.array([index[key] for key in keys[len(candidates):]])
        self._device_usd_per_ms = prices.device_per_ms

    def plans_for(self, min_accuracy: float) -> list[Plan]:
        """Every candidate plan, cascade thresholds set for the floor `min_accuracy`."""
        return list(self._for_floor(min_accuracy)[2])

    def _for_floor(self, floor: float) -> tuple[np.ndarray, np.ndarray, list[Plan]]:
        """(accuracy, remote weight, plans) with every cascade's threshold set for `floor`."""
        cached = self._by_floor.get(floor)
        if cached is None:
            accuracy = self._accuracy.copy()
            weight = self._remote.astype(float)
            plans = [c.plan for c in self.candidates]
            for i in self._cascades:
                candidate = self.candidates[i]
                threshold, accuracy[i], weight[i] = cascade_point(candidate.curve, floor)  # type: ignore[arg-type]
                plan = candidate.plan
                assert isinstance(plan, Cascade)
                plans[i] = Cascade(plan.first, plan.then, threshold)
            cached = self._by_floor[floor] = (accuracy, weight, plans)
            if len(self._by_floor) > 64:  # floors are few in practice; bound it anyway
                self._by_floor.pop(next(iter(self._by_floor)))
        return cached

    def _score(self, slo: SLO, state: PlanningState
               ) -> tuple[list[Plan], np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(plans, latency_ms, accuracy, cost_usd, allowed) of every candidate."""
        accuracy, weight, plans = self._for_floor(slo.min_accuracy)
        # whether a plan may reach its remote stage at all is the profile's to say: a
        # measured rate of 0 (a run of confident answers) must not make a cascade "local",
        # exempt from its tier being down and from the deadline of its escalated path
        escalated = weight > 0
        if state.escalation_rate:  # measured escalation replaces the profiled rate in cost
            measured = [(i, state.escalation_rate.get(plans[i])) for i in self._cascades]
            if any(rate is not None for _, rate in measured):
                weight = weight.copy()
                for i, rate in measured:
                    if rate is not None:
                        weight[i] = rate
        # one row per tier, and a last one standing for "no tier" (local plans)
        per_tier = np.array([
            *([state.links[t].rtt_ms, state.links[t].bandwidth_up,
               state.links[t].bandwidth_down, state.links[t].overhead_up_bytes,
               state.links[t].response_bytes, state.queue_ms.get(t, 0.0),
               t not in state.unavailable] for t in self.tiers),
            [0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0]])[self._tier_of]
        rtt, up, down, overhead, response, queue, usable = per_tier.T
        ratios = state.compute_ratio
        device_scale = server_scale = 1.0
        if ratios:
            known = np.array([ratios.get(key, 1.0) for key in self._ratio_keys])
            device_scale, server_scale = known[self._device_key], known[self._server_key]
        device_ms = self._device_ms * device_scale
        server_ms = self._server_ms * server_scale
        # a cascade runs its escalated path's device part (a split's head) only when it
        # escalates: its latency counts it, its expected cost by the escalation rate
        device_spent_ms = (self._device_ms - (1 - weight) * self._escalated_device_ms
                           ) * device_scale
        network_ms = rtt + ((self._payload_p95 + overhead) / up + response / down) * 1e3
        latency = device_ms + np.where(escalated, server_ms + queue + network_ms, 0.0)
        remote_usd = (server_ms * self._usd_per_ms + (self._payload_mean + overhead)
                      * self._usd_per_byte_up + response * self._usd_per_byte_down)
        cost = device_spent_ms * self._device_usd_per_ms + weight * remote_usd
        allowed = (usable > 0) | ~escalated
        if slo.keep_input_on_device:
            allowed &= ~self._raw_input
        if slo.regions is not None:  # a cascade's escalated path counts, however rare
            allowed &= ~self._remote | np.isin(self._region, list(slo.regions))
        return plans, latency, accuracy, cost, allowed

    def predict(self, slo: SLO, state: PlanningState) -> dict[Plan, tuple[float, float, float]]:
        """plan -> (predicted latency ms, accuracy, cost USD), for every candidate."""
        plans, latency, accuracy, cost, _ = self._score(slo, state)
        return {plan: (float(latency[i]), float(accuracy[i]), float(cost[i]))
                for i, plan in enumerate(plans)}

    def within_reach(self, slo: SLO, state: PlanningState, tier: str) -> bool:
        """Whether a plan on `tier` would be chosen were its link perfect (no RTT, unbounded
        bandwidth, the same bytes crossing it), its queue empty and the tier up, everything
        else as in `state`. A probe measures the link and the queue, and their estimates
        only move the latency of the plans that use the tier, so when even that would not
        win, probing cannot change a decision: the prober leaves it alone (value of
        information; it keeps probing what could pay). The queue counts as empty because
        the probe is what finds out: a site left for its overload is probed again, and wins
        its traffic back once its queue drains."""
        if tier not in self.tiers:
            return False
        link = state.links[tier]
        # perfect in time only: what crosses it (and is billed per byte) stays as it is
        perfect = replace(link, rtt_ms=0.0, bandwidth_up=float("inf"),
                          bandwidth_down=float("inf"))
        best = replace(state, links={**state.links, tier: perfect},
                       queue_ms={**state.queue_ms, tier: 0.0},
                       unavailable=[t for t in state.unavailable if t != tier])
        return tier in self.choose(slo, best).plan.tiers

    def choose(self, slo: SLO, state: PlanningState) -> Decision:
        started = time.perf_counter()
        plans, latency, accuracy, cost, allowed = self._score(slo, state)
        feasible = allowed & (latency <= slo.deadline_ms) & (accuracy >= slo.min_accuracy - 1e-12)
        if feasible.any():
            best = int(np.flatnonzero(feasible)[np.argmin(cost[feasible])])
            reason = f"cheapest of {int(feasible.sum())} feasible plans"
        else:
            miss = (np.maximum(0.0, latency / slo.deadline_ms - 1.0)
                    + np.maximum(0.0, slo.min_accuracy - accuracy) / max(slo.min_accuracy, 1e-9))
            miss = np.where(allowed, miss, np.inf)
            least = np.flatnonzero(miss == miss.min())
            best = int(least[np.argmin(cost[least])])
            reason = (f"no plan meets deadline {slo.deadline_ms:g} ms and accuracy "
                      f"{slo.min_accuracy:.2%}: chose the one that misses least")
        return Decision(plan=plans[best], latency_ms=float(latency[best]),
                        accuracy=float(accuracy[best]), cost_usd=float(cost[best]),
                        feasible=bool(feasible[best]), reason=reason,
                        candidates=int(allowed.sum()),
                        decision_us=(time.perf_counter() - started) * 1e6)
