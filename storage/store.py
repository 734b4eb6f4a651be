"""The store: every read and write of community data, as narrow verbs over one SQLite file.

``Store`` is assembled here from one part a subsystem, each a mixin in its own module over the
connections and write transactions of ``db.StoreBase`` (threading and retries: see ``db``):

- ``consent``: guild settings, consent, the redaction of contexts;
- ``records``: interactions, messages, imports, feedback, corrections, Discord's edits and deletes;
- ``privacy``: forget, export, retention, the withdrawn keys and cutoffs;
- ``queue``: the training run queue;
- ``registry``: adapter versions and the contributor check;
- ``reads``: reads for the trainer and for status;
- ``backup``: backup, restore and the integrity check;

and the rules they share: ``text`` (clipping, mentions, quotes of hidden members, the name
pattern) and ``db`` (the errors, ``_writes``, ``checkpoint``). The parts call each other's verbs
through ``self`` (an opt-out taints versions and queues a retrain, a finished run may roll back a
version), so only ``Store`` holds them all; no part imports this module. Every name that was
importable from here before the split still is.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

# Besides the public names (``__all__``), the private helpers that lived here before the split
# are imported too (``_clip``, ``_writes``, ...), so code that imported them from here still can.
from .backup import (  # noqa: F401
    SIDE_FILES,
    BackupMixin,
    _integrity_problem,
    check_backup,
    fsync_path,
    restore_backup,
)
from .consent import ConsentMixin, GuildSettings
from .db import (  # noqa: F401
    ConsentChangedError,
    StoreBusyError,
    StoreError,
    StoreFullError,
    _is_full,
    _is_locked,
    _writes,
    log,
)
from .ids import new_ulid
from .migrations import migrations
from .postgres import has_store, is_postgres_url, open_postgres
from .privacy import ForgetReport, PrivacyMixin, withdrawn_key
from .queue import RUN_STATUSES, QueueMixin, Run
from .reads import ReadsMixin
from .records import LogResult, RecordsMixin
from .registry import AdapterVersion, RegistryMixin
from .text import (  # noqa: F401
    _ROLE_MENTION,
    _USER_MENTION,
    _WORD,
    CUT,
    DELETED,
    MAX_TEXT_CHARS,
    PLACEHOLDER,
    QUOTE_MIN_WORDS,
    _clip,
    _name_pattern,
    _norm_word,
    _withhold,
    cut_quotes,
    quoted_grams,
)
from .times import format_utc, parse_utc, to_utc, utc_now
from .times import format_utc as _utc  # noqa: F401

__all__ = [
    "CUT", "DELETED", "MAX_TEXT_CHARS", "PLACEHOLDER", "QUOTE_MIN_WORDS", "RUN_STATUSES",
    "SIDE_FILES", "AdapterVersion", "ConsentChangedError", "ForgetReport", "GuildSettings",
    "LogResult", "Run", "Store", "StoreBusyError", "StoreError", "StoreFullError",
    "check_backup", "cut_quotes", "format_utc", "fsync_path", "migrations", "new_ulid",
    "open_store", "parse_utc", "quoted_grams", "restore_backup", "store_exists", "to_utc",
    "utc_now",
    "withdrawn_key",
]


class Store(ConsentMixin, RecordsMixin, PrivacyMixin, QueueMixin, RegistryMixin, ReadsMixin,
            BackupMixin):
    """All SQL of guildtune. Safe to share between threads (one connection per thread)."""


def store_exists(target: str | os.PathLike[str]) -> bool:
    """Whether ``open_store(target)`` would open an existing store rather than create one: for
    commands that read or delete members' data, which must not create a database."""
    if is_postgres_url(target):
        return has_store(str(target))
    return Path(target).exists()


def open_store(path: str | os.PathLike[str], *, busy_timeout_ms: int = 5000,
               write_retries: int = 3) -> Store:
    """Open (creating if needed) the database at ``path`` (a SQLite file) or ``postgresql://``
    URL (an existing database on a PostgreSQL server, see ``postgres``) and apply pending
    migrations."""
    if is_postgres_url(path):
        return open_postgres(Store, str(path), busy_timeout_ms=busy_timeout_ms,
                             write_retries=write_retries)
    p = Path(path)
    # Only the operator's account may read members' data: the directory 0700 when we create
    # it, the database 0600 (SQLite gives its -wal and -shm files the database's mode).
    p.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not p.exists():
        os.close(os.open(p, os.O_WRONLY | os.O_CREAT, 0o600))
    elif p.stat().st_mode & 0o077 and p.stat().st_uid == os.geteuid():
        # A database from before this rule (or copied in): members' data, operator-only.
        for f in (p, *(Path(str(p) + x) for x in SIDE_FILES)):
            if f.exists():
                os.chmod(f, 0o600)
        log.info("made %s readable by its owner only (0600)", p)
    store = Store(p, busy_timeout_ms=busy_timeout_ms, write_retries=write_retries)
    try:
        store.migrate()
    except sqlite3.DatabaseError as exc:
        store.close()
        if isinstance(exc, sqlite3.OperationalError) and _is_locked(exc):
            raise StoreBusyError(f"{p} is locked by another process; cannot migrate") from exc
        raise StoreError(f"{p} is not a usable guildtune database: {exc}") from exc
    return store
