"""`tierwise demo [--workload fashion-mnist|camera]`: the whole system on one machine.

Sets up the workload (`tierwise.bench.workload`: trains the Fashion-MNIST zoo, or installs
the pretrained EfficientNet-Lite models for the camera; profiles them) and publishes its
models to the model registry as signed versions. Starts the cloud server (which hosts the
registry) and the edge server as real processes on loopback; both take their models from the
registry, and so does every simulated device. Runs the same test requests through
device-only, edge-only, cloud-only, the cascade and the adaptive policy, and prints and
writes a table with plots (`tierwise.bench.harness`). Links and any compute scale are
emulated, and every output says so.
"""

from __future__ import annotations

import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from tierwise.bench.harness import BenchReport, Column, latency_cdf
from tierwise.bench.processes import free_port, tier_server
from tierwise.bench.workload import Samples, Workload, load_workload
from tierwise.client import Client, InferenceResult, Trace
from tierwise.client.client import emulation_labels
from tierwise.config import Config, TierConfig, write_config
from tierwise.models.store import list_models
from tierwise.planner.plans import Cascade, Local, Plan, Remote
from tierwise.planner.policy import cascade_point
from tierwise.profile.model_profile import load_profile
from tierwise.registry.cli import describe_push
from tierwise.registry.signing import PRIVATE_KEY_FILE, keygen, load_private_key
from tierwise.registry.store import PushResult, registry_of


@dataclass
class StrategyResult:
    strategy: str
    plan: str
    quality: float          # accuracy, or fidelity (the workload says which)
    top5: float | None      # share whose expected class is among the answer's five best
    latency_p50_ms: float
    latency_p95_ms: float
    deadline_miss_rate: float
    bytes_up_per_inference: float
    bytes_down_per_inference: float
    escalated_share: float
    fallback_share: float
    cost_usd_per_1m: float
    latencies_ms: list[float]

    def row(self) -> dict[str, float | str | None]:
        record = dict(self.__dict__)
        record.pop("latencies_ms")
        return record


@dataclass
class CascadeChoice:
    """The demo's cascade: device model, escalating to the cloud model at `threshold`, the
    fewest escalations (on the profile's data) within the margin of the cloud model."""

    threshold: float
    target_quality: float
    then_quality: float
    expected_quality: float
    expected_escalation_rate: float


def choose_cascade(config: Config, device: str, cloud: str) -> CascadeChoice:
    """From the device model's profiled cascade curve towards `cloud`."""
    profile = load_profile(config.models_dir, device)
    curve = next((c for c in profile.cascades if c.then == cloud), None)
    if curve is None:
        raise RuntimeError(f"{device}: its profile has no cascade curve towards {cloud}; "
                           "run `tierwise profile --force`")
    then_quality = float(curve.accuracy[-1])  # every request escalated
    target = then_quality - config.slo.cascade_accuracy_margin_points / 100
    threshold, expected, escalation = cascade_point(curve, target)
    return CascadeChoice(threshold, target, then_quality, expected, escalation)


def top5_hit(result: InferenceResult, label: int) -> bool | None:
    """Whether `label` is among the answer's five most probable classes (None: not a
    classification)."""
    try:
        probabilities = result.probabilities
    except AttributeError:
        return None
    return bool(label in np.argsort(-probabilities)[:5])


def run_strategy(client: Client, plan: Plan | None, samples: Samples,
                 progress: Progress, name: str, min_quality: float = 0.0
                 ) -> tuple[StrategyResult, list[Trace]]:
    """`plan=None`: the policy places every request, for `min_quality` and the config's
    deadline."""
    task = progress.add_task(name, total=len(samples))
    traces: list[Trace] = []
    correct = 0
    top5: list[bool] = []
    for index, (sample, label) in enumerate(zip(samples.inputs, samples.labels, strict=True)):
        result = client.infer(sample, plan, min_quality=min_quality)
        correct += result.label == int(label)
        hit = top5_hit(result, int(label))
        if hit is not None:
            top5.append(hit)
        traces.append(result.trace)
        if index % 25 == 0:
            progress.update(task, completed=index + 1)
    progress.update(task, completed=len(samples))
    latencies = [trace.total_ms for trace in traces]
    n = len(traces)
    plans = sorted({trace.plan for trace in traces})
    return StrategyResult(
        strategy=name,
        plan=plan.describe() if plan else f"policy per request ({len(plans)} plans used)",
        quality=correct / n,
        top5=float(np.mean(top5)) if top5 else None,
        latency_p50_ms=float(np.percentile(latencies, 50)),
        latency_p95_ms=float(np.percentile(latencies, 95)),
        deadline_miss_rate=float(np.mean([t.total_ms > t.slo["deadline_ms"] for t in traces])),
        bytes_up_per_inference=sum(t.bytes_up for t in traces) / n,
        bytes_down_per_inference=sum(t.bytes_down for t in traces) / n,
        escalated_share=sum(t.escalated for t in traces) / n,
        fallback_share=sum(t.fallback is not None for t in traces) / n,
        cost_usd_per_1m=sum(t.cost_usd for t in traces) / n * 1e6,
        latencies_ms=latencies,
    ), traces


