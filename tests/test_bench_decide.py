"""`tierwise bench decide`: the planner's decision time over synthetic candidate sets."""

from __future__ import annotations

import json
from pathlib import Path

from tierwise.bench.decide import synthetic_candidates
from tierwise.cli import main
from tierwise.planner.plans import Cascade, Local, Remote, Split


def test_the_synthetic_candidates_mix_every_plan_kind() -> None:
    candidates = synthetic_candidates(200)
    assert len(candidates) == 200
    kinds = {type(candidate.plan) for candidate in candidates}
    assert kinds == {Local, Remote, Split, Cascade}
    assert {candidate.tier for candidate in candidates} == {None, "edge", "cloud"}


def test_the_bench_writes_its_results(tmp_path: Path) -> None:
    out = tmp_path / "decide"
    assert main(["bench", "decide", "--candidates", "20,200", "--repeats", "200",
                 "--out", str(out)]) == 0
    result = json.loads((out / "results.json").read_text())
    assert [row["candidates"] for row in result["rows"]] == [20, 200]
    for row in result["rows"]:
        assert 0 < row["p50_us"] <= row["p99_us"]
        assert 0 < row["decide_p50_us"] <= row["decide_p99_us"]
    print(result["rows"])  # the numbers belong to the benchmark, not to this test
    assert main(["bench", "decide", "--candidates", "0", "--out", str(out)]) == 2
