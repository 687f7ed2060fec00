"""`tierwise bench active`: how many labels each sampler needs on a shifted stream.

The field has shifted from what the device model was trained on, in two ways at once: the
class mix (half the stream is three classes, `bench.drift.CLASS_MIX`) and the rendering
(every image rotated 30 degrees, `bench.drift.SHIFTS`). Both are applied here (emulated) to
real Fashion-MNIST images the model was never trained on: a held-out set from the test split,
which every model is measured on, and a field of `POOL` distinct images from the rest of the
test split and the validation split, shifted the same way.

Each round, each of `devices` devices sees `stream` images of the field (no two devices the
same one in a round; across rounds they come again, as a camera sees the same things again),
answers them with the current model, and sends the `budget / devices` its sampler
(`tierwise.active.samplers`) picks. In the core-set and BADGE runs the device sends three
times as many margin candidates, and the cloud picks the batch (Sener & Savarese 2018; Ash et
al. 2020). Users flag a share of the wrong answers (`FLAG_RATE`, emulated), which the feedback
sampler and "feedback+margin" (both as one: `Combined`, flagged inputs first) see. Disagreement
compares with the cloud model's answer on every input, as if every request escalated: its
best case. The label queue is content-addressed, so a sample labelled already is not labelled
again (its bytes were still sent). The oracle labels the rest; the device model is fine-tuned
from its stable weights on every label so far plus the replay sample
(`tierwise.active.retrain.fine_tune`, what `tierwise learn retrain` runs), and the next
round's devices run it. "all" labels every image the devices saw: the most one could spend.
Every sampler sees the same streams; each run is repeated over `seeds` and averaged.

The target (issue 18): the best sampler reaches random sampling's final accuracy with at most
half its labels (`labels_to_match_random`, on the curves averaged over the seeds). Bytes are
what each device uploaded: the samples it sent, as `.npy`, the way `DeviceSampling` sends
them.
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from tierwise.active.samplers import (
    DEVICE_SAMPLERS,
    Badge,
    Combined,
    CoreSet,
    Feedback,
    Observation,
    Random,
    Sampler,
    device_sampler,
)
from tierwise.bench.harness import BenchReport, Column, run_record
from tierwise.config import Config
from tierwise.profile.calibration import softmax

SAMPLERS = ("random", "entropy", "margin", "disagreement", "feedback", "feedback+margin",
            "margin+core-set", "margin+badge", "all")
# emulated users: each wrong answer is flagged (`client.feedback(correct=False)`) with this
# probability, a right one never
FLAG_RATE = 0.3
CANDIDATES_PER_PICK = 3  # margin candidates a device sends per label, for the core-set run
MIX_SHARE = 0.5  # the share of the stream the class mix's three classes make up
TARGET_RATIO = 2.0  # random's labels over the best sampler's, to reach random's accuracy
POOL = 6000  # distinct field images
NPY_HEADER_BYTES = 128


def class_mixed(labels: np.ndarray, among: np.ndarray, count: int,
                rng: np.random.Generator) -> np.ndarray:
    """`count` indices of `among` (into `labels`) with the class mix: `MIX_SHARE` of them of
    `CLASS_MIX`'s classes, in random order. ValueError when there are too few."""
    from tierwise.bench.drift import CLASS_MIX

    mixed = np.isin(labels[among], CLASS_MIX)
    take = round(count * MIX_SHARE)
    if take > mixed.sum() or count - take > (~mixed).sum():
        raise ValueError(f"stream: {count} images with the class mix need {take} of classes "
                         f"{CLASS_MIX} and {count - take} of the others; there are "
                         f"{int(mixed.sum())} and {int((~mixed).sum())}: fewer devices, "
                         "rounds or images per round")
    chosen = np.concatenate([rng.choice(among[mixed], take, replace=False),
                             rng.choice(among[~mixed], count - take, replace=False)])
    rng.shuffle(chosen)
    return chosen


def _mixable(labels: np.ndarray, among: np.ndarray) -> int:
    """The most images of `among` that `class_mixed` can draw."""
    from tierwise.bench.drift import CLASS_MIX

    mixed = int(np.isin(labels[among], CLASS_MIX).sum())
    return int(min(mixed / MIX_SHARE, (len(among) - mixed) / (1 - MIX_SHARE)))


