"""`tierwise bench durability`: what durable telemetry costs an inference.

A device records every inference's trace; the telemetry thread commits what was recorded to
the outbox on disk within `telemetry.commit_s` (group commit), so a killed device loses at
most that much. This bench answers the same Fashion-MNIST test images on the device model
with telemetry off and on (the collector unreachable, so every trace stays in the outbox and
every commit is real), in interleaved blocks so drifting host load hits both alike, and
reports each mode's per-inference latency (p50, mean, p99) and, with telemetry on, how many
traces each commit carried. Results go to `reports/bench-durability/`.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from tierwise.bench.harness import BenchReport, Column
from tierwise.bench.processes import free_port
from tierwise.config import Config
from tierwise.data import load_splits
from tierwise.planner.plans import Local

MODEL = "fmnist-device"
BLOCK = 100  # requests per block; the modes alternate block by block


def run_bench_durability(config: Config, out_dir: Path, requests: int,
                         console: Console | None = None) -> dict[str, Any]:
    from tierwise.client import Client

    console = console or Console()
    if not (config.models_dir / MODEL).is_dir():
        raise SystemExit(f"error: {config.models_dir / MODEL}: no such model; train the zoo "
                         "first (`tierwise zoo train`, or `make demo`)")
    images = load_splits(config.data.path, config.data.validation_size, config.data.seed).test_x
    latencies: dict[str, list[float]] = {"off": [], "on": []}
    with tempfile.TemporaryDirectory() as scratch:
        on_config = config.model_copy(deep=True)
        on_config.data_dir = scratch  # the outbox lives here; the models stay where they are
        on_config.registry.token = "bench"  # the collector never answers: no token needed
        unreachable = f"http://127.0.0.1:{free_port()}"
        off = Client(config, plan=Local(MODEL), probe=False, collector_url="")
        on = Client(on_config, models_dir=config.models_dir, plan=Local(MODEL), probe=False,
                    collector_url=unreachable, device_id="bench-durability")
        with off, on, Progress(TextColumn("{task.description}"), BarColumn(),
                               TimeElapsedColumn(), console=console, transient=True) as bar:
            assert on.telemetry is not None
            for client in (off, on):  # warm-up: sessions, first runs
                for image in images[:20]:
                    client.infer(image)
            task = bar.add_task("telemetry off / on, alternating blocks", total=2 * requests)
            done = 0
            while done < requests:
                for mode, client in (("off", off), ("on", on)):
                    for image in images[done % len(images):][:BLOCK]:
                        started = time.perf_counter()
                        client.infer(image)
                        latencies[mode].append((time.perf_counter() - started) * 1e3)
                    bar.advance(task, BLOCK)
                done += BLOCK
            on.monitor_drain()
            time.sleep(2 * config.telemetry.commit_s + 0.2)
            backlog = on.telemetry.backlog()
            commits, committed = on.telemetry.commits, on.telemetry.committed
            commit_seconds = on.telemetry.commit_seconds
    rows: list[dict[str, Any]] = []  # table rows, as BenchReport.table takes them
    for mode in ("off", "on"):
        values = np.array(latencies[mode])
        rows.append({"telemetry": mode, "requests": len(values),
                     "p50_ms": float(np.percentile(values, 50)), "mean_ms": float(values.mean()),
                     "p99_ms": float(np.percentile(values, 99))})
    off_row, on_row = rows
    result = {
        "model": MODEL, "requests_per_mode": requests, "block": BLOCK,
        "commit_s": config.telemetry.commit_s, "rows": rows,
        "p50_ratio": on_row["p50_ms"] / off_row["p50_ms"],
        "mean_ratio": on_row["mean_ms"] / off_row["mean_ms"],
        "added_mean_us": (on_row["mean_ms"] - off_row["mean_ms"]) * 1e3,
        "commits": commits, "traces_per_commit": committed / max(commits, 1),
        "commit_ms_mean": commit_seconds / max(commits, 1) * 1e3,
        "commit_us_per_trace": commit_seconds / max(committed, 1) * 1e6,
        "outbox_backlog": backlog,
    }
    report = BenchReport("durability", out_dir, [], console)
    report.write(result)
    report.table(rows, [Column("telemetry", "telemetry", left=True),
                        Column("requests", "requests", "{:,}"),
                        Column("p50_ms", "p50 ms", "{:.3f}"), Column("mean_ms", "mean ms",
                                                                    "{:.3f}"),
                        Column("p99_ms", "p99 ms", "{:.3f}")],
                 title=f"tierwise bench durability: {MODEL} on the device, telemetry off / on",
                 notes=[f"With telemetry on: p50 {result['p50_ratio']:.2f}x, mean "
                        f"{result['mean_ratio']:.2f}x off ({result['added_mean_us']:+.0f} µs "
                        f"per inference); {commits} commits of {result['traces_per_commit']:.1f} "
                        f"traces on average (commit_s {config.telemetry.commit_s:g}), "
                        f"{result['commit_ms_mean']:.1f} ms each, "
                        f"{result['commit_us_per_trace']:.0f} µs per trace, in the commit "
                        "thread, off the request path; "
                        f"{backlog} traces in the outbox at the end (the collector was "
                        "unreachable throughout, so every one stayed on disk).",
                        f"Modes alternate in blocks of {BLOCK} requests on the same images."])
    report.say_written()
    return result
