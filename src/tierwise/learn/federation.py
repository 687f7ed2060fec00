"""`tierwise fl run`: a Flower federation as real processes on loopback, on shaped links.

What runs (all real processes, all on 127.0.0.1, random free ports):

    flower-superlink ──────────── flwr-serverapp (our ServerApp, started by the SuperLink)
         ▲ Fleet API (HTTP)
         │  ShapingProxy per client (tierwise.net.proxy): up / down rate, RTT, bytes counted
         │
    flower-supernode  ×N  (--isolation process; node config: partition-id, compute-scale)
         ▲ Runtime API
    tierwise.learn.executor ×N  (a warm SuperExec: each ClientApp task is a fork)

The run is submitted the way a Flower user does it, with `flwr run <app> <superlink>`; the
app is a Flower app directory (pyproject.toml) whose components are
`tierwise.learn.flower_app:server_app` / `:client_app`. The ServerApp appends each round to a
progress file; this process follows it, snapshots each proxy's byte counters at each round's
end, kills or starts clients on schedule (dropouts, late joins), and at the end exports the
global model as an ONNX device model and, where a registry exists, pushes it as a version.

Links and device speed are emulated and every result says so (`emulated`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from tierwise.bench.processes import free_port
from tierwise.config import Config, format_rate
from tierwise.net.proxy import ShapingProxy

APP_NAME = "tierwise-fl"
MODEL_NAME = "fmnist-fl"
STARTUP_TIMEOUT_S = 60.0
STATUS_CHECK_S = 20.0  # no progress for this long: ask Flower how the run is doing


class FederationError(RuntimeError):
    """The federation could not start or failed; the message says where to look."""


def _bin(name: str) -> str:
    """A Flower console script of this interpreter's environment."""
    candidate = Path(sys.executable).parent / name
    found = str(candidate) if candidate.exists() else shutil.which(name)
    if not found:
        raise FederationError(f"{name} not found: install the fl extra "
                              f"(pip install 'tierwise[fl]')")
    return found


def _wait_port(port: int, process: subprocess.Popen[Any], log: Path, what: str,
               timeout_s: float = STARTUP_TIMEOUT_S) -> None:
    import socket

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise FederationError(f"{what} exited ({process.returncode}); see {log}:\n"
                                  f"{_tail(log)}")
        with socket.socket() as probe:
            probe.settimeout(0.2)
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise FederationError(f"{what} did not listen on {port} in {timeout_s:.0f} s; see {log}")


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _libc_prctl() -> Callable[..., int] | None:
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _libc_prctl()  # looked up here: the child must not import or load anything


