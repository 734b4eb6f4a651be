"""A private PostgreSQL server for the benchmarks, with durable settings.

The tests' server (tests/pgserver.py) turns fsync, synchronous_commit and full_page_writes off
for speed; a benchmark of the store must not, or PostgreSQL would be measured without the disk
flushes SQLite pays for. This server turns all three back on. ``synchronous_commit`` is also set
per database: "off" is the closer match to SQLite's WAL + ``synchronous=NORMAL`` (a crash of the
machine, not of the process, can drop the last commits; nothing is corrupted), so the benchmarks
measure a database of each kind on the same server.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.pgserver import PgServer, create_database_at, find_binaries  # noqa: E402

# Over tests/pgserver.py's SETTINGS (the rest stay: unix socket only, 300 connections).
DURABLE = {"fsync": "on", "synchronous_commit": "on", "full_page_writes": "on"}
SHOWN = ("server_version", "fsync", "synchronous_commit", "full_page_writes", "wal_level",
         "shared_buffers", "max_wal_size", "checkpoint_timeout")


def available() -> bool:
    """Whether a PostgreSQL server binary (initdb + postgres) is installed."""
    return find_binaries() is not None


@contextmanager
def durable_postgres() -> Iterator[PgServer]:
    """A private server with fsync, synchronous_commit and full_page_writes on; stopped and its
    directory removed on exit."""
    base_dir = Path(tempfile.mkdtemp(prefix="gt-benchpg-"))  # short: the socket path is capped
    server = PgServer(settings=DURABLE)
    try:
        server.start(base_dir)
        yield server
    finally:
        server.stop()
        shutil.rmtree(base_dir, ignore_errors=True)


def new_database(server: PgServer, name: str, synchronous_commit: str = "on",
                 template: str | None = None) -> str:
    """Create database ``name`` (a copy of ``template`` when given) whose sessions run with
    ``synchronous_commit``; returns its URL."""
    import psycopg
    from psycopg import sql

    create_database_at(server.url(), name, template)
    with psycopg.connect(server.url(), autocommit=True) as conn:
        conn.execute(sql.SQL("ALTER DATABASE {} SET synchronous_commit = {}").format(
            sql.Identifier(name), sql.Literal(synchronous_commit)))
    return server.url(name)


def settings_of(url: str) -> dict[str, Any]:
    """What a session on ``url`` runs with (for the results)."""
    import psycopg

    with psycopg.connect(url) as conn:
        return {k: conn.execute(f"SHOW {k}").fetchone()[0] for k in SHOWN}
