"""Telemetry from the device: every trace reaches the collector exactly once, eventually.

`Telemetry.record` (on the request path) only appends the trace to a list in memory. One
background thread commits what was recorded to an outbox, a SQLite file on the device, at
most `commit_s` (default 50 ms) after it was recorded, in one transaction for everything
recorded meanwhile (group commit, as databases do with their logs): a device process killed
at any moment loses at most the traces of its last `commit_s` and the commit under way,
whatever the link does. Another thread sends the outbox in batches to the collector
(`POST /telemetry/v1/traces` on the cloud server), on its own schedule and backoff. A
batch leaves the outbox only once the collector answered 2xx, so a link outage or
a collector that restarts loses nothing: the batch is sent again, with backoff, until it is
taken. The collector stores each trace id once, so a batch sent twice (its answer lost) is
not stored twice. What the device sends is the trace, with two statistics of the input (mean
and standard deviation of its pixels), never the input itself.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import orjson

from tierwise.database import Connection, Database

if TYPE_CHECKING:  # the client imports this module
    from tierwise.client.trace import Trace

log = logging.getLogger("tierwise.telemetry")

TRACES_PATH = "/telemetry/v1/traces"
_OUTBOX_SCHEMA = """CREATE TABLE IF NOT EXISTS outbox (
    seq {serial}, id TEXT UNIQUE NOT NULL, record {blob} NOT NULL);
