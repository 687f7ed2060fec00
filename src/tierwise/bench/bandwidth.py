"""`tierwise bench bandwidth [--workload fashion-mnist|camera]`: every strategy across a sweep
of uplink bandwidth.

At each level (log-spaced) the device's uplink to both edge and cloud runs at that rate
(downlinks and RTTs as configured), and each strategy answers **the same requests** (every one
of `images`) with its own fresh client and link — strategies run side by side, so one level's
numbers are comparable. Every request is bounded: a static strategy's remote stage is
abandoned at the deadline and the device model answers instead (what an app that cannot wait
does; the request counts as missed), adaptive gives up in time for its own device fallback.
A cell therefore takes at most `images` × (deadline + the device model's time), however dead
the link. Quality columns come with a 95% Wilson interval.

The oracle is the best single static plan per level, chosen after the fact. Every plan the
policy could choose is screened at that level (`oracle_images` each, cut off as above); the
four best of the screening and the local plans are then run in full, side by side with the
strategies (same load, same requests), and the best full run is the oracle's: the cheapest
that missed no deadline (≤ 2%) and whose profiled quality meets the floor, else the one that
misses least. Plans whose latency, predicted with the level's true link, is over 1.5× the
deadline, or whose profiled quality misses the floor, are not screened: they cannot be its
choice (when no plan is left, the eight fastest are).

Writes results.json (one row per strategy and level, the targets, the measured knees),
table.md, bandwidth.png (quality, p95 latency and cost against bandwidth) and findings.png
(the published edge–cloud findings against this sweep: `tierwise.bench.findings`).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from tierwise.bench.harness import BenchReport, Column
from tierwise.bench.network import (
    ADAPTIVE,
    ORACLE,
    STRATEGIES,
    Run,
    Testbed,
    full_policy,
    static_plans,
    testbed,
)
from tierwise.bench.workload import Samples, load_workload
from tierwise.client.client import compute_labels
from tierwise.config import Config, format_rate
from tierwise.planner.estimators import LinkEstimator
from tierwise.planner.plans import Cascade, Local, Plan
from tierwise.planner.policy import SLO, PlanningState, Policy

CUTOFF_DEADLINES = 3.0
# The oracle measures plans predicted (with the level's true link) within this many deadlines
# that meet the floor by their profile; the others cannot be its choice.
PRUNE_DEADLINES = 1.5
ORACLE_MISS_TOLERANCE = 0.02
ORACLE_FINALISTS = 4


@dataclass
class SweepSettings:
    levels: list[float]
    images: int = 200
    oracle_images: int = 60
    deadline_ms: float | None = None    # None: the workload's (fashion-mnist 100, camera 1000)
    min_accuracy: float | None = None   # the quality floor; None: the workload's


def log_levels(low: float, high: float, count: int) -> list[float]:
    return [float(x) for x in np.geomspace(low, high, count)]


def _run_cell(bed: Testbed, strategy: str, plan: Plan | None, level: float, slo: SLO,
              samples: Samples, limit: int, cutoff: bool = False) -> Run:
    """One strategy at one level, on a fresh client and link: the first `limit` requests,
    each bounded by its deadline (static plans: abandoned at it, answered on the device)."""
    run = Run(strategy)
    links = bed.links(level)
    with bed.client(links, probe=plan is None) as client:
        client.timeout_s = slo.deadline_ms / 1e3
        if plan is None:
            client.probe_now()  # what an app does at start: know its links
            run.probe_bytes_up = -client.prober.totals.bytes_up  # type: ignore[union-attr]
            run.probe_cost_usd = -client.prober.totals.cost_usd  # type: ignore[union-attr]
        # one request first, not counted: connection set-up and the server's first run of a
        # model are start-up costs, the same for every strategy
        for warm_up in (plan, plan.then) if isinstance(plan, Cascade) else (plan,):
            client.infer(samples.inputs[-1], warm_up, deadline_ms=slo.deadline_ms,
                         min_accuracy=slo.min_accuracy)
        for index in range(min(limit, len(samples) - 1)):
            if cutoff and index >= 3 and all(run.missed):
                break  # three misses in a row at the start: this plan cannot win here
            result = client.infer(samples.inputs[index], plan, deadline_ms=slo.deadline_ms,
                                  min_accuracy=slo.min_accuracy)
            run.add(result, int(samples.labels[index]))
        run.add_probes(client)
    return run


def _in_parallel(jobs: dict[str, Any]) -> dict[str, Run]:
    """Run each job (a no-argument callable) in its own thread: cells spend their time
    waiting on links, so they overlap well; each has its own client and link."""
    results: dict[str, Run] = {}
    errors: list[BaseException] = []

    def work(name: str, job: Any) -> None:
        try:
            results[name] = job()
        except BaseException as error:  # re-raised below, in the caller's thread
            errors.append(error)

    threads = [threading.Thread(target=work, args=item, daemon=True) for item in jobs.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


def _run_all(jobs: dict[str, Any], parallel: bool) -> dict[str, Run]:
    if not parallel:
        return {name: job() for name, job in jobs.items()}
    runs: dict[str, Run] = {}
    names = list(jobs)
    for start in range(0, len(names), 8):  # 8 at a time: the host has 2 cores
        runs.update(_in_parallel({n: jobs[n] for n in names[start:start + 8]}))
    return runs


def _best(runs: dict[str, Run], slo: SLO, profiled_accuracy: dict[str, float]
          ) -> tuple[list[str], list[str]]:
    """(the feasible plans cheapest first, or if none, all plans least-miss first)."""
    summaries = {name: run.summary() for name, run in runs.items()}

    def cost(name: str) -> float:
        return float(summaries[name]["cost_usd_per_1m"])

    def miss(name: str) -> float:
        shortfall = max(0.0, slo.min_accuracy - profiled_accuracy[name])
        return summaries[name]["deadline_miss_rate"] + shortfall / max(slo.min_accuracy, 1e-9)

    feasible = [n for n in summaries if summaries[n]["deadline_miss_rate"]
                <= ORACLE_MISS_TOLERANCE and profiled_accuracy[n] >= slo.min_accuracy - 1e-12]
    if feasible:
        return sorted(feasible, key=cost), feasible
    return sorted(summaries, key=lambda n: (miss(n), cost(n))), []


def _oracle_finalists(bed: Testbed, level: float, slo: SLO, samples: Samples,
                      settings: SweepSettings,
                      profiled_accuracy: dict[str, float], predicted_ms: dict[str, float],
                      plans: list[Plan], parallel: bool) -> tuple[list[str], dict[str, Any]]:
    """Screen every plan that could be the oracle's at this level; return the few worth a
    full run (a cascade's cost on a few dozen images is luck: how many escalated)."""
    def could_win(plan: Plan) -> bool:
        name = plan.describe()
        return (predicted_ms[name] <= PRUNE_DEADLINES * slo.deadline_ms
                and profiled_accuracy[name] >= slo.min_accuracy - 1e-12)

    by_name = {p.describe(): p for p in plans}
    screened = [p for p in plans if could_win(p)]
    if not screened:  # nothing can meet both: the least-miss plan is among the fastest
        screened = sorted(plans, key=lambda p: predicted_ms[p.describe()])[:8]
    screening = _run_all({p.describe(): _cell_job(bed, p.describe(), by_name[p.describe()],
                                                  level, slo, samples,
                                                  settings.oracle_images, cutoff=True)
                          for p in screened}, parallel)
    ranked, feasible = _best(screening, slo, profiled_accuracy)
    # the local plans too: where the network fails every remote plan, one of them is best
    finalists = list(dict.fromkeys(ranked[:ORACLE_FINALISTS] + [
        p.describe() for p in plans if isinstance(p, Local)]))
    return finalists, {"screened": len(screening), "skipped": len(plans) - len(screened),
                       "feasible_in_screening": len(feasible), "finalists": finalists}


def _cell_job(bed: Testbed, name: str, plan: Plan | None, level: float, slo: SLO,
              samples: Samples, limit: int, cutoff: bool = False) -> Any:
    return lambda: _run_cell(bed, name, plan, level, slo, samples, limit, cutoff=cutoff)


def _predictions(policy: Policy, config: Config, level: float, slo: SLO,
                 plans: list[Plan]) -> tuple[dict[str, float], dict[str, float]]:
    """Per plan: (profiled accuracy, latency predicted with the level's true link)."""
    true_links = {tier: LinkEstimator(config.link(tier).model_copy(
        update={"bandwidth_up": level})).snapshot() for tier in config.sites()}
    predicted = policy.predict(slo, PlanningState(links=true_links))
    return ({plan.describe(): predicted[plan][1] for plan in plans},
            {plan.describe(): predicted[plan][0] for plan in plans})


def run_bench_bandwidth(config: Config, out_dir: Path, settings: SweepSettings,
                        link_mode: str = "emulated", console: Console | None = None,
                        workload: str = "fashion-mnist") -> list[dict[str, Any]]:
    console = console or Console()
    setup = load_workload(workload, config, console)
    config = setup.config
    if settings.deadline_ms is None:
        settings.deadline_ms = setup.bench_deadline_ms
    if settings.min_accuracy is None:
        settings.min_accuracy = setup.bench_floor
    slo = SLO(settings.deadline_ms, settings.min_accuracy)
    samples = setup.samples(settings.images + 1)  # the last one warms up, uncounted
    statics = static_plans(config, slo, models=(setup.device, setup.edge, setup.cloud))
    policy = full_policy(config)
    oracle_plans = list(dict.fromkeys(policy.plans_for(slo.min_accuracy)))
    rows: list[dict[str, Any]] = []
    oracle_notes: dict[str, Any] = {}
    started = time.monotonic()
    with testbed(config, link_mode) as bed, Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), console=console, transient=True,
    ) as progress:
        parallel = bed.tc is None  # under tc every client shares the kernel's link
        task = progress.add_task("bandwidth sweep", total=len(settings.levels))
        for level in sorted(settings.levels, reverse=True):
            rate = format_rate(level)
            progress.update(task, description=f"bandwidth sweep: {rate} oracle screening")
            accuracy, predicted = _predictions(policy, config, level, slo, oracle_plans)
            finalists, notes = _oracle_finalists(bed, level, slo, samples, settings,
                                                 accuracy, predicted, oracle_plans, parallel)
            # the strategies and the oracle's finalists side by side, under the same load
            progress.update(task, description=f"bandwidth sweep: {rate} strategies")
            by_name = {p.describe(): p for p in oracle_plans}
            jobs = {name: _cell_job(bed, name, None if name == ADAPTIVE else statics[name],
                                    level, slo, samples, settings.images)
                    for name in STRATEGIES}
            jobs |= {f"{ORACLE}:{name}": _cell_job(bed, name, by_name[name], level, slo,
                                                   samples, settings.images)
                     for name in finalists}
            # all at once (not 8 at a time): a cell's device compute and its energy cost
            # depend on the load, and the oracle must be measured under the strategies'
            runs = _in_parallel(jobs) if parallel else {n: j() for n, j in jobs.items()}
            finals = {name: runs.pop(f"{ORACLE}:{name}") for name in finalists}
            chosen = _best(finals, slo, accuracy)[0][0]
            runs[ORACLE] = finals[chosen]
            runs[ORACLE].strategy = ORACLE
            oracle_notes[rate] = {**notes, "chosen": chosen}
            for name in (*STRATEGIES, ORACLE):
                row = runs[name].summary()
                row["bandwidth_up_bytes_per_s"] = level
                rows.append(row)
            progress.advance(task)
        decision_us = decision_time_us(bed, slo)
        links_text = bed.describe_links()
    elapsed = time.monotonic() - started
    low, high = format_rate(min(settings.levels)), format_rate(max(settings.levels))
    emulated = [*compute_labels(config), *(
        f"link device->{tier}: uplink swept {low}..{high}, downlink "
        f"{format_rate(config.link(tier).bandwidth_down)}, RTT {config.link(tier).rtt_ms:g} ms"
        for tier in config.sites()), f"links {links_text}"]
    report = BenchReport("bandwidth", out_dir, emulated, console=console)
    from tierwise.bench.findings import knees, plot_findings

    measured_knees = knees(rows)
    report.write({
        "workload": workload, "quality": setup.quality, "quality_note": setup.quality_note,
        "requests": samples.source, "link_mode": link_mode,
        "slo": {"deadline_ms": settings.deadline_ms, "min_quality": settings.min_accuracy},
        "settings": settings.__dict__, "elapsed_s": elapsed,
        "targets": targets(rows, decision_us), "knees": measured_knees,
        "strategies": {name: plan.describe() for name, plan in statics.items()},
        "oracle": oracle_notes, "rows": rows})
    ordered = sorted(rows, key=lambda r: (-r["bandwidth_up_bytes_per_s"], r["strategy"]))
    report.table(ordered, columns(setup.quality),
                 title=f"bandwidth sweep ({workload}): deadline {settings.deadline_ms:g} ms, "
                       f"{setup.quality} floor {settings.min_accuracy:.1%}",
                 notes=[f"Requests: {samples.source}; every strategy answers each of them at "
                        "every level.", setup.quality_note.capitalize() + ".",
                        "Static plans: " + "; ".join(f"{name} = {plan.describe()}"
                                                     for name, plan in statics.items())])
    plot_sweep(report, rows, settings, setup.quality)
    plot_findings(report, rows, settings, setup.quality, measured_knees)
    print_targets(console, rows, decision_us)
    report.say_written()
    return rows