def rendered(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The rendering change: every image rotated 30 degrees (`bench.drift.SHIFTS`)."""
    from tierwise.bench.drift import SHIFTS

    return SHIFTS["rotation (30 deg)"](images, rng)


def labels_to_reach(curve: list[tuple[float, float]], accuracy: float) -> float | None:
    """The labels at which `curve` ([(labels, accuracy)], labels ascending) first reaches
    `accuracy`, interpolated linearly between points; None if it never does."""
    for (l0, a0), (l1, a1) in itertools.pairwise(curve):
        if a0 >= accuracy:
            return l0
        if a1 >= accuracy:
            return l0 + (l1 - l0) * (accuracy - a0) / (a1 - a0)
    return curve[-1][0] if curve and curve[-1][1] >= accuracy else None


class _Run:
    """One sampler over the rounds, for one seed."""

    def __init__(self, bench: ActiveBench, sampler: str, seed: int) -> None:
        self.bench, self.sampler, self.seed = bench, sampler, seed
        self.model = bench.stable
        self.labelled = np.zeros(0, dtype=np.int64)  # indices into the field pool
        self.curve = [(0.0, bench.accuracy(bench.stable))]
        self.bytes_per_device = np.zeros(bench.devices, dtype=np.int64)

    def round(self, number: int) -> None:
        bench = self.bench
        sent = []
        for device in range(bench.devices):
            seen = bench.streams[self.seed][number][device]
            chosen = seen[self.pick(bench.pool_x[seen], number, device)]
            self.bytes_per_device[device] += len(chosen) * bench.sample_bytes
            sent.append(chosen)
        # the label queue is content-addressed: what is labelled already is not again
        candidates = np.setdiff1d(np.concatenate(sent), self.labelled)
        x = bench.pool_x[candidates]
        if self.sampler == "margin+core-set":  # the cloud picks a covering batch
            labelled = bench.pool_x[self.labelled] if len(self.labelled) else None
            vectors = bench.embed(self.model, np.concatenate([x, labelled])
                                  if labelled is not None else x)
            keep = CoreSet().select(vectors[:len(x)], bench.budget,
                                    vectors[len(x):] if labelled is not None else None)
            candidates = candidates[keep]
        elif self.sampler == "margin+badge":
            probabilities = softmax(bench.logits(self.model, x), bench.temperature)
            keep = Badge(self.seed).select(
                Badge.embeddings(probabilities, bench.embed(self.model, x)), bench.budget)
            candidates = candidates[keep]
        self.labelled = np.concatenate([self.labelled, candidates])  # the oracle labels them
        self.model, _ = bench.fine_tune(bench.pool_x[self.labelled],
                                        bench.pool_y[self.labelled], self.seed)
        self.curve.append((float(len(self.labelled)), bench.accuracy(self.model)))

    def pick(self, x: np.ndarray, number: int, device: int) -> np.ndarray:
        """Indices into the device's stream `x` that it sends."""
        bench = self.bench
        if self.sampler == "all":
            return np.arange(len(x))
        quota = bench.budget // bench.devices
        cloud_picks = self.sampler in ("margin+core-set", "margin+badge")
        probabilities = softmax(bench.logits(self.model, x), bench.temperature)
        server = bench.server_labels[self.seed][number][device]
        truth = bench.pool_y[bench.streams[self.seed][number][device]]
        flagged = bench.flags[self.seed][number][device]
        observations = [
            Observation(f"{self.seed}-{number}-{device}-{i}", confidence=float(p.max()),
                        probabilities=p, device_label=int(p.argmax()),
                        server_label=int(server[i]) if self.sampler == "disagreement"
                        else None,
                        feedback=Feedback(False) if flagged[i] and p.argmax() != truth[i]
                        else None, classes=10)
            for i, p in enumerate(probabilities)]
        sampler: Sampler
        if self.sampler == "random":
            sampler = Random(self.seed)
        elif self.sampler == "feedback+margin":
            sampler = Combined([device_sampler("feedback"), device_sampler("margin")])
        else:
            sampler = device_sampler("margin" if cloud_picks else self.sampler)
        if cloud_picks:
            quota *= CANDIDATES_PER_PICK
        return np.asarray(sampler.select(observations, quota), dtype=np.int64)


class ActiveBench:
    """The shared parts: the stable model, the streams, the held-out set, the replay."""

    def __init__(self, config: Config, *, devices: int, rounds: int, stream: int, budget: int,
                 seeds: int, test_size: int) -> None:
        from tierwise.data import load_splits
        from tierwise.zoo.build import load_trained
        from tierwise.zoo.names import model_name

        self.config = config
        self.devices, self.rounds, self.stream, self.budget = devices, rounds, stream, budget
        splits = load_splits(config.data.path, config.data.validation_size, config.data.seed)
        self.stable, info = load_trained(config.models_dir, model_name("device"))
        assert info.trained is not None
        self.architecture = info.trained.architecture
        self.temperature = info.temperature
        cloud, _ = load_trained(config.models_dir, model_name("cloud"))
        # never trained on: the validation and test splits; the held-out set from the test
        # split, the devices' streams from the rest
        images = np.concatenate([splits.val_x, splits.test_x])
        labels = np.concatenate([splits.val_y, splits.test_y])
        rng = np.random.default_rng(1234)
        held = class_mixed(labels, np.arange(len(splits.val_x), len(images)), test_size, rng)
        self.test_x, self.test_y = rendered(images[held], rng), labels[held]
        pool = np.setdiff1d(np.arange(len(images)), held)
        self.sample_bytes = NPY_HEADER_BYTES + int(np.prod(splits.test_x.shape[1:]))
        # streams[seed][round][device] = indices into the field pool; the same for every
        # sampler
        self.streams: list[list[list[np.ndarray]]] = []
        self.server_labels: list[list[list[np.ndarray]]] = []
        self.flags: list[list[list[np.ndarray]]] = []  # which answers a user would flag
        self.replay: list[tuple[np.ndarray, np.ndarray]] = []
        # the field: this many distinct images, class-mixed and rotated; each round every
        # device sees `stream` of them (no two devices the same one in a round), so a
        # camera sees the same things again across rounds, as cameras do
        field = class_mixed(labels, pool, min(POOL, _mixable(labels, pool)), rng)
        self.pool_x, self.pool_y = rendered(images[field], rng), labels[field]
        if devices * stream > len(field):
            raise ValueError(f"stream: {devices} devices x {stream} images per round exceed "
                             f"the {len(field)} distinct field images")
        for seed in range(seeds):
            seed_rng = np.random.default_rng(seed)
            parts = []
            for _ in range(rounds):
                order = seed_rng.permutation(len(field))
                parts.append([order[k * stream:(k + 1) * stream] for k in range(devices)])
            self.streams.append(parts)
            self.server_labels.append([[self.logits(cloud, self.pool_x[seen]).argmax(1)
                                        for seen in row] for row in parts])
            self.flags.append([[seed_rng.random(len(seen)) < FLAG_RATE for seen in row]
                               for row in parts])
            replay = seed_rng.choice(len(splits.train_x), config.active.retrain.replay,
                                     replace=False)
            self.replay.append((splits.train_x[replay], splits.train_y[replay]))

    @staticmethod
    def logits(model: Any, x: np.ndarray) -> np.ndarray:
        from tierwise.zoo.train import predict_logits

        return predict_logits(model, x)

    def accuracy(self, model: Any) -> float:
        return float((self.logits(model, self.test_x).argmax(1) == self.test_y).mean())

    def embed(self, model: Any, x: np.ndarray) -> np.ndarray:
        """The model's features before its classifier (float [n, d])."""
        import torch
        from torch import nn

        trunk = nn.Sequential(*list(model.children())[:-1]).eval()
        with torch.inference_mode():
            return np.concatenate([trunk(torch.from_numpy(np.ascontiguousarray(
                x[i:i + 512]))).reshape(len(x[i:i + 512]), -1).numpy()
                for i in range(0, len(x), 512)])

    def fine_tune(self, field_x: np.ndarray, field_y: np.ndarray, seed: int) -> tuple[Any, float]:
        from tierwise.active.retrain import fine_tune

        replay_x, replay_y = self.replay[seed]
        return fine_tune(self.stable, self.architecture, field_x, field_y, replay_x, replay_y,
                         self.config, seed, Progress(disable=True))  # the bench has its own


def run_bench_active(config: Config, out_dir: Path, *, devices: int = 4, rounds: int = 12,
                     stream: int = 500, budget: int = 40, seeds: int = 3,
                     test_size: int = 2000, samplers: tuple[str, ...] = SAMPLERS,
                     console: Console | None = None) -> dict[str, Any]:
    console = console or Console()
    for name in samplers:
        if name not in SAMPLERS:
            raise ValueError(f"samplers: expected some of {SAMPLERS}, got {name!r}")
    if budget < devices:
        raise ValueError(f"budget: at least one label per device per round ({devices}), got "
                         f"{budget}")
    started = time.monotonic()
    out_dir.mkdir(parents=True, exist_ok=True)
    bench = ActiveBench(config, devices=devices, rounds=rounds, stream=stream, budget=budget,
                        seeds=seeds, test_size=test_size)
    runs: dict[str, list[_Run]] = {name: [] for name in samplers}
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                  TextColumn("{task.completed}/{task.total} retrains"), TimeElapsedColumn(),
                  console=console) as progress:
        task = progress.add_task("bench active", total=len(samplers) * seeds * rounds)
        for name in samplers:
            for seed in range(seeds):
                run = _Run(bench, name, seed)
                for number in range(rounds):
                    progress.update(task, description=f"{name}, seed {seed}, round {number + 1}")
                    run.round(number)
                    progress.advance(task)
                runs[name].append(run)
    results = summarize(runs, bench, seeds)
    results.update({
        "emulated": ["class-mix and rotation shifts applied to real Fashion-MNIST test images "
                     "here; the oracle labels from ground truth",
                     f"users flag {FLAG_RATE:.0%} of wrong answers (feedback, feedback+margin)"],
        "setting": {"devices": devices, "rounds": rounds, "stream_per_device_round": stream,
                    "labels_per_round": budget, "seeds": seeds, "test_size": test_size,
                    "mix_share": MIX_SHARE, "replay": config.active.retrain.replay,
                    "field_weight": config.active.retrain.field_weight,
                    "train": config.active.retrain.train.model_dump(),
                    "core_set_candidates_per_label": CANDIDATES_PER_PICK,
                    "flag_rate": FLAG_RATE},
        "methods": {name: DEVICE_SAMPLERS[name].method for name in DEVICE_SAMPLERS},
        "bench_s": time.monotonic() - started})
    (out_dir / "results.json").write_text(json.dumps({**run_record(), **results}, indent=2))
    plot = _plot(results, out_dir / "label-efficiency.png")
    write_table(results, out_dir, console)
    best = results["best"]
    console.print(
        f"random reaches {results['random_final_accuracy']:.2%} with "
        f"{results['random_labels']:.0f} labels; " + (
            f"{best['sampler']} with {best['labels']:.0f} ({best['ratio']:.2f}x fewer; target "
            f"{TARGET_RATIO:g}x: {'met' if best['ratio'] >= TARGET_RATIO else 'NOT met'})"
            if best else "no sampler reaches it") +
        f". Shifts emulated. {results['bench_s']:.0f} s. Results {out_dir / 'results.json'}, "
        f"plot {plot}")
    return results


