"""Consent, the rule every write of members' data goes through: guild settings, opting in and
out, and the redaction of a context to what may be stored of it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .db import StoreBase, StoreError, _writes
from .privacy import ForgetReport, withdrawn_key
from .text import _clip, cut_quotes, hidden_turn, quoted_grams
from .times import to_utc, utc_now


def consent_covers(since: str | None, written: str) -> bool:
    """Consent covers what a member writes from the moment they opt in: ``since`` is their
    consent time (None: not opted in), ``written`` when the text was written. Both are stored
    stamps (``storage.times``), which compare as times."""
    return since is not None and written >= since


@dataclass(frozen=True)
class GuildSettings:
    guild_id: int
    training_enabled: bool = False
    logging_enabled: bool = True
    learn_from_humans: bool = False
    schedule: str | None = None
    persona: str | None = None
    channels: tuple[int, ...] = ()


class ConsentMixin(StoreBase):
    """Guild settings, consent and redaction (verbs of ``Store``). Uses privacy's ``_withdraw``
    and ``_mark_withdrawn``, on ``Store``."""

    # -- guild settings ------------------------------------------------------------------------

    def guild_settings(self, guild_id: int) -> GuildSettings:
        row = self._one("SELECT * FROM guild_settings WHERE guild_id = ?", [guild_id])
        if row is None:
            return GuildSettings(guild_id)
        return GuildSettings(
            guild_id, bool(row["training_enabled"]), bool(row["logging_enabled"]),
            bool(row["learn_from_humans"]), row["schedule"], row["persona"],
            tuple(json.loads(row["channels_json"])),
        )

    @_writes
    def update_guild_settings(self, guild_id: int, **changes: Any) -> GuildSettings:
        """Change some of: training_enabled, logging_enabled, learn_from_humans, schedule,
        persona, channels."""
        allowed = {"training_enabled", "logging_enabled", "learn_from_humans", "schedule",
                   "persona", "channels"}
        unknown = set(changes) - allowed
        if unknown:
            raise StoreError(f"unknown guild settings: {', '.join(sorted(unknown))}")
        row: dict[str, Any] = {"guild_id": guild_id, "updated_utc": utc_now()}
        for key, value in changes.items():
            if key == "channels":
                row["channels_json"] = json.dumps(sorted({int(c) for c in value}))
            elif key in ("training_enabled", "logging_enabled", "learn_from_humans"):
                row[key] = int(bool(value))
            else:
                row[key] = value
        cols = list(row)
        self.db.execute(
            f"INSERT INTO guild_settings ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"
            f" ON CONFLICT (guild_id) DO UPDATE SET "
            f"{', '.join(f'{c} = excluded.{c}' for c in cols if c != 'guild_id')}",
            list(row.values()))
        return self.guild_settings(guild_id)

    def guild_ids(self) -> list[int]:
        """Every guild the store knows of (settings, consents, data or versions)."""
        rows = self.db.execute(
            "SELECT guild_id FROM guild_settings UNION SELECT guild_id FROM consents "
            "UNION SELECT guild_id FROM interactions UNION SELECT guild_id FROM messages "
            "UNION SELECT guild_id FROM adapter_versions ORDER BY 1").fetchall()
        return [r[0] for r in rows]

    # -- consent -------------------------------------------------------------------------------

    @_writes
    def grant_consent(self, guild_id: int, user_id: int, scope: str = "train") -> bool:
        """Opt a member in. Returns False when they already were."""
        cur = self.db.execute(
            "INSERT INTO consents (guild_id, user_id, scope, granted_utc) VALUES (?, ?, ?, ?) "
            "ON CONFLICT DO NOTHING", [guild_id, user_id, scope, utc_now()])
        # Their own new choice: an earlier forget or opt-out in this guild no longer keeps their
        # imported history out of it (a forget everywhere still keeps it out of the others).
        self.db.execute("UPDATE withdrawn SET lifted_utc = ? WHERE guild_id = ? AND "
                        "user_key = ? AND lifted_utc IS NULL",
                        [utc_now(), guild_id, withdrawn_key(guild_id, user_id)])
        return cur.rowcount == 1

    def revoke_consent(self, guild_id: int, user_id: int, *, strict: bool = True) -> bool:
        """Opt a member out. Their stored rows stay until they use forget, but nothing of theirs
        is used again: no dataset reads them, the versions trained on them are tainted and
        retrained without them exactly as for a forget (``strict``: the tainted active version
        stops serving at once), and a run in flight is flagged so its result is not served.
        False if they were not opted in."""
        return self._revoke(guild_id, user_id, strict, ForgetReport(user_id))

    @_writes
    def _revoke(self, guild_id: int, user_id: int, strict: bool, report: ForgetReport) -> bool:
        cur = self.db.execute("DELETE FROM consents WHERE guild_id = ? AND user_id = ?",
                              [guild_id, user_id])
        if cur.rowcount != 1:
            return False
        self._mark_withdrawn(guild_id, user_id, "opt-out")
        self._withdraw(user_id, [guild_id], strict, report)
        return True

    def has_consent(self, guild_id: int, user_id: int) -> bool:
        return self._scalar("SELECT 1 FROM consents WHERE guild_id = ? AND user_id = ?",
                            [guild_id, user_id]) is not None

    def consented_users(self, guild_id: int) -> set[int]:
        rows = self.db.execute("SELECT user_id FROM consents WHERE guild_id = ?", [guild_id])
        return {r[0] for r in rows}

    def _granted(self, guild_id: int, users: Iterable[Any]) -> dict[int, str]:
        """user -> consent time, for just these users (a message's handful of authors, not the
        whole guild's consent table on every message)."""
        ids = sorted({int(u) for u in users if u is not None})
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        return {r[0]: r[1] for r in self.db.execute(
            f"SELECT user_id, granted_utc FROM consents WHERE guild_id = ? AND user_id IN "
            f"({marks})", [guild_id, *ids])}

    def _redact(self, guild_id: int, context: list[dict[str, Any]],
                granted: dict[int, str] | None = None,
                ) -> tuple[list[dict[str, Any]], list[str]]:
        """The context as it may be stored, and the texts it hid: text and ids of authors
        without consent at the time they wrote are replaced by the placeholder.

        Entries: ``{"role": "user"|"assistant", "author_id", "message_id", "text",
        "created_utc"}``; ``created_utc`` (when the message was written, any ISO 8601 time) is
        required on every member's turn; the bot's own turns are kept.
        """
        if granted is None:
            granted = self._granted(guild_id, (e.get("author_id") for e in context))
        out: list[dict[str, Any]] = []
        hidden: list[str] = []
        for n, entry in enumerate(context):
            role = entry.get("role", "user")
            author = entry.get("author_id")
            text = str(entry.get("text", ""))
            if role == "assistant":
                out.append({"role": role, "author_id": None if author is None else str(author),
                            "message_id": None if entry.get("message_id") is None
                            else str(entry["message_id"]), "text": _clip(text),
                            **({"created_utc": to_utc(entry["created_utc"])}
                               if entry.get("created_utc") else {})})
                continue
            written = entry.get("created_utc")
            if author is not None and not written:
                # Without it, text written before its author opted in could not be told apart
                # from text written after: refuse rather than store it.
                raise StoreError(f"context entry {n} has no created_utc (when the message was "
                                 "written); every member's turn needs it")
            since = granted.get(int(author)) if author is not None else None
            try:
                stamp = to_utc(written) if written else None
            except ValueError:
                raise StoreError(f"context entry {n}: created_utc {written!r} is not an "
                                 "ISO 8601 time") from None
            # A message written before its author opted in stays a placeholder even when it
            # shows up in a later context.
            if stamp is not None and consent_covers(since, stamp):
                out.append({"role": role, "author_id": str(author),
                            "message_id": None if entry.get("message_id") is None
                            else str(entry["message_id"]), "text": _clip(text),
                            "created_utc": stamp})
            else:
                hidden.append(text)
                out.append(hidden_turn())
        if hidden:
            # The bot's earlier turns may repeat what a hidden member said.
            grams = quoted_grams(hidden)
            for e in out:
                if e["role"] == "assistant":
                    e["text"] = cut_quotes(e["text"], grams)
        return out, hidden
