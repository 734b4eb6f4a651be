"""Privacy: forget a member, export what is stored of them, retention, and the withdrawn keys
and cutoffs that keep what a member gave before a forget or an opt-out out of training for good.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from .db import StoreBase, _writes, log
from .text import _name_pattern, cut_quotes, hidden_turn, quoted_grams
from .times import format_utc as _utc
from .times import parse_utc, utc_now

# The order of each table's rows in an export: oldest first (portable: no rowid on PostgreSQL).
EXPORT_ORDER = {"consents": "granted_utc, scope", "messages": "created_utc, message_id",
                "interactions": "created_utc, id", "feedback": "created_utc, interaction_id",
                "corrections": "created_utc, id"}


def after_withdrawal(cutoffs: dict[int, str], user: int, when: str | None) -> bool:
    """Whether what ``user`` wrote or rated at ``when`` may train: strictly after their last
    forget or opt-out (``_cutoffs``; a row stamped in the same millisecond is withheld)."""
    line = cutoffs.get(int(user))
    return line is None or (when is not None and when > line)


def withdrawn_key(guild_id: int, user_id: int) -> str:
    """The key a forget or an opt-out leaves behind (``withdrawn``); guild 0 = every guild."""
    return hashlib.sha256(f"{int(guild_id)}:{int(user_id)}".encode()).hexdigest()


@dataclass
class ForgetReport:
    """What ``forget_user`` removed, which versions it tainted and which retrains it queued."""

    user_id: int
    deleted: dict[str, int] = field(default_factory=dict)
    tainted: list[tuple[int, int]] = field(default_factory=list)
    retrain_runs: dict[int, int] = field(default_factory=dict)
    deactivated: list[int] = field(default_factory=list)
    # Guilds where a training run was in flight: its result will not be served, and a retrain
    # without the member follows it (the run's id).
    in_flight: dict[int, int] = field(default_factory=dict)

    @property
    def total_deleted(self) -> int:
        return sum(self.deleted.values())


class PrivacyMixin(StoreBase):
    """Forget, export, retention, and the withdrawn keys and cutoffs (verbs of ``Store``).

    Uses consent's ``_granted``, ``guild_settings`` and ``guild_ids``, the queue's
    ``enqueue_run``, and the registry's ``get_version``, ``active_version`` and ``rollback``,
    all on ``Store``."""

    # -- forget --------------------------------------------------------------------------------

    def forget_user(self, user_id: int, guild_id: int | None = None, *,
                    strict: bool = True, names: Iterable[str] = ()) -> ForgetReport:
        """Delete every row of a member (in one guild, or everywhere) in one transaction.

        Also takes them out of what other members' rows hold: their turns in stored contexts
        become the placeholder, verbatim runs of their words in the bot's stored replies are
        cut, and their id and ``names`` (display names the caller knows) are replaced by
        ``@member``. Adapter versions trained on their data are marked tainted and a retrain
        without it is queued; a run in flight is flagged so its result is never served and a
        retrain follows it. With ``strict`` (the default), a tainted active version is replaced
        at once by the newest clean version, or the base model. The WAL is then checkpointed
        so the deleted text does not linger in it.
        """
        report = self._forget_user(user_id, guild_id, strict=strict, names=tuple(names))
        self.checkpoint()
        return report

    @_writes
    def _forget_user(self, user_id: int, guild_id: int | None, *, strict: bool,
                     names: tuple[str, ...]) -> ForgetReport:
        report = ForgetReport(user_id)
        where_g = "" if guild_id is None else " AND guild_id = ?"
        gp: list[Any] = [] if guild_id is None else [guild_id]
        uid = str(user_id)
        # Guilds where they have rows of their own (a run there may have read them) ...
        had_data = sorted({r[0] for r in self.db.execute(
            " UNION ".join(f"SELECT guild_id FROM {t} WHERE user_id = ?{where_g}" for t in (
                "consents", "messages", "interactions", "feedback", "corrections",
                "adapter_contributors")), [x for _ in range(6) for x in (user_id, *gp)])})
        # ... and every guild where other members' rows may hold their words, even after they
        # opted out (no rows of their own left): the one named, or for a forget everywhere,
        # wherever a stored context names them.
        if guild_id is not None:
            guilds = sorted({*had_data, guild_id})
        elif any(n and n.strip() for n in names):  # a mention of them may be in any guild
            guilds = sorted({*had_data, *self.guild_ids()})
        else:
            guilds = sorted({*had_data, *(r[0] for r in self.db.execute(
                "SELECT DISTINCT guild_id FROM interactions WHERE instr(context_json, ?) > 0 "
                "OR instr(reply, ?) > 0", [uid, uid]))})
        self._taint(user_id, guilds, report)
        # What they wrote, to find it quoted in the bot's replies to others (before deletion).
        grams: dict[int, set[tuple[str, ...]]] = {}
        for g in guilds:
            texts = [r[0] for r in self.db.execute(
                "SELECT text FROM messages WHERE guild_id = ? AND user_id = ? UNION ALL "
                "SELECT text FROM corrections WHERE guild_id = ? AND user_id = ?",
                [g, user_id, g, user_id])]
            for (ctx,) in self.db.execute(
                    "SELECT context_json FROM interactions WHERE guild_id = ? AND "
                    "instr(context_json, ?) > 0", [g, f'"{uid}"']):
                texts += [e.get("text", "") for e in json.loads(ctx)
                          if e.get("author_id") == uid and e.get("role") != "assistant"]
            grams[g] = quoted_grams(texts)
        # Their own rows first, so the scrub below only rewrites other members' rows.
        for table in ("adapter_contributors", "feedback", "corrections", "interactions",
                      "messages", "consents"):
            report.deleted[table] = self.db.execute(
                f"DELETE FROM {table} WHERE user_id = ?" + where_g, [user_id, *gp]).rowcount
        scrubbed = 0
        who = _name_pattern(user_id, names)
        has_names = any(n and n.strip().lstrip("@") for n in names)
        for g in guilds:
            since = min((v.activated_utc for gg, vv in report.tainted if gg == g
                         for v in [self.get_version(g, vv)] if v and v.activated_utc),
                        default=None)
            scrubbed += self._scrub_member(g, uid, who, has_names, grams.get(g, set()), since)
        report.deleted["texts_scrubbed"] = scrubbed
        self.db.execute("UPDATE training_runs SET requested_by = NULL WHERE requested_by = ?"
                        + where_g, [user_id, *gp])
        self._mark_withdrawn(0 if guild_id is None else guild_id, user_id, "forget")
        self._withdraw(user_id, guilds, strict, report, tainted_already=True,
                       in_flight_for=had_data)
        return report

    def _taint(self, user_id: int, guilds: Iterable[int], report: ForgetReport) -> None:
        """Mark every version of these guilds trained on the member as tainted."""
        now = utc_now()
        for g in guilds:
            for (v,) in self.db.execute("SELECT version FROM adapter_contributors WHERE "
                                        "guild_id = ? AND user_id = ?", [g, user_id]).fetchall():
                self.db.execute(
                    "UPDATE adapter_versions SET tainted_utc = coalesce(tainted_utc, ?), "
                    "status = CASE WHEN status = 'active' THEN status ELSE 'tainted' END "
                    "WHERE guild_id = ? AND version = ?", [now, g, v])
                report.tainted.append((g, v))

    def _withdraw(self, user_id: int, guilds: Iterable[int], strict: bool,
                  report: ForgetReport, tainted_already: bool = False,
                  in_flight_for: Iterable[int] | None = None) -> None:
        """The model side of a forget or an opt-out, in the caller's transaction: taint the
        versions trained on the member, flag a run in flight (publish refuses its result, and a
        retrain follows it), queue a retrain, and with ``strict`` stop serving a tainted active
        version at once."""
        guilds = sorted(set(guilds))
        if not tainted_already:
            self._taint(user_id, guilds, report)
        for g in sorted(set(guilds if in_flight_for is None else in_flight_for)):
            running = self._scalar("SELECT id FROM training_runs WHERE guild_id = ? AND "
                                   "status = 'running'", [g])
            if running is not None:
                self.db.execute("UPDATE training_runs SET rerun = 1 WHERE id = ?", [running])
                report.in_flight[g] = running
        for g in sorted({g for g, _ in report.tainted}):
            if g not in report.in_flight:
                run_id, _ = self.enqueue_run(g, "forget")
                report.retrain_runs[g] = run_id
            # With training off for the guild no retrain will come to replace it: withdraw now.
            if strict or not self.guild_settings(g).training_enabled:
                active = self.active_version(g)
                if active is not None and active.tainted_utc is not None:
                    self.rollback(g)
                    report.deactivated.append(g)

    def _scrub_member(self, guild_id: int, uid: str, who: re.Pattern[str], has_names: bool,
                      grams: set[tuple[str, ...]], tainted_since: str | None) -> int:
        """Take a forgotten member out of other members' rows of one guild: their context turns
        become the placeholder, their id and mentions become ``@member`` in every stored text,
        and runs of their words are cut from what the bot said (replies and its turns in
        contexts) and from suggested replies, the training targets.

        Where the bot can have said their words: in a conversation they were in, or, once a
        version trained on them served (``tainted_since``), anywhere: a model repeats what it
        memorised."""
        conds = ["instr(context_json, ?) > 0", "instr(reply, ?) > 0"]
        params: list[Any] = [uid, uid]
        if has_names:  # mentions are stored as @name; JSON escapes and case are for Python
            conds += ["instr(context_json, '@') > 0", "instr(reply, '@') > 0"]
        if grams and tainted_since is not None:
            conds.append("created_utc >= ?")
            params.append(tainted_since)
        n = 0
        for row in self._rows(f"SELECT id, context_json, reply FROM interactions WHERE "
                              f"guild_id = ? AND ({' OR '.join(conds)})", [guild_id, *params]):
            ctx = json.loads(row["context_json"])
            new_ctx = []
            for e in ctx:
                if e.get("author_id") == uid and e.get("role") != "assistant":
                    new_ctx.append(hidden_turn())
                elif e.get("role") == "assistant":
                    new_ctx.append({**e, "text": who.sub("@member",
                                                         cut_quotes(e.get("text", ""), grams))})
                else:  # another member's own words: only the id and mentions go
                    new_ctx.append({**e, "text": who.sub("@member", e.get("text", ""))})
            reply = who.sub("@member", cut_quotes(row["reply"], grams))
            if new_ctx != ctx or reply != row["reply"]:
                self.db.execute("UPDATE interactions SET context_json = ?, reply = ?, "
                                "updated_utc = ? WHERE id = ?",
                                [json.dumps(new_ctx), reply, utc_now(), row["id"]])
                n += 1
        mentions = "instr(text, ?) > 0" + (" OR instr(text, '@') > 0" if has_names else "")
        for table, key, cut in (("messages", "message_id", False), ("corrections", "id", True)):
            # Suggested replies are training targets: with quotes to cut, all of them (few).
            where = "TRUE" if cut and grams else mentions
            params = [] if where == "TRUE" else [uid]
            for row in self._rows(f"SELECT {key} AS k, text FROM {table} WHERE guild_id = ? "
                                  f"AND ({where})", [guild_id, *params]):
                text = who.sub("@member", cut_quotes(row["text"], grams) if cut else row["text"])
                if text != row["text"]:
                    self.db.execute(f"UPDATE {table} SET text = ? WHERE guild_id = ? AND "
                                    f"{key} = ?", [text, guild_id, row["k"]])
                    n += 1
        return n

    # -- export and retention ------------------------------------------------------------------

    def export_user(self, user_id: int, guild_id: int | None = None) -> dict[str, Any]:
        """Everything stored of a member, as a JSON-able dict (the /mydata file)."""
        where_g = "" if guild_id is None else " AND guild_id = ?"
        gp: list[Any] = [] if guild_id is None else [guild_id]
        out: dict[str, Any] = {"user_id": str(user_id), "exported_utc": utc_now(),
                               "guild_id": None if guild_id is None else str(guild_id)}
        for table, order in EXPORT_ORDER.items():
            rows = self._rows(f"SELECT * FROM {table} WHERE user_id = ?{where_g} ORDER BY {order}",
                              [user_id, *gp])
            for r in rows:
                if "context_json" in r:
                    # Other members' messages the caller saw stay (it is the caller's
                    # conversation), but not who wrote them.
                    r["context"] = [
                        e if e.get("author_id") in (None, str(user_id)) else
                        {**e, "author_id": None, "message_id": None}
                        for e in json.loads(r.pop("context_json"))]
                for k, v in list(r.items()):
                    if k.endswith("_id") and isinstance(v, int):
                        r[k] = str(v)  # Discord snowflakes exceed JavaScript's safe integers
            out[table] = rows
        # What they said that is stored inside other members' conversations with the bot.
        uid = str(user_id)
        out["your_messages_in_other_conversations"] = [
            {"guild_id": str(g), "message_id": e.get("message_id"), "text": e.get("text"),
             "created_utc": e.get("created_utc")}
            for g, ctx in self.db.execute(
                "SELECT guild_id, context_json FROM interactions WHERE user_id != ? AND "
                "instr(context_json, ?) > 0" + where_g, [user_id, f'"{uid}"', *gp])
            for e in json.loads(ctx)
            if e.get("author_id") == uid and e.get("role") != "assistant"]
        out["adapter_versions_trained_on_your_data"] = [
            {"guild_id": str(r["guild_id"]), "version": r["version"]} for r in self._rows(
                "SELECT guild_id, version FROM adapter_contributors WHERE user_id = ?" + where_g,
                [user_id, *gp])]
        return out

    def purge_older_than(self, days: int, now: datetime | None = None) -> dict[str, int]:
        """Retention: delete interactions and messages created more than ``days`` ago (0 keeps
        all), then truncate the WAL so the deleted text does not stay in it."""
        out = self._purge_older_than(days, now)
        if any(out.values()):
            self.checkpoint()
        return out

    @_writes
    def _purge_older_than(self, days: int, now: datetime | None = None) -> dict[str, int]:
        """Retention: delete interactions and messages created more than ``days`` ago (0 keeps
        all).

        Times are compared as times. A stamp in the stored form (storage.times) compares as
        text, which is what that form is for; any other value is parsed, and one that is not a
        timestamp (a time of day from an old import, say) is kept and logged, never deleted on
        a string comparison.
        """
        if days <= 0:
            return {}
        cutoff = parse_utc(_utc((now or datetime.now(UTC)) - timedelta(days=days)))
        stored = self._stored_form("created_utc")
        out: dict[str, int] = {}
        for table in ("interactions", "messages"):
            n = self.db.execute(f"DELETE FROM {table} WHERE {stored} AND created_utc < ?",
                                [_utc(cutoff)]).rowcount
            expired, unknown = [], 0
            for (value,) in self.db.execute(
                    f"SELECT DISTINCT created_utc FROM {table} WHERE NOT {stored}").fetchall():
                try:
                    if parse_utc(value) < cutoff:
                        expired.append(value)
                except (TypeError, ValueError):
                    unknown += 1
            for value in expired:  # every row with this exact stamp is expired alike
                n += self.db.execute(f"DELETE FROM {table} WHERE created_utc = ?",
                                     [value]).rowcount
            if unknown:
                log.warning("retention: kept %d %s whose created_utc is not a timestamp", unknown,
                            table)
            out[table] = n
        return out

    # -- withdrawn keys and cutoffs ------------------------------------------------------------

    def _mark_withdrawn(self, guild_id: int, user_id: int, reason: str) -> None:
        self.db.execute("INSERT INTO withdrawn (guild_id, user_key, reason, withdrawn_utc, "
                        "lifted_utc) VALUES (?, ?, ?, ?, NULL) ON CONFLICT (guild_id, user_key) "
                        "DO UPDATE SET reason = excluded.reason, "
                        "withdrawn_utc = excluded.withdrawn_utc, lifted_utc = NULL",
                        [guild_id, withdrawn_key(guild_id, user_id), reason, utc_now()])

    def _withdrawals(self, guild_id: int, users: Iterable[int],
                     ) -> list[tuple[int, str, str | None]]:
        """(user, withdrawn_utc, lifted_utc) of every forget or opt-out of ``users`` in the
        guild, and of every forget of theirs everywhere."""
        keys: dict[str, int] = {}
        for u in {int(x) for x in users}:
            keys[withdrawn_key(guild_id, u)] = u
            keys[withdrawn_key(0, u)] = u
        out = []
        items = list(keys)
        for i in range(0, len(items), 500):
            chunk = items[i:i + 500]
            out += [(keys[k], t, lifted) for k, t, lifted in self.db.execute(
                f"SELECT user_key, withdrawn_utc, lifted_utc FROM withdrawn WHERE guild_id IN "
                f"(?, 0) AND user_key IN ({','.join('?' * len(chunk))})", [guild_id, *chunk])]
        return out

    def _withdrawn(self, guild_id: int, users: Iterable[int]) -> set[int]:
        """Which of ``users`` asked to be forgotten or opted out in the guild, or asked to be
        forgotten everywhere, and have not opted in here since."""
        found = {u for u, _, lifted in self._withdrawals(guild_id, users) if lifted is None}
        return found - (set(self._granted(guild_id, found)) if found else set())

    def _cutoffs(self, guild_id: int, users: Iterable[int]) -> dict[int, str]:
        """user -> the time of their last forget or opt-out in the guild (or everywhere): what
        they wrote or rated before it never trains again, even once they opt in anew
        (``after_withdrawal``)."""
        out: dict[int, str] = {}
        for u, t, _ in self._withdrawals(guild_id, users):
            out[u] = max(out.get(u, t), t)
        return out