def summarize(runs: dict[str, list[_Run]], bench: ActiveBench, seeds: int) -> dict[str, Any]:
    """Mean curves over the seeds, labels to reach random's final accuracy, bytes per device."""
    samplers: dict[str, Any] = {}
    for name, seeded in runs.items():
        labels = np.mean([[point[0] for point in run.curve] for run in seeded], axis=0)
        accuracy = np.array([[point[1] for point in run.curve] for run in seeded])
        samplers[name] = {
            "labels": labels.tolist(), "accuracy": accuracy.mean(0).tolist(),
            "accuracy_min": accuracy.min(0).tolist(), "accuracy_max": accuracy.max(0).tolist(),
            "bytes_per_device": np.mean([run.bytes_per_device for run in seeded],
                                        axis=0).tolist()}
    out: dict[str, Any] = {"samplers": samplers, "best": None}
    if "random" in samplers:
        random = samplers["random"]
        target, spent = random["accuracy"][-1], random["labels"][-1]
        out.update({"random_final_accuracy": target, "random_labels": spent})
        for row in samplers.values():
            reached = labels_to_reach(list(zip(row["labels"], row["accuracy"], strict=True)),
                                      target)
            row["labels_to_match_random"] = reached
            row["ratio_vs_random"] = spent / reached if reached else None
        contenders = [(row["ratio_vs_random"], name) for name, row in samplers.items()
                      if name not in ("random", "all") and row["ratio_vs_random"]]
        if contenders:
            ratio, name = max(contenders)
            out["best"] = {"sampler": name, "ratio": ratio,
                           "labels": samplers[name]["labels_to_match_random"],
                           "target_ratio": TARGET_RATIO, "met": ratio >= TARGET_RATIO}
    return out


