"""The bandwidth benchmark with the kernel enforcing the links (`--link tc`): servers in
network namespaces, tc tbf on veth pairs. Skipped, with the reason, where that is not
permitted (not root, no iproute2, no namespaces)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tierwise.bench.bandwidth import SweepSettings, run_bench_bandwidth
from tierwise.config import Config
from tierwise.net.tc import tc_unavailable_reason

REASON = tc_unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"kernel links: {REASON}")


def test_bandwidth_sweep_runs_on_kernel_enforced_links(small_config: Config, models_dir: Path,
                                                        tmp_path: Path) -> None:
    settings = SweepSettings(levels=[4000.0], images=12, oracle_images=4,
                             deadline_ms=100, min_accuracy=0.0)
    rows = run_bench_bandwidth(small_config, tmp_path, settings, link_mode="tc")
    document = json.loads((tmp_path / "results.json").read_text())
    assert document["link_mode"] == "tc"
    assert any("enforced by the kernel" in label for label in document["emulated"])
    by = {row["strategy"]: row for row in rows}
    # 4 KB/s through tc: a raw image (~1.2 KB with its headers) takes ~300 ms on the wire
    assert by["cloud-only"]["latency_p95_ms"] > settings.deadline_ms
    assert by["device-only"]["deadline_miss_rate"] == 0.0
    # with no accuracy floor the cheapest plan is the device's, whatever the link
    assert by["adaptive"]["deadline_miss_rate"] == 0.0
    assert set(by["adaptive"]["plans"]) == {"local(fmnist-device)"}
