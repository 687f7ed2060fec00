"""Active learning on the device: which inputs to keep for a label, and sending them.

`DeviceSampling` scores every inference the client answers with the configured samplers
(`tierwise.active.samplers`): the best score wins and names the sampler. An input scored at
least `min_score` is selected: copied and put in the sample queue on disk
(`tierwise.active.queue.SampleQueue`, which keeps the best `max_queued`); no other input is
stored or sent. The feedback sampler's signal comes after the answer: the inputs of the last
`keep_inputs` inferences stay in memory for it, and `client.feedback` reconsiders one.

A thread sends what the budget allows (`SampleQueue.due`: a count and bytes per sliding
window) to the label queue at the cloud (`POST /active/v1/samples`), a few at a time. A sample
leaves the queue only when the cloud took it (2xx), so a collector outage or a device restart
loses nothing; one the cloud refuses for good (400) is set aside with why. What was sent is
counted (`sent_samples`, `sent_bytes`, the client's Prometheus metrics) and the cloud counts
it per device (`/active/v1/summary`, the cost ledger's uploads).
"""

from __future__ import annotations

import collections
import logging
import ssl
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import orjson

from tierwise.active.queue import QueuedSample, SampleQueue
from tierwise.active.samplers import Combined, Observation, Sampler
from tierwise.monitor.telemetry import forward_until_stopped, post_once
from tierwise.protocol.samples import encode_sample

log = logging.getLogger("tierwise.active")
SAMPLES_PATH = "/active/v1/samples"
ANSWERS_KEPT = 1000  # which version answered, for feedback (the client's last inferences)
MAX_BATCH_BYTES = 8 * 1024 * 1024  # samples' bytes per request (the cloud takes 64 MiB,
# base64 included)
REFUSED_FOR_GOOD = (400, 413, 422)  # what sending the same request again cannot change


@dataclass(frozen=True)
class _Kept:
    """An answered input, held in memory for the feedback sampler."""

    sample: np.ndarray
    model: str  # the device model: what a label of this input would improve
    model_version: str
    answered: tuple[str, str]  # the model and version whose answer the user saw


