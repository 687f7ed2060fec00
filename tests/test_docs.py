"""The documentation stays true: the site builds strictly, the generated reference matches the
code, and every tutorial's code runs as written.

A tutorial (docs/tutorials/*.md) runs top to bottom in a fresh directory, as a reader would
run it, with `.venv/bin` first on PATH and no $TIERWISE_CONFIG:
- a `sh` block runs in bash (`set -euo pipefail`);
- a `python` block runs with the venv's Python; one whose first line is `# file: NAME` is
  saved as NAME instead (a later block runs it);
- a block right after `<!-- background: URL -->` is a server the reader starts in a second
  terminal: it runs in the background until the page ends, and the next block waits until
  URL answers 200;
- other blocks (`text`, `toml`, output) are not run.
The directory starts with `data/models` holding the small zoo the other tests train
(`models_dir`), so the tutorials skip the zoo's first-run training, which takes minutes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
RESULTS = DOCS / "benchmarks" / "results"
VENV_BIN = Path(sys.executable).parent
TUTORIALS = sorted(path.name for path in (DOCS / "tutorials").glob("*.md")
                   if path.name != "index.md")
BLOCK_TIMEOUT_S = 900

sys.path.insert(0, str(ROOT / "scripts"))
import docs_reference  # noqa: E402


def test_the_site_builds_strictly(tmp_path: Path) -> None:
    """Broken links, missing anchors, pages outside the nav and results no benchmark wrote
    all fail `mkdocs build --strict`."""
    done = subprocess.run([str(VENV_BIN / "mkdocs"), "build", "--strict", "--site-dir",
                           str(tmp_path / "site")], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
                          check=False)
    print(done.stderr[-4000:])
    assert done.returncode == 0, done.stderr[-4000:]
    cli = (tmp_path / "site" / "reference" / "cli" / "index.html").read_text()
    assert 'id="tierwise-serve"' in cli  # a command's anchor, as the README links to it
    api = (tmp_path / "site" / "reference" / "api" / "index.html").read_text()
    assert "tierwise.client.Client" in api and "deadline_ms" in api  # mkdocstrings ran


def test_the_generated_reference_matches_the_code() -> None:
    assert docs_reference.main(["--check"]) == 0, "run `make docs` and commit docs/reference"


def test_every_config_field_cli_argument_and_route_is_described() -> None:
    assert docs_reference.undescribed_fields() == []
    cli = docs_reference.cli_page()
    undescribed = [line for line in cli.splitlines()
                   if line.startswith("| `") and line.rstrip().endswith("|  |")]
    assert undescribed == []
    routes = docs_reference.routes_page()
    assert [line for line in routes.splitlines() if line.endswith("|  |")] == []


def test_the_readme_is_short_and_links_into_the_docs() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    links = re.findall(r"\]\((docs/[^)#\s]+)(?:#[^)]*)?\)", readme)
    assert len(links) >= 10
    missing = [link for link in links if not (ROOT / link).exists()]
    assert missing == []
    for command in ("make demo", "make test", "tierwise models add"):
        assert command in readme


def _load(run: str) -> dict:
    return json.loads((RESULTS / run / "results.json").read_text())


def _by(rows: list[dict], key: str) -> dict[str, dict]:
    return {row[key]: row for row in rows}


def _readme_numbers() -> list[str]:
    """Each number the README's results table quotes, printed as the README prints it from
    the results file the benchmark wrote."""
    camera = _by(_load("demo-camera")["rows"], "strategy")
    fleet = _by(_load("bench-fleet")["summaries"], "strategy")
    levels = _load("bench-bandwidth-camera")["targets"]["per_level"]
    batching = {row["concurrency"]: row for row in _load("bench-serve-camera")["factors"]}
    active = _load("bench-active")["best"]
    demo = _by(_load("demo")["rows"], "strategy")
    fl = _by(_load("fl-bench")["comparison"], "compressor")
    adaptive = camera["adaptive"]
    return [
        f"fidelity {adaptive['quality']:.0%}), p95 {adaptive['latency_p95_ms']:.0f} ms, "
        f"{adaptive['bytes_up_per_inference']:,.0f} bytes per frame; cloud-only: p95 "
        f"{camera['cloud-only']['latency_p95_ms']:,.0f} ms, "
        f"{camera['cloud-only']['bytes_up_per_inference']:,.0f} bytes",
        f"tierwise {fleet['tierwise']['miss_rate']:.1%}, least-RTT routing "
        f"{fleet['least-RTT']['miss_rate']:.1%}; "
        + ("no answer lost" if fleet["tierwise"]["lost"] == 0 else "answers lost"),
        f"adaptive: {max(level['adaptive_miss_rate'] for level in levels):.1%} missed "
        f"deadlines and {min(level['adaptive_accuracy'] for level in levels):.0%} fidelity at "
        f"all {len(levels)} levels",
        f"{batching[32]['factor']:.2f}× the requests/s of batch-1 serving at 32 clients",
        f"{active['ratio']:.2f}× fewer labels than random to reach its accuracy; the "
        f"{active['target_ratio']:g}× target is " + ("met" if active["met"] else "**not met**"),
        f"adaptive {demo['adaptive']['quality']:.2%} accurate at "
        f"${demo['adaptive']['cost_usd_per_1m']:.2g} per million inferences, p95 "
        f"{demo['adaptive']['latency_p95_ms']:.1f} ms; cloud-only "
        f"{demo['cloud-only']['quality']:.2%} at ${demo['cloud-only']['cost_usd_per_1m']:.2g}, "
        f"p95 {demo['cloud-only']['latency_p95_ms']:.1f} ms",
        f"{fl['topk:0.05+q8']['bytes_up_ratio']:.0f}× fewer bytes up than FedAvg, "
        f"{100 * fl['topk:0.05+q8']['accuracy_delta']:+.2f} points of accuracy",
    ]


def test_the_readmes_results_are_the_results_files() -> None:
    readme = " ".join((ROOT / "README.md").read_text().split())
    missing = [number for number in _readme_numbers() if number not in readme]
    assert missing == [], "README results differ from docs/benchmarks/results: " + \
        "; ".join(missing)


def blocks(page: Path) -> list[tuple[str, str, str | None]]:
    """(language, code, background-readiness URL or None) of each fenced block, in order."""
    found = []
    pending_url: str | None = None
    lines = page.read_text().splitlines()
    index = 0
    while index < len(lines):
        line = lines[index]
        marker = re.match(r"<!-- background: (\S+) -->", line.strip())
        if marker:
            pending_url = marker.group(1)
        fence = re.match(r"^(\s*)(```+)\s*([\w+-]*)", line)
        if fence:
            indent, ticks, language = fence.group(1), fence.group(2), fence.group(3)
            body = []
            index += 1
            while not lines[index].strip().startswith(ticks):
                body.append(lines[index][len(indent):])
                index += 1
            found.append((language, "\n".join(body) + "\n", pending_url))
            pending_url = None
        index += 1
    return found


def _wait_ready(url: str, server: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"the background server exited ({server.returncode}):\n"
                        + log.read_text()[-3000:])
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    pytest.fail(f"{url} did not answer 200 within 240 s:\n" + log.read_text()[-3000:])


@pytest.mark.parametrize("tutorial", TUTORIALS)
def test_the_tutorial_runs_as_written(tutorial: str, models_dir: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    shutil.copytree(models_dir, work / "data" / "models")
    env = {key: value for key, value in os.environ.items() if key != "TIERWISE_CONFIG"}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["NO_COLOR"] = "1"
    servers: list[subprocess.Popen[bytes]] = []
    ready: list[tuple[str, subprocess.Popen[bytes], Path]] = []
    runnable = [block for block in blocks(DOCS / "tutorials" / tutorial)
                if block[0] in ("sh", "bash", "python")]
    assert runnable, f"{tutorial} has no code to run"
    try:
        for number, (language, code, url) in enumerate(runnable):
            for pending in ready:
                _wait_ready(*pending)
            ready.clear()
            if language == "python":
                named = re.match(r"# file: (\S+)\n", code)
                script = work / (named.group(1) if named else f"block-{number}.py")
                script.write_text(code)
                if named:
                    continue
                command = [str(VENV_BIN / "python"), str(script)]
            else:
                command = ["bash", "-euo", "pipefail", "-c", code]
            print(f"--- {tutorial} block {number} ({language}):\n{code}")
            if url:
                log = work / f"server-{number}.log"
                with log.open("wb") as sink:
                    servers.append(subprocess.Popen(command, cwd=work, env=env, stdout=sink,
                                                    stderr=subprocess.STDOUT,
                                                    start_new_session=True))
                ready.append((url, servers[-1], log))
                continue
            done = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True,
                                  timeout=BLOCK_TIMEOUT_S, check=False)
            print(done.stdout[-3000:], done.stderr[-3000:])
            assert done.returncode == 0, (f"{tutorial} block {number} failed:\n{code}\n"
                                          f"{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    finally:
        for server in servers:
            if server.poll() is None:
                os.killpg(server.pid, signal.SIGTERM)
        for server in servers:
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
