"""Shared fixtures: real Fashion-MNIST, and a real zoo trained on a small subset (seconds)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tierwise.config import Config, TrainConfig, config_from_dict
from tierwise.data import Splits, load_splits


@pytest.fixture(scope="session")
def splits() -> Splits:
    return load_splits(validation_size=2000, seed=0)


@pytest.fixture(scope="session")
def small_config(tmp_path_factory: pytest.TempPathFactory) -> Config:
    """Defaults, with a fresh data directory and a zoo trained on 4,000 images for one epoch."""
    data_dir = tmp_path_factory.mktemp("tierwise-data")
    quick = TrainConfig(epochs=1, learning_rate=0.005, train_subset=4000).model_dump()
    return config_from_dict({
        "data_dir": str(data_dir),
        "data": {"validation_size": 2000},
        "zoo": {"device": quick, "edge": quick, "cloud": quick},
    })


@pytest.fixture(scope="session")
def models_dir(small_config: Config) -> Path:
    """A directory with fmnist-device, fmnist-edge and fmnist-cloud: real ONNX models, with
    their split heads/tails and profiles (`tierwise profile`)."""
    from tierwise.profile.profiler import ensure_profiles
    from tierwise.zoo.build import ensure_zoo

    ensure_zoo(small_config)
    ensure_profiles(small_config)
    return small_config.models_dir


class _Echo(BaseHTTPRequestHandler):
    """A real HTTP server: reads the body, answers with as many bytes as asked for."""

    def do_POST(self) -> None:
        try:
            self.rfile.read(int(self.headers["Content-Length"]))
            size = int(self.headers.get("X-Reply-Bytes", "2"))
            self.send_response(200)
            self.send_header("Content-Length", str(size))
            self.end_headers()
            self.wfile.write(b"x" * size)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client abandoned the request on the link, as the tests make it

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def cloud_config(small_config: Config, tmp_path: Path) -> Config:
    """The session's config with its own data directory and registry, keys made: what a
    cloud server (registry, collector, dashboard) needs, with `registry_token("",
    config.registry_dir)` as the operator's token."""
    from tierwise.registry.signing import keygen

    config = small_config.model_copy(deep=True)
    config.data_dir = str(tmp_path / "data")
    config.registry.root = str(tmp_path / "registry")
    keygen(config.registry_dir / "keys")
    return config


@pytest.fixture(scope="module")
def echo_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="session")
def postgres_server_url() -> Iterator[str]:
    """A PostgreSQL server on loopback for the whole session (skipped, with the reason,
    where one cannot be started)."""
    from postgres import postgres_server

    try:
        server = postgres_server()
        url = server.__enter__()
    except RuntimeError as error:
        pytest.skip(str(error))
    try:
        yield url
    finally:
        server.__exit__(None, None, None)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_location(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where a store lives, on each backend: an SQLite file, and a new PostgreSQL
    database."""
    if request.param == "sqlite":
        return str(tmp_path / "store.db")
    from postgres import new_database

    return new_database(request.getfixturevalue("postgres_server_url"))