def decision_time_us(bed: Testbed, slo: SLO, repeats: int = 5000) -> dict[str, float]:
    """The policy's decision alone, on a quiet process: p50 and p99 over `repeats` calls with
    estimates learned from real transfers (the in-sweep figures include GIL contention)."""
    with bed.client(bed.links(bed.config.link("cloud").bandwidth_up), probe=False) as client:
        client.probe_now()
        client.decide(slo)
        times = [client.decide(slo).decision_us for _ in range(repeats)]
        candidates = len(client.policy().candidates)
    return {"p50": float(np.percentile(times, 50)), "p99": float(np.percentile(times, 99)),
            "candidates": candidates}


def targets(rows: list[dict[str, Any]], decision_us: dict[str, float]) -> dict[str, Any]:
    """The issue's targets, per level: adaptive's cost against the oracle's, and misses."""
    by = {(r["strategy"], r["bandwidth_up_bytes_per_s"]): r for r in rows}
    levels = sorted({r["bandwidth_up_bytes_per_s"] for r in rows})
    per_level = []
    for level in levels:
        adaptive, oracle = by[(ADAPTIVE, level)], by[(ORACLE, level)]
        per_level.append({
            "bandwidth_up_bytes_per_s": level,
            "cost_ratio_to_oracle": adaptive["cost_usd_per_1m"]
            / max(oracle["cost_usd_per_1m"], 1e-12),
            "adaptive_miss_rate": adaptive["deadline_miss_rate"],
            "oracle_miss_rate": oracle["deadline_miss_rate"],
            "adaptive_accuracy": adaptive["accuracy"],
            "oracle_accuracy": oracle["accuracy"],
            "adaptive_main_plan": next(iter(adaptive["plans"]), None),
            "oracle_plan": next(iter(oracle["plans"]), None),
        })
    in_sweep = [r["decision_us_p50"] for r in rows if "decision_us_p50" in r]
    return {"per_level": per_level, "decision_us": decision_us,
            "decision_us_p50_in_sweep": float(np.median(in_sweep)) if in_sweep else None}