def columns(quality: str) -> list[Column]:
    return [Column("strategy", "strategy", left=True),
            Column("quality", quality, "{:.2%}"),
            Column("top5", "top-5", "{:.1%}"),
            Column("latency_p50_ms", "p50 ms", "{:.2f}"),
            Column("latency_p95_ms", "p95 ms", "{:.2f}"),
            Column("deadline_miss_rate", "missed", "{:.1%}"),
            Column("bytes_up_per_inference", "bytes up/inf", "{:,.0f}"),
            Column("escalated_share", "escalated", "{:.1%}"),
            Column("cost_usd_per_1m", "$ per 1M", "{:.3g}")]


def _plots(report: BenchReport, results: list[StrategyResult], workload: Workload,
           deadline_ms: float) -> None:
    with report.figure("latency_cdf.png", title="Latency CDF per strategy") as (_, axis):
        latency_cdf(axis, {r.strategy: r.latencies_ms for r in results},
                    deadline_ms=deadline_ms)
    with report.figure("accuracy_vs_cost.png",
                       title=f"{workload.quality.capitalize()} against cost (marker size: "
                             f"p50 latency) — {workload.quality_note}") as (_, axis):
        for r in results:
            axis.scatter(r.cost_usd_per_1m, r.quality * 100,
                         s=30 + min(r.latency_p50_ms, 500) * 2)
            axis.annotate(f"{r.strategy}\np50 {r.latency_p50_ms:.1f} ms",
                          (r.cost_usd_per_1m, r.quality * 100), textcoords="offset points",
                          xytext=(6, 4), fontsize=8)
        axis.set_xlabel("cost per 1M inferences (USD)")
        axis.set_ylabel(f"{workload.quality} (%)")
        axis.grid(alpha=0.3)


