"""Connections and transactions: the base that every part of ``Store`` stands on, and the
store's errors. This is SQLite's (sqlite-utils); ``postgres.PostgresStore`` overrides the hooks
marked "dialect" below for a PostgreSQL server, and every verb above them is the same SQL.

Threading: each thread gets its own connection (sqlite3 connections cannot cross threads), all
opened with WAL, ``foreign_keys=ON`` and a busy timeout. Writes run in ``BEGIN IMMEDIATE``
transactions, so a writer waits for the lock up front instead of failing half-way; when the
database stays locked past the busy timeout, the write is retried, then ``StoreBusyError`` says so
(never a silent drop).
"""

from __future__ import annotations

import functools
import logging
import os
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ParamSpec, Self, TypeVar

from sqlite_utils import Database

from .migrations import migrations

# One logger for every part of the store, under the name it had before the store was split
# into modules: log lines, and the filters operators wrote for them, stay the same.
log = logging.getLogger("storage.store")

P = ParamSpec("P")
T = TypeVar("T")


class StoreError(RuntimeError):
    """A store operation that cannot be done; the message says why."""


class StoreBusyError(StoreError):
    """The database stayed locked by another connection past the busy timeout and retries."""


class StoreFullError(StoreError):
    """The disk (or the database's size limit) is full: the write was not made."""


class ConsentChangedError(StoreError):
    """A version whose training data includes a member who has since been forgotten, opted out
    or opted in again after the data was read: it is never registered nor served."""


def _is_locked(exc: sqlite3.OperationalError) -> bool:
    msg = str(exc).lower()
    return "locked" in msg or "busy" in msg


def _is_full(exc: BaseException) -> bool:
    return ("database or disk is full" in str(exc).lower() or
            getattr(exc, "errno", None) == 28)  # ENOSPC


