"""The model registry: signed versions, distribution, staged rollout, hot swap.

Real servers on loopback (the cloud hosting the registry and serving from it, an edge server
subscribed to it, as processes), real clients, real ONNX models from the session's zoo."""

from __future__ import annotations

import re
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
from rich.console import Console

from tierwise.bench.processes import free_port, tier_server
from tierwise.bench.rollout import rebuild, run_bench_rollout
from tierwise.cli import main
from tierwise.client import Client
from tierwise.cloud import hosted
from tierwise.config import Config, write_config
from tierwise.data import Splits
from tierwise.models.store import MODEL_FILE, load_info, save_info
from tierwise.planner.plans import Local, Remote
from tierwise.registry import RegistryError
from tierwise.registry.signing import (
    PRIVATE_KEY_FILE,
    VerificationError,
    keygen,
    load_private_key,
    sign,
)
from tierwise.registry.store import in_canary_cohort, registry_of
from tierwise.registry.subscriber import Subscriber, registry_token
from tierwise.server.app import TierServer, serve_in_thread
from waiting import wait_for

DEVICE, EDGE = "fmnist-device", "fmnist-edge"


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture
def config(small_config: Config, tmp_path: Path) -> Config:
    """The session's config with its own data directory (subscriber caches) and registry,
    keys generated, polling fast."""
    config = small_config.model_copy(deep=True)
    config.data_dir = str(tmp_path / "data")
    config.registry.root = str(tmp_path / "registry")
    config.registry.poll_s = 0.3
    config.registry.retire_grace_s = 1.0
    keygen(config.registry_dir / "keys")
    return config


def _config_file(config: Config, path: Path) -> str:
    return str(write_config(config, path))


def _push(config: Config, models_dir: Path, model: str, **kwargs: Any) -> int:
    registry = registry_of(config)
    key = load_private_key(registry.keys_dir / PRIVATE_KEY_FILE)
    return registry.push(config, models_dir, model, key, **kwargs).version


@pytest.fixture
def hosted_registry(config: Config, models_dir: Path) -> Iterator[str]:
    """The registry API served in this process (over an empty tier server), v1 pushed."""
    for model in (DEVICE, EDGE, "fmnist-cloud"):
        _push(config, models_dir, model)
    app = hosted(TierServer("cloud", config.tier("cloud"), {}), config)
    with serve_in_thread(app) as url:
        yield url


# -- the whole cycle --------------------------------------------------------------------------


class _Stream:
    """Requests streaming from one client, alternating a device plan and an edge plan; every
    answer's versions kept with the time its request started."""

    def __init__(self, client: Client, images: np.ndarray) -> None:
        self.client = client
        self.images = images
        self.records: list[tuple[float, dict[str, str], str | None]] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        plans = [Local(DEVICE), Remote("edge", EDGE)]
        index = 0
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                result = self.client.infer(self.images[index % len(self.images)],
                                           plans[index % 2])
            except Exception as error:  # a failed request is what this test looks for
                self.errors.append(f"{type(error).__name__}: {error}")
            else:
                trace = result.trace
                self.records.append((started, {stage.model: stage.model_version
                                               for stage in trace.answered_stages},
                                     trace.fallback))
            index += 1
            time.sleep(0.005)

    def versions_since(self, since: float) -> dict[str, set[str]]:
        seen: dict[str, set[str]] = {}
        for started, versions, _ in list(self.records):
            if started >= since:
                for model, version in versions.items():
                    seen.setdefault(model, set()).add(version)
        return seen

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def _cohort_ids(share: float) -> tuple[str, str]:
    """A device id in both models' canary cohorts at `share`, and one in neither."""
    inside = next(f"device-{i}" for i in range(1000)
                  if all(in_canary_cohort(f"device-{i}", m, share) for m in (DEVICE, EDGE)))
    outside = next(f"device-{i}" for i in range(1000)
                   if not any(in_canary_cohort(f"device-{i}", m, share) for m in (DEVICE, EDGE)))
    return inside, outside


