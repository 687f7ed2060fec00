"""Sites by name, end to end: a client that knows two edge sites (real servers on
loopback), each with its own price, plans across both and bills each answer at its site's
price."""

from __future__ import annotations

from pathlib import Path

import pytest

from tierwise.bench.processes import tier_server
from tierwise.client import Client
from tierwise.config import Config, TierConfig
from tierwise.data import Splits
from tierwise.planner.cost import PriceTable
from tierwise.planner.plans import Remote


def test_a_client_plans_and_bills_two_named_edge_sites(
        small_config: Config, models_dir: Path, splits: Splits) -> None:
    config = small_config.model_copy(deep=True)
    config.tiers["edge-paris"] = TierConfig(kind="edge", region="eu-west", usd_per_hour=1.7)
    config.links["edge-paris"] = config.links["edge"].model_copy()
    prices = PriceTable.of(config)
    with tier_server("edge", models_dir) as edge, tier_server("edge", models_dir) as paris, \
            Client(config, models_dir=models_dir, probe=False, collector_url="",
                   tier_urls={"edge": edge, "edge-paris": paris}) as client:
        image = splits.test_x[0]
        here = client.infer(image, Remote("edge", "fmnist-edge")).trace
        there = client.infer(image, Remote("edge-paris", "fmnist-edge")).trace
        assert here.answered_by.tier == "edge" and there.answered_by.tier == "edge-paris"
        (stage,) = there.stages
        billed = prices.compute_usd("edge-paris", stage.compute_ms / stage.batch_size) + \
            prices.transfer_usd("edge-paris", stage.bytes_up, stage.bytes_down)
        assert there.cost_usd == pytest.approx(billed)
        # ten times the edge's hourly price, the same link price (free up and down)
        ratio = there.cost_usd / here.cost_usd * here.stages[0].compute_ms / stage.compute_ms
        assert ratio == pytest.approx(10.0, rel=1e-6)
        # the policy knows both sites' plans and chooses among them
        plans = {getattr(plan, "tier", None) for plan in client.policy().plans_for(0.0)}
        assert {"edge", "edge-paris"} <= plans


def test_a_request_limited_to_regions_never_leaves_them() -> None:
    from tierwise.config import config_from_dict
    from tierwise.planner.estimators import LinkEstimate
    from tierwise.planner.plans import Local
    from tierwise.planner.policy import SLO, Candidate, PlanningState, Policy

    config = config_from_dict({"tiers": {"edge": {"region": "eu-west"},
                                         "cloud": {"region": "us-east"}}}, "test")
    big = {"device_model": "big", "device_ms": 0.0, "server_model": "big",
           "payload_mean_bytes": 1000, "payload_p95_bytes": 1000}
    policy = Policy([
        Candidate(Local("small"), accuracy=0.50, device_model="small", device_ms=2.0),
        Candidate(Remote("edge", "big"), accuracy=0.95, tier="edge", server_ms=35.0, **big),
        Candidate(Remote("cloud", "big"), accuracy=0.95, tier="cloud", server_ms=1.0, **big),
    ], PriceTable.of(config), {site: config.tier(site).region for site in config.sites()})
    link = LinkEstimate(rtt_ms=1.0, bandwidth_up=1e7, bandwidth_down=1e7,
                        overhead_up_bytes=0.0, response_bytes=0.0)
    links = PlanningState(links={"edge": link, "cloud": link})
    anywhere = policy.choose(SLO(30, 0.9), links)
    assert anywhere.plan == Remote("cloud", "big")  # the only one in time
    in_europe = policy.choose(SLO(30, 0.9, regions=frozenset({"eu-west"})), links)
    assert in_europe.plan == Remote("edge", "big") and not in_europe.feasible  # late, but in
    edge_down = PlanningState(links=links.links, unavailable=["edge"])
    stays = policy.choose(SLO(30, 0.9, regions=frozenset({"eu-west"})), edge_down)
    assert stays.plan == Local("small")  # the device, never the cloud
    nowhere = policy.choose(SLO(1000, 0.0, regions=frozenset()), links)
    assert nowhere.plan == Local("small")


