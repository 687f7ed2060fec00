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
from typing import TYPE_CHECKING, Any, Literal, NotRequired, TypedDict

import numpy as np
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from tierwise.codecs import codec_fits, codec_names
from tierwise.config import DEVICE_TIER, Config
from tierwise.data import load_splits
from tierwise.models.store import list_models, tier_models
from tierwise.profile.evaluation import EvalSet, Judge, eval_set_for
from tierwise.profile.model_profile import load_profile
from tierwise.profile.profiler import batch1_ms, codec_profile
from tierwise.runtime.session import OnnxModel

if TYPE_CHECKING:  # torch is needed only where bottlenecks are trained
    from tierwise.optimize.bottleneck import ImportedBottleneckOutcome

RAW_IMAGE_BYTES = 784
BATCH_64 = 64


class _RateRow(TypedDict):
    """One codec's point of the rate–accuracy plot (split_point 0: an input codec)."""

    kind: str  # input, feature or learned
    model: str
    split_point: int
    codec: str
    bytes: float
    test_accuracy: float
    reduction_vs_raw_image: NotRequired[float]


class _ModelRow(TypedDict):
    """One whole model or variant: its size, latency and accuracy (and, for a variant,
    each against its parent's)."""

    model: str
    parent: str | None
    variant: str | None
    bytes_on_disk: int
    parameters: int
    latency_batch1_ms: float
    latency_batch64_ms: float
    test_accuracy: float
    bytes_vs_parent: NotRequired[float]
    latency_batch1_vs_parent: NotRequired[float]
    latency_batch64_vs_parent: NotRequired[float]
    accuracy_drop_points: NotRequired[float]


class _Sessions:
    """The models under `models_dir` (`found`: name -> (info, path)), each ONNX Runtime
    session made on first use and kept."""

    def __init__(self, models_dir: Path, threads: int = 1) -> None:
        self.found = list_models(models_dir)
        self.threads = threads
        self._loaded: dict[str, OnnxModel] = {}

    def __call__(self, name: str) -> OnnxModel:
        if name not in self._loaded:
            info, path = self.found[name]
            self._loaded[name] = OnnxModel(path, info, threads=self.threads)
        return self._loaded[name]


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
    model = _Sessions(models_dir)
    found = model.found

    def accuracy_with(name: str) -> Callable[[np.ndarray], float]:
        return lambda inputs: float((model(name).run_batched(inputs).argmax(1) == labels).mean())

    placed = tier_models(config, {name: info for name, (info, _) in found.items()})
    remote = [m for tier, names in placed.items() if tier != DEVICE_TIER
              for m in names if m in found and not found[m][0].variant]
    whole = [name for name, (info, _) in found.items() if info.role == "full"]
    rows_rate: list[_RateRow] = []
    rows_models: list[_ModelRow] = []
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
    for rate in rows_rate:
        rate["reduction_vs_raw_image"] = RAW_IMAGE_BYTES / max(float(rate["bytes"]), 1e-9)
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


def _plot_rate(rows: list[_RateRow], path: Path) -> None:
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


