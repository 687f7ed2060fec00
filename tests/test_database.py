"""The shared-state layer on both backends: an SQLite file and a real PostgreSQL server on
loopback (the same SQL, `?` placeholders, ON CONFLICT, serial keys, serialized writers)."""

from __future__ import annotations

import threading

import pytest

from tierwise.database import Database, DatabaseError, redacted

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (id {serial}, what TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


def test_the_same_sql_runs_on_both_backends(database_location: str) -> None:
    store = Database(database_location, SCHEMA, "test-store")
    with store.transaction() as db:
        db.execute("INSERT INTO events (what) VALUES (?)", ("a",))
        db.execute("INSERT INTO events (what) VALUES (?)", ("b",))
        changed = db.executemany("INSERT INTO counters VALUES (?, ?) ON CONFLICT (name) DO "
                                 "NOTHING", [("x", 1), ("y", 2), ("x", 3)])
    assert changed == 2  # the second x was a conflict
    with store.transaction() as db:
        db.execute("DELETE FROM events WHERE what = ?", ("b",))
        db.execute("INSERT INTO events (what) VALUES (?)", ("c",))
        ids = [row[0] for row in db.execute("SELECT id FROM events ORDER BY id")]
        assert db.execute("SELECT value FROM counters WHERE name = ?", ("x",)).fetchone() == (1,)
    assert ids == [1, 3]  # a deleted id is never given again
    with pytest.raises(ZeroDivisionError), store.transaction() as db:
        db.execute("INSERT INTO events (what) VALUES (?)", ("rolled back",))
        raise ZeroDivisionError
    with store.transaction(write=False) as db:
        assert db.execute("SELECT COUNT(*) FROM events").fetchone() == (2,)


def test_writers_are_serialized_across_connections(database_location: str) -> None:
    # read, then write: without the store's lock, increments would be lost
    store = Database(database_location, SCHEMA, "test-store")
    with store.transaction() as db:
        db.execute("INSERT INTO counters VALUES ('n', 0)")

    def bump() -> None:
        mine = Database(database_location, SCHEMA, "test-store")  # its own, as a process
        for _ in range(25):
            with mine.transaction() as db:
                (value,) = db.execute("SELECT value FROM counters WHERE name = 'n'").fetchone()
                db.execute("UPDATE counters SET value = ? WHERE name = 'n'", (value + 1,))

    threads = [threading.Thread(target=bump) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    with store.transaction(write=False) as db:
        assert db.execute("SELECT value FROM counters WHERE name = 'n'").fetchone() == (100,)


def test_a_store_of_another_schema_version_is_refused_by_name(database_location: str) -> None:
    with Database(database_location, SCHEMA, "test-store", version=1).transaction():
        pass
    newer = Database(database_location, SCHEMA, "test-store", version=2)
    with pytest.raises(DatabaseError, match="schema version 1; this tierwise reads version 2"), \
            newer.transaction():
        pass


def test_a_postgres_url_that_does_not_connect_is_named_without_its_password() -> None:
    from tierwise.bench.processes import free_port

    url = f"postgresql://admin:s3cret@127.0.0.1:{free_port()}/registry"
    with pytest.raises(DatabaseError) as raised, Database(url, SCHEMA, "test-store").transaction():
        pass
    message = str(raised.value)
    print(message)
    assert "cannot connect" in message and "s3cret" not in message
    assert "postgresql://admin:***@127.0.0.1" in message
    assert redacted("postgresql://u@h/d") == "postgresql://u@h/d"


def test_stores_made_at_once_in_one_postgres_database_do_not_collide(
        postgres_server_url: str) -> None:
    # CREATE TABLE IF NOT EXISTS races itself in PostgreSQL; the schema lock prevents it
    from postgres import new_database

    errors: list[BaseException] = []
    for _ in range(3):
        url = new_database(postgres_server_url)

        def make(name: str, url: str = url) -> None:
            try:
                with Database(url, SCHEMA, name).transaction() as db:
                    db.execute("INSERT INTO events (what) VALUES (?)", (name,))
            except BaseException as error:
                errors.append(error)

        threads = [threading.Thread(target=make, args=(f"store-{i}",)) for i in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, errors


def test_a_password_is_hidden_wherever_the_url_carries_it() -> None:
    assert redacted("postgresql://u:pw@h/d") == "postgresql://u:***@h/d"
    assert redacted("postgresql://u@h/d?password=pw&sslmode=x") == \
        "postgresql://u@h/d?password=***&sslmode=x"
    assert redacted('invalid token "se%zzcret"', "postgresql://u:se%zzcret@h/d") == \
        'invalid token "***"'
