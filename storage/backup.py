"""Backup, restore and the integrity check: the database as one file an operator can keep,
check and put back.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from .db import StoreBase, StoreBusyError, StoreError, _is_locked, log
from .migrations import migrations


class BackupMixin(StoreBase):
    """The online backup of the live database (``Store.backup``). Restoring and checking a file
    are the functions below: they work on a database that no store holds open."""

    def backup(self, dest: str | os.PathLike[str]) -> Path:
        """Copy the live database to ``dest`` with SQLite's online backup API.

        The copy is taken in one step, i.e. inside one read transaction: under WAL, writers on
        other connections go on and the copy is the database as of one commit, never a mix.
        It is written beside ``dest``, checked with ``PRAGMA integrity_check`` and renamed over
        ``dest``, so a failed or killed backup never leaves a half-written file at ``dest``.
        """
        dest = Path(dest)
        if dest.resolve() == self.path.resolve():
            raise StoreError(f"backup target {dest} is the live database itself")
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
        tmp.unlink(missing_ok=True)
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o600))  # a backup is members' data
        target = sqlite3.connect(tmp, isolation_level=None)
        try:
            # pages=-1: all pages in one step. Stepping page by page would restart whenever
            # another connection writes, and never finish under a steady write load.
            self.db.conn.backup(target, pages=-1)
            # A self-contained file: no -wal beside it that a copy by `cp` could miss.
            target.execute("PRAGMA journal_mode = DELETE")
            problem = _integrity_problem(target)
        except BaseException:
            target.close()
            tmp.unlink(missing_ok=True)
            raise
        target.close()
        if problem:
            tmp.unlink(missing_ok=True)
            raise StoreError(f"backup of {self.path} failed its integrity check: {problem}")
        fsync_path(tmp)
        os.replace(tmp, dest)
        fsync_path(dest.parent)
        log.info("backed up %s to %s", self.path, dest)
        return dest


SIDE_FILES = ("-wal", "-shm", "-journal")


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a rename is durable only once its directory is)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _integrity_problem(conn: sqlite3.Connection) -> str | None:
    """None when ``PRAGMA integrity_check`` says ok, else its first lines."""
    rows = [r[0] for r in conn.execute("PRAGMA integrity_check").fetchall()]
    return None if rows == ["ok"] else "; ".join(str(r) for r in rows[:3])


def check_backup(path: str | os.PathLike[str]) -> int:
    """Raise StoreError unless ``path`` is a guildtune database that passes
    ``PRAGMA integrity_check``. Returns how many guildtune migrations it records."""
    p = Path(path)
    if not p.is_file():
        raise StoreError(f"{p} is not a file")
    try:
        # Read-only and immutable: checking must never create a -wal or change the file.
        conn = sqlite3.connect(f"{p.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise StoreError(f"{p} cannot be opened as a database: {exc}") from None
    try:
        problem = _integrity_problem(conn)
        if problem:
            raise StoreError(f"{p} failed PRAGMA integrity_check: {problem}")
        has_table = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND "
                                 "name = '_sqlite_migrations'").fetchone()
        n = conn.execute("SELECT count(*) FROM _sqlite_migrations WHERE migration_set = ?",
                         [migrations.name]).fetchone()[0] if has_table else 0
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"{p} is not a guildtune database ({exc})") from None
    finally:
        conn.close()
    if not n:
        raise StoreError(f"{p} is a SQLite file but not a guildtune database (no guildtune "
                         "migrations recorded)")
    return n


def restore_backup(src: str | os.PathLike[str], db_path: str | os.PathLike[str], *,
                   lock_timeout_ms: int = 500) -> Path | None:
    """Replace the database at ``db_path`` with the backup ``src``.

    Refuses (StoreError) a file that is not a sound guildtune database, and (StoreBusyError) a
    live database that another process holds the write lock of. The replaced database is kept
    as ``<db>.before-restore`` (its WAL checkpointed into it first); its -wal/-shm files are
    moved aside with it, because a stale -wal left beside the restored file would be replayed
    into it by SQLite. Returns the path of the kept file (None when there was no database).
    Stop the bot and workers first: only a process writing right now is detected.
    """
    src, db = Path(src), Path(db_path)
    check_backup(src)
    if db.exists() and src.resolve() == db.resolve():
        raise StoreError(f"{src} is the live database itself")
    db.parent.mkdir(parents=True, exist_ok=True)
    tmp = db.with_name(f".{db.name}.restore-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o600))
    # Copy through the backup API (not a file copy): consistent even if src has its own -wal.
    source = sqlite3.connect(f"{src.resolve().as_uri()}?mode=ro", uri=True)
    target = sqlite3.connect(tmp, isolation_level=None)
    try:
        source.backup(target, pages=-1)
        target.execute("PRAGMA journal_mode = WAL")
    except BaseException:
        target.close()
        tmp.unlink(missing_ok=True)
        raise
    finally:
        source.close()
    target.close()
    fsync_path(tmp)

    kept: Path | None = None
    if db.exists():
        conn = sqlite3.connect(db, timeout=lock_timeout_ms / 1000, isolation_level=None)
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(lock_timeout_ms)}")
            try:
                conn.execute("BEGIN IMMEDIATE")
                conn.execute("ROLLBACK")
                # Fold the WAL into the main file so <db>.before-restore is whole on its own.
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.OperationalError as exc:
                tmp.unlink(missing_ok=True)
                if _is_locked(exc):
                    raise StoreBusyError(
                        f"{db} is locked by a running bot or worker; stop them, then restore"
                    ) from None
                raise StoreError(f"{db} cannot be prepared for restore: {exc}") from None
        finally:
            conn.close()
        kept = db.with_name(db.name + ".before-restore")
        for suffix in ("", *SIDE_FILES):
            Path(str(kept) + suffix).unlink(missing_ok=True)
        os.replace(db, kept)
        for suffix in SIDE_FILES:
            side = Path(str(db) + suffix)
            if side.exists():
                os.replace(side, Path(str(kept) + suffix))
    os.replace(tmp, db)
    fsync_path(db.parent)
    log.info("restored %s from %s (previous database kept as %s)", db, src, kept)
    return kept
