"""PostgreSQL for the test suite: one server a session, one fresh database a test.

The server is the one ``GUILDTUNE_TEST_PG_URL`` names (.ci/run starts one and exports it), else a
private ``tests.pgserver.PgServer`` child started for this session, else none: the tests that
need it are skipped with ``SessionPostgres.skip_reason``. See tests/conftest.py for the fixtures.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from tests.pgserver import (
    MISSING,
    PgServer,
    create_database_at,
    drop_database_at,
    find_binaries,
    with_dbname,
)

URL_ENV = "GUILDTUNE_TEST_PG_URL"  # a maintenance database URL (its server lets us CREATE DATABASE)
DB_PREFIX = "guildtune_test_"

_names = itertools.count()


@dataclass(frozen=True)
class SessionPostgres:
    """Where this session's PostgreSQL is: ``admin_url`` (a database to run CREATE DATABASE
    from), or None and ``skip_reason``."""

    admin_url: str | None
    skip_reason: str = ""
    server: PgServer | None = None  # set when this session started its own


@contextmanager
def session_postgres(environ: dict[str, str] | None = None) -> Iterator[SessionPostgres]:
    """The session's server: ``GUILDTUNE_TEST_PG_URL``, else a private child server (stopped
    and its directory removed on exit), else ``admin_url=None`` with the reason."""
    env = os.environ if environ is None else environ
    url = env.get(URL_ENV, "")
    if url:
        yield SessionPostgres(admin_url=url)
        return
    binaries = find_binaries()
    if binaries is None:
        yield SessionPostgres(admin_url=None, skip_reason=MISSING)
        return
    # Not pytest's tmp_path: under root it is /tmp/pytest-of-root (0700), which the server's
    # own user cannot enter.
    base_dir = Path(tempfile.mkdtemp(prefix="guildtune-pg-"))
    server = PgServer(binaries)
    try:
        server.start(base_dir)
        yield SessionPostgres(admin_url=server.url(), server=server)
    finally:
        server.stop()
        shutil.rmtree(base_dir, ignore_errors=True)


def _admin_url(target: SessionPostgres | PgServer | str) -> str:
    if isinstance(target, PgServer):
        return target.url()
    if isinstance(target, SessionPostgres):
        if target.admin_url is None:
            raise RuntimeError(f"no PostgreSQL server: {target.skip_reason}")
        return target.admin_url
    return target


def unique_name(prefix: str = DB_PREFIX) -> str:
    """A database name no other test process picks: the prefix, our pid, a counter, the time."""
    return f"{prefix}{os.getpid()}_{next(_names)}_{time.time_ns() % 10**9}"


def fresh_database(target: SessionPostgres | PgServer | str,
                   template: str | None = None) -> str:
    """Create a uniquely named empty database (a copy of ``template`` when given) on
    ``target``'s server and return its URL; ``drop_fresh_database`` removes it."""
    admin_url = _admin_url(target)
    name = unique_name()
    create_database_at(admin_url, name, template)
    return with_dbname(admin_url, name)


def drop_fresh_database(target: SessionPostgres | PgServer | str, url: str) -> None:
    """Drop the database ``url`` (made by ``fresh_database``), ending sessions left open on it."""
    name = unquote(urlsplit(url).path.lstrip("/"))
    if not name.startswith(DB_PREFIX):
        raise ValueError(f"refusing to drop {name!r}: not a database fresh_database made")
    drop_database_at(_admin_url(target), name)


@contextmanager
def fresh_database_url(target: SessionPostgres | PgServer | str,
                       template: str | None = None) -> Iterator[str]:
    """``fresh_database`` for the length of a ``with`` block, dropped afterwards."""
    url = fresh_database(target, template)
    try:
        yield url
    finally:
        drop_fresh_database(target, url)
