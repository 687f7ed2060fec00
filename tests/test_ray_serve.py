"""Tier servers on Ray Serve (`tierwise serve --engine ray`), against a real Ray cluster on
loopback: a head node with no CPUs for replicas and a second worker node process with two,
so every replica runs on the second node. OIP interop is checked with Triton's client; the
autoscaler adds a replica under load and removes it after; a new registry version reaches
every replica."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton

from tierwise.bench.processes import free_port, tier_server
from tierwise.bench.rollout import rebuild
from tierwise.cli import main
from tierwise.config import Config, write_config
from tierwise.data import Splits
from tierwise.models.store import MODEL_FILE, load_info
from tierwise.protocol.oip import encode_infer_request
from tierwise.registry.signing import keygen
from tierwise.runtime.session import OnnxModel
from waiting import wait_for

if importlib.util.find_spec("ray") is None:  # not imported here: the servers import it
    pytest.skip("Ray Serve is an install extra (pip install -e '.[ray]')",
                allow_module_level=True)

EDGE = "fmnist-edge"


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[str]:
    """A Ray cluster of two node processes on loopback (`ray start`), with its own token and
    temporary directory; yields the head's GCS address. Stopped by killing exactly its
    processes (`ray stop` would stop every Ray instance on the machine)."""
    ray = shutil.which("ray", path=str(Path(sys.executable).parent))
    assert ray, "the ray CLI is installed with the ray extra"
    temp_dir = tempfile.mkdtemp(prefix="tw-ray-", dir="/tmp")  # Unix socket paths are short
    token = Path(temp_dir) / "token"
    token.write_text(secrets.token_hex(32))
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
           "RAY_USAGE_STATS_ENABLED": "0"}
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)  # the servers started below join with the same token
    port = free_port()
    address = f"127.0.0.1:{port}"
    common = ["--disable-usage-stats", f"--temp-dir={temp_dir}"]
    try:
        subprocess.run([ray, "start", "--head", f"--port={port}", "--num-cpus=0",
                        "--include-dashboard=false", "--node-ip-address=127.0.0.1", *common],
                       check=True, capture_output=True, timeout=120)
        subprocess.run([ray, "start", f"--address={address}", "--num-cpus=2",
                        "--node-ip-address=127.0.0.1", *common],
                       check=True, capture_output=True, timeout=120)
        yield address
    finally:
        _kill_processes_of(temp_dir)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        shutil.rmtree(temp_dir, ignore_errors=True)


def _kill_processes_of(temp_dir: str) -> None:
    def ours() -> list[int]:
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if temp_dir.encode() in (entry / "cmdline").read_bytes():
                        pids.append(int(entry.name))
                except OSError:
                    pass
        return pids

    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in ours():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 10
        while ours() and time.monotonic() < deadline:
            time.sleep(0.2)


def _ray_config(config: Config, path: Path, **ray: object) -> str:
    config = config.model_copy(deep=True)
    config.tiers["edge"] = config.tiers["edge"].model_copy(update={"engine": "ray"})
    config.tiers["edge"].ray = config.tiers["edge"].ray.model_copy(
        update={"num_cpus": 0.5, **ray})
    return str(write_config(config, path))


def _replicas(log: Path) -> list[int]:
    """The running-replica counts the server printed, in order."""
    return [int(n) for n in re.findall(r"^replicas: (\d+) running", log.read_text(), re.M)]


def test_oip_on_ray_serve_interoperates_with_triton_and_autoscales(
        ray_cluster: str, small_config: Config, models_dir: Path, splits: Splits,
        tmp_path: Path) -> None:
    # requests slowed 100x and served one at a time, so a few clients keep a replica busy
    config_path = _ray_config(small_config, tmp_path / "tierwise.toml", min_replicas=1,
                              max_replicas=2, target_ongoing_requests=1, upscale_delay_s=0.5,
                              downscale_delay_s=1.0, metrics_interval_s=0.25,
                              look_back_period_s=1.0)
    log = tmp_path / "serve.log"
    flags = ["--ray-address", ray_cluster, "--compute-scale", "100", "--max-batch-size", "1"]
    with tier_server("edge", models_dir, extra_args=flags, config_path=config_path,
                     log_path=log, ready_timeout_s=180) as url:
        wait_for(lambda: "on Ray Serve (the Ray cluster at" in log.read_text(), timeout_s=30,
                 what="the server's line")
        # Triton's client: health, metadata, and a binary inference equal to ONNX Runtime's
        client = triton.InferenceServerClient(url=url.removeprefix("http://"))
        assert client.is_server_live() and client.is_server_ready()
        metadata = client.get_model_metadata(EDGE)
        assert metadata["inputs"][0]["shape"] == [-1, 1, 28, 28]
        images = splits.test_x[:4]
        tensor = triton.InferInput("image", list(images.shape), "UINT8")
        tensor.set_data_from_numpy(images, binary_data=True)
        answer = client.infer(EDGE, [tensor], outputs=[
            triton.InferRequestedOutput("logits", binary_data=True)])
        model = OnnxModel(models_dir / EDGE / MODEL_FILE, load_info(models_dir / EDGE))
        np.testing.assert_allclose(answer.as_numpy("logits"),
                                   model.run(images), rtol=1e-5, atol=1e-5)
        # tierwise's headers and metrics come through Ray Serve's proxy
        body, headers = encode_infer_request({"image": images[:1]}, binary=True)
        response = httpx.post(f"{url}/v2/models/{EDGE}/infer", content=body, headers=headers,
                              trust_env=False, timeout=30)
        assert response.status_code == 200 and "tierwise-queue-ms" in response.headers
        assert response.headers["tierwise-tier"] == "edge"
        assert "tierwise_requests_total" in httpx.get(f"{url}/metrics", trust_env=False).text
        # bad input is still the server's clear 4xx, not the proxy's
        wrong = httpx.post(f"{url}/v2/models/no-such-model/infer", content=body,
                           headers=headers, trust_env=False, timeout=30)
        assert wrong.status_code == 404 and "no-such-model" in wrong.json()["error"]

        # load: six clients back to back, until the autoscaler adds the second replica
        wait_for(lambda: _replicas(log)[-1:] == [1], timeout_s=30, what="one replica")
        stop = threading.Event()
        statuses: Counter[int] = Counter()
        lock = threading.Lock()

        def load() -> None:
            with httpx.Client(trust_env=False, timeout=60) as http:
                while not stop.is_set():
                    status = http.post(f"{url}/v2/models/{EDGE}/infer", content=body,
                                       headers=headers).status_code
                    with lock:
                        statuses[status] += 1

        threads = [threading.Thread(target=load, daemon=True) for _ in range(6)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        try:
            wait_for(lambda: 2 in _replicas(log), timeout_s=120,
                     what="a second replica under load")
            scaled_up_s = time.monotonic() - started
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=60)
        # and back down once the load is gone
        wait_for(lambda: _replicas(log)[-1:] == [1], timeout_s=120,
                 what="back to one replica without load")
        print(f"scaled up after {scaled_up_s:.1f} s of load; answers {dict(statuses)}; "
              f"replica counts {_replicas(log)}")
        assert set(statuses) == {200}


def test_a_new_registry_version_reaches_every_replica(
        ray_cluster: str, small_config: Config, models_dir: Path, tmp_path: Path) -> None:
    config = small_config.model_copy(deep=True)
    config.data_dir = str(tmp_path / "data")
    config.registry.root = str(tmp_path / "registry")
    config.registry.poll_s = 0.3
    keygen(config.registry_dir / "keys")
    config_path = _ray_config(config, tmp_path / "tierwise.toml", min_replicas=2,
                              max_replicas=2, metrics_interval_s=0.25, look_back_period_s=1.0)
    assert main(["--config", config_path, "registry", "push", EDGE, "--models",
                 str(models_dir)]) == 0
    cloud_port = free_port()
    cloud_url = f"http://127.0.0.1:{cloud_port}"
    log = tmp_path / "serve.log"
    with tier_server("cloud", models_dir, port=cloud_port, config_path=config_path), \
            tier_server("edge", models_dir, config_path=config_path, log_path=log,
                        extra_args=["--registry-url", cloud_url, "--ray-address", ray_cluster],
                        ready_timeout_s=180) as url:
        wait_for(lambda: _replicas(log)[-1:] == [2], timeout_s=120, what="two replicas")

        def versions_seen(answers: int = 30) -> set[tuple[str, ...]]:
            # Ray Serve's proxy spreads requests over the replicas: 30 answers miss one of
            # two idle replicas with probability about 2**-29
            return {tuple(httpx.get(f"{url}/v2/models/{EDGE}", trust_env=False,
                                    timeout=30).json()["versions"]) for _ in range(answers)}

        wait_for(lambda: versions_seen() == {("1",)}, timeout_s=60,
                 what="both replicas serving v1 from the registry")
        v2_dir = rebuild(models_dir, tmp_path / "v2", [EDGE])
        assert main(["--config", config_path, "registry", "push", EDGE, "--models",
                     str(v2_dir)]) == 0
        pushed = time.monotonic()
        # v2 stable: each replica's subscriber installs it; v1 stays a retire grace longer
        wait_for(lambda: all("2" in versions for versions in versions_seen()),
                 timeout_s=60, what="every replica serving v2")
        print(f"v2 on every replica {time.monotonic() - pushed:.1f} s after the push")


@pytest.mark.parametrize(("address", "expected"), [
    ("127.0.0.1:1", r"tiers\.edge\.ray\.address: nothing answers at 127\.0\.0\.1:1"),
    ("http://127.0.0.1:6379", r"tiers\.edge\.ray\.address: 'http://127\.0\.0\.1:6379' is not "
                              r"a Ray address"),
    ("127.0.0.1:notaport", r"tiers\.edge\.ray\.address: '127\.0\.0\.1:notaport' has no valid"),
])
def test_an_unreachable_or_malformed_ray_address_is_named(
        small_config: Config, models_dir: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str], address: str, expected: str) -> None:
    config_path = str(write_config(small_config, tmp_path / "tierwise.toml"))
    started = time.monotonic()
    code = main(["--config", config_path, "serve", "--tier", "edge", "--engine", "ray",
                 "--ray-address", address, "--port", str(free_port()),
                 "--models", str(models_dir)])
    assert code == 2
    assert re.search(expected, capsys.readouterr().err)
    assert time.monotonic() - started < 30  # refused up front, not after Ray's long retries


def test_ray_serve_needs_a_fixed_port(small_config: Config, models_dir: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    config_path = str(write_config(small_config, tmp_path / "tierwise.toml"))
    assert main(["--config", config_path, "serve", "--tier", "edge", "--engine", "ray",
                 "--port", "0", "--models", str(models_dir)]) == 2
    assert "tiers.edge.port: Ray Serve's proxy needs a fixed port" in capsys.readouterr().err


def test_replica_bounds_are_checked_with_the_config(tmp_path: Path) -> None:
    from tierwise.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError, match=r"tiers\.edge\.ray.*max_replicas \(1\) is below "
                                          r"min_replicas \(3\)"):
        config_from_dict({"tiers": {"edge": {"ray": {"min_replicas": 3}}}}, "test")
    with pytest.raises(ConfigError, match=r"tiers\.edge\.engine"):
        config_from_dict({"tiers": {"edge": {"engine": "kubernetes"}}}, "test")


def test_bench_serve_engine_ray_reports_both_engines_side_by_side(
        small_config: Config, models_dir: Path, tmp_path: Path) -> None:
    import argparse
    import json

    from tierwise.bench.engines import run_bench_engines

    # slow compute, one request at a time: a replica, not the CPU, limits throughput
    args = argparse.Namespace(concurrency="1,8", duration_s=0.5, out=str(tmp_path),
                              models=str(models_dir), threads=1, compute_scale=100.0,
                              max_batch_size="1")
    run_bench_engines(small_config, args)
    results = json.loads((tmp_path / "results.json").read_text())
    rows = {(row["phase"], row["engine"], row["concurrency"]): row for row in results["rows"]}
    assert set(rows) == {(phase, engine, level) for level in (1, 8) for phase, engine in
                         (("1 replica", "process"), ("1 replica", "ray ×1"),
                          ("2 replicas", "process"), ("2 replicas", "ray ×2"))}
    for row in rows.values():
        assert row["errors"] == 0 and row["requests"] > 0, row
    engines = {engine["engine"]: engine for engine in results["engines"]}
    assert engines["process"]["start_s"] > 0 and engines["process"]["server_mib"] > 0
    assert len(engines["ray ×1"]["replica_mib"]) == 1
    assert len(engines["ray ×2"]["replica_mib"]) == 2  # scaled up before it was measured
    assert all(mib > 0 for mib in engines["ray ×2"]["replica_mib"])
    assert results["scale_up"]["seconds"] is not None
    print(results["notes"])
    assert "edge compute: emulated at 100x" in (tmp_path / "table.md").read_text()
    assert (tmp_path / "bench-engines.png").stat().st_size > 0
