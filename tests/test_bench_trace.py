"""`tierwise bench trace` on traces with outages: real servers on loopback, emulated links.

A rate of 0 in a trace is an outage; 1 byte/s is a near-outage. Every request on such a link
must be answered within its bound (the deadline, then the device fallback), and the bench
must end within the bound it states of the trace's length."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest

from tierwise.bench.network import STRATEGIES
from tierwise.bench.trace import TraceError, TraceSettings, load_trace, run_bench_trace
from tierwise.config import Config
from tierwise.profile.model_profile import load_profile

HEADER = "t_s,bandwidth_up_bytes_per_s,bandwidth_down_bytes_per_s,rtt_ms\n"


def floor_between_device_and_edge(models_dir: Path) -> float:
    """An accuracy floor only a server model meets: the adaptive client must offload."""
    device = load_profile(models_dir, "fmnist-device").accuracy
    edge = load_profile(models_dir, "fmnist-edge").accuracy
    assert edge > device
    return (device + edge) / 2


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "requests.jsonl").read_text().splitlines()]


def test_a_zero_rate_is_an_outage_not_a_bad_file(tmp_path: Path) -> None:
    trace = tmp_path / "outage.csv"
    trace.write_text(HEADER + "0,2000000,5000000,4\n1,0,0,4\n2.5,0,5000000,4\n3,1,1,0\n")
    points = load_trace(trace)
    assert [(p.bandwidth_up, p.bandwidth_down) for p in points[1:3]] == [(0, 0), (0, 5e6)]


@pytest.mark.parametrize(("row", "message"), [
    ("1,-5,1,1", ":3: bandwidth_up_bytes_per_s: expected a rate ≥ 0"),
    ("1,1,nan,1", ":3: bandwidth_down_bytes_per_s: expected a finite number"),
    ("1,1,-0.5,1", ":3: bandwidth_down_bytes_per_s: expected a rate ≥ 0"),
    ("1,1,1,slow", ":3: rtt_ms: expected a number"),
    ("1,,1,1", ":3: bandwidth_up_bytes_per_s: expected a number"),
    ("1,1,1,-2", ":3: rtt_ms: expected ≥ 0"),
])
def test_a_bad_row_names_its_file_line_and_column(tmp_path: Path, row: str,
                                                  message: str) -> None:
    trace = tmp_path / "bad.csv"
    trace.write_text(HEADER + "0,1000,1000,10\n" + row + "\n2,1000,1000,10\n")
    with pytest.raises(TraceError, match=f"bad.csv{message}"):
        load_trace(trace)


def test_an_outage_replays_and_every_request_is_answered_within_its_bound(
        small_config: Config, models_dir: Path, tmp_path: Path) -> None:
    trace = tmp_path / "outage.csv"
    # good, then no connectivity at all for 1.5 s, then good again
    trace.write_text(HEADER + "0,2000000,5000000,4\n1,0,0,4\n2.5,2000000,5000000,4\n"
                     "3.5,2000000,5000000,4\n")
    settings = TraceSettings(rate_per_s=6, deadline_ms=100,
                             min_accuracy=floor_between_device_and_edge(models_dir))
    run_bench_trace(small_config, trace, tmp_path / "out", settings)
    document = json.loads((tmp_path / "out" / "results.json").read_text())
    bound = document["bound"]
    records = _records(tmp_path / "out")
    count = int(3.5 * 6)
    worst = {s: max(r["latency_ms"] for r in records if r["strategy"] == s) for s in STRATEGIES}
    print(f"request bound {bound['request_s'] * 1e3:.1f} ms; worst latency per strategy "
          f"(ms): {worst}; replay {bound['measured_replay_s']} s, bound {bound['replay_s']:.2f}")
    for strategy in STRATEGIES:
        mine = sorted((r for r in records if r["strategy"] == strategy),
                      key=lambda r: r["request"])
        assert [r["request"] for r in mine] == list(range(count))
        assert all(r["answered"] for r in mine)
        # generous: a loaded 2-core host schedules the answering threads late (a 0.35 s
        # stall of the whole process was seen once); without the bound it was 60 s
        assert worst[strategy] <= bound["request_s"] * 1e3 + 1000
    cloud = [r for r in records if r["strategy"] == "cloud-only"]
    in_outage = [r for r in cloud if 1.0 <= r["t_s"] < 2.4]
    assert in_outage and all(r["fallback"] for r in in_outage)  # the device answered
    after = [r for r in cloud if r["t_s"] >= 2.7]
    assert after and not any(r["fallback"] for r in after)  # the link came back
    assert all(row["unanswered"] == 0 for row in document["rows"])
    assert bound["within"]
    assert any("outage" in label for label in document["emulated"])
    assert "falls back to the device model" in document["timeout"]


def test_a_one_byte_per_second_trace_ends_within_its_stated_bound(
        small_config: Config, models_dir: Path, tmp_path: Path) -> None:
    trace = tmp_path / "dead.csv"
    trace.write_text(HEADER + "0,1,1,20\n3,1,1,20\n")
    # one worker per strategy at 20 requests/s: on a near-dead link the remote strategies
    # fall behind (each request holds its worker for the 100 ms deadline: 10 answers/s), so
    # about half their requests are still queued when the trace ends
    settings = TraceSettings(rate_per_s=20, deadline_ms=100, min_accuracy=0.0,
                             max_in_flight=1)
    began = time.perf_counter()
    run_bench_trace(small_config, trace, tmp_path / "out", settings)
    wall_s = time.perf_counter() - began
    document = json.loads((tmp_path / "out" / "results.json").read_text())
    bound = document["bound"]
    print(f"1 B/s for 3 s: replay took {bound['measured_replay_s']} s against the stated "
          f"{bound['replay_s']:.2f} s ({bound['statement']}); the whole bench {wall_s:.1f} s")
    assert bound["trace_s"] == 3
    assert bound["replay_s"] < 3 + 0.1 + 0.05 + 0.5 + 0.01  # the deadline, a small model
    assert max(bound["measured_replay_s"]) <= bound["replay_s"] + 1.0  # generous margin
    assert bound["within"]
    assert wall_s < 60  # the same trace once ran for over 10 minutes
    records = _records(tmp_path / "out")
    rows = {row["strategy"]: row for row in document["rows"]}
    print("unanswered (still queued at the trace's end):",
          {name: row["unanswered"] for name, row in rows.items()})
    for strategy in STRATEGIES:
        mine = sorted(r["request"] for r in records if r["strategy"] == strategy)
        assert mine == list(range(60))  # answered or counted, never dropped
        row = rows[strategy]
        assert row["requests"] + row["unanswered"] == row["arrived"] == 60
    assert rows["cloud-only"]["unanswered"] >= 10
    assert rows["cloud-only"]["deadline_miss_rate"] >= rows["cloud-only"]["unanswered"] / 60
    assert rows["device-only"]["unanswered"] < rows["cloud-only"]["unanswered"]
    answered = [r for r in records if r["answered"] and r["strategy"] == "cloud-only"]
    assert all(r["fallback"] for r in answered)  # nothing crossed a 1 B/s link in time
    assert not math.isnan(rows["cloud-only"]["latency_p95_ms"])