def _plot_latency(rows: list[_ModelRow], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    panels: tuple[tuple[Any, Literal["latency_batch1_ms", "latency_batch64_ms"], str], ...] = (
        (axes[0], "latency_batch1_ms", "batch 1"), (axes[1], "latency_batch64_ms", "batch 64"))
    for axis, key, title in panels:
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


def _print(console: Console, rows_rate: list[_RateRow],
           rows_models: list[_ModelRow]) -> None:
    table = Table(title="rate–accuracy (test data)")
    for column in ("model", "cut", "codec", "bytes", "× fewer than raw", "accuracy"):
        table.add_column(column)
    for rate in rows_rate:
        table.add_row(str(rate["model"]), str(rate["split_point"] or "input"), str(rate["codec"]),
                      f"{float(rate['bytes']):.1f}",
                      f"{float(rate['reduction_vs_raw_image']):.1f}",
                      f"{100 * float(rate['test_accuracy']):.2f}%")
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


# -- learned bottlenecks of an imported model: bytes per frame against quality ---------------

BOTTLENECK_REPORT = "bottleneck-camera"


def bottleneck_report(config: Config, outcomes: list[ImportedBottleneckOutcome],
                      out_dir: Path, *, test: EvalSet | None = None,
                      name: str = BOTTLENECK_REPORT,
                      console: Console | None = None) -> dict[str, Any]:
    """What each way of getting a frame's answer sends against the quality it keeps, with
    `tierwise.bench.harness.BenchReport`: `<name>.json`, `<name>.md` and `<name>.png` in
    `out_dir`.

    Rows, each bytes per frame (mean payload) and quality on the device model's validation
    data (its `eval_data`, as `tierwise profile` measured it) and, where measured, on `test`:

    - `input`: every input codec of every profiled model (raw, zstd, png, jpeg, webp,
      half-resolution), from the profiles (validation only);
    - `feature`: every feature codec at every profiled split of the models that have them,
      from the profiles (validation only), and at the bottlenecks' cuts of the device model
      (`outcomes[0].model`), measured here on validation and test;
    - `learned`: each bottleneck of `outcomes` (`train_imported_bottlenecks`).

    The device model's own input codecs are measured on `test` too, and its raw resized
    frame is the baseline every ratio is against (also stated against the model's input
    after its crop). The summary names the smallest bottleneck within 1 point of the
    uncompressed split on validation."""
    from tierwise.bench.harness import BenchReport, Column
    from tierwise.models.preprocess import Preprocessing
    from tierwise.optimize.split import head_name, tail_name

    console = console or Console()
    if not outcomes:
        raise ValueError("outcomes: no bottlenecks to report")
    device = outcomes[0].model
    models_dir = config.models_dir
    load = _Sessions(models_dir, threads=2)
    found = load.found

    info = found[device][0]
    judges = {"validation": Judge(eval_set_for(info, config.profile.eval_limit), load)}
    if test is not None:
        judges["test"] = Judge(test, load)
    raw_bytes = outcomes[0].raw_input_bytes
    pre = Preprocessing.model_validate(info.preprocessing) if info.preprocessing else None
    size = (pre.crop or pre.resize) if pre else None
    input_bytes = size[0] * size[1] * info.inputs[0].shape[-1] if size else None
    rows: list[dict[str, Any]] = []
    for model, (model_info, _) in sorted(found.items()):
        if model_info.role != "full" or model_info.variant:
            continue
        try:
            profile = load_profile(models_dir, model)
        except FileNotFoundError:
            continue
        for codec, measured in profile.input_codecs.items():
            rows.append({"kind": "input", "model": model, "cut": "input", "codec": codec,
                         "bytes": measured.bytes_mean, "validation": measured.accuracy})
        for split in profile.splits:
            for codec, measured in split.codecs.items():
                rows.append({"kind": "learned" if split.bottleneck else "feature",
                             "model": model, "cut": split.split_point,
                             "codec": split.bottleneck or codec, "bytes": measured.bytes_mean,
                             "validation": measured.accuracy})
    rows = [row for row in rows if not (row["model"] == device and row["kind"] == "learned")]
    if "test" in judges:  # the device model's input codecs on the test frames as well
        judge = judges["test"]
        for row in rows:
            if row["model"] == device and row["kind"] == "input":
                row["test"] = codec_profile(str(row["codec"]), judge.inputs(device),
                                            judge.quality_of(device)).accuracy
    for point in sorted({outcome.split_point for outcome in outcomes}):
        head, tail = head_name(device, point), tail_name(device, point)
        measured_on = {}
        for split_name, judge in judges.items():
            features = load(head).run_batched(judge.inputs(device), 64)
            measured_on[split_name] = {
                codec: codec_profile(codec, features, judge.quality_of(device, tail))
                for codec in codec_names("feature") if codec_fits(codec, features[0])}
        for codec, measured in measured_on["validation"].items():
            rows.append({"kind": "feature", "model": device, "cut": point, "codec": codec,
                         "bytes": measured.bytes_mean, "validation": measured.accuracy,
                         "test": measured_on["test"][codec].accuracy if "test" in
                         measured_on else None})
    for outcome in outcomes:
        rows.append({"kind": "learned", "model": device, "cut": outcome.split_point,
                     "codec": f"bottleneck-w{outcome.width}-{outcome.bits}bit",
                     "bytes": float(outcome.bytes_per_sample),
                     "validation": outcome.validation_quality, "test": outcome.test_quality,
                     "registered": outcome.registered, "kept": outcome.kept,
                     "agreement_with_uncompressed": outcome.validation_changed.get(
                         "top1_agreement")})
    best = -1.0
    for row in sorted(rows, key=lambda r: (float(r["bytes"]), -float(r["validation"]))):
        row["vs_raw"] = raw_bytes / max(float(row["bytes"]), 1e-9)
        row["vs_model_input"] = (input_bytes / max(float(row["bytes"]), 1e-9)
                                 if input_bytes else None)
        row["frontier"] = float(row["validation"]) > best
        best = max(best, float(row["validation"]))
    validation_metric = _top1(judges["validation"].quality_name(device))
    test_metric = _top1(judges["test"].quality_name(device)) if "test" in judges else None
    uncompressed = outcomes[0].uncompressed_validation_quality
    reference = judges["validation"].data.reference
    # how decided the reference's own answers are: near ties make top-1 fidelity fragile
    reference_confidence = (float(np.median(judges["validation"].confidence(reference)))
                            if reference else None)
    majority = {split: _majority(judge, reference) for split, judge in judges.items()
                if reference}
    majority_class = majority.get("validation", (None, 0.0))[0]
    majority_label = (info.labels[majority_class] if majority_class is not None
                      and majority_class < len(info.labels) else str(majority_class))
    within = [o for o in outcomes if o.validation_quality >= uncompressed - 0.01]
    smallest = min(within, key=lambda o: o.bytes_per_sample) if within else None
    target = {
        "device_model": device, "raw_frame_bytes": raw_bytes, "model_input_bytes": input_bytes,
        "uncompressed_validation": uncompressed,
        "uncompressed_test": outcomes[0].uncompressed_test_quality,
        "smallest_within_1_point": None if smallest is None else {
            "name": smallest.name, "bytes": smallest.bytes_per_sample,
            "vs_raw": raw_bytes / smallest.bytes_per_sample,
            "vs_model_input": (input_bytes / smallest.bytes_per_sample if input_bytes
                               else None),
            "validation": smallest.validation_quality, "test": smallest.test_quality},
        "meets_7x": bool(smallest and raw_bytes / smallest.bytes_per_sample >= 7),
        "meets_64x": bool(smallest and raw_bytes / smallest.bytes_per_sample >= 64),
        "reference_median_top1_probability": reference_confidence,
        "constant_answer": None if majority_class is None else {
            "class": majority_class, "label": majority_label,
            **{split: share for split, (_, share) in majority.items()}}}
    report = BenchReport(name, out_dir, emulated=[], console=console)

    def share(value: float) -> str:
        return f"{100 * value:.1f}%"

    columns = [Column("kind", "kind", left=True), Column("model", "model", left=True),
               Column("cut", "cut"), Column("codec", "codec", left=True),
               Column("bytes", "bytes/frame", "{:,.0f}"),
               Column("vs_raw", f"× fewer than raw frame ({raw_bytes:,} B)", "{:.1f}"),
               Column("vs_model_input", f"× fewer than model input ({input_bytes or 0:,} B)",
                      "{:.1f}"),
               Column("validation", "fidelity, validation", share),
               Column("test", "fidelity, test", share),
               Column("agreement_with_uncompressed", "top-1 as uncompressed", share),
               Column("frontier", "on frontier", lambda on: "yes" if on else ""),
               Column("registered", "registered", lambda on: "yes" if on else "no")]
    ordered = sorted(rows, key=lambda r: (str(r["kind"]), str(r["model"]), str(r["cut"]),
                                          float(r["bytes"])))
    report.table(ordered, columns, title=f"bytes per frame against {validation_metric}",
                 name=f"{name}.md", notes=[
                     f"validation: {validation_metric}",
                     f"test: {test_metric or 'not measured'} (input and feature codecs of "
                     "models other than the device model: validation only, from their "
                     "profiles)",
                     f"raw frame: {device}'s input as the client sends it, resized "
                     f"({raw_bytes:,} B); model input: after its crop ({input_bytes or 0:,} B)",
                     "feature rows of other models are their own splits: the device would "
                     "run their heads (at a cut after pooling, nearly the whole model)",
                     "learned: bottlenecks trained by `tierwise optimize bottleneck`; on "
                     "frontier: no other row is both smaller and better on validation",
                     "top-1 as uncompressed: share of validation frames where the "
                     f"bottleneck's answer is {device}'s own (a codec that keeps the "
                     "device model's answers scores 100%)",
                     *([f"{reference}'s median top-1 probability on the validation frames: "
                        f"{reference_confidence:.2f} (near ties: a small change of the "
                        "features moves top-1 fidelity by many points either way)"]
                       if reference_confidence is not None else []),
                     *([f"a constant answer, {majority_label!r} (class {majority_class}, "
                        f"{reference}'s most common answer on the validation frames), for "
                        "every frame would score " + ", ".join(
                            f"{share(value)} on {split}" for split, (_, value) in
                            majority.items()) + ": fidelity above the uncompressed split's is "
                        "answers drifting towards it, not information kept"]
                       if majority_class is not None else [])])
    with report.figure(f"{name}.png", size=(12, 6)) as (_, axes):
        _plot_bytes_quality(axes, rows, raw_bytes, input_bytes, constant=None if
                            majority_class is None else (majority["validation"][1],
                                                         f"always {majority_label!r}"))
        axes.set_ylabel(f"{validation_metric.split(' on ')[0]} (%)")
        axes.set_title(f"Bytes per frame against {validation_metric}\n(hollow: the same on "
                       f"{'the test data' if test_metric else 'no test data'})", fontsize=9)
    report.write({"validation_metric": validation_metric, "test_metric": test_metric,
                  "target": target, "rows": ordered,
                  "bottlenecks": [outcome.to_dict() for outcome in outcomes]},
                 name=f"{name}.json")
    report.say_written()
    return {"target": target, "rows": ordered}


def _majority(judge: Judge, reference: str) -> tuple[int, float]:
    """The reference's most common top-1 class on the judge's data, and its share."""
    labels = np.array([result.label for result in judge.results(reference)])
    classes, counts = np.unique(labels, return_counts=True)
    return int(classes[counts.argmax()]), float(counts.max() / len(labels))


def _top1(metric: str) -> str:
    """`fidelity to X on Y` -> `fidelity to X (top-1) on Y` (what a classifier's fidelity
    counts); any other metric as it is."""
    if metric.startswith("fidelity to ") and " on " in metric:
        reference, _, data = metric.partition(" on ")
        return f"{reference} (top-1) on {data}"
    return metric


def _plot_bytes_quality(axes: Any, rows: list[dict[str, Any]], raw_bytes: int,
                        input_bytes: int | None, *,
                        constant: tuple[float, str] | None = None) -> None:
    """One colour per model, one marker per kind; filled on validation, hollow on test;
    `constant`: (quality, label) of a constant answer, dashed."""
    from matplotlib.lines import Line2D

    markers = {"input": ("s", "input codec (model remote)"),
               "feature": ("o", "split + feature codec"),
               "learned": ("*", "split + learned bottleneck")}
    models = sorted({str(row["model"]) for row in rows})
    colours = {model: f"C{index % 10}" for index, model in enumerate(models)}
    for kind, (marker, _) in markers.items():
        for model in models:
            chosen = [r for r in rows if r["kind"] == kind and r["model"] == model]
            size = 110 if kind == "learned" else 30
            axes.scatter([float(r["bytes"]) for r in chosen],
                         [100 * float(r["validation"]) for r in chosen], marker=marker, s=size,
                         color=colours[model])
            tested = [r for r in chosen if r.get("test") is not None]
            axes.scatter([float(r["bytes"]) for r in tested],
                         [100 * float(r["test"]) for r in tested], marker=marker, s=size,
                         facecolors="none", edgecolors=colours[model])
    frontier = sorted((r for r in rows if r["frontier"]), key=lambda r: float(r["bytes"]))
    axes.step([float(r["bytes"]) for r in frontier],
              [100 * float(r["validation"]) for r in frontier], where="post", color="grey",
              linewidth=1, label="frontier (validation)")
    axes.axvline(raw_bytes, color="red", linestyle=":", label=f"raw frame ({raw_bytes:,} B)")
    if input_bytes:
        axes.axvline(input_bytes, color="orange", linestyle=":",
                     label=f"model input ({input_bytes:,} B)")
    if constant is not None:
        axes.axhline(100 * constant[0], color="black", linestyle="--", linewidth=0.8,
                     label=f"{constant[1]} (validation)")
    handles = [Line2D([], [], color=colours[model], marker="o", linestyle="", label=model)
               for model in models]
    handles += [Line2D([], [], color="grey", marker=marker, linestyle="", label=label)
                for marker, label in markers.values()]
    lines = [line for line in axes.get_lines() if not str(line.get_label()).startswith("_")]
    axes.legend(handles=[*handles, *lines], fontsize=7, loc="upper left",
                bbox_to_anchor=(1.01, 1.0))
    axes.set_xscale("log")
    axes.set_xlabel("bytes sent per frame (payload, log scale)")
    axes.grid(alpha=0.3)
