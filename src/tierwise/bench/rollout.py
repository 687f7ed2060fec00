"""`tierwise bench rollout`: what a rollout costs the requests it happens under.

A fresh registry (under the output directory) holds the zoo; the cloud server hosts it and
an edge server takes its models from it, both real processes on loopback. Closed-loop clients
stream batch-1 OIP requests for the edge model at the edge server, unversioned (so they get
whatever is stable), for two phases of equal length, side by side:

- steady: nothing changes;
- rolling: every `swap_every_s` the registry makes a new build of the edge model stable
  (push to canary, promote) or rolls it back, so the server loads a version, switches the
  default, and retires the old one, while requests run.

The phases alternate in windows of 2 × `swap_every_s` (steady, rolling, steady, ...) until
each has had `duration_s`, so that drift in the speed of this shared machine falls on both.

It reports latency percentiles and errors per phase (the ratio rolling / steady), how long
each change took from the registry command to the first answer from the new version
(propagation, bounded by the poll period), and the bytes a subscriber on each tier downloads
for the whole zoo.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from tierwise.bench.harness import run_record
from tierwise.bench.processes import free_port, tier_server
from tierwise.config import Config, write_config
from tierwise.data import load_splits
from tierwise.models.store import list_models, save_info, sha256_file
from tierwise.protocol.oip import encode_infer_request, infer_path
from tierwise.registry.signing import PRIVATE_KEY_FILE, keygen, load_private_key
from tierwise.registry.store import Registry, registry_of
from tierwise.registry.subscriber import Subscriber, registry_token
from tierwise.zoo.names import model_name

EDGE = model_name("edge")


def rebuild(models_dir: Path, target: Path, models: list[str]) -> Path:
    """A copy of `models_dir` in which `models` (with their heads and tails) are new builds
    of the same weights: each ONNX file re-saved with another doc string, so the registry
    sees new content. Needs `onnx` (the train extra)."""
    import onnx

    shutil.copytree(models_dir, target)
    for name, (info, path) in list_models(target).items():
        if name in models or info.parent in models:
            proto = onnx.load(str(path))
            proto.doc_string = f"{name}, rebuilt {time.time():.6f}"
            onnx.save(proto, str(path))
            save_info(target, info.model_copy(update={"sha256": sha256_file(path),
                                                      "bytes": path.stat().st_size}))
    return target


@dataclass
class Phase:
    name: str
    requests: int = 0
    errors: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    versions: dict[str, int] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        latencies = np.asarray(self.latencies_ms or [0.0])
        return {"phase": self.name, "requests": self.requests, "errors": self.errors,
                "latency_p50_ms": float(np.percentile(latencies, 50)),
                "latency_p95_ms": float(np.percentile(latencies, 95)),
                "latency_p99_ms": float(np.percentile(latencies, 99)),
                "latency_max_ms": float(latencies.max()), "versions": self.versions}


class _Load:
    """`concurrency` closed-loop clients; each answer lands in the current phase."""

    def __init__(self, url: str, bodies: list[tuple[bytes, dict[str, str]]],
                 concurrency: int) -> None:
        self.url = url
        self.bodies = bodies
        self.phase = Phase("warm-up")
        self.first_seen: dict[str, float] = {}  # version -> first answer (monotonic)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True)
                         for i in range(concurrency)]
        for thread in self._threads:
            thread.start()

    def _run(self, index: int) -> None:
        path = infer_path(EDGE)
        with httpx.Client(base_url=self.url, trust_env=False, timeout=10.0) as http:
            count = index
            while not self._stop.is_set():
                body, headers = self.bodies[count % len(self.bodies)]
                count += 1
                started = time.perf_counter()
                try:
                    answer = http.post(path, content=body, headers=headers)
                    ok, version = answer.status_code == 200, \
                        answer.headers.get("tierwise-model-version", "?")
                except httpx.HTTPError:
                    ok, version = False, "?"
                elapsed_ms = (time.perf_counter() - started) * 1e3
                with self._lock:
                    phase = self.phase
                    phase.requests += 1
                    if ok:
                        phase.latencies_ms.append(elapsed_ms)
                        phase.versions[version] = phase.versions.get(version, 0) + 1
                        self.first_seen.setdefault(version, time.monotonic())
                    else:
                        phase.errors += 1

    def switch(self, phase: Phase) -> None:
        with self._lock:
            self.phase = phase

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=15)


def run_bench_rollout(config: Config, out_dir: Path, *, duration_s: float = 20.0,
                      swap_every_s: float = 2.0, poll_s: float = 0.5, concurrency: int = 4,
                      console: Console | None = None) -> dict[str, Any]:
    console = console or Console()
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="rollout-", dir=out_dir))
    try:
        return _run(config, out_dir, work, duration_s, swap_every_s, poll_s, concurrency,
                    console)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(config: Config, out_dir: Path, work: Path, duration_s: float, swap_every_s: float,
         poll_s: float, concurrency: int, console: Console) -> dict[str, Any]:
    config = config.model_copy(deep=True)
    source_models = config.models_dir
    config.data_dir = str(work / "data")
    config.registry.root = str(work / "registry")
    config.registry.poll_s = poll_s
    config.registry.retire_grace_s = poll_s * 2
    registry = registry_of(config)
    keygen(registry.keys_dir)
    key = load_private_key(registry.keys_dir / PRIVATE_KEY_FILE)
    started = time.perf_counter()
    pushed = registry.push_all(config, source_models, key)
    push_s = time.perf_counter() - started
    rebuilt = rebuild(source_models, work / "rebuilt", [EDGE])
    console.print(f"registry: pushed {len(pushed)} models "
                  f"({sum(r.bytes for r in pushed) / 1e6:.1f} MB) in {push_s:.2f} s")

    downloads = _download_bytes(config, pushed)
    splits = load_splits(config.data.path, config.data.validation_size, config.data.seed)
    bodies = [encode_infer_request({"image": splits.test_x[i:i + 1]}, binary=True,
                                   binary_outputs=True) for i in range(64)]
    cloud_port = free_port()
    cloud_url = f"http://127.0.0.1:{cloud_port}"
    config_path = str(write_config(config, work / "tierwise.toml"))
    flags = ["--registry-url", cloud_url]
    changes: list[dict[str, Any]] = []
    with (
        tier_server("cloud", source_models, port=cloud_port, extra_args=flags,
                    config_path=config_path),
        tier_server("edge", source_models, extra_args=flags, config_path=config_path) as edge,
    ):
        load = _Load(edge, bodies, concurrency)
        try:
            time.sleep(1.0)
            steady, rolling = Phase("steady"), Phase("rolling")
            # Short steady and rolling windows alternate, so that drift in this shared
            # machine's speed falls on both phases alike.
            window_s = 2 * swap_every_s
            rounds = max(1, round(duration_s / window_s))
            builds = [source_models, rebuilt]
            with Progress(console=console, transient=True) as progress:
                task = progress.add_task("steady / rolling windows", total=rounds)
                for _ in range(rounds):
                    load.switch(steady)
                    time.sleep(window_s)
                    load.switch(rolling)
                    for _ in range(2):  # a promote and a rollback
                        changes.append(_change(config, registry, key, builds, load,
                                               swap_every_s, len(changes)))
                    progress.advance(task)
                load.switch(Phase("cool-down"))
        finally:
            load.stop()
    propagation = [c["propagation_ms"] for c in changes if c["propagation_ms"] is not None]
    results: dict[str, Any] = {
        "emulated": ["none: loopback, no link shaping; this host's compute"],
        "models_pushed": len(pushed), "push_s": push_s,
        "bytes_pushed": sum(r.bytes for r in pushed), "download_bytes_per_tier": downloads,
        "poll_s": poll_s, "concurrency": concurrency, "duration_s": duration_s,
        "swap_every_s": swap_every_s,
        "phases": [steady.summary(), rolling.summary()],
        "changes": changes,
        "propagation_ms_median": float(np.median(propagation)) if propagation else None,
        "propagation_ms_max": max(propagation) if propagation else None,
    }
    results["rolling_over_steady_p99"] = (results["phases"][1]["latency_p99_ms"]
                                          / results["phases"][0]["latency_p99_ms"])
    results["rolling_over_steady_p50"] = (results["phases"][1]["latency_p50_ms"]
                                          / results["phases"][0]["latency_p50_ms"])
    (out_dir / "results.json").write_text(json.dumps({**run_record(), **results}, indent=2))
    _plot(steady, rolling, out_dir / "rollout.png")
    console.print(_table(results))
    console.print(f"wrote {out_dir}/results.json, rollout.png")
    return results


def _change(config: Config, registry: Registry, key: Any, builds: list[Path], load: _Load,
            swap_every_s: float, index: int) -> dict[str, Any]:
    """Make the other build of the edge model stable (push to canary + promote), or roll back
    to the previous stable; wait `swap_every_s`; say when the edge server first answered from
    the version now stable."""
    began = time.monotonic()
    rollout = registry.require(EDGE)
    if index % 2 == 0:
        version = registry.push(config, builds[(index // 2 + 1) % 2], EDGE, key,
                                channel="canary", canary_share=1.0).version
        registry.promote(EDGE)
        action = "promote"
    else:
        registry.rollback(EDGE)
        version = registry.require(EDGE).stable or 0
        action = "rollback"
    load.first_seen.pop(str(version), None)
    time.sleep(max(0.0, began + swap_every_s - time.monotonic()))
    seen = load.first_seen.get(str(version))
    return {"action": action, "from_version": rollout.stable, "to_version": version,
            "propagation_ms": (seen - began) * 1e3 if seen is not None else None}


def _download_bytes(config: Config, pushed: list[Any]) -> dict[str, int]:
    """Bytes a fresh subscriber on each tier downloads for the whole zoo (in-process)."""
    from tierwise.cloud import hosted
    from tierwise.server.app import TierServer, serve_in_thread

    registry = registry_of(config)
    app = hosted(TierServer("cloud", config.tier("cloud"), {}), config)
    out = {}
    with serve_in_thread(app) as url:
        for tier in ("device", "edge", "cloud"):
            subscriber = Subscriber(
                url, tier=tier, channel="stable", device_id=f"bytes-{tier}",
                token=registry_token("", registry.root),
                public_key=registry.keys_dir / "signing.pub",
                cache_dir=Path(config.data_dir) / "bytes" / tier)
            subscriber.poll_once()
            subscriber.stop()
            out[tier] = subscriber.bytes_downloaded
    return out


def _table(results: dict[str, Any]) -> Table:
    table = Table(title=f"edge server under {results['concurrency']} closed-loop clients, "
                  f"{results['duration_s']:g} s per phase",
                  caption=f"{len(results['changes'])} changes, poll {results['poll_s']:g} s: "
                  f"propagation median {results['propagation_ms_median'] or 0:.0f} ms, max "
                  f"{results['propagation_ms_max'] or 0:.0f} ms")
    for column in ("phase", "requests", "errors", "p50 ms", "p95 ms", "p99 ms", "max ms",
                   "answered by version"):
        table.add_column(column, justify="left" if column == "phase" else "right")
    for phase in results["phases"]:
        table.add_row(phase["phase"], f"{phase['requests']:,}", str(phase["errors"]),
                      f"{phase['latency_p50_ms']:.2f}", f"{phase['latency_p95_ms']:.2f}",
                      f"{phase['latency_p99_ms']:.2f}", f"{phase['latency_max_ms']:.1f}",
                      ", ".join(f"v{v}: {n:,}" for v, n in sorted(phase["versions"].items())))
    return table


def _plot(steady: Phase, rolling: Phase, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for phase in (steady, rolling):
        ordered = np.sort(phase.latencies_ms)
        ax.plot(ordered, np.arange(1, len(ordered) + 1) / len(ordered),
                label=f"{phase.name} ({phase.errors} errors)")
    ax.set_xscale("log")
    ax.set_xlabel("request latency (ms, log)")
    ax.set_ylabel("share of requests")
    ax.set_title("Edge server latency, steady vs. while versions roll")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.text(0.01, 0.01, "loopback, no link emulation; this host's compute", fontsize=6)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
