"""The store on a PostgreSQL server (``storage.url = "postgresql://..."``): for deployments that
span hosts (bot shards and training workers on several machines), where SQLite's file locking
cannot be trusted (its documentation warns against network filesystems).

Every verb of ``Store`` is the same Python and the same SQL; only the hooks of ``db.StoreBase``
marked "dialect" change here:

- **Connections**: one per thread (as for SQLite), autocommit outside write transactions, opened
  on first use and reopened after a lost connection (a write retries on the new one).
- **Writes**: a write verb runs in one transaction that first takes the store's write lock
  (``pg_advisory_xact_lock``): writers are serialized exactly as SQLite's ``BEGIN IMMEDIATE``
  serializes them, so every check-then-write rule (consent gating, one open run and one active
  version per guild, forget in one transaction) holds with the same semantics; readers never
  wait. The one exception is ``claim_run``: it holds the lock *shared* and takes the oldest
  queued run with ``SELECT ... FOR UPDATE SKIP LOCKED``, so claims of workers on several hosts
  run side by side and never get the same run, while any other write still excludes them (a
  forget always sees a run claimed before it). ``busy_timeout_ms`` becomes ``lock_timeout``.
  A connection lost while a COMMIT was under way is an error that says the write may have
  been made (never retried into a twin); one lost before is retried on a new connection,
  waiting seconds for a restarting server; a read outside a transaction is retried once.
- **SQL**: ``?`` placeholders become psycopg's ``%s``; ``instr()`` is a SQL function created by
  the first migration; a stored-form time is matched with a regular expression instead of GLOB.
- **After a forget**: ``VACUUM`` of the members' tables instead of SQLite's WAL checkpoint
  (PostgreSQL keeps deleted row versions until VACUUM removes them; it does not zero them).
- **Not here**: backup and restore (use ``pg_dump``/``pg_restore``, see the README).
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from .db import StoreBusyError, StoreError
from .pg_migrations import MIGRATIONS_TABLE, PG_MIGRATIONS

log = logging.getLogger("storage.store")

URL_SCHEMES = ("postgresql://", "postgres://")
# The key of the store's write lock (pg_advisory_xact_lock); advisory locks are per database.
WRITE_LOCK_KEY = 0x6775696C64  # "guild"
# The tables that hold what members wrote or did (VACUUMed after a forget or a purge).
MEMBER_TABLES = ("interactions", "messages", "feedback", "corrections", "consents")
STORED_FORM_RE = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{3}Z$"


def is_postgres_url(target: object) -> bool:
    """Whether ``target`` (``storage.url``, or what ``open_store`` gets) names a PostgreSQL
    database rather than a SQLite file; the scheme in any case."""
    return isinstance(target, str) and target.lower().startswith(URL_SCHEMES)


_QUERY_SECRET = re.compile(r"([?&](?:ssl)?password=)[^&#]*", re.IGNORECASE)


def redact_url(url: str) -> str:
    """The URL without its password (in the user part or as a ``password=`` parameter), for
    messages, logs and config snapshots."""
    url = _QUERY_SECRET.sub(r"\1***", url)
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:  # a malformed port and the like: hide everything before the host
        return re.sub(r"//[^@/]*@", "//***@", url)
    if password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


class StoreUnavailableError(StoreError):
    """The database server cannot be reached (down, restarting, or the URL is wrong)."""


class CommitUnknownError(StoreError):
    """The connection was lost while a COMMIT was on its way: it may have been applied."""


def _first_line(exc: BaseException) -> str:
    """An error's first line, for a one-line message."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else repr(exc)


def _connect(url: str, **kwargs: Any) -> Any:
    """A new psycopg connection to ``url``, or StoreUnavailableError saying why not (the
    password left out). The scheme in lower case: libpq knows no other."""
    psycopg = _psycopg()
    scheme, sep, rest = url.partition("://")
    try:
        return psycopg.connect(scheme.lower() + sep + rest, connect_timeout=10, **kwargs)
    except psycopg.OperationalError as exc:
        raise StoreUnavailableError(f"cannot connect to {redact_url(url)}: "
                                    f"{redact_url(_first_line(exc))}") from None