def _die_with_parent() -> None:
    """In the child, before exec: be killed when the orchestrator dies, however it dies, so
    no SuperLink or SuperNode outlives its run (Linux prctl PR_SET_PDEATHSIG = 1)."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGKILL)


def _start(command: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[Any]:
    handle: IO[bytes] = log.open("ab")
    try:
        # a session of its own: a client is killed as a whole (SuperNode, SuperExec, tasks)
        return subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True,
                                # only a prctl call (no locks, no imports): safe with threads
                                preexec_fn=_die_with_parent)  # noqa: PLW1509
    finally:
        handle.close()


def _killpg(process: subprocess.Popen[Any] | None, sig: int = signal.SIGKILL) -> None:
    if process is None or process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, sig)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


@dataclass
class Client:
    """One simulated device: its link (proxy), SuperNode and warm SuperExec."""

    index: int
    compute_scale: float
    proxy: ShapingProxy
    supernode: subprocess.Popen[Any] | None = None
    executor: subprocess.Popen[Any] | None = None
    killed_at_round: int | None = None
    joined_at_round: int | None = None

    def kill(self) -> None:
        """As a device that loses power: no goodbye to the SuperLink."""
        _killpg(self.executor)
        _killpg(self.supernode)


def app_directory(where: Path) -> Path:
    """A Flower app directory: what `flwr run` packages into a FAB and sends to the SuperLink."""
    app = where / "app"
    app.mkdir(parents=True, exist_ok=True)
    (app / "pyproject.toml").write_text(f'''[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "{APP_NAME}"
version = "1.0.0"
description = "tierwise federated learning: Fashion-MNIST, compressed updates, shaped links"
license = "Apache-2.0"
dependencies = ["tierwise[fl]"]

[tool.flwr.app]
publisher = "tierwise"

[tool.flwr.app.components]
serverapp = "tierwise.learn.flower_app:server_app"
clientapp = "tierwise.learn.flower_app:client_app"

[tool.flwr.app.config]
spec = ""
''')
    return app


@dataclass
class Schedule:
    """Dropouts and late joins: client index -> the round during which it is killed / before
    which it is started (1-based)."""

    kill: dict[int, int] = field(default_factory=dict)
    join: dict[int, int] = field(default_factory=dict)
    kill_delay_s: float = 1.0  # into the round: mid-transfer or mid-training


class Federation:
    """Start, follow and stop one federated run. Use as a context manager."""

    def __init__(self, config: Config, work_dir: Path, schedule: Schedule | None = None,
                 on_round: Callable[[dict[str, Any]], None] | None = None,
                 taps: dict[int, Callable[[str, bytes], None]] | None = None) -> None:
        self.config, self.fl = config, config.fl
        # TLS on every Flower link when [tls] has a server certificate (`tierwise certs init`)
        self.tls = config.tls if config.tls.cert else None
        if self.tls is not None and not (self.tls.key and self.tls.ca):
            raise FederationError("tls: Flower's links need tls.cert, tls.key and tls.ca "
                                  "together (the SuperNodes verify the SuperLink against the "
                                  "CA); `tierwise certs init` prints all three")
        self.taps = taps or {}
        self.work = work_dir
        self.schedule = schedule or Schedule()
        for what, plan in (("kill", self.schedule.kill), ("join", self.schedule.join)):
            for index, at in plan.items():
                if not 0 <= index < self.fl.clients or not 1 <= at <= self.fl.rounds:
                    raise FederationError(
                        f"{what} {index}@{at}: expected a client 0..{self.fl.clients - 1} and "
                        f"a round 1..{self.fl.rounds}")
        self.on_round = on_round
        self.superlink: subprocess.Popen[Any] | None = None
        self.clients: list[Client] = []
        self.port = 0
        self.run_id = ""
        # Flower's processes start one another by console-script name: put ours first
        path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        self.env = {**os.environ, "PATH": path, "PYTHONUNBUFFERED": "1",
                    "FLWR_TELEMETRY_ENABLED": "0",
                    "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.5"}

    # ------------------------------------------------------------------ processes
    def __enter__(self) -> Federation:
        if self.work.exists():
            shutil.rmtree(self.work)
        (self.work / "logs").mkdir(parents=True)
        try:
            self._start_superlink()
            self.clients = [self._client(index) for index in range(self.fl.clients)]
            self._start_clients([c for c in self.clients if c.index not in self.schedule.join])
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start_superlink(self) -> None:
        self.port = free_port()
        home = self.work / "superlink"
        home.mkdir()
        log = self.work / "logs" / "superlink.log"
        self.superlink = _start(
            [_bin("flower-superlink"), *self._superlink_tls(), "--host", "127.0.0.1",
             "--port", str(self.port), "--disable-runtime-dependency-installation"],
            log, {**self.env, "FLWR_HOME": str(home)})  # state in memory: no SQLite per poll
        _wait_port(self.port, self.superlink, log, "flower-superlink")

    def _superlink_tls(self) -> list[str]:
        """The SuperLink's TLS flags (Fleet, Control and ServerAppIo APIs): the [tls]
        certificate, key and CA when set, else plain gRPC on loopback."""
        if self.tls is None:
            return ["--insecure"]
        return ["--ssl-ca-certfile", self.tls.ca, "--ssl-certfile", self.tls.cert,
                "--ssl-keyfile", self.tls.key]

    def _supernode_tls(self) -> list[str]:
        """A SuperNode verifies the SuperLink against the [tls] CA (through its proxy, which
        relays TLS records untouched)."""
        return ["--root-certificates", self.tls.ca] if self.tls else ["--insecure"]

    def _client(self, index: int) -> Client:
        proxy = ShapingProxy(("127.0.0.1", self.port), self.fl.uplink, self.fl.downlink_rate,
                             rtt_ms=self.fl.rtt_ms, name=f"client-{index}",
                             tap=self.taps.get(index)).start()
        return Client(index, self.fl.compute_scale(index), proxy)

    def _start_clients(self, clients: list[Client]) -> None:
        """Start SuperNodes, then (once each listens) their SuperExecs; all in parallel."""
        ports = {}
        for client in clients:
            home = self.work / f"client-{client.index}"
            home.mkdir(exist_ok=True)
            ports[client.index] = runtime_port = free_port()
            host, port = client.proxy.address
            node_config = (f'partition-id={client.index} num-partitions={self.fl.clients} '
                           f'compute-scale={client.compute_scale} '
                           f'data-dir="{self.config.data.path or ""}"')
            client.supernode = _start(
                [_bin("flower-supernode"), *self._supernode_tls(), "--superlink",
                 f"{host}:{port}",
                 "--isolation", "process", "--host", "127.0.0.1", "--port", str(runtime_port),
                 "--node-config", node_config], self._log(client), self._client_env(client))
        data = self.config.data
        for client in clients:
            assert client.supernode is not None
            _wait_port(ports[client.index], client.supernode, self._log(client),
                       f"client {client.index}'s SuperNode")
            command = [sys.executable, "-m", "tierwise.learn.executor",
                       "--runtime-api-address", f"127.0.0.1:{ports[client.index]}",
                       "--validation-size", str(data.validation_size),
                       "--data-seed", str(data.seed)]
            if data.path:
                command += ["--data-dir", data.path]
            client.executor = _start(command, self._log(client), self._client_env(client))

    def _log(self, client: Client) -> Path:
        return self.work / "logs" / f"client-{client.index}.log"

    def _client_env(self, client: Client) -> dict[str, str]:
        return {**self.env, "FLWR_HOME": str(self.work / f"client-{client.index}")}

    def close(self) -> None:
        for client in self.clients:
            client.kill()
            client.proxy.close()
        _killpg(self.superlink, signal.SIGTERM)

    # ------------------------------------------------------------------ the run
    def submit(self, spec: dict[str, Any]) -> str:
        """`flwr run` the app with `spec` (a JSON file the ServerApp reads); the run id."""
        spec_path = self.work / "spec.json"
        spec_path.write_text(json.dumps(spec, indent=2))
        cli_home = self.work / "cli"
        cli_home.mkdir(exist_ok=True)
        (cli_home / "config.toml").write_text(
            '[superlink]\ndefault = "local"\n\n[superlink.local]\n'
            f'address = "127.0.0.1:{self.port}"\n' + (
                f'root-certificates = "{self.tls.ca}"\n' if self.tls else 'insecure = true\n'))
        done = subprocess.run(
            [_bin("flwr"), "run", str(app_directory(self.work)), "local", "--format", "json",
             "--run-config", f'spec="{spec_path}"'],
            capture_output=True, text=True, env={**self.env, "FLWR_HOME": str(cli_home)},
            timeout=120, check=False)
        try:
            answer = json.loads(done.stdout[done.stdout.index("{"):])
            self.run_id = str(answer["run-id"])
        except (ValueError, KeyError):
            raise FederationError(f"flwr run failed ({done.returncode}):\n{done.stdout}\n"
                                  f"{done.stderr}") from None
        return self.run_id

    def run_status(self) -> str:
        """The run's status as `flwr ls` reports it (e.g. 'running', 'finished:failed')."""
        done = subprocess.run(
            [_bin("flwr"), "ls", "local", "--run-id", self.run_id, "--format", "json"],
            capture_output=True, text=True, timeout=60, check=False,
            env={**self.env, "FLWR_HOME": str(self.work / "cli")})
        found = re.findall(r'"status(?:-text)?"\s*:\s*"([^"]+)"', done.stdout)
        return found[0] if found else f"unknown ({done.stdout.strip()[:200]})"

    def follow(self, progress: Path, timeout_s: float) -> list[dict[str, Any]]:
        """Follow the ServerApp's progress file until it is done; apply the schedule."""
        events: list[dict[str, Any]] = []
        seen = 0
        deadline = time.monotonic() + timeout_s
        kill_at: dict[int, float] = {}
        quiet_since = time.monotonic()
        while time.monotonic() < deadline:
            if self.superlink is not None and self.superlink.poll() is not None:
                raise FederationError(f"the SuperLink exited; see {self.work / 'logs'}")
            # complete lines only: the ServerApp may be writing the last one
            lines = progress.read_text().split("\n")[:-1] if progress.exists() else []
            if len(lines) > seen:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since > STATUS_CHECK_S:
                # a ServerApp that died before it could write (an import error, OOM) says so
                # only through Flower's run status
                status = self.run_status()
                if status.startswith("finished") and not (
                        progress.exists() and '"event": "done"' in progress.read_text()):
                    raise FederationError(f"the run ended without a result ({status}); see "
                                          f"{self.work / 'logs'}")
                quiet_since = time.monotonic()
            for line in lines[seen:]:
                event = json.loads(line)
                events.append(event)
                if event["event"] == "error":
                    raise FederationError(f"the ServerApp failed: {event['message']}")
                if event["event"] in ("start", "round"):
                    event["wire"] = {c.index: c.proxy.counters() for c in self.clients}
                    done_round = event.get("round", 0)
                    self._joins(done_round + 1)
                    for index, kill_round in self.schedule.kill.items():
                        if kill_round == done_round + 1:
                            kill_at[index] = time.monotonic() + self.schedule.kill_delay_s
                    if self.on_round and event["event"] == "round":
                        self.on_round(event)
                if event["event"] == "done":
                    return events
            seen = len(lines)
            for index, when in list(kill_at.items()):
                if time.monotonic() >= when:
                    client = self.clients[index]
                    client.kill()
                    client.killed_at_round = self.schedule.kill[index]
                    del kill_at[index]
            time.sleep(0.05)
        raise FederationError(f"no result in {timeout_s:.0f} s; see {self.work / 'logs'}")

    def _joins(self, next_round: int) -> None:
        for index, join_round in self.schedule.join.items():
            client = self.clients[index]
            if join_round == next_round and client.supernode is None:
                self._start_clients([client])
                client.joined_at_round = join_round


