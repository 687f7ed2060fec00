"""`tierwise demo`: the whole system on one machine.

Trains (or loads) the zoo and publishes it to the model registry as signed versions. Starts
the cloud server (which hosts the registry) and the edge server as real processes on loopback;
both take their models from the registry, and so does every simulated device. Runs the same
test images through device-only, edge-only, cloud-only, the cascade and the adaptive policy,
and prints and writes a table with plots. Links and any device compute scale are emulated,
and every output says so.
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from tierwise.bench.processes import free_port, tier_server
from tierwise.client import Client, Trace
from tierwise.client.client import emulation_labels
from tierwise.config import Config, TierConfig, write_config
from tierwise.data import load_splits
from tierwise.models.store import list_models
from tierwise.planner.plans import Cascade, Local, Plan, Remote
from tierwise.profile.calibration import softmax
from tierwise.profile.cascade import CascadeChoice, choose_threshold
from tierwise.registry.cli import describe_push
from tierwise.registry.signing import PRIVATE_KEY_FILE, keygen, load_private_key
from tierwise.registry.store import PushResult, Registry
from tierwise.runtime.session import load_models
from tierwise.zoo.names import model_name

DEVICE, EDGE, CLOUD = model_name("device"), model_name("edge"), model_name("cloud")


@dataclass
class StrategyResult:
    strategy: str
    plan: str
    accuracy: float
    latency_p50_ms: float
    latency_p95_ms: float
    bytes_up_per_inference: float
    bytes_down_per_inference: float
    escalated_share: float
    fallback_share: float
    cost_usd_per_1m: float
    latencies_ms: list[float]

    def row(self) -> dict[str, float | str]:
        record = dict(self.__dict__)
        record.pop("latencies_ms")
        return record


def choose_cascade(config: Config, then_model: str) -> CascadeChoice:
    """Profile the device and `then_model` on validation data; pick the cascade threshold."""
    splits = load_splits(config.data.path, config.data.validation_size, config.data.seed)
    models = load_models(config.models_dir, threads=2, names=[DEVICE, then_model])
    device_logits = np.concatenate([models[DEVICE].run(splits.val_x[i:i + 1000])
                                    for i in range(0, len(splits.val_x), 1000)])
    then_logits = np.concatenate([models[then_model].run(splits.val_x[i:i + 1000])
                                  for i in range(0, len(splits.val_x), 1000)])
    confidence = softmax(device_logits, models[DEVICE].info.temperature).max(axis=1)
    return choose_threshold(
        confidence,
        device_logits.argmax(1) == splits.val_y,
        then_logits.argmax(1) == splits.val_y,
        config.slo.cascade_accuracy_margin_points,
    )


def run_strategy(client: Client, plan: Plan | None, images: np.ndarray, labels: np.ndarray,
                 progress: Progress, name: str, min_accuracy: float = 0.0
                 ) -> tuple[StrategyResult, list[Trace]]:
    """`plan=None`: the policy places every request, for `min_accuracy` and the config's
    deadline."""
    task = progress.add_task(name, total=len(images))
    traces: list[Trace] = []
    correct = 0
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        result = client.infer(image, plan, min_accuracy=min_accuracy)
        correct += result.label == int(label)
        traces.append(result.trace)
        if index % 25 == 0:
            progress.update(task, completed=index + 1)
    progress.update(task, completed=len(images))
    latencies = [trace.total_ms for trace in traces]
    n = len(traces)
    plans = sorted({trace.plan for trace in traces})
    return StrategyResult(
        strategy=name,
        plan=plan.describe() if plan else f"policy per request ({len(plans)} plans used)",
        accuracy=correct / n,
        latency_p50_ms=float(np.percentile(latencies, 50)),
        latency_p95_ms=float(np.percentile(latencies, 95)),
        bytes_up_per_inference=sum(t.bytes_up for t in traces) / n,
        bytes_down_per_inference=sum(t.bytes_down for t in traces) / n,
        escalated_share=sum(t.escalated for t in traces) / n,
        fallback_share=sum(t.fallback is not None for t in traces) / n,
        cost_usd_per_1m=sum(t.cost_usd for t in traces) / n * 1e6,
        latencies_ms=latencies,
    ), traces


def _table(results: list[StrategyResult], emulated: list[str]) -> Table:
    table = Table(title="tierwise demo: Fashion-MNIST test images, one device",
                  caption="\n".join(emulated))
    for column in ("strategy", "accuracy", "p50 ms", "p95 ms", "bytes up/inf",
                   "escalated", "$ per 1M"):
        table.add_column(column, justify="left" if column == "strategy" else "right")
    for r in results:
        table.add_row(r.strategy, f"{r.accuracy:.2%}", f"{r.latency_p50_ms:.2f}",
                      f"{r.latency_p95_ms:.2f}", f"{r.bytes_up_per_inference:,.0f}",
                      f"{r.escalated_share:.1%}", f"{r.cost_usd_per_1m:.3g}")
    return table


def _markdown(results: list[StrategyResult], emulated: list[str], notes: list[str]) -> str:
    lines = ["| strategy | accuracy | p50 ms | p95 ms | bytes up/inf | escalated | $ per 1M |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r.strategy} | {r.accuracy:.2%} | {r.latency_p50_ms:.2f} | "
                     f"{r.latency_p95_ms:.2f} | {r.bytes_up_per_inference:,.0f} | "
                     f"{r.escalated_share:.1%} | {r.cost_usd_per_1m:.3g} |")
    lines += ["", "Emulated (latencies depend on these):", *[f"- {e}" for e in emulated],
              "", *notes]
    return "\n".join(lines) + "\n"


def _plots(results: list[StrategyResult], report_dir: Path, emulated: list[str]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    footer = "; ".join(emulated)
    paths = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        ordered = np.sort(r.latencies_ms)
        ax.plot(ordered, np.arange(1, len(ordered) + 1) / len(ordered), label=r.strategy)
    ax.set_xscale("log")
    ax.set_xlabel("latency per inference (ms, log)")
    ax.set_ylabel("share of requests")
    ax.set_title("Latency CDF per strategy")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.text(0.01, 0.01, footer, fontsize=6, wrap=True)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    paths.append(report_dir / "latency_cdf.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        ax.scatter(r.cost_usd_per_1m, r.accuracy * 100, s=30 + r.latency_p50_ms * 2)
        ax.annotate(f"{r.strategy}\np50 {r.latency_p50_ms:.1f} ms",
                    (r.cost_usd_per_1m, r.accuracy * 100), textcoords="offset points",
                    xytext=(6, 4), fontsize=8)
    ax.set_xlabel("cost per 1M inferences (USD)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Accuracy against cost (marker size: p50 latency)")
    ax.grid(alpha=0.3)
    fig.text(0.01, 0.01, footer, fontsize=6, wrap=True)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    paths.append(report_dir / "accuracy_vs_cost.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


def run_demo(config: Config, report_dir: Path | None = None,
             console: Console | None = None) -> list[StrategyResult]:
    console = console or Console()
    started = time.perf_counter()
    started_at = time.time()
    report_dir = Path(report_dir or config.demo.report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)

    if not all(name in list_models(config.models_dir) for name in (DEVICE, EDGE, CLOUD)):
        try:
            from tierwise.zoo.build import ensure_zoo
        except ImportError as error:
            raise SystemExit(f"the zoo is not cached under {config.models_dir} and training "
                             f"needs torch ({error}): pip install 'tierwise[train]'") from None
        console.rule("training the zoo (cached afterwards)")
        ensure_zoo(config, console=console)
    from tierwise.profile.profiler import ensure_profiles

    ensure_profiles(config, console=console)
    infos = {name: info for name, (info, _) in list_models(config.models_dir).items()}
    for name in (DEVICE, EDGE, CLOUD):
        info = infos[name]
        console.print(f"{name}: test accuracy {info.training_record().test_accuracy:.2%}, "
                      f"{info.parameters:,} parameters, {info.bytes / 1024:.0f} KiB")

    choice = choose_cascade(config, CLOUD)
    console.print(
        f"cascade threshold {choice.threshold:.3f}: on validation data, accuracy "
        f"{choice.expected_accuracy:.2%} (target {choice.target_accuracy:.2%} = cloud "
        f"{choice.then_accuracy:.2%} - {config.slo.cascade_accuracy_margin_points:g} pt), "
        f"expected escalation rate {choice.expected_escalation_rate:.1%}"
    )
    splits = load_splits(config.data.path, config.data.validation_size, config.data.seed)
    images, labels = splits.test_x[:config.demo.images], splits.test_y[:config.demo.images]

    strategies: dict[str, Plan | None] = {
        "device-only": Local(DEVICE),
        "edge-only": Remote("edge", EDGE),
        "cloud-only": Remote("cloud", CLOUD),
        "cascade": Cascade(Local(DEVICE), Remote("cloud", CLOUD), choice.threshold),
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
        # Each strategy is its own device with its own links, so they run side by side.
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=console) as progress:
            def worker(name: str, plan: Plan | None) -> None:
                with Client(config, registry_url=cloud_url, collector_url=cloud_url,
                            device_id=f"demo-{name}",
                            tier_urls={"edge": edge_url, "cloud": cloud_url}) as client:
                    client.infer(images[0], plan)  # warm the connection and the session
                    results[name], traces = run_strategy(
                        client, plan, images, labels, progress, name,
                        min_accuracy=choice.target_accuracy)
                    versions[name] = _served_versions(traces)

            threads = [threading.Thread(target=worker, args=item) for item in strategies.items()]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
    emulated = emulation_labels(config)
    ordered = [results[name] for name in strategies if name in results]
    if len(ordered) != len(strategies):
        raise RuntimeError(f"strategies that did not finish: {set(strategies) - set(results)}")

    console.print(_table(ordered, emulated))
    notes = [
        f"Cascade: threshold {choice.threshold:.3f} chosen on {config.data.validation_size} "
        f"validation images for accuracy within {config.slo.cascade_accuracy_margin_points:g} "
        f"points of the cloud model; expected escalation rate "
        f"{choice.expected_escalation_rate:.1%}.",
        f"Adaptive: the policy's cheapest plan per request with accuracy ≥ "
        f"{choice.target_accuracy:.2%} (the cascade's target) within "
        f"{config.slo.deadline_ms:g} ms, from the model profiles (`tierwise profile`) and "
        "online link estimates.",
        "Cost: server compute-seconds x price per hour, bytes x link price per GB, device "
        "energy x electricity price (price book: `tierwise config show`).",
        "Absolute times are figures of this machine; compare strategies side by side.",
        "Models: every tier and device took its models from the registry hosted by the cloud "
        "server (signed, verified): "
        + ", ".join(f"{r.model} v{r.version}" for r in pushed if r.model in (DEVICE, EDGE, CLOUD))
        + ".",
    ]
    (report_dir / "results.json").write_text(json.dumps({
        "rows": [r.row() for r in ordered],
        "cascade": choice.__dict__,
        "emulated": emulated,
        "images": len(images),
        "registry": {"url": cloud_url, "pushed": [r.__dict__ for r in pushed],
                     "versions_served": versions},
        "models": {name: infos[name].model_dump() for name in (DEVICE, EDGE, CLOUD)},
    }, indent=2))
    (report_dir / "table.md").write_text(_markdown(ordered, emulated, notes))
    plots = _plots(ordered, report_dir, emulated)
    from tierwise.monitor.report import views_for, write_report

    views = views_for(config, since=started_at)
    report = write_report(views, report_dir / "report.html", "tierwise demo: what the "
                          "collector saw")
    console.print(f"telemetry: the collector stored {len(views.records):,} traces from "
                  f"{len({r['device'] for r in views.records})} devices; report {report}")
    console.print(f"report: {report_dir}/table.md, results.json, "
                  + ", ".join(p.name for p in plots))
    console.print(f"demo finished in {time.perf_counter() - started:.0f} s")
    return ordered


def publish(config: Config, console: Console) -> list[PushResult]:
    """Push every model in the models directory to the registry (a signing key is made on
    first use); pushing what is already there changes nothing."""
    registry = Registry(config.registry_dir)
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
