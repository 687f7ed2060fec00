"""`tierwise bench trace`: replay a bandwidth trace while streaming requests at a fixed rate.

The trace is a CSV with the columns `t_s,bandwidth_up_bytes_per_s,bandwidth_down_bytes_per_s,
rtt_ms`: each row's values hold from its `t_s` until the next row's; the last row ends the
trace. It drives the device's access link: both links get its bandwidths; the edge link its
RTT, the cloud link its RTT plus the configured cloud-over-edge RTT (the WAN behind the
access link).

Every strategy gets its own client and links, replaying the same trace on the same clock, and
the same open-loop arrivals (`rate_per_s`, image i at i / rate): a request's latency counts
from its arrival, so a strategy that falls behind pays for its queue. Under `--link tc` the
kernel's link is shared, so strategies run one after another.

Writes requests.jsonl (one record per request), results.json (one summary row per strategy)
and trace.png (the bandwidth, each strategy's latency, and the adaptive plan over time).
"""

from __future__ import annotations

import csv
import json
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from tierwise.bench.network import (
    ADAPTIVE,
    REMOTE_TIERS,
    STRATEGIES,
    Run,
    Testbed,
    static_plans,
    testbed,
)
from tierwise.client.client import compute_labels
from tierwise.config import Config, ConfigError
from tierwise.data import load_splits
from tierwise.net.shaping import EmulatedLink
from tierwise.planner.plans import Plan
from tierwise.planner.policy import SLO

COLUMNS = ("t_s", "bandwidth_up_bytes_per_s", "bandwidth_down_bytes_per_s", "rtt_ms")


class TraceError(ConfigError):
    """A trace file that cannot be replayed; the message names the line and the column."""


@dataclass(frozen=True)
class TracePoint:
    t_s: float
    bandwidth_up: float
    bandwidth_down: float
    rtt_ms: float


@dataclass
class TraceSettings:
    rate_per_s: float = 20.0
    deadline_ms: float = 100.0
    min_accuracy: float = 0.93
    speed: float = 1.0          # replay this many times faster
    max_in_flight: int = 32     # per strategy


