"""Subscribing to a registry: poll a channel, verify, download, install, hand over.

Edge servers and devices run a `Subscriber`. Each poll asks the cloud for the deployment of
its channel (with If-None-Match, so an unchanged one costs a 304), and for every version it
needs that is not installed yet:

1. checks the manifest's Ed25519 signature against the trusted public key,
2. downloads each blob it needs into a content-addressed cache, resuming a partial download
   with `Range` where an earlier one stopped,
3. checks every file's size and sha256 against the manifest,
4. installs the version in its own directory, atomically (staged, then renamed).

Only then does it hand the new state to its consumer (`on_change`). Any failed check refuses
that version with an error that says which check failed, and the version already running
keeps serving. A device needs one version per model (its cohort's) and the weights only of
what runs on the device; a server installs every active version (stable and canary) of the
models that run on its tier, so that every device finds the version it was given.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tierwise.config import DEVICE_TIER, Config
from tierwise.models.store import MODEL_FILE, sha256_file
from tierwise.net.tls import client_context
from tierwise.protocol.traces import PLAIN_CHARACTERS
from tierwise.registry.documents import parse_deployment, parse_manifest
from tierwise.registry.signing import (
    PUBLIC_KEY_FILE,
    TOKEN_FILE,
    VerificationError,
    canonical_json,
    load_public_key,
    verify,
)

log = logging.getLogger("tierwise.registry")

TOKEN_ENV = "TIERWISE_REGISTRY_TOKEN"
_NAME = re.compile(rf"^[{PLAIN_CHARACTERS}]+$")  # model, version, device id and file names
_DIGEST = re.compile(r"^[0-9a-f]{64}$")
CHUNK_BYTES = 1 << 16


@dataclass(frozen=True)
class InstalledVersion:
    """One verified version on local disk: `members` maps each model of the bundle (the model,
    its heads and tails) to its directory."""

    model: str
    version: str
    members: dict[str, Path]
    runs_on: dict[str, list[str]]
    manifest: dict[str, Any] = field(repr=False, compare=False)


@dataclass
class SubscriberState:
    """What the subscriber holds now. `current`: the version this subscriber was given per
    model; `active`: every installed version still on the channel (servers serve these)."""

    current: dict[str, InstalledVersion] = field(default_factory=dict)
    active: dict[str, dict[str, InstalledVersion]] = field(default_factory=dict)
    stable: dict[str, str] = field(default_factory=dict)  # model -> its stable version
    errors: dict[str, str] = field(default_factory=dict)  # model -> why its update was refused


def default_device_id() -> str:
    return socket.gethostname()


def registry_token(configured: str, registry_root: Path | None = None) -> str:
    """The API token: `configured`, else $TIERWISE_REGISTRY_TOKEN, else the registry's
    keys/token file (written by `tierwise registry keygen`)."""
    token = configured or os.environ.get(TOKEN_ENV, "")
    if not token and registry_root is not None:
        path = Path(registry_root) / "keys" / TOKEN_FILE
        if path.is_file():
            token = path.read_text().strip()
    if not token:
        raise FileNotFoundError("no registry token: set registry.token or $TIERWISE_REGISTRY_"
                                "TOKEN, or run `tierwise registry keygen`")
    return token


def public_key_path(config: Config) -> Path:
    return Path(config.registry.public_key) if config.registry.public_key else \
        config.registry_dir / "keys" / PUBLIC_KEY_FILE


def subscriber_for(config: Config, tier: str, url: str, *, channel: str | None = None,
                   device_id: str | None = None, cache_dir: Path | None = None,
                   poll_s: float | None = None) -> Subscriber:
    """A subscriber for `tier` with the config's token, trusted key, channel and poll period;
    its cache defaults to <data_dir>/subscribers/<tier>-<device id>."""
    settings = config.registry
    device_id = device_id or settings.device_id or default_device_id()
    return Subscriber(
        url, tier=tier, channel=channel or settings.channel, device_id=device_id,
        token=registry_token(settings.token, config.registry_dir),
        public_key=public_key_path(config),
        cache_dir=cache_dir or Path(config.data_dir) / "subscribers" / f"{tier}-{device_id}",
        poll_s=poll_s or settings.poll_s, verify=client_context(config.tls) or True)


class Subscriber:
    """Keeps `cache_dir` in step with what `channel` assigns to `device_id` at `url`.

    Args:
        url: the registry's base URL (the cloud server, e.g. http://127.0.0.1:8001).
        tier: where this subscriber runs ("device", "edge", "cloud"): it downloads the weights
            of the bundle members that run there, and every member's metadata and profile.
        channel: "stable" or "canary".
        device_id: hashed into canary cohorts; default the host name.
        token: the registry API's bearer token.
        public_key: the PEM file manifests must be signed with.
        cache_dir: blobs, partial downloads and installed versions live here.
        on_change: called with the new `SubscriberState` after a poll changed it; may answer
            False to be offered it again at the next poll.
        poll_s: how often `start()`'s thread polls.
        verify: the TLS context an https registry is verified with (`tierwise.net.tls`).
    """

    def __init__(self, url: str, *, tier: str, channel: str, device_id: str, token: str,
                 public_key: Path, cache_dir: Path,
                 on_change: Callable[[SubscriberState], bool | None] | None = None,
                 poll_s: float = 5.0, timeout_s: float = 30.0,
                 verify: ssl.SSLContext | bool = True) -> None:
        check_device_id(device_id)
        self.url = url.rstrip("/")
        self.tier = tier
        self.channel = channel
        self.device_id = device_id
        self.trusted = load_public_key(public_key)
        self.cache_dir = Path(cache_dir)
        self.on_change = on_change
        self.poll_s = poll_s
        self.state = SubscriberState()
        self.bytes_downloaded = 0
        self.last_error: str | None = None
        self._etag: str | None = None
        self._etag_expires_at: float | None = None  # when the list behind `_etag` expires
        self._sequence_file = self.cache_dir / "deployment-sequence"
        self._taken = True  # whether on_change took the current state
        self._http = httpx.Client(base_url=self.url, timeout=timeout_s, trust_env=False,
                                  headers={"authorization": f"Bearer {token}"}, verify=verify)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.RLock()

    # -- running ------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="tierwise-registry",
                                            daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        self._http.close()

    def _loop(self) -> None:
        while True:
            try:
                self.poll_once()
            except Exception as error:  # a bug must not end the updates: say it, go on
                self.last_error = f"poll failed: {type(error).__name__}: {error}"
                log.exception("registry poll failed")
            # until something is installed (the registry may be starting too), retry sooner
            waiting = not (self.state.current or self.state.active)
            if self._stop.wait(min(self.poll_s, 0.5) if waiting else self.poll_s):
                return

    def poll_once(self) -> bool:
        """One poll; True when the state changed. Never raises for a registry that cannot be
        reached or a version that fails a check: the error is logged and kept in
        `last_error` / `state.errors`, and what is installed keeps running.

        `on_change` may answer False (not taken yet: a device waiting for its servers to serve
        a new version); it is then offered the same state again at every poll."""
        with self._lock:  # one poll at a time, its state offered before the next one
            try:
                deployment = self._fetch_deployment()
            except (httpx.HTTPError, ValueError, RegistryUnavailableError) as error:
                self.last_error = f"registry {self.url}: {error}"
                log.warning("%s", self.last_error)
                deployment = None
            changed = False
            if deployment is not None:
                state = self._apply(deployment)
                changed = (_versions(state.current) != _versions(self.state.current)
                           or _active_versions(state) != _active_versions(self.state))
                self.state = state
            if (changed or not self._taken) and self.on_change is not None:
                self._taken = self.on_change(self.state) is not False
        return changed

    def wait_until_ready(self, timeout_s: float = 60.0) -> SubscriberState:
        """Poll until something is installed (startup); raise if nothing is by `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while True:
            self.poll_once()
            if self.state.current or self.state.active:
                return self.state
            if time.monotonic() > deadline:
                why = self.last_error or "; ".join(self.state.errors.values()) or \
                    "the channel has no models"
                raise RegistryUnavailableError(f"nothing installed from {self.url} channel "
                                               f"{self.channel!r} in {timeout_s:.0f} s: {why}")
            self._stop.wait(min(self.poll_s, 1.0))

    # -- one poll -----------------------------------------------------------------------

    def _fetch_deployment(self) -> dict[str, Any] | None:
        # After a refused version, ask again in full: the registry may have repaired it.
        retry = bool(self.state.errors)
        headers = {"if-none-match": self._etag} if self._etag and not retry else {}
        response = self._http.get(f"/registry/v1/deployments/{self.channel}",
                                  params={"device": self.device_id}, headers=headers)
        if response.status_code == 304:
            if self._etag_expires_at is not None and time.time() > self._etag_expires_at:
                # "unchanged" must not keep a list alive past its expiry (a freeze replayed
                # as 304s): ask in full; only the registry can sign a fresh one
                self._etag = None
                return self._fetch_deployment()
            return None
        if response.status_code != 200:
            raise RegistryUnavailableError(f"{response.status_code}: {response.text[:200]}")
        document = response.json()  # ValueError when it is not JSON
        if not isinstance(document, dict) or not isinstance(document.get("models"), dict):
            raise RegistryUnavailableError("the deployment is not an object with 'models'")
        try:
            self.check_deployment(document)
            parse_deployment(document)  # signed and fresh: now its shape, field by field
        except (VerificationError, ValueError) as error:
            raise RegistryUnavailableError(f"deployment refused: {error}") from None
        self._etag = response.headers.get("etag")
        self._etag_expires_at = float(document["expires_at"])
        self.last_error = None
        self._remember(document)
        return document

    def check_deployment(self, document: dict[str, Any], now: float | None = None) -> None:
        """Raise VerificationError unless `document` is a deployment the registry signed
        for this channel and device, not expired, and not older than one already taken
        (`Registry.deployment`: a replayed list, a frozen one, an altered one)."""
        body = {key: value for key, value in document.items() if key != "signature"}
        verify(body, document.get("signature"), self.trusted, what="the deployment")
        sequence, expires_at = body.get("sequence"), body.get("expires_at")
        if not isinstance(sequence, int) or not isinstance(expires_at, int | float):
            raise VerificationError("the deployment has no sequence or expiry")
        if body.get("channel") != self.channel or body.get("device") != self.device_id:
            raise VerificationError(f"the deployment is for {body.get('device')!r} on "
                                    f"{body.get('channel')!r}, not {self.device_id!r} on "
                                    f"{self.channel!r}")
        now = time.time() if now is None else now
        if now > expires_at:
            raise VerificationError(f"the deployment expired {now - expires_at:,.0f} s ago "
                                    "(held back, or this clock is wrong)")
        last = self._last_taken()
        instance, issued_at = body.get("registry"), body.get("issued_at")
        if last["registry"] in (None, instance):
            if sequence < last["sequence"]:
                raise VerificationError(f"the deployment is older (sequence {sequence}) than "
                                        f"one already taken ({last['sequence']}): a replay or "
                                        "a downgrade")
        # another index (the registry rebuilt): its sequence counts from 0 again, so it is
        # taken only when issued after the last one taken, which an old list replayed from
        # an index this subscriber left never is
        elif instance in last["left"] or not isinstance(issued_at, int | float) or \
                issued_at <= last["issued_at"]:
            raise VerificationError(f"the deployment is from registry index {instance!r}, "
                                    f"issued before the last one taken (from "
                                    f"{last['registry']!r}): a replay from an index left "
                                    "behind")

    def _last_taken(self) -> dict[str, Any]:
        """The last deployment taken: its registry index, sequence and issue time, and the
        indexes left before it; kept across restarts, so a replay after one fails too."""
        empty: dict[str, Any] = {"registry": None, "sequence": 0, "issued_at": 0.0,
                                  "left": []}
        try:
            text = self._sequence_file.read_text()
        except OSError:
            return empty
        try:
            kept = json.loads(text)
        except ValueError:
            return empty
        if isinstance(kept, int):  # written by an older tierwise: a bare sequence
            return {**empty, "sequence": kept}
        return {**empty, **kept} if isinstance(kept, dict) else empty

    def _remember(self, document: dict[str, Any]) -> None:
        last = self._last_taken()
        instance = document.get("registry")
        left = list(last["left"])
        if last["registry"] not in (None, instance):
            left = [*left, last["registry"]][-100:]
        elif document["sequence"] < last["sequence"]:
            return
        _ensure(self.cache_dir)
        staged = self._sequence_file.with_suffix(".tmp")
        staged.write_text(json.dumps({"registry": instance, "sequence": document["sequence"],
                                      "issued_at": document.get("issued_at", 0.0),
                                      "left": left}))
        staged.replace(self._sequence_file)

    def _apply(self, deployment: dict[str, Any]) -> SubscriberState:
        state = SubscriberState()
        server = self.tier != DEVICE_TIER
        for model, entry in deployment["models"].items():
            if entry["rollout"]["stable"] is not None:
                state.stable[model] = str(entry["rollout"]["stable"])
            for version, signed in entry["versions"].items():
                is_current = version == entry["version"]
                if not (server or is_current):
                    continue  # a device needs only its own version
                if server and not _any_member_runs_on(signed["manifest"], self.tier):
                    continue  # a server skips models it never serves
                try:
                    installed = self._install(model, version, signed)
                except Exception as error:  # whatever the check, this version is refused
                    message = f"{model} version {version} refused: {error}"
                    state.errors[model] = message
                    log.error("%s", message)
                    # keep running what ran before, where the channel still has it (or
                    # everything, when it has nothing else that works)
                    before = self.state.active.get(model, {})
                    kept = {v: i for v, i in before.items() if v in entry["versions"]} or before
                    for kept_version, kept_install in kept.items():
                        state.active.setdefault(model, {}).setdefault(kept_version, kept_install)
                    if is_current and model in self.state.current:
                        state.current[model] = self.state.current[model]
                    continue
                if is_current:
                    state.current[model] = installed
                if server:
                    state.active.setdefault(model, {})[version] = installed
        return state

    def _install(self, model: str, version: str, signed: dict[str, Any]) -> InstalledVersion:
        manifest, signature = signed["manifest"], signed.get("signature")
        verify(manifest, signature, self.trusted)
        try:  # signed, so the registry wrote it: its shape is still checked, field by field
            parsed = parse_manifest(manifest)
        except ValueError as error:
            raise VerificationError(str(error)) from None
        if parsed.model != model or parsed.version != version:
            raise VerificationError(f"the manifest is for {parsed.model!r} version "
                                    f"{parsed.version!r}, served as {model!r} "
                                    f"version {version!r}")
        # keyed by what was signed: a registry made again from scratch, whose "version 1" is
        # other content, never reuses this one's install
        digest = hashlib.sha256(canonical_json(manifest)).hexdigest()[:16]
        target = self.cache_dir / "installs" / model / f"{version}-{digest}"
        members = {name: target / name for name in parsed.runs_on}
        installed = InstalledVersion(model, version, members, dict(parsed.runs_on), manifest)
        if target.is_dir():
            return installed
        staging = Path(tempfile.mkdtemp(dir=_ensure(self.cache_dir / "staging")))
        try:
            for entry in parsed.files:
                relative = _safe_relative(entry.path)
                member, file_name = relative.parts[0], relative.name
                if file_name == MODEL_FILE and self.tier not in parsed.runs_on.get(member, []):
                    continue  # weights of a model that runs elsewhere
                blob = self._blob(entry.sha256, entry.size)
                destination = staging / relative
                destination.parent.mkdir(parents=True, exist_ok=True)
                _link_or_copy(blob, destination)
                # the cache is on this device's disk: check the copy, not only the download
                if sha256_file(destination) != entry.sha256:
                    raise VerificationError(f"file {entry.path}: sha256 of the installed "
                                            "copy differs from the manifest")
            target.parent.mkdir(parents=True, exist_ok=True)
            os.rename(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return installed

    def _blob(self, digest: str, size: int) -> Path:
        """The verified blob `digest` in the cache, downloading what is missing; a partial
        download left by an earlier attempt resumes where it stopped."""
        if not _DIGEST.match(digest):
            raise VerificationError(f"blob digest {digest!r}: not a sha256 digest")
        path = _ensure(self.cache_dir / "blobs") / digest
        if path.is_file():
            if path.stat().st_size == size and sha256_file(path) == digest:
                return path
            path.unlink()  # damaged on this disk: fetch it again
        partial = _ensure(self.cache_dir / "partial") / digest
        have = partial.stat().st_size if partial.is_file() else 0
        if have > size:
            partial.unlink()
            have = 0
        if have < size:
            headers = {"range": f"bytes={have}-"} if have else {}
            with self._http.stream("GET", f"/registry/v1/blobs/sha256/{digest}",
                                   headers=headers) as response:
                if response.status_code not in (200, 206):
                    raise VerificationError(f"blob sha256:{digest}: the registry answered "
                                            f"{response.status_code}")
                resumed = response.status_code == 206
                if resumed and not response.headers.get("content-range", "").startswith(
                        f"bytes {have}-"):
                    raise VerificationError(f"blob sha256:{digest}: asked for bytes {have}-, "
                                            f"got {response.headers.get('content-range')!r}")
                written = have if resumed else 0
                with open(partial, "ab" if resumed else "wb") as stream:
                    for chunk in response.iter_bytes(CHUNK_BYTES):
                        written += len(chunk)
                        if written > size:  # never store more than the manifest promises
                            raise VerificationError(f"blob sha256:{digest}: more than the "
                                                    f"{size} bytes the manifest says")
                        stream.write(chunk)
                        self.bytes_downloaded += len(chunk)
        got_size = partial.stat().st_size
        if got_size != size:
            raise VerificationError(f"blob sha256:{digest}: {got_size} bytes, the manifest says "
                                    f"{size} (download cut short)")
        got = sha256_file(partial)
        if got != digest:
            partial.unlink()  # start over next time
            raise VerificationError(f"blob sha256:{digest}: its content hashes to sha256:{got} "
                                    "(tampered with or corrupted in transit)")
        os.replace(partial, path)
        return path


class RegistryUnavailableError(RuntimeError):
    """The registry could not be reached or answered with an error."""


def _any_member_runs_on(manifest: dict[str, Any], tier: str) -> bool:
    return any(tier in tiers for tiers in manifest.get("runs_on", {}).values())


def _versions(current: dict[str, InstalledVersion]) -> dict[str, str]:
    return {model: installed.version for model, installed in current.items()}


def _active_versions(state: SubscriberState) -> dict[str, list[str]]:
    return {model: sorted(versions) for model, versions in state.active.items()}


def _safe_relative(path: str) -> Path:
    relative = Path(path)
    if len(relative.parts) != 2 or not all(_plain(part) for part in relative.parts):
        raise VerificationError(f"manifest file path {path!r}: expected <model>/<file>")
    return relative


def check_device_id(device_id: str) -> str:
    """`device_id`, when it can name files (caches, outboxes); else ValueError."""
    if not _plain(device_id):
        raise ValueError(f"device_id: expected letters, digits, '.', '_', '@' or '-', got "
                         f"{device_id!r}")
    return device_id


def _plain(name: str) -> bool:
    """A name that is one path component, never `.` or `..`."""
    return bool(_NAME.match(name)) and name not in (".", "..")


def _link_or_copy(source: Path, destination: Path) -> None:
    """A hard link to the verified blob where the filesystem allows, else a copy."""
    try:
        os.link(source, destination)
    except OSError:
        shutil.copyfile(source, destination)


def _ensure(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    return directory


class DeviceView:
    """A models directory (what `tierwise.Client` reads) that shows the versions a device was
    given: one symlink per bundle member into the verified install. `update` swaps the links
    atomically (each is replaced by rename)."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def update(self, state: SubscriberState) -> set[str]:
        """Point the view at `state.current`; the names of the members that changed."""
        self.directory.mkdir(parents=True, exist_ok=True)
        wanted = {name: path for installed in state.current.values()
                  for name, path in installed.members.items() if path.is_dir()}
        changed = set()
        for name, target in wanted.items():
            link = self.directory / name
            if link.is_symlink() and Path(os.readlink(link)) == target.resolve():
                continue
            staging = self.directory / f".{name}.new"
            if staging.is_symlink() or staging.exists():
                staging.unlink()
            staging.symlink_to(target.resolve(), target_is_directory=True)
            os.replace(staging, link)
            changed.add(name)
        # Drop only the parts a model's new version no longer has: a model missing from the
        # state (its update refused, say) keeps what it ran.
        models = set(state.current)
        for link in self.directory.iterdir():
            if link.is_symlink() and link.name not in wanted and not link.name.startswith(".") \
                    and Path(os.readlink(link)).parent.parent.name in models:
                link.unlink()
                changed.add(link.name)
        return changed