def _rate(value: float) -> str:
    return format_rate(value)


def columns(quality: str) -> list[Column]:
    return [Column("strategy", "strategy", left=True),
            Column("bandwidth_up_bytes_per_s", "uplink", _rate),
            Column("accuracy", quality, "{:.2%}"),
            Column("quality_ci", "95% CI", lambda ci: f"{ci[0]:.0%}–{ci[1]:.0%}"),
            Column("latency_p50_ms", "p50 ms", "{:.1f}"),
            Column("latency_p95_ms", "p95 ms", "{:.1f}"),
            Column("deadline_miss_rate", "missed", "{:.1%}"),
            Column("bytes_up_per_inference", "B up/inf", "{:,.0f}"),
            Column("cost_usd_per_1m", "$ per 1M", "{:.4f}"),
            Column("requests", "n", "{}")]


def print_targets(console: Console, rows: list[dict[str, Any]],
                  decision_us: dict[str, float]) -> None:
    summary = targets(rows, decision_us)
    for level in summary["per_level"]:
        console.print(f"{format_rate(level['bandwidth_up_bytes_per_s'])}: adaptive cost "
                      f"{level['cost_ratio_to_oracle']:.2f}x the oracle's, missed "
                      f"{level['adaptive_miss_rate']:.1%} vs {level['oracle_miss_rate']:.1%}, "
                      f"quality {level['adaptive_accuracy']:.1%} vs "
                      f"{level['oracle_accuracy']:.1%}")
    console.print(f"decision time ({decision_us['candidates']:.0f} candidate plans): p50 "
                  f"{decision_us['p50']:.0f} µs, p99 {decision_us['p99']:.0f} µs")