def test_canary_reaches_exactly_its_cohort_and_rolls_back_while_requests_stream(
        config: Config, models_dir: Path, splits: Splits, tmp_path: Path) -> None:
    config_path = _config_file(config, tmp_path / "tierwise.toml")
    assert main(["--config", config_path, "registry", "push", "--all", "--models",
                 str(models_dir)]) == 0
    cloud_port = free_port()
    cloud_url = f"http://127.0.0.1:{cloud_port}"
    registry_flags = ["--registry-url", cloud_url]
    inside, outside = _cohort_ids(0.5)
    with (
        tier_server("cloud", models_dir, port=cloud_port, extra_args=registry_flags,
                    config_path=config_path),
        tier_server("edge", models_dir, extra_args=registry_flags,
                    config_path=config_path) as edge_url,
    ):
        clients = {device: Client(config, registry_url=cloud_url, device_id=device,
                                  tier_urls={"edge": edge_url, "cloud": cloud_url}, probe=False)
                   for device in (inside, outside)}
        streams = {device: _Stream(client, splits.test_x[:50])
                   for device, client in clients.items()}
        try:
            # v1 everywhere
            wait_for(lambda: all(len(s.records) > 20 for s in streams.values()),
                      what="requests from both clients")
            for stream in streams.values():
                assert stream.versions_since(0) == {DEVICE: {"1"}, EDGE: {"1"}}

            # v2 of the device and the edge model, to the canary at 50%
            v2_dir = rebuild(models_dir, tmp_path / "v2", [DEVICE, EDGE])
            pushed = time.monotonic()
            for model in (DEVICE, EDGE):
                assert main(["--config", config_path, "registry", "push", model, "--models",
                             str(v2_dir), "--channel", "canary", "--share", "0.5"]) == 0
            wait_for(lambda: streams[inside].versions_since(time.monotonic() - 0.5)
                      == {DEVICE: {"2"}, EDGE: {"2"}}, what="the canary cohort on v2")
            settled = time.monotonic()
            time.sleep(1.0)
            assert streams[inside].versions_since(settled) == {DEVICE: {"2"}, EDGE: {"2"}}
            assert streams[outside].versions_since(pushed) == {DEVICE: {"1"}, EDGE: {"1"}}
            # the edge server serves both versions while the canary runs
            edge_meta = httpx.get(f"{edge_url}/v2/models/{EDGE}", trust_env=False).json()
            assert edge_meta["versions"] == ["1", "2"]
            devices = {d["device"]: d["version"] for d in
                       registry_of(config).devices(DEVICE)}
            assert devices[inside] == 2 and devices[outside] == 1

            # rollback: everyone on v1 again, and the edge server lets v2 go
            for model in (DEVICE, EDGE):
                assert main(["--config", config_path, "registry", "rollback", model]) == 0
            wait_for(lambda: streams[inside].versions_since(time.monotonic() - 0.5)
                      == {DEVICE: {"1"}, EDGE: {"1"}}, what="the cohort back on v1")
            settled = time.monotonic()
            time.sleep(1.0)
            for stream in streams.values():
                assert stream.versions_since(settled) == {DEVICE: {"1"}, EDGE: {"1"}}
            wait_for(lambda: httpx.get(f"{edge_url}/v2/models/{EDGE}", trust_env=False)
                      .json()["versions"] == ["1"], what="the edge server retiring v2")
        finally:
            for stream in streams.values():
                stream.stop()
            for client in clients.values():
                client.close()
    # while requests streamed through every swap, none failed or fell back
    for stream in streams.values():
        assert stream.errors == []
        assert [r for r in stream.records if r[2] is not None] == []
        assert len(stream.records) > 100


# -- integrity --------------------------------------------------------------------------------


