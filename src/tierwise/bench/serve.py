"""`tierwise bench serve`: closed-loop OIP v2 load against tier servers, dynamic batching
against batch-1 serving of the same model, beside in-process ONNX Runtime.

Each of `concurrency` connections sends one batch-1 request, waits for the answer, and sends
the next (closed loop), for `--duration-s`, with real inputs: Fashion-MNIST test images
(`--workload fashion-mnist`, JSON and binary tensors) or street-camera frames resized to the
model's input size (`--workload camera`, EfficientNet-Lite0 by default, binary tensors: a
256×256×3 frame is 196 KB binary and about 0.7 MB as JSON numbers).

Two servers of the same model run side by side, started here on loopback: one serving every
request alone (`max_batch_size` 1) and one batching dynamically up to a maximum batch with a
short queue delay. The maximum is `--max-batch-size`: a number, or `auto` (the default),
which first measures in-process ONNX Runtime at batch 1, 2, 4, ... up to the tier's
configured `max_batch_size` and takes the size of the most images per second. On a CPU a
convolutional network's batch gains little and large batches lose (on 2 cores
EfficientNet-Lite0 runs batch 4 at 1.08× batch 1's images/s, batch 16 at 0.73×), so a fixed
large maximum makes dynamic batching slower than batch-1 serving; on a GPU the curve rises
far and `auto` takes a large batch. Their runs are
interleaved (each level: batch-1, then dynamic), so drifting background load hits both alike.
The delay defaults to a quarter of one request's in-process compute (measured first):
at concurrency 1 a lone request can wait no longer than that, so it costs at most 25% there;
under closed-loop load the answers of one batch come back as a burst of new requests within
about that time, and the delay gathers the burst into one batch instead of a lone first
request followed by the rest. Beside them, ONNX Runtime runs the model in-process with no
server at batch 1, at the batching server's maximum and at the mean batch sizes it formed:
what the batches cost as pure compute, so the server's factor can be read against the one
compute alone would give.

The load generator shares the machine with the servers, so it is kept cheap per request:
requests are encoded once up front, and each connection is an asyncio protocol on a raw
keep-alive HTTP/1.1 socket that sends the next request from the callback that completes the
previous answer (no coroutine per request, no HTTP client library). It needs answers with a
Content-Length (uvicorn, Triton and KServe all send one). Every run records the CPU time the
server process and the load generator used (Linux /proc), so the table says how the cores
were shared: the server's ONNX Runtime worker (`--threads` intra-op threads) and its event
loop, and the load generator, on `os.cpu_count()` cores.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from tierwise.bench.harness import BenchReport, Column
from tierwise.config import Config
from tierwise.protocol.oip import (
    HEADER_LENGTH,
    decode_infer_response,
    encode_infer_request,
    infer_path,
    parse_header_length,
)

PAYLOADS = ("json", "binary")
DEFAULT_PAYLOADS = {"fashion-mnist": "json,binary", "camera": "binary"}
IMAGES = 512  # at most this many distinct pre-encoded requests per payload, cycled
# The batching server's default queue delay, as a share of one request's in-process compute.
QUEUE_DELAY_SHARE = 0.25
IN_PROCESS_MAX_S = 3.0  # per in-process batch size
AUTO = "auto"  # --max-batch-size: the batch size of the best in-process throughput


@dataclass(frozen=True)
class ServingMode:
    """How one server batches. `max_batch_size` 1 serves every request alone; None: a server
    given by URL, as it is configured."""

    name: str  # "batch-1", "dynamic" or "server"
    max_batch_size: int | None
    max_queue_delay_ms: float | None

    @property
    def label(self) -> str:
        if self.max_batch_size is None:
            return "server (as configured)"
        if self.max_batch_size == 1:
            return "server, batch 1"
        return f"server, dynamic ≤{self.max_batch_size}, {self.max_queue_delay_ms:g} ms delay"


@dataclass
class LoadResult:
    """One closed-loop run: a serving mode, a payload, a concurrency.

    mean_batch_size is the mean size of the batches the server formed (requests ÷ batches,
    from every answer's `tierwise-batch-size` header). The CPU columns are CPU seconds per
    wall second: the server process (all its threads) and the load generator.
    requests_per_server_cpu_s is what the server answers per CPU-second it gets: on a host
    that other work shares, a thread that computes long batches gets a smaller share of the
    cores than one that sleeps between short computes, so this ratio compares the two
    servers' efficiency where requests/s would also compare their luck with the scheduler."""

    mode: str
    payload: str
    concurrency: int
    requests: int
    requests_per_s: float
    latency_p50_ms: float
    latency_p95_ms: float
    latency_p99_ms: float
    errors: int
    mean_batch_size: float | None
    duration_s: float
    server_cpu_cores: float | None
    load_generator_cpu_cores: float
    requests_per_server_cpu_s: float | None


@dataclass
class InProcessResult:
    """ONNX Runtime in this process at one batch size, no server: the compute alone.
    Latencies are per call (one whole batch)."""

    batch_size: int
    calls: int
    images_per_s: float
    latency_p50_ms: float
    latency_p95_ms: float
    latency_p99_ms: float
    images_per_cpu_s: float | None  # per CPU-second this process used

    @property
    def compute_ms(self) -> float:
        """One call's compute: the shorter of its wall time (p50) and its CPU time (mean), so
        that neither other work on the host nor a second intra-op thread stretches it."""
        if not self.images_per_cpu_s:
            return self.latency_p50_ms
        return min(self.latency_p50_ms, 1e3 * self.batch_size / self.images_per_cpu_s)


# -- the load generator -------------------------------------------------------------------


def encode_http_requests(host: str, port: int, model: str, samples: Sequence[np.ndarray],
                         payload: str, input_name: str = "image") -> list[bytes]:
    """Complete HTTP/1.1 infer requests, one per sample (each a batch of one, [1, ...]),
    ready to write."""
    binary = payload == "binary"
    encoded = []
    for sample in samples:
        body, headers = encode_infer_request({input_name: sample}, binary=binary,
                                             binary_outputs=binary)
        lines = [f"POST {infer_path(model)} HTTP/1.1", f"Host: {host}:{port}",
                 f"Content-Length: {len(body)}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        encoded.append(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
    return encoded


class _ClosedLoopConnection(asyncio.Protocol):
    """One keep-alive connection that sends the next request as soon as an answer is whole."""

    def __init__(self, requests: list[bytes], start: int, deadline: float,
                 latencies: list[float], batch_sizes: list[int], done: asyncio.Future[int],
                 keep_bodies: int = 0) -> None:
        self.requests = requests
        self.index = start
        self.deadline = deadline
        self.latencies = latencies
        self.batch_sizes = batch_sizes
        self.done = done
        self.errors = 0
        self.buffer = bytearray()
        self.body_length: int | None = None
        self.status = 0
        self.head = b""
        self.sent_at = 0.0
        self.transport: asyncio.Transport | None = None
        self.keep_bodies = keep_bodies
        self.bodies: list[tuple[bytes, bytes]] = []  # (head, body), first `keep_bodies`

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        self._send()

    def _send(self) -> None:
        assert self.transport is not None
        request = self.requests[self.index % len(self.requests)]
        self.index += 1
        self.sent_at = time.perf_counter()
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        while True:
            if self.body_length is None:
                end = buffer.find(b"\r\n\r\n")
                if end < 0:
                    return
                head = bytes(buffer[:end]).lower()
                self.head = head
                self.status = int(head[9:12])
                at = head.find(b"\r\ncontent-length:")
                if at < 0:
                    self._fail("an answer without Content-Length")
                    return
                stop = head.find(b"\r\n", at + 17)
                self.body_length = int(head[at + 17:stop if stop > 0 else None])
                del buffer[:end + 4]
            if len(buffer) < self.body_length:
                return
            finished = time.perf_counter()
            self.latencies.append(finished - self.sent_at)
            if self.status != 200:
                self.errors += 1
            at = self.head.find(b"\r\ntierwise-batch-size:")
            if at >= 0:
                stop = self.head.find(b"\r\n", at + 22)
                self.batch_sizes.append(int(self.head[at + 22:stop if stop > 0 else None]))
            if len(self.bodies) < self.keep_bodies:
                self.bodies.append((self.head, bytes(buffer[:self.body_length])))
            del buffer[:self.body_length]
            self.body_length = None
            if finished >= self.deadline:
                self._finish()
                return
            self._send()

    def _fail(self, why: str) -> None:
        self.errors += 1
        if not self.done.done():
            self.done.set_exception(RuntimeError(why))
        if self.transport is not None:
            self.transport.close()

    def _finish(self) -> None:
        if not self.done.done():
            self.done.set_result(self.errors)
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(ConnectionError(f"the server closed the connection: {exc}"))


async def closed_loop(host: str, port: int, requests: list[bytes], concurrency: int,
                      duration_s: float, keep_bodies: int = 0,
                      ) -> tuple[list[float], list[int], int, list[tuple[bytes, bytes]]]:
    """(latencies in s, batch sizes from headers, errors, kept answers) of one run."""
    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    batch_sizes: list[int] = []
    deadline = time.perf_counter() + duration_s
    connections = []
    for number in range(concurrency):
        done: asyncio.Future[int] = loop.create_future()
        spread = number * len(requests) // concurrency
        _, protocol = await loop.create_connection(
            functools.partial(_ClosedLoopConnection, requests, spread, deadline, latencies,
                              batch_sizes, done, keep_bodies),
            host, port)
        connections.append(protocol)
    errors = 0
    for protocol in connections:
        errors += await protocol.done
    bodies = [body for protocol in connections for body in protocol.bodies]
    return latencies, batch_sizes, errors, bodies


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def _percentiles_ms(latencies_s: list[float]) -> tuple[float, float, float]:
    if not latencies_s:
        return float("nan"), float("nan"), float("nan")
    p50, p95, p99 = np.percentile(np.asarray(latencies_s) * 1e3, [50, 95, 99])
    return float(p50), float(p95), float(p99)


def cpu_seconds(pid: int | None) -> float | None:
    """CPU time (user + system, all threads) process `pid` has used so far; None without
    /proc (not Linux) or without a pid."""
    if pid is None:
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # the name may hold spaces; fields follow it
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def child_pid_on_port(port: int) -> int | None:
    """The pid of this process's child whose command line has `--port <port>` (the server
    `tier_server` started), to read its CPU time; None where /proc cannot tell."""
    marker = b"\0--port\0" + str(port).encode() + b"\0"
    me = os.getpid()
    with contextlib.suppress(OSError):
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                command = b"\0" + (entry / "cmdline").read_bytes()
            except (OSError, ValueError, IndexError):
                continue
            if parent == me and marker in command:
                return int(entry.name)
    return None


def run_load(host: str, port: int, requests: list[bytes], mode: str, payload: str,
             concurrency: int, duration_s: float, warmup_s: float,
             server_pid: int | None = None) -> LoadResult:
    """Warm up, then measure one closed-loop run (and the CPU the server and this load
    generator used during it)."""
    with asyncio.Runner(loop_factory=_new_loop) as runner:
        if warmup_s > 0:
            runner.run(closed_loop(host, port, requests, concurrency, warmup_s))
        server_cpu_before = cpu_seconds(server_pid)
        own_cpu_before = time.process_time()
        started = time.perf_counter()
        latencies, batch_sizes, errors, _ = runner.run(
            closed_loop(host, port, requests, concurrency, duration_s))
        elapsed = time.perf_counter() - started
        own_cpu = time.process_time() - own_cpu_before
        server_cpu_after = cpu_seconds(server_pid)
    p50, p95, p99 = _percentiles_ms(latencies)
    server_cpu = None if server_cpu_before is None or server_cpu_after is None else \
        (server_cpu_after - server_cpu_before) / elapsed
    return LoadResult(
        mode=mode, payload=payload, concurrency=concurrency, requests=len(latencies),
        requests_per_s=len(latencies) / elapsed, latency_p50_ms=p50, latency_p95_ms=p95,
        latency_p99_ms=p99, errors=errors, mean_batch_size=mean_batch_formed(batch_sizes),
        duration_s=elapsed, server_cpu_cores=server_cpu,
        load_generator_cpu_cores=own_cpu / elapsed,
        requests_per_server_cpu_s=len(latencies) / (server_cpu * elapsed)
        if server_cpu else None)


def mean_batch_formed(batch_sizes: Sequence[int]) -> float | None:
    """The mean size of the batches behind these answers, each answer carrying its batch's
    size: a batch of b rows answers b requests, so it counts 1/b per answer."""
    if not batch_sizes:
        return None
    return len(batch_sizes) / float(np.sum(1.0 / np.asarray(batch_sizes, dtype=float)))


def check_answers(host: str, port: int, requests: list[bytes],
                  expected_logits: np.ndarray | None) -> None:
    """Send the first request and check the answer decodes (and matches in-process logits)."""
    with asyncio.Runner(loop_factory=_new_loop) as runner:
        _, _, errors, bodies = runner.run(
            closed_loop(host, port, requests[:1], 1, 0.0, keep_bodies=1))
    head, body = bodies[0]
    if errors or not head.startswith(b"http/1.1 200"):
        raise RuntimeError(f"the server answered {head[:12]!r}: {body[:300]!r}")
    length = None
    for line in head.split(b"\r\n"):
        if line.startswith(HEADER_LENGTH.lower().encode() + b":"):
            length = parse_header_length(line.split(b":", 1)[1].strip())
    response = decode_infer_response(body, length)
    logits = next(iter(response.outputs.values()))
    if expected_logits is not None:
        np.testing.assert_allclose(logits[0], expected_logits[0], rtol=1e-4, atol=1e-4)


# -- in-process ONNX Runtime --------------------------------------------------------------


def measure_in_process(model: Any, samples: Sequence[np.ndarray], batch_size: int,
                       duration_s: float) -> InProcessResult:
    """ONNX Runtime in this process on batches of `batch_size` samples, for `duration_s`
    (at least two calls)."""
    distinct = max(1, min(8, len(samples) // batch_size))
    order = np.arange(distinct * batch_size) % len(samples)
    batches = [np.ascontiguousarray(np.concatenate(
        [samples[i] for i in order[start:start + batch_size]]))
        for start in range(0, len(order), batch_size)]
    for batch in batches[:3]:
        model.run(batch)
    latencies: list[float] = []
    cpu_before = time.process_time()
    started = time.perf_counter()
    deadline = started + duration_s
    while True:
        begin = time.perf_counter()
        if begin >= deadline and len(latencies) >= 2:
            break
        model.run(batches[len(latencies) % len(batches)])
        latencies.append(time.perf_counter() - begin)
    elapsed = time.perf_counter() - started
    cpu_s = time.process_time() - cpu_before
    p50, p95, p99 = _percentiles_ms(latencies)
    images = len(latencies) * batch_size
    return InProcessResult(batch_size=batch_size, calls=len(latencies),
                           images_per_s=images / elapsed, latency_p50_ms=p50,
                           latency_p95_ms=p95, latency_p99_ms=p99,
                           images_per_cpu_s=images / cpu_s if cpu_s > 0 else None)


def measure_curve(model: Any, samples: Sequence[np.ndarray], sizes: Sequence[int],
                  duration_s: float, rounds: int = 3) -> dict[int, InProcessResult]:
    """In-process throughput at each of `sizes`, in `rounds` interleaved rounds of
    `duration_s / rounds` each; per size, the round of median images/s. Interleaving keeps a
    burst of host noise (or the first calls' warm-up) from landing on one size alone: on a
    shared 2-core host one 3-second run at batch 1 measured 252 images/s, interleaved rounds
    313-336."""
    runs: dict[int, list[InProcessResult]] = {size: [] for size in sizes}
    for _ in range(rounds):
        for size in sizes:
            runs[size].append(measure_in_process(model, samples, size, duration_s / rounds))
    return {size: sorted(results, key=lambda r: r.images_per_s)[len(results) // 2]
            for size, results in runs.items()}


# -- the command --------------------------------------------------------------------------


def concurrency_levels(concurrency: object) -> list[int]:
    """`--concurrency` ('1,8,32') as client counts; exits naming the flag otherwise."""
    try:
        levels = [int(level) for level in str(concurrency).split(",") if level]
    except ValueError:
        levels = []
    if not levels or min(levels) < 1:
        raise SystemExit(f"error: --concurrency: expected positive integers like '1,8,32', "
                         f"got {concurrency!r}")
    return levels


def _payloads(payloads: str) -> list[str]:
    chosen = [payload for payload in payloads.split(",") if payload]
    if not chosen or set(chosen) - set(PAYLOADS):
        raise SystemExit(f"error: --payloads: expected some of {','.join(PAYLOADS)}, "
                         f"got {payloads!r}")
    return chosen


def _workload(config: Config, args: argparse.Namespace, console: Console
              ) -> tuple[str, Config, str]:
    """(workload, its config, the model to serve); the camera's models are installed (once)
    unless --models names another store."""
    from tierwise.bench.workload import (
        CAMERA_MODELS,
        WORKLOADS,
        WorkloadError,
        camera_config,
        install_camera,
    )

    workload = getattr(args, "workload", None) or "fashion-mnist"
    if workload not in WORKLOADS:
        raise SystemExit(f"error: --workload: expected one of {', '.join(WORKLOADS)}, "
                         f"got {workload!r}")
    if workload == "camera":
        camera = camera_config(config)
        if not getattr(args, "models", None):
            try:
                install_camera(camera, console)
            except WorkloadError as error:
                raise SystemExit(f"error: --workload camera: {error}") from None
        device_model = next(name for name, tiers in CAMERA_MODELS.items() if "device" in tiers)
        return workload, camera, getattr(args, "model", None) or device_model
    from tierwise.zoo.names import model_name

    return workload, config, getattr(args, "model", None) or model_name("edge")


def load_samples(workload: str, config: Config, info: Any | None
                 ) -> tuple[list[np.ndarray], str]:
    """The requests' inputs, each a batch of one ([1, ...]), and a sentence on their source.
    Camera frames are resized to the model's input size here, as `tierwise.Client` sends
    them, so they need the model's metadata (`info`)."""
    if workload == "camera":
        from tierwise.bench.workload import frames_dir
        from tierwise.data.images import load_frames
        from tierwise.models.inputs import as_batch, image_size

        if info is None:
            raise SystemExit("error: --workload camera: the model must be in the local store "
                             "(--models) to size the frames it is sent")
        folder = frames_dir(config) / "test"
        frames = load_frames(folder, limit=IMAGES)
        height, width = image_size(info) or frames.images[0].shape[:2]
        return ([as_batch(info, frame) for frame in frames.images],
                f"{len(frames.images)} street-camera frames ({folder}), resized to "
                f"{height}×{width}×3 uint8 by the load generator")
    from tierwise.data import load_fashion_mnist

    images = load_fashion_mnist(config.data.path, "test")[0][:IMAGES]
    return [image[None] for image in images], \
        f"the first {len(images)} Fashion-MNIST test images, 1×28×28 uint8"


def best_batch_size(in_process: dict[int, InProcessResult]) -> int:
    """The batch size of the most in-process throughput (images/s). The server gains a
    little more than in-process from each batch (one HTTP parse and one session call less
    per request), so the argmax it is; a larger maximum adds no waiting (the queue delay
    bounds that), only the compute of the batch it forms."""
    return max(in_process, key=lambda size: in_process[size].images_per_s)


def auto_batch_sizes(configured_max: int) -> list[int]:
    """The sizes `--max-batch-size auto` measures: powers of two up to the configured max."""
    return [size for size in (1, 2, 4, 8, 16, 32, 64) if size <= max(configured_max, 1)]


def serving_modes(args: argparse.Namespace, configured_max: int,
                  in_process: dict[int, InProcessResult]) -> list[ServingMode]:
    """The servers to compare: batch-1 and dynamic (a server given by --url: itself).
    `--max-batch-size auto` takes the size of the best in-process throughput (measured
    before, into `in_process`); with batch 1 the best, there is no dynamic server."""
    if getattr(args, "url", None):
        return [ServingMode("server", None, None)]
    batch_1 = in_process.get(1)
    max_batch = getattr(args, "max_batch_size", None)
    if max_batch == AUTO:
        max_batch = best_batch_size(in_process) if in_process else configured_max
    max_batch = configured_max if max_batch is None else int(max_batch)
    delay_ms = getattr(args, "max_queue_delay_ms", None)
    if delay_ms is None:
        delay_ms = round(QUEUE_DELAY_SHARE * batch_1.compute_ms, 2) if batch_1 else 0.0
    modes = [ServingMode("batch-1", 1, 0.0)]
    if max_batch > 1:
        modes.append(ServingMode("dynamic", max_batch, delay_ms))
    return modes


@contextlib.contextmanager
def _servers(args: argparse.Namespace, models_dir: Path, modes: list[ServingMode],
             threads: int) -> Iterator[list[tuple[str, int | None]]]:
    """(base URL, server pid or None) per mode: the --url server, or one started per mode."""
    if getattr(args, "url", None):
        yield [(args.url.rstrip("/"), None)]
        return
    from tierwise.bench.processes import tier_server

    with contextlib.ExitStack() as stack:
        started = []
        for mode in modes:
            extra = ["--threads", str(threads), "--max-batch-size", str(mode.max_batch_size),
                     "--max-queue-delay-ms", f"{mode.max_queue_delay_ms:g}"]
            url = stack.enter_context(tier_server(
                "edge", models_dir, extra_args=extra, config_path=getattr(args, "config", None)))
            started.append((url, child_pid_on_port(urlsplit(url).port or 80)))
        yield started


def _load_average() -> float | None:
    """The host's 1-minute load average (None where the OS has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _ms(value: float) -> str:
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


COLUMNS = [
    Column("serving", "serving", left=True),
    Column("payload", "payload", left=True),
    Column("concurrency", "concurrency"),
    Column("requests", "requests", "{:,}"),
    Column("requests_per_s", "req/s", "{:,.1f}"),
    Column("vs_batch_1", "× batch 1", "{:.2f}"),
    Column("latency_p50_ms", "p50 ms", _ms),
    Column("latency_p95_ms", "p95 ms", _ms),
    Column("latency_p99_ms", "p99 ms", _ms),
    Column("mean_batch_size", "mean batch", "{:.1f}"),
    Column("errors", "errors"),
    Column("server_cpu_cores", "server CPU", "{:.2f}"),
    Column("requests_per_server_cpu_s", "req per CPU-s", "{:,.1f}"),
    Column("load_generator_cpu_cores", "load-gen CPU", "{:.2f}"),
]


def throughput_factors(rows: list[LoadResult], in_process: dict[int, InProcessResult]
                       ) -> list[dict[str, Any]]:
    """Per payload and concurrency: dynamic batching's requests/s over batch-1 serving's,
    beside what in-process ONNX Runtime gives at the mean batch formed over batch 1; and the
    same per CPU-second (`*_per_cpu_s`), which a host shared with other work skews less."""
    by_key = {(row.mode, row.payload, row.concurrency): row for row in rows}
    factors = []
    for (mode, payload, level), dynamic in by_key.items():
        single = by_key.get(("batch-1", payload, level))
        if mode != "dynamic" or single is None or not single.requests_per_s:
            continue
        batch = max(1, round(dynamic.mean_batch_size or 1))
        compute, alone = in_process.get(batch), in_process.get(1)
        factors.append({
            "payload": payload, "concurrency": level,
            "dynamic_requests_per_s": dynamic.requests_per_s,
            "batch_1_requests_per_s": single.requests_per_s,
            "factor": dynamic.requests_per_s / single.requests_per_s,
            "mean_batch_size": dynamic.mean_batch_size,
            "in_process_factor": compute.images_per_s / alone.images_per_s
            if compute is not None and alone is not None else None,
            "factor_per_cpu_s": _ratio(dynamic.requests_per_server_cpu_s,
                                       single.requests_per_server_cpu_s),
            "in_process_factor_per_cpu_s": _ratio(
                compute.images_per_cpu_s if compute else None,
                alone.images_per_cpu_s if alone else None),
        })
    return factors


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return numerator / denominator if numerator and denominator else None


def _table_rows(modes: list[ServingMode], rows: list[LoadResult],
                in_process: dict[int, InProcessResult], payloads: list[str]
                ) -> list[dict[str, Any]]:
    single = in_process.get(1)
    table = [{"serving": f"in-process ORT, batch {size}", "requests": result.calls * size,
              "requests_per_s": result.images_per_s, "latency_p50_ms": result.latency_p50_ms,
              "latency_p95_ms": result.latency_p95_ms, "latency_p99_ms": result.latency_p99_ms,
              "mean_batch_size": size, "requests_per_server_cpu_s": result.images_per_cpu_s,
              "vs_batch_1": result.images_per_s / single.images_per_s if single else None}
             for size, result in sorted(in_process.items())]
    batch_1 = {(row.payload, row.concurrency): row.requests_per_s
               for row in rows if row.mode == "batch-1"}
    labels = {mode.name: mode.label for mode in modes}
    for payload in payloads:
        for mode in modes:
            for row in rows:
                if row.payload != payload or row.mode != mode.name:
                    continue
                baseline = batch_1.get((payload, row.concurrency))
                table.append({**asdict(row), "serving": labels[row.mode],
                              "vs_batch_1": row.requests_per_s / baseline if baseline else None})
    return table


def _plot(report: BenchReport, modes: list[ServingMode], rows: list[LoadResult],
          in_process: dict[int, InProcessResult], title: str) -> None:
    with report.figure("bench-serve.png", ncols=2, title=title) as (_, (throughput, latency)):
        for index, mode in enumerate(modes):
            for payload in dict.fromkeys(row.payload for row in rows):
                mine = [row for row in rows if row.mode == mode.name and row.payload == payload]
                if not mine:
                    continue
                style = {"color": f"C{index}", "marker": "o",
                         "linestyle": "-" if payload == "binary" else "--",
                         "label": f"{mode.label} ({payload})"}
                levels = [row.concurrency for row in mine]
                throughput.plot(levels, [row.requests_per_s for row in mine], **style)
                latency.plot(levels, [row.latency_p50_ms for row in mine], **style)
        greys = np.linspace(0.2, 0.65, max(len(in_process), 1))
        for grey, (size, result) in zip(greys, sorted(in_process.items()), strict=False):
            line = {"color": str(grey), "linestyle": ":", "linewidth": 1.2,
                    "label": f"in-process ORT, batch {size}"}
            throughput.axhline(result.images_per_s, **line)
            latency.axhline(result.latency_p50_ms, **line)
        levels = sorted({row.concurrency for row in rows})
        for axis, label in ((throughput, "requests/s (in-process: images/s)"),
                            (latency, "p50 latency, ms (in-process: per batch call)")):
            axis.set_xscale("log", base=2)
            axis.set_xticks(levels, [str(level) for level in levels])
            axis.set_xlabel("concurrent connections (closed loop, batch-1 requests)")
            axis.set_ylabel(label)
            axis.grid(True, alpha=0.3)
            axis.legend(fontsize=7)
        latency.set_yscale("log")


def run_bench_serve(config: Config, args: argparse.Namespace) -> None:
    """Run the benchmark and write results.json, table.md and bench-serve.png to `args.out`."""
    from tierwise.client.client import compute_labels
    from tierwise.runtime.session import load_models

    console = Console()
    if not console.is_terminal and console.width < 150:  # e.g. piped: keep the table whole
        console = Console(width=150)
    levels = concurrency_levels(args.concurrency)
    max_batch_size = getattr(args, "max_batch_size", None)
    if max_batch_size is not None and max_batch_size != AUTO and (
            not str(max_batch_size).isdigit() or int(max_batch_size) < 1):
        raise SystemExit(f"error: --max-batch-size: expected a whole number of at least 1 or "
                         f"'{AUTO}', got {max_batch_size!r}")
    workload, config, model = _workload(config, args, console)
    payloads = _payloads(getattr(args, "payloads", None) or DEFAULT_PAYLOADS[workload])
    threads = getattr(args, "threads", None) or 1
    url_given = getattr(args, "url", None)
    models_dir = Path(args.models) if getattr(args, "models", None) else config.models_dir
    if not url_given and not (models_dir / model).is_dir():
        how = "train it (`tierwise zoo train --only edge`)" if workload == "fashion-mnist" \
            else "import it (`tierwise models add`)"
        raise SystemExit(f"error: {models_dir / model}: no such model to serve; {how}, or "
                         "pass --models or --url")

    local = load_models(models_dir, threads=threads, names=[model]).get(model) \
        if (models_dir / model).is_dir() else None
    samples, source = load_samples(workload, config, local.info if local else None)
    input_name = local.input_name if local is not None else "image"
    in_process_s = min(args.duration_s, IN_PROCESS_MAX_S)
    in_process: dict[int, InProcessResult] = {}
    expected = None
    if local is not None:
        expected = local.run(samples[0])
        in_process[1] = measure_in_process(local, samples, 1, in_process_s)
        if max_batch_size == AUTO and not url_given:
            in_process.update(measure_curve(
                local, samples, auto_batch_sizes(config.tier("edge").max_batch_size),
                in_process_s))
    modes = serving_modes(args, config.tier("edge").max_batch_size, in_process)

    rows: list[LoadResult] = []
    warmup_s = min(1.0, 0.2 * args.duration_s)
    with _servers(args, models_dir, modes, threads) as servers:
        urls = [url for url, _ in servers]
        endpoints = []
        for mode, (url, pid) in zip(modes, servers, strict=True):
            parts = urlsplit(url)
            host, port = parts.hostname or "127.0.0.1", parts.port or 80
            encoded = {payload: encode_http_requests(host, port, model, samples, payload,
                                                     input_name) for payload in payloads}
            for payload in payloads:
                check_answers(host, port, encoded[payload], expected)
            endpoints.append((mode, host, port, pid, encoded))
        # interleaved, so drifting background load hits every mode alike
        load_average = [_load_average()]
        runs = [(payload, level, endpoint) for payload in payloads for level in levels
                for endpoint in endpoints]
        with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                      console=console, transient=True) as progress:
            task = progress.add_task("load", total=len(runs))
            for payload, level, (mode, host, port, pid, encoded) in runs:
                progress.update(task, description=f"{mode.label}: {payload} x {level}")
                rows.append(run_load(host, port, encoded[payload], mode.name, payload, level,
                                     args.duration_s, warmup_s, pid))
                progress.advance(task)
        load_average.append(_load_average())

    if local is not None:  # the batch sizes the server ran, as compute alone
        sizes = {mode.max_batch_size for mode in modes if mode.max_batch_size}
        sizes |= {max(1, round(row.mean_batch_size)) for row in rows
                  if row.mean_batch_size is not None and row.concurrency > 1}
        for size in sorted(sizes - set(in_process)):
            in_process[size] = measure_in_process(local, samples, size, in_process_s)

    factors = throughput_factors(rows, in_process)
    started_here = not url_given
    emulated = [label for label in compute_labels(config) if label.startswith("edge ")] \
        if started_here else []
    cpus = os.cpu_count()
    request_bytes = {payload: len(endpoints[0][4][payload][0]) for payload in payloads}
    notes = _notes(modes, factors, in_process, threads, cpus, source, request_bytes,
                   url_given, args, load_average)
    title = f"tierwise bench serve: {model} ({workload}) on {cpus} CPUs"
    out = getattr(args, "out", None) or \
        ("reports/bench-serve" + ("-camera" if workload == "camera" else ""))
    report = BenchReport("serve", out, emulated, console=console)
    report.table(_table_rows(modes, rows, in_process, payloads), COLUMNS, title=title,
                 notes=notes)
    for note in notes:
        console.print(f"- {note}", highlight=False)
    _plot(report, modes, rows, in_process, title)
    report.write({
        "workload": workload, "model": model, "inputs": source,
        "request_bytes": request_bytes, "urls": urls, "server_started_here": started_here,
        "concurrency": levels, "duration_s": args.duration_s, "warmup_s": warmup_s,
        "in_process_s": in_process_s, "cpus": cpus, "server_intra_op_threads": threads,
        "load_average_1min": load_average,
        "modes": [{**asdict(mode), "label": mode.label} for mode in modes],
        "server_tier": config.tier("edge").model_dump() if started_here else None,
        "rows": [asdict(row) for row in rows],
        "in_process": [asdict(result) for _, result in sorted(in_process.items())],
        "factors": factors, "notes": notes,
    })
    report.say_written()


def _notes(modes: list[ServingMode], factors: list[dict[str, Any]],
           in_process: dict[int, InProcessResult], threads: int, cpus: int | None,
           source: str, request_bytes: dict[str, int], url_given: str | None,
           args: argparse.Namespace, load_average: list[float | None]) -> list[str]:
    notes = []
    top = max((factor["concurrency"] for factor in factors), default=None)
    for factor in factors:
        if factor["concurrency"] != top:
            continue
        compute, per_cpu = factor["in_process_factor"], factor["factor_per_cpu_s"]
        compute_per_cpu = factor["in_process_factor_per_cpu_s"]
        notes.append(
            f"Throughput factor at concurrency {top} ({factor['payload']}): dynamic batching "
            f"{factor['dynamic_requests_per_s']:,.1f} req/s over batch-1 serving "
            f"{factor['batch_1_requests_per_s']:,.1f} req/s = {factor['factor']:.2f}×, mean "
            f"batch {factor['mean_batch_size']:.1f}"
            + (f"; in-process ONNX Runtime at that batch over batch 1: {compute:.2f}×"
               if compute is not None else "")
            + (f". Per CPU-second: server {per_cpu:.2f}×" if per_cpu is not None else "")
            + (f", in-process {compute_per_cpu:.2f}×" if compute_per_cpu is not None else "")
            + ".")
    dynamic = next((mode for mode in modes if mode.name == "dynamic"), None)
    if dynamic is not None:
        given = getattr(args, "max_queue_delay_ms", None) is not None
        single = in_process.get(1)
        why = "given by --max-queue-delay-ms" if given or single is None else (
            f"{QUEUE_DELAY_SHARE:.0%} of one request's in-process compute, "
            f"{single.compute_ms:.3g} ms: at most that much added to a lone request, "
            "enough to gather a burst of closed-loop requests into one batch")
        chosen = ("the batch size of the most in-process throughput among "
                  + ", ".join(str(size) for size in sorted(in_process)) + " (--max-batch-size "
                  "auto)") if getattr(args, "max_batch_size", None) == AUTO else (
                      "given by --max-batch-size" if getattr(args, "max_batch_size", None)
                      else "the tier's configured max_batch_size")
        notes.append(f"Dynamic batching: up to {dynamic.max_batch_size} requests per batch "
                     f"({chosen}), queue delay {dynamic.max_queue_delay_ms:g} ms ({why}).")
    elif not url_given and getattr(args, "max_batch_size", None) == AUTO:
        notes.append("No dynamic-batching server: in-process ONNX Runtime ran batch 1 "
                     "fastest of " + ", ".join(str(size) for size in sorted(in_process))
                     + ", so batching cannot raise this model's throughput on this host.")
    if url_given:
        notes.append(f"Server: {url_given}, as it is configured (not started here: no "
                     "batch-1 comparison, compute emulation unknown).")
    else:
        notes.append(
            f"Threads on {cpus} CPUs: each server process runs ONNX Runtime with {threads} "
            "intra-op thread(s) in one worker thread beside its event loop; the load generator "
            "is one Python thread (uvloop) in this process; both servers are up throughout, "
            "the idle one costs nothing. In-process ONNX Runtime runs with the same "
            f"{threads} thread(s) while no load runs. Server CPU and load-gen CPU: CPU "
            "seconds per wall second during each run; req per CPU-s: requests answered per "
            "CPU-second the server process got (in-process: images per CPU-second), which "
            "compares the modes' efficiency even where other work takes a share of the cores.")
    known = [value for value in load_average if value is not None]
    if len(known) == 2:
        busy = max(known) > (cpus or 1)  # more runnable threads than cores
        notes.append(
            f"Host load (1-min average) {known[0]:.1f} before the runs, {known[1]:.1f} after, "
            f"on {cpus} CPUs" + (": other processes shared the cores, so absolute rates are "
                                 "low; the factors are measured side by side, runs "
                                 "interleaved." if busy else "."))
    notes.append(f"Requests: {source}; one image per request, "
                 + ", ".join(f"{payload} {size:,} B" for payload, size in request_bytes.items())
                 + " per HTTP request. Mean batch: requests ÷ batches the server formed "
                 "(each answer's tierwise-batch-size header). In-process rows: images and "
                 "images/s, latency per ONNX Runtime call (a whole batch).")
    return notes