CREATE TABLE IF NOT EXISTS refused (
    seq INTEGER PRIMARY KEY, id TEXT NOT NULL, record {blob} NOT NULL);"""


def forward_until_stopped(flush: Callable[[], bool], stop: threading.Event, every_s: float,
                          max_backoff_s: float, failed: Callable[[str], None],
                          what: str) -> None:
    """Store-and-forward's sending loop: `flush` every `every_s` seconds until `stop` is set,
    the wait doubling (up to `max_backoff_s`) while it fails: returns False, or raises (then
    `failed` gets why, and the loop goes on)."""
    wait_s = every_s
    while not stop.wait(wait_s):
        try:
            taken = flush()
        except Exception as error:  # never let sending end: say why, try again
            failed(f"{type(error).__name__}: {error}")
            log.exception("%s: sending failed", what)
            taken = False
        wait_s = every_s if taken else min(wait_s * 2, max_backoff_s)


def post_once(http: httpx.Client, path: str, body: bytes, who: str,
              refused_for_good: Callable[[int], bool]) -> tuple[bool | None, str | None]:
    """Store-and-forward's one send of `body` to `path`: (True: taken, False: try again
    later, None: refused for good, as `refused_for_good` says of the status; the error, or
    None when taken)."""
    try:
        answer = http.post(path, content=body)
    except httpx.HTTPError as error:
        return False, f"{who}: {type(error).__name__}: {error}"
    if answer.status_code // 100 == 2:
        return True, None
    error_text = f"{who} answered {answer.status_code}: {answer.text[:200]}"
    return (None if refused_for_good(answer.status_code) else False), error_text


class Telemetry:
    """Store-and-forward of traces from one device to the collector at `url`.

    Args:
        url: the collector (the cloud server), e.g. http://127.0.0.1:8001.
        device_id: whose traces these are.
        token: the cloud API's bearer token.
        outbox_path: the SQLite file that holds what is not yet taken.
        flush_s: how often the sending thread sends the outbox (default 0.5; backing off
            to 10 s while the collector cannot be reached).
        batch_size: most traces per request (default 500).
        commit_s: the durability bound: a recorded trace is in the outbox on disk within
            this many seconds plus one commit (default 0.05).
        verify: the TLS context an https collector is verified with (`tierwise.net.tls`).
    """

    def __init__(self, url: str, *, device_id: str, token: str, outbox_path: Path,
                 flush_s: float = 0.5, batch_size: int = 500, timeout_s: float = 10.0,
                 commit_s: float = 0.05, verify: ssl.SSLContext | bool = True) -> None:
        self.url = url.rstrip("/")
        self.device_id = device_id
        self.outbox_path = Path(outbox_path)
        self._outbox = Database(self.outbox_path, _OUTBOX_SCHEMA, "outbox")
        self.flush_s = flush_s
        self.batch_size = batch_size
        self.commit_s = commit_s
        self.sent = 0  # traces the collector has taken
        self.commits = 0  # transactions that moved recorded traces to the outbox
        self.committed = 0  # traces they moved
        self.commit_seconds = 0.0  # time the commits took, all together
        self.last_error: str | None = None
        self._pending: list[tuple[str, bytes]] = []  # (trace id, encoded trace)
        self._pending_lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._http = httpx.Client(base_url=self.url, timeout=timeout_s, trust_env=False,
                                  verify=verify,
                                  headers={"authorization": f"Bearer {token}",
                                           "content-type": "application/json"})
        with self._db():
            pass  # create the outbox now: a bad path fails here, not in the thread
        self._stop = threading.Event()
        self._recorded = threading.Event()  # set when there is something to commit
        self._committer = threading.Thread(target=self._commit_loop,
                                           name="tierwise-telemetry-commit", daemon=True)
        self._thread = threading.Thread(target=self._run, name="tierwise-telemetry",
                                        daemon=True)
        self._committer.start()
        self._thread.start()

    def record(self, trace: Trace) -> None:
        """Queue one inference's trace (cheap: the threads do the rest)."""
        encoded = orjson.dumps(trace.to_dict())
        with self._pending_lock:
            self._pending.append((trace.id, encoded))
        self._recorded.set()

    def backlog(self) -> int:
        """Traces recorded and not yet taken by the collector."""
        with self._pending_lock:
            pending = len(self._pending)
        with self._db() as db:
            row = db.execute("SELECT COUNT(*) FROM outbox").fetchone()
        assert row is not None  # an aggregate query always gives one row
        return pending + int(row[0])

    def flush(self) -> bool:
        """Move what was recorded to the outbox and send all of it now; True when the
        collector took everything."""
        self._spool()
        with self._send_lock:
            while True:
                with self._db() as db:
                    rows = db.execute("SELECT seq, record FROM outbox ORDER BY seq LIMIT ?",
                                      (self.batch_size,)).fetchall()
                if not rows:
                    return True
                taken = self._send([record for _, record in rows])
                if taken is None:  # refused for good: set aside, so later traces still go
                    with self._db() as db:
                        db.execute("INSERT INTO refused SELECT * FROM outbox WHERE seq <= ?",
                                   (rows[-1][0],))
                        db.execute("DELETE FROM outbox WHERE seq <= ?", (rows[-1][0],))
                    log.error("collector refused %d traces, kept in the outbox's `refused` "
                              "table: %s", len(rows), self.last_error)
                    continue
                if not taken:
                    return False
                with self._db() as db:
                    db.execute("DELETE FROM outbox WHERE seq <= ?", (rows[-1][0],))
                self.sent += len(rows)

    def close(self) -> None:
        """Stop the thread after one last attempt to send; what is not sent stays in the
        outbox for the next run."""
        self._stop.set()
        self._recorded.set()
        self._committer.join(timeout=30)
        self._thread.join(timeout=30)
        self._spool()
        self._http.close()

    # -- the threads --------------------------------------------------------------------

    def _commit_loop(self) -> None:
        """Group commit: wait for a trace, commit everything recorded by then in one
        transaction, and let the next ones gather for at most `commit_s`."""
        while True:
            self._recorded.wait()
            if self._stop.is_set():
                return  # close() commits what is left
            self._recorded.clear()
            try:
                self._spool()
            except Exception as error:  # kept in memory by _spool; say why, try again
                self.last_error = f"outbox {self.outbox_path}: {type(error).__name__}: {error}"
                log.exception("telemetry commit failed")
                self._recorded.set()
            self._stop.wait(self.commit_s)

    def _run(self) -> None:
        forward_until_stopped(self.flush, self._stop, self.flush_s, 10.0, self._failed,
                              "telemetry")
        try:
            self.flush()
        except Exception:  # a last try only
            log.debug("final telemetry flush failed", exc_info=True)

    def _failed(self, error: str) -> None:
        self.last_error = error

    def _spool(self) -> None:
        with self._pending_lock:
            pending, self._pending = self._pending, []
        if not pending:
            return
        try:
            started = time.perf_counter()
            with self._db() as db:
                db.executemany("INSERT INTO outbox (id, record) VALUES (?, ?) ON CONFLICT (id) "
                               "DO NOTHING", pending)
            self.commit_seconds += time.perf_counter() - started
            self.commits += 1
            self.committed += len(pending)
        except BaseException:  # the outbox could not take them: keep them in memory
            with self._pending_lock:
                self._pending[:0] = pending
            raise

    def _send(self, records: list[bytes]) -> bool | None:
        """True: taken; False: try again later; None: refused for good (a 4xx that sending
        again cannot change)."""
        body = b'{"device":' + orjson.dumps(self.device_id) + b',"traces":[' + \
            b",".join(records) + b"]}"
        taken, self.last_error = post_once(
            self._http, TRACES_PATH, body, f"collector {self.url}",
            lambda status: 400 <= status < 500 and status not in (401, 403, 408, 429))
        return taken

    def _db(self) -> contextlib.AbstractContextManager[Connection]:
        return self._outbox.transaction()
