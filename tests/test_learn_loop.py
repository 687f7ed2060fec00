"""`tierwise learn loop`: the drift alert, the samples selected, the retrained canary and the
promotion rule's verdict in one command, over a real cloud server process."""

from __future__ import annotations

import json
from pathlib import Path

from tierwise.active.loop import run_loop
from tierwise.config import Config


def test_the_loop_runs_from_drift_to_a_decided_canary_and_loses_no_sample(
        small_config: Config, models_dir: Path, tmp_path: Path) -> None:
    config = small_config.model_copy(deep=True)
    config.active.retrain.min_feedback = 10
    results = run_loop(config, tmp_path / "out", devices=2, clean=150, labels=60,
                       candidates=80, watch_s=120)
    print(json.dumps(results["events"], indent=1))
    names = [event["event"] for event in results["events"]]
    steps = ["drift alert", "samples selected", "labelled", "canary pushed",
             "canary installed"]
    assert [name for name in names if name in steps] == steps
    decision = results["decision"]["action"]
    assert decision in ("promote", "rollback")
    assert names.index(decision) > names.index("canary installed") and \
        names[-1] == "fleet on stable"
    assert results["lost_samples"] == 0  # selected = at the cloud + still queued
    assert sum(u["samples"] for u in results["samples"]["uploads"].values()) >= 80
    history = [(e["action"], e["version"]) for e in results["registry_history"]]
    assert history[:3] == [("push", 1), ("stable", 1), ("push", 2)]
    assert history[3] == ("canary", 2)
    last = results["registry_history"][-1]
    assert last["action"] == ("stable" if decision == "promote" else "rollback")
    assert "held-out field labels" in last["detail"]  # the rule's numbers, in the history
    if decision == "promote":
        assert "canary answers wrong" in last["detail"]  # the cohort spoke
        assert results["accuracy_after"] > results["accuracy_before"]
    assert (tmp_path / "out" / "results.json").is_file()
    assert (tmp_path / "out" / "loop.png").stat().st_size > 10_000
    assert not list((tmp_path / "out").glob("loop-*"))  # the work directory is gone