class DeviceSampling:
    """Selection and store-and-forward of one device's samples to the label queue at `url`.

    Args:
        samplers: an input's score is the best of theirs (`Combined`; the first among
            equals names it).
        queue: the device's sample queue (its budget bounds what is sent).
        url: the cloud server; None: select and queue only (nothing is sent).
        device_id, token: who sends (the cloud API's bearer token, scope samples:write).
        min_score: the least score that selects an input, in [0, 1].
        keep_inputs: the last this many inputs stay in memory, for feedback that comes later.
        flush_s: how often the thread sends what is due (backing off to 60 s while the
            cloud cannot be reached).
        batch_size: most samples per request.
        verify: the TLS context an https cloud is verified with.
        gate: while it returns False, only the user's feedback selects (`active.on_drift`:
            until the device's drift detector has raised an alert).
        on_sent: called with (samples, bytes) the cloud took (the client's metrics).
    """

    def __init__(self, samplers: Sequence[Sampler], queue: SampleQueue, url: str | None, *,
                 device_id: str, token: str = "", min_score: float = 0.5,
                 keep_inputs: int = 256, flush_s: float = 5.0, batch_size: int = 16,
                 timeout_s: float = 30.0, verify: ssl.SSLContext | bool = True,
                 gate: Callable[[], bool] | None = None,
                 on_sent: Callable[[int, int], None] | None = None) -> None:
        if not 0 <= min_score <= 1:
            raise ValueError(f"min_score: expected a score in [0, 1], got {min_score}")
        self.samplers = Combined(samplers)
        self.queue = queue
        self.url = url.rstrip("/") if url else None
        self.device_id = device_id
        self.min_score = min_score
        self.keep_inputs = keep_inputs
        self.flush_s = flush_s
        self.batch_size = batch_size
        self.gate = gate
        self.on_sent = on_sent
        self.selected = 0  # inputs a sampler selected (queued, unless already there)
        self.sent_samples = 0  # taken by the cloud
        self.sent_bytes = 0
        self.refused = 0  # set aside: the cloud refused them for good
        self.errors = 0  # samples or verdicts the queue could not take (logged)
        self.last_error: str | None = None
        self._kept: collections.OrderedDict[str, _Kept] = collections.OrderedDict()
        self._answered: collections.OrderedDict[str, tuple[str, str]] = \
            collections.OrderedDict()
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._http = httpx.Client(base_url=self.url, timeout=timeout_s, trust_env=False,
                                  verify=verify,
                                  headers={"authorization": f"Bearer {token}",
                                           "content-type": "application/json"}) \
            if self.url else None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if self._http is not None:
            self._thread = threading.Thread(target=self._run, name="tierwise-samples",
                                            daemon=True)
            self._thread.start()

    # -- selection (the request path: cheap unless selected) -----------------------------

    def consider(self, observation: Observation, sample: np.ndarray, model: str,
                 model_version: str = "", answered: tuple[str, str] | None = None) -> bool:
        """One answered inference and its input (`model`, `model_version`: the device
        model's; `answered`: the model and version that gave the answer, default the
        device model): queued if selected (True). Never raises: a queue that cannot take
        it is logged and counted (`errors`), and the answer stands."""
        kept = _Kept(sample, model, model_version, answered or (model, model_version))
        with self._lock:
            self._answered[observation.trace_id] = kept.answered
            while len(self._answered) > ANSWERS_KEPT:
                self._answered.popitem(last=False)
            if self.keep_inputs:
                self._kept[observation.trace_id] = kept
                while len(self._kept) > self.keep_inputs:
                    self._kept.popitem(last=False)
        return self._guarded(self._offer, observation, kept)

    def reconsider(self, observation: Observation) -> bool:
        """`observation` has the user's feedback now: the verdict is kept for the cloud (it
        judges the version that answered), and the input queued if it is selected now and
        still held (True). Never raises, as `consider`."""
        with self._lock:
            kept = self._kept.get(observation.trace_id)
            answered = self._answered.get(observation.trace_id)
        if observation.feedback is not None and answered is not None:
            self._guarded(self.queue.note_feedback, observation.trace_id, *answered,
                          observation.feedback.correct)
        return kept is not None and self._guarded(self._offer, observation, kept)

    def _guarded(self, step: Callable[..., Any], *args: Any) -> Any:
        try:
            return step(*args)
        except Exception as error:  # the sample is lost, never the answer
            self.errors += 1
            self.last_error = f"sample queue {self.queue.path}: {type(error).__name__}: {error}"
            log.exception("active learning could not queue a sample")
            return False

    def _offer(self, observation: Observation, kept: _Kept) -> bool:
        if observation.feedback is None and self.gate is not None and not self.gate():
            return False
        best = self.samplers.best(observation)
        if best is None or best[0] < self.min_score:
            return False
        score, sampler = best
        queued = self.queue.offer(observation, np.array(kept.sample, copy=True), sampler,
                                  score, model=kept.model, model_version=kept.model_version)
        self.selected += queued
        return queued

    # -- sending -------------------------------------------------------------------------

    def flush(self) -> bool:
        """Send the users' verdicts and every sample the budget allows now; True when the
        cloud took all of it (or nothing was due)."""
        if self._http is None:
            return True
        with self._send_lock:
            verdicts = self.queue.feedback_due()
            if verdicts:
                taken = self._send([], verdicts)
                if taken is False:
                    return False
                self.queue.feedback_sent(verdicts)  # taken, or refused for good: logged
                if taken is None:
                    log.error("the label queue refused %d verdicts, dropped: %s",
                              len(verdicts), self.last_error)
            return all(self._send_samples(batch) for batch in self._batches(self.queue.due()))

    def _batches(self, due: list[QueuedSample]) -> list[list[QueuedSample]]:
        """`due` in requests of at most `batch_size` samples and `MAX_BATCH_BYTES`."""
        batches: list[list[QueuedSample]] = []
        size = 0
        for sample in due:
            if not batches or len(batches[-1]) >= self.batch_size or \
                    size + sample.size > MAX_BATCH_BYTES:
                batches.append([])
                size = 0
            batches[-1].append(sample)
            size += sample.size
        return batches

    def _send_samples(self, batch: list[QueuedSample]) -> bool:
        """Send one batch; a batch refused (400, 413) is sent again a sample at a time, and
        only the sample refused on its own is set aside. False: try again later."""
        taken = self._send(batch, [])
        if taken is False:
            return False
        if taken is None and len(batch) > 1:
            return all(self._send_samples([sample]) for sample in batch)
        if taken is None:
            self.queue.set_aside(batch, self.last_error or "refused")
            self.refused += len(batch)
            log.error("the label queue refused sample %s, set aside in %s: %s",
                      batch[0].trace_id, self.queue.path, self.last_error)
            return True
        self.queue.mark_sent(batch)
        size = sum(sample.size for sample in batch)
        self.sent_samples += len(batch)
        self.sent_bytes += size
        if self.on_sent is not None:
            self.on_sent(len(batch), size)
        return True

    def _send(self, batch: list[QueuedSample], verdicts: list[dict[str, object]]
              ) -> bool | None:
        """True: taken; False: try again later; None: refused for good (400 or 422: this
        content; 413: too large)."""
        assert self._http is not None
        body = orjson.dumps({"device": self.device_id,
                             "samples": [upload_record(sample) for sample in batch],
                             "feedback": verdicts})
        taken, self.last_error = post_once(self._http, SAMPLES_PATH, body,
                                           f"label queue {self.url}",
                                           lambda status: status in REFUSED_FOR_GOOD)
        return taken

    def _run(self) -> None:
        forward_until_stopped(self.flush, self._stop, self.flush_s, 60.0, self._failed,
                              "samples")

    def _failed(self, error: str) -> None:
        self.last_error = error

    def close(self) -> None:
        """Stop the thread after one last attempt to send; what is not sent stays queued on
        disk for the next run."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
        try:
            self.flush()
        except Exception:  # a last try only
            log.debug("final sample flush failed", exc_info=True)
        if self._http is not None:
            self._http.close()

    def stats(self) -> dict[str, int]:
        return {"selected": self.selected, "queued": self.queue.backlog(),
                "sent_samples": self.sent_samples, "sent_bytes": self.sent_bytes,
                "refused": self.refused, "evicted": self.queue.evicted, "errors": self.errors}


def upload_record(sample: QueuedSample) -> dict[str, object]:
    """`sample` as the label queue takes it (`tierwise.protocol.samples.SampleRecord`)."""
    observation = sample.observation
    feedback = observation.get("feedback")
    digest, data = encode_sample(sample.sample)
    return {"trace_id": sample.trace_id, "sampler": sample.sampler,
            "score": min(max(sample.score, 0.0), 1.0),
            "model": observation.get("model") or "unknown",
            "model_version": observation.get("model_version") or "",
            "confidence": observation.get("confidence"),
            "device_label": observation.get("device_label"),
            "server_label": observation.get("server_label"),
            "feedback_correct": feedback.get("correct") if feedback else None,
            "feedback_label": feedback.get("label") if feedback else None,
            "classes": observation.get("classes") or 0, "sha256": digest, "data": data}
