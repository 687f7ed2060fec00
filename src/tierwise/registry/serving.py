"""Tier servers serving from the registry: what a subscriber installed, hot-swapped in."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from tierwise.models.store import MODEL_FILE, load_info
from tierwise.registry.subscriber import SubscriberState
from tierwise.runtime.session import OnnxModel
from tierwise.server.app import TierServer


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
