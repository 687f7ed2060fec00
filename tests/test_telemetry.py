"""Telemetry: traces stored and forwarded from the device to the collector on the cloud
server, across a collector that is killed and restarted; each trace stored exactly once."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import orjson
import pytest

from tierwise.bench.processes import free_port, tier_server
from tierwise.client import Client
from tierwise.config import Config, write_config
from tierwise.data import Splits
from tierwise.monitor.collector import Collector
from tierwise.planner.plans import Local
from tierwise.registry.signing import keygen
from tierwise.registry.subscriber import registry_token
from waiting import wait_for

DEVICE = "fmnist-device"


@pytest.fixture
def config(small_config: Config, tmp_path: Path) -> Config:
    config = small_config.model_copy(deep=True)
    config.data_dir = str(tmp_path / "data")
    config.registry.root = str(tmp_path / "registry")
    config.telemetry.flush_s = 0.1
    keygen(config.registry_dir / "keys")
    return config


def test_store_and_forward_loses_nothing_across_a_killed_collector(
        config: Config, models_dir: Path, splits: Splits, tmp_path: Path) -> None:
    config_path = str(write_config(config, tmp_path / "tierwise.toml"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    produced: list[str] = []
    with Client(config, models_dir=models_dir, collector_url=url, device_id="sf-device",
                plan=Local(DEVICE), probe=False) as client:
        assert client.telemetry is not None
        with tier_server("cloud", models_dir, port=port, config_path=config_path):
            for image in splits.test_x[:100]:
                produced.append(client.infer(image).trace.id)
            client.monitor_drain()  # telemetry is recorded off the request path
            wait_for(lambda: client.telemetry.backlog() == 0, what="the first 100 sent")
        # the collector is gone (its process terminated): the device keeps answering and
        # keeps every trace
        for image in splits.test_x[100:250]:
            produced.append(client.infer(image).trace.id)
        client.monitor_drain()
        time.sleep(1.0)  # several failed sends
        assert client.telemetry.backlog() == 150
        assert client.telemetry.last_error is not None
        with tier_server("cloud", models_dir, port=port, config_path=config_path):
            wait_for(lambda: client.telemetry.backlog() == 0, what="the backlog sent")
            token = registry_token("", config.registry_dir)
            summary = httpx.get(f"{url}/telemetry/v1/summary", trust_env=False,
                                headers={"authorization": f"Bearer {token}"}).json()
            assert summary["requests"] == 250 and summary["devices"] == 1
    stored = Collector(config.telemetry.collector_path(config.data_dir)).records()
    assert sorted(row["id"] for row in stored) == sorted(produced)  # count in = count stored
    assert {row["model"] for row in stored} == {DEVICE}
    assert all(0.0 <= row["input_mean"] <= 1.0 for row in stored)  # statistics, not pixels


def test_a_batch_sent_twice_is_stored_once_and_bad_batches_are_refused(
        config: Config, models_dir: Path, splits: Splits, tmp_path: Path) -> None:
    from tierwise.cloud import hosted
    from tierwise.server.app import TierServer, serve_in_thread

    with Client(config, models_dir=models_dir, plan=Local(DEVICE), probe=False,
                collector_url="") as client:
        traces = [client.infer(image).trace.to_dict() for image in splits.test_x[:5]]
    token = registry_token("", config.registry_dir)
    auth = {"authorization": f"Bearer {token}"}
    batch = orjson.dumps({"device": "d", "traces": traces})
    app = hosted(TierServer("cloud", config.tier("cloud"), {}), config)
    with serve_in_thread(app) as url, httpx.Client(base_url=url, trust_env=False) as http:
        first = http.post("/telemetry/v1/traces", content=batch, headers=auth).json()
        again = http.post("/telemetry/v1/traces", content=batch, headers=auth).json()
        assert first == {"accepted": 5, "duplicates": 0}
        assert again == {"accepted": 0, "duplicates": 5}  # its answer was lost: sent again
        assert http.post("/telemetry/v1/traces", content=batch).status_code == 401
        bad = http.post("/telemetry/v1/traces", headers=auth,
                        content=orjson.dumps({"device": "d", "traces": [{"id": "x"}]}))
        assert bad.status_code == 400 and "traces[0]: not a trace" in bad.json()["error"]
        assert http.post("/telemetry/v1/traces", headers=auth,
                         content=b"{").status_code == 400
        assert http.get("/telemetry/v1/traces", headers=auth).status_code == 405
        exposed = http.get("/metrics").text  # the cloud server's own Prometheus metrics
        assert "tierwise_collector_traces_total 5.0" in exposed
        assert "tierwise_collector_duplicates_total 5.0" in exposed


def test_client_metrics_count_where_requests_ran_and_what_drifted(
        config: Config, models_dir: Path, splits: Splits) -> None:
    from tierwise.bench.processes import free_port as port_for_metrics
    from tierwise.monitor.drift import DriftMonitor

    port = port_for_metrics()
    drift = DriftMonitor(reference_size=100, window_size=50, step=10)
    with Client(config, models_dir=models_dir, plan=Local(DEVICE), probe=False,
                collector_url="", drift=drift, metrics_port=port) as client:
        for image in splits.test_x[:150]:
            trace = client.infer(image).trace
            assert trace.input_mean is not None and 0 <= trace.input_mean <= 1
        dimmed = (splits.test_x[150:300] * 0.3).astype(splits.test_x.dtype)  # a shift
        traces = [client.infer(image).trace for image in dimmed]
        client.monitor_drain()  # drift, metrics and telemetry run off the request path
        alerted = [trace.drift_alerts for trace in traces]
        exposed = httpx.get(f"http://127.0.0.1:{port}/metrics", trust_env=False).text
    assert any(alerted) and drift.alerts
    assert 'tierwise_client_requests_total{plan="local",tier="device"} 300.0' in exposed
    assert "tierwise_client_latency_seconds_count{plan=\"local\"} 300.0" in exposed
    assert 'tierwise_client_drift_alerts_total{detector="psi",statistic="input_mean"}' in exposed


def test_a_batch_the_collector_refuses_is_set_aside_and_later_traces_still_arrive(
        config: Config, models_dir: Path, splits: Splits, tmp_path: Path) -> None:
    from tierwise.cloud import hosted
    from tierwise.monitor.telemetry import Telemetry
    from tierwise.server.app import TierServer, serve_in_thread

    with Client(config, models_dir=models_dir, plan=Local(DEVICE), probe=False,
                collector_url="") as client:
        traces = [client.infer(image).trace for image in splits.test_x[:3]]
    traces[0].total_ms = float("nan")  # travels as null: the collector refuses it for good
    app = hosted(TierServer("cloud", config.tier("cloud"), {}), config)
    with serve_in_thread(app) as url:
        token = registry_token("", config.registry_dir)
        telemetry = Telemetry(url, device_id="refusal", token=token, flush_s=0.05,
                              outbox_path=tmp_path / "outbox.db", batch_size=1)
        for trace in traces:
            telemetry.record(trace)
        wait_for(lambda: telemetry.backlog() == 0, what="the outbox emptied")
        telemetry.close()
        assert telemetry.sent == 2  # the refused one is in the outbox's `refused` table
    stored = Collector(config.telemetry.collector_path(config.data_dir)).records()
    assert sorted(row["id"] for row in stored) == sorted(t.id for t in traces[1:])
