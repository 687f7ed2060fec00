"""Tier servers and the registry: hosting it (the cloud) and serving from it (any tier)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tierwise.config import Config, TierConfig
from tierwise.models.store import MODEL_FILE, load_info
from tierwise.registry.subscriber import SubscriberState, subscriber_for
from tierwise.runtime.session import OnnxModel
from tierwise.server.app import TierServer
from tierwise.server.auth import TokenVerifier


class ServerSync:
    """Keeps a `TierServer` serving what its subscriber installed: every active version of the
    models that run on its tier, the stable one answering unversioned requests. A version
    that left the channel is served `retire_grace_s` longer, for devices that have not
    polled since."""

    def __init__(self, app: TierServer, tier: str, threads: int = 1,
                 retire_grace_s: float = 30.0) -> None:
        self.app = app
        self.tier = tier
        self.threads = threads
        self.retire_grace_s = retire_grace_s
        self._leaving: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()

    def __call__(self, state: SubscriberState) -> bool:
        """Serve `state`; False (offer it again) when a model could not be loaded."""
        wanted: dict[tuple[str, str], Path] = {}
        defaults: dict[str, str] = {}
        for model, versions in state.active.items():
            for version, installed in versions.items():
                for member, path in installed.members.items():
                    if self.tier in installed.runs_on.get(member, []) and \
                            (path / MODEL_FILE).is_file():
                        wanted[(member, version)] = path
                        if version == state.stable.get(model):
                            defaults[member] = version
        with self._lock:
            served = {(name, version) for name, versions in self.app.models.items()
                      for version in versions}
            install, failed = [], []
            for key, path in wanted.items():
                if key not in served:
                    try:
                        install.append(OnnxModel(path / MODEL_FILE, load_info(path),
                                                 self.threads))
                    except Exception as error:  # keep serving what loads; retry the rest
                        failed.append(f"{key[0]} v{key[1]}: {type(error).__name__}: {error}")
            for key in wanted:
                self._leaving.pop(key, None)
            now = time.monotonic()
            for key in served - set(wanted):
                self._leaving.setdefault(key, now + self.retire_grace_s)
            retire = self._due(now)
            self.app.update(install, retire, defaults)
            serving = self.app.served_versions()
        if self._leaving:
            timer = threading.Timer(self.retire_grace_s + 0.05, self._retire_due)
            timer.daemon = True
            timer.start()
        if install or retire:
            print(f"tier {self.tier} now serves {serving}", flush=True)
        for message in failed:
            print(f"tier {self.tier} could not load {message}; trying again at the next poll",
                  flush=True)
        return not failed

    def _due(self, now: float) -> list[tuple[str, str]]:
        due = [key for key, deadline in self._leaving.items() if deadline <= now]
        for key in due:
            del self._leaving[key]
        return due

    def _retire_due(self) -> None:
        with self._lock:
            retire = self._due(time.monotonic())
            if retire:
                self.app.update([], retire)
                print(f"tier {self.tier} retired {retire}", flush=True)


def serve_from_registry(tier_name: str, tier: TierConfig, config: Config, url: str, *,
                        host: str, port: int, threads: int = 1, channel: str | None = None,
                        device_id: str | None = None,
                        wrap: Callable[[TierServer], Any] | None = None,
                        verifier: TokenVerifier | None = None) -> None:
    """Serve what the registry at `url` deploys to this tier, hot-swapping new versions, until
    interrupted; `wrap` puts another ASGI layer in front (the cloud's control plane),
    `verifier` checks bearer tokens (`require_auth`)."""
    from tierwise.server.app import run

    app = TierServer(tier_name, tier, {}, verifier=verifier)
    subscriber = subscriber_for(config, tier_name, url, channel=channel,
                                device_id=device_id or f"{tier_name}-{host}-{port}")
    subscriber.on_change = ServerSync(app, tier_name, threads, config.registry.retire_grace_s)
    app.on_startup.append(subscriber.start)
    try:
        run(wrap(app) if wrap else app, host, port,
            f"tierwise serve: tier {tier_name}, models from the registry {url} channel "
            f"{subscriber.channel} (device id {subscriber.device_id})", config.tls)
    finally:
        subscriber.stop()
