"""`tierwise bench drift`: how fast each drift detector sees a shift, and how often it cries
wolf on data that did not shift.

For each shift, a fresh `DriftMonitor` takes the statistics of every image the device model
classifies (pixel mean and standard deviation, confidence, predicted class): a reference of
clean validation images, then `clean` clean test images (every alert there is a false
alarm), then `shifted` test images with the shift applied. The detection delay is the number
of shifted images seen before a detector's first alert on any statistic.

Shifts: Gaussian pixel noise, rotation, dimmer images, and a change in class mix (only three
classes). The images are real Fashion-MNIST; the shifts are applied here (emulated).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from tierwise.bench.harness import run_record
from tierwise.config import Config
from tierwise.data import load_splits
from tierwise.monitor.drift import DriftMonitor, DriftScore
from tierwise.profile.calibration import softmax
from tierwise.runtime.session import load_models
from tierwise.zoo.names import model_name

DEVICE = model_name("device")


def _noise(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    noisy = images.astype(np.float32) + rng.normal(0, 40, images.shape)
    return np.clip(noisy, 0, 255).astype(np.uint8)


def _rotation(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(image[0]).rotate(30))[None]
                     for image in images])


def _dimmer(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return (images.astype(np.float32) * 0.6).astype(np.uint8)


SHIFTS: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "noise (sigma 40)": _noise,
    "rotation (30 deg)": _rotation,
    "brightness (x0.6)": _dimmer,
    "class mix (3 classes)": lambda images, rng: images,  # the selection is the shift
}
CLASS_MIX = (0, 1, 2)


def run_bench_drift(config: Config, out_dir: Path, *, clean: int = 1000, shifted: int = 1000,
                    reference: int = 500, window: int = 200, step: int = 25, seed: int = 0,
                    console: Console | None = None) -> dict[str, Any]:
    console = console or Console()
    out_dir.mkdir(parents=True, exist_ok=True)
    splits = load_splits(config.data.path, config.data.validation_size, config.data.seed)
    model = load_models(config.models_dir, names=[DEVICE])[DEVICE]
    rng = np.random.default_rng(seed)

    def statistics(images: np.ndarray) -> list[dict[str, float]]:
        probabilities = softmax(model.run_batched(images), model.info.temperature)
        pixels = images.reshape(len(images), -1).astype(np.float32) / 255.0
        return [{"input_mean": float(m), "input_std": float(s), "confidence": float(p.max()),
                 "label": float(p.argmax())}
                for m, s, p in zip(pixels.mean(1), pixels.std(1), probabilities, strict=True)]

    reference_stats = statistics(splits.val_x[:reference])
    rows: list[dict[str, Any]] = []
    traces: dict[str, list[DriftScore]] = {}
    for shift, apply in SHIFTS.items():
        order = rng.permutation(len(splits.test_x))
        clean_images = splits.test_x[order[:clean]]
        rest = order[clean:]
        if shift.startswith("class mix"):
            rest = rest[np.isin(splits.test_y[rest], CLASS_MIX)]
        shifted_images = apply(splits.test_x[rest[:shifted]], rng)
        monitor = DriftMonitor(window_size=window, reference_size=reference, step=step)
        for values in reference_stats + statistics(clean_images) + \
                statistics(shifted_images):
            monitor.update(values)
        start = reference + clean  # the sample count at which the shift begins
        traces[shift] = monitor.scores
        for detector in ("psi", "ks"):
            alerts = [a for a in monitor.alerts if a.detector == detector]
            false = [a for a in alerts if a.sample <= start]
            hits = [a for a in alerts if a.sample > start]
            first = min(hits, key=lambda a: a.sample) if hits else None
            checks = sum(1 for s in monitor.scores if s.detector == detector
                         and s.sample <= start)
            rows.append({"shift": shift, "detector": detector,
                         "delay_samples": first.sample - start if first else None,
                         "first_statistic": first.statistic if first else None,
                         "false_alarms": len(false), "clean_checks": checks})
    results = {"emulated": ["shifts applied to real Fashion-MNIST test images here"],
               "clean": clean, "shifted": shifted, "reference": reference, "window": window,
               "step": step, "model": DEVICE, "rows": rows}
    (out_dir / "results.json").write_text(json.dumps({**run_record(), **results}, indent=2))
    _plot(traces, reference + clean, out_dir / "drift.png")
    table = Table(title=f"drift detection: window {window}, checked every {step}",
                  caption="delay: shifted images seen before the first alert; false alarms: "
                  f"alerts over {clean} clean images (shifts emulated)")
    for column in ("shift", "detector", "delay (samples)", "first on", "false alarms"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["shift"], row["detector"],
                      "missed" if row["delay_samples"] is None else str(row["delay_samples"]),
                      row["first_statistic"] or "-",
                      f"{row['false_alarms']} / {row['clean_checks']} checks")
    console.print(table)
    console.print(f"wrote {out_dir}/results.json, drift.png")
    return results


def _plot(traces: dict[str, list[DriftScore]], start: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(traces), 1, figsize=(8, 2.2 * len(traces)), sharex=True)
    for ax, (shift, scores) in zip(np.atleast_1d(axes), traces.items(), strict=True):
        for statistic in ("input_mean", "confidence"):
            series = [s for s in scores if s.detector == "psi" and s.statistic == statistic]
            ax.plot([s.sample for s in series], [s.score for s in series],
                    label=f"PSI {statistic}")
            alerts = [s for s in series if s.alert]
            ax.scatter([s.sample for s in alerts], [s.score for s in alerts], marker="x",
                       color="red", zorder=3)
        ax.axvline(start, color="black", linestyle="--", linewidth=1)
        ax.axhline(0.25, color="grey", linestyle=":", linewidth=1)
        ax.set_title(f"{shift} (dashed: shift begins; x: alert)", fontsize=9)
        ax.set_yscale("symlog", linthresh=0.1)
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[0].legend(fontsize=7, loc="upper left")
    np.atleast_1d(axes)[-1].set_xlabel("images seen")
    fig.text(0.01, 0.005, "shifts emulated on real Fashion-MNIST test images", fontsize=6)
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
