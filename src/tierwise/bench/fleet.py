"""`tierwise bench fleet`: a fleet of edge sites on loopback, one overloaded and one killed
and restarted mid-run, routed by tierwise and by three routers other systems use.

Sites (each a real `tierwise serve` process serving the zoo, compute emulated at
`--compute-scale`× this host's on `cores` emulated cores, so that a site's capacity is its
own and not this machine's shared cores): each has its own emulated link RTT and its own
number of cores, shared by all its models. The nearest is the smallest. Every strategy
runs the same timeline with a fresh client, Poisson arrivals at `--rate` requests/s for
`--duration-s`:

  overload  from 20% to 60% of the run, `--flood` clients send back to back to the
            nearest site (outside the client), to fmnist-edge and each of its split tails
            in turn, so its queues (`tierwise-queue-ms`) rise
  kill      at 33% the second site's server is SIGKILLed; restarted at 50% on its port

Strategies (requests limited to the sites' region: data residency):
  tierwise      the policy per request: the site of best predicted latency and cost for the
                SLO, queue estimates from the answers' headers, failover within the deadline
  nearest-only  the site of the shortest configured RTT, always
  round-robin   the sites in turn, skipping those marked down
  least-RTT     the site of the lowest measured link RTT, skipping those marked down
The three routers run as other systems would: a fixed site per request, and the device
model when that site fails (no deadline-driven failover).

Reported per strategy: answers and answers lost (a request that raised: must be 0), p50/
p99 latency (wall time from arrival, so waiting for a worker counts), deadline misses,
answers below the quality floor (the device fallback), failovers and how many of them
still met the deadline, cost per 1,000 requests, and the share of each site.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from tierwise.bench.harness import BenchReport, Column
from tierwise.bench.processes import free_port, tier_server
from tierwise.bench.serve import child_pid_on_port
from tierwise.client import Client
from tierwise.client.client import emulation_labels
from tierwise.config import Config, LinkConfig, TierConfig, write_config
from tierwise.models.store import list_models, load_info
from tierwise.planner.plans import Plan, Remote
from tierwise.planner.policy import SLO
from tierwise.protocol.oip import encode_infer_request, infer_path, numpy_dtype

MODEL = "fmnist-edge"
REGION = "bench-fleet"
STRATEGIES = ("tierwise", "nearest-only", "round-robin", "least-RTT")


@dataclass(frozen=True)
class SiteSpec:
    name: str
    rtt_ms: float
    cores: int  # its capacity: batches (of one request) computing at once, across models


DEFAULT_SITES = (SiteSpec("edge-near", 4.0, 1), SiteSpec("edge-mid", 10.0, 2),
                 SiteSpec("edge-far", 18.0, 4))


@dataclass
class FleetSettings:
    sites: tuple[SiteSpec, ...] = DEFAULT_SITES
    duration_s: float = 30.0
    rate: float = 30.0  # requests/s, Poisson
    deadline_ms: float = 40.0
    compute_scale: float = 20.0
    flood: int = 16  # clients overloading the nearest site
    strategies: tuple[str, ...] = STRATEGIES
    workers: int = 32

    def events(self) -> list[tuple[float, str]]:
        """(seconds into the run, what happens)."""
        d = self.duration_s
        return [(0.2 * d, "overload starts"), (0.33 * d, "kill"), (0.5 * d, "restart"),
                (0.6 * d, "overload ends")]


@dataclass
class Answer:
    at_s: float       # arrival, seconds into the run
    latency_ms: float  # arrival to answer, wall time
    site: str         # what answered: a site or the device
    failover: bool    # a remote stage failed and another plan answered
    below_floor: bool  # answered by a plan the quality floor rules out: the device model as
    # a fallback, or the policy's least-bad plan when none was feasible
    cost_usd: float
    plan: str = ""
    fallback: str = ""  # why another plan answered, as the trace says
    lost: str = ""    # the exception, for a request that raised


@dataclass
class StrategyResult:
    strategy: str
    answers: list[Answer] = field(default_factory=list)

    def summary(self, deadline_ms: float, sites: list[str]) -> dict[str, Any]:
        answered = [a for a in self.answers if not a.lost]
        latencies = np.array([a.latency_ms for a in answered]) if answered else np.zeros(1)
        remote = np.array([a.latency_ms for a in answered if a.site != "device"]) \
            if any(a.site != "device" for a in answered) else np.full(1, np.nan)
        failovers = [a for a in answered if a.failover]
        total = max(len(answered), 1)
        return {
            "strategy": self.strategy, "requests": len(self.answers),
            "answered": len(answered), "lost": len(self.answers) - len(answered),
            "p50_ms": float(np.percentile(latencies, 50)),
            "p99_ms": float(np.percentile(latencies, 99)),
            "site_p99_ms": float(np.percentile(remote, 99)),
            "deadline_misses": sum(a.latency_ms > deadline_ms for a in answered),
            "miss_rate": sum(a.latency_ms > deadline_ms for a in answered) / total,
            "below_floor": sum(a.below_floor for a in answered),
            "failovers": len(failovers),
            "failovers_in_deadline": sum(a.latency_ms <= deadline_ms for a in failovers),
            "usd_per_1k": 1000 * sum(a.cost_usd for a in answered) / total,
            "share": {site: sum(a.site == site for a in answered) / total
                      for site in [*sites, "device"]},
        }


class Site:
    """One site's server process, which can be killed (SIGKILL) and started again on its
    port."""

    def __init__(self, spec: SiteSpec, models_dir: Path, config_path: str) -> None:
        self.spec = spec
        self.port = free_port()
        self.models_dir = models_dir
        self.config_path = config_path
        self._stack: contextlib.ExitStack | None = None
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        stack = contextlib.ExitStack()
        stack.enter_context(tier_server(self.spec.name, self.models_dir, port=self.port,
                                        config_path=self.config_path))
        self._stack = stack

    def kill(self) -> None:
        pid = child_pid_on_port(self.port)
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
        self.stop()

    def stop(self) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack = None

    @property
    def stopped(self) -> bool:
        return self._stack is None


class Flood:
    """`clients` threads sending inference requests back to back to `url`, each request to
    the next of `requests` ((path, body, headers): every model of the site a plan may use,
    so that the whole site is overloaded, not one model's queue)."""

    def __init__(self, url: str, requests: list[tuple[str, bytes, dict[str, str]]],
                 clients: int) -> None:
        self.url, self.requests, self.clients = url, requests, clients
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.sent = 0

    def start(self) -> None:
        self._stop.clear()
        self._threads = [threading.Thread(target=self._run, daemon=True)
                         for _ in range(self.clients)]
        for thread in self._threads:
            thread.start()

    def _run(self) -> None:
        with httpx.Client(trust_env=False, timeout=30) as http:
            while not self._stop.is_set():
                path, body, headers = self.requests[self.sent % len(self.requests)]
                with contextlib.suppress(httpx.HTTPError):
                    http.post(f"{self.url}{path}", content=body,
                              headers={**headers, "tierwise-device": "flood"})
                self.sent += 1

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)


