"""`tierwise bench serve`: closed-loop OIP v2 load against a tier server.

Each of `concurrency` connections sends one batch-1 request, waits for the answer, and sends
the next (closed loop), for `--duration-s`, with JSON and with binary tensor payloads of real
Fashion-MNIST test images. It reports requests/s and latency percentiles, beside the floor:
the same model run in-process by ONNX Runtime, batch 1, with no server at all.

The load generator shares the machine with the server, so it is kept cheap per request:
requests are encoded once up front, and each connection is an asyncio protocol on a raw
keep-alive HTTP/1.1 socket that sends the next request from the callback that completes the
previous answer (no coroutine per request, no HTTP client library). It needs answers with a
Content-Length (uvicorn, Triton and KServe all send one).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from tierwise.config import Config
from tierwise.protocol.oip import (
    HEADER_LENGTH,
    decode_infer_response,
    encode_infer_request,
    infer_path,
    parse_header_length,
)

PAYLOADS = ("json", "binary")
IMAGES = 512  # distinct pre-encoded requests per payload, cycled


@dataclass
class LoadResult:
    """One closed-loop run: a payload at a concurrency."""

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


@dataclass
class FloorResult:
    """In-process ONNX Runtime, batch 1: the most a server could hope to approach."""

    requests: int
    requests_per_s: float
    latency_p50_ms: float
    latency_p95_ms: float
    latency_p99_ms: float


# -- the load generator -------------------------------------------------------------------


def encode_http_requests(host: str, port: int, model: str, images: np.ndarray, payload: str,
                         input_name: str = "image") -> list[bytes]:
    """Complete HTTP/1.1 infer requests, one per image ([1, ...] each), ready to write."""
    binary = payload == "binary"
    encoded = []
    for image in images:
        body, headers = encode_infer_request({input_name: image[None]}, binary=binary,
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
            lambda spread=spread, done=done: _ClosedLoopConnection(
                requests, spread, deadline, latencies, batch_sizes, done, keep_bodies),
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


def run_load(host: str, port: int, requests: list[bytes], payload: str, concurrency: int,
             duration_s: float, warmup_s: float) -> LoadResult:
    """Warm up, then measure one closed-loop run."""
    with asyncio.Runner(loop_factory=_new_loop) as runner:
        if warmup_s > 0:
            runner.run(closed_loop(host, port, requests, concurrency, warmup_s))
        started = time.perf_counter()
        latencies, batch_sizes, errors, _ = runner.run(
            closed_loop(host, port, requests, concurrency, duration_s))
        elapsed = time.perf_counter() - started
    p50, p95, p99 = _percentiles_ms(latencies)
    return LoadResult(
        payload=payload, concurrency=concurrency, requests=len(latencies),
        requests_per_s=len(latencies) / elapsed, latency_p50_ms=p50, latency_p95_ms=p95,
        latency_p99_ms=p99, errors=errors,
        mean_batch_size=float(np.mean(batch_sizes)) if batch_sizes else None,
        duration_s=elapsed)


def check_answers(host: str, port: int, requests: list[bytes], images: np.ndarray,
                  expected_logits: np.ndarray | None) -> None:
    """Send a few requests and check the answers decode (and match in-process logits)."""
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


# -- the floor ----------------------------------------------------------------------------


def measure_floor(model: object, images: np.ndarray, duration_s: float) -> FloorResult:
    """In-process ONNX Runtime on one image at a time, for `duration_s`."""
    from tierwise.runtime.session import OnnxModel

    assert isinstance(model, OnnxModel)
    singles = [np.ascontiguousarray(image[None]) for image in images]
    for single in singles[:20]:
        model.run(single)
    latencies = []
    deadline = time.perf_counter() + duration_s
    index = 0
    started = time.perf_counter()
    while True:
        begin = time.perf_counter()
        if begin >= deadline:
            break
        model.run(singles[index % len(singles)])
        latencies.append(time.perf_counter() - begin)
        index += 1
    elapsed = time.perf_counter() - started
    p50, p95, p99 = _percentiles_ms(latencies)
    return FloorResult(requests=len(latencies), requests_per_s=len(latencies) / elapsed,
                       latency_p50_ms=p50, latency_p95_ms=p95, latency_p99_ms=p99)


# -- the command --------------------------------------------------------------------------


@contextlib.contextmanager
def _server(args: argparse.Namespace, models_dir: Path) -> Iterator[tuple[str, bool]]:
    """(base URL, whether we started it)."""
    if args.url:
        yield args.url.rstrip("/"), False
        return
    from tierwise.bench.processes import tier_server

    extra = ["--threads", str(getattr(args, "threads", 1))]
    with tier_server("edge", models_dir, extra_args=extra,
                     config_path=getattr(args, "config", None)) as url:
        yield url, True


def _table(rows: list[LoadResult], floor: FloorResult | None, title: str) -> Table:
    table = Table(title=title)
    for column in ("payload", "concurrency", "requests", "req/s", "p50 ms", "p95 ms", "p99 ms",
                   "mean batch", "errors"):
        table.add_column(column, justify="left" if column == "payload" else "right")
    if floor is not None:
        table.add_row("in-process ORT", "1", f"{floor.requests}",
                      f"{floor.requests_per_s:,.0f}", f"{floor.latency_p50_ms:.3f}",
                      f"{floor.latency_p95_ms:.3f}", f"{floor.latency_p99_ms:.3f}", "1", "-")
    for row in rows:
        batch = f"{row.mean_batch_size:.1f}" if row.mean_batch_size is not None else "-"
        table.add_row(row.payload, str(row.concurrency), str(row.requests),
                      f"{row.requests_per_s:,.0f}", f"{row.latency_p50_ms:.3f}",
                      f"{row.latency_p95_ms:.3f}", f"{row.latency_p99_ms:.3f}", batch,
                      str(row.errors), style="red" if row.errors else None)
    return table


def _plot(rows: list[LoadResult], floor: FloorResult | None, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (throughput, latency) = plt.subplots(1, 2, figsize=(10, 4))
    for payload in dict.fromkeys(row.payload for row in rows):
        mine = [row for row in rows if row.payload == payload]
        levels = [row.concurrency for row in mine]
        throughput.plot(levels, [row.requests_per_s for row in mine], marker="o", label=payload)
        latency.plot(levels, [row.latency_p50_ms for row in mine], marker="o", label=payload)
    if floor is not None:
        throughput.axhline(floor.requests_per_s, color="gray", linestyle="--",
                           label="in-process ORT, batch 1")
        latency.axhline(floor.latency_p50_ms, color="gray", linestyle="--",
                        label="in-process ORT, batch 1")
    levels = sorted({row.concurrency for row in rows})
    for axis, label in ((throughput, "requests/s"), (latency, "p50 latency (ms)")):
        axis.set_xscale("log", base=2)
        axis.set_xticks(levels, [str(level) for level in levels])
        axis.set_xlabel("concurrent connections (closed loop)")
        axis.set_ylabel(label)
        axis.grid(True, alpha=0.3)
        axis.legend()
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def run_bench_serve(config: Config, args: argparse.Namespace) -> None:
    """Run the benchmark and write results.json, a table and bench-serve.png to `args.out`."""
    from tierwise.data import load_fashion_mnist
    from tierwise.runtime.session import load_models

    console = Console()
    if not console.is_terminal and console.width < 110:  # e.g. piped: keep the table whole
        console = Console(width=110)
    try:
        concurrencies = [int(level) for level in str(args.concurrency).split(",") if level]
    except ValueError:
        concurrencies = []
    if not concurrencies or min(concurrencies) < 1:
        raise SystemExit(f"error: --concurrency: expected positive integers like '1,8,32', "
                         f"got {args.concurrency!r}")
    payloads = [payload for payload in str(getattr(args, "payloads", "json,binary")).split(",")
                if payload]
    if not payloads or set(payloads) - set(PAYLOADS):
        raise SystemExit(f"error: --payloads: expected some of {','.join(PAYLOADS)}, "
                         f"got {payloads}")
    models_dir = Path(args.models) if getattr(args, "models", None) else config.models_dir
    if not args.url and not (models_dir / args.model).is_dir():
        raise SystemExit(f"error: {models_dir / args.model}: no such model to serve; train it "
                         "(`tierwise zoo train --only edge`), or pass --models or --url")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    images = load_fashion_mnist(config.data.path, "test")[0][:IMAGES]

    local = load_models(models_dir, names=[args.model]).get(args.model) \
        if (models_dir / args.model).is_dir() else None
    floor = None
    expected = None
    if local is not None:
        expected = local.run(images[:1])
        floor = measure_floor(local, images, min(args.duration_s, 3.0))

    rows: list[LoadResult] = []
    warmup_s = min(1.0, 0.2 * args.duration_s)
    with _server(args, models_dir) as (url, started_here):
        parts = urlsplit(url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 80
        title = (f"tierwise bench serve: {args.model} at {url}"
                 f"{' (started here)' if started_here else ''}")
        runs = [(payload, level) for payload in payloads for level in concurrencies]
        with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                      console=console, transient=True) as progress:
            task = progress.add_task("load", total=len(runs))
            encoded = {payload: encode_http_requests(host, port, args.model, images, payload)
                       for payload in payloads}
            for payload in payloads:
                check_answers(host, port, encoded[payload], images, expected)
            for payload, level in runs:
                progress.update(task, description=f"{payload} x {level} connections")
                rows.append(run_load(host, port, encoded[payload], payload, level,
                                     args.duration_s, warmup_s))
                progress.advance(task)

    results = {
        "model": args.model,
        "url": url,
        "server_started_here": started_here,
        "duration_s": args.duration_s,
        "note": "closed loop, batch-1 requests; load generator and server share this machine",
        "cpus": os.cpu_count(),
        "server_tier": config.tier("edge").model_dump() if started_here else None,
        "in_process_floor": asdict(floor) if floor is not None else None,
        "rows": [asdict(row) for row in rows],
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    _plot(rows, floor, out / "bench-serve.png", title)
    console.print(_table(rows, floor, title))
    if started_here:
        tier = config.tier("edge")
        emulated = (f"compute emulated at {tier.compute_scale:g}x" if tier.compute_scale != 1
                    else "no compute emulation")
        console.print(f"server: tier edge, {emulated}, max_batch_size {tier.max_batch_size}, "
                      f"max_queue_delay_ms {tier.max_queue_delay_ms:g}; no link emulation "
                      f"(loopback); server and load generator share {os.cpu_count()} CPUs")
    console.print(f"wrote {out / 'results.json'} and {out / 'bench-serve.png'}")
