"""The published cloud–edge–client findings, set against a bandwidth sweep
(`tierwise bench bandwidth`).

Shen et al., "Toward Efficient and Reliable AI-Generated Content Services / ... cloud–edge–
client testbed" (HKUST + MSRA; IEEE Communications Magazine 62(10), 2024, arXiv:2307.02779)
report, on their testbed:

1. edge-only inference does well above about 300 KB/s of uplink and falters below it;
2. client-only inference avoids the network but cannot reach the server model's quality;
3. the hybrid (client and server together) is the most resilient across bandwidths;
4. task-oriented compression kept 84.02% accuracy while cutting a 224 KB instance to
   32.83 KB (6.8×) — measured here by `tierwise optimize bottleneck`, not by the sweep.

`knees` measures finding 1 for every strategy; `plot_findings` draws 1–3 in one figure.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tierwise.bench.harness import BenchReport
from tierwise.bench.network import ADAPTIVE, ORACLE, STRATEGIES
from tierwise.config import format_rate

PAPER_KNEE_BYTES_PER_S = 300e3
# a strategy "does well" at a level where at most this share of its requests miss
WELL_MISS_RATE = 0.05


def knees(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per strategy: the lowest uplink from which it does well at every level up
    (`fine_from`, bytes/s; None if at none), the level just below it (`falters_at`; None if
    it does well everywhere), and the miss rate there."""
    out: dict[str, dict[str, Any]] = {}
    for name in (*STRATEGIES, ORACLE):
        levels = sorted((r["bandwidth_up_bytes_per_s"], r["deadline_miss_rate"])
                        for r in rows if r["strategy"] == name)
        fine_from = falters_at = falters_miss = None
        for level, miss in reversed(levels):
            if miss > WELL_MISS_RATE:
                falters_at, falters_miss = level, miss
                break
            fine_from = level
        out[name] = {"fine_from": fine_from, "falters_at": falters_at,
                     "miss_rate_there": falters_miss}
    return out


def resilience(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per strategy, over the sweep's levels: the mean and the worst on-time quality (right
    and within the deadline)."""
    out = {}
    for name in (*STRATEGIES, ORACLE):
        values = [r["on_time_quality"] for r in rows if r["strategy"] == name]
        out[name] = {"mean": float(np.mean(values)), "worst": float(np.min(values))}
    return out


def describe_knee(knee: dict[str, Any]) -> str:
    if knee["fine_from"] is None:
        return "misses at every level"
    if knee["falters_at"] is None:
        return f"does well at every level (from {format_rate(knee['fine_from'])})"
    return (f"does well from {format_rate(knee['fine_from'])}, falters at "
            f"{format_rate(knee['falters_at'])} ({knee['miss_rate_there']:.0%} missed)")


def plot_findings(report: BenchReport, rows: list[dict[str, Any]], settings: Any,
                  quality: str, measured: dict[str, dict[str, Any]]) -> None:
    """findings.png: (1) deadline misses against uplink with the paper's 300 KB/s and the
    measured edge-only knee; (2) quality of device-only against the servers'; (3) on-time
    quality per strategy over the sweep (mean and worst level)."""
    styles = {ADAPTIVE: {"linewidth": 3, "color": "black"},
              ORACLE: {"linestyle": "--", "color": "grey", "linewidth": 2}}
    with report.figure("findings.png", ncols=3, size=(17, 5.2),
                       title="Published cloud–edge–client findings (Shen et al. 2024) against "
                             f"this sweep; deadline {settings.deadline_ms:g} ms") as (_, axes):
        misses, qualities, bars = axes
        for name in (*STRATEGIES, ORACLE):
            points = sorted((r["bandwidth_up_bytes_per_s"], r["deadline_miss_rate"],
                             r["accuracy"]) for r in rows if r["strategy"] == name)
            x, miss, value = zip(*points, strict=True)
            misses.plot(x, np.array(miss) * 100, marker="o", label=name, **styles.get(name, {}))
            if name in ("device-only", "edge-only", "cloud-only", ADAPTIVE):
                qualities.plot(x, np.array(value) * 100, marker="o", label=name,
                               **styles.get(name, {}))
        misses.axvline(PAPER_KNEE_BYTES_PER_S, color="red", linestyle=":",
                       label="paper: edge-only knee ~300 KB/s")
        edge = measured["edge-only"]
        if edge["fine_from"] is not None and edge["falters_at"] is not None:
            misses.axvspan(edge["falters_at"], edge["fine_from"], color="orange", alpha=0.2,
                           label="measured edge-only knee")
        misses.set_title("1. deadline misses: edge-only falters below a knee")
        misses.set_ylabel("requests past the deadline (%)")
        qualities.set_title(f"2. client-only cannot reach the server's {quality}")
        qualities.set_ylabel(f"{quality} (%)")
        for axis in (misses, qualities):
            axis.set_xscale("log")
            axis.set_xlabel("uplink bandwidth (bytes/s, log)")
            axis.grid(True, which="both", alpha=0.3)
            axis.legend(fontsize=7)
        spread = resilience(rows)
        names = list(spread)
        position = np.arange(len(names))
        bars.bar(position - 0.2, [spread[n]["mean"] * 100 for n in names], 0.4,
                 label="mean over levels")
        bars.bar(position + 0.2, [spread[n]["worst"] * 100 for n in names], 0.4,
                 label="worst level")
        bars.set_xticks(position, names, rotation=30, ha="right", fontsize=8)
        bars.set_ylabel(f"on-time {quality} (%): right and within the deadline")
        bars.set_title("3. the hybrid is the most resilient")
        bars.legend(fontsize=8)
        bars.grid(True, axis="y", alpha=0.3)