def _psycopg() -> Any:
    try:
        import psycopg
    except ImportError:
        raise StoreError("storage.url is a PostgreSQL URL but psycopg is not installed: "
                         "pip install 'guildtune[postgres]'") from None
    return psycopg


_TOKENS = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|\?|%")


def pg_sql(sql: str) -> str:
    """SQLite's ``?`` placeholders as psycopg's ``%s`` (outside quoted literals and
    identifiers), and every ``%`` as ``%%`` (psycopg reads ``%`` even inside literals)."""
    def swap(m: re.Match[str]) -> str:
        tok = m.group(0)
        return "%s" if tok == "?" else tok.replace("%", "%%")
    return _TOKENS.sub(swap, sql)


class _Cursor:
    """A psycopg cursor that takes the store's SQL (``?`` placeholders)."""

    def __init__(self, cur: Any) -> None:
        self._cur = cur

    def execute(self, sql: str, params: Sequence[Any] = ()) -> _Cursor:
        self._cur.execute(pg_sql(sql), list(params))
        return self

    def executemany(self, sql: str, seq: Iterable[Sequence[Any]]) -> _Cursor:
        rows = [list(r) for r in seq]
        if rows:
            self._cur.executemany(pg_sql(sql), rows)
        return self

    def __getattr__(self, name: str) -> Any:  # rowcount, fetchone, fetchall, description
        return getattr(self._cur, name)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._cur)


class PgDb:
    """This thread's PostgreSQL connection, with the surface the store's verbs use of
    sqlite-utils' ``Database``: ``execute`` and ``conn.executemany/cursor/in_transaction``."""

    def __init__(self, conn: Any, reopen: Any = None) -> None:
        self.raw = conn
        self.conn = self  # verbs write ``db.conn.executemany``, as with sqlite3
        self._reopen = reopen  # () -> PgDb: this thread's new connection

    def execute(self, sql: str, params: Sequence[Any] = ()) -> _Cursor:
        """Run one statement. A read outside a transaction on a connection the server dropped
        (a restart, an idle kill) is run again once on a new connection: it changes nothing."""
        idle_read = self._reopen is not None and not self.in_transaction and \
            sql.lstrip()[:6].upper() == "SELECT"
        try:
            return _Cursor(self.raw.cursor()).execute(sql, params)
        except _psycopg().OperationalError:
            if not (idle_read and _broken(self.raw)):
                raise
        log.warning("database connection lost during a read; reconnecting")
        return self._reopen().execute(sql, params)

    def executemany(self, sql: str, seq: Iterable[Sequence[Any]]) -> _Cursor:
        return _Cursor(self.raw.cursor()).executemany(sql, seq)

    def cursor(self) -> _Cursor:
        return _Cursor(self.raw.cursor())

    @property
    def in_transaction(self) -> bool:
        from psycopg.pq import TransactionStatus
        return self.raw.info.transaction_status != TransactionStatus.IDLE

    def close(self) -> None:
        self.raw.close()


def _adapt(conn: Any) -> None:
    """Send Python values as SQLite stores them: a bool as the integer 0/1 (every flag column
    is INTEGER), and text with NUL characters (which PostgreSQL text cannot hold) with U+FFFD
    in their place (member text never has them: ``text._clip`` removes them first)."""
    from psycopg.types.numeric import Int8Dumper
    from psycopg.types.string import StrDumperUnknown

    class NulSafeStr(StrDumperUnknown):
        def dump(self, obj: str) -> Any:
            return super().dump(obj.replace("\x00", "\ufffd") if "\x00" in obj else obj)

    class BoolAsInt(Int8Dumper):
        def dump(self, obj: bool) -> Any:
            return super().dump(int(obj))

    conn.adapters.register_dumper(str, NulSafeStr)
    conn.adapters.register_dumper(bool, BoolAsInt)


