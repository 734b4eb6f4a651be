"""Reads for the trainer and for status: what training may use of a guild's data now, and the
counts the status displays show.
"""

from __future__ import annotations

import json
from typing import Any

from .db import StoreBase
from .privacy import after_withdrawal
from .text import _withhold, cut_quotes, quoted_grams


class ReadsMixin(StoreBase):
    """Reads for the trainer and status (verbs of ``Store``). Uses consent's
    ``consented_users``, privacy's ``_cutoffs``, the registry's ``active_version`` and the
    queue's ``open_run``, on ``Store``."""

    def rated_interactions(self, guild_id: int) -> list[dict[str, Any]]:
        """What training may read of the guild's interactions: those of members opted in now,
        with the net rating of raters opted in now (``score``), the raters, and the corrections
        of members opted in now; nothing anyone wrote or rated before their last forget or
        opt-out (``_cutoffs``), and their turns in stored contexts as the placeholder."""
        rows = self._rows(
            "SELECT i.id, i.user_id, i.context_json, i.reply, i.adapter_version, i.created_utc "
            "FROM interactions i JOIN consents c ON c.guild_id = i.guild_id AND "
            "c.user_id = i.user_id WHERE i.guild_id = ? ORDER BY i.created_utc DESC, i.id DESC",
            [guild_id])
        ratings = self._rows(
            "SELECT f.interaction_id, f.user_id, f.rating, f.created_utc FROM feedback f JOIN "
            "consents c ON c.guild_id = f.guild_id AND c.user_id = f.user_id "
            "WHERE f.guild_id = ? ORDER BY f.created_utc, f.user_id", [guild_id])
        fixes = self._rows(
            "SELECT k.interaction_id, k.user_id, k.text, k.created_utc FROM corrections k "
            "JOIN consents c ON c.guild_id = k.guild_id AND c.user_id = k.user_id "
            "WHERE k.guild_id = ? ORDER BY k.created_utc DESC", [guild_id])
        consented = self.consented_users(guild_id)
        cut = self._cutoffs(guild_id, consented)

        def usable(user: Any, when: str | None) -> bool:
            return user is not None and int(user) in consented and \
                after_withdrawal(cut, user, when)

        by_interaction: dict[str, list[dict[str, Any]]] = {}
        for f in ratings:
            if usable(f["user_id"], f["created_utc"]):
                by_interaction.setdefault(f["interaction_id"], []).append(f)
        corrections: dict[str, list[dict[str, Any]]] = {}
        for c in fixes:
            if usable(c["user_id"], c["created_utc"]):
                corrections.setdefault(c["interaction_id"], []).append(c)
        out = []
        for r in rows:
            if not usable(r["user_id"], r["created_utc"]):
                continue
            ctx = json.loads(r.pop("context_json"))
            ok = {e["author_id"] for e in ctx
                  if e.get("author_id") is not None and e.get("role") != "assistant"
                  and usable(e["author_id"], e.get("created_utc") or r["created_utc"])}
            r["context"], hidden = _withhold(ctx, ok)
            mine = corrections.get(r["id"], [])
            if hidden:  # the reply and suggestions are targets: they must not repeat them
                grams = quoted_grams(hidden)
                r["reply"] = cut_quotes(r["reply"], grams)
                mine = [{**c, "text": cut_quotes(c["text"], grams)} for c in mine]
            rated = by_interaction.get(r["id"], [])
            r["score"] = sum(f["rating"] for f in rated)
            r["raters"] = [f["user_id"] for f in rated]
            r["corrections"] = mine
            out.append(r)
        return out

    def reply_pairs(self, guild_id: int) -> list[dict[str, Any]]:
        """(parent message, reply) pairs between two different members opted in now, neither
        written before its author's last forget or opt-out."""
        pairs = self._rows(
            "SELECT p.message_id AS parent_id, p.user_id AS parent_user, p.text AS parent_text, "
            "p.created_utc AS parent_utc, "
            "r.message_id AS reply_id, r.user_id AS reply_user, r.text AS reply_text, "
            "r.created_utc FROM messages r "
            "JOIN messages p ON p.guild_id = r.guild_id AND p.message_id = r.reply_to_message_id "
            "JOIN consents cr ON cr.guild_id = r.guild_id AND cr.user_id = r.user_id "
            "JOIN consents cp ON cp.guild_id = p.guild_id AND cp.user_id = p.user_id "
            "WHERE r.guild_id = ? AND r.user_id != p.user_id ORDER BY r.created_utc DESC, "
            "r.message_id DESC", [guild_id])
        cut = self._cutoffs(guild_id, {p["parent_user"] for p in pairs} |
                            {p["reply_user"] for p in pairs})
        if not cut:
            return pairs
        return [p for p in pairs
                if after_withdrawal(cut, p["parent_user"], p["parent_utc"])
                and after_withdrawal(cut, p["reply_user"], p["created_utc"])]

    def examples_since(self, guild_id: int, since_utc: str | None) -> int:
        """New training signal since a time: liked or corrected interactions, and replies
        between members (the scheduler's 'enough new data' test)."""
        since = since_utc or ""
        return int(self._scalar(
            "SELECT (SELECT count(DISTINCT interaction_id) FROM feedback WHERE guild_id = ? AND "
            "rating = 1 AND created_utc > ?) + (SELECT count(*) FROM corrections WHERE "
            "guild_id = ? AND created_utc > ?) + (SELECT count(*) FROM messages WHERE "
            "guild_id = ? AND reply_to_message_id IS NOT NULL AND created_utc > ?)",
            [guild_id, since, guild_id, since, guild_id, since]))

    def guild_stats(self, guild_id: int) -> dict[str, Any]:
        """Counts for status displays."""
        q = self._scalar
        active = self.active_version(guild_id)
        open_run = self.open_run(guild_id)
        return {
            "guild_id": guild_id,
            "consented_users": q("SELECT count(*) FROM consents WHERE guild_id = ?", [guild_id]),
            "interactions": q("SELECT count(*) FROM interactions WHERE guild_id = ?", [guild_id]),
            "messages": q("SELECT count(*) FROM messages WHERE guild_id = ?", [guild_id]),
            "likes": q("SELECT count(*) FROM feedback WHERE guild_id = ? AND rating = 1",
                       [guild_id]),
            "dislikes": q("SELECT count(*) FROM feedback WHERE guild_id = ? AND rating = -1",
                          [guild_id]),
            "corrections": q("SELECT count(*) FROM corrections WHERE guild_id = ?", [guild_id]),
            "active_version": active.version if active else None,
            "open_run": None if open_run is None else
            {"id": open_run.id, "status": open_run.status, "progress": open_run.progress},
            "queued_runs": q("SELECT count(*) FROM training_runs WHERE guild_id = ? AND "
                             "status = 'queued'", [guild_id]),
            "examples_since_active": self.examples_since(
                guild_id, active.activated_utc if active else None),
        }

    def like_rate_by_version(self, guild_id: int) -> list[dict[str, Any]]:
        """Per adapter version (None = base): rated replies, likes, dislikes, like rate."""
        rows = self._rows(
            "SELECT i.adapter_version AS version, "
            "sum(CASE WHEN f.rating = 1 THEN 1 ELSE 0 END) AS likes, "
            "sum(CASE WHEN f.rating = -1 THEN 1 ELSE 0 END) AS dislikes FROM feedback f "
            "JOIN interactions i ON i.id = f.interaction_id WHERE f.guild_id = ? "
            "GROUP BY i.adapter_version ORDER BY i.adapter_version NULLS FIRST", [guild_id])
        for r in rows:
            total = (r["likes"] or 0) + (r["dislikes"] or 0)
            r["like_rate"] = (r["likes"] or 0) / total if total else None
        return rows
