"""SQLite as the embedded store (the registry index, the telemetry outbox and collector)."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def transaction(path: Path, schema: str = "") -> Iterator[sqlite3.Connection]:
    """One connection and one transaction: committed when the block ends, rolled back when it
    raises. Safe from any thread and any process (WAL). `BEGIN IMMEDIATE` takes the write
    lock up front, so a block that reads and then writes cannot interleave with another."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    connection = sqlite3.connect(path, timeout=30, isolation_level=None)
    try:
        connection.execute("PRAGMA journal_mode=WAL")
        if schema:
            connection.executescript(schema)
        connection.execute("BEGIN IMMEDIATE")
        try:
            yield connection
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        connection.execute("COMMIT")
    finally:
        connection.close()
