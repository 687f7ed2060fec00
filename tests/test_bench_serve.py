"""`tierwise bench serve`, briefly, against a real server."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tierwise.bench.serve import run_bench_serve
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
    assert [(row["payload"], row["concurrency"]) for row in rows] == [
        ("json", 1), ("json", 4), ("binary", 1), ("binary", 4)]
    for row in rows:
        assert row["errors"] == 0
        assert row["requests"] > 10 and row["requests_per_s"] > 0
        assert 0 < row["latency_p50_ms"] <= row["latency_p95_ms"] <= row["latency_p99_ms"]
    assert results["in_process_floor"]["requests_per_s"] > 0
    assert (tmp_path / "bench-serve.png").stat().st_size > 0


def test_bench_serve_starts_its_own_server(models_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    finished = subprocess.run(
        [sys.executable, "-m", "tierwise.cli", "bench", "serve", "--models", str(models_dir),
         "--concurrency", "2", "--duration-s", "0.3", "--payloads", "binary",
         "--out", str(out)],
        check=False, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert len(rows) == 1 and rows[0]["errors"] == 0 and rows[0]["requests"] > 0
    assert "binary" in finished.stdout