def _broken(conn: Any) -> bool:
    return bool(conn.closed or getattr(conn, "broken", False))


@functools.cache
def postgres_store_class(base: type) -> type:
    """``Store`` with the PostgreSQL dialect (built from ``Store`` by ``open_store``, so this
    module does not import it)."""

    class PostgresStore(base):  # type: ignore[misc, valid-type]
        """All SQL of guildtune, on a PostgreSQL server. Safe to share between threads."""

        backend = "postgresql"
        _close_errors = (Exception,)  # a connection the server dropped

        def __init__(self, url: str, *, busy_timeout_ms: int = 5000,
                     write_retries: int = 3) -> None:
            psycopg = _psycopg()
            super().__init__(url, busy_timeout_ms=busy_timeout_ms, write_retries=write_retries)
            self.path = None  # type: ignore[assignment]  # no file: see ``where``
            self.url = url
            self.where = redact_url(url)
            self._db_errors = (psycopg.Error, StoreUnavailableError, CommitUnknownError)
            self._errors = psycopg.errors

        # -- connections -------------------------------------------------------------------

        @property
        def db(self) -> PgDb:  # type: ignore[override]
            db = getattr(self._local, "db", None)
            if db is not None and _broken(db.raw):
                self._drop_connection()
                db = None
            if db is None:
                conn = _connect(self.url, autocommit=True)
                _adapt(conn)
                conn.execute(f"SET lock_timeout = {int(self.busy_timeout_ms)}")
                db = PgDb(conn, reopen=self._reopen)
                self._local.db = db
                with self._lock:
                    self._all.append(conn)
            return db

        def _reopen(self) -> PgDb:
            self._drop_connection()
            return self.db

        def _drop_connection(self) -> None:
            db = getattr(self._local, "db", None)
            self._local.db = None
            if db is not None:
                with self._lock:
                    if db.raw in self._all:
                        self._all.remove(db.raw)
                try:
                    db.raw.close()
                except Exception:  # noqa: BLE001 - it is already broken
                    pass

        # -- dialect -----------------------------------------------------------------------

        def _error_kind(self, exc: BaseException) -> str | None:
            e = self._errors
            if isinstance(exc, CommitUnknownError):
                return "unknown"
            if isinstance(exc, StoreUnavailableError):
                return "reconnect"
            if isinstance(exc, e.DiskFull):
                return "full"
            if isinstance(exc, (e.SerializationFailure, e.DeadlockDetected,
                                e.LockNotAvailable)):
                return "busy"
            db = getattr(self._local, "db", None)
            if isinstance(exc, e.OperationalError) and (db is None or _broken(db.raw)):
                return "reconnect"
            return None

        def _busy_message(self, verb: str, attempts: int) -> str:
            return (f"{self.where} is busy: {verb} waited {self.busy_timeout_ms} ms for the "
                    f"write lock x {attempts} tries and wrote nothing; look for a long "
                    "transaction holding it (pg_stat_activity) and retry")

        def _joins_transaction(self) -> bool:
            db = getattr(self._local, "db", None)  # no connection yet: no transaction either
            return db is not None and not _broken(db.raw) and db.in_transaction

        def _stored_form(self, column: str) -> str:
            return f"{column} ~ '{STORED_FORM_RE}'"

        @contextmanager
        def _transaction(self, db: Any, serialize: bool | str = True) -> Iterator[None]:
            # Writers exclusive, claims shared: a claim waits for every other write (so a forget
            # sees a run claimed before it, and a claim sees a forget before it), while claims
            # of several workers run side by side, kept apart by SKIP LOCKED. One round trip.
            lock = "pg_advisory_xact_lock_shared" if serialize == "shared" else \
                "pg_advisory_xact_lock"
            try:
                db.raw.execute(f"BEGIN; SELECT {lock}({int(WRITE_LOCK_KEY)})")
                yield
            except BaseException:
                if not _broken(db.raw) and db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            try:
                db.execute("COMMIT")
            except _psycopg().OperationalError as exc:
                if _broken(db.raw):
                    raise CommitUnknownError(str(exc)) from exc
                raise

        def _claim_filter(self) -> str:
            return " FOR UPDATE SKIP LOCKED"

        def migrate(self) -> list[str]:
            """Apply pending migrations in one transaction under the write lock."""
            db = self.db
            if db.execute("SELECT to_regclass('_sqlite_migrations')").fetchone()[0] is not None:
                # Migrated already: an up-to-date database needs no DDL (nor CREATE on the
                # schema, which a runtime role without it does not have).
                done = {r[0] for r in db.execute("SELECT name FROM _sqlite_migrations WHERE "
                                                 "migration_set = ?", ["guildtune"])}
                if all(n in done for n, _ in PG_MIGRATIONS):
                    return []
            with self._transaction(db):
                db.execute(MIGRATIONS_TABLE)
                done = {r[0] for r in db.execute(
                    "SELECT name FROM _sqlite_migrations WHERE migration_set = ?",
                    ["guildtune"])}
                pending = [(n, sql) for n, sql in PG_MIGRATIONS if n not in done]
                for name, sql in pending:
                    if sql.strip():
                        db.raw.execute(sql)  # DDL, no parameters: run as written
                    db.execute("INSERT INTO _sqlite_migrations (migration_set, name, "
                               "applied_at) VALUES (?, ?, ?)",
                               ["guildtune", name, str(datetime.now(UTC))])
            return [n for n, _ in pending]

        def checkpoint(self) -> bool:
            """After a forget or a retention purge: VACUUM the tables members' words live in, so
            the deleted row versions are removed and their space is free to be overwritten
            (PostgreSQL never zeroes it; see the data statement's PostgreSQL wording). False
            inside a transaction, where VACUUM cannot run (the next one does it)."""
            db = self.db
            if db.in_transaction:
                return False
            skipped: list[str] = []

            def notice(diag: Any) -> None:
                if (diag.message_primary or "").startswith("skipping"):
                    skipped.append(diag.message_primary)

            db.raw.add_notice_handler(notice)
            try:
                db.raw.execute(f"VACUUM {', '.join(MEMBER_TABLES)}")
            except _psycopg().Error as exc:  # the forget is committed; only the cleanup waits
                log.warning("VACUUM after a forget or purge did not run (%s); autovacuum "
                            "removes the deleted rows later", _first_line(exc))
                return False
            finally:
                db.raw.remove_notice_handler(notice)
            if skipped:
                log.warning("VACUUM after a forget or purge skipped tables (%s): run it as "
                            "their owner", "; ".join(skipped))
            return not skipped

        def backup(self, dest: Any) -> Any:
            raise StoreError(f"{self.where} is a PostgreSQL database: back it up with "
                             "pg_dump (e.g. pg_dump -Fc -f guildtune.dump <url>), not guildtune "
                             "backup")

    return PostgresStore


def has_store(url: str) -> bool:
    """Whether the database at ``url`` holds a guildtune store already (``open_store`` would
    create its tables otherwise). StoreUnavailableError when the server cannot be reached."""
    with _connect(url) as conn:
        return conn.execute("SELECT to_regclass('_sqlite_migrations')").fetchone()[0] \
            is not None


def open_postgres(store_cls: type, url: str, *, busy_timeout_ms: int,
                  write_retries: int) -> Any:
    store = postgres_store_class(store_cls)(url, busy_timeout_ms=busy_timeout_ms,
                                            write_retries=write_retries)
    psycopg = _psycopg()
    try:
        store.migrate()
    except StoreError:
        store.close()
        raise
    except psycopg.errors.LockNotAvailable as exc:
        store.close()
        raise StoreBusyError(f"{store.where} is busy (another process holds the write lock); "
                             "cannot migrate") from exc
    except psycopg.Error as exc:
        store.close()
        raise StoreError(f"{store.where} is not a usable guildtune database: "
                         f"{_first_line(exc)}") from exc
    return store
