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

from tierwise.bench.harness import run_record
from tierwise.client.planning import planning_state
from tierwise.config import Config
from tierwise.planner.cost import PriceTable
from tierwise.planner.estimators import Ewma, LinkEstimator, ServerEstimator
from tierwise.planner.plans import Cascade, Local, Remote, Split
from tierwise.planner.policy import SLO, Candidate, Policy
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
    """µs per decision over `count` candidates, `repeats` decisions under a varying
    deadline and floor (so the feasible set changes between calls): `Policy.choose` alone,
    and what `Client.decide` runs — the estimates' snapshot (`planning_state`, over link and
    server estimators that have learned a compute ratio for every model) and the choice."""
    candidates = synthetic_candidates(count)
    policy = Policy(candidates, PriceTable.of(config))
    links = {tier: LinkEstimator(link) for tier, link in config.links.items()}
    servers = {tier: ServerEstimator() for tier in config.links}
    for candidate in candidates:
        if candidate.tier and candidate.server_model:
            servers[candidate.tier].observe(candidate.server_model, 1.1, 1.0, 0.5)
    device = {candidate.device_model: Ewma(1.0, 0.2) for candidate in candidates}
    rng = np.random.default_rng(1)
    slos = [SLO(float(rng.uniform(5, 500)), float(rng.uniform(0.8, 0.99)))
            for _ in range(64)]
    state = planning_state(links, servers, device, set())
    for slo in slos:  # warm-up
        policy.choose(slo, state)
    choose = np.empty(repeats)
    decide = np.empty(repeats)
    for index in range(repeats):
        slo = slos[index % len(slos)]
        started = time.perf_counter()
        policy.choose(slo, state)
        choose[index] = (time.perf_counter() - started) * 1e6
        started = time.perf_counter()
        policy.choose(slo, planning_state(links, servers, device, set()))
        decide[index] = (time.perf_counter() - started) * 1e6
    return {"candidates": count, "p50_us": float(np.percentile(choose, 50)),
            "p99_us": float(np.percentile(choose, 99)), "mean_us": float(choose.mean()),
            "decide_p50_us": float(np.percentile(decide, 50)),
            "decide_p99_us": float(np.percentile(decide, 99))}


def run_bench_decide(config: Config, out_dir: Path, counts: list[int], repeats: int,
                     console: Console | None = None) -> dict[str, object]:
    console = console or Console()
    rows = []
    with console.status("timing decisions"):
        for count in counts:
            rows.append(time_decisions(config, count, repeats))
    at_200 = next((row for row in rows if row["candidates"] == 200), None)
    # the target is the client's whole decision: its snapshot of the estimates and the choice
    result: dict[str, object] = {
        "rows": rows, "repeats": repeats, "target_us_at_200": TARGET_US,
        "met": None if at_200 is None else at_200["decide_p50_us"] <= TARGET_US,
        "note": "synthetic candidates (Local, Remote, Split, Cascade over edge and cloud); "
                "one process; choose: Policy.choose alone; decide: planning_state + choose, "
                "what Client.decide runs under its lock"}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps({**run_record(), **result}, indent=2) + "\n")
    table = Table("candidates", "choose p50 µs", "choose p99 µs", "decide p50 µs",
                  "decide p99 µs", title=f"tierwise bench decide ({repeats} decisions each)")
    for row in rows:
        table.add_row(str(row["candidates"]), f"{row['p50_us']:.1f}", f"{row['p99_us']:.1f}",
                      f"{row['decide_p50_us']:.1f}", f"{row['decide_p99_us']:.1f}")
    console.print(table)
    console.print(f"wrote {out_dir / 'results.json'}")
    return result
