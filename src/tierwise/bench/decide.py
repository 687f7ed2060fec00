"""`tierwise bench decide`: what one placement decision costs as the candidate plans grow.

Any model a user brings adds candidates (every input codec, every profiled cut × feature
codec, every cascade, per tier), so the policy's cost per request must stay small at a few
hundred. The candidates here are synthetic — a Local plan, then Remote, Split and Cascade
plans over edge and cloud with random profiled times, payloads, qualities and cascade
curves — because the decision's cost depends on their count and kinds, not their values.
Each count is timed on the same quiet process, side by side, with estimates as a running
client has them; results go to `reports/bench-decide/results.json`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from tierwise.config import Config
from tierwise.planner.estimators import LinkEstimator
from tierwise.planner.plans import Cascade, Local, Remote, Split
from tierwise.planner.policy import SLO, Candidate, PlanningState, Policy
from tierwise.profile.model_profile import CascadeCurve

TARGET_US = 100.0  # the target at 200 candidates


def synthetic_candidates(count: int, seed: int = 0) -> list[Candidate]:
    """`count` candidates: one Local, then Remote, Split and Cascade plans in turn over
    edge and cloud (a tenth of them cascades with 100-point curves)."""
    rng = np.random.default_rng(seed)
    out = [Candidate(plan=Local("device-model"), accuracy=0.85, device_model="device-model",
                     device_ms=2.0)]
    while len(out) < count:
        index = len(out)
        tier = ("edge", "cloud")[index % 2]
        model = f"{tier}-model-{index % 7}"
        accuracy = float(rng.uniform(0.8, 0.99))
        payload = float(rng.uniform(500, 200_000))
        kind = index % 10
        if kind == 0:
            escalation = np.linspace(0, 1, 101)
            out.append(Candidate(
                plan=Cascade(Local("device-model"), Remote(tier, model), 0.5), accuracy=accuracy,
                device_model="device-model", device_ms=2.0, tier=tier, server_model=model,
                server_ms=float(rng.uniform(1, 20)), payload_mean_bytes=payload,
                payload_p95_bytes=payload * 1.2,
                curve=CascadeCurve(then=model, thresholds=np.linspace(0, 1, 101).tolist(),
                                   accuracy=(0.85 + 0.14 * escalation).tolist(),
                                   escalation_rate=escalation.tolist())))
        elif kind % 2:
            out.append(Candidate(
                plan=Remote(tier, model, f"codec-{index}"), accuracy=accuracy,
                device_model=model, device_ms=float(rng.uniform(0, 1)), tier=tier,
                server_model=model, server_ms=float(rng.uniform(1, 20)),
                payload_mean_bytes=payload, payload_p95_bytes=payload * 1.2))
        else:
            point = int(rng.integers(1, 9))
            out.append(Candidate(
                plan=Split(tier, model, point, f"codec-{index}"), accuracy=accuracy,
                device_model=f"{model}.head@{point}", device_ms=float(rng.uniform(0.5, 5)),
                tier=tier, server_model=f"{model}.tail@{point}",
                server_ms=float(rng.uniform(1, 20)), payload_mean_bytes=payload,
                payload_p95_bytes=payload * 1.2))
    return out[:count]


def time_decisions(config: Config, count: int, repeats: int) -> dict[str, float]:
    """p50/p99/mean µs of `Policy.choose` over `count` candidates, `repeats` decisions under
    a varying deadline and floor (so the feasible set changes between calls)."""
    policy = Policy(synthetic_candidates(count), config.prices)
    state = PlanningState(links={tier: LinkEstimator(link).snapshot()
                                 for tier, link in config.links.items()},
                          queue_ms={"edge": 1.0, "cloud": 3.0})
    rng = np.random.default_rng(1)
    slos = [SLO(float(rng.uniform(5, 500)), float(rng.uniform(0.8, 0.99)))
            for _ in range(64)]
    for slo in slos:  # warm-up
        policy.choose(slo, state)
    times = np.empty(repeats)
    for index in range(repeats):
        started = time.perf_counter()
        policy.choose(slos[index % len(slos)], state)
        times[index] = (time.perf_counter() - started) * 1e6
    return {"candidates": count, "p50_us": float(np.percentile(times, 50)),
            "p99_us": float(np.percentile(times, 99)), "mean_us": float(times.mean())}


def run_bench_decide(config: Config, out_dir: Path, counts: list[int], repeats: int,
                     console: Console | None = None) -> dict[str, object]:
    console = console or Console()
    rows = []
    with console.status("timing decisions"):
        for count in counts:
            rows.append(time_decisions(config, count, repeats))
    at_200 = next((row for row in rows if row["candidates"] == 200), None)
    result: dict[str, object] = {
        "rows": rows, "repeats": repeats, "target_us_at_200": TARGET_US,
        "met": None if at_200 is None else at_200["p50_us"] <= TARGET_US,
        "note": "synthetic candidates (Local, Remote, Split, Cascade over edge and cloud); "
                "one quiet process; Policy.choose alone"}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    table = Table("candidates", "p50 µs", "p99 µs", "mean µs",
                  title=f"tierwise bench decide ({repeats} decisions each)")
    for row in rows:
        table.add_row(str(row["candidates"]), f"{row['p50_us']:.1f}", f"{row['p99_us']:.1f}",
                      f"{row['mean_us']:.1f}")
    console.print(table)
    console.print(f"wrote {out_dir / 'results.json'}")
    return result
