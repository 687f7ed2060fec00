"""`tierwise bench routing`: what a web framework on the inference path would cost.

The cloud serves its control plane (registry, devices, telemetry, dashboard) through
Starlette (`tierwise.cloud`) and OIP inference through the tier server's own hand-written
ASGI, with a prefix check in front (`CloudServer`). This bench measures that choice side by
side: the same cloud app, with the OIP routes instead mounted inside the Starlette app (after
its routes, behind its middleware: errors, readiness, authentication), so every inference
passes Starlette's stack and router before the same `TierServer` answers.

Two server processes serve the same model; a closed-loop load generator sends the same
pre-encoded binary requests to each, at each concurrency, the modes alternating round by
round (the order flipped every round) so drifting host load hits both alike. Results go to
`reports/bench-routing/`: requests/s, p50/p99 latency and server CPU per request per mode,
and their ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from tierwise.bench.harness import BenchReport, Column
from tierwise.bench.processes import tier_server
from tierwise.bench.serve import (
    child_pid_on_port,
    encode_http_requests,
    load_samples,
    run_load,
)
from tierwise.config import Config, load_config

MODES = ("hand-written", "starlette")
MODULE = "tierwise.bench.routing"


class _AllThroughStarlette:
    """The alternative: every HTTP request through the control plane's Starlette app, the
    tier server mounted at / after its routes; the lifespan still runs the tier server's."""

    def __init__(self, server: Any, control: Any) -> None:
        self.server = server
        self.control = control
        self.tier = server.tier

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        app = self.server if scope["type"] == "lifespan" else self.control
        await app(scope, receive, send)


def build_app(mode: str, config: Config, models_dir: Path) -> Any:
    """The cloud's ASGI app as `mode` routes inference."""
    from starlette.routing import Mount

    from tierwise.cloud import control_plane, hosted
    from tierwise.runtime.session import load_repository
    from tierwise.server.app import create_app

    models, unavailable = load_repository(models_dir)
    server = create_app("cloud", config.tier("cloud"), models, unavailable)
    if mode == "hand-written":
        return hosted(server, config)
    control = control_plane(config, server.metrics.registry)
    control.router.routes.append(Mount("/", app=server))
    return _AllThroughStarlette(server, control)


def _serve_main(argv: list[str]) -> None:
    """`python -m tierwise.bench.routing [--config C] serve --mode M ...`: one server."""
    from tierwise.server.app import run

    parser = argparse.ArgumentParser(prog=MODULE)
    parser.add_argument("--config")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve")
    for name in ("--tier", "--host", "--models", "--mode", "--scratch"):
        serve.add_argument(name, required=True)
    serve.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    config = _scratch_config(load_config(args.config), Path(args.scratch))
    run(build_app(args.mode, config, Path(args.models)), args.host, args.port,
        f"{MODULE}: cloud, OIP routed {args.mode}")


def _scratch_config(config: Config, scratch: Path) -> Config:
    """`config` with a throwaway registry (keys made), so the control plane is ready."""
    from tierwise.registry.signing import keygen

    config = config.model_copy(deep=True)
    config.data_dir = str(scratch / "data")
    config.registry.root = str(scratch / "registry")
    config.registry.token = ""
    if not (scratch / "registry" / "keys").is_dir():
        keygen(scratch / "registry" / "keys")
    return config


