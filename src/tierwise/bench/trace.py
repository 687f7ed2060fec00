"""`tierwise bench trace`: replay a bandwidth trace while streaming requests at a fixed rate.

The trace is a CSV with the columns `t_s,bandwidth_up_bytes_per_s,bandwidth_down_bytes_per_s,
rtt_ms`: each row's values hold from its `t_s` until the next row's; the last row ends the
trace (its values are never replayed). A bandwidth of 0 is an outage, as in real cellular
traces: no byte crosses that direction until a later row brings the rate back, when a
transfer caught in it resumes where it stopped (unless its request gave up meanwhile); a
tiny rate (1 byte/s) is a near-outage and is bounded the same way. Negative, non-finite and
non-numeric values are refused, naming the file, line and column. The trace drives the
device's access link: both links get its bandwidths; the edge link its RTT, the cloud link its
RTT plus the configured cloud-over-edge RTT (the WAN behind the access link). Under
`--link tc` the kernel cannot emulate rates below `tierwise.net.tc.MIN_RATE_BYTES_PER_S`, so
a trace with outages needs `--link emulated`.

Every strategy gets its own client and links, replaying the same trace on the same clock, and
the same open-loop arrivals (`rate_per_s`, request i at i / rate): a request's latency counts
from its arrival, so a strategy that falls behind pays for its queue. Before a replay each
client opens its connections, loads its models and (adaptive) probes its links at the
configured rates; the trace's first row applies when the replay's clock starts, and the
adaptive client learns the trace from its own transfers and probes. Under `--link tc` the
kernel's link is shared, so strategies run one after another.

Every request is bounded, whatever the link does. A remote stage gives up at the request's
abort time (the emulated link abandons the transfer then: `tierwise.net.shaping`) and the
request falls back to the device model. Adaptive plans abort in time for the device fallback
to meet the deadline; static plans, and adaptive plans predicted to miss, after the client's
`timeout_s`, which the bench sets to `TraceSettings.timeout_ms` (default: the deadline), so
static strategies fall back to the device once a remote answer is later than that. A request
therefore ends within

    request bound = timeout + the device model's profiled compute time

of its start. The replay is bounded too: arrivals stop when the trace ends (trace length /
speed after the clock starts). A request still queued then (its strategy's `max_in_flight`
workers all busy) is not started: it is recorded as unanswered (`"answered": false` in
requests.jsonl, counted in its row's `unanswered` and as a missed deadline), never dropped.
The requests in flight end within the request bound; then the links are closed (a probe
stuck behind an outage is abandoned) and the clients with them. So a replay takes at most

    trace length / speed + request bound + DRAIN_SLACK_S

from its first arrival to its last answer (under tc, each strategy's replay), provided the
host computes as fast as the profiles measured: the link is bounded by construction, this
host's CPU is not. A host that cannot keep up with `rate_per_s` across every strategy at
once (the camera workload at 20/s on two cores) stretches every device computation in
flight, and the replay runs over: results.json then says so (`within`: false), with the
requests in flight at the trace's end and device-only's latency (no network at all) against
its profiled compute; lower `--rate`. results.json states the bound and what each replay
took; the progress line shows the trace's clock and rate, and the requests answered, in
flight and unanswered.

Writes requests.jsonl (one record per request), results.json and table.md (one summary row
per strategy) and trace.png (the bandwidth, each strategy's latency, the adaptive plan over
time and the latency CDFs), through `tierwise.bench.harness.BenchReport`.
"""

from __future__ import annotations

import bisect
import csv
import json
import math
import threading
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, replace
from itertools import pairwise
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from tierwise.bench.harness import BenchReport, Column, latency_cdf
from tierwise.bench.network import (
    ADAPTIVE,
    STRATEGIES,
    Run,
    Testbed,
    static_plans,
    testbed,
)
from tierwise.bench.workload import Samples
from tierwise.client.client import compute_labels
from tierwise.config import DEVICE_TIER, Config, ConfigError, format_rate
from tierwise.net.shaping import EmulatedLink
from tierwise.planner.plans import Plan
from tierwise.planner.policy import SLO

COLUMNS = ("t_s", "bandwidth_up_bytes_per_s", "bandwidth_down_bytes_per_s", "rtt_ms")
# Time allowed beyond trace/speed + the request bound for a replay to end: the threads that
# answer the last requests being scheduled late on a loaded host, and the clients closing
# (their probers stopped). Measured: 0.01-0.02 s on an idle 2-core host (tests/
# test_bench_trace.py prints it).
DRAIN_SLACK_S = 0.5
PROGRESS_EVERY_S = 0.2