def test_the_client_refuses_a_plan_outside_the_allowed_regions(
        small_config: Config, models_dir: Path, splits: Splits) -> None:
    config = small_config.model_copy(deep=True)
    config.tiers["cloud"].region = "us-east"
    with Client(config, models_dir=models_dir, probe=False, collector_url="") as client:
        with pytest.raises(ValueError, match=r"outside the regions \['eu-west'\]"):
            client.infer(splits.test_x[0], Remote("cloud", "fmnist-cloud"),
                         regions={"eu-west"})
        # adaptive: the only answer allowed is the device's (no site is in eu-west)
        result = client.infer(splits.test_x[0], regions={"eu-west"})
        assert result.trace.answered_by.tier == "device"
        assert result.trace.slo["regions"] == ["eu-west"]  # on record, for an audit
        import orjson

        from tierwise.protocol.traces import parse_batch
        parse_batch(orjson.dumps({"device": "d", "traces": [result.trace.to_dict()]}))


def test_a_hedged_request_is_answered_by_the_faster_site_and_both_are_counted(
        small_config: Config, models_dir: Path, splits: Splits) -> None:
    from tierwise.profile.model_profile import load_profile
    from waiting import wait_for

    config = small_config.model_copy(deep=True)
    # the planner thinks both edge sites equally fast; "edge" is cheaper, so it is chosen,
    # but its server is in fact 2000x slower than profiled (a stalled site)
    config.tiers["edge-paris"] = TierConfig(kind="edge", usd_per_hour=5.0, region="eu")
    config.tiers["edge"].region = "eu"
    config.links["edge-paris"] = config.links["edge"].model_copy()
    floor = load_profile(models_dir, "fmnist-edge").accuracy
    with tier_server("edge", models_dir, extra_args=["--compute-scale", "2000"]) as slow, \
            tier_server("edge", models_dir) as fast, \
            Client(config, models_dir=models_dir, probe=False, collector_url="", hedge=True,
                   tier_urls={"edge": slow, "edge-paris": fast}) as client:
        # the two edge sites only (the cloud is in no region here): the hedge's only choice
        result = client.infer(splits.test_x[0], deadline_ms=5000, min_quality=floor,
                              regions={"eu"})
        trace = result.trace
        print(trace.plan, trace.hedge, trace.total_ms, [s.tier for s in trace.stages])
        assert trace.hedge is not None and "edge-paris" in trace.hedge["plan"]
        # answered by the hedge: at Paris, or on the device if the hedge is a cascade that
        # did not need to escalate; never by the stalled site
        assert trace.hedge["won"] and trace.answered_by.tier in ("edge-paris", "device")
        assert "edge-paris" in trace.plan and "edge-paris" not in trace.hedge["instead_of"]
        assert client.hedges.summary()["hedged"] == 1 and client.hedges.won == 1
        # the loser's cost counts once it ends (the slow server still answers)
        wait_for(lambda: client.hedges.loser_cost_usd > 0, timeout_s=60,
                 what="the losing request billed")
        # a hedge that is not needed never starts: the fast site first
        fast_only = client.infer(splits.test_x[0], Remote("edge-paris", "fmnist-edge"))
        assert fast_only.trace.hedge is None


def test_a_site_without_a_url_is_never_planned(small_config: Config, models_dir: Path) -> None:
    """The default config's sites have port 0: a client told only the edge's URL never plans
    the cloud, even for a request only the cloud can answer well; told both, it does."""
    from tierwise.planner.policy import SLO
    from tierwise.profile.model_profile import load_profile

    config = small_config.model_copy(deep=True)
    config.tiers["edge"].region, config.tiers["cloud"].region = "eu-west", "us-east"
    device, cloud = (load_profile(models_dir, name).accuracy
                     for name in ("fmnist-device", "fmnist-cloud"))
    # in us-east only, above what the device model alone reaches: a cloud plan
    slo = SLO(deadline_ms=10_000, min_accuracy=(device + cloud) / 2,
              regions=frozenset({"us-east"}))
    urls = {"edge": "http://127.0.0.1:9", "cloud": "http://127.0.0.1:9"}
    edge_only = Client(config, models_dir=models_dir, probe=False, collector_url="",
                       tier_urls={"edge": urls["edge"]})
    both = Client(config, models_dir=models_dir, probe=False, collector_url="",
                  tier_urls=urls)
    with edge_only, both:
        chosen = both.decide(slo).plan
        assert "cloud" in chosen.tiers, chosen.describe()
        chosen = edge_only.decide(slo).plan
        assert "cloud" not in chosen.tiers, chosen.describe()