def run_demo(config: Config, report_dir: Path | None = None, console: Console | None = None,
             workload: str = "fashion-mnist", images: int | None = None
             ) -> list[StrategyResult]:
    console = console or Console()
    started = time.perf_counter()
    started_at = time.time()
    console.rule(f"tierwise demo: {workload}")
    setup = load_workload(workload, config, console)
    config = setup.config
    report_dir = Path(report_dir or config.demo.report_dir)
    device, edge, cloud = setup.device, setup.edge, setup.cloud
    infos = {name: info for name, (info, _) in list_models(config.models_dir).items()}
    for name in dict.fromkeys((device, edge, cloud)):
        profile = load_profile(config.models_dir, name)
        console.print(f"{name}: {profile.quality_metric} {profile.accuracy:.2%}, "
                      f"{infos[name].parameters:,} parameters, "
                      f"{infos[name].bytes / 1024:,.0f} KiB")

    choice = choose_cascade(config, device, cloud)
    console.print(
        f"cascade threshold {choice.threshold:.3f}: on the profile's data, {setup.quality} "
        f"{choice.expected_quality:.2%} (target {choice.target_quality:.2%} = cloud "
        f"{choice.then_quality:.2%} - {config.slo.cascade_accuracy_margin_points:g} pt), "
        f"expected escalation rate {choice.expected_escalation_rate:.1%}")
    samples = setup.samples(images or config.demo.images)

    strategies: dict[str, Plan | None] = {
        "device-only": Local(device),
        "edge-only": Remote("edge", edge),
        "cloud-only": Remote("cloud", cloud),
        "cascade": Cascade(Local(device), Remote("cloud", cloud), choice.threshold),
        # tierwise itself: the cheapest plan per request that meets the cascade's target
        "adaptive": None,
    }
    pushed = publish(config, console)
    edge_tier, cloud_tier = config.tier("edge"), config.tier("cloud")
    cloud_port = free_port()
    cloud_url = f"http://127.0.0.1:{cloud_port}"
    from_registry = ["--registry-url", cloud_url]
    versions: dict[str, dict[str, str]] = {}
    with (
        tempfile.TemporaryDirectory() as scratch,
        tier_server("cloud", config.models_dir, port=cloud_port,
                    extra_args=[*_server_args(cloud_tier), *from_registry],
                    config_path=str(write_config(config, Path(scratch) / "tierwise.toml"))),
        tier_server("edge", config.models_dir, extra_args=[*_server_args(edge_tier),
                                                             *from_registry],
                    config_path=str(Path(scratch) / "tierwise.toml")) as edge_url,
    ):
        console.print(f"cloud server {cloud_url} (hosts the registry), edge server {edge_url}: "
                      "real processes, serving the registry's stable versions")
        results: dict[str, StrategyResult] = {}
        errors: list[BaseException] = []
        # Each strategy is its own device with its own links, so they run side by side.
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=console) as progress:
            def worker(name: str, plan: Plan | None) -> None:
                try:
                    with Client(config, registry_url=cloud_url, collector_url=cloud_url,
                                device_id=f"demo-{workload}-{name}",
                                tier_urls={"edge": edge_url, "cloud": cloud_url}) as client:
                        client.infer(samples.inputs[0], plan)  # warm connection and session
                        results[name], traces = run_strategy(
                            client, plan, samples, progress, name,
                            min_quality=choice.target_quality)
                        versions[name] = _served_versions(traces)
                except BaseException as error:  # reported below, in the caller's thread
                    errors.append(error)

            threads = [threading.Thread(target=worker, args=item) for item in strategies.items()]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
    if errors:
        raise errors[0]
    emulated = emulation_labels(config)
    ordered = [results[name] for name in strategies]
    report = BenchReport(f"demo ({workload})", report_dir, emulated, console=console)
    notes = [
        f"Requests: {samples.source}. {setup.quality_note.capitalize()}.",
        f"Cascade: threshold {choice.threshold:.3f} chosen on the profile's data for "
        f"{setup.quality} within {config.slo.cascade_accuracy_margin_points:g} points of the "
        f"cloud model; expected escalation rate {choice.expected_escalation_rate:.1%}.",
        f"Adaptive: the policy's cheapest plan per request with {setup.quality} ≥ "
        f"{choice.target_quality:.2%} (the cascade's target) within "
        f"{config.slo.deadline_ms:g} ms, from the model profiles (`tierwise profile`) and "
        "online link estimates.",
        "Cost: server compute-seconds x price per hour, bytes x link price per GB, device "
        "energy x electricity price (price book: `tierwise config show`).",
        "Absolute times are figures of this machine; compare strategies side by side.",
        "Models: every tier and device took its models from the registry hosted by the cloud "
        "server (signed, verified): "
        + ", ".join(f"{r.model} v{r.version}" for r in pushed
                    if r.model in (device, edge, cloud)) + ".",
    ]
    report.table([r.row() for r in ordered], columns(setup.quality),
                 title=f"tierwise demo: {setup.title}, one device per strategy", notes=notes)
    report.write({
        "workload": workload, "quality": setup.quality, "quality_note": setup.quality_note,
        "rows": [r.row() for r in ordered], "cascade": choice.__dict__,
        "requests": len(samples), "source": samples.source,
        "registry": {"url": cloud_url, "pushed": [r.__dict__ for r in pushed],
                     "versions_served": versions},
        "models": {name: infos[name].model_dump() for name in dict.fromkeys(
            (device, edge, cloud))},
    })
    _plots(report, ordered, setup, config.slo.deadline_ms)
    from tierwise.monitor.report import views_for, write_report

    views = views_for(config, since=started_at)
    html = write_report(views, report_dir / "report.html", f"tierwise demo ({workload}): what "
                        "the collector saw")
    console.print(f"telemetry: the collector stored {len(views.records):,} traces from "
                  f"{len({r['device'] for r in views.records})} devices; report {html}")
    report.say_written()
    console.print(f"demo finished in {time.perf_counter() - started:.0f} s")
    return ordered


def publish(config: Config, console: Console) -> list[PushResult]:
    """Push every model in the models directory to the registry (a signing key is made on
    first use); pushing what is already there changes nothing."""
    registry = registry_of(config)
    key_path = registry.keys_dir / PRIVATE_KEY_FILE
    if not key_path.is_file():
        keygen(registry.keys_dir)
        console.print(f"registry: new signing key and API token under {registry.keys_dir}")
    results = registry.push_all(config, config.models_dir, load_private_key(key_path))
    for result in results:
        if result.new:
            console.print(f"registry: {describe_push(result)}")
    console.print(f"registry {registry.root}: {len(results)} models, "
                  f"{sum(r.new for r in results)} new versions")
    return results


def _served_versions(traces: list[Trace]) -> dict[str, str]:
    """model -> the versions that answered, from the traces."""
    seen: dict[str, set[str]] = {}
    for trace in traces:
        for stage in trace.answered_stages:
            seen.setdefault(stage.model, set()).add(stage.model_version)
    return {model: ",".join(sorted(found)) for model, found in sorted(seen.items())}


def _server_args(tier: TierConfig) -> list[str]:
    return ["--max-batch-size", str(tier.max_batch_size),
            "--max-queue-delay-ms", str(tier.max_queue_delay_ms),
            "--compute-scale", str(tier.compute_scale),
            "--max-body-bytes", str(tier.max_body_bytes)]
