"""`tierwise bench serve --engine ray`: the single-process server and Ray Serve side by side.

One run, on this machine, of the same model, requests and closed-loop load generator as
`tierwise bench serve` (`tierwise.bench.serve.run_load`):

1. The single-process server (`--engine process`) and a Ray Serve server with one replica
   run at the same time; each concurrency level is measured on both, interleaved (process,
   then Ray), so drifting background load hits both alike.
2. The Ray server is started again with autoscaling from 1 to 2 replicas: the highest
   level's load starts, and the time until Ray Serve runs the second replica is the time to
   scale up. Each level is then measured on both servers again with two replicas.

Reported per server and level: requests/s, p50/p99; per server: start-up time (process
start to ready) and memory (resident set of the process server, of each replica, and of
Ray's own processes: GCS, raylet, controller, proxy). Ratios are taken within one phase.
Each Ray server runs its own local Ray instance, in its own temporary directory.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from tierwise.bench.harness import BenchReport, Column
from tierwise.bench.processes import free_port, tier_server
from tierwise.bench.serve import (
    check_answers,
    child_pid_on_port,
    concurrency_levels,
    encode_http_requests,
    load_samples,
    run_load,
)
from tierwise.config import Config, write_config

REPLICA_MARKER = b"ServeReplica:tierwise-edge"


@dataclass
class Engine:
    """One server under test."""

    name: str  # "process", "ray ×1", "ray ×2"
    url: str
    start_s: float  # process start to ready
    pid: int | None
    log: Path | None = None
    temp_dir: str = ""  # its Ray instance's


def _rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _pids_with(marker: bytes) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if marker in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
    return pids


def memory(engine: Engine) -> dict[str, Any]:
    """Resident memory (MiB): the server process, and on Ray each replica and Ray's other
    processes of this instance (found by its temporary directory on their command lines)."""
    own = _rss_mib(engine.pid) if engine.pid else 0.0
    if not engine.temp_dir:
        return {"server_mib": own}
    replicas = _pids_with(REPLICA_MARKER)  # their titles replace their command lines
    replica_mib = [_rss_mib(pid) for pid in replicas]
    ray_pids = set(_pids_with(engine.temp_dir.encode())) - set(replicas) - {engine.pid or -1}
    others = sum(_rss_mib(pid) for pid in ray_pids)
    return {"server_mib": own, "replica_mib": replica_mib, "ray_processes_mib": others}


def _replicas(log: Path) -> list[tuple[int, float]]:
    return [(int(n), float(at)) for n, at in re.findall(
        r"^replicas: (\d+) running at \+([\d.]+) s", log.read_text(), re.M)]


@contextlib.contextmanager
def ray_server(config: Config, models_dir: Path, out: Path, name: str, min_replicas: int,
               max_replicas: int, flags: list[str]) -> Iterator[Engine]:
    """`tierwise serve --engine ray` with its own local Ray instance."""
    config = config.model_copy(deep=True)
    edge = config.tiers["edge"]
    edge.engine = "ray"
    edge.ray = edge.ray.model_copy(update={
        "min_replicas": min_replicas, "max_replicas": max_replicas, "num_cpus": 0.5,
        "upscale_delay_s": 1.0, "downscale_delay_s": 3600.0,
        "metrics_interval_s": 0.5, "look_back_period_s": 2.0})
    temp_dir = tempfile.mkdtemp(prefix="tw-ray-", dir="/tmp")
    path = write_config(config, Path(temp_dir) / "tierwise.toml")
    log = out / f"serve-{name.replace(' ', '').replace('×', 'x')}.log"
    port = free_port()
    env_before = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = temp_dir  # ray.init's temporary directory, for `memory`
    started = time.monotonic()
    try:
        with tier_server("edge", models_dir, port=port, config_path=str(path), log_path=log,
                         extra_args=flags, ready_timeout_s=300) as url:
            yield Engine(name, url, time.monotonic() - started, child_pid_on_port(port), log,
                         temp_dir)
    finally:
        if env_before is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = env_before
        shutil.rmtree(temp_dir, ignore_errors=True)


def _time_to_scale_up(engine: Engine, host: str, port: int, encoded: list[bytes],
                      level: int, limit_s: float = 120.0) -> float | None:
    """Seconds from the start of `level` clients' load until the server prints that a
    second replica runs; None after `limit_s`."""
    assert engine.log is not None
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            run_load(host, port, encoded, engine.name, "binary", level, 0.5, 0.0)

    started = time.monotonic()
    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    try:
        while time.monotonic() - started < limit_s:
            if any(n >= 2 for n, _ in _replicas(engine.log)):
                return time.monotonic() - started
            time.sleep(0.05)
        return None
    finally:
        stop.set()
        thread.join(timeout=30)


COLUMNS = [
    Column("phase", "phase (Ray replicas)", left=True),
    Column("engine", "engine", left=True),
    Column("concurrency", "clients"),
    Column("requests_per_s", "req/s", "{:,.0f}"),
    Column("latency_p50_ms", "p50 ms", "{:.2f}"),
    Column("latency_p99_ms", "p99 ms", "{:.2f}"),
    Column("vs_process", "req/s ÷ process", "{:.2f}×"),
    Column("errors", "errors"),
]


def run_bench_engines(config: Config, args: argparse.Namespace) -> None:
    """Write results.json, table.md and bench-engines.png to `args.out`."""
    from tierwise.runtime.session import load_models

    console = Console()
    levels = concurrency_levels(args.concurrency)
    model = "fmnist-edge"
    models_dir = Path(args.models) if getattr(args, "models", None) else config.models_dir
    if not (models_dir / model).is_dir():
        raise SystemExit(f"error: {models_dir / model}: no such model to serve; train it "
                         "(`tierwise zoo train --only edge`) or pass --models")
    threads = getattr(args, "threads", None) or 1
    edge = config.tiers["edge"]
    batch = getattr(args, "max_batch_size", None)
    config = config.model_copy(deep=True)
    config.tiers["edge"] = edge.model_copy(update={
        "compute_scale": getattr(args, "compute_scale", 1.0),
        "max_batch_size": int(batch) if batch is not None and str(batch).isdigit()
        else edge.max_batch_size})
    flags = ["--threads", str(threads), "--compute-scale",
             str(config.tiers["edge"].compute_scale), "--max-batch-size",
             str(config.tiers["edge"].max_batch_size)]
    local = load_models(models_dir, threads=threads, names=[model])[model]
    samples, source = load_samples("fashion-mnist", config, local.info)
    expected = local.run(samples[0])
    out = Path(getattr(args, "out", None) or "reports/bench-serve-ray")
    out.mkdir(parents=True, exist_ok=True)
    from tierwise.client.client import compute_labels

    report = BenchReport("serve-engines", out,
                         [label for label in compute_labels(config) if label.startswith("edge")],
                         console=console)
    warmup_s = min(1.0, 0.2 * args.duration_s)
    rows: list[dict[str, Any]] = []
    engines: list[dict[str, Any]] = []
    scale_up: dict[str, Any] = {}

    def measure(phase: str, pair: list[Engine], progress: Progress) -> None:
        endpoints = []
        for engine in pair:
            parts = urlsplit(engine.url)
            host, port = parts.hostname or "127.0.0.1", parts.port or 80
            encoded = encode_http_requests(host, port, model, samples, "binary")
            check_answers(host, port, encoded, expected)
            endpoints.append((engine, host, port, encoded))
        task = progress.add_task(phase, total=len(levels) * len(pair))
        for level in levels:
            by_engine = {}
            for engine, host, port, encoded in endpoints:
                progress.update(task, description=f"{phase}: {engine.name} x {level}")
                result = run_load(host, port, encoded, engine.name, "binary", level,
                                  args.duration_s, warmup_s)
                by_engine[engine.name] = result
                progress.advance(task)
            base = by_engine["process"].requests_per_s
            for name, result in by_engine.items():
                rows.append({"phase": phase, "engine": name, **asdict(result),
                             "vs_process": result.requests_per_s / base if base else None})

    with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        starting = progress.add_task("starting the process server", total=None)
        port = free_port()
        started = time.monotonic()
        with tier_server("edge", models_dir, port=port, extra_args=flags) as url:
            process = Engine("process", url, time.monotonic() - started,
                             child_pid_on_port(port))
            engines.append({"engine": "process", "start_s": process.start_s,
                            **memory(process)})
            progress.update(starting, description="starting Ray Serve, 1 replica")
            with ray_server(config, models_dir, out, "ray ×1", 1, 1, flags) as one:
                engines.append({"engine": one.name, "start_s": one.start_s, **memory(one)})
                progress.remove_task(starting)
                measure("1 replica", [process, one], progress)
            starting = progress.add_task("starting Ray Serve, autoscaling 1..2", total=None)
            with ray_server(config, models_dir, out, "ray ×2", 1, 2, flags) as two:
                progress.remove_task(starting)
                parts = urlsplit(two.url)
                host, port = parts.hostname or "127.0.0.1", parts.port or 80
                encoded = encode_http_requests(host, port, model, samples, "binary")
                scale_up = {"level": max(levels),
                            "seconds": _time_to_scale_up(two, host, port, encoded, max(levels))}
                engines.append({"engine": two.name, "start_s": two.start_s, **memory(two)})
                measure("2 replicas", [process, two], progress)

    _write(report, rows, engines, scale_up, levels, source, args, threads,
           config.tiers["edge"].max_batch_size)


def _write(report: BenchReport, rows: list[dict[str, Any]], engines: list[dict[str, Any]],
           scale_up: dict[str, Any], levels: list[int], source: str,
           args: argparse.Namespace, threads: int, max_batch_size: int) -> None:
    cpus = os.cpu_count()
    one = {row["concurrency"]: row for row in rows if row["engine"] == "ray ×1"}
    two = {row["concurrency"]: row for row in rows if row["engine"] == "ray ×2"}
    scaling = {level: two[level]["requests_per_s"] / one[level]["requests_per_s"]
               for level in levels if level in one and level in two
               and one[level]["requests_per_s"]}
    overhead = {row["concurrency"]: row["latency_p50_ms"] - process["latency_p50_ms"]
                for row in rows if row["engine"] == "ray ×1"
                for process in rows if process["engine"] == "process"
                and process["phase"] == row["phase"]
                and process["concurrency"] == row["concurrency"]}
    notes = [
        f"Machine: {cpus} CPUs; fmnist-edge, binary tensors ({source}); closed loop, "
        f"{args.duration_s:g} s per run after a warm-up; ONNX Runtime threads {threads}; "
        f"max_batch_size {max_batch_size} in the process server and in each replica.",
        "Start-up (process start to ready) and resident memory: " + "; ".join(
            f"{e['engine']} {e['start_s']:.1f} s, server {e['server_mib']:.0f} MiB"
            + (f", replicas {[round(m) for m in e['replica_mib']]} MiB, Ray's own "
               f"processes {e['ray_processes_mib']:.0f} MiB" if "replica_mib" in e else "")
            for e in engines) + ".",
        f"Time to scale up from 1 to 2 replicas under {scale_up.get('level')} clients: "
        + (f"{scale_up['seconds']:.1f} s (upscale_delay_s 1, metrics every 0.5 s)."
           if scale_up.get("seconds") is not None else "did not happen within 120 s."),
        "Throughput with 2 replicas ÷ 1 replica (Ray): " + ", ".join(
            f"{level} clients {ratio:.2f}×" for level, ratio in scaling.items()) + ".",
        "Added latency per request through Ray Serve, p50 with 1 replica minus the "
        "process server's in the same phase: " + ", ".join(
            f"{level} clients {ms:+.2f} ms" for level, ms in overhead.items()) + ".",
    ]
    title = f"tierwise bench serve --engine ray: process vs Ray Serve on {cpus} CPUs"
    report.table(rows, COLUMNS, title=title, notes=notes)
    for note in notes:
        report.console.print(f"- {note}", highlight=False)
    with report.figure("bench-engines.png", ncols=2, title=title) as (_, axes):
        for name in ("process", "ray ×1", "ray ×2"):
            for phase in ("1 replica", "2 replicas"):
                series = [row for row in rows if row["engine"] == name
                          and row["phase"] == phase]
                if not series:
                    continue
                label = f"{name} ({phase})"
                axes[0].plot([r["concurrency"] for r in series],
                             [r["requests_per_s"] for r in series], marker="o", label=label)
                axes[1].plot([r["concurrency"] for r in series],
                             [r["latency_p99_ms"] for r in series], marker="o", label=label)
        for axis, ylabel in zip(axes, ("requests/s", "p99 latency (ms)"), strict=True):
            axis.set_xscale("log", base=2)
            axis.set_xlabel("concurrent clients")
            axis.set_ylabel(ylabel)
            axis.legend(fontsize=7)
    report.write({"levels": levels, "duration_s": args.duration_s, "cpus": cpus,
                  "threads": threads, "engines": engines, "scale_up": scale_up,
                  "scaling_2_over_1": scaling, "ray_added_p50_ms": overhead,
                  "rows": rows, "notes": notes})
    report.say_written()
