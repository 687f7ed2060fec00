"""TLS on the links, for real: certificates from `tierwise certs init`, uvicorn serving
HTTPS on loopback, the SDK's remote stages, and the telemetry sender verifying it; mutual TLS
refusing a device without a certificate from the CA."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tierwise.client import Client
from tierwise.config import Config, TierConfig, TlsConfig
from tierwise.data import Splits
from tierwise.net.tls import init_certs
from tierwise.planner.plans import Remote
from tierwise.runtime.session import load_models
from tierwise.server.app import create_app, serve_in_thread

MODEL = "fmnist-edge"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("certs")
    issued = init_certs(directory, ["127.0.0.1", "localhost"], ["cam-1"])
    assert issued.ca.is_file() and issued.devices["cam-1"][0].is_file()
    assert oct(issued.server_key.stat().st_mode & 0o777) == "0o600"
    return directory


@pytest.fixture(scope="module")
def models(models_dir: Path) -> dict:
    return load_models(models_dir, names=[MODEL, "fmnist-device"])


def _server_tls(certs: Path, mutual: bool = False) -> TlsConfig:
    return TlsConfig(cert=str(certs / "server.pem"), key=str(certs / "server.key"),
                     client_ca=str(certs / "ca.pem") if mutual else "")


def _client(config: Config, url: str, tls: TlsConfig) -> Client:
    config = config.model_copy(deep=True)
    config.tls = tls
    return Client(config, tier_urls={"edge": url}, plan=Remote("edge", MODEL), probe=False)


@pytest.fixture(scope="module")
def https_edge(models: dict, certs: Path) -> Iterator[str]:
    with serve_in_thread(create_app("edge", TierConfig(), models),
                         tls=_server_tls(certs)) as url:
        yield url


def test_a_request_crosses_tls_to_a_verified_server(
        small_config: Config, https_edge: str, certs: Path, splits: Splits) -> None:
    assert https_edge.startswith("https://")
    with _client(small_config, https_edge, TlsConfig(ca=str(certs / "ca.pem"))) as client:
        trace = client.infer(splits.test_x[0]).trace
    assert trace.fallback is None and trace.answered_by.tier == "edge"


def test_a_server_the_ca_did_not_sign_is_refused(
        small_config: Config, https_edge: str, tmp_path: Path, splits: Splits) -> None:
    other = init_certs(tmp_path / "other", ["127.0.0.1"], [])  # a CA that signed nothing here
    with _client(small_config, https_edge, TlsConfig(ca=str(other.ca))) as client:
        trace = client.infer(splits.test_x[0]).trace
    print(trace.fallback)
    assert trace.answered_by.tier == "device"  # answered anyway, on the device
    assert trace.fallback and "CERTIFICATE_VERIFY_FAILED" in trace.fallback


def test_mutual_tls_refuses_a_device_without_a_certificate_from_the_ca(
        small_config: Config, models: dict, certs: Path, splits: Splits) -> None:
    with serve_in_thread(create_app("edge", TierConfig(), models),
                         tls=_server_tls(certs, mutual=True)) as url:
        anonymous = TlsConfig(ca=str(certs / "ca.pem"))
        with _client(small_config, url, anonymous) as client:
            refused = client.infer(splits.test_x[0]).trace
        enrolled = TlsConfig(ca=str(certs / "ca.pem"),
                             client_cert=str(certs / "device-cam-1.pem"),
                             client_key=str(certs / "device-cam-1.key"))
        with _client(small_config, url, enrolled) as client:
            accepted = client.infer(splits.test_x[0]).trace
    print(refused.fallback)
    assert refused.answered_by.tier == "device" and refused.fallback
    assert accepted.fallback is None and accepted.answered_by.tier == "edge"


def test_telemetry_reaches_a_collector_over_tls(cloud_config: Config, certs: Path,
                                                tmp_path: Path) -> None:
    from tierwise.client.trace import StageTrace, Trace
    from tierwise.cloud import hosted
    from tierwise.monitor.collector import Collector
    from tierwise.monitor.telemetry import Telemetry
    from tierwise.net.tls import client_context
    from tierwise.registry.subscriber import registry_token
    from tierwise.server.app import TierServer
    from waiting import wait_for

    config = cloud_config
    app = hosted(TierServer("cloud", config.tier("cloud"), {}), config)
    with serve_in_thread(app, tls=_server_tls(certs)) as url:
        telemetry = Telemetry(url, device_id="tls-device",
                              token=registry_token("", config.registry_dir),
                              outbox_path=tmp_path / "outbox.db", flush_s=0.05,
                              verify=client_context(TlsConfig(ca=str(certs / "ca.pem"))))
        trace = Trace(plan="local(m)", total_ms=1.0,
                      stages=[StageTrace("local", "device", "m", "1", 1.0, 1.0)])
        telemetry.record(trace)
        wait_for(lambda: telemetry.sent == 1, what="the trace sent over TLS")
        telemetry.close()
    stored = Collector(config.telemetry.collector_path(config.data_dir)).records()
    assert [row["id"] for row in stored] == [trace.id]


def test_certs_init_cli_keeps_the_ca_and_names_bad_input(tmp_path: Path) -> None:
    def certs(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "tierwise.cli", "certs", "init", "--dir",
                               str(tmp_path / "c"), *args], capture_output=True, text=True,
                              timeout=60, check=False)
    first = certs("--devices", "cam-1")
    assert first.returncode == 0, first.stderr
    assert "[tls]" in first.stdout and "client_cert" in first.stdout
    ca = (tmp_path / "c" / "ca.pem").read_bytes()
    more = certs("--devices", "cam-2")  # a device added later: the same CA signs it
    assert more.returncode == 0 and (tmp_path / "c" / "ca.pem").read_bytes() == ca
    bad = certs("--devices", "[evil]")
    assert bad.returncode != 0 and "device_id" in bad.stderr
    no_hosts = certs("--hosts", " ")
    assert no_hosts.returncode != 0 and "hosts" in no_hosts.stderr