COLUMNS = (
    Column("sampler", "sampler", left=True), Column("labels", "labels", "{:.0f}"),
    Column("start", "start", "{:.2%}"), Column("final", "final accuracy", "{:.2%}"),
    Column("reached", "labels to reach random's final", "{:.0f}"),
    Column("ratio", "vs random", "{:.2f}×"), Column("kb_sent", "KB sent per device", "{:.1f}"))


def write_table(results: dict[str, Any], out_dir: Path, console: Console | None = None,
                show: bool = True) -> Path:
    """The results' table, printed and written as `out_dir`/table.md, with what was
    emulated. Reads only the results document, so a results.json can be tabled again."""
    rows = [{"sampler": name, "labels": row["labels"][-1], "start": row["accuracy"][0],
             "final": row["accuracy"][-1], "reached": row.get("labels_to_match_random"),
             "ratio": row.get("ratio_vs_random"),
             "kb_sent": float(np.mean(row["bytes_per_device"])) / 1e3}
            for name, row in results["samplers"].items()]
    best = results.get("best")
    notes = []
    if best:
        notes.append(f"Best: {best['sampler']}, {best['labels']:.0f} labels to reach random's "
                     f"{results['random_final_accuracy']:.2%} ({best['ratio']:.2f}× fewer; "
                     f"target {best['target_ratio']:g}×: "
                     f"{'met' if best['met'] else 'not met'}).")
    report = BenchReport("active", out_dir, emulated=results["emulated"], console=console)
    return report.table(rows, COLUMNS, title="label efficiency on a shifted stream",
                        notes=notes, show=show)