def flood_requests(models_dir: Path) -> list[tuple[str, bytes, dict[str, str]]]:
    """A request of zeros for fmnist-edge and for each of its split tails."""
    requests = []
    for name in list_models(models_dir):
        if name == MODEL or name.startswith(f"{MODEL}.tail@"):
            spec = load_info(models_dir / name).inputs[0]
            zeros = np.zeros([1, *(max(dim, 1) for dim in spec.shape[1:])],
                             dtype=numpy_dtype(spec.datatype))
            body, headers = encode_infer_request({spec.name: zeros}, binary=True)
            requests.append((infer_path(name), body, headers))
    return requests


def fleet_config(config: Config, settings: FleetSettings) -> Config:
    """`config` with the fleet's sites: each an edge site in the bench's region, with its
    emulated link (its RTT, bandwidth that does not limit) and its capacity."""
    config = config.model_copy(deep=True)
    for spec in settings.sites:
        config.tiers[spec.name] = TierConfig(
            kind="edge", region=REGION, compute_scale=settings.compute_scale,
            max_batch_size=1, cores=spec.cores, max_queue_delay_ms=0.0,
            max_in_flight_per_client=1000)
        config.links[spec.name] = LinkConfig(bandwidth_up="20MB/s", bandwidth_down="20MB/s",
                                             rtt_ms=spec.rtt_ms)
    return config


def router(strategy: str, client: Client, sites: list[SiteSpec]) -> Callable[[int], Plan | None]:
    """The plan for request `i` under `strategy` (None: the policy decides)."""
    names = [spec.name for spec in sites]
    nearest = min(sites, key=lambda spec: spec.rtt_ms).name

    def up() -> list[str]:
        return [name for name in names if name not in client.down] or names

    if strategy == "tierwise":
        return lambda i: None
    if strategy == "nearest-only":
        return lambda i: Remote(nearest, MODEL)
    if strategy == "round-robin":
        return lambda i: Remote(up()[i % len(up())], MODEL)
    if strategy == "least-RTT":
        return lambda i: Remote(min(up(), key=lambda name: client.link_estimators[name]
                                    .snapshot().rtt_ms), MODEL)
    raise ValueError(f"--strategies: unknown strategy {strategy!r}; expected {STRATEGIES}")


