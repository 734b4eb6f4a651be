"""Connections and transactions: the base that every part of ``Store`` stands on, and the
store's errors.

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
    """Run a write verb in one BEGIN IMMEDIATE transaction, retrying while the db is locked."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        self: StoreBase = args[0]  # type: ignore[assignment]
        db = self.db
        if db.conn.in_transaction:  # nested verb: join the caller's transaction
            return fn(*args, **kwargs)
        attempts = self.write_retries + 1
        for attempt in range(1, attempts + 1):
            try:
                with self._transaction(db):
                    return fn(*args, **kwargs)
            except sqlite3.OperationalError as exc:
                if _is_full(exc):
                    raise StoreFullError(
                        f"{self.path}: the disk is full; {fn.__name__} wrote nothing (free "
                        "space, then retry)") from exc
                if not _is_locked(exc):
                    raise
                if attempt == attempts:
                    raise StoreBusyError(
                        f"{self.path} is locked by another process: {fn.__name__} waited "
                        f"{self.busy_timeout_ms} ms x {attempts} tries and wrote nothing; "
                        "stop the other writer (a long `sqlite3` session?) and retry"
                    ) from exc
                log.warning("database locked during %s (try %d/%d), retrying", fn.__name__,
                            attempt, attempts)
                time.sleep(min(0.05 * 2 ** attempt, 1.0) * (0.5 + random.random()))
        raise AssertionError("unreachable")

    return wrapper


class StoreBase:
    """Connections, transactions and the small read helpers every part of ``Store`` uses.
    Safe to share between threads (one connection per thread)."""

    def __init__(self, path: str | os.PathLike[str], *, busy_timeout_ms: int = 5000,
                 write_retries: int = 3) -> None:
        self.path = Path(path)
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

    @contextmanager
    def _transaction(self, db: Database) -> Iterator[None]:
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
                except sqlite3.ProgrammingError:  # closed from its own thread already
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
        if self.db.conn.in_transaction:
            return False
        busy = self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
        if busy:
            log.info("WAL checkpoint of %s was blocked by a reader; it truncates later",
                     self.path)
        return not busy
