"""guildtune storage: the only package that speaks SQL. Imports no torch.

``open_store(path)`` applies the append-only migrations and returns a thread-safe ``Store`` whose
verbs enforce the data rules: nothing of a member who has not opted in is written, every row
carries its guild, and ``forget_user`` reaches every table and the adapter registry.
"""

from __future__ import annotations

from .ids import new_ulid
from .store import (
    DELETED,
    PLACEHOLDER,
    AdapterVersion,
    ConsentChangedError,
    ForgetReport,
    GuildSettings,
    LogResult,
    Run,
    Store,
    StoreBusyError,
    StoreError,
    StoreFullError,
    check_backup,
    fsync_path,
    open_store,
    restore_backup,
    utc_now,
)

__all__ = [
    "DELETED", "PLACEHOLDER", "AdapterVersion", "ConsentChangedError", "ForgetReport",
    "GuildSettings", "LogResult", "Run", "Store", "StoreBusyError", "StoreError",
    "StoreFullError", "check_backup", "fsync_path", "new_ulid", "open_store", "restore_backup",
    "utc_now",
]