def run_bench_routing(config: Config, args: argparse.Namespace,
                      console: Console | None = None) -> dict[str, Any]:
    console = console or Console()
    model = args.model
    models_dir = Path(args.models) if args.models else config.models_dir
    if not (models_dir / model).is_dir():
        raise SystemExit(f"error: {models_dir / model}: no such model; train the zoo first "
                         "(`tierwise zoo train`, or `make demo`), or pass --models/--model")
    samples, source = load_samples("fashion-mnist", config, None)
    levels = [int(level) for level in args.concurrency.split(",")]
    results: dict[tuple[str, int], list[Any]] = {(m, c): [] for m in MODES for c in levels}
    with tempfile.TemporaryDirectory() as scratch, contextlib.ExitStack() as stack:
        servers = {}
        for mode in MODES:
            url = stack.enter_context(tier_server(
                "cloud", models_dir, module=MODULE, config_path=getattr(args, "config", None),
                extra_args=["--mode", mode, "--scratch", scratch]))
            port = urlsplit(url).port or 80
            servers[mode] = (port, child_pid_on_port(port))
        total = args.rounds * len(levels) * len(MODES)
        with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                      console=console, transient=True) as bar:
            task = bar.add_task("OIP hand-written / through Starlette, interleaved", total=total)
            for round_ in range(args.rounds):
                order = MODES if round_ % 2 == 0 else MODES[::-1]
                for level in levels:
                    for mode in order:
                        port, pid = servers[mode]
                        requests = encode_http_requests("127.0.0.1", port, model, samples,
                                                        "binary")
                        results[(mode, level)].append(run_load(
                            "127.0.0.1", port, requests, mode, "binary", level,
                            args.duration_s, args.warmup_s, pid))
                        bar.advance(task)
    rows = []
    for level in levels:
        for mode in MODES:
            runs = results[(mode, level)]
            cpu = [run.server_cpu_cores * run.duration_s / run.requests * 1e6
                   for run in runs if run.server_cpu_cores and run.requests]
            rows.append({
                "mode": mode, "concurrency": level,
                "requests": sum(run.requests for run in runs),
                "requests_per_s": float(np.median([run.requests_per_s for run in runs])),
                "p50_ms": float(np.median([run.latency_p50_ms for run in runs])),
                "p99_ms": float(np.median([run.latency_p99_ms for run in runs])),
                "server_cpu_us_per_request": float(np.median(cpu)) if cpu else None,
                "errors": sum(run.errors for run in runs),
            })
    ratios = []
    for level in levels:
        hand, framework = (next(r for r in rows if r["mode"] == m and r["concurrency"] == level)
                           for m in MODES)
        ratios.append({
            "concurrency": level,
            "throughput_ratio": framework["requests_per_s"] / hand["requests_per_s"],
            "p50_ratio": framework["p50_ms"] / hand["p50_ms"],
            "cpu_ratio": framework["server_cpu_us_per_request"] /
            hand["server_cpu_us_per_request"]
            if framework["server_cpu_us_per_request"] and hand["server_cpu_us_per_request"]
            else None})
    result = {"model": model, "samples": source, "rounds": args.rounds,
              "duration_s": args.duration_s, "rows": rows, "ratios": ratios}
    report = BenchReport("routing", Path(args.out), [], console)
    report.write(result)
    notes = [f"{r['concurrency']} clients: through Starlette {r['throughput_ratio']:.2f}x the "
             f"hand-written requests/s, p50 {r['p50_ratio']:.2f}x"
             + (f", server CPU per request {r['cpu_ratio']:.2f}x" if r["cpu_ratio"] else "")
             for r in ratios]
    notes.append(f"Median of {args.rounds} interleaved rounds of {args.duration_s:g} s per "
                 f"mode and concurrency; {source}; binary tensor payloads; model {model}; "
                 "the server and the load generator share this host's cores.")
    report.table(rows, [Column("mode", "OIP routed", left=True),
                        Column("concurrency", "clients"),
                        Column("requests_per_s", "requests/s", "{:,.0f}"),
                        Column("p50_ms", "p50 ms", "{:.2f}"), Column("p99_ms", "p99 ms", "{:.2f}"),
                        Column("server_cpu_us_per_request", "server CPU µs/request", "{:.0f}"),
                        Column("errors", "errors")],
                 title="tierwise bench routing: OIP inference hand-written vs through Starlette",
                 notes=notes)
    with report.figure("routing.png", title="OIP inference: hand-written ASGI vs through "
                       "Starlette") as (_, axis):
        width = 0.38
        for offset, mode in zip((-width / 2, width / 2), MODES, strict=True):
            values = [next(r["requests_per_s"] for r in rows if r["mode"] == mode and
                           r["concurrency"] == level) for level in levels]
            axis.bar(np.arange(len(levels)) + offset, values, width, label=mode)
        axis.set_xticks(np.arange(len(levels)), [f"{level} clients" for level in levels])
        axis.set_ylabel("requests/s (median of rounds)")
        axis.legend()
    report.say_written()
    return result


if __name__ == "__main__":
    import sys

    _serve_main(sys.argv[1:])
