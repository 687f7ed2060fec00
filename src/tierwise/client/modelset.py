"""The device's models: one immutable snapshot per request, kept current from a registry.

A `ModelSet` is what a models directory held when it was read: the metadata of every model
(those that run on a server too: the planner and the remote stages need their inputs and
versions) and the resolved weights of those this device runs. The client holds the current
snapshot and replaces it whole when the registry swaps a version in; a request takes it once,
at its start, and uses only it, so a request that straddles a swap runs one consistent set
of versions. Loaded sessions and tasks (`LoadedModels`) are caches on the client, keyed by
what a snapshot names (a resolved path names one version's file).

From a registry, the models directory is a `DeviceView` the subscriber keeps current:
`subscribe` starts it, `follow` decides on each change what the device may switch to
(`servable`) and hands that to the client to swap in.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import httpx

from tierwise.config import DEVICE_TIER, Config
from tierwise.models.store import ModelInfo, list_models, tier_models
from tierwise.planner.plans import RemoteStageError
from tierwise.registry.subscriber import (
    DeviceView,
    InstalledVersion,
    RegistryUnavailableError,
    Subscriber,
    SubscriberState,
    subscriber_for,
)
from tierwise.runtime.session import OnnxModel
from tierwise.tasks import Task, task_for

log = logging.getLogger("tierwise.client")


@dataclass(frozen=True)
class ModelSet:
    """The models under `directory` as read once: `infos` (name -> metadata) for every model
    with metadata, `paths` (name -> resolved model.onnx) only where this device has the
    weights. Never changed after it is made: a newer directory is a new `ModelSet`."""

    directory: Path
    infos: Mapping[str, ModelInfo]
    paths: Mapping[str, Path]

    @classmethod
    def read(cls, directory: str | Path) -> ModelSet:
        """Metadata of every model in `directory`; weights where this device has them."""
        directory = Path(directory)
        found = list_models(directory, weights=False)
        return cls(directory,
                   MappingProxyType({name: info for name, (info, _) in found.items()}),
                   MappingProxyType({name: path.resolve() for name, (_, path) in found.items()
                                     if path.is_file()}))

    def device_model(self, config: Config, requested: str | None = None) -> str:
        """The model every fallback ends at: `requested`, else the first model the device
        tier runs. Raises FileNotFoundError, saying what there is, when there is none."""
        if requested is None:
            on_device = tier_models(config, self.infos).get(DEVICE_TIER, [])
            if not on_device:
                raise FileNotFoundError(
                    f"device_model: no model under {self.directory} runs on the device "
                    f"(found {sorted(self.infos)}); import one with `tierwise models add "
                    "NAME FILE --runs-on device` or list it in tiers.device.models")
            requested = on_device[0]
        if requested not in self.infos:
            raise FileNotFoundError(
                f"device_model: {requested!r} not found under {self.directory} "
                f"(found {sorted(self.infos)}); import it with `tierwise models add`")
        return requested


class LoadedModels:
    """What a `ModelSet` names, loaded once and shared by every snapshot that names it: an
    ONNX Runtime session per resolved path (one version's file), a task per model name,
    version and sha256. `threads` is each session's ONNX Runtime thread count."""

    def __init__(self, threads: int = 1) -> None:
        self.threads = threads
        self._sessions: dict[Path, OnnxModel] = {}
        self._tasks: dict[tuple[str, str, str], Task[Any]] = {}
        self._lock = threading.Lock()

    def session(self, model_set: ModelSet, model: str) -> OnnxModel:
        """`model` of `model_set`, loaded (on first use of its file)."""
        path = model_set.paths.get(model)
        if path is None:
            raise FileNotFoundError(f"model {model!r} is not on this device "
                                    f"({model_set.directory})")
        session = self._sessions.get(path)
        if session is None:
            with self._lock:
                session = self._sessions.get(path)
                if session is None:
                    session = OnnxModel(path, model_set.infos[model], self.threads)
                    self._sessions[path] = session
        return session

    def task(self, model_set: ModelSet, model: str) -> Task[Any]:
        """The task that reads the outputs of `model` of `model_set` (by its metadata)."""
        info = model_set.infos.get(model)
        if info is None:
            raise FileNotFoundError(f"model {model!r}: no metadata on this device "
                                    f"({model_set.directory})")
        key = (info.name, info.version, info.sha256)
        task = self._tasks.get(key)
        if task is None:
            task = self._tasks[key] = task_for(info)
        return task

    def keep_only(self, model_set: ModelSet) -> None:
        """Drop the sessions whose file `model_set` no longer names (a swapped-out version;
        a request already holding one keeps it)."""
        current = set(model_set.paths.values())
        with self._lock:
            self._sessions = {path: session for path, session in self._sessions.items()
                              if path in current}


# -- kept current from a registry ------------------------------------------------------------


def subscribe(config: Config, url: str, channel: str | None, device_id: str,
              timeout_s: float) -> tuple[Subscriber, DeviceView]:
    """Start from the registry (or, when it cannot be reached, from what an earlier run
    installed): (the subscriber, not yet polling, and the view of the models it installed).
    Raises RegistryUnavailableError when the registry cannot be reached and nothing is."""
    subscriber = subscriber_for(config, DEVICE_TIER, url, channel=channel, device_id=device_id)
    view = DeviceView(subscriber.cache_dir / "models")
    try:
        view.update(subscriber.wait_until_ready(timeout_s))
    except RegistryUnavailableError:
        if not any(view.directory.glob("*/metadata.json")):
            subscriber.stop()
            raise
        log.warning("registry %s unreachable: starting offline with the models installed "
                    "earlier", url)
    return subscriber, view


def follow(subscriber: Subscriber, is_served: Callable[[InstalledVersion], bool],
           install: Callable[[dict[str, InstalledVersion]], None]) -> None:
    """On every change the subscriber sees, `install` the versions the device may switch to
    (`servable`); the subscriber offers the change again while some model still waits."""
    shown = dict(subscriber.state.current)

    def on_change(state: SubscriberState) -> bool:
        taken, waiting = servable(state, shown, is_served)
        shown.clear()
        shown.update(taken)
        install(taken)
        return not waiting

    subscriber.on_change = on_change


def servable(state: SubscriberState, shown: Mapping[str, InstalledVersion],
             is_served: Callable[[InstalledVersion], bool]
             ) -> tuple[dict[str, InstalledVersion], list[str]]:
    """The versions in `state` this device can switch to now: (versions, models still
    waiting). A new version of a model that runs on a server is taken once every such
    tier answers ready for it (`is_served`); until then the device keeps the version it
    `shown`, so its remote stages never ask a server for a version it does not have yet."""
    taken = {model: kept for model, kept in shown.items() if model not in state.current}
    waiting = []
    for model, installed in state.current.items():
        previous = shown.get(model)
        if previous is None or previous.version == installed.version or is_served(installed):
            taken[model] = installed
        else:
            taken[model] = previous
            waiting.append(model)
    return taken, waiting


def served_everywhere(installed: InstalledVersion, config: Config,
                      http: Callable[[str], httpx.Client]) -> bool:
    """Whether every remote tier `installed` runs on answers ready for its version."""
    for member, tiers in installed.runs_on.items():
        for tier in tiers:
            if tier == DEVICE_TIER or tier not in config.links:
                continue
            try:
                ready = http(tier).get(
                    f"/v2/models/{member}/versions/{installed.version}/ready", timeout=2.0)
            except (httpx.HTTPError, RemoteStageError):
                return False
            if ready.status_code != 200:
                return False
    return True