class TraceError(ConfigError):
    """A trace file that cannot be replayed; the message names the line and the column."""


@dataclass(frozen=True)
class TracePoint:
    t_s: float
    bandwidth_up: float     # bytes/s; 0: an outage
    bandwidth_down: float   # bytes/s; 0: an outage
    rtt_ms: float


@dataclass
class TraceSettings:
    rate_per_s: float = 20.0
    deadline_ms: float | None = None    # None: the workload's (`Workload.bench_deadline_ms`)
    min_accuracy: float | None = None   # None: the workload's floor (`Workload.bench_floor`)
    speed: float = 1.0          # replay this many times faster
    max_in_flight: int = 32     # per strategy
    # every client's timeout_s: when a static plan's remote stage gives up and falls back to
    # the device model (None: the deadline)
    timeout_ms: float | None = None

    @property
    def slo(self) -> SLO:
        assert self.deadline_ms is not None and self.min_accuracy is not None, \
            "resolved by run_bench_trace"
        return SLO(self.deadline_ms, self.min_accuracy)

    @property
    def timeout_s(self) -> float:
        return (self.slo.deadline_ms if self.timeout_ms is None else self.timeout_ms) / 1e3


@dataclass(frozen=True)
class Bound:
    """How long a replay may take, and why: see the module docstring."""

    trace_s: float          # trace length / speed
    timeout_s: float        # the clients' timeout
    fallback_s: float       # the device model's profiled compute time
    slack_s: float = DRAIN_SLACK_S

    @property
    def request_s(self) -> float:
        return self.timeout_s + self.fallback_s

    @property
    def replay_s(self) -> float:
        return self.trace_s + self.request_s + self.slack_s

    def statement(self) -> str:
        return (f"each replay ends within trace/speed {self.trace_s:g} s + request bound "
                f"{self.request_s:.3f} s (timeout {self.timeout_s * 1e3:g} ms + device "
                f"fallback {self.fallback_s * 1e3:.3g} ms as profiled) + {self.slack_s:g} s "
                f"slack = {self.replay_s:.2f} s of its first arrival")


@dataclass
class Replay:
    """One replay of the trace by some strategies side by side."""

    strategies: list[str]
    runs: dict[str, Run]
    records: list[dict[str, Any]]
    unanswered: dict[str, int]
    seconds: float = 0.0    # first arrival to the last answer, clients closed
    answered: int = 0
    in_flight_at_end: int = 0   # started, not yet answered, when the trace ended


def load_trace(path: Path) -> list[TracePoint]:
    """Read and check a trace CSV (bandwidths ≥ 0, 0 an outage; RTT ≥ 0; t_s increasing from
    0). Raises TraceError naming `path:line: column` for a value that cannot be replayed."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: trace file not found")
    with open(path, newline="") as stream:
        reader = csv.DictReader(stream)
        if reader.fieldnames is None or [f.strip() for f in reader.fieldnames] != list(COLUMNS):
            raise TraceError(f"{path}: expected the header {','.join(COLUMNS)}, got "
                             f"{','.join(reader.fieldnames or [])!r}")
        points: list[TracePoint] = []
        for line, row in enumerate(reader, start=2):
            values = {}
            for column in COLUMNS:
                text = (row.get(column) or "").strip()
                try:
                    values[column] = float(text)
                except ValueError:
                    raise TraceError(f"{path}:{line}: {column}: expected a number, got "
                                     f"{text!r}") from None
                if not math.isfinite(values[column]):
                    raise TraceError(f"{path}:{line}: {column}: expected a finite number, "
                                     f"got {text!r}")
                if column.startswith("bandwidth") and values[column] < 0:
                    raise TraceError(f"{path}:{line}: {column}: expected a rate ≥ 0 (0: an "
                                     f"outage), got {text!r}")
            if values["rtt_ms"] < 0:
                raise TraceError(f"{path}:{line}: rtt_ms: expected ≥ 0, got {values['rtt_ms']}")
            if points and values["t_s"] <= points[-1].t_s:
                raise TraceError(f"{path}:{line}: t_s: must increase, got {values['t_s']:g} "
                                 f"after {points[-1].t_s:g}")
            points.append(TracePoint(values["t_s"], values["bandwidth_up_bytes_per_s"],
                                     values["bandwidth_down_bytes_per_s"], values["rtt_ms"]))
    if len(points) < 2 or points[0].t_s != 0:
        raise TraceError(f"{path}: needs at least two rows, the first at t_s = 0")
    return points


def at(points: list[TracePoint], t_s: float) -> TracePoint:
    """The trace's values at time `t_s`."""
    index = bisect.bisect_right([point.t_s for point in points], t_s) - 1
    return points[max(index, 0)]


