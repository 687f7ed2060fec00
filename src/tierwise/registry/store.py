"""The registry at the cloud tier: content-addressed artifacts on the filesystem, an index in
SQLite, and the rollout state of every model.

A *version* of a model is a bundle: the model and every head and tail cut from it
(`tierwise optimize split`, learned bottlenecks), each with its metadata and profile, so that a
device's head and a server's tail always come from the same version. Its manifest lists every
file with its sha256 and size, records the lineage (the version before it, the model and
optimize step it came from), and is signed with Ed25519 (`registry.signing`).

Rollout, per model: a `stable` version and at most one `canary` version with a share. A
subscriber on the `stable` channel gets the canary when its device id hashes into the share
(`in_canary_cohort`: a stable hash, so raising the share only adds devices), else the stable
version; on the `canary` channel it always gets the canary. `pause` stops the canary from
reaching devices that do not have it yet; `promote` raises the share or makes the canary
stable; `rollback` drops the canary, or, with none, returns to the previous stable version.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import math
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypedDict

import orjson

from tierwise.config import DEVICE_TIER, Config
from tierwise.database import Connection, Database, DatabaseError
from tierwise.models.store import (
    METADATA_FILE,
    MODEL_FILE,
    ModelInfo,
    list_models,
    load_info,
    model_dir,
    sha256_file,
    tier_models,
)
from tierwise.profile.model_profile import PROFILE_FILE
from tierwise.registry import RegistryError
from tierwise.registry.documents import parse_manifest
from tierwise.registry.signing import PRIVATE_KEY_FILE, load_private_key, sign

MANIFEST_SCHEMA = 1
DEPLOYMENT_TTL_S = 24 * 3600.0  # TUF's default for its timestamp role: a day
DEPLOYMENT_STEP_S = 600.0
CHANNELS = ("stable", "canary")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS versions (
    model TEXT NOT NULL, version INTEGER NOT NULL, created_at DOUBLE PRECISION NOT NULL,
    manifest {blob} NOT NULL, signature {blob} NOT NULL, content_key TEXT NOT NULL,
    PRIMARY KEY (model, version));
CREATE TABLE IF NOT EXISTS rollouts (
    model TEXT PRIMARY KEY, stable INTEGER, canary INTEGER,
    canary_share DOUBLE PRECISION NOT NULL DEFAULT 0, paused INTEGER NOT NULL DEFAULT 0,
    updated_at DOUBLE PRECISION NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    id {serial}, at DOUBLE PRECISION NOT NULL, model TEXT NOT NULL,
    action TEXT NOT NULL, version INTEGER, detail TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS devices (
    device TEXT NOT NULL, model TEXT NOT NULL, channel TEXT NOT NULL, version INTEGER NOT NULL,
    seen_at DOUBLE PRECISION NOT NULL, PRIMARY KEY (device, model));
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


_ROLLOUT_COLUMNS = "model, stable, canary, canary_share, paused"
DEVICE_SEEN_RESOLUTION_S = 60.0


class _FileEntry(TypedDict):
    """One file of a version, as its manifest lists it."""
    path: str
    sha256: str
    size: int


def _rollout_of(row: tuple[Any, ...]) -> Rollout:
    return Rollout(row[0], row[1], row[2], row[3], bool(row[4]))


def in_canary_cohort(device_id: str, model: str, share: float) -> bool:
    """Whether `device_id` is in `model`'s canary cohort at `share` (0..1).

    A stable hash: the same device always lands at the same position, so raising the share
    keeps every device already in the cohort. Salted with the model, so one model's canary
    cohort is not every model's.
    """
    digest = hashlib.sha256(f"{model}\0{device_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < share


@dataclass
class Rollout:
    model: str
    stable: int | None
    canary: int | None
    canary_share: float
    paused: bool

    def version_for(self, channel: str, device_id: str, current: int | None) -> int | None:
        """The version a subscriber on `channel` gets; `current` is what it was last given."""
        if self.canary is None:
            return self.stable
        if channel == "canary" or self.stable is None:
            return self.canary
        if self.paused:  # nobody new gets the canary; whoever has it keeps it
            return self.canary if current == self.canary else self.stable
        return self.canary if in_canary_cohort(device_id, self.model, self.canary_share) \
            else self.stable

    @property
    def active(self) -> list[int]:
        return sorted({v for v in (self.stable, self.canary) if v is not None})


@dataclass
class PushResult:
    model: str
    version: int
    new: bool  # False: the same content was already this version
    channel: str
    canary_share: float
    files: int
    bytes: int


def _now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def registry_of(config: Config) -> Registry:
    """The registry `config` names: its root (blobs, keys) and its index (`registry.database`:
    empty, the root's index.db; or a postgresql:// URL that several cloud servers share)."""
    return Registry(config.registry_dir, config.registry.database or None)


class Registry:
    """The registry under `root`: blobs/sha256/<hash>, keys/, and its index: `database` (an
    SQLite path or a postgresql:// URL; default `root`/index.db)."""

    def __init__(self, root: Path, database: str | Path | None = None) -> None:
        self.root = Path(root)
        self.blobs_dir = self.root / "blobs" / "sha256"
        self.keys_dir = self.root / "keys"
        self.index_location = database or self.root / "index.db"
        self.index = Database(self.index_location, _SCHEMA, "registry")
        # how long a signed deployment stays fresh, and how often its timestamp moves on (so
        # that an unchanged deployment keeps its ETag for that long)
        self.deployment_ttl_s = DEPLOYMENT_TTL_S
        self.deployment_step_s = DEPLOYMENT_STEP_S
        self._private_key: Any = None

    # -- storage ------------------------------------------------------------------------

    def _db(self) -> contextlib.AbstractContextManager[Connection]:
        """One connection, one serialized transaction per operation."""
        return self.index.transaction()

    def blob_path(self, sha256: str) -> Path:
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise RegistryError(f"not a sha256 digest: {sha256!r}")
        return self.blobs_dir / sha256[:2] / sha256

    def _put_blob(self, source: Path) -> tuple[str, int]:
        digest = sha256_file(source)
        target = self.blob_path(digest)
        if not target.exists() or sha256_file(target) != digest:  # absent, or damaged: (re)write
            target.parent.mkdir(parents=True, exist_ok=True)
            with (tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as staging,
                  open(source, "rb") as stream):
                shutil.copyfileobj(stream, staging)
            os.replace(staging.name, target)  # readers never see half a blob
        return digest, target.stat().st_size

    # -- push -----------------------------------------------------------------------------

    def push(self, config: Config, models_dir: Path, model: str, private_key: Any, *,
             channel: str | None = None, canary_share: float | None = None,
             tiers: list[str] | None = None) -> PushResult:
        """Store `model` (with its heads and tails) from `models_dir` as a new signed version
        and put it on `channel`: stable, or canary at `canary_share` (default: the config's).
        The first version of a model always goes to stable. Pushing content that is already
        the latest version changes nothing."""
        if channel is not None and channel not in CHANNELS:
            raise RegistryError(f"channel: expected one of {CHANNELS}, got {channel!r}")
        found = list_models(models_dir)
        if model not in found:
            raise RegistryError(f"{models_dir}: no model {model!r} to push; found "
                                f"{sorted(found)}")
        info = found[model][0]
        if info.role != "full":
            raise RegistryError(f"{model!r} is a {info.role} of {info.parent!r}: push "
                                f"{info.parent!r}, whose versions carry its heads and tails")
        runs_on = _runs_on(config, info, found, tiers)
        members = [model, *sorted(name for name, (member, _) in found.items()
                                  if member.parent == model and member.role != "full")]
        files, sources = [], []
        with tempfile.TemporaryDirectory() as staging:
            for name in members:
                directory = model_dir(models_dir, name)
                metadata = Path(staging) / f"{name}.json"  # its version is set below
                sources.append((name, METADATA_FILE, directory / METADATA_FILE))
                member_files = [(MODEL_FILE, directory / MODEL_FILE), (METADATA_FILE, metadata)]
                if (directory / PROFILE_FILE).is_file():
                    member_files.append((PROFILE_FILE, directory / PROFILE_FILE))
                    sources.append((name, PROFILE_FILE, directory / PROFILE_FILE))
                sources.append((name, MODEL_FILE, directory / MODEL_FILE))
                files.append((name, member_files, metadata, directory))
            # What makes two pushes the same version: every file as it is on disk.
            content_key = hashlib.sha256("".join(
                f"{name}/{file_name}={sha256_file(path)};"
                for name, file_name, path in sources).encode()).hexdigest()
            with self._db() as db:
                latest = db.execute("SELECT version, content_key FROM versions WHERE model = ? "
                                    "ORDER BY version DESC LIMIT 1", (model,)).fetchone()
                rollout = self._rollout(db, model)
                if latest is not None and latest[1] == content_key:
                    return self._unchanged(db, model, latest[0], rollout, channel, canary_share,
                                           config)
                version = (latest[0] + 1) if latest else 1
                entries: list[_FileEntry] = []
                for name, member_files, metadata, directory in files:
                    member_info = load_info(directory).model_copy(
                        update={"version": str(version)})
                    metadata.write_text(member_info.model_dump_json(indent=2) + "\n")
                    for file_name, source in member_files:
                        digest, size = self._put_blob(source)
                        entries.append({"path": f"{name}/{file_name}", "sha256": digest,
                                        "size": size})
                parent = self._rollout(db, info.parent) if info.parent else None
                manifest = {
                    "schema": MANIFEST_SCHEMA,
                    "model": model,
                    "version": str(version),
                    "created_at": _now_iso(),
                    "runs_on": runs_on,
                    "lineage": {"previous_version": str(latest[0]) if latest else None,
                                "parent": info.parent,
                                "parent_version": str(parent.stable) if parent and parent.stable
                                else None,
                                "step": info.variant or "train"},
                    "metadata": info.model_copy(update={"version": str(version)}).model_dump(),
                    "files": entries,
                }
                parse_manifest(manifest)  # the one schema subscribers read it by
                db.execute("INSERT INTO versions VALUES (?, ?, ?, ?, ?, ?)",
                           (model, version, time.time(), orjson.dumps(manifest),
                            orjson.dumps(sign(manifest, private_key)), content_key))
                self._event(db, model, "push", version, f"{len(entries)} files")
                channel, share = self._publish(db, model, version, rollout, channel,
                                               canary_share, config)
        return PushResult(model, version, True, channel, share, len(entries),
                          sum(f["size"] for f in entries))

    def _publish(self, db: Connection, model: str, version: int,
                 rollout: Rollout | None, channel: str | None, canary_share: float | None,
                 config: Config) -> tuple[str, float]:
        """Put `version` on `channel` (default canary; stable when the model has none)."""
        if rollout is None or rollout.stable is None:
            channel = "stable"
        channel = channel or "canary"
        share = 1.0 if channel == "stable" else (canary_share if canary_share is not None
                                                 else config.registry.canary_share)
        if not 0 < share <= 1:
            raise RegistryError(f"canary share: expected a number in (0, 1], got {share!r}")
        if channel == "stable":
            self._set(db, model, stable=version, canary=None, canary_share=0.0, paused=0)
            self._event(db, model, "stable", version)
        else:
            self._set(db, model, canary=version, canary_share=share, paused=0)
            self._event(db, model, "canary", version, f"share {share:g}")
        return channel, share

    def _unchanged(self, db: Connection, model: str, version: int,
                   rollout: Rollout | None, channel: str | None, canary_share: float | None,
                   config: Config) -> PushResult:
        """A push of what is already `version`: nothing new is stored. It goes on `channel`
        when one is named and it is not there yet."""
        on = "stable" if rollout and rollout.stable == version else \
            "canary" if rollout and rollout.canary == version else None
        share = 1.0 if on == "stable" else rollout.canary_share if on and rollout else 0.0
        if channel is not None and channel != on:
            on, share = self._publish(db, model, version, rollout, channel, canary_share,
                                      config)
        row = db.execute("SELECT manifest FROM versions WHERE model = ? AND version = ?",
                         (model, version)).fetchone()
        assert row is not None  # `version` was read from this table in this transaction
        manifest = orjson.loads(row[0])
        return PushResult(model, version, False, on or "none", share, len(manifest["files"]),
                          sum(f["size"] for f in manifest["files"]))

    def push_all(self, config: Config, models_dir: Path, private_key: Any,
                 names: list[str] | None = None, **kwargs: Any) -> list[PushResult]:
        """`push` each of `names` (default: every whole model in `models_dir` that a tier
        runs)."""
        if names is None:
            names = [name for name, (info, _) in list_models(models_dir).items()
                     if info.role == "full" and _tiers_running(config, info)]
        return [self.push(config, models_dir, name, private_key, **kwargs) for name in names]

    # -- rollout --------------------------------------------------------------------------

    def promote(self, model: str, share: float | None = None, reason: str = "",
                canary: int | None = None) -> Rollout:
        """Raise the canary's share to `share`, or (None or 1) make the canary stable. Also
        resumes a paused canary. `reason` goes into the history with it; with `canary`,
        RegistryError unless that is still the canary (a decision taken on another)."""
        if share is not None and not 0 < share <= 1:
            raise RegistryError(f"share: expected a number in (0, 1], got {share!r}")
        with self._db() as db:
            rollout = self._canary_of(db, model, "promote", canary)
            if share is None or share >= 1:
                self._set(db, model, stable=rollout.canary, canary=None, canary_share=0.0,
                          paused=0)
                self._event(db, model, "stable", rollout.canary, "promoted from canary"
                            + (f": {reason}" if reason else ""))
            else:
                self._set(db, model, canary_share=share, paused=0)
                self._event(db, model, "canary", rollout.canary, f"share {share:g}"
                            + (f": {reason}" if reason else ""))
            return self._required(db, model)

    def pause(self, model: str) -> Rollout:
        """Hold the canary where it is: devices that have it keep it, no other device gets it."""
        with self._db() as db:
            rollout = self._canary_of(db, model, "pause")
            self._set(db, model, paused=1)
            self._event(db, model, "pause", rollout.canary)
            return self._required(db, model)

    def rollback(self, model: str, reason: str = "", canary: int | None = None) -> Rollout:
        """Drop the canary (every device back on stable); with no canary, make the stable
        version before the current one stable again (repeatable: each rollback goes one
        further back). `reason` goes into the history with it; with `canary`, RegistryError
        unless that is still the canary (never a stable version rolled back instead)."""
        with self._db() as db:
            rollout = self._required(db, model) if canary is None else \
                self._canary_of(db, model, "roll back", canary)
            if rollout.canary is not None:
                self._set(db, model, canary=None, canary_share=0.0, paused=0)
                self._event(db, model, "rollback", rollout.canary, "canary dropped"
                            + (f": {reason}" if reason else ""))
            else:
                stack = self._stable_stack(db, model)
                if len(stack) < 2:
                    raise RegistryError(f"{model}: no canary and no earlier stable version to "
                                        "roll back to")
                self._set(db, model, stable=stack[-2])
                self._event(db, model, "rollback-stable", rollout.stable,
                            f"stable back to {stack[-2]}")
            return self._required(db, model)

    @staticmethod
    def _stable_stack(db: Connection, model: str) -> list[int]:
        """The stable versions in the order they became stable, each rollback popping one:
        the last is the current stable version, the one before it what a rollback restores."""
        stack: list[int] = []
        for action, version in db.execute("SELECT action, version FROM events WHERE model = ? "
                                          "AND action IN ('stable', 'rollback-stable') "
                                          "ORDER BY id", (model,)):
            if action == "stable":
                stack.append(version)
            elif stack:
                stack.pop()
        return stack

    # -- reading --------------------------------------------------------------------------

    def rollout(self, model: str) -> Rollout | None:
        with self._db() as db:
            return self._rollout(db, model)

    def require(self, model: str) -> Rollout:
        """The rollout of `model`; RegistryError naming the models there are if it has none."""
        with self._db() as db:
            return self._required(db, model)

    def rollouts(self) -> list[Rollout]:
        with self._db() as db:
            return [_rollout_of(row) for row in db.execute(
                f"SELECT {_ROLLOUT_COLUMNS} FROM rollouts ORDER BY model")]

    def manifest(self, model: str, version: int) -> tuple[dict[str, Any], dict[str, str]]:
        """(manifest, signature) of one version."""
        with self._db() as db:
            return self._signed(db, model, version)

    @staticmethod
    def _signed(db: Connection, model: str, version: int
                ) -> tuple[dict[str, Any], dict[str, str]]:
        row = db.execute("SELECT manifest, signature FROM versions WHERE model = ? AND "
                         "version = ?", (model, version)).fetchone()
        if row is None:
            raise RegistryError(f"{model}: no version {version}")
        return orjson.loads(row[0]), orjson.loads(row[1])

    def versions(self, model: str) -> list[dict[str, Any]]:
        """Every version of `model`, oldest first: manifest summaries."""
        with self._db() as db:
            rows = db.execute("SELECT manifest FROM versions WHERE model = ? ORDER BY version",
                              (model,)).fetchall()
        out = []
        for (raw,) in rows:
            manifest = orjson.loads(raw)
            trained = ModelInfo.model_validate(manifest["metadata"]).trained
            out.append({"version": manifest["version"], "created_at": manifest["created_at"],
                        "lineage": manifest["lineage"], "runs_on": manifest["runs_on"][model],
                        "files": len(manifest["files"]),
                        "bytes": sum(f["size"] for f in manifest["files"]),
                        "test_accuracy": trained.test_accuracy if trained else None})
        return out

    def events(self, model: str) -> list[dict[str, Any]]:
        with self._db() as db:
            rows = db.execute("SELECT at, action, version, detail FROM events WHERE model = ? "
                              "ORDER BY id", (model,)).fetchall()
        return [{"at": at, "action": action, "version": version, "detail": detail}
                for at, action, version, detail in rows]

    def devices(self, model: str) -> list[dict[str, Any]]:
        """The subscribers of `model` and the version each was last given."""
        with self._db() as db:
            rows = db.execute("SELECT device, channel, version, seen_at FROM devices WHERE "
                              "model = ? ORDER BY device", (model,)).fetchall()
        return [{"device": d, "channel": c, "version": v, "seen_at": s} for d, c, v, s in rows]

    def deployment(self, channel: str, device_id: str) -> dict[str, Any]:
        """What a subscriber on `channel` should run now: per model, its version and every
        active version's signed manifest (servers serve them all, so that every device's
        version has a server). Records what each device was given, when that changed or a
        minute has passed; a poll that changes nothing takes no write lock.

        The document itself is signed, with the registry's `sequence` (the last event's id:
        it grows with every change) counted in its index `registry` (a random instance id,
        new when the index is made again), `issued_at` and `expires_at` (epoch s), so a
        subscriber
        refuses a replayed older list (a downgrade), a list for another device, a list held
        back past its expiry (a freeze), and any list altered on the way, emptied or not —
        The Update Framework's timestamp and snapshot roles, in one document."""
        if channel not in CHANNELS:
            raise RegistryError(f"channel: expected one of {CHANNELS}, got {channel!r}")
        now = time.time()
        # read without the write lock (a poll that changes nothing, the common one, must not
        # queue behind every other), then write down what changed, if anything
        writes: list[tuple[Any, ...]] = []
        instance = None
        if self.index.exists():
            try:
                with self.index.transaction(write=False) as db:
                    models, writes, sequence, instance = self._deployment(db, channel,
                                                                          device_id, now)
            except DatabaseError:  # an index without the registry's tables yet
                writes, instance = [], None
        if writes or instance is None:
            with self._db() as db:
                if instance is None:  # a new index: made, and read, under the lock
                    models, writes, sequence, _ = self._deployment(db, channel, device_id,
                                                                   now)
                    instance = self._instance(db)
                if writes:
                    db.executemany("INSERT INTO devices VALUES (?, ?, ?, ?, ?) ON CONFLICT "
                                   "(device, model) DO UPDATE SET channel = "
                                   "excluded.channel, version = excluded.version, seen_at = "
                                   "excluded.seen_at", writes)
        issued_at = math.floor(now / self.deployment_step_s) * self.deployment_step_s
        document = {"channel": channel, "device": device_id, "models": models,
                    "registry": instance, "sequence": int(sequence), "issued_at": issued_at,
                    "expires_at": issued_at + self.deployment_ttl_s}
        document["signature"] = sign(document, self._signing_key())
        return document

    def _signing_key(self) -> Any:
        """The private key, loaded again when `registry keygen --force` replaced it."""
        path = self.keys_dir / PRIVATE_KEY_FILE
        stamp = path.stat().st_mtime_ns if path.is_file() else None
        if self._private_key is None or stamp != self._private_key[0]:
            self._private_key = (stamp, load_private_key(path))
        return self._private_key[1]

    # -- internals ------------------------------------------------------------------------

    def _deployment(self, db: Connection, channel: str, device_id: str, now: float
                    ) -> tuple[dict[str, Any], list[tuple[Any, ...]], int, str | None]:
        """(models, the devices rows to write, sequence, index id or None) of `device_id`'s
        deployment on `channel`, read in `db`."""
        models: dict[str, Any] = {}
        writes: list[tuple[Any, ...]] = []
        given = {model: (version, seen) for model, version, seen in db.execute(
            "SELECT model, version, seen_at FROM devices WHERE device = ?", (device_id,))}
        for row in db.execute(f"SELECT {_ROLLOUT_COLUMNS} FROM rollouts ORDER BY model"
                              ).fetchall():
            rollout = _rollout_of(row)
            before, seen_at = given.get(rollout.model, (None, 0.0))
            version = rollout.version_for(channel, device_id, before)
            if version is None:
                continue
            manifests = {}
            for active in rollout.active:
                manifest, signature = self._signed(db, rollout.model, active)
                manifests[str(active)] = {"manifest": manifest, "signature": signature}
            models[rollout.model] = {"version": str(version), "rollout": asdict(rollout),
                                     "versions": manifests}
            # what each device was given (pause needs it); its last poll, to a minute
            if version != before or now - seen_at > DEVICE_SEEN_RESOLUTION_S:
                writes.append((device_id, rollout.model, channel, version, now))
        # every change of any rollout is an event: their last id orders the registry's
        # states, never going back (ids are never reused); the index's id says which
        # registry the sequence counts in (one rebuilt from nothing counts again)
        last = db.execute("SELECT COALESCE(MAX(id), 0) FROM events").fetchone()
        assert last is not None  # an aggregate query always gives one row
        sequence = int(last[0])
        instance = db.execute("SELECT value FROM meta WHERE key = 'instance'").fetchone()
        return models, writes, sequence, str(instance[0]) if instance else None

    @staticmethod
    def _instance(db: Connection) -> str:
        """This index's random id, made with it."""
        db.execute("INSERT INTO meta VALUES ('instance', ?) ON CONFLICT (key) DO NOTHING",
                   (uuid.uuid4().hex,))
        row = db.execute("SELECT value FROM meta WHERE key = 'instance'").fetchone()
        assert row is not None  # inserted just above when it was not there
        return str(row[0])

    @staticmethod
    def _rollout(db: Connection, model: str) -> Rollout | None:
        row = db.execute(f"SELECT {_ROLLOUT_COLUMNS} FROM rollouts WHERE model = ?",
                         (model,)).fetchone()
        return _rollout_of(row) if row else None

    def _required(self, db: Connection, model: str) -> Rollout:
        rollout = self._rollout(db, model)
        if rollout is None:
            known = [row[0] for row in db.execute("SELECT model FROM rollouts ORDER BY model")]
            raise RegistryError(f"no model {model!r} in the registry; it has {known}")
        return rollout

    def _canary_of(self, db: Connection, model: str, action: str,
                   expected: int | None = None) -> Rollout:
        rollout = self._required(db, model)
        if rollout.canary is None:
            raise RegistryError(f"{model}: no canary to {action} (stable is version "
                                f"{rollout.stable}; `registry push --channel canary` first)")
        if expected is not None and rollout.canary != expected:
            raise RegistryError(f"{model}: the canary is version {rollout.canary} now, not "
                                f"{expected}; nothing done")
        return rollout

    @staticmethod
    def _set(db: Connection, model: str, **values: Any) -> None:
        db.execute("INSERT INTO rollouts (model, updated_at) VALUES (?, ?) ON CONFLICT (model) "
                   "DO NOTHING", (model, time.time()))
        assignments = ", ".join(f"{key} = ?" for key in values)
        db.execute(f"UPDATE rollouts SET {assignments}, updated_at = ? WHERE model = ?",
                   (*values.values(), time.time(), model))

    @staticmethod
    def _event(db: Connection, model: str, action: str, version: int | None,
               detail: str = "") -> None:
        db.execute("INSERT INTO events (at, model, action, version, detail) VALUES "
                   "(?, ?, ?, ?, ?)", (time.time(), model, action, version, detail))


def _runs_on(config: Config, info: ModelInfo, found: dict[str, tuple[ModelInfo, Path]],
             tiers: Iterable[str] | None) -> dict[str, list[str]]:
    """Which tiers run each member of `info`'s bundle: the model where `tiers` (default: the
    tiers whose `models` list it or, for a variant, its parent) say; its heads on the device;
    its tails where the model runs remotely."""
    if tiers:
        where = list(tiers)
        unknown = sorted(set(where) - set(config.tiers))
        if unknown:
            raise RegistryError(f"tiers: {unknown} are not configured tiers "
                                f"({sorted(config.tiers)})")
    else:
        where = _tiers_running(config, info)
        if not where:
            raise RegistryError(f"{info.name}: no tier runs it (tiers.*.models); pass --tiers")
    runs_on = {info.name: where}
    remote = [tier for tier in where if tier != DEVICE_TIER] or \
        [tier for tier in config.tiers if tier != DEVICE_TIER]
    for name, (member, _) in found.items():
        if member.parent == info.name and member.role != "full":
            runs_on[name] = [DEVICE_TIER] if member.role == "head" else remote
    return runs_on


def _tiers_running(config: Config, info: ModelInfo) -> list[str]:
    """The tiers that run the model (`tier_models`): the tiers whose `models` list it or
    that its metadata names; for a variant, those of its parent."""
    models: dict[str, ModelInfo] = {info.name: info}
    if info.parent and info.variant:
        models[info.parent] = info.model_copy(update={
            "name": info.parent, "parent": None, "variant": None})
    placed = tier_models(config, models)
    return [tier for tier, names in placed.items() if info.name in names]
