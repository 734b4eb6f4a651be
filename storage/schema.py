"""The schema as documentation, generated from the migrations (README's schema section)."""

from __future__ import annotations

import sqlite3
import tempfile
from pathlib import Path

from .store import open_store

START = "<!-- schema:start -->"
END = "<!-- schema:end -->"


def schema_sql(conn: sqlite3.Connection) -> list[tuple[str, str]]:
    """(name, CREATE statement) of every table and index, in creation order."""
    rows = conn.execute(
        "SELECT name, sql FROM sqlite_master WHERE sql IS NOT NULL AND name NOT LIKE 'sqlite_%' "
        "ORDER BY rowid").fetchall()
    out = []
    for name, sql in rows:
        lines = [line.strip() for line in sql.strip().splitlines() if line.strip()]
        pretty = [lines[0]] + [line if line.startswith(")") else "    " + line
                               for line in lines[1:]]
        out.append((name, "\n".join(pretty)))
    return out


def schema_markdown() -> str:
    """Markdown listing of the schema a blank database gets from the migrations."""
    with tempfile.TemporaryDirectory() as tmp:
        store = open_store(Path(tmp) / "schema.db")
        try:
            items = schema_sql(store.db.conn)
        finally:
            store.close()
    lines = [START, "", "```sql"]
    for _, sql in items:
        lines.append(sql + ";")
    lines += ["```", "", END]
    return "\n".join(lines)