def _writes(fn: Callable[P, T]) -> Callable[P, T]:
    """Run a write verb in one write transaction (SQLite: BEGIN IMMEDIATE; PostgreSQL: one
    that holds the store's write lock), retrying while the database is busy."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        self: StoreBase = args[0]  # type: ignore[assignment]
        if self._joins_transaction():  # nested verb: join the caller's transaction
            return fn(*args, **kwargs)
        attempts = self.write_retries + 1
        for attempt in range(1, attempts + 1):
            try:
                with self._transaction(self.db, serialize="shared" if getattr(
                        fn, "row_locks", False) else True):
                    return fn(*args, **kwargs)
            except self._db_errors as exc:
                kind = self._error_kind(exc)
                if kind == "full":
                    raise StoreFullError(
                        f"{self.where}: the disk is full; {fn.__name__} wrote nothing (free "
                        "space, then retry)") from exc
                if kind == "unknown":  # the server may have committed it: never run it twice
                    raise StoreError(
                        f"{self.where}: the connection was lost while {fn.__name__} committed; "
                        "it may or may not have been written (check, then retry)") from exc
                if kind not in ("busy", "reconnect"):
                    raise
                if attempt == attempts and kind == "reconnect":
                    raise StoreError(f"{self.where}: lost the connection to the database server "
                                     f"{attempts} times; {fn.__name__} wrote nothing") from exc
                if attempt == attempts:
                    raise StoreBusyError(self._busy_message(fn.__name__, attempts)) from exc
                log.warning("database %s during %s (try %d/%d), retrying",
                            "busy" if kind == "busy" else "connection lost", fn.__name__,
                            attempt, attempts)
                if kind == "reconnect":  # a server restarting: give it seconds, not milliseconds
                    self._drop_connection()
                    time.sleep(min(0.5 * 2 ** attempt, 5.0) * (0.5 + random.random()))
                else:
                    time.sleep(min(0.05 * 2 ** attempt, 1.0) * (0.5 + random.random()))
        raise AssertionError("unreachable")

    return wrapper


def row_locks(fn: Callable[P, T]) -> Callable[P, T]:
    """Mark a write verb whose rows lock themselves (``SELECT ... FOR UPDATE SKIP LOCKED`` on
    PostgreSQL, see ``_claim_filter``): it holds the store's write lock shared, so such verbs
    run side by side while every other write still excludes them. SQLite has one writer."""
    fn.row_locks = True  # type: ignore[attr-defined]
    return fn


# ``created_utc`` in the stored form (storage.times), as a GLOB pattern.
STORED_FORM_GLOB = ("[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:"
                    "[0-9][0-9].[0-9][0-9][0-9]Z")


class StoreBase:
    """Connections, transactions and the small read helpers every part of ``Store`` uses.
    Safe to share between threads (one connection per thread)."""

    backend = "sqlite"
    # dialect: the driver's errors a write may retry or explain (see ``_error_kind``)
    _db_errors: tuple[type[BaseException], ...] = (sqlite3.OperationalError,)
    # dialect: what closing a connection may raise that ``close`` lets pass
    _close_errors: tuple[type[BaseException], ...] = (sqlite3.ProgrammingError,)

    def __init__(self, path: str | os.PathLike[str], *, busy_timeout_ms: int = 5000,
                 write_retries: int = 3) -> None:
        self.path = Path(path)
        self.where = str(self.path)  # how messages name the database
        self.busy_timeout_ms = busy_timeout_ms
        self.write_retries = write_retries
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()

    # -- connections ---------------------------------------------------------------------------

    @property
    def db(self) -> Database:
        """This thread's connection, opened on first use."""
        db = getattr(self._local, "db", None)
        if db is None:
            conn = sqlite3.connect(self.path, timeout=self.busy_timeout_ms / 1000,
                                   isolation_level=None)
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
            conn.execute("PRAGMA foreign_keys = ON")
            # Deleted rows are overwritten with zeros, not left in free pages: forgotten text
            # must not stay readable in the file (SQLite's default keeps it until reused).
            conn.execute("PRAGMA secure_delete = ON")
            # WAL + NORMAL: a killed process loses nothing committed; only power loss can drop
            # the last transactions, which FULL would cost ~6x in write throughput to prevent.
            conn.execute("PRAGMA synchronous = NORMAL")
            db = Database(conn)
            self._local.db = db
            with self._lock:
                self._all.append(conn)
        return db

    # -- dialect -------------------------------------------------------------------------------

    def _error_kind(self, exc: BaseException) -> str | None:
        """"full", "busy" (retry), "reconnect" (retry on a new connection), "unknown" (lost
        while committing: may have been written) or None (raise as is)."""
        if _is_full(exc):
            return "full"
        return "busy" if _is_locked(exc) else None  # type: ignore[arg-type]

    def _busy_message(self, verb: str, attempts: int) -> str:
        return (f"{self.path} is locked by another process: {verb} waited "
                f"{self.busy_timeout_ms} ms x {attempts} tries and wrote nothing; "
                "stop the other writer (a long `sqlite3` session?) and retry")

    def _drop_connection(self) -> None:
        """Forget this thread's connection (a lost server connection); SQLite has none to lose."""

    def _joins_transaction(self) -> bool:
        """Whether this thread is inside a write transaction already (a nested verb)."""
        return self.db.conn.in_transaction

    def _claim_filter(self) -> str:
        """What a claim's SELECT appends to lock the row it takes (none: one writer)."""
        return ""

    def _stored_form(self, column: str) -> str:
        """SQL true when ``column`` holds a time in the stored form (storage.times)."""
        return f"{column} GLOB '{STORED_FORM_GLOB}'"

    @contextmanager
    def _transaction(self, db: Database, serialize: bool | str = True) -> Iterator[None]:
        db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            if db.conn.in_transaction:
                db.execute("ROLLBACK")
            raise
        else:
            db.execute("COMMIT")

    def migrate(self) -> list[str]:
        """Apply pending migrations (under the write lock, so two processes cannot race)."""
        db = self.db
        if db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            db.execute("PRAGMA journal_mode = WAL")
        with self._transaction(db):
            pending = [m.name for m in migrations.pending(db)]
            migrations.apply(db)
        return pending

    def close(self) -> None:
        """Close every thread's connection."""
        with self._lock:
            for conn in self._all:
                try:
                    conn.close()
                except self._close_errors:  # closed from its own thread already, or broken
                    pass
            self._all.clear()
        self._local = threading.local()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _rows(self, sql: str, params: Iterable[Any] = ()) -> list[dict[str, Any]]:
        cur = self.db.execute(sql, list(params))
        cols = [c[0] for c in cur.description]
        return [dict(zip(cols, row)) for row in cur.fetchall()]

    def _one(self, sql: str, params: Iterable[Any] = ()) -> dict[str, Any] | None:
        rows = self._rows(sql, params)
        return rows[0] if rows else None

    def _scalar(self, sql: str, params: Iterable[Any] = ()) -> Any:
        row = self.db.execute(sql, list(params)).fetchone()
        return row[0] if row else None

    def checkpoint(self) -> bool:
        """Fold the WAL into the database and truncate it, so deleted text does not stay in
        the -wal file. False when another connection's reader kept it from completing (the
        WAL is then reused, overwriting those frames, as writes go on)."""
        if self._joins_transaction():
            return False
        busy = self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
        if busy:
            log.info("WAL checkpoint of %s was blocked by a reader; it truncates later",
                     self.path)
        return not busy