def test_a_flipped_byte_is_refused_and_the_running_version_keeps_serving(
        config: Config, models_dir: Path, hosted_registry: str, splits: Splits,
        tmp_path: Path) -> None:
    config.registry.poll_s = 3600  # this test polls by hand
    with Client(config, registry_url=hosted_registry, device_id="tamper-test",
                plan=Local(DEVICE), probe=False) as client:
        assert client.infer(splits.test_x[0]).trace.stages[0].model_version == "1"
        _push(config, rebuild(models_dir, tmp_path / "v2", [DEVICE]), DEVICE,
              channel="canary", canary_share=1.0)
        registry = registry_of(config)
        manifest, _ = registry.manifest(DEVICE, 2)
        weights = next(f for f in manifest["files"] if f["path"].endswith(MODEL_FILE))
        blob = registry.blob_path(weights["sha256"])
        original = blob.read_bytes()
        tampered = bytearray(original)
        tampered[len(tampered) // 2] ^= 0x01
        blob.write_bytes(bytes(tampered))

        subscriber = client.subscriber
        assert subscriber is not None
        assert subscriber.poll_once() is False
        error = subscriber.state.errors[DEVICE]
        assert "version 2 refused" in error and weights["sha256"] in error and "tampered" in error
        result = client.infer(splits.test_x[0])
        assert result.trace.stages[0].model_version == "1" and result.trace.fallback is None
        assert not (subscriber.cache_dir / "blobs" / weights["sha256"]).exists()

        blob.write_bytes(original)  # repaired at the registry: the next poll takes it
        assert subscriber.poll_once() is True
        assert client.infer(splits.test_x[0]).trace.stages[0].model_version == "2"


def _subscriber(config: Config, url: str, tmp_path: Path, **overrides: Any) -> Subscriber:
    settings = {"tier": "device", "channel": "stable", "device_id": "unit",
                "token": registry_token("", config.registry_dir),
                "public_key": config.registry_dir / "keys" / "signing.pub",
                "cache_dir": tmp_path / "cache", **overrides}
    return Subscriber(url, **settings)


def _edit_version(config: Config, model: str, version: int,
                  edit: Callable[[dict[str, Any], dict[str, Any]], None]) -> None:
    with sqlite3.connect(config.registry_dir / "index.db") as db:
        manifest, signature = db.execute("SELECT manifest, signature FROM versions WHERE "
                                         "model = ? AND version = ?", (model, version)).fetchone()
        manifest, signature = orjson.loads(manifest), orjson.loads(signature)
        edit(manifest, signature)
        db.execute("UPDATE versions SET manifest = ?, signature = ? WHERE model = ? AND "
                   "version = ?", (orjson.dumps(manifest), orjson.dumps(signature), model,
                                   version))


@pytest.mark.parametrize("attack, expected", [
    ("signed-malformed", "files[0].sha256"),
    ("unsigned", "unsigned (no signature)"),
    ("altered", "the signature does not verify"),
    ("other-key", "not by the trusted key"),
    ("garbage", "the signature block is a int"),
])
def test_unsigned_altered_or_foreign_manifests_are_refused(
        config: Config, hosted_registry: str, tmp_path: Path, attack: str,
        expected: str) -> None:
    overrides: dict[str, Any] = {}
    if attack == "signed-malformed":  # the registry's own key, over a broken manifest
        key = load_private_key(config.registry_dir / "keys" / PRIVATE_KEY_FILE)

        def break_and_sign(manifest: dict[str, Any], signature: dict[str, Any]) -> None:
            manifest["files"][0]["sha256"] = "../../etc/passwd"
            signature.clear()
            signature.update(sign(manifest, key))
        _edit_version(config, DEVICE, 1, break_and_sign)
    elif attack == "unsigned":
        _edit_version(config, DEVICE, 1, lambda m, s: s.clear())
    elif attack == "garbage":
        with sqlite3.connect(config.registry_dir / "index.db") as db:
            db.execute("UPDATE versions SET signature = '123' WHERE model = ?", (DEVICE,))
    elif attack == "altered":
        _edit_version(config, DEVICE, 1,
                      lambda m, s: m["metadata"]["trained"].update(test_accuracy=0.999))
    else:
        _, public, _ = keygen(tmp_path / "other-keys")
        overrides["public_key"] = public
    subscriber = _subscriber(config, hosted_registry, tmp_path, **overrides)
    try:
        subscriber.poll_once()
        if attack == "other-key":  # the deployment itself is signed: refused before any model
            assert subscriber.last_error and "deployment refused" in subscriber.last_error
            assert expected in subscriber.last_error
        else:
            assert expected in subscriber.state.errors[DEVICE]
        assert DEVICE not in subscriber.state.current
        assert not (subscriber.cache_dir / "installs" / DEVICE).exists()
    finally:
        subscriber.stop()


def test_a_replayed_expired_altered_or_foreign_deployment_is_refused(
        config: Config, models_dir: Path, hosted_registry: str, tmp_path: Path) -> None:
    """The deployment list is signed with a sequence and an expiry (TUF's timestamp and
    snapshot roles): what a man in the middle or a stale mirror could send is refused, and
    the version already installed keeps running."""
    token = registry_token("", config.registry_dir)

    def fetch(device: str = "unit") -> dict[str, Any]:
        answer = httpx.get(hosted_registry + "/registry/v1/deployments/stable",
                           params={"device": device},
                           headers={"authorization": f"Bearer {token}"})
        assert answer.status_code == 200, answer.text
        return answer.json()

    old = fetch()
    subscriber = _subscriber(config, hosted_registry, tmp_path)
    try:
        subscriber.poll_once()
        assert subscriber.state.current[DEVICE].version == "1"
        _push(config, rebuild(models_dir, tmp_path / "v2", [DEVICE]), DEVICE,
              channel="stable")  # version 2, for everyone
        subscriber.poll_once()
        assert subscriber.state.current[DEVICE].version == "2"
        new = fetch()
        assert new["sequence"] > old["sequence"]
        subscriber.check_deployment(new)  # the current one passes
        attacks = {
            "replayed": (old, "older (sequence"),  # a downgrade to version 1
            "emptied": ({**new, "models": {}}, "does not verify"),
            "re-dated": ({**old, "sequence": new["sequence"]}, "does not verify"),
            "another device's": (fetch("someone-else"), "is for 'someone-else'"),
        }
        for name, (document, expected) in attacks.items():
            with pytest.raises(VerificationError, match=re.escape(expected)):
                subscriber.check_deployment(document)
            print(f"{name}: refused")
        with pytest.raises(VerificationError, match="expired"):
            subscriber.check_deployment(new, now=new["expires_at"] + 1)
        unsigned = {key: value for key, value in new.items() if key != "signature"}
        with pytest.raises(VerificationError, match="unsigned"):
            subscriber.check_deployment(unsigned)
        # the highest sequence taken survives a restart: a replay after it is refused too
        restarted = _subscriber(config, hosted_registry, tmp_path)
        with pytest.raises(VerificationError, match="older"):
            restarted.check_deployment(old)
        restarted.stop()
        assert subscriber.state.current[DEVICE].version == "2"  # still running
    finally:
        subscriber.stop()


def test_a_rebuilt_registry_is_followed_and_lists_from_the_index_it_replaced_are_refused(
        config: Config, models_dir: Path, tmp_path: Path) -> None:
    """A registry made again from nothing counts its sequence from 0 under a new index id:
    its lists are taken once issued after the last one taken, and lists replayed from the
    index it replaced are refused (they are signed with the same key)."""
    registry = registry_of(config)
    registry.deployment_step_s = 0.2  # issue times move on quickly here
    for build in ("a1", "a2"):
        _push(config, rebuild(models_dir, tmp_path / build, [DEVICE]), DEVICE,
              channel="stable")
    before = registry.deployment("stable", "unit")
    subscriber = _subscriber(config, "http://127.0.0.1:9", tmp_path)  # no polling here
    subscriber.check_deployment(before)
    subscriber._remember(before)
    registry.index_location.unlink()  # rebuilt: the same keys, a new index
    rebuilt_registry = registry_of(config)
    rebuilt_registry.deployment_step_s = 0.2
    _push(config, models_dir, DEVICE)
    time.sleep(0.3)
    rebuilt = rebuilt_registry.deployment("stable", "unit")
    assert rebuilt["registry"] != before["registry"]
    assert rebuilt["sequence"] < before["sequence"]  # counting again
    subscriber.check_deployment(rebuilt)  # followed
    subscriber._remember(rebuilt)
    with pytest.raises(VerificationError, match="index left behind"):
        subscriber.check_deployment(before)  # a replay from the index it replaced
    restarted = _subscriber(config, "http://127.0.0.1:9", tmp_path)
    with pytest.raises(VerificationError, match="index left behind"):
        restarted.check_deployment(before)  # also after a restart
    restarted.check_deployment(rebuilt)
    subscriber.stop()
    restarted.stop()


def test_a_304_does_not_keep_an_expired_list_alive(
        config: Config, hosted_registry: str, tmp_path: Path) -> None:
    subscriber = _subscriber(config, hosted_registry, tmp_path)
    try:
        subscriber.poll_once()
        assert subscriber.state.current[DEVICE].version == "1"
        fresh_until = subscriber._etag_expires_at
        assert fresh_until is not None and fresh_until > time.time()
        # the list behind the ETag has expired: "unchanged" is not taken, the list is
        # fetched in full (and a fresh one, signed again, comes back)
        subscriber._etag_expires_at = time.time() - 1
        subscriber.poll_once()
        assert subscriber._etag_expires_at >= fresh_until and subscriber.last_error is None
    finally:
        subscriber.stop()


def test_an_interrupted_download_resumes_where_it_stopped(
        config: Config, hosted_registry: str, tmp_path: Path) -> None:
    full = _subscriber(config, hosted_registry, tmp_path / "full")
    full.poll_once()
    full.stop()
    assert full.state.current[DEVICE].version == "1"

    manifest, _ = registry_of(config).manifest(DEVICE, 1)
    weights = next(f for f in manifest["files"] if f["path"] == f"{DEVICE}/{MODEL_FILE}")
    blob = registry_of(config).blob_path(weights["sha256"]).read_bytes()
    resumed = _subscriber(config, hosted_registry, tmp_path / "resumed")
    partial = resumed.cache_dir / "partial" / weights["sha256"]
    partial.parent.mkdir(parents=True)
    half = len(blob) // 2
    partial.write_bytes(blob[:half])  # what a download cut off halfway leaves
    resumed.poll_once()
    resumed.stop()
    assert resumed.state.current[DEVICE].version == "1"
    assert resumed.bytes_downloaded == full.bytes_downloaded - half
    installed = resumed.state.current[DEVICE].members[DEVICE] / MODEL_FILE
    assert installed.read_bytes() == blob and not partial.exists()


def test_the_api_needs_the_token_answers_304_when_unchanged_and_refuses_bad_ranges(
        config: Config, hosted_registry: str) -> None:
    token = registry_token("", config.registry_dir)
    auth = {"authorization": f"Bearer {token}"}
    with httpx.Client(base_url=hosted_registry, trust_env=False) as http:
        refused = http.get("/registry/v1/models")
        assert refused.status_code == 401 and "Bearer" in refused.json()["error"]
        wrong = http.get("/registry/v1/models", headers={"authorization": "Bearer nope"})
        assert wrong.status_code == 401
        first = http.get("/registry/v1/deployments/stable", params={"device": "d1"},
                         headers=auth)
        assert first.status_code == 200 and first.headers["etag"]
        assert set(first.json()["models"]) == {DEVICE, EDGE, "fmnist-cloud"}
        again = http.get("/registry/v1/deployments/stable", params={"device": "d1"},
                         headers={**auth, "if-none-match": first.headers["etag"]})
        assert again.status_code == 304 and again.content == b""
        assert http.get("/registry/v1/deployments/beta", params={"device": "d1"},
                        headers=auth).status_code == 404
        assert http.get("/registry/v1/deployments/stable", headers=auth).status_code == 400
        digest = first.json()["models"][DEVICE]["versions"]["1"]["manifest"]["files"][0][
            "sha256"]
        ranged = http.get(f"/registry/v1/blobs/sha256/{digest}",
                          headers={**auth, "range": "bytes=10-"})
        assert ranged.status_code == 206
        assert ranged.headers["content-range"].startswith("bytes 10-")
        closed = http.get(f"/registry/v1/blobs/sha256/{digest}",
                          headers={**auth, "range": "bytes=0-5"})  # any RFC 9110 range
        assert closed.status_code == 206 and len(closed.content) == 6
        past = http.get(f"/registry/v1/blobs/sha256/{digest}",
                        headers={**auth, "range": "bytes=99999999-"})
        assert past.status_code == 416 and past.headers["content-range"].startswith("bytes */")
        other_unit = http.get(f"/registry/v1/blobs/sha256/{digest}",
                              headers={**auth, "range": "lines=1-"})
        assert other_unit.status_code == 200  # ignored, as RFC 9110 asks: the whole blob
        malformed = http.get(f"/registry/v1/blobs/sha256/{digest}",
                             headers={**auth, "range": "bytes=x-"})
        assert malformed.status_code in (400, 416)
        assert http.get("/registry/v1/blobs/sha256/not-a-digest",
                        headers=auth).status_code == 404
        # the tier server behind it still answers OIP
        assert http.get("/v2/health/live").status_code == 200


def test_a_cloud_without_a_registry_says_how_to_make_one(small_config: Config,
                                                         tmp_path: Path) -> None:
    config = small_config.model_copy(deep=True)
    config.registry.root = str(tmp_path / "none-yet")
    app = hosted(TierServer("cloud", config.tier("cloud"), {}), config)
    with serve_in_thread(app) as url:
        answer = httpx.get(f"{url}/registry/v1/models", trust_env=False)
    assert answer.status_code == 503 and "registry keygen" in answer.json()["error"]


# -- rollout rules ----------------------------------------------------------------------------


def test_cohorts_follow_the_share_and_only_grow_when_it_rises() -> None:
    devices = [f"phone-{i}" for i in range(4000)]
    at_10 = {d for d in devices if in_canary_cohort(d, DEVICE, 0.1)}
    at_50 = {d for d in devices if in_canary_cohort(d, DEVICE, 0.5)}
    assert 0.08 < len(at_10) / len(devices) < 0.12
    assert 0.47 < len(at_50) / len(devices) < 0.53
    assert at_10 < at_50
    # salted by model: another model's cohort is a different set of devices
    other = {d for d in devices if in_canary_cohort(d, EDGE, 0.5)}
    assert 0.3 < len(other & at_50) / len(at_50) < 0.7


def test_pause_promote_and_rollback(config: Config, models_dir: Path, tmp_path: Path,
                                    database_location: str) -> None:
    config.registry.database = database_location  # on SQLite, then on PostgreSQL
    registry = registry_of(config)
    assert _push(config, models_dir, DEVICE) == 1
    assert _push(config, models_dir, DEVICE) == 1  # same content: no new version
    v2_dir = rebuild(models_dir, tmp_path / "v2", [DEVICE])
    assert _push(config, v2_dir, DEVICE, channel="canary", canary_share=1.0) == 2

    def given(device: str) -> str:
        return registry.deployment("stable", device)["models"][DEVICE]["version"]

    assert given("early") == "2"
    registry.pause(DEVICE)
    assert given("late") == "1"   # paused: nobody new gets the canary
    assert given("early") == "2"  # whoever has it keeps it
    assert registry.deployment("canary", "tester")["models"][DEVICE]["version"] == "2"
    registry.promote(DEVICE)
    assert given("late") == "2" and registry.require(DEVICE).stable == 2
    registry.rollback(DEVICE)  # no canary: back to the previous stable
    assert given("late") == "1" and registry.require(DEVICE).stable == 1
    actions = [event["action"] for event in registry.events(DEVICE)]
    assert actions == ["push", "stable", "push", "canary", "pause", "stable", "rollback-stable"]
    # rollbacks in a row keep going back: 1 -> 3 -> 4, then 3, then 1, then nothing earlier
    for build in ("v3", "v4"):
        _push(config, rebuild(models_dir, tmp_path / build, [DEVICE]), DEVICE,
              channel="stable")
    assert registry.require(DEVICE).stable == 4
    assert registry.rollback(DEVICE).stable == 3
    assert registry.rollback(DEVICE).stable == 1
    with pytest.raises(RegistryError, match="no earlier stable version"):
        registry.rollback(DEVICE)

    # lineage: a variant records the version of the model it came from
    variant_dir = tmp_path / "variant"
    shutil.copytree(models_dir, variant_dir)
    variant = load_info(variant_dir / DEVICE).model_copy(update={
        "name": f"{DEVICE}.rebuilt", "parent": DEVICE, "variant": "rebuilt"})
    shutil.copytree(variant_dir / DEVICE, variant_dir / variant.name)
    save_info(variant_dir, variant)
    _push(config, variant_dir, variant.name)
    lineage = registry.versions(variant.name)[0]["lineage"]
    assert lineage == {"previous_version": None, "parent": DEVICE, "parent_version": "1",
                       "step": "rebuilt"}


def test_registry_cli_explains_what_it_cannot_do(
        config: Config, models_dir: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    config_path = _config_file(config, tmp_path / "tierwise.toml")
    cli = ["--config", config_path, "registry"]
    assert main([*cli, "push", "no-such-model", "--models", str(models_dir)]) == 2
    assert "no model 'no-such-model' to push" in capsys.readouterr().err
    assert main([*cli, "push", f"{EDGE}.head@1", "--models", str(models_dir)]) == 2
    assert f"push '{EDGE}'" in capsys.readouterr().err
    assert main([*cli, "pause", DEVICE]) == 2
    assert "no model 'fmnist-device' in the registry" in capsys.readouterr().err
    assert main([*cli, "push", DEVICE, "--models", str(models_dir)]) == 0
    assert "pushed version 1" in capsys.readouterr().out
    assert main([*cli, "promote", DEVICE]) == 2
    assert "no canary to promote" in capsys.readouterr().err
    assert main([*cli, "keygen"]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert main([*cli, "show", DEVICE]) == 0
    assert "versions" in capsys.readouterr().out


def test_a_client_starts_offline_from_what_it_installed_before(
        config: Config, hosted_registry: str, splits: Splits) -> None:
    with Client(config, registry_url=hosted_registry, device_id="offline-test",
                plan=Local(DEVICE), probe=False):
        pass
    unreachable = f"http://127.0.0.1:{free_port()}"
    with Client(config, registry_url=unreachable, device_id="offline-test", plan=Local(DEVICE),
                probe=False, timeout_s=1.0) as client:
        assert client.infer(splits.test_x[0]).trace.stages[0].model_version == "1"
    with pytest.raises(Exception, match="nothing installed"):
        Client(config, registry_url=unreachable, device_id="never-online", probe=False,
               timeout_s=1.0).start()



def test_bench_rollout_swaps_versions_under_load_without_errors(
        small_config: Config, models_dir: Path, tmp_path: Path) -> None:
    results = run_bench_rollout(small_config, tmp_path / "bench", duration_s=3.0,
                                swap_every_s=1.0, poll_s=0.2, concurrency=2,
                                console=Console(width=160))
    steady, rolling = results["phases"]
    assert steady["requests"] > 50 and rolling["requests"] > 50
    assert steady["errors"] == 0 and rolling["errors"] == 0
    assert len(rolling["versions"]) >= 2  # the version answering really changed
    assert [c["action"] for c in results["changes"]][:2] == ["promote", "rollback"]
    assert all(c["propagation_ms"] is not None for c in results["changes"])
    sizes = results["download_bytes_per_tier"]
    assert 0 < sizes["device"] < sizes["cloud"]  # a device takes heads, not server weights
    assert (tmp_path / "bench" / "results.json").is_file()
    assert (tmp_path / "bench" / "rollout.png").is_file()
