"""The fleet list: the cloud publishes its server sites (`GET /fleet/v1/sites`), a client
that knows only the cloud takes them as sites of its own, plans and bills them, and follows
the list as it changes; a list it cannot have or read leaves it answering."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import orjson
import pytest

from tierwise.bench.processes import free_port
from tierwise.client import Client
from tierwise.cloud import hosted
from tierwise.config import Config, LinkConfig, TierConfig
from tierwise.data import Splits
from tierwise.planner.cost import PriceTable
from tierwise.planner.plans import Remote
from tierwise.protocol.fleet import FleetError, parse_fleet
from tierwise.registry.store import Registry
from tierwise.registry.subscriber import registry_token
from tierwise.runtime.session import load_models
from tierwise.server.app import TierServer, create_app, serve_in_thread
from waiting import wait_for

EDGE = "fmnist-edge"


@contextmanager
def _cloud(config: Config, port: int = 0) -> Iterator[str]:
    Registry(config.registry_dir).rollouts()  # an empty index
    app = hosted(TierServer("cloud", config.tier("cloud"), {}), config)
    with serve_in_thread(app, port=port) as url:
        yield url


def _publishing(config: Config, sites: dict[str, str]) -> Config:
    """`config` as a cloud publishing these edge sites (name -> URL), each in eu-west at
    its own price."""
    config = config.model_copy(deep=True)
    for index, (name, url) in enumerate(sites.items()):
        config.tiers[name] = TierConfig(kind="edge", region="eu-west", url=url,
                                        usd_per_hour=1.0 + index, price_source="test")
        config.links[name] = LinkConfig(bandwidth_up="10MB/s", bandwidth_down="10MB/s",
                                        rtt_ms=1, usd_per_gb_down=0.5)
    return config


@pytest.fixture(scope="module")
def edge_url(models_dir: Path) -> Iterator[str]:
    app = create_app("edge", TierConfig(), load_models(models_dir, names=[EDGE]))
    with serve_in_thread(app) as url:
        yield url


def test_a_client_takes_the_sites_the_cloud_publishes_and_follows_the_list(
        cloud_config: Config, models_dir: Path, splits: Splits, edge_url: str) -> None:
    cloud_config.registry.poll_s = 0.2
    port = free_port()
    device_config = cloud_config.model_copy(deep=True)
    device_config.registry.url = f"http://127.0.0.1:{port}"
    published = _publishing(cloud_config, {"edge-paris": edge_url})
    with ExitStack() as first_cloud:
        cloud_url = first_cloud.enter_context(_cloud(published, port))
        # the listing itself: authenticated, with an ETag
        token = registry_token("", cloud_config.registry_dir)
        assert httpx.get(f"{cloud_url}/fleet/v1/sites").status_code == 401
        answer = httpx.get(f"{cloud_url}/fleet/v1/sites",
                           headers={"authorization": f"Bearer {token}"})
        assert answer.status_code == 200
        (site,) = [s for s in parse_fleet(answer.content) if s.name == "edge-paris"]
        assert (site.url, site.region, site.usd_per_hour) == (edge_url, "eu-west", 1.0)
        again = httpx.get(f"{cloud_url}/fleet/v1/sites", headers={
            "authorization": f"Bearer {token}", "if-none-match": answer.headers["etag"]})
        assert again.status_code == 304

        with Client(device_config, models_dir=models_dir, probe=False, collector_url="",
                    fleet=True) as client:
            assert "edge-paris" not in device_config.tiers  # only the cloud told it
            assert client.config.tier("edge-paris").region == "eu-west"
            plans = {getattr(plan, "tier", None) for plan in client.policy().plans_for(0.0)}
            assert "edge-paris" in plans
            result = client.infer(splits.test_x[0], Remote("edge-paris", EDGE))
            assert result.trace.answered_by.tier == "edge-paris"
            # billed at the published prices: $1/h and $0.5 per GB down
            (stage,) = result.trace.stages
            prices = PriceTable.of(client.config)
            assert prices.transfer_usd("edge-paris", 0, 10**9) == pytest.approx(0.5)
            assert result.trace.cost_usd == pytest.approx(
                prices.compute_usd("edge-paris", stage.compute_ms)
                + prices.transfer_usd("edge-paris", stage.bytes_up, stage.bytes_down))
            # an adaptive request limited to eu-west can only go there (or the device)
            adaptive = client.infer(splits.test_x[0], regions={"eu-west"}, deadline_ms=5000,
                                    min_quality=0.0)
            assert adaptive.trace.answered_by.tier in ("edge-paris", "device")

            # the operator renames the site: the cloud is restarted publishing the new list,
            # and the running client follows it within a poll or two
            first_cloud.close()
            with _cloud(_publishing(cloud_config, {"edge-lyon": edge_url}), port):
                wait_for(lambda: "edge-lyon" in client.config.tiers, timeout_s=30,
                         what="the new site taken")
                assert client.retired == frozenset({"edge-paris"})
                plans = {getattr(plan, "tier", None)
                         for plan in client.policy().plans_for(0.0)}
                assert "edge-lyon" in plans
                assert "edge-paris" not in client.decide(client.slo).plan.tiers
                result = client.infer(splits.test_x[0], Remote("edge-lyon", EDGE))
                assert result.trace.answered_by.tier == "edge-lyon"


def test_a_list_that_cannot_be_had_or_read_leaves_the_client_answering(
        cloud_config: Config, models_dir: Path, splits: Splits) -> None:
    # nothing listens at the cloud's address
    config = cloud_config.model_copy(deep=True)
    config.registry.url = f"http://127.0.0.1:{free_port()}"
    with Client(config, models_dir=models_dir, probe=False, collector_url="",
                fleet=True) as client:
        assert client.fleet_watcher is not None
        assert "registry.fleet: the cloud at" in client.fleet_watcher.last_error
        assert "did not answer" in client.fleet_watcher.last_error
        assert client.infer(splits.test_x[0]).trace.answered_by.tier == "device"
    # a cloud that publishes no site (every one has port 0 and no url)
    with _cloud(cloud_config) as url:
        config.registry.url = url
        with Client(config, models_dir=models_dir, probe=False, collector_url="",
                    fleet=True) as client:
            assert "publishes no sites" in client.fleet_watcher.last_error
            assert client.infer(splits.test_x[0]).result is not None
    # a server answering a malformed list
    with _static_server(orjson.dumps({"sites": [{"name": "x", "kind": "edge",
                                                 "url": "ftp://nowhere"}]})) as url:
        config.registry.url = url
        with Client(config, models_dir=models_dir, probe=False, collector_url="",
                    fleet=True) as client:
            error = client.fleet_watcher.last_error
            assert "malformed: sites[0].url: expected an http(s)://host:port URL" in error
            assert "x" not in client.config.tiers


def test_fleet_needs_a_cloud_to_ask(small_config: Config, models_dir: Path) -> None:
    from tierwise.config import ConfigError

    config = small_config.model_copy(deep=True)
    config.registry.url = ""
    with pytest.raises(ConfigError, match=r"registry\.fleet: .* set registry\.url"):
        Client(config, models_dir=models_dir, fleet=True)


@pytest.mark.parametrize(("body", "expected"), [
    (b"<html>", r"not JSON"),
    (b"[]", r"an object with a 'sites' list"),
    (b'{"sites": [1]}', r"sites\[0\]: expected an object"),
    (b'{"sites": [{"kind": "edge", "url": "http://a:1"}]}', r"sites\[0\]\.name"),
    (b'{"sites": [{"name": "device", "kind": "edge", "url": "http://a:1"}]}',
     r"sites\[0\]\.name: .*not 'device'"),
    (b'{"sites": [{"name": "a", "kind": "fog", "url": "http://a:1"}]}', r"sites\[0\]\.kind"),
    (b'{"sites": [{"name": "a", "kind": "edge", "url": "a:1"}]}', r"sites\[0\]\.url"),
    (b'{"sites": [{"name": "a", "kind": "edge", "url": "http://[::1"}]}',
     r"sites\[0\]\.url: expected an http"),
    (b'{"sites": [{"name": "a", "kind": "edge", "url": "http://0.0.0.0:8000"}]}',
     r"sites\[0\]\.url: 0\.0\.0\.0 is where a server listens"),
    (b'{"sites": [{"name": "a", "kind": "edge", "url": "http://a:1", "require_auth": 1}]}',
     r"sites\[0\]\.require_auth: expected true or false"),
    (b'{"sites": [{"name": "a", "kind": "edge", "url": "http://a:1", "usd_per_hour": -1}]}',
     r"sites\[0\]\.usd_per_hour: expected a number"),
    (b'{"sites": [{"name": "a", "kind": "edge", "url": "http://a:1"},'
     b' {"name": "a", "kind": "edge", "url": "http://b:1"}]}', r"sites\[1\]\.name: 'a' is "
                                                              r"listed twice"),
])
def test_a_malformed_fleet_list_is_refused_whole_naming_the_field(body: bytes,
                                                                  expected: str) -> None:
    with pytest.raises(FleetError, match=expected):
        parse_fleet(body)


@contextmanager
def _static_server(body: bytes) -> Iterator[str]:
    """A real HTTP server on loopback answering every GET with `body`."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


