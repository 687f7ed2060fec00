"""A throwaway PostgreSQL server on loopback for the tests (Debian's `postgresql` package,
which `make test` installs as root): its own data directory, a free port, fsync off."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

from tierwise.bench.processes import free_port


def _bin_dir() -> Path | None:
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                      key=lambda path: int(path.parent.parent.name)
                      if path.parent.parent.name.isdigit() else 0)
    return versions[-1].parent if versions else None


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """The URL of a new PostgreSQL server's `postgres` database (user `tierwise`, trusted
    on loopback); RuntimeError saying why when one cannot be started here."""
    bin_dir = _bin_dir()
    if bin_dir is None:
        raise RuntimeError("no PostgreSQL server: apt-get install postgresql (`make test` "
                           "does, as root)")
    as_root = os.geteuid() == 0
    if as_root and shutil.which("runuser") is None:
        raise RuntimeError("PostgreSQL refuses to run as root, and there is no runuser")
    prefix = ["runuser", "-u", "postgres", "--"] if as_root else []
    with tempfile.TemporaryDirectory(prefix="tierwise-pg-") as scratch:
        data, sockets = Path(scratch) / "data", Path(scratch) / "sockets"
        sockets.mkdir()
        if as_root:
            shutil.chown(scratch, "postgres")
            shutil.chown(sockets, "postgres")
        done = subprocess.run([*prefix, str(bin_dir / "initdb"), "-D", str(data), "-U",
                               "tierwise", "--auth=trust", "-E", "UTF8"],
                              capture_output=True, text=True, check=False, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed: {done.stderr.strip()[-500:]}")
        port = free_port()
        options = (f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1 -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off")
        done = subprocess.run([*prefix, str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options,
                               "-l", str(Path(scratch) / "server.log"), "-w", "-t", "60",
                               "start"], capture_output=True, text=True, check=False,
                              timeout=90)
        if done.returncode != 0:
            raise RuntimeError(f"pg_ctl start failed: {done.stderr.strip()[-500:]}")
        try:
            yield f"postgresql://tierwise@127.0.0.1:{port}/postgres"
        finally:
            subprocess.run([*prefix, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast",
                            "-w", "stop"], capture_output=True, check=False, timeout=60)


def new_database(server_url: str) -> str:
    """A new, empty database on the server at `server_url`: its URL."""
    import psycopg

    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as connection:
        connection.execute(f"CREATE DATABASE {name}")
    return server_url.rsplit("/", 1)[0] + f"/{name}"
