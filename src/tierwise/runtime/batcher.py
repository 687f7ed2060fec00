"""Dynamic batching: concurrent requests for one model run as one ONNX Runtime call.

The policy is Triton's dynamic batcher (docs/user_guide/model_configuration.md, "Dynamic
Batcher"): requests queue on the event loop; when the model is free, the queued requests form
one batch of at most `max_batch_size` rows. With `max_queue_delay_ms` > 0 a batch that is not
full waits until its oldest request has queued that long, to let more requests join. While a
batch runs, new requests queue, so batches grow by themselves under load and stay at one
request when there is none: no delay is added at low load.

The model runs in one worker thread per model (ONNX Runtime releases the GIL), so the event
loop keeps parsing and answering requests while a batch computes. One exception: a lone
single-row request on an idle model whose single rows compute in under `inline_max_ms` runs
on the event loop itself, because handing it to the worker and back costs two thread
wake-ups, about as long as such a compute (~0.15 ms each way on a 2-core VM).

A model that is not batched (`ModelInfo.batched` False: a fixed batch of 1, as many exporters
write them) runs one request at a time: its batches hold exactly one request, counted as one
row, and its outputs go back as the model returned them (the server refuses such a request
with more than one row before it gets here).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from queue import SimpleQueue
from typing import Any

import numpy as np

from tierwise.runtime.session import OnnxModel


@dataclass(slots=True, frozen=True)
class BatchTiming:
    """How one request was served: its wait, its batch's compute time and the batch's size."""

    queue_ms: float
    compute_ms: float
    batch_size: int


class _Queued:
    __slots__ = ("arrived", "future", "inputs", "rows", "shape_key")

    def __init__(self, inputs: Mapping[str, np.ndarray], future: asyncio.Future[Any],
                 batched: bool = True) -> None:
        self.inputs = inputs
        first = next(iter(inputs.values()))
        self.rows = first.shape[0] if batched else 1
        # Only requests whose non-batch dimensions agree can be concatenated.
        self.shape_key = tuple(array.shape[1:] for array in inputs.values())
        self.future = future
        self.arrived = time.perf_counter()


class DynamicBatcher:
    """Batches concurrent `infer` calls for one model.

    model: the loaded model; every output is computed, all inputs are concatenated on axis 0.
    max_batch_size: most rows per ONNX Runtime call (default 32). A single request with more
        rows runs alone rather than being refused. 1 for a model that is not batched.
    max_queue_delay_ms: how long a batch that is not full may wait for more requests
        (default 0: batch only what is already queued).
    compute_scale: emulates a slower machine. After each batch the worker sleeps
        (compute_scale - 1) times the measured compute time, so the batch takes `compute_scale`
        times as long and the reported compute time is the stretched one. This is emulation,
        and reports say so. A scale below 1 cannot be emulated: the host's speed is used.
    on_batch: called on the event loop after each batch with (batch size, compute ms), e.g. to
        record metrics.
    inline_max_ms: a lone single-row request runs on the event loop when single rows of this
        model compute faster than this (running average; default 0.5 ms; 0 turns it off).
        Never with compute_scale > 1, whose sleep must not block the loop, nor with `cores`.
    cores: the server's cores, shared by every model's batcher (`tiers.<tier>.cores`): a
        batch computes (and sleeps out its compute_scale) only while it holds one, and the
        wait for it counts as queue time. None: this model computes whenever it has work.
    """

    def __init__(
        self,
        model: OnnxModel,
        *,
        max_batch_size: int = 32,
        max_queue_delay_ms: float = 0.0,
        compute_scale: float = 1.0,
        on_batch: Callable[[int, float], None] | None = None,
        inline_max_ms: float = 0.5,
        cores: threading.Semaphore | None = None,
    ) -> None:
        self.model = model
        self.batched = model.info.batched
        self.max_batch_size = max_batch_size if self.batched else 1
        self.max_queue_delay_ms = max_queue_delay_ms
        self.compute_scale = compute_scale
        self.on_batch = on_batch
        self.inline_max_ms = inline_max_ms
        self.cores = cores
        self._single_row_ms: float | None = None  # running average of single-row batches
        self._pending: deque[_Queued] = deque()
        self._pending_rows = 0
        self._busy = False
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._jobs: SimpleQueue[list[_Queued] | None] = SimpleQueue()
        self._worker: threading.Thread | None = None

    async def infer(
        self, inputs: Mapping[str, np.ndarray]
    ) -> tuple[dict[str, np.ndarray], BatchTiming]:
        """The model's outputs for `inputs` (each [rows, ...]), and how they were computed."""
        if self._loop is None:
            self._start()
        assert self._loop is not None
        queued = _Queued(inputs, self._loop.create_future(), self.batched)
        self._pending.append(queued)
        self._pending_rows += queued.rows
        if not self._busy:
            self._launch()
        result: tuple[dict[str, np.ndarray], BatchTiming] = await queued.future
        return result

    def close(self) -> None:
        """Stop the worker thread (after the batch it is running, if any)."""
        if self._worker is not None:
            self._jobs.put(None)
            self._worker.join(timeout=10)
            self._worker = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._loop = None

    # -- on the event loop ---------------------------------------------------------------

    def _start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._worker = threading.Thread(target=self._work, name=f"batcher-{self.model.name}",
                                        daemon=True)
        self._worker.start()

    def _launch(self) -> None:
        """Start a batch if the model is free, there is work, and waiting is over."""
        if self._busy or not self._pending:
            return
        if self.max_queue_delay_ms > 0 and self._pending_rows < self.max_batch_size:
            wait_s = (self._pending[0].arrived + self.max_queue_delay_ms / 1e3
                      - time.perf_counter())
            if wait_s > 0:
                if self._timer is None:
                    assert self._loop is not None
                    self._timer = self._loop.call_later(wait_s, self._on_timer)
                return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._busy = True
        batch = self._take_batch()
        if (len(batch) == 1 and batch[0].rows == 1 and self.compute_scale <= 1
                and self.cores is None and self._single_row_ms is not None
                and self._single_row_ms < self.inline_max_ms):
            self._run_inline(batch)
        else:
            self._jobs.put(batch)

    def _run_inline(self, batch: list[_Queued]) -> None:
        started = time.perf_counter()
        result: list[np.ndarray] | BaseException
        try:
            result = self.model.session.run(self.model.output_names, batch[0].inputs)
        except Exception as error:
            result = error
        # Answer on the next loop turn, not now: requests that arrived during the compute are
        # read first and queue behind this batch, so under load the next batch still forms
        # (and goes to the worker) instead of every request running alone on the loop.
        assert self._loop is not None
        self._loop.call_soon(self._finish, batch, result, started, time.perf_counter())

    def _on_timer(self) -> None:
        self._timer = None
        self._launch()

    def _take_batch(self) -> list[_Queued]:
        head = self._pending.popleft()
        batch, rows = [head], head.rows
        if self._pending and rows < self.max_batch_size:
            kept: deque[_Queued] = deque()
            while self._pending:
                queued = self._pending.popleft()
                if queued.shape_key == head.shape_key and rows + queued.rows <= self.max_batch_size:
                    batch.append(queued)
                    rows += queued.rows
                else:
                    kept.append(queued)
                if rows >= self.max_batch_size:
                    break
            kept.extend(self._pending)
            self._pending = kept
        self._pending_rows -= rows
        return batch

    def _finish(self, batch: list[_Queued], outputs: list[np.ndarray] | BaseException,
                started: float, finished: float) -> None:
        self._busy = False
        compute_ms = (finished - started) * 1e3
        if isinstance(outputs, BaseException):
            for queued in batch:
                if not queued.future.done():
                    queued.future.set_exception(outputs)
        else:
            size = sum(queued.rows for queued in batch)
            if size == 1:
                previous = self._single_row_ms
                self._single_row_ms = compute_ms if previous is None else \
                    0.9 * previous + 0.1 * compute_ms
            names = self.model.output_names
            offset = 0
            for queued in batch:
                end = offset + queued.rows
                if not queued.future.done():
                    # A lone request takes the outputs whole: nothing to split, and an
                    # unbatched model's outputs may have no batch dimension to split on.
                    own = dict(zip(names, outputs, strict=True)) if len(batch) == 1 else \
                        {name: output[offset:end]
                         for name, output in zip(names, outputs, strict=True)}
                    timing = BatchTiming((started - queued.arrived) * 1e3, compute_ms, size)
                    queued.future.set_result((own, timing))
                offset = end
            if self.on_batch is not None:
                self.on_batch(size, compute_ms)
        self._launch()

    # -- in the worker thread ------------------------------------------------------------

    def _work(self) -> None:
        session = self.model.session
        names = self.model.output_names
        while (batch := self._jobs.get()) is not None:
            if self.cores is not None:
                self.cores.acquire()  # before `started`: the wait is queue time
            started = time.perf_counter()
            result: list[np.ndarray] | BaseException
            try:
                if len(batch) == 1:
                    feeds = batch[0].inputs
                else:
                    feeds = {name: np.concatenate([queued.inputs[name] for queued in batch])
                             for name in batch[0].inputs}
                result = session.run(names, feeds)
            except Exception as error:  # the requests get the error; the worker keeps going
                result = error
            measured = time.perf_counter() - started
            if self.compute_scale > 1:
                time.sleep((self.compute_scale - 1) * measured)
            finished = time.perf_counter()
            if self.cores is not None:
                self.cores.release()
            assert self._loop is not None
            try:
                self._loop.call_soon_threadsafe(self._finish, batch, result, started, finished)
            except RuntimeError:  # the loop closed while this batch ran
                return
