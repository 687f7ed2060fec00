"""What the policy sees of a client, and how long a remote stage may take.

The policy (`tierwise.planner.policy`) plans over the model profiles and the online
estimates; these functions turn the client's learned state into what it reads: the profiled
compute time per tier and model (the baseline the learned ratios scale), a `PlanningState`,
and the time a remote stage must give up by so the device fallback still meets the deadline.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from tierwise.config import DEVICE_TIER
from tierwise.planner.estimators import Ewma, LinkEstimator, ServerEstimator
from tierwise.planner.policy import SLO, Decision, PlanningState
from tierwise.profile.model_profile import ModelProfile

# Time kept in hand, beyond the device model's own, for the device fallback when a remote
# stage is given a deadline: scheduling jitter on a busy device.
FALLBACK_MARGIN_MS = 2.0
FALLBACK_MARGIN_SHARE = 0.05


def profiled_compute_ms(profiles: Mapping[str, ModelProfile],
                        scales: Mapping[str, float] | None = None
                        ) -> dict[tuple[str, str], float]:
    """(tier, model) -> the batch-1 compute time the profiles measured: every whole model,
    and the head and tail of every profiled split (their own timing, else the sum of their
    blocks); for every site in `scales` (site -> compute_scale) that the profiles do not
    name or profiled at another scale, the same from this host's time at its scale
    (`ModelProfile.site_ms`, `split_ms`): the numbers the planner predicts with."""
    profiled: dict[tuple[str, str], float] = {}
    for name, profile in profiles.items():
        for tier, compute_ms in profile.compute_ms.items():
            profiled[(tier, name)] = compute_ms
        for split in profile.splits:
            for tier, blocks in profile.block_ms.items():
                profiled[(tier, split.head)] = split.head_ms.get(
                    tier, sum(blocks[:split.split_point]))
                profiled[(tier, split.tail)] = split.tail_ms.get(
                    tier, sum(blocks[split.split_point:]))
        if not profile.compute_ms:
            continue
        scales = scales or {}
        device_scale = scales.get("device", profile.compute_scales.get("device", 1.0))
        for site, scale in scales.items():
            profiled[(site, name)] = profile.site_ms(site, scale)[0]
            for split in profile.splits:
                head_ms, tail_ms = profile.split_ms(split, site, scale, device_scale)
                profiled[(site, split.tail)] = tail_ms
                if site == "device":
                    profiled[(site, split.head)] = head_ms
    return profiled


def planning_state(link_estimators: Mapping[str, LinkEstimator],
                   server_estimators: Mapping[str, ServerEstimator],
                   device_ratio: Mapping[str, Ewma],
                   unavailable: Collection[str],
                   escalation_rate: Mapping[Any, float] | None = None) -> PlanningState:
    """The estimates one decision uses, as they are now: each link's, each server's queue,
    every learned compute ratio (measured over profiled time; the device's own and each
    server's), the tiers it may not use, and each cascade's measured escalation rate
    (cascade plan -> share escalated)."""
    compute_ratio = {(DEVICE_TIER, model): ewma.value for model, ewma in device_ratio.items()}
    for tier, server in server_estimators.items():
        for model, ewma in server.compute_ratio.items():
            compute_ratio[(tier, model)] = ewma.value
    return PlanningState(
        links={tier: estimator.snapshot() for tier, estimator in link_estimators.items()},
        queue_ms={tier: server.queue_estimate_ms() for tier, server in server_estimators.items()},
        compute_ratio=compute_ratio,
        unavailable=unavailable,
        escalation_rate=escalation_rate or {},
    )


def remote_abort_at(started: float, slo: SLO, decision: Decision | None,
                    fallback_ms: float, timeout_s: float, overrun_ms: float = 0.0) -> float:
    """When a remote stage of a request `started` at this `time.perf_counter()` must give
    up: in time for the device fallback to still meet the deadline when the plan was
    predicted to, else after `timeout_s`. The fallback takes `fallback_ms` (as profiled),
    or `overrun_ms` if longer: what giving up and falling back has taken on this device, as
    measured from the abort to the answer (a loaded device takes longer than its profile)."""
    if decision is not None and decision.feasible:
        margin_ms = max(FALLBACK_MARGIN_MS, FALLBACK_MARGIN_SHARE * slo.deadline_ms)
        budget_ms = slo.deadline_ms - max(fallback_ms, overrun_ms) - margin_ms
        if budget_ms > 0:
            return started + budget_ms / 1e3
    return started + timeout_s
