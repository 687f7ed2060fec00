"""`tierwise bench serve`, briefly, against real servers: a running one, and the comparison
of dynamic batching with batch-1 serving of the same model (servers started by the command)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tierwise.bench.serve import (
    InProcessResult,
    best_batch_size,
    mean_batch_formed,
    run_bench_serve,
)
from tierwise.config import Config, TierConfig
from tierwise.runtime.session import load_models
from tierwise.server.app import create_app, serve_in_thread


@pytest.fixture(scope="module")
def server_url(models_dir: Path) -> Iterator[str]:
    app = create_app("edge", TierConfig(), load_models(models_dir))
    with serve_in_thread(app) as url:
        yield url


def test_bench_serve_against_a_running_server(server_url: str, models_dir: Path,
                                              small_config: Config, tmp_path: Path) -> None:
    args = argparse.Namespace(url=server_url, model="fmnist-edge", concurrency="1,4",
                              duration_s=0.5, out=str(tmp_path), models=str(models_dir),
                              payloads="json,binary")
    run_bench_serve(small_config, args)
    results = json.loads((tmp_path / "results.json").read_text())
    rows = results["rows"]
    assert [(row["mode"], row["payload"], row["concurrency"]) for row in rows] == [
        ("server", "json", 1), ("server", "json", 4), ("server", "binary", 1),
        ("server", "binary", 4)]
    for row in rows:
        assert row["errors"] == 0
        assert row["requests"] > 10 and row["requests_per_s"] > 0
        assert 0 < row["latency_p50_ms"] <= row["latency_p95_ms"] <= row["latency_p99_ms"]
    assert results["in_process"][0]["batch_size"] == 1
    assert results["in_process"][0]["images_per_s"] > 0
    assert results["factors"] == []  # one server given: nothing to compare it with
    assert (tmp_path / "bench-serve.png").stat().st_size > 0
    assert "nothing emulated" in (tmp_path / "table.md").read_text()


def test_bench_serve_compares_dynamic_batching_with_batch_1(models_dir: Path,
                                                            tmp_path: Path) -> None:
    out = tmp_path / "out"
    finished = subprocess.run(
        [sys.executable, "-m", "tierwise.cli", "bench", "serve", "--workload", "fashion-mnist",
         "--models", str(models_dir), "--concurrency", "1,8", "--duration-s", "0.5",
         "--payloads", "binary", "--max-batch-size", "16", "--out", str(out)],
        check=False, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert finished.returncode == 0, finished.stderr
    results = json.loads((out / "results.json").read_text())
    assert [(mode["name"], mode["max_batch_size"]) for mode in results["modes"]] == [
        ("batch-1", 1), ("dynamic", 16)]
    rows = {(row["mode"], row["concurrency"]): row for row in results["rows"]}
    assert set(rows) == {("batch-1", 1), ("dynamic", 1), ("batch-1", 8), ("dynamic", 8)}
    for row in rows.values():  # both modes answered every request
        assert row["errors"] == 0 and row["requests"] > 10
    assert all(row["mean_batch_size"] == 1 for (mode, _), row in rows.items()
               if mode == "batch-1")
    assert rows["dynamic", 8]["mean_batch_size"] > 1
    # in-process ONNX Runtime at batch 1, at the batching server's max and at its batches
    sizes = {result["batch_size"] for result in results["in_process"]}
    assert {1, 16, round(rows["dynamic", 8]["mean_batch_size"])} <= sizes
    assert all(result["images_per_s"] > 0 for result in results["in_process"])
    (factor,) = [f for f in results["factors"] if f["concurrency"] == 8]
    # generous: batching a small model must neither collapse nor work miracles
    assert 0.2 < factor["factor"] < 20 and factor["in_process_factor"] > 0
    table = (out / "table.md").read_text()
    assert "server, batch 1" in table and "dynamic ≤16" in table
    assert "Throughput factor at concurrency 8" in table and "intra-op" in table
    assert (out / "bench-serve.png").stat().st_size > 0


def test_mean_batch_formed_counts_batches_not_answers() -> None:
    # one lone request and one batch of four: five answers, two batches
    assert mean_batch_formed([1, 4, 4, 4, 4]) == pytest.approx(2.5)
    assert mean_batch_formed([]) is None


def test_auto_max_batch_takes_the_batch_of_the_most_in_process_throughput(
        models_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    finished = subprocess.run(
        [sys.executable, "-m", "tierwise.cli", "bench", "serve", "--workload", "fashion-mnist",
         "--models", str(models_dir), "--concurrency", "8", "--duration-s", "0.5",
         "--payloads", "binary", "--out", str(out)],  # --max-batch-size auto: the default
        check=False, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert finished.returncode == 0, finished.stderr
    results = json.loads((out / "results.json").read_text())
    measured = {r["batch_size"]: r["images_per_s"] for r in results["in_process"]}
    print("in-process images/s by batch:", measured)
    assert {1, 2, 4, 8, 16} <= set(measured)  # up to the configured max (16)
    best = max(measured, key=measured.__getitem__)
    chosen = [mode["max_batch_size"] for mode in results["modes"] if mode["name"] == "dynamic"]
    if best == 1:  # batching cannot pay: no dynamic server, and the table says why
        assert chosen == [] and "batch 1 fastest" in (out / "table.md").read_text()
    else:
        assert chosen == [best]
        assert "--max-batch-size auto" in (out / "table.md").read_text()


def test_best_batch_size_is_the_most_images_per_second() -> None:
    def result(size: int, images_per_s: float) -> InProcessResult:
        return InProcessResult(size, 10, images_per_s, 1.0, 1.0, 1.0, None)
    curve = {1: result(1, 100.0), 4: result(4, 108.0), 8: result(8, 110.0),
             16: result(16, 73.0)}
    assert best_batch_size(curve) == 8
    assert best_batch_size({1: result(1, 100.0), 16: result(16, 73.0)}) == 1


def test_bench_serve_refuses_a_bad_max_batch_size(models_dir: Path, tmp_path: Path) -> None:
    finished = subprocess.run(
        [sys.executable, "-m", "tierwise.cli", "bench", "serve", "--models", str(models_dir),
         "--max-batch-size", "many", "--out", str(tmp_path / "out")],
        check=False, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert finished.returncode != 0
    assert "--max-batch-size" in finished.stderr and "'many'" in finished.stderr


def test_bench_routing_measures_oip_hand_written_and_through_starlette(
        models_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    finished = subprocess.run(
        [sys.executable, "-m", "tierwise.cli", "bench", "routing", "--models", str(models_dir),
         "--concurrency", "1,4", "--rounds", "2", "--duration-s", "0.5", "--warmup-s", "0.2",
         "--out", str(out)],
        check=False, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert finished.returncode == 0, finished.stderr
    results = json.loads((out / "results.json").read_text())
    rows = {(row["mode"], row["concurrency"]): row for row in results["rows"]}
    assert set(rows) == {(mode, level) for mode in ("hand-written", "starlette")
                         for level in (1, 4)}
    for row in rows.values():  # both routings answered every request with 200
        assert row["errors"] == 0 and row["requests"] > 10, row
    for ratio in results["ratios"]:
        print(ratio)
        assert 0.1 < ratio["throughput_ratio"] < 10  # generous: a loaded host stays in it
    assert (out / "routing.png").stat().st_size > 0
    assert "through Starlette" in (out / "table.md").read_text()
