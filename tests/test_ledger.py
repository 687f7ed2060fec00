"""The cost ledger against a hand computation from the price book."""

from __future__ import annotations

from pathlib import Path

import pytest

from tierwise.config import Config, PriceBook
from tierwise.monitor.ledger import AllCloudBaseline, Ledger, all_cloud_baseline
from tierwise.planner.cost import PriceTable


def _stage(tier: str, compute_ms: float, up: int = 0, down: int = 0,
           batch_size: int = 1) -> dict[str, object]:
    return {"tier": tier, "compute_ms": compute_ms, "bytes_up": up, "bytes_down": down,
            "batch_size": batch_size}


def test_the_ledger_matches_a_hand_computation() -> None:
    prices = PriceBook(edge_usd_per_hour=0.36, cloud_usd_per_hour=0.72,
                       edge_link_usd_per_gb_up=0.01, cloud_link_usd_per_gb_up=0.02,
                       cloud_link_usd_per_gb_down=0.09, device_power_w=5.0,
                       electricity_usd_per_kwh=0.2)
    baseline = AllCloudBaseline(compute_ms=2.0, bytes_up=1200, bytes_down=400)
    ledger = Ledger(PriceTable.of(Config(prices=prices)), baseline)
    # a local answer: 1 ms on the device
    ledger.add({"stages": [_stage("device", 1.0)]})
    # a cascade that escalated to the cloud: 1 ms on the device, then the cloud model in a
    # batch of 4 that took 8 ms, 1,000 bytes up and 500 down
    ledger.add({"stages": [_stage("device", 1.0), _stage("cloud", 8.0, 1000, 500, 4)]})
    # the edge, 3 ms alone, 2,000 bytes up, 100 down
    ledger.add({"stages": [_stage("edge", 3.0, 2000, 100)]})

    # by hand: energy 5 W x 1 ms = 5 mJ, x2; 1 kWh = 3.6e6 J at $0.20
    energy = 2 * 5.0 * 1e-3 / 3.6e6 * 0.2
    cloud_compute = (8.0 / 4) / 1e3 * 0.72 / 3600          # 2 ms of the cloud's hour
    cloud_link = 1000 / 1e9 * 0.02 + 500 / 1e9 * 0.09
    edge_compute = 3.0 / 1e3 * 0.36 / 3600
    edge_link = 2000 / 1e9 * 0.01                            # edge down is free
    all_cloud = 3 * (2.0 / 1e3 * 0.72 / 3600 + 1200 / 1e9 * 0.02 + 400 / 1e9 * 0.09)

    summary = ledger.summary()
    assert summary["requests"] == 3
    assert summary["device_energy_usd"] == pytest.approx(energy)
    assert summary["compute_usd"] == pytest.approx({"cloud": cloud_compute,
                                                    "edge": edge_compute})
    assert summary["link_usd"] == pytest.approx({"cloud": cloud_link, "edge": edge_link})
    assert summary["link_bytes"] == {"cloud": {"up": 1000, "down": 500},
                                     "edge": {"up": 2000, "down": 100}}
    total = energy + cloud_compute + cloud_link + edge_compute + edge_link
    assert summary["total_usd"] == pytest.approx(total)
    assert summary["all_cloud_usd"] == pytest.approx(all_cloud)
    assert summary["savings_usd"] == pytest.approx(all_cloud - total)
    assert 0 < summary["savings_share"] < 1


def test_the_all_cloud_baseline_comes_from_the_profile_and_the_wire_format(
        models_dir: Path) -> None:
    from tierwise.profile.model_profile import load_profile

    baseline = all_cloud_baseline(models_dir, "fmnist-cloud")
    assert baseline.compute_ms == load_profile(models_dir, "fmnist-cloud").compute_ms["cloud"]
    # a raw 28x28 image and its header up, ten logits down, each with HTTP headers
    assert 784 + 300 < baseline.bytes_up < 784 + 300 + 400
    assert 40 + 300 < baseline.bytes_down < 40 + 300 + 400


def test_a_site_the_config_does_not_price_is_billed_what_the_device_billed() -> None:
    ledger = Ledger(PriceTable.of(Config()), AllCloudBaseline(1.0, 100, 10))
    stage = {**_stage("edge-far", 4.0, 1000, 100), "cost_usd": 0.25}
    assert ledger.add({"stages": [stage]}) == pytest.approx(0.25)
    assert ledger.compute_usd["edge-far"] == pytest.approx(0.25)


def test_active_learning_uploads_are_priced_on_the_cloud_link_per_device() -> None:
    prices = PriceBook(cloud_link_usd_per_gb_up=0.05)
    ledger = Ledger(PriceTable.of(Config(prices=prices)),
                    AllCloudBaseline(compute_ms=1.0, bytes_up=1, bytes_down=1))
    cost = ledger.add_sample_uploads({"cam-1": {"samples": 10, "bytes": 9120},
                                      "cam-2": {"samples": 2, "bytes": 1824}}, "cloud")
    assert cost == pytest.approx((9120 + 1824) / 1e9 * 0.05)
    summary = ledger.summary()
    assert summary["sample_uploads"] == {"cam-1": {"samples": 10, "bytes": 9120},
                                         "cam-2": {"samples": 2, "bytes": 1824}}
    assert summary["sample_upload_usd"] == pytest.approx(cost)
    assert summary["total_usd"] == pytest.approx(cost)  # no inference traffic yet