def run_spec(config: Config, work: Path, late: int = 0) -> dict[str, Any]:
    fl = config.fl
    return {
        "clients": fl.clients, "clients_at_start": fl.clients - late, "rounds": fl.rounds,
        "partition": fl.partition,
        "alpha": fl.alpha, "labels_per_client": fl.labels_per_client, "seed": fl.seed,
        "strategy": fl.strategy, "proximal_mu": fl.proximal_mu, "compressor": fl.compressor,
        "downlink": fl.downlink, "local_steps": fl.local_steps, "batch_size": fl.batch_size,
        "learning_rate": fl.learning_rate, "momentum": fl.momentum,
        "round_deadline_s": fl.round_deadline_s, "min_fraction": fl.min_fraction,
        "fraction_train": fl.fraction_train, "eval_images": fl.eval_images,
        "data_dir": config.data.path or "", "validation_size": config.data.validation_size,
        "data_seed": config.data.seed,
        "progress": str(work / "progress.jsonl"), "weights": str(work / "global.npz"),
    }


def emulation(config: Config) -> dict[str, Any]:
    """What was emulated, for every output that depends on it."""
    fl = config.fl
    return {"emulated": True,
            "links": f"per client: up {format_rate(fl.uplink)}, down "
                     f"{format_rate(fl.downlink_rate)}, RTT {fl.rtt_ms:g} ms (shaping TCP proxy "
                     f"between SuperNode and SuperLink)",
            "compute_scales": [fl.compute_scale(i) for i in range(fl.clients)]}


