"""Tier servers as real processes on loopback, for the demo, benchmarks and tests."""

from __future__ import annotations

import functools
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from tierwise.net.tc import NamespaceLinks


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


class ServerFailedError(RuntimeError):
    """A tier server did not come up; the message carries what it printed."""


@contextmanager
def tier_server(
    tier: str,
    models_dir: Path,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    extra_args: list[str] | None = None,
    config_path: str | None = None,
    ready_timeout_s: float = 30.0,
    popen: Callable[..., subprocess.Popen[Any]] = subprocess.Popen,
    module: str = "tierwise.cli",
    log_path: Path | None = None,
) -> Iterator[str]:
    """Run `tierwise serve --tier <tier>` as a child process; yield its base URL once ready.

    `popen` starts the process (default: here; `namespaced_tier_server` passes one that runs
    it inside a network namespace); `module`: another entry point taking the same `serve`
    arguments (a benchmark's own server); `log_path`: keep what it prints there (else in a
    temporary file, shown if it fails to start)."""
    port = port or free_port(host)
    command = [sys.executable, "-m", module]
    if config_path:
        command += ["--config", config_path]
    command += ["serve", "--tier", tier, "--host", host, "--port", str(port),
                "--models", str(models_dir), *(extra_args or [])]
    log = open(log_path, "w+b") if log_path else tempfile.TemporaryFile()
    process = popen(command, stdout=log, stderr=subprocess.STDOUT,
                    env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://{host}:{port}"
    try:
        deadline = time.monotonic() + ready_timeout_s
        while True:
            if process.poll() is not None:
                raise ServerFailedError(f"{tier} server exited with {process.returncode}:\n"
                                        f"{_read(log)}")
            try:
                # trust_env=False: a proxy from the environment must not carry the check
                ready = httpx.get(f"{url}/v2/health/ready", timeout=1.0, trust_env=False)
                if ready.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise ServerFailedError(f"{tier} server not ready after {ready_timeout_s:.0f} s:"
                                        f"\n{_read(log)}")
            time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


@contextmanager
def namespaced_tier_server(links: NamespaceLinks, tier: str, models_dir: Path, *,
                           port: int = 8000, **kwargs: Any) -> Iterator[str]:
    """`tier_server` inside the tier's network namespace (`tierwise.net.tc`): every byte
    crosses the shaped veth. The namespace has its own ports, so a fixed one cannot clash."""
    with tier_server(tier, models_dir, host=links.address(tier), port=port,
                     popen=functools.partial(links.popen, tier), **kwargs) as url:
        yield url


def _read(log: IO[bytes]) -> str:
    log.seek(0)
    return log.read().decode(errors="replace")[-4000:]