def run_strategy(strategy: str, config: Config, settings: FleetSettings, sites: list[Site],
                 models_dir: Path, images: np.ndarray, floor: float,
                 progress: Progress) -> StrategyResult:
    """One run of the timeline with a fresh client routing by `strategy`."""
    result = StrategyResult(strategy)
    near = min(sites, key=lambda site: site.spec.rtt_ms)
    victim = sorted(sites, key=lambda site: site.spec.rtt_ms)[1]
    flood = Flood(near.url, flood_requests(models_dir), settings.flood)
    rng = np.random.default_rng(0)  # the same arrivals for every strategy
    gaps = rng.exponential(1.0 / settings.rate, size=int(settings.rate * settings.duration_s
                                                          * 2) + 10)
    arrivals = np.cumsum(gaps)
    arrivals = arrivals[arrivals < settings.duration_s]
    lock = threading.Lock()
    with Client(config, models_dir=models_dir, collector_url="", drift=False, probe=True,
                tier_urls={site.spec.name: site.url for site in sites},
                slo=SLO(settings.deadline_ms, floor)) as client:
        route = router(strategy, client, [site.spec for site in sites])
        for i in range(20):  # warm-up: connections open, estimates seeded
            client.infer(images[i], route(i), regions={REGION})
        task = progress.add_task(f"{strategy}", total=len(arrivals))

        def one(i: int, at_s: float, started: float) -> None:
            try:
                trace = client.infer(images[i % len(images)], route(i),
                                     regions={REGION}).trace
                fallback = trace.fallback or ""
                infeasible = trace.decision is not None and \
                    trace.decision["predicted_accuracy"] < floor
                site, failover = trace.answered_by.tier, "failed" in fallback
                # the device model answered for a plan that needed a site: below the floor
                answer = Answer(at_s, (time.perf_counter() - started) * 1e3, site, failover,
                                (failover and site == "device") or infeasible,
                                trace.cost_usd, trace.plan, fallback)
            except Exception as error:  # counted as lost, never raised
                answer = Answer(at_s, math.nan, "", False, False, 0.0,
                                lost=f"{type(error).__name__}: {error}")
            with lock:
                result.answers.append(answer)
            progress.advance(task)

        events = settings.events()
        actions: dict[str, Callable[[], None]] = {
            "overload starts": flood.start, "overload ends": flood.stop,
            "kill": victim.kill, "restart": victim.start}
        started = time.perf_counter()
        happening: list[threading.Thread] = []  # events run beside the arrivals
        try:
            with ThreadPoolExecutor(settings.workers) as pool:
                for i, at in enumerate(arrivals):
                    while events and events[0][0] <= at:
                        _, what = events.pop(0)
                        happening.append(threading.Thread(target=actions[what], daemon=True))
                        happening[-1].start()
                    delay = started + at - time.perf_counter()
                    if delay > 0:
                        time.sleep(delay)
                    pool.submit(one, i, float(at), time.perf_counter())
            for thread in happening:  # a restart still starting, a flood still stopping
                thread.join()
            for _, what in events:  # due after the last arrival
                actions[what]()
        finally:  # the next strategy starts from the same fleet, whatever happened here
            flood.stop()
            for thread in happening:
                thread.join()
            if victim.stopped:
                victim.start()
        progress.remove_task(task)
    result.answers.sort(key=lambda answer: answer.at_s)
    return result


COLUMNS = [
    Column("strategy", "strategy", left=True),
    Column("answered", "answered"),
    Column("lost", "lost"),
    Column("p50_ms", "p50 ms", "{:.1f}"),
    Column("p99_ms", "p99 ms", "{:.1f}"),
    Column("site_p99_ms", "p99 of site answers", "{:.1f}"),
    Column("miss_rate", "deadline misses", lambda v: f"{100 * v:.1f}%"),
    Column("below_floor", "below floor"),
    Column("failovers", "failovers"),
    Column("failovers_in_deadline", "in deadline"),
    Column("usd_per_1k", "$ / 1k req", "{:.6f}"),
    Column("sites", "share per site", left=True),
]


