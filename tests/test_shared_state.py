"""State shared by several cloud servers (issue "Past one machine", shared state): the
collector and the credentials on both backends, and two real cloud server processes on one
PostgreSQL registry and collector, with concurrent pushes and promotes."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
import orjson
import pytest

from tierwise.bench.processes import tier_server
from tierwise.bench.rollout import rebuild
from tierwise.cli import main
from tierwise.client.trace import StageTrace, Trace
from tierwise.config import Config, write_config
from tierwise.monitor.collector import Collector
from tierwise.registry import RegistryError
from tierwise.registry.credentials import Credentials
from tierwise.registry.signing import PRIVATE_KEY_FILE, load_private_key
from tierwise.registry.store import registry_of
from tierwise.registry.subscriber import registry_token
from waiting import wait_for

DEVICE, EDGE = "fmnist-device", "fmnist-edge"


def _trace(ms: float = 1.0) -> dict:
    return Trace(plan="local(m)", total_ms=ms,
                 stages=[StageTrace("local", "device", "m", "1", ms, ms)]).to_dict()


def test_the_collector_and_the_credentials_on_both_backends(database_location: str) -> None:
    collector = Collector(database_location)
    traces = [_trace(float(i)) for i in range(5)]
    assert collector.ingest("cam-1", traces) == (5, 0)
    assert collector.ingest("cam-1", [*traces[:2], _trace()]) == (1, 2)  # sent again: once
    assert collector.count() == 6
    summary = collector.summary()
    assert summary["requests"] == 6 and summary["devices"] == 1
    records = collector.records()
    assert len(records) == 6 and isinstance(records[0]["record"], bytes)
    assert sorted(r["total_ms"] for r in records)[-1] == 4.0

    credentials = Credentials(database_location)
    token = credentials.enroll("cam-1")
    assert credentials.authenticate(f"Bearer {token}".encode()).id == "cam-1"
    rotated = credentials.rotate("cam-1", overlap_s=0)
    fresh = Credentials(database_location)  # another process: no cache
    with pytest.raises(ValueError):
        fresh.authenticate(f"Bearer {token}".encode())
    assert fresh.authenticate(f"Bearer {rotated}".encode()).role == "device"
    assert fresh.revoke("cam-1") == 2


def _config(config: Config, url: str, tmp_path: Path) -> str:
    shared = config.model_copy(deep=True)
    shared.registry.database = url
    shared.telemetry.collector_db = url
    return str(write_config(shared, tmp_path / "tierwise.toml"))


def test_two_cloud_servers_share_one_registry_and_collector_on_postgres(
        cloud_config: Config, models_dir: Path, postgres_server_url: str,
        tmp_path: Path) -> None:
    from postgres import new_database

    url = new_database(postgres_server_url)
    config_path = _config(cloud_config, url, tmp_path)
    config = cloud_config.model_copy(deep=True)
    config.registry.database = url
    token = registry_token("", config.registry_dir)
    auth = {"authorization": f"Bearer {token}"}
    assert main(["--config", config_path, "registry", "push", DEVICE, "--models",
                 str(models_dir)]) == 0
    with tier_server("cloud", models_dir, config_path=config_path) as first, \
            tier_server("cloud", models_dir, config_path=config_path) as second:
        def version(server: str) -> str:
            answer = httpx.get(server + "/registry/v1/deployments/stable",
                               params={"device": "d1"}, headers=auth, timeout=30)
            assert answer.status_code == 200, answer.text
            return answer.json()["models"][DEVICE]["version"]

        assert version(first) == version(second) == "1"
        assert main(["--config", config_path, "registry", "push", EDGE, "--models",
                     str(models_dir), "--channel", "stable"]) == 0
        # concurrent pushes and promotes, as two operators' processes would make them
        key = load_private_key(config.registry_dir / "keys" / PRIVATE_KEY_FILE)
        builds = {who: [rebuild(models_dir, tmp_path / f"{who}{i}", [DEVICE, EDGE])
                        for i in range(3)] for who in ("a", "b")}
        errors: list[BaseException] = []
        raced: list[str] = []

        def operator(who: str) -> None:
            try:
                registry = registry_of(config)  # its own connections
                for build in builds[who]:
                    registry.push(config, build, DEVICE, key, channel="stable")
                    registry.push(config, build, EDGE, key, channel="canary",
                                  canary_share=0.5)
                    try:
                        registry.promote(EDGE)
                    except RegistryError as error:  # the other promoted it first
                        raced.append(str(error))
            except BaseException as error:
                errors.append(error)

        threads = [threading.Thread(target=operator, args=(who,)) for who in builds]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, errors
        registry = registry_of(config)
        numbers = [int(v["version"]) for v in registry.versions(DEVICE)]
        assert numbers == list(range(1, 8))  # one number per push, none twice, no gap
        assert registry.require(DEVICE).stable == 7  # the last push, whoever made it
        edge_numbers = [int(v["version"]) for v in registry.versions(EDGE)]
        assert edge_numbers == list(range(1, 8))
        edge = registry.require(EDGE)
        promotes = [e for e in registry.events(EDGE) if e["detail"] == "promoted from canary"]
        assert len(promotes) + len(raced) == 6 and all("no canary" in r for r in raced)
        assert edge.canary is None or edge.canary > (edge.stable or 0)
        # served the same by both servers
        assert version(first) == version(second) == "7"
        # a trace batch sent to one server is in the other's summary
        batch = orjson.dumps({"device": "cam-1", "traces": [_trace()]})
        assert httpx.post(first + "/telemetry/v1/traces", content=batch, headers=auth,
                          timeout=30).json()["accepted"] == 1
        wait_for(lambda: httpx.get(second + "/telemetry/v1/summary", headers=auth,
                                   timeout=30).json()["requests"] == 1, timeout_s=10,
                 what="the trace in the other server's summary")


def test_a_postgres_url_that_does_not_connect_is_a_clear_error(
        cloud_config: Config, models_dir: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    from tierwise.bench.processes import free_port

    config_path = _config(cloud_config, f"postgresql://u:pw@127.0.0.1:{free_port()}/r",
                          tmp_path)
    assert main(["--config", config_path, "registry", "push", DEVICE, "--models",
                 str(models_dir)]) == 2
    err = capsys.readouterr().err
    print(err)
    assert "cannot connect" in err and "pw" not in err.replace("push", "")


def test_credentials_that_cannot_be_checked_are_a_503_not_an_unknown_token() -> None:
    from tierwise.bench.processes import free_port
    from tierwise.registry.credentials import CredentialError

    credentials = Credentials(f"postgresql://u:pw@127.0.0.1:{free_port()}/r")
    with pytest.raises(CredentialError) as raised:
        credentials.authenticate(b"Bearer some-token")
    assert raised.value.status == 503 and "cannot check the token now" in str(raised.value)
    assert "pw@" not in str(raised.value)
