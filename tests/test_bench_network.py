"""`tierwise bench bandwidth` and `tierwise bench trace`, small but real: server processes on
loopback, emulated links, the files and the behaviour a user looks for."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tierwise.bench.bandwidth import SweepSettings, run_bench_bandwidth
from tierwise.bench.network import ORACLE, STRATEGIES
from tierwise.bench.trace import TraceError, TraceSettings, load_trace, run_bench_trace
from tierwise.cli import main
from tierwise.config import Config
from tierwise.profile.model_profile import load_profile

FIELDS = {"strategy", "bandwidth_up_bytes_per_s", "accuracy", "latency_p50_ms",
          "latency_p95_ms", "deadline_miss_rate", "bytes_up_per_inference", "cost_usd_per_1m"}
PNG = b"\x89PNG\r\n\x1a\n"


def floor_between_device_and_edge(models_dir: Path) -> float:
    device = load_profile(models_dir, "fmnist-device").accuracy
    edge = load_profile(models_dir, "fmnist-edge").accuracy
    assert edge > device
    return (device + edge) / 2


def test_bandwidth_sweep_writes_every_strategy_and_shows_the_tradeoff(
        small_config: Config, models_dir: Path, tmp_path: Path) -> None:
    settings = SweepSettings(levels=[3000.0, 3e6], images=20, oracle_images=8,
                             deadline_ms=100,
                             min_accuracy=floor_between_device_and_edge(models_dir))
    run_bench_bandwidth(small_config, tmp_path, settings)
    document = json.loads((tmp_path / "results.json").read_text())
    rows = {(row["strategy"], row["bandwidth_up_bytes_per_s"]): row for row in document["rows"]}
    assert set(rows) == {(s, level) for s in (*STRATEGIES, ORACLE) for level in settings.levels}
    assert all(set(row) >= FIELDS for row in rows.values())
    # every strategy answers the same requests at every level, however slow its link
    assert {row["requests"] for row in rows.values()} == {settings.images}
    assert all(low <= row["accuracy"] <= high for row in rows.values()
               for low, high in [row["quality_ci"]])
    assert any("uplink swept 3KB/s..3MB/s" in label for label in document["emulated"])
    assert document["command"].startswith("tierwise")
    for plot in ("bandwidth.png", "findings.png"):
        assert (tmp_path / plot).read_bytes()[:8] == PNG
    assert "| adaptive |" in (tmp_path / "table.md").read_text()
    assert set(document["knees"]) == {*STRATEGIES, ORACLE}
    # a static remote strategy is cut off at the deadline and answered on the device
    slow_cloud = rows[("cloud-only", 3000.0)]
    assert slow_cloud["deadline_miss_rate"] == 1.0 and slow_cloud["fallback_rate"] == 1.0
    assert slow_cloud["latency_p95_ms"] < 3 * settings.deadline_ms
    slow, fast = settings.levels
    # remote-only degrades as bandwidth falls; the device does not care
    assert rows[("cloud-only", slow)]["latency_p95_ms"] > settings.deadline_ms
    assert document["knees"]["device-only"]["falters_at"] is None
    assert rows[("cloud-only", fast)]["latency_p95_ms"] < settings.deadline_ms
    assert rows[("device-only", slow)]["deadline_miss_rate"] == 0.0
    # adaptive: offloads when the link allows (the floor needs a server model), not when not
    assert rows[("adaptive", fast)]["bytes_up_per_inference"] > 0
    assert rows[("adaptive", slow)]["deadline_miss_rate"] <= 0.1
    assert rows[("adaptive", slow)]["deadline_miss_rate"] < \
        rows[("edge-only", slow)]["deadline_miss_rate"]
    assert document["targets"]["decision_us"]["p50"] > 0


def test_trace_replay_writes_records_summary_and_plot(small_config: Config, models_dir: Path,
                                                      tmp_path: Path) -> None:
    trace = tmp_path / "trace.csv"
    trace.write_text("t_s,bandwidth_up_bytes_per_s,bandwidth_down_bytes_per_s,rtt_ms\n"
                     "0,2000000,5000000,4\n1.5,3000,10000,40\n2.5,2000000,5000000,4\n"
                     "4,1,1,0\n")
    settings = TraceSettings(rate_per_s=5, deadline_ms=100,
                             min_accuracy=floor_between_device_and_edge(models_dir))
    rows = run_bench_trace(small_config, trace, tmp_path / "out", settings)
    out = tmp_path / "out"
    records = [json.loads(line) for line in (out / "requests.jsonl").read_text().splitlines()]
    assert {r["strategy"] for r in rows} == set(STRATEGIES)
    assert all(set(row) >= FIELDS for row in rows)
    for strategy in STRATEGIES:
        mine = sorted(r["request"] for r in records if r["strategy"] == strategy)
        assert mine == list(range(20))  # 4 s at 5/s: every request answered, once
    slow = [r for r in records if 1.6 <= r["t_s"] < 2.5 and r["strategy"] == "cloud-only"]
    assert slow and all(r["bandwidth_up_bytes_per_s"] == 3000 for r in slow)
    assert (out / "trace.png").read_bytes()[:8] == PNG


@pytest.mark.parametrize(("text", "message"), [
    ("t,up,down,rtt\n0,1,1,1\n", "expected the header"),
    ("t_s,bandwidth_up_bytes_per_s,bandwidth_down_bytes_per_s,rtt_ms\n0,fast,1,1\n1,1,1,1\n",
     ":2: bandwidth_up_bytes_per_s: expected a number"),
    ("t_s,bandwidth_up_bytes_per_s,bandwidth_down_bytes_per_s,rtt_ms\n0,1,1,1\n0,1,1,1\n",
     ":3: t_s: must increase"),
    ("t_s,bandwidth_up_bytes_per_s,bandwidth_down_bytes_per_s,rtt_ms\n0,-5,1,1\n1,1,1,1\n",
     ":2: bandwidth_up_bytes_per_s: expected a rate ≥ 0"),
    ("t_s,bandwidth_up_bytes_per_s,bandwidth_down_bytes_per_s,rtt_ms\n0,1,1,1\n",
     "at least two rows"),
])
def test_a_bad_trace_is_refused_with_its_line_and_column(tmp_path: Path, text: str,
                                                         message: str) -> None:
    trace = tmp_path / "bad.csv"
    trace.write_text(text)
    with pytest.raises(TraceError, match=message):
        load_trace(trace)


def test_a_missing_trace_is_a_clear_error(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "trace", "--trace", str(tmp_path / "missing.csv")]) == 2
    assert "trace file not found" in capsys.readouterr().err