def test_bench_fleet_loses_nothing_and_routes_around_the_overload(
        small_config: Config, tmp_path: Path) -> None:
    import json

    from tierwise.bench.fleet import FleetSettings, run_bench_fleet

    settings = FleetSettings(duration_s=10.0, rate=20.0,
                             strategies=("tierwise", "least-RTT"))
    run_bench_fleet(small_config, settings, tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    summaries = {summary["strategy"]: summary for summary in results["summaries"]}
    for summary in summaries.values():
        print(summary)
        assert summary["lost"] == 0 and summary["answered"] == summary["requests"] > 100
    # least-RTT keeps sending to the flooded nearest site; tierwise sees its queue rise
    assert summaries["least-RTT"]["share"]["edge-near"] == 1.0
    assert summaries["tierwise"]["deadline_misses"] < summaries["least-RTT"]["deadline_misses"]
    assert summaries["tierwise"]["site_p99_ms"] < summaries["least-RTT"]["site_p99_ms"]
    table = (tmp_path / "table.md").read_text()
    assert "link device->edge-near: emulated" in table
    assert (tmp_path / "bench-fleet.png").stat().st_size > 0


def test_a_site_that_leaves_the_list_and_comes_back_is_planned_again(
        small_config: Config, models_dir: Path) -> None:
    from tierwise.planner.policy import SLO
    from tierwise.profile.model_profile import load_profile
    from tierwise.protocol.fleet import FleetSite

    paris = FleetSite("edge-paris", "edge", "http://127.0.0.1:9", region="eu-west")
    own = FleetSite("edge", "cloud", "http://127.0.0.1:9")  # the config's own: left alone
    with Client(small_config, models_dir=models_dir, probe=False, collector_url="",
                registry_url="", drift=False) as client:
        client.apply_fleet([paris, own])
        assert "edge-paris" in client.config.tiers and not client.retired
        assert client.config.kind("edge") == "edge" and "edge" not in client.tier_urls
        # only Paris is in eu-west, and the device model is below this floor
        floor = load_profile(models_dir, EDGE).accuracy
        in_europe = SLO(5000, floor, regions=frozenset({"eu-west"}))
        assert "edge-paris" in client.decide(in_europe).plan.tiers
        client.apply_fleet([own])
        assert client.retired == {"edge-paris"}
        assert not client.decide(in_europe).plan.tiers  # the device: nowhere else
        client.apply_fleet([paris])
        assert not client.retired and client.tier_urls["edge-paris"] == paris.url
        assert "edge-paris" in client.decide(in_europe).plan.tiers


def test_the_cloud_publishes_only_addresses_a_device_can_use(cloud_config: Config) -> None:
    from tierwise.cloud.fleet import published_sites
    from tierwise.config import ConfigError
    from tierwise.protocol.fleet import encode_fleet

    config = cloud_config.model_copy(deep=True)
    config.tiers["edge-v6"] = TierConfig(kind="edge", host="::1", port=8000,
                                         require_auth=True)
    config.links["edge-v6"] = config.links["edge"].model_copy()
    (site,) = [s for s in published_sites(config) if s.name == "edge-v6"]
    assert site.url == "http://[::1]:8000" and site.require_auth
    assert parse_fleet(encode_fleet(published_sites(config)))  # what it sends, it can read
    config.tiers["edge-v6"].host = "0.0.0.0"
    with pytest.raises(ConfigError, match=r"tiers\.edge-v6\.url: 0\.0\.0\.0 is where a server "
                                          r"listens.*set tiers\.edge-v6\.url"):
        published_sites(config)
