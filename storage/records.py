"""What is kept of a guild's conversations, and only with consent: logged interactions and
messages, imports of history, feedback, corrections, and Discord's deletes and edits of what
was stored.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from .consent import consent_covers
from .db import StoreBase, StoreError, _writes, log
from .ids import new_ulid
from .text import DELETED, _clip, cut_quotes, hidden_turn, quoted_grams
from .times import to_utc, utc_now


@dataclass(frozen=True)
class LogResult:
    """What ``log_interaction`` did: ``stored`` False means nothing was written, and why."""

    stored: bool
    interaction_id: str | None = None
    reason: str = ""


class RecordsMixin(StoreBase):
    """Interactions, messages, imports, feedback, corrections, edits and deletes (verbs of
    ``Store``). Uses consent's ``guild_settings``, ``_granted``, ``_redact``, ``has_consent``
    and ``consented_users``, and privacy's ``_withdrawn``, on ``Store``."""

    # -- interactions and messages -------------------------------------------------------------

    @_writes
    def log_interaction(self, guild_id: int, channel_id: int, user_id: int, *,
                        context: list[dict[str, Any]], reply: str,
                        request_message_id: int | None = None,
                        reply_message_id: int | None = None,
                        adapter_version: int | None = None, tokens_in: int = 0,
                        tokens_out: int = 0, latency_ms: float = 0.0) -> LogResult:
        """Store one exchange, only if the guild logs and the member has opted in."""
        if not self.guild_settings(guild_id).logging_enabled:
            return LogResult(False, reason="logging is off in this guild")
        granted = self._granted(guild_id, [user_id, *(e.get("author_id") for e in context)])
        if user_id not in granted:
            return LogResult(False, reason="the member has not opted in")
        now = utc_now()
        iid = new_ulid()
        stored, hidden = self._redact(guild_id, context, granted)
        if hidden:
            reply = cut_quotes(reply, quoted_grams(hidden))
        # A plain INSERT: sqlite-utils' insert() introspects the table on every call (~3x slower).
        self.db.execute(
            "INSERT INTO interactions (id, guild_id, channel_id, user_id, request_message_id, "
            "reply_message_id, context_json, reply, adapter_version, tokens_in, tokens_out, "
            "latency_ms, created_utc, updated_utc) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            [iid, guild_id, channel_id, user_id, request_message_id, reply_message_id,
             json.dumps(stored), _clip(reply),
             adapter_version, tokens_in, tokens_out, latency_ms, now, now])
        return LogResult(True, iid)

    def log_interactions(self, items: Iterable[dict[str, Any]]) -> list[LogResult]:
        """Many ``log_interaction`` calls (keyword dicts) in one transaction."""
        results: list[LogResult] = []

        @_writes
        def batch(store: RecordsMixin) -> None:
            for item in items:
                results.append(store.log_interaction(**item))

        batch(self)
        return results

    @_writes
    def set_reply_message(self, guild_id: int, interaction_id: str, reply_message_id: int) -> None:
        self.db.execute("UPDATE interactions SET reply_message_id = ?, updated_utc = ? "
                        "WHERE guild_id = ? AND id = ?",
                        [reply_message_id, utc_now(), guild_id, interaction_id])

    def interaction_for_message(self, guild_id: int, message_id: int) -> dict[str, Any] | None:
        """The interaction whose bot reply (or request) is this Discord message."""
        return self._one(
            "SELECT * FROM interactions WHERE guild_id = ? AND "
            "(reply_message_id = ? OR request_message_id = ?) ORDER BY created_utc DESC LIMIT 1",
            [guild_id, message_id, message_id])

    def get_interaction(self, guild_id: int, interaction_id: str) -> dict[str, Any] | None:
        return self._one("SELECT * FROM interactions WHERE guild_id = ? AND id = ?",
                         [guild_id, interaction_id])

    @_writes
    def log_message(self, guild_id: int, message_id: int, user_id: int, text: str, *,
                    channel_id: int = 0, reply_to_message_id: int | None = None,
                    created_utc: str | None = None, source: str = "discord") -> bool:
        """Store a human message, only if its author had opted in when they wrote it (the
        same rule as for contexts). Returns whether it did."""
        written = to_utc(created_utc) if created_utc else utc_now()
        if not consent_covers(self._granted(guild_id, [user_id]).get(int(user_id)), written):
            return False  # not opted in, or written before they opted in: not theirs to give
        self.db.execute(
            "INSERT INTO messages (guild_id, message_id, channel_id, user_id, text, "
            "reply_to_message_id, source, created_utc) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (guild_id, message_id) DO UPDATE SET channel_id = excluded.channel_id, "
            "user_id = excluded.user_id, text = excluded.text, "
            "reply_to_message_id = excluded.reply_to_message_id, source = excluded.source, "
            "created_utc = excluded.created_utc",
            [guild_id, message_id, channel_id, user_id, _clip(text), reply_to_message_id, source,
             written])
        return True

    @_writes
    def import_messages(self, guild_id: int, rows: Iterable[dict[str, Any]], *,
                        source: dict[str, Any] | None = None) -> int:
        """Load history the operator asserts consent for (scope 'import'); returns rows stored.

        Each row: message_id, user_id, text, and optionally channel_id, reply_to_message_id,
        created_utc (a timestamp with a date, stored through ``to_utc``; absent: now). A row
        whose created_utc is not one is refused (StoreError) and nothing is stored: a time
        compared as a string would let the retention job delete it at once.

        A message id the guild already holds is skipped, never replaced (another file, or a
        live message, may own it); the return value counts only new rows. With ``source``
        (``{"sha256", "file_name"}``) the import is recorded in ``imports``, and a source the
        guild has already imported stores nothing and returns 0 (``import_record`` says when).
        """
        if source is not None and self.import_record(guild_id, source["sha256"]) is not None:
            return 0
        now = utc_now()
        batch: list[tuple[Any, ...]] = []
        for r in rows:
            try:
                ids = [int(r["message_id"]), int(r.get("channel_id") or 0), int(r["user_id"])]
                reply_to = r.get("reply_to_message_id")
                if reply_to is not None:
                    ids.append(int(reply_to))
            except (KeyError, TypeError, ValueError) as exc:
                raise StoreError(f"import: row {len(batch) + 1}: message_id, user_id, "
                                 f"channel_id and reply_to_message_id must be integers ({exc}); "
                                 "nothing was imported") from None
            if not all(-2**63 <= i < 2**63 for i in ids):
                raise StoreError(f"import: row {len(batch) + 1}: an id is outside SQLite's "
                                 "64-bit integers; nothing was imported")
            created = r.get("created_utc")
            try:
                created = now if created is None else to_utc(created)
                if created > now:
                    # A future time would never expire and always count as new data.
                    created = now
            except (TypeError, ValueError):
                raise StoreError(f"import: message {ids[0]}: created_utc {str(created)[:40]!r} is "
                                 "not a timestamp with a date (UTC ISO 8601, e.g. "
                                 "2024-03-01T12:00:00Z); nothing was imported") from None
            batch.append((guild_id, ids[0], ids[1], ids[2], _clip(str(r["text"])),
                          None if reply_to is None else ids[3], "import", created))
        cur = self.db.conn.cursor()
        authors: set[int] = set()
        n = 0
        gone = self._withdrawn(guild_id, {row[3] for row in batch})
        if gone:
            log.info("import into guild %s: skipped the messages of %d member(s) who asked to "
                     "be forgotten or opted out", guild_id, len(gone))
        for row in batch:
            if row[3] in gone:
                continue  # forgotten or opted out: old history does not bring them back
            cur.execute(
                "INSERT INTO messages (guild_id, message_id, channel_id, user_id, text, "
                "reply_to_message_id, source, created_utc) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT DO NOTHING",
                row)
            if cur.rowcount:
                n += 1
                authors.add(row[3])
        cur.executemany(
            "INSERT INTO consents (guild_id, user_id, scope, granted_utc) "
            "VALUES (?, ?, 'import', ?) ON CONFLICT DO NOTHING",
            [(guild_id, a, now) for a in sorted(authors)])
        if source is not None:
            cur.execute(
                "INSERT INTO imports (guild_id, source_sha256, file_name, messages, stored, "
                "imported_utc) VALUES (?, ?, ?, ?, ?, ?)",
                [guild_id, str(source["sha256"]), str(source.get("file_name", "")), len(batch),
                 n, now])
        return n

    def import_record(self, guild_id: int, sha256: str) -> dict[str, Any] | None:
        """The ``imports`` row of a source file already imported into the guild, else None."""
        return self._one("SELECT * FROM imports WHERE guild_id = ? AND source_sha256 = ?",
                         [guild_id, sha256])

    # -- feedback and corrections --------------------------------------------------------------

    @_writes
    def record_feedback(self, guild_id: int, message_id: int, user_id: int, rating: int) -> bool:
        """A member rates the bot reply in Discord message ``message_id`` (+1 or -1).

        Stores nothing (returns False) when the member has not opted in or the reply was not
        logged. A new rating by the same member replaces the old one.
        """
        if rating not in (-1, 1):
            raise StoreError(f"rating must be +1 or -1, not {rating!r}")
        if not self.has_consent(guild_id, user_id):
            return False
        iid = self._scalar("SELECT id FROM interactions WHERE guild_id = ? AND "
                           "reply_message_id = ?", [guild_id, message_id])
        if iid is None:
            return False
        self.db.execute(
            "INSERT INTO feedback (interaction_id, guild_id, user_id, rating, created_utc) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (interaction_id, user_id) DO UPDATE SET "
            "guild_id = excluded.guild_id, rating = excluded.rating, "
            "created_utc = excluded.created_utc", [iid, guild_id, user_id, rating, utc_now()])
        return True

    @_writes
    def remove_feedback(self, guild_id: int, message_id: int, user_id: int,
                        rating: int | None = None) -> bool:
        """Remove a member's rating (only that rating if given: removing 👎 keeps a 👍)."""
        sql = ("DELETE FROM feedback WHERE guild_id = ? AND user_id = ? AND interaction_id IN "
               "(SELECT id FROM interactions WHERE guild_id = ? AND reply_message_id = ?)")
        params: list[Any] = [guild_id, user_id, guild_id, message_id]
        if rating is not None:
            sql += " AND rating = ?"
            params.append(rating)
        return self.db.execute(sql, params).rowcount > 0

    @_writes
    def add_correction(self, guild_id: int, interaction_id: str, user_id: int,
                       text: str) -> str | None:
        """A member's better reply for an interaction; None when nothing was stored."""
        text = _clip(text).strip()
        if not text or not self.has_consent(guild_id, user_id):
            return None
        if self.get_interaction(guild_id, interaction_id) is None:
            return None
        cid = new_ulid()
        self.db.execute("INSERT INTO corrections (id, interaction_id, guild_id, user_id, text, "
                        "created_utc) VALUES (?, ?, ?, ?, ?, ?)",
                        [cid, interaction_id, guild_id, user_id, text, utc_now()])
        return cid

    # -- Discord deletes and edits -------------------------------------------------------------

    def _rewrite_contexts(self, guild_id: int, needle: str,
                          fix: Callable[[dict[str, Any]], dict[str, Any] | None]) -> int:
        """Apply ``fix`` to context entries of the guild's interactions that mention ``needle``."""
        n = 0
        for row in self._rows("SELECT id, context_json FROM interactions WHERE guild_id = ? "
                              "AND instr(context_json, ?) > 0", [guild_id, needle]):
            ctx = json.loads(row["context_json"])
            new = [fix(e) or e for e in ctx]
            if new != ctx:
                self.db.execute("UPDATE interactions SET context_json = ?, updated_utc = ? "
                                "WHERE id = ?", [json.dumps(new), utc_now(), row["id"]])
                n += 1
        return n

    @_writes
    def delete_message(self, guild_id: int, message_id: int) -> int:
        """A Discord message was deleted: remove everything stored from it. Returns rows hit."""
        n = self.db.execute("DELETE FROM interactions WHERE guild_id = ? AND "
                            "(request_message_id = ? OR reply_message_id = ?)",
                            [guild_id, message_id, message_id]).rowcount
        n += self.db.execute("DELETE FROM messages WHERE guild_id = ? AND message_id = ?",
                             [guild_id, message_id]).rowcount
        mid = str(message_id)
        n += self._rewrite_contexts(
            guild_id, f'"{mid}"',
            lambda e: {"role": e["role"], "author_id": None, "message_id": None,
                       "text": DELETED} if e.get("message_id") == mid else None)
        return n

    @_writes
    def edit_message(self, guild_id: int, message_id: int, text: str) -> int:
        """A Discord message was edited: update the stored copies. Returns rows hit."""
        text = _clip(text)
        consented = {str(u) for u in self.consented_users(guild_id)}
        # An author who has opted out since: the new text is not theirs to give, so the stored
        # copy goes instead of being updated.
        n = self.db.execute(
            "DELETE FROM messages WHERE guild_id = ? AND message_id = ? AND user_id NOT IN "
            "(SELECT user_id FROM consents WHERE guild_id = ?)",
            [guild_id, message_id, guild_id]).rowcount
        n += self.db.execute("UPDATE messages SET text = ? WHERE guild_id = ? AND message_id = ?",
                             [text, guild_id, message_id]).rowcount
        mid = str(message_id)

        def fix(e: dict[str, Any]) -> dict[str, Any] | None:
            if e.get("message_id") != mid:
                return None
            if e.get("role") == "assistant":
                # The bot never edits its replies; an update event of one (an embed unfurling,
                # a pin) must not restore words cut from the stored copy.
                return None
            if e.get("author_id") in consented:
                return {**e, "text": text}
            return hidden_turn()

        return n + self._rewrite_contexts(guild_id, f'"{mid}"', fix)
