"""`tierwise optimize report`: what each optimization costs and buys, on test data.

- every input codec: bytes per image against the test accuracy of the model that receives it;
- every (split point, feature codec) of the models edge and cloud serve, learned bottlenecks
  included: bytes per image against test accuracy;
- every whole model and variant: bytes on disk, latency at batch 1 and 64 on this CPU
  (ONNX Runtime, one thread, medians), test accuracy.

Writes `optimize_report.json`, `rate_accuracy.png` (the rate–accuracy frontier) and
`latency_accuracy.png`. Latencies are this host's: compare them with each other, not with
another machine's.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from tierwise.codecs import codec_names
from tierwise.config import DEVICE_TIER, Config
from tierwise.data import load_splits
from tierwise.models.store import list_models, tier_models
from tierwise.profile.model_profile import load_profile
from tierwise.profile.profiler import batch1_ms, codec_profile
from tierwise.runtime.session import OnnxModel

RAW_IMAGE_BYTES = 784
BATCH_64 = 64


def _batch64_ms(model: OnnxModel, images: np.ndarray, runs: int = 30) -> float:
    batch = images[:BATCH_64]
    model.run(batch)
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        model.run(batch)
        times.append(time.perf_counter() - started)
    return float(np.median(times) * 1e3)


def build_report(config: Config, out_dir: Path, *, test_images: int = 10000,
                 console: Console | None = None) -> dict[str, object]:
    """Measure everything in `config.models_dir` (profiled: `tierwise profile`); write the
    JSON and plots to `out_dir`."""
    console = console or Console()
    splits = load_splits(config.data.path, config.data.validation_size, config.data.seed)
    images, labels = splits.test_x[:test_images], splits.test_y[:test_images]
    models_dir = config.models_dir
    found = list_models(models_dir)
    loaded: dict[str, OnnxModel] = {}

    def model(name: str) -> OnnxModel:
        if name not in loaded:
            info, path = found[name]
            loaded[name] = OnnxModel(path, info)
        return loaded[name]

    def accuracy_with(name: str) -> Callable[[np.ndarray], float]:
        return lambda inputs: float((model(name).run_batched(inputs).argmax(1) == labels).mean())

    placed = tier_models(config, {name: info for name, (info, _) in found.items()})
    remote = [m for tier, names in placed.items() if tier != DEVICE_TIER
              for m in names if m in found and not found[m][0].variant]
    whole = [name for name, (info, _) in found.items() if info.role == "full"]
    rows_rate: list[dict[str, object]] = []
    rows_models: list[dict[str, object]] = []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("optimize report", total=len(remote) + len(whole))
        for name in remote:
            for codec in codec_names("input"):
                measured = codec_profile(codec, images, accuracy_with(name))
                rows_rate.append({"kind": "input", "model": name, "split_point": 0,
                                  "codec": codec, "bytes": measured.bytes_mean,
                                  "test_accuracy": measured.accuracy})
            # the profile lists every split and the codecs measured for it (`tierwise profile`
            # exported the heads and tails), learned bottlenecks included
            for split in load_profile(models_dir, name).splits:
                features = model(split.head).run_batched(images)
                for codec in split.codecs:
                    measured = codec_profile(codec, features, accuracy_with(split.tail))
                    rows_rate.append({
                        "kind": "learned" if split.bottleneck else "feature", "model": name,
                        "split_point": split.split_point, "codec": split.bottleneck or codec,
                        "bytes": measured.bytes_mean, "test_accuracy": measured.accuracy})
            progress.advance(task)
        for name in whole:
            info, path = found[name]
            runner = model(name)
            rows_models.append({
                "model": name, "parent": info.parent, "variant": info.variant,
                "bytes_on_disk": path.stat().st_size, "parameters": info.parameters,
                "latency_batch1_ms": batch1_ms(runner.run, images),
                "latency_batch64_ms": _batch64_ms(runner, images),
                "test_accuracy": float((runner.run_batched(images).argmax(1) == labels).mean())})
            progress.advance(task)
    for row in rows_rate:
        row["reduction_vs_raw_image"] = RAW_IMAGE_BYTES / max(float(row["bytes"]), 1e-9)
    for row in rows_models:
        parent = next((r for r in rows_models if r["model"] == row["parent"]), None)
        if parent is not None:
            row["bytes_vs_parent"] = float(row["bytes_on_disk"]) / float(parent["bytes_on_disk"])
            row["latency_batch1_vs_parent"] = (float(row["latency_batch1_ms"])
                                               / float(parent["latency_batch1_ms"]))
            row["latency_batch64_vs_parent"] = (float(row["latency_batch64_ms"])
                                                / float(parent["latency_batch64_ms"]))
            row["accuracy_drop_points"] = 100 * (float(parent["test_accuracy"])
                                                 - float(row["test_accuracy"]))
    report = {"test_images": len(images), "host_cpu_note": _cpu_note(),
              "rate_accuracy": rows_rate, "models": rows_models}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "optimize_report.json").write_text(json.dumps(report, indent=1) + "\n")
    _plot_rate(rows_rate, out_dir / "rate_accuracy.png")
    _plot_latency(rows_models, out_dir / "latency_accuracy.png")
    _print(console, rows_rate, rows_models)
    return report


def _cpu_note() -> str:
    import onnxruntime as ort

    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    vnni = "avx512_vnni" in flags or "avx_vnni" in flags
    return (f"onnxruntime {ort.__version__}; CPU {'has' if vnni else 'has no'} VNNI "
            f"({'AVX2' if 'avx2' in flags else 'no AVX2'}): without VNNI, INT8 kernels may be "
            f"slower than fp32")


def _plot_rate(rows: list[dict[str, object]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(9, 5.5))
    markers = {"input": "s", "feature": "o", "learned": "*"}
    for kind, marker in markers.items():
        chosen = [r for r in rows if r["kind"] == kind]
        axes.scatter([float(r["bytes"]) for r in chosen],
                     [100 * float(r["test_accuracy"]) for r in chosen],
                     marker=marker, s=90 if kind == "learned" else 30,
                     label={"input": "input codec", "feature": "split + feature codec",
                            "learned": "split + learned bottleneck"}[kind])
    ordered = sorted(rows, key=lambda r: float(r["bytes"]))
    best, frontier = -1.0, []
    for row in ordered:
        if float(row["test_accuracy"]) > best:
            best = float(row["test_accuracy"])
            frontier.append(row)
    axes.step([float(r["bytes"]) for r in frontier],
              [100 * float(r["test_accuracy"]) for r in frontier], where="post", color="grey",
              linewidth=1, label="frontier")
    axes.axvline(RAW_IMAGE_BYTES, color="red", linestyle=":", label="raw image (784 B)")
    axes.set_xscale("log")
    axes.set_xlabel("bytes sent per inference (payload, log scale)")
    axes.set_ylabel("test accuracy (%)")
    axes.set_ylim(max(50.0, min(100 * float(r["test_accuracy"]) for r in rows) - 1), None)
    axes.set_title("Rate–accuracy: what each codec sends and what it keeps")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _plot_latency(rows: list[dict[str, object]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for axis, key, title in ((axes[0], "latency_batch1_ms", "batch 1"),
                             (axes[1], "latency_batch64_ms", "batch 64")):
        for row in rows:
            axis.scatter(float(row[key]), 100 * float(row["test_accuracy"]))
            axis.annotate(str(row["model"]).removeprefix("fmnist-"),
                          (float(row[key]), 100 * float(row["test_accuracy"])), fontsize=7)
        axis.set_xscale("log")
        axis.set_xlabel(f"latency, {title} (ms, this CPU, 1 thread)")
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (%)")
    figure.suptitle("Model variants: latency against accuracy (measured, not assumed)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _print(console: Console, rows_rate: list[dict[str, object]],
           rows_models: list[dict[str, object]]) -> None:
    table = Table(title="rate–accuracy (test data)")
    for column in ("model", "cut", "codec", "bytes", "× fewer than raw", "accuracy"):
        table.add_column(column)
    for row in rows_rate:
        table.add_row(str(row["model"]), str(row["split_point"] or "input"), str(row["codec"]),
                      f"{float(row['bytes']):.1f}", f"{float(row['reduction_vs_raw_image']):.1f}",
                      f"{100 * float(row['test_accuracy']):.2f}%")
    console.print(table)
    table = Table(title="model variants (this CPU, ONNX Runtime, 1 thread)")
    for column in ("model", "KiB", "batch 1 ms", "batch 64 ms", "accuracy"):
        table.add_column(column)
    for row in rows_models:
        table.add_row(str(row["model"]), f"{int(row['bytes_on_disk']) / 1024:.0f}",
                      f"{float(row['latency_batch1_ms']):.3f}",
                      f"{float(row['latency_batch64_ms']):.2f}",
                      f"{100 * float(row['test_accuracy']):.2f}%")
    console.print(table)
