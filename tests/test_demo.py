import json
from pathlib import Path

from rich.console import Console

from tierwise.bench.demo import run_demo
from tierwise.config import Config


def test_demo_compares_the_strategies_and_writes_a_report(
    small_config: Config, models_dir: Path, tmp_path: Path
) -> None:
    config = small_config.model_copy(deep=True)
    config.demo.images = 60
    console = Console(record=True, width=160)
    rows = {r.strategy: r for r in run_demo(config, tmp_path / "report", console=console)}
    assert list(rows) == ["device-only", "edge-only", "cloud-only", "cascade", "adaptive"]
    # where each strategy ran shows in what it sent and what it cost
    assert rows["device-only"].bytes_up_per_inference == 0
    assert rows["edge-only"].bytes_up_per_inference > 784
    assert rows["cloud-only"].bytes_up_per_inference > 784
    assert 0 < rows["cascade"].escalated_share < 1
    assert 0 < rows["cascade"].bytes_up_per_inference < rows["cloud-only"].bytes_up_per_inference
    # the cloud link's RTT (30 ms by default) bounds every cloud request from below
    assert rows["cloud-only"].latency_p50_ms >= config.links["cloud"].rtt_ms
    assert rows["device-only"].latency_p50_ms < rows["edge-only"].latency_p50_ms
    assert rows["cloud-only"].cost_usd_per_1m > rows["device-only"].cost_usd_per_1m
    # static plans fall back only on errors; adaptive also when a stage would miss its
    # deadline, which a loaded 2-core machine can cause now and then
    assert all(r.fallback_share == 0 for name, r in rows.items() if name != "adaptive")
    assert rows["adaptive"].fallback_share <= 0.05
    # adaptive meets the cascade's accuracy target for less than sending everything away
    assert rows["adaptive"].cost_usd_per_1m < rows["cloud-only"].cost_usd_per_1m
    assert rows["adaptive"].plan.startswith("policy per request")

    report = tmp_path / "report"
    saved = json.loads((report / "results.json").read_text())
    assert [row["strategy"] for row in saved["rows"]] == list(rows)
    assert any("emulated" in label for label in saved["emulated"])
    assert "Emulated" in (report / "table.md").read_text()
    # every tier and device took its models from the registry, and the traces say which
    registry = saved["registry"]
    assert {r["model"] for r in registry["pushed"]} >= {"fmnist-device", "fmnist-edge",
                                                        "fmnist-cloud"}
    assert registry["versions_served"]["device-only"] == {"fmnist-device": "1"}
    assert registry["versions_served"]["edge-only"] == {"fmnist-edge": "1"}
    # every device's traces reached the collector, and the demo ends with the report
    page = (report / "report.html").read_text()
    assert "<td id='requests'>" + f"{5 * (config.demo.images + 1):,}" in page
    assert page.count("data:image/png;base64,") == 4
    for plot in ("latency_cdf.png", "accuracy_vs_cost.png"):
        assert (report / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = console.export_text()
    assert "cascade threshold" in printed and "link device->cloud: emulated" in printed
