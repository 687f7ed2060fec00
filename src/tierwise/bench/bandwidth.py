"""`tierwise bench bandwidth`: every strategy across a sweep of uplink bandwidth.

At each level (log-spaced, 1 KB/s to 10 MB/s by default) the device's uplink to both edge and
cloud runs at that rate (downlinks and RTTs as configured), and each strategy classifies the
same test images with its own fresh client and link — strategies run side by side, so one
level's numbers are comparable. A cell stops after `images` requests or `cell_budget_s`
seconds (at least `min_requests`), so the slowest levels stay bounded.

The oracle is the best single static plan per level, chosen after the fact. Every plan the
policy could choose is screened at that level (`oracle_images` each; a request is cut off at
3× the deadline, which already makes it a miss); the four best of the screening and the
local plans are then run in full, side by side with the strategies (same load, same images),
and the best full run is the oracle's:
the cheapest that missed no deadline (≤ 2%) and whose profiled accuracy meets the floor,
else the one that misses least. Plans whose latency, predicted with the level's true link,
is over 1.5× the deadline, or whose profiled accuracy misses the floor, are not screened:
they cannot be its choice (when no plan is left, the eight fastest are).

Writes results.json (one row per strategy and level), table.md, and bandwidth.png
(accuracy, p95 latency and cost against bandwidth).
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from tierwise.bench.network import (
    ADAPTIVE,
    ORACLE,
    REMOTE_TIERS,
    STRATEGIES,
    Run,
    Testbed,
    full_policy,
    static_plans,
    testbed,
)
from tierwise.client.client import compute_labels
from tierwise.config import Config, format_rate
from tierwise.data import load_splits
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
    min_requests: int = 10
    cell_budget_s: float = 8.0
    oracle_images: int = 60
    deadline_ms: float = 100.0
    min_accuracy: float = 0.93


def log_levels(low: float, high: float, count: int) -> list[float]:
    return [float(x) for x in np.geomspace(low, high, count)]


def _run_cell(bed: Testbed, strategy: str, plan: Plan | None, level: float, slo: SLO,
              images: np.ndarray, labels: np.ndarray, settings: SweepSettings,
              budget_s: float, limit: int, cutoff: bool = False) -> Run:
    """One strategy at one level, on a fresh client and link."""
    run = Run(strategy)
    links = bed.links(level)
    with bed.client(links, probe=plan is None) as client:
        if cutoff:
            client.timeout_s = CUTOFF_DEADLINES * slo.deadline_ms / 1e3
        if plan is None:
            client.probe_now()  # what an app does at start: know its links
            run.probe_bytes_up = -client.prober.totals.bytes_up  # type: ignore[union-attr]
            run.probe_cost_usd = -client.prober.totals.cost_usd  # type: ignore[union-attr]
        # one request first, not counted: connection set-up and the server's first run of a
        # model are start-up costs, the same for every strategy
        for warm_up in (plan, plan.then) if isinstance(plan, Cascade) else (plan,):
            client.infer(images[-1], warm_up, deadline_ms=slo.deadline_ms,
                         min_accuracy=slo.min_accuracy)
        started = time.monotonic()
        for index in range(min(limit, len(images) - 1)):
            if index >= settings.min_requests and time.monotonic() - started > budget_s:
                break
            if cutoff and index >= 3 and all(run.missed):
                break  # three misses in a row at the start: this plan cannot win here
            result = client.infer(images[index], plan, deadline_ms=slo.deadline_ms,
                                  min_accuracy=slo.min_accuracy)
            run.add(result, int(labels[index]))
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


def _oracle_finalists(bed: Testbed, level: float, slo: SLO, images: np.ndarray,
                      labels: np.ndarray, settings: SweepSettings,
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
                                                  level, slo, images, labels, settings,
                                                  settings.oracle_images, cutoff=True)
                          for p in screened}, parallel)
    ranked, feasible = _best(screening, slo, profiled_accuracy)
    # the local plans too: where the network fails every remote plan, one of them is best
    finalists = list(dict.fromkeys(ranked[:ORACLE_FINALISTS] + [
        p.describe() for p in plans if isinstance(p, Local)]))
    return finalists, {"screened": len(screening), "skipped": len(plans) - len(screened),
                       "feasible_in_screening": len(feasible), "finalists": finalists}


def _cell_job(bed: Testbed, name: str, plan: Plan | None, level: float, slo: SLO,
              images: np.ndarray, labels: np.ndarray, settings: SweepSettings, limit: int,
              cutoff: bool = False) -> Any:
    return lambda: _run_cell(bed, name, plan, level, slo, images, labels, settings,
                             settings.cell_budget_s, limit, cutoff=cutoff)


def _predictions(policy: Policy, config: Config, level: float, slo: SLO,
                 plans: list[Plan]) -> tuple[dict[str, float], dict[str, float]]:
    """Per plan: (profiled accuracy, latency predicted with the level's true link)."""
    true_links = {tier: LinkEstimator(config.link(tier).model_copy(
        update={"bandwidth_up": level})).snapshot() for tier in REMOTE_TIERS}
    predicted = policy.predict(slo, PlanningState(links=true_links))
    return ({plan.describe(): predicted[plan][1] for plan in plans},
            {plan.describe(): predicted[plan][0] for plan in plans})


def run_bench_bandwidth(config: Config, out_dir: Path, settings: SweepSettings,
                        link_mode: str = "emulated", console: Console | None = None
                        ) -> list[dict[str, Any]]:
    from tierwise.profile.profiler import ensure_profiles
    from tierwise.zoo.build import ensure_zoo

    console = console or Console()
    ensure_zoo(config, console=console)
    ensure_profiles(config, console=console)
    slo = SLO(settings.deadline_ms, settings.min_accuracy)
    splits = load_splits(config.data.path, config.data.validation_size, config.data.seed)
    images, labels = splits.test_x[:settings.images], splits.test_y[:settings.images]
    statics = static_plans(config, slo)
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
            finalists, notes = _oracle_finalists(bed, level, slo, images, labels, settings,
                                                 accuracy, predicted, oracle_plans, parallel)
            # the strategies and the oracle's finalists side by side, under the same load
            progress.update(task, description=f"bandwidth sweep: {rate} strategies")
            by_name = {p.describe(): p for p in oracle_plans}
            jobs = {name: _cell_job(bed, name, None if name == ADAPTIVE else statics[name],
                                    level, slo, images, labels, settings, settings.images)
                    for name in STRATEGIES}
            jobs |= {f"{ORACLE}:{name}": _cell_job(bed, name, by_name[name], level, slo,
                                                   images, labels, settings, settings.images)
                     for name in finalists}
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
    elapsed = time.monotonic() - started
    low, high = format_rate(min(settings.levels)), format_rate(max(settings.levels))
    labels_emulated = [*compute_labels(config), *(
        f"link device->{tier}: uplink swept {low}..{high}, downlink "
        f"{format_rate(config.link(tier).bandwidth_down)}, RTT {config.link(tier).rtt_ms:g} ms"
        for tier in REMOTE_TIERS), f"links {bed.describe_links()}"]
    write_results(out_dir, rows, settings, labels_emulated, oracle_notes, elapsed, link_mode,
                  decision_us)
    print_table(console, rows, settings, labels_emulated, out_dir, decision_us)
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


def write_results(out_dir: Path, rows: list[dict[str, Any]], settings: SweepSettings,
                  emulated: list[str], oracle_notes: dict[str, Any], elapsed_s: float,
                  link_mode: str, decision_us: dict[str, float]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    document = {
        "benchmark": "bandwidth", "link_mode": link_mode, "emulated": emulated,
        "slo": {"deadline_ms": settings.deadline_ms, "min_accuracy": settings.min_accuracy},
        "settings": settings.__dict__, "elapsed_s": elapsed_s,
        "targets": targets(rows, decision_us), "oracle": oracle_notes, "rows": rows,
    }
    (out_dir / "results.json").write_text(json.dumps(document, indent=1) + "\n")
    (out_dir / "table.md").write_text(markdown_table(rows, emulated))
    plot_sweep(out_dir / "bandwidth.png", rows, settings, emulated)


COLUMNS = (("strategy", "strategy", "{}"), ("bandwidth_up_bytes_per_s", "uplink", None),
           ("accuracy", "accuracy", "{:.2%}"), ("latency_p50_ms", "p50 ms", "{:.1f}"),
           ("latency_p95_ms", "p95 ms", "{:.1f}"), ("deadline_miss_rate", "missed", "{:.1%}"),
           ("bytes_up_per_inference", "B up/inf", "{:,.0f}"),
           ("cost_usd_per_1m", "$ per 1M", "{:.4f}"), ("requests", "n", "{}"))


def _cells(row: dict[str, Any]) -> list[str]:
    return [format_rate(row[key]) if fmt is None else fmt.format(row[key])
            for key, _, fmt in COLUMNS]


def markdown_table(rows: list[dict[str, Any]], emulated: list[str]) -> str:
    lines = ["| " + " | ".join(title for _, title, _ in COLUMNS) + " |",
             "|" + "---|" * len(COLUMNS)]
    ordered = sorted(rows, key=lambda r: (-r["bandwidth_up_bytes_per_s"], r["strategy"]))
    lines += ["| " + " | ".join(_cells(row)) + " |" for row in ordered]
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {label}" for label in emulated) + "\n"


def print_table(console: Console, rows: list[dict[str, Any]], settings: SweepSettings,
                emulated: list[str], out_dir: Path, decision_us: dict[str, float]) -> None:
    table = Table(title=f"bandwidth sweep: deadline {settings.deadline_ms:g} ms, accuracy "
                        f"floor {settings.min_accuracy:.1%}")
    for _, title, _ in COLUMNS:
        table.add_column(title)
    for row in sorted(rows, key=lambda r: (-r["bandwidth_up_bytes_per_s"], r["strategy"])):
        table.add_row(*_cells(row))
    console.print(table)
    for label in emulated:
        console.print(f"[yellow]{label}[/]")
    summary = targets(rows, decision_us)
    for level in summary["per_level"]:
        console.print(f"{format_rate(level['bandwidth_up_bytes_per_s'])}: adaptive cost "
                      f"{level['cost_ratio_to_oracle']:.2f}x the oracle's, missed "
                      f"{level['adaptive_miss_rate']:.1%} vs {level['oracle_miss_rate']:.1%}")
    console.print(f"decision time ({decision_us['candidates']:.0f} candidate plans): p50 "
                  f"{decision_us['p50']:.0f} µs, p99 {decision_us['p99']:.0f} µs; written to "
                  f"{out_dir}")


def plot_sweep(path: Path, rows: list[dict[str, Any]], settings: SweepSettings,
               emulated: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("accuracy", "accuracy", settings.min_accuracy),
              ("latency_p95_ms", "p95 latency (ms, log)", settings.deadline_ms),
              ("cost_usd_per_1m", "cost per 1M inferences (USD, log)", None))
    figure, axes = plt.subplots(1, 3, figsize=(16, 5))
    styles = {ADAPTIVE: {"linewidth": 3, "color": "black"},
              ORACLE: {"linestyle": "--", "color": "grey", "linewidth": 2}}
    for axis, (key, title, line) in zip(axes, panels, strict=True):
        for name in (*STRATEGIES, ORACLE):
            points = sorted((r["bandwidth_up_bytes_per_s"], r[key], r["requests"]) for r in rows
                            if r["strategy"] == name)
            x, y, n = zip(*points, strict=True)
            line_ = axis.plot(x, y, marker="o", label=name, **styles.get(name, {}))[0]
            # hollow: the cell's time budget ran out before every image (a small sample)
            short = [i for i, count in enumerate(n) if count < settings.images - 1]
            axis.scatter([x[i] for i in short], [y[i] for i in short], s=60, zorder=3,
                         facecolors="white", edgecolors=line_.get_color())
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
    figure.suptitle("tierwise bench bandwidth — " + "; ".join(emulated)
                    + "\nhollow markers: the cell's time budget ended it early (fewer images)",
                    fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
