"""What the bandwidth and trace benchmarks share: the testbed (tier servers and their links),
the strategies compared, and how a run of requests is measured and summarised.

Strategies:
  device-only, edge-only, cloud-only   one fixed plan each (raw input)
  static-cascade                       device model, escalating to the cloud model at the
                                       threshold that meets the accuracy floor on validation
  static-split                         the split the policy picks under the configured links,
                                       kept whatever the network does
  adaptive                             tierwise: the policy per request, online estimates
  oracle                               (bandwidth sweep) the best single static plan per
                                       level, chosen after measuring them all there
Static strategies run as other systems would: no deadline-driven fallback, only a fallback
to the device model when a server fails.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tierwise.bench.harness import wilson_interval
from tierwise.bench.processes import tier_server
from tierwise.client import Client, InferenceResult
from tierwise.config import Config, LinkConfig
from tierwise.models.store import tier_models
from tierwise.net.shaping import EmulatedLink
from tierwise.planner.cost import PriceTable
from tierwise.planner.plans import Cascade, Local, Plan, Remote, Split
from tierwise.planner.policy import (
    SLO,
    PlanningState,
    Policy,
    candidates_from_profiles,
    cascade_point,
)
from tierwise.profile.model_profile import load_tier_profiles

STRATEGIES = ("device-only", "edge-only", "cloud-only", "static-cascade", "static-split",
              "adaptive")
ADAPTIVE = "adaptive"
ORACLE = "oracle"


@dataclass
class Testbed:
    """Running tier servers and how to reach them; `tc` holds the namespaces when the kernel
    enforces the links."""

    config: Config
    models_dir: Path
    urls: dict[str, str]
    tc: Any = None  # tierwise.net.tc.NamespaceLinks

    @property
    def link_mode(self) -> str:
        return "tc" if self.tc is not None else "emulated"

    def links(self, bandwidth_up: float, bandwidth_down: dict[str, float] | None = None,
              rtt_ms: dict[str, float] | None = None) -> dict[str, EmulatedLink | None]:
        """Fresh links for one client: the uplink of every tier at `bandwidth_up`, the
        rest as configured unless given. Under tc the kernel takes the rates (shared by all
        clients) and the links here add only the RTT."""
        links: dict[str, EmulatedLink | None] = {}
        for tier in self.config.sites():
            base = self.config.link(tier)
            down = (bandwidth_down or {}).get(tier, base.bandwidth_down)
            link = LinkConfig(bandwidth_up=bandwidth_up, bandwidth_down=down,
                              rtt_ms=(rtt_ms or {}).get(tier, base.rtt_ms))
            if self.tc is not None:
                self.tc.set_rate(tier, bandwidth_up, down)
            links[tier] = EmulatedLink(link, pace=self.tc is None)
        return links

    def client(self, links: dict[str, EmulatedLink | None], probe: bool) -> Client:
        return Client(self.config, models_dir=self.models_dir, tier_urls=self.urls,
                      links=links, probe=probe, timeout_s=60.0)

    def describe_links(self) -> str:
        if self.tc is not None:
            return ("enforced by the kernel: tc tbf on veth pairs into a network namespace per "
                    "tier; RTT added in the client transport")
        return "emulated in the client transport: real sockets on loopback, paced"


@contextlib.contextmanager
def testbed(config: Config, link_mode: str = "emulated") -> Iterator[Testbed]:
    """Edge and cloud servers as real processes: on loopback with links emulated in the
    client, or (`tc`) in network namespaces with the kernel enforcing the bandwidth."""
    models_dir = config.models_dir
    with contextlib.ExitStack() as stack:
        urls: dict[str, str] = {}
        namespaces = None
        if link_mode == "tc":
            from tierwise.bench.processes import namespaced_tier_server
            from tierwise.net.tc import NamespaceLinks

            rates = {tier: (config.link(tier).bandwidth_up, config.link(tier).bandwidth_down)
                     for tier in config.sites()}
            namespaces = stack.enter_context(NamespaceLinks(config.sites(), rates))
            for tier in config.sites():
                urls[tier] = stack.enter_context(
                    namespaced_tier_server(namespaces, tier, models_dir))
        elif link_mode == "emulated":
            for tier in config.sites():
                urls[tier] = stack.enter_context(tier_server(tier, models_dir))
        else:
            raise ValueError(f"link: expected 'emulated' or 'tc', got {link_mode!r}")
        warm_servers(urls, models_dir)
        yield Testbed(config, models_dir, urls, namespaces)


def warm_servers(urls: dict[str, str], models_dir: Path) -> None:
    """One inference of every model on every server, so that no strategy pays for a model's
    first run (ONNX Runtime allocates on it) in its measurements."""
    import httpx

    from tierwise.models.inputs import as_batch, image_size
    from tierwise.models.store import list_models
    from tierwise.protocol.oip import encode_infer_request, infer_path
    from tierwise.runtime.session import trial_input

    for url in urls.values():
        with httpx.Client(base_url=url, timeout=30, trust_env=False) as http:
            for name, (info, _) in list_models(models_dir).items():
                spec = info.inputs[0]
                size = image_size(info) if info.role != "tail" else None  # at request size
                blank = as_batch(info, np.zeros((*size, 3), np.uint8)) if size else \
                    trial_input(spec, seed=0)
                body, headers = encode_infer_request({spec.name: blank}, binary=True)
                http.post(infer_path(name), content=body, headers=headers).raise_for_status()


def static_plans(config: Config, slo: SLO, models: tuple[str, str, str] | None = None
                 ) -> dict[str, Plan]:
    """The static strategies' plans, fixed before any request is made, with the (device,
    edge, cloud) `models` (default: the first model each tier runs)."""
    from tierwise.planner.estimators import LinkEstimator

    profiles = load_tier_profiles(config, config.models_dir)
    placed = tier_models(config, profiles)
    device, edge, cloud = models or tuple(placed[t][0] for t in ("device", "edge", "cloud"))
    candidates = candidates_from_profiles(config, profiles)
    # the cascade to the cloud model, at the threshold that meets the floor
    curve = next(c.curve for c in candidates if isinstance(c.plan, Cascade)
                 and c.plan.then == Remote("cloud", cloud))
    threshold, _, _ = cascade_point(curve, slo.min_accuracy)  # type: ignore[arg-type]
    # the split the policy would pick with the configured links, kept whatever happens
    splits = Policy([c for c in candidates if isinstance(c.plan, Local | Split)],
                    PriceTable.of(config))
    configured = PlanningState(links={t: LinkEstimator(config.link(t)).snapshot()
                                      for t in config.sites()})
    split = splits.choose(SLO(slo.deadline_ms, slo.min_accuracy, keep_input_on_device=True),
                          configured).plan
    if not isinstance(split, Split):  # nothing better than local: take the smallest payload
        split = min((c for c in candidates if isinstance(c.plan, Split)),
                    key=lambda c: c.payload_mean_bytes).plan
    return {
        "device-only": Local(device),
        "edge-only": Remote("edge", edge),
        "cloud-only": Remote("cloud", cloud),
        "static-cascade": Cascade(Local(device), Remote("cloud", cloud), threshold),
        "static-split": split,
    }


def full_policy(config: Config) -> Policy:
    """The policy over every plan the profiles support: what the oracle picks from."""
    profiles = load_tier_profiles(config, config.models_dir)
    return Policy(candidates_from_profiles(config, profiles), PriceTable.of(config))


@dataclass
class Run:
    """The measured requests of one strategy under one network condition."""

    strategy: str
    labels: list[int] = field(default_factory=list)
    correct: list[bool] = field(default_factory=list)
    latency_ms: list[float] = field(default_factory=list)
    missed: list[bool] = field(default_factory=list)
    bytes_up: list[int] = field(default_factory=list)
    cost_usd: list[float] = field(default_factory=list)
    plans: list[str] = field(default_factory=list)
    decision_us: list[float] = field(default_factory=list)
    fallbacks: int = 0
    probe_bytes_up: int = 0
    probe_cost_usd: float = 0.0

    def add(self, result: InferenceResult, label: int, latency_ms: float | None = None,
            deadline_ms: float | None = None) -> None:
        trace = result.trace
        latency = trace.total_ms if latency_ms is None else latency_ms
        self.correct.append(result.label == label)
        self.latency_ms.append(latency)
        self.missed.append(latency > (deadline_ms or trace.slo["deadline_ms"]))
        self.bytes_up.append(trace.bytes_up)
        self.cost_usd.append(trace.cost_usd)
        self.plans.append(trace.plan)
        if trace.decision:
            self.decision_us.append(float(trace.decision["decision_us"]))
        self.fallbacks += trace.fallback is not None

    def add_probes(self, client: Client) -> None:
        if client.prober is not None:
            self.probe_bytes_up += client.prober.totals.bytes_up
            self.probe_cost_usd += client.prober.totals.cost_usd

    def summary(self) -> dict[str, Any]:
        n = max(len(self.correct), 1)
        latency = np.array(self.latency_ms or [np.nan])
        mix: dict[str, int] = {}
        for plan in self.plans:
            mix[plan] = mix.get(plan, 0) + 1
        row: dict[str, Any] = {
            "strategy": self.strategy,
            "requests": len(self.correct),
            "accuracy": float(np.mean(self.correct)) if self.correct else float("nan"),
            "quality_ci": wilson_interval(sum(self.correct), len(self.correct)),
            # right and in time: what an app that needs the answer by the deadline gets
            "on_time_quality": float(np.mean([c and not m for c, m in zip(
                self.correct, self.missed, strict=True)])) if self.correct else float("nan"),
            "latency_p50_ms": float(np.percentile(latency, 50)),
            "latency_p95_ms": float(np.percentile(latency, 95)),
            "deadline_miss_rate": float(np.mean(self.missed)) if self.missed else float("nan"),
            # probes are traffic and cost the strategy needs: charged to it
            "bytes_up_per_inference": (sum(self.bytes_up) + self.probe_bytes_up) / n,
            "cost_usd_per_1m": (sum(self.cost_usd) + self.probe_cost_usd) / n * 1e6,
            "probe_cost_usd_per_1m": self.probe_cost_usd / n * 1e6,
            "fallback_rate": self.fallbacks / n,
            "plans": dict(sorted(mix.items(), key=lambda item: -item[1])),
        }
        if self.decision_us:
            row["decision_us_p50"] = float(np.percentile(self.decision_us, 50))
            row["decision_us_p99"] = float(np.percentile(self.decision_us, 99))
        return row