def load_trace(path: Path) -> list[TracePoint]:
    """Read and check a trace CSV."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: trace file not found")
    with open(path, newline="") as stream:
        reader = csv.DictReader(stream)
        if reader.fieldnames is None or [f.strip() for f in reader.fieldnames] != list(COLUMNS):
            raise TraceError(f"{path}: expected the header {','.join(COLUMNS)}, got "
                             f"{','.join(reader.fieldnames or [])!r}")
        points = []
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
                if column != "t_s" and not values[column] > 0 and column != "rtt_ms":
                    raise TraceError(f"{path}:{line}: {column}: expected a positive rate, "
                                     f"got {text!r}")
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
    index = max(i for i, point in enumerate(points) if point.t_s <= t_s or i == 0)
    return points[index]


def _apply(bed: Testbed, links: list[dict[str, EmulatedLink | None]], point: TracePoint) -> None:
    wan_ms = max(0.0, bed.config.link("cloud").rtt_ms - bed.config.link("edge").rtt_ms)
    for tier in REMOTE_TIERS:
        rtt = point.rtt_ms + (wan_ms if tier == "cloud" else 0.0)
        if bed.tc is not None:
            bed.tc.set_rate(tier, point.bandwidth_up, point.bandwidth_down)
        for strategy_links in links:
            link = strategy_links[tier]
            if link is not None:
                link.set_rates(point.bandwidth_up, point.bandwidth_down, rtt)


def _replay(bed: Testbed, strategies: dict[str, Plan | None], points: list[TracePoint],
            settings: TraceSettings, images: np.ndarray, labels: np.ndarray,
            progress: Progress) -> tuple[dict[str, Run], list[dict[str, Any]]]:
    """Replay the trace once with `strategies` side by side."""
    slo = SLO(settings.deadline_ms, settings.min_accuracy)
    duration_s = points[-1].t_s / settings.speed
    count = int(duration_s * settings.rate_per_s)
    first = points[0]
    all_links = {name: bed.links(first.bandwidth_up, {t: first.bandwidth_down
                                                      for t in REMOTE_TIERS})
                 for name in strategies}
    clients = {name: bed.client(all_links[name], probe=plan is None)
               for name, plan in strategies.items()}
    _apply(bed, list(all_links.values()), first)
    for name, client in clients.items():  # connections up, sessions loaded, links known
        client.infer(images[-1], strategies[name], deadline_ms=slo.deadline_ms)
        if strategies[name] is None:
            client.probe_now()
    runs = {name: Run(name) for name in strategies}
    records: list[dict[str, Any]] = []
    lock = threading.Lock()
    task = progress.add_task(f"trace: {', '.join(strategies)}", total=count)
    stop = threading.Event()
    start = time.perf_counter() + 0.05

    def drive_links() -> None:
        for point in points[1:-1]:  # the last row only marks the end
            if stop.wait(max(0.0, start + point.t_s / settings.speed - time.perf_counter())):
                return
            _apply(bed, list(all_links.values()), point)

    def request(name: str, index: int, arrival: float) -> None:
        image, label = images[index % len(images)], int(labels[index % len(labels)])
        result = clients[name].infer(image, strategies[name], deadline_ms=slo.deadline_ms,
                                     min_accuracy=slo.min_accuracy)
        latency_ms = (time.perf_counter() - arrival) * 1e3
        point = at(points, (arrival - start) * settings.speed)
        with lock:
            runs[name].add(result, label, latency_ms, slo.deadline_ms)
            records.append({
                "strategy": name, "request": index, "t_s": (arrival - start) * settings.speed,
                "bandwidth_up_bytes_per_s": point.bandwidth_up, "latency_ms": latency_ms,
                "missed": latency_ms > slo.deadline_ms, "correct": result.label == label,
                "plan": result.trace.plan, "fallback": result.trace.fallback,
                "bytes_up": result.trace.bytes_up, "cost_usd": result.trace.cost_usd})
            if name == next(iter(strategies)):
                progress.advance(task)

    driver = threading.Thread(target=drive_links, daemon=True)
    driver.start()
    pools = {name: ThreadPoolExecutor(settings.max_in_flight, thread_name_prefix=name)
             for name in strategies}
    try:
        for index in range(count):
            arrival = start + index / settings.rate_per_s
            delay = arrival - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            for name in strategies:
                pools[name].submit(request, name, index, arrival)
        for pool in pools.values():
            pool.shutdown(wait=True)
    finally:
        stop.set()
        driver.join()
        for name, client in clients.items():
            runs[name].add_probes(client)
            client.close()
    return runs, records


def run_bench_trace(config: Config, trace_path: Path, out_dir: Path, settings: TraceSettings,
                    link_mode: str = "emulated", console: Console | None = None
                    ) -> list[dict[str, Any]]:
    from tierwise.profile.profiler import ensure_profiles
    from tierwise.zoo.build import ensure_zoo

    console = console or Console()
    points = load_trace(trace_path)
    ensure_zoo(config, console=console)
    ensure_profiles(config, console=console)
    slo = SLO(settings.deadline_ms, settings.min_accuracy)
    splits = load_splits(config.data.path, config.data.validation_size, config.data.seed)
    plans: dict[str, Plan | None] = {**static_plans(config, slo), ADAPTIVE: None}
    runs: dict[str, Run] = {}
    records: list[dict[str, Any]] = []
    with testbed(config, link_mode) as bed, Progress(
        TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=console,
        transient=True,
    ) as progress:
        groups = [list(STRATEGIES)] if bed.tc is None else [[name] for name in STRATEGIES]
        for group in groups:
            group_runs, group_records = _replay(bed, {n: plans[n] for n in group}, points,
                                                settings, splits.test_x, splits.test_y,
                                                progress)
            runs.update(group_runs)
            records += group_records
        links_text = bed.describe_links()
    duration = points[-1].t_s
    mean_up = sum((b.t_s - a.t_s) * a.bandwidth_up for a, b in pairwise(points)) / duration
    rows = []
    for name in STRATEGIES:
        row = runs[name].summary()
        row["bandwidth_up_bytes_per_s"] = mean_up
        rows.append(row)
    emulated = [*compute_labels(config),
                f"links: trace {trace_path.name} replayed at {settings.speed:g}x, links "
                f"{links_text}"]
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "requests.jsonl", "w") as stream:
        for record in sorted(records, key=lambda r: (r["strategy"], r["request"])):
            stream.write(json.dumps(record) + "\n")
    (out_dir / "results.json").write_text(json.dumps({
        "benchmark": "trace", "trace": str(trace_path), "link_mode": link_mode,
        "emulated": emulated, "settings": settings.__dict__,
        "slo": {"deadline_ms": settings.deadline_ms, "min_accuracy": settings.min_accuracy},
        "rows": rows}, indent=1) + "\n")
    plot_trace(out_dir / "trace.png", points, records, settings, emulated)
    _print(console, rows, emulated, out_dir)
    return rows


def _print(console: Console, rows: list[dict[str, Any]], emulated: list[str],
           out_dir: Path) -> None:
    table = Table(title="bandwidth trace replay")
    for title in ("strategy", "accuracy", "p50 ms", "p95 ms", "missed", "B up/inf", "$ per 1M",
                  "n"):
        table.add_column(title)
    for row in rows:
        table.add_row(row["strategy"], f"{row['accuracy']:.2%}", f"{row['latency_p50_ms']:.1f}",
                      f"{row['latency_p95_ms']:.1f}", f"{row['deadline_miss_rate']:.1%}",
                      f"{row['bytes_up_per_inference']:,.0f}", f"{row['cost_usd_per_1m']:.4f}",
                      str(row["requests"]))
    console.print(table)
    for label in emulated:
        console.print(f"[yellow]{label}[/]")
    console.print(f"written to {out_dir}")


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


def plot_trace(path: Path, points: list[TracePoint], records: list[dict[str, Any]],
               settings: TraceSettings, emulated: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (bandwidth, latency, plans) = plt.subplots(
        3, 1, figsize=(13, 10), sharex=True, gridspec_kw={"height_ratios": [1, 2, 1.4]})
    times = [p.t_s for p in points]
    bandwidth.step(times, [p.bandwidth_up for p in points], where="post", label="uplink")
    bandwidth.step(times, [p.bandwidth_down for p in points], where="post", label="downlink")
    bandwidth.set_yscale("log")
    bandwidth.set_ylabel("bytes/s (log)")
    bandwidth.legend(fontsize=8)
    bandwidth.set_title("the trace (emulated link)")
    for name in STRATEGIES:
        mine = sorted((r["t_s"], r["latency_ms"]) for r in records if r["strategy"] == name)
        if mine:
            x, y = zip(*mine, strict=True)
            latency.plot(x, y, ".", markersize=2,
                         label=name, **({"color": "black"} if name == ADAPTIVE else {}))
    latency.axhline(settings.deadline_ms, color="red", linestyle=":", label="deadline")
    latency.set_yscale("log")
    latency.set_ylabel("latency from arrival (ms, log)")
    latency.legend(fontsize=8, markerscale=5, ncol=4)
    adaptive = [r for r in records if r["strategy"] == ADAPTIVE]
    kinds = sorted({plan_kind(r["plan"]) for r in adaptive})
    for kind_index, kind in enumerate(kinds):
        mine = [r for r in adaptive if plan_kind(r["plan"]) == kind]
        plans.scatter([r["t_s"] for r in mine], [kind_index] * len(mine), s=6,
                      c=["orange" if r["fallback"] else "tab:blue" for r in mine])
    plans.set_yticks(range(len(kinds)), kinds)
    plans.set_xlabel(f"trace time (s); {settings.rate_per_s:g} requests/s per strategy")
    plans.set_title("tierwise adaptive: plan chosen per request (orange: fell back)")
    figure.suptitle("tierwise bench trace — " + "; ".join(emulated), fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


__all__ = ["TraceError", "TraceSettings", "load_trace", "run_bench_trace"]