def _show_rate(bytes_per_s: float) -> str:
    return format_rate(bytes_per_s) if bytes_per_s > 0 else "0 (outage)"


def _check_for_tc(path: Path, points: list[TracePoint]) -> None:
    from tierwise.net.tc import MIN_RATE_BYTES_PER_S

    for point in points[:-1]:
        low = min(point.bandwidth_up, point.bandwidth_down)
        if low < MIN_RATE_BYTES_PER_S:
            raise TraceError(f"{path}: t_s {point.t_s:g}: {_show_rate(low)} is below what the "
                             f"kernel's tbf can enforce ({MIN_RATE_BYTES_PER_S:g} B/s); replay "
                             "outages with --link emulated")


def _apply(bed: Testbed, links: list[dict[str, EmulatedLink | None]], point: TracePoint) -> None:
    wan_ms = max(0.0, bed.config.link("cloud").rtt_ms - bed.config.link("edge").rtt_ms)
    for tier in bed.config.sites():
        rtt = point.rtt_ms + (wan_ms if tier == "cloud" else 0.0)
        if bed.tc is not None:
            bed.tc.set_rate(tier, point.bandwidth_up, point.bandwidth_down)
        for strategy_links in links:
            link = strategy_links[tier]
            if link is not None:
                link.set_rates(point.bandwidth_up, point.bandwidth_down, rtt)


