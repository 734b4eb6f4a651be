"""Looking inside a store the same way on both backends (SQLite's catalog and PRAGMAs, or
PostgreSQL's), for tests that scan every table."""

from __future__ import annotations

from typing import Any


def table_names(store: Any) -> list[str]:
    """The store's tables, its migrations record included."""
    if store.backend == "postgresql":
        return [r[0] for r in store.db.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() "
            "ORDER BY tablename")]
    return store.db.table_names()


def columns(store: Any, table: str) -> list[str]:
    if store.backend == "postgresql":
        return [r[0] for r in store.db.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_schema = "
            "current_schema() AND table_name = ? ORDER BY ordinal_position", [table])]
    return list(store.db[table].columns_dict)


def count(store: Any, table: str, where: str = "", params: list[Any] | None = None) -> int:
    sql = f'SELECT count(*) FROM "{table}"' + (f" WHERE {where}" if where else "")
    return int(store.db.execute(sql, params or []).fetchone()[0])


def rows(store: Any, table: str) -> list[tuple[Any, ...]]:
    return [tuple(r) for r in store.db.execute(f'SELECT * FROM "{table}"').fetchall()]


def intact(store: Any) -> bool:
    """SQLite's integrity check; a PostgreSQL server checks its own pages (amcheck aside)."""
    if store.backend == "postgresql":
        return store.db.execute("SELECT 1").fetchone()[0] == 1
    return store.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
