"""`tierwise learn loop`: active learning end to end in one command, over real processes.

A cloud server process (registry, telemetry collector, label queue) and several devices
(`Client`s with active learning on, each its own registry subscriber, telemetry outbox and
sample queue, talking to the cloud over HTTP) run through what happens in the field:

 1. the devices answer clean images with stable version 1 of the device model;
 2. the field shifts (class mix and rotation, `tierwise.bench.active`, emulated); the
    collector's drift detector raises an alert over the devices' traces;
 3. the devices' samplers select inputs, and send them within their budget;
 4. the operator's side (what `tierwise labels select`, `labels oracle` and `learn retrain`
    do): a core-set batch is picked, labelled by the oracle, the model fine-tuned and pushed
    as a canary;
 5. the canary's cohort installs it; emulated users say whether answers were right
    (`client.feedback`); the promotion rule promotes or rolls back when the cohort has
    spoken, and every device ends on the stable version.

Each step is a timestamped event in `results.json`, with the accuracy on a held-out shifted
set before and after, the samples and bytes each device sent, and the registry's history; the
plot shows the devices' accuracy over time with the events.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from rich.console import Console

from tierwise.bench.harness import run_record
from tierwise.config import DEVICE_TIER, Config, write_config

FEEDBACK_RATE = 0.3  # emulated users: the share of answers they say something about
WINDOW = 100  # answers per point of the accuracy-over-time plot


class LoopError(RuntimeError):
    """The loop did not get through a step in time; the message names the step."""


def run_loop(config: Config, out_dir: Path, *, devices: int = 3, clean: int = 300,
             labels: int = 120, candidates: int = 200, per_device_budget: int = 120,
             watch_s: float = 180.0, seed: int = 0, keep: bool = False,
             console: Console | None = None) -> dict[str, Any]:
    """Run the loop in a fresh work directory under `out_dir`; its results (also
    `out_dir`/results.json and loop.png). The work directory (the cloud's registry, label
    queue and collector, and the config its server ran with) is removed after, unless
    `keep`: then it is `out_dir`/work, replaced if there was one, and the results name its
    config file (`config`), which the `tierwise labels` and `tierwise registry` commands
    take with `--config`."""
    console = console or Console()
    out_dir.mkdir(parents=True, exist_ok=True)
    if keep:
        work = (out_dir / "work").resolve()
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
    else:
        work = Path(tempfile.mkdtemp(prefix="loop-", dir=out_dir)).resolve()
    try:
        return _Loop(config, work, devices=devices, clean=clean, labels=labels,
                     candidates=candidates, per_device_budget=per_device_budget,
                     watch_s=watch_s, seed=seed, console=console).run(out_dir, keep)
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


class _Loop:
    def __init__(self, config: Config, work: Path, *, devices: int, clean: int, labels: int,
                 candidates: int, per_device_budget: int, watch_s: float, seed: int,
                 console: Console) -> None:
        from tierwise.bench.active import class_mixed, rendered
        from tierwise.data import load_splits
        from tierwise.zoo.names import model_name

        if devices < 1 or clean < 1 or labels < 2 or candidates < 1:
            raise LoopError(f"devices, clean, labels, candidates: expected at least 1, 1, 2 "
                            f"and 1, got {devices}, {clean}, {labels}, {candidates}")
        self.console = console
        self.started = time.monotonic()
        self.events: list[dict[str, Any]] = []
        self.points: list[dict[str, Any]] = []
        self.devices, self.clean, self.labels = devices, clean, labels
        self.candidates, self.watch_s = candidates, watch_s
        self.model = model_name("device")
        self.source_models = config.models_dir
        config = config.model_copy(deep=True)
        config.data_dir = str(work / "data")
        config.registry.root = str(work / "registry")
        config.registry.poll_s = 0.5
        config.telemetry.flush_s = 0.2
        active = config.active
        active.enabled, active.flush_s, active.period = True, 0.5, "hour"
        active.on_drift = True  # the devices select once their drift detector alerted
        active.max_samples = per_device_budget
        active.retrain.min_labels = max(1, min(active.retrain.min_labels, labels // 2))
        self.config = config
        splits = load_splits(config.data.path, config.data.validation_size, config.data.seed)
        rng = np.random.default_rng(seed)
        clean_images = rng.permutation(len(splits.test_x))[:devices * clean]
        self.clean_x, self.clean_y = splits.test_x[clean_images], splits.test_y[clean_images]
        images = np.concatenate([splits.val_x, splits.test_x])
        truth = np.concatenate([splits.val_y, splits.test_y])
        held = class_mixed(truth, np.arange(len(splits.val_x), len(images)), 500, rng)
        self.test_x, self.test_y = rendered(images[held], rng), truth[held]
        pool = class_mixed(truth, np.setdiff1d(np.arange(len(images)), held), 6000, rng)
        self.field_x, self.field_y = rendered(images[pool], rng), truth[pool]
        self.rng = rng
        self.next_field = 0

    # -- the steps ----------------------------------------------------------------------

    def run(self, out_dir: Path, keep: bool = False) -> dict[str, Any]:
        from tierwise.active.cloud import dataset_oracle
        from tierwise.bench.processes import free_port, tier_server
        from tierwise.registry.signing import PRIVATE_KEY_FILE, keygen, load_private_key
        from tierwise.registry.store import registry_of

        config = self.config
        registry = registry_of(config)
        keygen(registry.keys_dir)
        config.models_dir.mkdir(parents=True)
        shutil.copytree(self.source_models / self.model, config.models_dir / self.model)
        registry.push(config, config.models_dir, self.model,
                      load_private_key(registry.keys_dir / PRIVATE_KEY_FILE),
                      tiers=[DEVICE_TIER])
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        config_path = str(write_config(config, Path(config.data_dir) / "tierwise.toml"))
        with tier_server("cloud", self.source_models, port=port, config_path=config_path):
            self.event("cloud up", f"registry, collector and label queue at {self.url}; "
                       f"{self.model} version 1 stable")
            clients = self._devices()
            try:
                before = self._accuracy(clients[0])
                self._answer(clients, self.clean_x)
                self.event("clean traffic", f"{len(self.clean_x)} clean images answered")
                self._until(lambda: bool(self._summary("/telemetry/v1/summary")["drift_alerts"]),
                            clients, "a drift alert at the collector")
                alert = self._summary("/telemetry/v1/summary")["drift_alerts"][0]
                self.event("drift alert", f"{alert['detector']} on {alert['statistic']} "
                           f"(score {alert['score']:.2f})")
                self._until(lambda: self._received() >= self.candidates, clients,
                            f"{self.candidates} samples in the label queue")
                self.event("samples selected", f"{self._received()} samples received")
                oracle = dataset_oracle(np.concatenate([self.field_x, self.clean_x]),
                                        np.concatenate([self.field_y, self.clean_y]))
                retrained = self._retrain(oracle)
                self._until(lambda: any(self._version(c) == str(retrained["version"])
                                        for c in clients), clients, "the canary installed")
                self.event("canary installed", "on " + ", ".join(
                    c.device_id for c in clients if self._version(c) ==
                    str(retrained["version"])))
                decision = self._decide(clients)
                stable = str(registry.require(self.model).stable)
                self._until(lambda: all(self._version(c) == stable for c in clients), clients,
                            f"every device on version {stable}")
                self.event("fleet on stable", f"every device runs version {stable}")
                after = self._accuracy(clients[0])
                tail = self.next_field + len(clients) * self.clean // 2
                self._until(lambda: self.next_field >= tail, clients, "the last answers")
            finally:
                for client in clients:
                    client.close()
            sent = {c.device_id: c.sampling.stats() for c in clients if c.sampling}
            summary = self._summary("/active/v1/summary")
        results = {
            "emulated": ["class-mix and rotation shifts applied to real Fashion-MNIST here; "
                         "the oracle labels from ground truth; users' feedback from ground "
                         f"truth on {FEEDBACK_RATE:.0%} of answers"],
            "model": self.model, "devices": self.devices,
            "accuracy_before": before, "accuracy_after": after,
            "retrain": retrained, "decision": decision,
            "samples": summary, "device_samples": sent,
            # selected, yet neither at the cloud nor still queued on its device
            "lost_samples": sum(s["selected"] - s["queued"] - s["evicted"]
                                for s in sent.values())
            - sum(u["samples"] for u in summary["uploads"].values()),
            "registry_history": registry.events(self.model),
            "events": self.events, "accuracy_over_time": self.points,
            "loop_s": time.monotonic() - self.started,
            "config": config_path if keep else None}
        (out_dir / "results.json").write_text(json.dumps({**run_record(), **results}, indent=2))
        _plot(results, out_dir / "loop.png")
        self.console.print(
            f"accuracy on the shifted held-out set: {before:.2%} -> {after:.2%}; "
            f"{results['decision']['action']}; lost samples {results['lost_samples']}; "
            f"{results['loop_s']:.0f} s. Results {out_dir / 'results.json'}, plot "
            f"{out_dir / 'loop.png'}")
        if keep:
            self.console.print(f"kept the cloud's registry and label queue: --config "
                               f"{config_path}")
        return results

    def _devices(self) -> list[Any]:
        """Devices with ids chosen so the canary cohort has some of them and not all."""
        from tierwise.client import Client
        from tierwise.monitor.drift import DriftMonitor
        from tierwise.planner.plans import Local
        from tierwise.registry.store import in_canary_cohort

        share = self.config.active.retrain.canary_share
        names = [f"field-{n}" for n in range(1000)]
        inside = [name for name in names if in_canary_cohort(name, self.model, share)]
        outside = [name for name in names if name not in inside]
        ids = ([inside[0], outside[0]] if self.devices > 1 else [inside[0]])
        ids += [name for name in names if name not in ids][:self.devices - len(ids)]
        clients = []
        for device_id in ids:
            client = Client(self.config, registry_url=self.url, device_id=device_id,
                            collector_url=self.url, plan=Local(self.model), probe=False,
                            active=True, drift=DriftMonitor(reference_size=200,
                                                            window_size=100))
            clients.append(client.start())
        self.event("devices up", ", ".join(
            f"{i} ({'canary cohort' if i in inside else 'stable'})" for i in ids))
        return clients

    def _answer(self, clients: list[Any], images: np.ndarray,
                truth: np.ndarray | None = None) -> None:
        """Each device answers its share of `images`; with `truth`, users give feedback on
        some answers, and the accuracy over time is recorded."""
        for index, image in enumerate(images):
            client = clients[index % len(clients)]
            result = client.infer(image)
            if truth is None:
                continue
            right = int(result.label) == int(truth[index])
            self.points.append({"t": self.elapsed(), "device": client.device_id,
                                "version": result.trace.answered_by.model_version,
                                "correct": right})
            if self.rng.random() < FEEDBACK_RATE:
                client.feedback(result.trace.id, correct=right)

    def _until(self, condition: Any, clients: list[Any], what: str,
               timeout_s: float | None = None) -> None:
        """Keep the shifted stream coming until `condition` holds."""
        deadline = time.monotonic() + (timeout_s or self.watch_s)
        while not condition():
            if time.monotonic() > deadline:
                raise LoopError(f"timed out waiting for {what}")
            if self.next_field + 50 > len(self.field_x):
                self.next_field = 0  # the stream repeats: content-addressed, sent once
            batch = slice(self.next_field, self.next_field + 50)
            self._answer(clients, self.field_x[batch], self.field_y[batch])
            self.next_field += 50
            for client in clients:
                client.monitor_drain()

    def _retrain(self, oracle: Any) -> dict[str, Any]:
        from tierwise.active.cloud import model_embeddings, pixel_key
        from tierwise.active.retrain import retrain
        from tierwise.cloud import label_store

        store = label_store(self.config)
        chosen = store.select(self.labels, self.model, "core-set",
                              model_embeddings(self.config.models_dir, self.model))
        labelled, unknown = store.oracle(oracle)
        shifted = {pixel_key(image) for image in self.field_x}
        from_shift = sum(pixel_key(store.array(sample_id)) in shifted for sample_id in chosen)
        self.event("labelled", f"core-set picked {len(chosen)} ({from_shift} from after the "
                   f"shift); the oracle labelled {labelled}"
                   + (f" ({unknown} unknown to it)" if unknown else ""))
        result = retrain(self.config, store, push=True, seed=0)
        self.event("canary pushed", f"version {result.version}: held-out field accuracy "
                   f"{result.stable.field_accuracy or 0:.1%} -> "
                   f"{result.candidate.field_accuracy or 0:.1%}, validation "
                   f"{result.stable.validation_accuracy:.1%} -> "
                   f"{result.candidate.validation_accuracy:.1%}")
        return result.to_dict()

    def _decide(self, clients: list[Any]) -> dict[str, Any]:
        from tierwise.active.retrain import Decision, apply, decide
        from tierwise.cloud import label_store

        store = label_store(self.config)
        decision: Decision | None = None

        def decided() -> bool:
            nonlocal decision
            decision = decide(self.config, store, self.model)
            return decision.action != "wait"

        self._until(decided, clients, "the promotion rule's verdict")
        assert decision is not None
        apply(self.config, decision, self.model)
        self.event(decision.action, decision.reason)
        return {"action": decision.action, "reason": decision.reason,
                "canary": decision.canary, "feedback": decision.feedback}

    # -- helpers --------------------------------------------------------------------------

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def event(self, name: str, detail: str) -> None:
        self.events.append({"t": self.elapsed(), "event": name, "detail": detail})
        self.console.print(f"[bold]{self.elapsed():6.1f} s  {name}[/]: {detail}")

    def _summary(self, path: str) -> dict[str, Any]:
        from tierwise.registry.subscriber import registry_token

        token = registry_token("", self.config.registry_dir)
        answer = httpx.get(self.url + path, trust_env=False, timeout=10,
                           headers={"authorization": f"Bearer {token}"})
        answer.raise_for_status()
        summary: dict[str, Any] = answer.json()
        return summary

    def _received(self) -> int:
        return sum(self._summary("/active/v1/summary")["samples"].values())

    def _version(self, client: Any) -> str:
        return str(client.model_set.infos[self.model].version)

    def _accuracy(self, client: Any) -> float:
        """The device's current model on the held-out shifted set (run directly: these
        answers are neither sampled nor reported)."""
        from tierwise.models.inputs import as_batch

        session = client.session(self.model)
        batch = np.concatenate([as_batch(session.info, image) for image in self.test_x])
        return float((session.run_batched(batch).argmax(1) == self.test_y).mean())


def _plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4))
    points = results["accuracy_over_time"]
    by_device: dict[str, list[dict[str, Any]]] = {}
    for point in points:
        by_device.setdefault(point["device"], []).append(point)
    for device, rows in by_device.items():
        correct = np.array([row["correct"] for row in rows], dtype=float)
        if len(correct) < WINDOW:
            continue
        smooth = np.convolve(correct, np.ones(WINDOW) / WINDOW, mode="valid")
        ax.plot([row["t"] for row in rows[WINDOW - 1:]], smooth, label=device)
    for event in results["events"]:
        ax.axvline(event["t"], color="grey", linestyle=":", linewidth=0.8)
        ax.text(event["t"], 0.02, event["event"], rotation=90, fontsize=7,
                transform=ax.get_xaxis_transform())
    ax.set_xlabel("seconds into the loop")
    ax.set_ylabel(f"accuracy of the last {WINDOW} answers")
    ax.set_title(f"tierwise learn loop: {results['model']} on a shifted stream "
                 f"({results['accuracy_before']:.1%} -> {results['accuracy_after']:.1%} "
                 "held out)", fontsize=9)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.text(0.01, 0.005, "shift, labels and users' feedback emulated on real Fashion-MNIST",
             fontsize=6)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