def _replay(bed: Testbed, strategies: dict[str, Plan | None], points: list[TracePoint],
            settings: TraceSettings, samples: Samples, bound: Bound,
            progress: Progress) -> Replay:
    """Replay the trace once with `strategies` side by side (see the module docstring for
    what is bounded and how)."""
    slo = settings.slo
    count = int(bound.trace_s * settings.rate_per_s)
    all_links: dict[str, dict[str, EmulatedLink | None]] = {
        name: {tier: EmulatedLink(bed.config.link(tier), pace=bed.tc is None)
               for tier in bed.config.sites()} for name in strategies}
    clients = {name: bed.client(all_links[name], probe=plan is None)
               for name, plan in strategies.items()}
    for name, client in clients.items():  # connections up, sessions loaded, links known
        client.timeout_s = settings.timeout_s
        client.infer(samples.inputs[-1], strategies[name], deadline_ms=slo.deadline_ms)
        if strategies[name] is None:
            client.probe_now()
    replay = Replay(list(strategies), {name: Run(name) for name in strategies}, [],
                    dict.fromkeys(strategies, 0))
    lock = threading.Lock()
    stop = threading.Event()
    title = ", ".join(strategies) if len(strategies) < len(STRATEGIES) else "all strategies"
    task = progress.add_task(title, total=bound.trace_s)
    _apply(bed, list(all_links.values()), points[0])
    start = time.perf_counter() + 0.05

    def drive_links() -> None:
        for point in points[1:-1]:  # the last row only marks the end
            if stop.wait(max(0.0, start + point.t_s / settings.speed - time.perf_counter())):
                return
            _apply(bed, list(all_links.values()), point)

    def record(name: str, index: int, arrival: float, **fields: Any) -> None:
        t_s = (arrival - start) * settings.speed
        replay.records.append({"strategy": name, "request": index, "t_s": t_s,
                               "bandwidth_up_bytes_per_s": at(points, t_s).bandwidth_up,
                               **fields})

    def request(name: str, index: int, arrival: float) -> None:
        image = samples.inputs[index % len(samples)]
        label = int(samples.labels[index % len(samples)])
        result = clients[name].infer(image, strategies[name], deadline_ms=slo.deadline_ms,
                                     min_accuracy=slo.min_accuracy)
        latency_ms = (time.perf_counter() - arrival) * 1e3
        with lock:
            replay.runs[name].add(result, label, latency_ms, slo.deadline_ms)
            replay.answered += 1
            record(name, index, arrival, answered=True, latency_ms=latency_ms,
                   missed=latency_ms > slo.deadline_ms, correct=result.label == label,
                   plan=result.trace.plan, fallback=result.trace.fallback,
                   bytes_up=result.trace.bytes_up, cost_usd=result.trace.cost_usd)

    shown_at = 0.0

    def show(phase: str, arrived: int, force: bool = False) -> None:
        nonlocal shown_at
        now = time.perf_counter()
        if not force and now - shown_at < PROGRESS_EVERY_S:
            return
        shown_at = now
        t_s = min(max(now - start, 0.0), bound.trace_s)
        point = at(points, t_s * settings.speed)
        lost = sum(replay.unanswered.values())
        progress.update(task, completed=t_s, description=(
            f"{title}: {phase} t={t_s * settings.speed:.1f}/{points[-1].t_s:g} s, up "
            f"{_show_rate(point.bandwidth_up)}; answered {replay.answered}/{arrived}, in "
            f"flight {arrived - replay.answered - lost}, unanswered {lost}"))

    driver = threading.Thread(target=drive_links, name="trace-links", daemon=True)
    driver.start()
    pools = {name: ThreadPoolExecutor(settings.max_in_flight, thread_name_prefix=name)
             for name in strategies}
    submitted: list[tuple[str, int, float, Future[None]]] = []
    try:
        for index in range(count):
            arrival = start + index / settings.rate_per_s
            while (delay := arrival - time.perf_counter()) > 0:
                show("replaying", len(submitted))
                time.sleep(min(delay, PROGRESS_EVERY_S))
            for name in strategies:
                submitted.append((name, index, arrival,
                                  pools[name].submit(request, name, index, arrival)))
        while (delay := start + bound.trace_s - time.perf_counter()) > 0:
            show("replaying", len(submitted))
            time.sleep(min(delay, PROGRESS_EVERY_S))
        # The trace has ended: what has not started yet never will.
        for name, index, arrival, future in submitted:
            if future.cancel():
                with lock:
                    replay.unanswered[name] += 1
                    record(name, index, arrival, answered=False, latency_ms=None, missed=True,
                           correct=False, plan=None, fallback=None, bytes_up=0, cost_usd=0.0,
                           note="still queued when the trace ended: never started")
        running = [future for *_, future in submitted if not future.cancelled()]
        replay.in_flight_at_end = sum(not future.done() for future in running)
        while True:
            done, pending = wait(running, timeout=PROGRESS_EVERY_S,
                                 return_when=FIRST_EXCEPTION)
            show("draining", len(submitted), force=True)
            for future in done:
                future.result()  # a request that raised fails the bench, loudly
            if not pending:
                break
    finally:
        stop.set()
        driver.join()
        for pool in pools.values():
            pool.shutdown(wait=True, cancel_futures=True)
        for links in all_links.values():  # a probe stuck behind an outage ends now
            for link in links.values():
                if link is not None:
                    link.close()
        for name, client in clients.items():
            replay.runs[name].add_probes(client)
            client.close()
    replay.seconds = time.perf_counter() - start
    progress.update(task, completed=bound.trace_s)
    return replay