def summarize(config: Config, events: list[dict[str, Any]], federation: Federation,
              partition_report: dict[str, Any]) -> dict[str, Any]:
    """Per-round accuracy, wall time and wire bytes (deltas of the proxies' counters)."""
    start = next(e for e in events if e["event"] == "start")
    previous = start["wire"]
    rounds, wall = [], 0.0
    total_up = total_down = 0
    round_events = [e for e in events if e["event"] == "round"]
    # node id -> partition (client index), from every answer of the run: which clients a
    # round was sent to, even one that never answered it
    partition_of = {node: int(metrics["partition-id"]) for event in round_events
                    for node, metrics in event["clients"].items()}
    for event in round_events:
        up = sum(w["bytes_up"] - previous[k]["bytes_up"] for k, w in event["wire"].items())
        down = sum(w["bytes_down"] - previous[k]["bytes_down"] for k, w in event["wire"].items())
        previous = event["wire"]
        wall += event["round_s"]
        total_up, total_down = total_up + up, total_down + down
        rounds.append({
            "round": event["round"], "accuracy": event["accuracy"], "loss": event["loss"],
            "round_s": event["round_s"], "wall_s": wall, "bytes_up": up, "bytes_down": down,
            "cumulative_bytes_up": total_up, "cumulative_bytes_down": total_down,
            "sent": len(event["sent"]), "answered": len(event["answered"]),
            "sent_clients": sorted(partition_of[str(node)] for node in event["sent"]
                                   if str(node) in partition_of),
            "answered_clients": sorted(int(c["partition-id"]) for c in event["clients"].values()),
            "aggregated": event["aggregated"], "failed": event["failed"], "late": event["late"],
            "missed": event["missed"],
        })
    done = next(e for e in events if e["event"] == "done")
    return {
        "config": config.fl.model_dump(), **emulation(config),
        "partition": partition_report, "initial_accuracy": start["accuracy"], "rounds": rounds,
        "final_accuracy": done["accuracy"], "final_loss": done["loss"],
        "wall_s": wall, "bytes_up": total_up, "bytes_down": total_down,
        "clients": [{"client": c.index, "compute_scale": c.compute_scale,
                     "killed_at_round": c.killed_at_round,
                     "joined_at_round": c.joined_at_round, **c.proxy.counters()}
                    for c in federation.clients],
        "weights": done["weights"],
    }


def run_federation(config: Config, work: Path, schedule: Schedule | None = None,
                   on_round: Callable[[dict[str, Any]], None] | None = None,
                   timeout_s: float | None = None,
                   taps: dict[int, Callable[[str, bytes], None]] | None = None
                   ) -> dict[str, Any]:
    """One federated run, start to finish; the summary (see `summarize`)."""
    from tierwise.learn.flower_app import client_data
    from tierwise.learn.partition import partition

    fl = config.fl
    _, labels = client_data(config.data.path or "", config.data.validation_size,
                            config.data.seed)  # a missing dataset fails here, with the hint
    report = partition(labels, fl.clients, fl.partition, seed=fl.seed, alpha=fl.alpha,
                       labels_per_client=fl.labels_per_client).report(labels)
    limit = timeout_s or (fl.rounds + 2) * (fl.round_deadline_s + 30) + STARTUP_TIMEOUT_S
    with Federation(config, work, schedule, on_round, taps) as federation:
        spec = run_spec(config, work, late=len(federation.schedule.join))
        federation.submit(spec)
        events = federation.follow(Path(spec["progress"]), limit)
        return summarize(config, events, federation, report)