def _plot(results: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (curves, sent) = plt.subplots(1, 2, figsize=(12, 4.5),
                                       gridspec_kw={"width_ratios": [2, 1]})
    for name, row in results["samplers"].items():
        style = {"linestyle": "--", "color": "black"} if name == "all" else \
            {"linestyle": ":", "color": "grey"} if name == "random" else {}
        curves.plot(row["labels"], row["accuracy"], marker="o", markersize=3, label=name,
                    **style)
        curves.fill_between(row["labels"], row["accuracy_min"], row["accuracy_max"],
                            alpha=0.12, color=style.get("color"))
    if "random_final_accuracy" in results:
        curves.axhline(results["random_final_accuracy"], color="grey", linewidth=0.8)
    curves.set_xscale("symlog", linthresh=results["setting"]["labels_per_round"])
    curves.set_xlabel("labels spent (all devices)")
    curves.set_ylabel("accuracy on the shifted held-out set")
    curves.set_title("accuracy against labels (mean of seeds; band: min..max)", fontsize=9)
    curves.grid(alpha=0.3)
    curves.legend(fontsize=8)
    names = list(results["samplers"])
    sent.bar(names, [np.mean(results["samplers"][n]["bytes_per_device"]) / 1e3 for n in names])
    sent.set_ylabel("KB uploaded per device")
    sent.set_yscale("log")
    sent.tick_params(axis="x", labelrotation=45, labelsize=7)
    sent.set_title("bytes per device (samples as .npy)", fontsize=9)
    fig.text(0.01, 0.005, "shifts emulated on real Fashion-MNIST; oracle labels", fontsize=6)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