def run_bench_trace(config: Config, trace_path: Path, out_dir: Path, settings: TraceSettings,
                    link_mode: str = "emulated", console: Console | None = None,
                    workload: str = "fashion-mnist") -> list[dict[str, Any]]:
    """Replay `trace_path` with every strategy on `workload` (`tierwise.bench.workload`);
    write the outputs to `out_dir` and return one summary row per strategy."""
    from tierwise.bench.workload import load_workload
    from tierwise.client.planning import profiled_compute_ms
    from tierwise.profile.model_profile import load_tier_profiles

    console = console or Console()
    points = load_trace(trace_path)
    if link_mode == "tc":
        _check_for_tc(trace_path, points)
    setup = load_workload(workload, config, console)
    config = setup.config
    settings = replace(settings, deadline_ms=setup.bench_deadline_ms if settings.deadline_ms
                       is None else settings.deadline_ms, min_accuracy=setup.bench_floor
                       if settings.min_accuracy is None else settings.min_accuracy)
    slo = settings.slo
    trace_s = points[-1].t_s / settings.speed
    samples = setup.samples(max(1, int(trace_s * settings.rate_per_s)))
    profiled = profiled_compute_ms(load_tier_profiles(config, config.models_dir))
    bound = Bound(trace_s, settings.timeout_s,
                  profiled.get((DEVICE_TIER, setup.device), 0.0) / 1e3)
    plans: dict[str, Plan | None] = {
        **static_plans(config, slo, models=(setup.device, setup.edge, setup.cloud)),
        ADAPTIVE: None}
    replays: list[Replay] = []
    with testbed(config, link_mode) as bed, Progress(
        TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=console,
        transient=True,
    ) as progress:
        groups = [list(STRATEGIES)] if bed.tc is None else [[name] for name in STRATEGIES]
        for group in groups:
            replays.append(_replay(bed, {n: plans[n] for n in group}, points, settings,
                                   samples, bound, progress))
        links_text = bed.describe_links()
    runs = {name: run for replay in replays for name, run in replay.runs.items()}
    unanswered = {name: n for replay in replays for name, n in replay.unanswered.items()}
    records = [record for replay in replays for record in replay.records]
    duration = points[-1].t_s
    mean_up = sum((b.t_s - a.t_s) * a.bandwidth_up for a, b in pairwise(points)) / duration
    outage_s = sum(b.t_s - a.t_s for a, b in pairwise(points)
                   if min(a.bandwidth_up, a.bandwidth_down) <= 0)
    rows = []
    for name in STRATEGIES:
        row = runs[name].summary()
        lost = unanswered[name]
        row["unanswered"] = lost
        row["arrived"] = row["requests"] + lost
        # an unanswered request missed its deadline
        row["deadline_miss_rate"] = ((sum(runs[name].missed) + lost) / row["arrived"]
                                     if row["arrived"] else float("nan"))
        row["bandwidth_up_bytes_per_s"] = mean_up
        rows.append(row)
    emulated = [*compute_labels(config),
                f"links: trace {trace_path.name} replayed at {settings.speed:g}x"
                + (f" ({outage_s:g} s of outage)" if outage_s else "") + f", links {links_text}"]
    timeout_note = (f"Every client's remote stage gives up after {settings.timeout_s * 1e3:g} ms "
                    "(static strategies; adaptive plans give up in time for the device "
                    "fallback) and the request falls back to the device model.")
    measured = [round(replay.seconds, 3) for replay in replays]
    within = all(seconds <= bound.replay_s for seconds in measured)
    in_flight = [replay.in_flight_at_end for replay in replays]
    bound_note = (f"Bound: {bound.statement()}; measured {', '.join(f'{s:.2f}' for s in measured)}"
                  f" s ({'within' if within else 'OVER'} the bound). Requests still queued when "
                  "the trace ended were not started: counted as unanswered and as missed "
                  "deadlines.")
    if not within:
        local = next(row for row in rows if row["strategy"] == "device-only")
        bound_note += (f" Over because this host did not keep up: {sum(in_flight)} requests "
                       f"were in flight when the trace ended, and device-only (no network) "
                       f"took p50 {local['latency_p50_ms']:.0f} ms against "
                       f"{bound.fallback_s * 1e3:.3g} ms profiled; lower --rate.")
    report = BenchReport("trace", out_dir, emulated, console=console)
    requests_path = out_dir / "requests.jsonl"
    with open(requests_path, "w") as stream:
        for record in sorted(records, key=lambda r: (r["strategy"], r["request"])):
            stream.write(json.dumps(record) + "\n")
    report.written.append(requests_path)
    report.table(rows, _table_columns(setup.quality), title=f"bandwidth trace replay: "
                 f"{trace_path.name}, {setup.title}",
                 notes=[setup.quality_note, timeout_note, bound_note])
    with report.figure("trace.png", nrows=4, size=(13, 14),
                       title=f"tierwise bench trace: {trace_path.name}, {setup.title}") \
            as (_, axes):
        plot_trace(axes, points, records, settings)
    report.write({
        "trace": str(trace_path), "link_mode": link_mode, "workload": setup.name,
        "quality": setup.quality, "quality_note": setup.quality_note,
        "samples": samples.source, "settings": {**asdict(settings),
                                                "timeout_s": settings.timeout_s},
        "slo": {"deadline_ms": slo.deadline_ms, "min_accuracy": slo.min_accuracy},
        "timeout": timeout_note,
        "bound": {**asdict(bound), "request_s": bound.request_s, "replay_s": bound.replay_s,
                  "statement": bound.statement(), "measured_replay_s": measured,
                  "within": within, "in_flight_at_trace_end": in_flight},
        "unanswered": ("requests still queued when the trace ended: not started, counted in "
                       "`unanswered` and as missed deadlines (requests.jsonl: answered false)"),
        "rows": rows})
    console.print(f"[{'green' if within else 'red'}]{bound_note}[/]")
    report.say_written()
    return rows