def run_bench_fleet(config: Config, settings: FleetSettings, out: Path,
                    console: Console | None = None) -> dict[str, Any]:
    """Run every strategy; write results.json, table.md and bench-fleet.png to `out`."""
    from tierwise.bench.workload import load_workload
    from tierwise.profile.model_profile import load_profile

    console = console or Console()
    workload = load_workload("fashion-mnist", config, console)
    models_dir = workload.config.models_dir
    images = np.asarray(workload.samples(500).inputs)
    floor = load_profile(models_dir, MODEL).accuracy
    config = fleet_config(workload.config, settings)
    emulated = emulation_labels(config)
    emulated = [label for label in emulated
                if any(spec.name in label for spec in settings.sites)]
    results: list[StrategyResult] = []
    with tempfile.TemporaryDirectory() as directory, contextlib.ExitStack() as stack:
        config_path = str(write_config(config, Path(directory) / "tierwise.toml"))
        sites = [Site(spec, models_dir, config_path) for spec in settings.sites]
        for site in sites:
            site.start()
            stack.callback(site.stop)
        with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                      console=console, transient=True) as progress:
            for strategy in settings.strategies:
                results.append(run_strategy(strategy, config, settings, sites, models_dir,
                                            images, floor, progress))
    names = [spec.name for spec in settings.sites]
    summaries = [result.summary(settings.deadline_ms, names) for result in results]
    _report(out, settings, summaries, results, emulated, floor, console)
    return {"summaries": summaries}


def _report(out: Path, settings: FleetSettings, summaries: list[dict[str, Any]],
            results: list[StrategyResult], emulated: list[str], floor: float,
            console: Console) -> None:
    report = BenchReport("fleet", out, emulated, console=console)
    near, victim = sorted(settings.sites, key=lambda spec: spec.rtt_ms)[:2]
    events = settings.events()
    notes = [
        "Sites: " + "; ".join(f"{spec.name} RTT {spec.rtt_ms:g} ms, {spec.cores} emulated "
                              f"core{'s' if spec.cores > 1 else ''}"
                              for spec in settings.sites)
        + f"; batch 1, compute emulated at {settings.compute_scale:g}× this host's, so a "
        "site's capacity is its cores, shared by its models (whole models and split tails).",
        f"Load: Poisson, {settings.rate:g} requests/s for {settings.duration_s:g} s per "
        f"strategy, the same arrivals for each; SLO: deadline {settings.deadline_ms:g} ms, "
        f"quality floor {floor:.3f} (fmnist-edge's accuracy: the device model is below it).",
        f"Timeline: {settings.flood} clients flood {near.name} from {events[0][0]:.0f} s to "
        f"{events[3][0]:.0f} s; {victim.name} is SIGKILLed at {events[1][0]:.0f} s and "
        f"restarted at {events[2][0]:.0f} s.",
        "lost: requests that raised instead of being answered; below floor: answered by a "
        "plan below the quality floor (the device model as a fallback, or the policy's "
        "least-bad plan when none was feasible); failovers: a site failed "
        "and another plan answered, 'in deadline' of them within the deadline. tierwise "
        "also plans cascades (the device model first, the site only for uncertain inputs) "
        "where they meet the floor for less: those answered on the device count as the "
        "device's share, and 'p99 of site answers' compares the routing alone.",
        f"Machine: {os.cpu_count()} CPUs; every site, the flood and the client share them.",
    ]
    rows = [{**summary, "sites": ", ".join(f"{site} {100 * share:.0f}%"
                                           for site, share in summary["share"].items()
                                           if share > 0)} for summary in summaries]
    title = "tierwise bench fleet: routing across edge sites, one overloaded, one killed"
    report.table(rows, COLUMNS, title=title, notes=notes)
    for note in notes:
        console.print(f"- {note}", highlight=False)
    with report.figure("bench-fleet.png", nrows=len(results), size=(10, 2.4 * len(results)),
                       title=title) as (_, axes):
        axes = np.atleast_1d(axes)
        colors = {spec.name: color for spec, color in
                  zip(settings.sites, ("tab:blue", "tab:orange", "tab:green", "tab:purple",
                                       "tab:brown"), strict=False)}
        colors["device"] = "tab:red"
        for axis, result in zip(axes, results, strict=True):
            for site, color in colors.items():
                points = [(a.at_s, a.latency_ms) for a in result.answers if a.site == site]
                if points:
                    axis.scatter(*zip(*points, strict=True), s=4, color=color, label=site)
            axis.axhline(settings.deadline_ms, color="black", linewidth=0.8, linestyle="--")
            axis.axvspan(events[0][0], events[3][0], color="tab:orange", alpha=0.08)
            axis.axvspan(events[1][0], events[2][0], color="tab:red", alpha=0.08)
            axis.set_yscale("log")
            axis.set_ylabel("latency (ms)")
            axis.set_title(result.strategy, fontsize=9, loc="left")
            axis.legend(fontsize=6, loc="upper right", markerscale=2)
        axes[-1].set_xlabel("seconds into the run (shaded: overload; kill to restart)")
    report.write({"settings": {**asdict(settings), "events": events}, "floor": floor,
                  "summaries": summaries, "notes": notes,
                  "answers": {result.strategy: [asdict(a) for a in result.answers]
                              for result in results}})
    report.say_written()