def plot_sweep(report: BenchReport, rows: list[dict[str, Any]], settings: SweepSettings,
               quality: str) -> None:
    panels = (("accuracy", quality, settings.min_accuracy),
              ("latency_p95_ms", "p95 latency (ms, log)", settings.deadline_ms),
              ("cost_usd_per_1m", "cost per 1M inferences (USD, log)", None))
    styles = {ADAPTIVE: {"linewidth": 3, "color": "black"},
              ORACLE: {"linestyle": "--", "color": "grey", "linewidth": 2}}
    with report.figure("bandwidth.png", ncols=3, size=(16, 5),
                       title=f"tierwise bench bandwidth: every strategy on the same "
                             f"{settings.images} requests per level") as (_, axes):
        for axis, (key, title, line) in zip(axes, panels, strict=True):
            for name in (*STRATEGIES, ORACLE):
                points = sorted((r["bandwidth_up_bytes_per_s"], r[key]) for r in rows
                                if r["strategy"] == name)
                x, y = zip(*points, strict=True)
                axis.plot(x, y, marker="o", label=name, **styles.get(name, {}))
            if line is not None:
                axis.axhline(line, color="red", linestyle=":", linewidth=1,
                             label="floor" if key == "accuracy" else "deadline")
            axis.set_xscale("log")
            if key != "accuracy":
                axis.set_yscale("log")
            axis.set_xlabel("uplink bandwidth (bytes/s, log)")
            axis.set_title(title)
            axis.grid(True, which="both", alpha=0.3)
        axes[0].legend(fontsize=8)