def _table_columns(quality: str) -> list[Column]:
    return [Column("strategy", "strategy", left=True),
            Column("accuracy", quality, "{:.2%}"),
            Column("latency_p50_ms", "p50 ms", "{:.1f}"),
            Column("latency_p95_ms", "p95 ms", "{:.1f}"),
            Column("deadline_miss_rate", "missed", "{:.1%}"),
            Column("fallback_rate", "fell back", "{:.1%}"),
            Column("unanswered", "unanswered"),
            Column("bytes_up_per_inference", "B up/inf", "{:,.0f}"),
            Column("cost_usd_per_1m", "$ per 1M", "{:.4f}"),
            Column("arrived", "n")]


def plan_kind(plan: str) -> str:
    """A short label for a plan, for the timeline: where the work goes."""
    tier = "cloud" if "cloud:" in plan or "-> cloud" in plan else "edge"
    if plan.startswith("local"):
        return "local"
    kind = plan.split("(", 1)[0]
    if kind == "cascade":
        inner = "split" if "split(" in plan else "remote"
        return f"cascade→{inner} {tier}"
    return f"{kind} {tier}"


def plot_trace(axes: Any, points: list[TracePoint], records: list[dict[str, Any]],
               settings: TraceSettings) -> None:
    """The trace (outages shaded), each strategy's latency over time, the adaptive plan per
    request and the latency CDFs, on four axes."""
    bandwidth, latency, plans, cdf = axes
    times = [p.t_s for p in points]
    for values, name in (([p.bandwidth_up for p in points], "uplink"),
                         ([p.bandwidth_down for p in points], "downlink")):
        # a log axis cannot show 0: outages are gaps, shaded below
        bandwidth.step(times, [v if v > 0 else math.nan for v in values], where="post",
                       label=name)
    outages = [(a.t_s, b.t_s) for a, b in pairwise(points)
               if min(a.bandwidth_up, a.bandwidth_down) <= 0]
    for index, (begin, end) in enumerate(outages):
        for axis in (bandwidth, latency, plans):
            axis.axvspan(begin, end, color="grey", alpha=0.2,
                         label="outage (rate 0)" if index == 0 and axis is bandwidth else None)
    bandwidth.set_yscale("log")
    bandwidth.set_ylabel("bytes/s (log)")
    bandwidth.legend(fontsize=8)
    bandwidth.set_title("the trace (emulated link)")
    for axis in (bandwidth, latency, plans):
        axis.set_xlim(0, points[-1].t_s)
    series: dict[str, Sequence[float]] = {}
    for name in STRATEGIES:
        mine = sorted((r["t_s"], r["latency_ms"]) for r in records
                      if r["strategy"] == name and r["answered"])
        series[name] = [y for _, y in mine]
        if mine:
            x, y = zip(*mine, strict=True)
            latency.plot(x, y, ".", markersize=2,
                         label=name, **({"color": "black"} if name == ADAPTIVE else {}))
    latency.axhline(settings.slo.deadline_ms, color="red", linestyle=":", label="deadline")
    latency.set_yscale("log")
    latency.set_ylabel("latency from arrival (ms, log)")
    latency.legend(fontsize=8, markerscale=5, ncol=4)
    adaptive = [r for r in records if r["strategy"] == ADAPTIVE and r["answered"]]
    kinds = sorted({plan_kind(r["plan"]) for r in adaptive})
    for kind_index, kind in enumerate(kinds):
        chosen = [r for r in adaptive if plan_kind(r["plan"]) == kind]
        plans.scatter([r["t_s"] for r in chosen], [kind_index] * len(chosen), s=6,
                      c=["orange" if r["fallback"] else "tab:blue" for r in chosen])
    plans.set_yticks(range(len(kinds)), kinds)
    plans.set_xlabel(f"trace time (s); {settings.rate_per_s:g} requests/s per strategy")
    plans.set_title("tierwise adaptive: plan chosen per request (orange: fell back)")
    latency_cdf(cdf, series, deadline_ms=settings.slo.deadline_ms,
                styles={ADAPTIVE: {"color": "black"}})
    cdf.set_title("latency per strategy, answered requests")


__all__ = ["Bound", "TraceError", "TraceSettings", "load_trace", "run_bench_trace"]
