"""The live dashboard in a real browser (Debian's headless Chromium): it loads, shows the
collector's current request count, and logs nothing to the console."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tierwise.client import Client
from tierwise.cloud import hosted
from tierwise.config import Config
from tierwise.data import Splits
from tierwise.monitor.collector import Collector
from tierwise.planner.plans import Local
from tierwise.registry.signing import keygen
from tierwise.registry.subscriber import registry_token
from tierwise.server.app import TierServer, serve_in_thread

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium: apt-get install chromium (`make test` does, as root)")


def _browse(url: str) -> tuple[str, list[str]]:
    """(the DOM after the page's scripts ran, the console messages)."""
    assert CHROMIUM is not None
    run = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
         "--v=0", "--virtual-time-budget=8000", "--dump-dom", url],
        check=False, capture_output=True, text=True, timeout=120)
    return run.stdout, [line for line in run.stderr.splitlines() if ":CONSOLE" in line]


def test_the_console_check_catches_a_page_error() -> None:
    _, console = _browse("data:text/html,<script>console.error('marker'); missing();</script>")
    assert any("marker" in line for line in console)
    assert any("ReferenceError" in line for line in console)


def test_dashboard_shows_the_current_request_count_without_console_errors(
        small_config: Config, models_dir: Path, splits: Splits, tmp_path: Path) -> None:
    config = small_config.model_copy(deep=True)
    config.data_dir = str(tmp_path / "data")
    config.registry.root = str(tmp_path / "registry")
    keygen(config.registry_dir / "keys")
    collector = Collector(config.telemetry.collector_path(config.data_dir))
    with Client(config, models_dir=models_dir, plan=Local("fmnist-device"), probe=False,
                collector_url="") as client:
        traces = [client.infer(image).trace.to_dict() for image in splits.test_x[:350]]
    collector.ingest("browser-test", traces[:300])
    app = hosted(TierServer("cloud", config.tier("cloud"), {}), config)
    token = registry_token("", config.registry_dir)
    with serve_in_thread(app) as url:
        # signs in with the token in the fragment (never sent to the server), then holds
        # a session cookie: the page and its image links carry no credential
        page = f"{url}/dashboard/login#token={token}"
        dom, console = _browse(page)
        assert str(token) not in dom
        assert re.search(r'<span id="updated">Updated [^<]*: 300 requests\.</span>', dom), dom
        assert '<td id="requests">300</td>' in dom
        assert dom.count("<img") == 4
        assert console == []

        collector.ingest("browser-test", traces[300:])  # more traffic: the page follows
        # Views are shared for `refresh_s` (the page's own requests fire together): a load
        # that comes sooner than that after the first page's last request may be served the
        # views computed before this ingest. Every view computed before the ingest is stale
        # `refresh_s` after it, so from then on the page must show all 350.
        ingested = time.monotonic()
        refresh_s = app.control.state.dashboard.refresh_s
        time.sleep(max(0.0, ingested + refresh_s + 0.05 - time.monotonic()))
        dom, console = _browse(page)
        assert '<td id="requests">350</td>' in dom and console == []

        refused, _ = _browse(f"{url}/dashboard/login#token=wrong")
        assert "not an operator's token" in refused
        unsigned, _ = _browse(f"{url}/dashboard?token={token}")  # a URL token is not taken
        assert "Sign in" in unsigned and '<td id="requests">' not in unsigned

