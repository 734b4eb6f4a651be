"""Discord-independent chat, feedback, data and admin logic, shared by the Cog and the console.

The front ends translate their events into plain data (ids, text, ``Turn`` lists) and a small
``ReplyChannel`` to send through; everything they have in common lives here, so the console runs
exactly what Discord runs. Store calls go through ``asyncio.to_thread`` (the Store is sync and
holds one SQLite connection per thread); generation goes through the engine, never the loop.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import sqlite3
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

from bot.engine import AdapterError, GenerationRequest, GenerationResult
from bot.services import Services
from guildtune.data_statement import consent_statement  # noqa: F401 - re-exported (bot.console)
from guildtune.policy import OPERATOR_OFF, SYNC_JOB, explain, operator_block, training_block
from guildtune.prompting import merge_turns
from storage.store import StoreBusyError, StoreFullError
from storage.times import to_utc

log = logging.getLogger(__name__)

T = TypeVar("T")

DISCORD_LIMIT = 2000
PERSONA_MAX_CHARS = 1500
SETTINGS_TTL_S = 30.0
CHARS_PER_TOKEN = 3  # conservative: the engine truncates exactly, this only keeps prompts sane
FENCE_LANG_MAX = 24  # a reopened code fence keeps its language only when it looks like one

# What an admin refused by the operator's switch is told (guildtune.policy).
OPERATOR_TRAINING_OFF = explain(OPERATOR_OFF)


def forget_text(rep: Any) -> str:
    """What a member is told after /forget: only what is true of this ``ForgetReport``."""
    text = f"Done: {rep.total_deleted} stored items deleted and you are opted out."
    if rep.tainted:
        vs = ", ".join(f"v{v}" for _, v in rep.tainted)
        text += f" Model versions trained on your data ({vs}) will not be used again"
        text += (": the server went back to a version without your data until the retrain "
                 "lands." if rep.deactivated else "; a retrain without your data is queued.")
    if rep.in_flight:
        text += (" A training run was in progress: if it read your data, its result will not "
                 "be used, and a retrain without your data follows it.")
    if not rep.tainted and not rep.in_flight:
        text += " No model version was trained on your data."
    return text


class UserError(Exception):
    """A known problem; its message is shown to the member as is (ephemeral on Discord)."""


# -- triggers --------------------------------------------------------------------------------


def reply_reason(*, is_bot: bool, is_system: bool, mentions_everyone: bool, is_dm: bool,
                 mentioned_me: bool, reply_to_me: bool, channel_configured: bool,
                 reply_on_mention: bool = True, reply_on_reply: bool = True,
                 allow_dms: bool = False) -> str | None:
    """Why the bot should answer this message ("mention", "reply", "channel", "dm"), or None."""
    if is_bot or is_system or mentions_everyone:
        return None  # bots (itself included) never trigger a reply: no loops between bots
    if is_dm:
        return "dm" if allow_dms else None
    if mentioned_me and reply_on_mention:
        return "mention"
    if reply_to_me and reply_on_reply:
        return "reply"
    if channel_configured:
        return "channel"
    return None


# -- context ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Turn:
    """One message of the conversation, as the handlers see it.

    ``created_utc`` is when the message was written (a Discord message's ``created_at``, the
    console's clock), in the store's format. It is required, with no default: the store keeps a
    member's text only when it was written after they opted in, and refuses a turn without it.
    """

    role: str  # "user" or "assistant" (the bot's own messages)
    author_id: int | None
    message_id: int | None
    text: str
    created_utc: str = field(kw_only=True)

    def __post_init__(self) -> None:
        # One stored form (UTC, ms, "Z") whatever the caller had: a datetime or any ISO 8601
        # time; anything else is a ValueError here, not a bad row later.
        object.__setattr__(self, "created_utc", to_utc(self.created_utc))

    def stored(self) -> dict[str, Any]:
        """The shape ``store.log_interaction`` takes (it redacts non-consented authors)."""
        return {"role": self.role, "author_id": self.author_id, "message_id": self.message_id,
                "text": self.text, "created_utc": self.created_utc}


def merge_context(chain: Sequence[Turn], recent: Sequence[Turn], current: Turn,
                  limit: int) -> list[Turn]:
    """Reply chain + recent channel messages + the current one, oldest first, deduplicated.

    The reply chain is kept first (it is what the member is answering), then the newest of the
    recent messages fill up to ``limit`` turns before the current message.
    """
    seen = {current.message_id}
    picked: list[Turn] = []
    for t in list(chain) + sorted(recent, key=lambda t: t.message_id or 0, reverse=True):
        if len(picked) >= limit:
            break
        if t.message_id in seen or not t.text.strip():
            continue
        seen.add(t.message_id)
        picked.append(t)
    picked.sort(key=lambda t: t.message_id or 0)  # snowflakes grow with time
    return picked + [current]


def chat_messages(system_prompt: str, turns: Sequence[Turn], max_chars: int) -> list[dict[str, str]]:
    """Chat messages for the engine: system prompt + turns within a character budget.

    Oldest turns go first when over budget; the current (last) turn always stays, cut from its
    start if it alone is too long. Consecutive user turns are merged: many chat templates expect
    alternating roles.
    """
    budget = max(max_chars - len(system_prompt), 200)
    kept: list[Turn] = []
    used = 0
    for t in reversed(turns):
        if kept and used + len(t.text) > budget:
            break
        kept.append(t)
        used += len(t.text)
    kept.reverse()
    turns = merge_turns((t.role, t.text[-budget:]) for t in kept)
    return [{"role": "system", "content": system_prompt},
            *({"role": role, "content": text} for role, text in turns)]


# -- replies ---------------------------------------------------------------------------------


def _open_fence(text: str, start: str | None = None) -> str | None:
    """The language of a code fence left open at the end of ``text`` (None when closed)."""
    lang = start
    for line in text.split("\n"):
        s = line.strip()
        if s.startswith("```"):
            lang = s[3:].strip() if lang is None else None
    return lang


def split_reply(text: str, limit: int = DISCORD_LIMIT) -> list[str]:
    """Split a reply into messages of at most ``limit`` characters.

    Cuts at a paragraph, else a line, else a space, else hard; a code fence open at a cut is
    closed and reopened (same language) in the next part, so each part renders on its own.
    """
    text = text.strip()
    parts: list[str] = []
    fence: str | None = None
    while text:
        # A fence "language" is whatever follows ``` on its line: a hostile or runaway reply can
        # make it thousands of characters, which would not fit in the reopened part.
        lang = fence if fence is not None and len(fence) <= FENCE_LANG_MAX else ""
        prefix = "" if fence is None else f"```{lang}\n"
        if len(prefix) + len(text) <= limit:
            parts.append(prefix + text)
            break
        room = limit - len(prefix) - 4  # 4: room to close a fence ("\n```")
        window = text[:room]
        cut, skip = room, 0
        for sep in ("\n\n", "\n", " "):
            i = window.rfind(sep)
            if i > room // 3:
                cut, skip = i, len(sep)
                break
        chunk, text = text[:cut].rstrip(), text[cut + skip:]
        fence_after = _open_fence(chunk, fence)
        body = prefix + chunk
        if fence_after is not None:
            body += "\n```"
        parts.append(body)
        fence = fence_after
        if fence is None:
            text = text.lstrip("\n")
    return [p for p in parts if p.strip()]


class RateLimiter:
    """Sliding one-minute windows per key (a member, a guild)."""

    def __init__(self, per_minute: int, clock: Callable[[], float]) -> None:
        self.per_minute = per_minute
        self.clock = clock
        self._hits: dict[Any, deque[float]] = {}

    def retry_after(self, key: Any) -> float:
        """Seconds until ``key`` may act again (0 = now), without counting a hit."""
        now = self.clock()
        q = self._hits.get(key)
        if q is None:
            return 0.0
        while q and now - q[0] >= 60.0:
            q.popleft()
        if not q:
            del self._hits[key]  # keeps the dict from growing with every member ever seen
            return 0.0
        return 0.0 if len(q) < self.per_minute else 60.0 - (now - q[0])

    def hit(self, key: Any) -> None:
        self._hits.setdefault(key, deque()).append(self.clock())


class ReplyChannel(Protocol):
    """Where a reply goes: a Discord channel (cog) or the terminal (console)."""

    def typing(self) -> AbstractAsyncContextManager[Any]:
        """Shown while generating."""

    async def send(self, text: str, *, first: bool, last: bool) -> int:
        """Send one part of the reply; returns its message id. ``last`` carries the feedback
        controls (reactions or buttons)."""


def unstorable(exc: BaseException) -> str | None:
    """Why a write failed when the failure must not cost the member their reply (the database
    locked past its retries, the disk full), in words; None for any other error, which the
    caller re-raises. The store raises StoreFullError for a full disk; sqlite3's own "database
    or disk is full" and OSError ENOSPC are matched too, for writes that reach them directly."""
    if isinstance(exc, StoreBusyError):
        return "the database is locked by another process"
    if isinstance(exc, StoreFullError):
        return "the disk is full"
    if isinstance(exc, sqlite3.OperationalError) and "database or disk is full" in str(exc):
        return "the disk is full"
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", None)):
        return "the disk is full"
    return None


@dataclass
class ChatOutcome:
    """What ``Core.chat`` did."""

    reply_ids: list[int] = field(default_factory=list)
    result: GenerationResult | None = None
    logged: bool = False
    interaction_id: str | None = None
    limited: str | None = None  # the friendly rate-limit text, when refused
    not_stored: str | None = None  # why the exchange could not be stored (locked db, full disk)

    @property
    def feedback_message_id(self) -> int | None:
        """The message that carries 👍/👎 (the last part)."""
        return self.reply_ids[-1] if self.reply_ids else None


@dataclass
class StatusReport:
    """/tune status, rendered as an embed (Discord) or lines (console)."""

    guild_id: int
    operator_training: bool
    guild_training: bool
    active_version: int | None
    active_since: str | None
    engine_version: int | None
    examples_since: int
    likes: int
    dislikes: int
    consented_users: int
    last_run: str
    running: str | None
    next_run: str
    schedule: str
    chart_png: bytes | None = None
    # Set when the active version is tainted: ``StatusReport.taint(...)``.
    tainted: dict[str, Any] | None = None

    TAINT_REASON = "trained on data of a member who was forgotten or opted out"

    @staticmethod
    def taint(active: Any, versions: Sequence[Any], open_run: Any, *, cfg: Any,
              settings: Any) -> dict[str, Any] | None:
        """What every status surface (/tune status, the console, ``guildtune status``) says of
        a tainted active version, as JSON-able facts and one ``replacement`` sentence: which
        run will replace it and whether it can (``guildtune.policy.training_block`` for the
        guild's ``settings``), else that the guild stays on it, and the newest clean version a
        rollback returns to. None when the active version is clean."""
        if active is None or active.tainted_utc is None:
            return None
        v = active.version
        fallback = max((x.version for x in versions
                        if x.version < v and x.tainted_utc is None and x.status == "retired"
                        and x.activated_utc), default=None)
        if open_run is None:
            text = (f"no retrain queued: the guild stays on v{v} until a retrain succeeds or "
                    "an admin rolls back")
        elif open_run.status == "running":
            text = (f"retrain run #{open_run.id} is running: v{v} stays active until it "
                    "publishes a clean version")
        else:
            off = training_block(cfg, settings, open_run.force)
            if off is not None:
                text = (f"retrain run #{open_run.id} is queued, but {off}, so it will fail: "
                        f"the guild stays on v{v} until a retrain succeeds or an admin rolls "
                        "back")
            else:
                text = (f"retrain run #{open_run.id} is queued: v{v} stays active until a "
                        "worker trains it and publishes a clean version")
        text += (f"; newest clean version: v{fallback} (a rollback returns to it)"
                 if fallback is not None else "; no clean version: a rollback returns to the "
                 "base model")
        return {"version": v, "tainted_utc": active.tainted_utc,
                "reason": StatusReport.TAINT_REASON,
                "retrain_run": None if open_run is None else
                {"id": open_run.id, "status": open_run.status},
                "newest_clean_version": fallback, "replacement": text}

    def fields(self) -> list[tuple[str, str]]:
        """(name, value) pairs, in display order."""
        training = ("on" if self.guild_training and self.operator_training else
                    "off (operator)" if not self.operator_training else "off")
        active = "base model" if self.active_version is None else f"v{self.active_version}"
        if self.tainted:
            active += f" (tainted: {self.TAINT_REASON})"
        if self.active_since:
            active += f" since {self.active_since[:16].replace('T', ' ')} UTC"
        if self.engine_version != self.active_version:
            serving = "base" if self.engine_version is None else f"v{self.engine_version}"
            active += f" (serving {serving}, swap pending)"
        out = [("Active version", active), ("Training", training),
               ("Examples since it", str(self.examples_since)),
               ("Ratings", f"👍 {self.likes} · 👎 {self.dislikes} · "
                           f"{self.consented_users} members opted in"),
               ("Last run", self.last_run), ("Next scheduled run", self.next_run)]
        if self.tainted:
            out.insert(1, ("Replacement", self.tainted["replacement"]))
        if self.running:
            out.insert(len(out) - 1, ("Running", self.running))
        return out

    def lines(self) -> list[str]:
        return [f"{k}: {v}" for k, v in self.fields()]


def _parse_utc(stamp: str) -> datetime:
    return datetime.strptime(stamp.rstrip("Z")[:19], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC)


def _gate(metrics: dict[str, Any] | None) -> str:
    if not metrics:
        return ""
    nums = [(k, v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                     for k, v in nums[:6])


class Core:
    """The shared handlers. One per bot (or console); state is keyed by guild."""

    def __init__(self, services: Services) -> None:
        self.s = services
        d = services.config.discord
        self.user_limits = RateLimiter(d.user_rate_per_minute, services.clock)
        self.guild_limits = RateLimiter(d.guild_rate_per_minute, services.clock)
        # Reactions are free to spam (add/remove in a loop): each is a write transaction, and a
        # flood must not become a flood of writes nor churn the training data.
        self.feedback_limits = RateLimiter(d.feedback_per_minute, services.clock)
        self._warned: dict[Any, float] = {}
        self._settings: dict[int, tuple[float, Any]] = {}

    async def _db(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await asyncio.to_thread(fn, *args, **kwargs)

    # -- guild settings (cached: read on every message) -----------------------------------------

    async def settings(self, guild_id: int) -> Any:
        """The guild's settings, cached for a few seconds."""
        now = time.monotonic()
        hit = self._settings.get(guild_id)
        if hit is not None and now - hit[0] < SETTINGS_TTL_S:
            return hit[1]
        gs = await self._db(self.s.store.guild_settings, guild_id)
        self._settings[guild_id] = (now, gs)
        return gs

    async def _update(self, guild_id: int, **changes: Any) -> Any:
        gs = await self._db(self.s.store.update_guild_settings, guild_id, **changes)
        self._settings[guild_id] = (time.monotonic(), gs)
        return gs

    async def answer_channels(self, guild_id: int) -> set[int]:
        """Channels where the bot answers without a mention (guild settings + config)."""
        gs = await self.settings(guild_id)
        return set(gs.channels) | set(self.s.config.discord.channels)

    async def persona(self, guild_id: int | None) -> str:
        if guild_id is None:
            return self.s.config.model.system_prompt
        gs = await self.settings(guild_id)
        return gs.persona or self.s.config.model.system_prompt

    # -- chat ------------------------------------------------------------------------------------

    def rate_limited(self, guild_id: int | None, user_id: int) -> str | None:
        """The friendly refusal when the member or the guild is over its limit, else None."""
        wait = self.user_limits.retry_after((guild_id, user_id))
        who = "you are"
        if wait <= 0 and guild_id is not None:
            wait = self.guild_limits.retry_after(guild_id)
            who = "this server is"
        if wait <= 0:
            return None
        return (f"Easy there: {who} sending me more than I can answer right now. "
                f"Try again in {max(1, round(wait))} s.")

    def should_warn(self, guild_id: int | None, user_id: int) -> bool:
        """Say the rate-limit line once per member and minute, not on every message."""
        now = self.s.clock()
        last = self._warned.get((guild_id, user_id))
        if last is not None and now - last < 60:
            return False
        self._warned[(guild_id, user_id)] = now
        return True

    async def chat(self, channel: ReplyChannel, *, guild_id: int | None, channel_id: int,
                   user_id: int, request_message_id: int | None, turns: Sequence[Turn],
                   bot_id: int | None = None) -> ChatOutcome:
        """Answer ``turns`` (context, the member's message last) in ``channel`` and log it."""
        limited = self.rate_limited(guild_id, user_id)
        if limited is not None:
            out = ChatOutcome(limited=limited)
            if self.should_warn(guild_id, user_id):
                out.reply_ids.append(await channel.send(limited, first=True, last=False))
            return out
        self.user_limits.hit((guild_id, user_id))
        if guild_id is not None:
            self.guild_limits.hit(guild_id)
        m = self.s.config.model
        max_chars = max(m.max_context_tokens - m.max_new_tokens, 64) * CHARS_PER_TOKEN
        msgs = chat_messages(await self.persona(guild_id), turns, max_chars)
        async with channel.typing():
            # DMs use the base model: no guild, so no guild's adapter and nothing logged.
            result = await self.s.engine.generate(GenerationRequest(guild_id, msgs))
        # NUL bytes are never legitimate chat text (Discord rejects them, SQLite tools choke).
        reply_text = result.text.replace("\x00", "")
        parts = split_reply(reply_text) or ["…"]
        out = ChatOutcome(result=result)
        for i, part in enumerate(parts):
            out.reply_ids.append(await channel.send(part, first=i == 0,
                                                    last=i == len(parts) - 1))
        if guild_id is not None:
            context = [t.stored() for t in turns]
            try:
                res = await self._db(
                    self.s.store.log_interaction, guild_id, channel_id, user_id,
                    context=context, reply=reply_text, request_message_id=request_message_id,
                    reply_message_id=out.feedback_message_id,
                    adapter_version=result.adapter_version, tokens_in=result.tokens_in,
                    tokens_out=result.tokens_out, latency_ms=result.latency_ms)
            except Exception as exc:
                why = unstorable(exc)
                if why is None:
                    raise
                # The member has their answer; only the training signal of this one exchange
                # is lost, and the log (and the console) say so.
                out.not_stored = why
                log.warning("guild %s: reply sent but not logged: %s (%s)", guild_id, why, exc)
                return out
            out.logged, out.interaction_id = res.stored, res.interaction_id
        return out

    async def observe_message(self, guild_id: int, message_id: int, user_id: int, text: str, *,
                              channel_id: int, reply_to: int | None,
                              created_utc: str | None = None) -> bool:
        """Keep a human message for training when the guild learns from humans (and the
        author consented: the store checks). ``text`` is in the readable form the front end
        also uses for chat context (the Cog's ``_text``: mentions as ``@name``);
        ``created_utc`` is when it was written (default: now). A full disk or a locked database
        loses this one message, never the reply."""
        if not text.strip() or not (await self.settings(guild_id)).learn_from_humans:
            return False
        try:
            return await self._db(self.s.store.log_message, guild_id, message_id, user_id, text,
                                  channel_id=channel_id, reply_to_message_id=reply_to,
                                  created_utc=created_utc)
        except Exception as exc:
            why = unstorable(exc)
            if why is None:
                raise
            # Keeping a message is a side line: a full disk must not stop the bot answering.
            log.warning("guild %s: message %s not kept: %s (%s)", guild_id, message_id, why,
                        exc)
            return False

    # -- feedback --------------------------------------------------------------------------------

    def feedback_limited(self, guild_id: int, user_id: int) -> str | None:
        """The refusal when the member rated more than ``discord.feedback_per_minute`` times in
        the last minute, else None."""
        wait = self.feedback_limits.retry_after((guild_id, user_id))
        if wait <= 0:
            return None
        return (f"You are rating faster than I can note it; try again in "
                f"{max(1, round(wait))} s.")

    async def rate(self, guild_id: int, message_id: int, user_id: int, rating: int) -> bool:
        """Record a 👍 (+1) / 👎 (-1); False when nothing was stored (not opted in, not ours,
        or over the member's feedback rate limit)."""
        if self.feedback_limited(guild_id, user_id) is not None:
            log.debug("guild %s: feedback of member %s dropped (rate limit)", guild_id, user_id)
            return False
        stored = await self._db(self.s.store.record_feedback, guild_id, message_id, user_id,
                                rating)
        if stored:  # only stored ratings count: 👍 on members' messages are everyday Discord
            self.feedback_limits.hit((guild_id, user_id))
        return stored

    async def unrate(self, guild_id: int, message_id: int, user_id: int, rating: int) -> bool:
        """Withdraw a rating. Never rate limited: a member taking a rating back is always
        honoured (refusing it would keep data they withdrew)."""
        return await self._db(self.s.store.remove_feedback, guild_id, message_id, user_id, rating)

    async def suggest(self, guild_id: int, message_id: int, user_id: int, text: str) -> str:
        """Store a better reply for the bot reply in ``message_id``; returns the answer text."""
        if not await self._db(self.s.store.has_consent, guild_id, user_id):
            raise UserError("Suggestions are stored only for members who opted in: use /consent "
                            "first.")
        row = await self._db(self.s.store.interaction_for_message, guild_id, message_id)
        if row is None:
            raise UserError("That reply was not logged (its author had not opted in), so there "
                            "is nothing to attach a suggestion to.")
        cid = await self._db(self.s.store.add_correction, guild_id, row["id"], user_id, text)
        if cid is None:
            raise UserError("Nothing was stored: the suggestion was empty.")
        return "Thanks! Your better reply will be used the next time this server's model trains."

    async def message_deleted(self, guild_id: int, message_id: int) -> int:
        return await self._db(self.s.store.delete_message, guild_id, message_id)

    async def message_edited(self, guild_id: int, message_id: int, text: str) -> int:
        """A message was edited: update its stored copies. ``text`` is in the same readable
        form as ``observe_message`` and chat context (mentions as ``@name``)."""
        return await self._db(self.s.store.edit_message, guild_id, message_id, text)

    # -- member commands -------------------------------------------------------------------------

    async def has_consent(self, guild_id: int, user_id: int) -> bool:
        return await self._db(self.s.store.has_consent, guild_id, user_id)

    async def consent(self, guild_id: int, user_id: int, on: bool) -> str:
        """Opt in or out; returns the confirmation text."""
        if on:
            new = await self._db(self.s.store.grant_consent, guild_id, user_id)
            return ("You opted in. Thank you! Your conversations with the bot and your ratings "
                    "will be stored." if new else "You were already opted in.")
        was = await self._db(self.s.store.revoke_consent, guild_id, user_id,
                             strict=self.s.config.training.withdraw_at_once)
        return ("You opted out: nothing new of yours will be stored, and what was stored is "
                "no longer used to train (model versions that learned from it are retrained "
                "without it). It stays stored until you use /forget." if was else
                "You were not opted in; nothing is stored.")

    async def export(self, guild_id: int, user_id: int) -> bytes:
        """The member's data in this guild as pretty JSON (the /mydata file)."""
        data = await self._db(self.s.store.export_user, user_id, guild_id)
        return json.dumps(data, indent=2, ensure_ascii=False, default=str).encode()

    async def forget(self, guild_id: int, user_id: int, names: Sequence[str] = ()) -> str:
        """Delete everything of the member in this guild (their id and ``names`` also leave
        other members' stored texts); the text tells them truthfully what happens to the
        model."""
        rep = await self._db(self.s.store.forget_user, user_id, guild_id,
                             strict=self.s.config.training.withdraw_at_once,
                             names=tuple(names))
        return forget_text(rep)

    # -- admin commands --------------------------------------------------------------------------

    def _next_run(self, schedule: str, enabled: bool) -> str:
        if not enabled:
            return "none (training is off)"
        from apscheduler.triggers.cron import CronTrigger

        nxt = CronTrigger.from_crontab(schedule, timezone="UTC").get_next_fire_time(
            None, datetime.fromtimestamp(self.s.clock(), UTC))
        return f"{nxt:%Y-%m-%d %H:%M} UTC ({schedule})" if nxt else "never"

    async def status(self, guild_id: int, *, chart: bool = True) -> StatusReport:
        """Everything /tune status shows."""
        store = self.s.store
        stats = await self._db(store.guild_stats, guild_id)
        gs = await self._db(store.guild_settings, guild_id)
        active = await self._db(store.active_version, guild_id)
        runs = await self._db(store.runs, guild_id, 10)
        cfg = self.s.config
        op = operator_block(cfg) is None
        tainted = None
        if active is not None and active.tainted_utc is not None:
            tainted = StatusReport.taint(
                active, await self._db(store.versions, guild_id),
                await self._db(store.open_run, guild_id), cfg=cfg, settings=gs)
        last = next((r for r in runs if r.status in ("succeeded", "failed", "rejected")), None)
        if last is None:
            last_text = "none yet"
        else:
            last_text = f"#{last.id} {last.status} ({last.trigger}"
            last_text += f", {last.finished_utc[:16].replace('T', ' ')} UTC)" \
                if last.finished_utc else ")"
            if last.version is not None:
                last_text += f" → v{last.version}"
            gate = _gate(last.metrics)
            if gate:
                last_text += f"; gate: {gate}"
            if last.error:
                last_text += f"; {last.error[:120]}"
        running = None
        open_run = stats.get("open_run")
        if open_run:
            prog = open_run.get("progress") or {}
            bits = [f"{k} {v}" for k, v in prog.items() if isinstance(v, (int, float, str))][:4]
            running = f"#{open_run['id']} {open_run['status']}" + (
                f": {', '.join(bits)}" if bits else "")
        schedule = gs.schedule or self.s.config.training.schedule
        png = None
        if chart:
            rows = await self._db(store.like_rate_by_version, guild_id)
            png = await asyncio.to_thread(_chart, rows)
        return StatusReport(
            guild_id=guild_id, operator_training=op, guild_training=gs.training_enabled,
            active_version=active.version if active else None,
            active_since=active.activated_utc if active else None,
            engine_version=self.s.engine.active_versions().get(guild_id),
            examples_since=int(stats.get("examples_since_active") or 0),
            likes=int(stats.get("likes") or 0), dislikes=int(stats.get("dislikes") or 0),
            consented_users=int(stats.get("consented_users") or 0), last_run=last_text,
            running=running,
            next_run=self._next_run(schedule, training_block(cfg, gs) is None),
            schedule=schedule, chart_png=png, tainted=tainted)

    async def _require_training(self, guild_id: int) -> None:
        """UserError with ``guildtune.policy``'s reason when the guild may not train now (the
        operator's refusal with Discord's policy behind it)."""
        gs = await self._db(self.s.store.guild_settings, guild_id)
        reason = training_block(self.s.config, gs)
        if reason is not None:
            raise UserError(explain(reason))

    async def retrain(self, guild_id: int, user_id: int) -> str:
        """Queue a training run now, at most once per cooldown."""
        await self._require_training(guild_id)
        cooldown = self.s.config.discord.retrain_cooldown_minutes * 60
        runs = await self._db(self.s.store.runs, guild_id, 20)
        now = self.s.clock()
        for r in runs:
            if r.trigger == "manual":
                age = now - _parse_utc(r.created_utc).timestamp()
                if age < cooldown:
                    raise UserError(f"A retrain was requested {int(age // 60)} min ago; the next "
                                    f"one is possible in {int((cooldown - age) // 60) + 1} min.")
                break
        run_id, created = await self._db(self.s.store.enqueue_run, guild_id, "manual",
                                         requested_by=user_id)
        if not created:
            return f"Run #{run_id} is already queued or running; see `/tune status`."
        return (f"Retrain queued as run #{run_id}. If the new version beats the current one on "
                "held-out data it goes live by itself within seconds of finishing.")

    async def rollback(self, guild_id: int) -> str:
        """Go back to the previous good version (or the base model)."""
        if await self._db(self.s.store.active_version, guild_id) is None:
            raise UserError("This server is already on the base model; nothing to roll back.")
        prev = await self._db(self.s.store.rollback, guild_id)
        where = "the base model" if prev is None else f"v{prev.version}"
        return f"Rolled back: this server now uses {where} (live within seconds)."

    async def set_training(self, guild_id: int, on: bool) -> str:
        """Turn training on/off for the guild (refused while the operator has it off)."""
        reason = operator_block(self.s.config)
        if on and reason is not None:
            raise UserError(explain(reason))
        await self._update(guild_id, training_enabled=on)
        await self._reschedule()
        if on:
            return ("Training is on for this server. Only data of members who opted in with "
                    "/consent is used.")
        return "Training is off for this server; the current version keeps serving."

    async def set_schedule(self, guild_id: int, crontab: str) -> str:
        """Set the guild's training schedule (5-field crontab, UTC)."""
        from apscheduler.triggers.cron import CronTrigger

        crontab = " ".join(crontab.split())
        try:
            CronTrigger.from_crontab(crontab, timezone="UTC")
        except ValueError as exc:
            raise UserError(f"`{crontab}` is not a 5-field crontab in UTC such as `0 4 * * *` "
                            f"(every day at 04:00): {exc}") from None
        await self._update(guild_id, schedule=crontab)
        await self._reschedule()
        gs = await self.settings(guild_id)
        nxt = self._next_run(crontab, training_block(self.s.config, gs) is None)
        return f"Schedule set to `{crontab}` (UTC). Next run: {nxt}."

    async def _reschedule(self) -> None:
        """Apply a changed schedule or training switch to the running scheduler now (it also
        re-reads the settings by itself every few minutes): run the scheduler's own sync job
        (``guildtune.policy.SYNC_JOB``). A scheduler without it (training off by the operator:
        no training jobs to move) has nothing to apply."""
        get_job = getattr(self.s.scheduler, "get_job", None)
        if get_job is None:
            return
        try:
            job = get_job(SYNC_JOB)
            if job is not None:
                await asyncio.to_thread(job.func, *job.args, **job.kwargs)
        except Exception:  # the setting is saved; the scheduler's own sync picks it up later
            log.exception("rescheduling training jobs failed")

    async def set_persona(self, guild_id: int, text: str | None) -> str:
        """Set (or with empty text, reset) the guild's system prompt."""
        text = (text or "").strip()
        if len(text) > PERSONA_MAX_CHARS:
            raise UserError(f"The persona is {len(text)} characters; keep it under "
                            f"{PERSONA_MAX_CHARS} (it uses the model's context).")
        await self._update(guild_id, persona=text or None)
        if not text:
            return "Persona reset to the default system prompt."
        return "Persona updated: replies use it from now on."

    async def channels(self, guild_id: int, action: str, channel_id: int | None) -> str:
        """add/remove/list the channels where the bot answers without a mention."""
        gs = await self._db(self.s.store.guild_settings, guild_id)
        current = set(gs.channels)
        if action == "list":
            pass
        elif channel_id is None:
            raise UserError(f"Name a channel to {action}.")
        elif action == "add":
            current.add(channel_id)
        elif action == "remove":
            if channel_id not in current:
                raise UserError(f"<#{channel_id}> is not in the list.")
            current.discard(channel_id)
        else:
            raise UserError(f"Unknown action {action!r}: use add, remove or list.")
        if action != "list":
            gs = await self._update(guild_id, channels=sorted(current))
        listed = ", ".join(f"<#{c}>" for c in gs.channels) or "none (mention me instead)"
        return f"Channels where I answer every message: {listed}"


def _chart(rows: list[dict[str, Any]]) -> bytes | None:
    from bot.charts import like_rate_png

    try:
        return like_rate_png(rows)
    except Exception:  # a chart is a nicety: status must still answer without it
        log.exception("like-rate chart failed")
        return None


class AdapterWatcher:
    """Keeps the engine serving what storage says is active (new versions, rollbacks).

    Polls ``store.active_versions()`` every ``interval`` seconds: the trainer runs in another
    process and meets the bot only through SQLite. A guild whose activation fails (an
    AdapterError, or anything unexpected) is logged and keeps its old version; the other guilds'
    swaps and deactivations in the same poll go on. ``_failed`` is the one home of the backoff
    rule: the same (guild, version) is not retried until storage names another version.
    """

    def __init__(self, services: Services, interval: float = 5.0,
                 notify: Callable[[int, str], Awaitable[None]] | None = None) -> None:
        self.s = services
        self.interval = interval
        self.notify = notify
        self._task: asyncio.Task[None] | None = None
        self._failed: dict[int, int] = {}  # guild -> version whose activation failed
        self._stuck: set[int] = set()  # guilds whose deactivation failed (retried every poll)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Start polling (inside the running loop)."""
        if not self.running:
            self._task = asyncio.get_running_loop().create_task(self._loop(),
                                                               name="guildtune-adapter-watcher")

    async def stop(self) -> None:
        """Stop polling and wait until the task has ended."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

    async def _loop(self) -> None:
        while True:
            try:
                await self.sync_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # keep watching: a bad poll must not end hot swapping
                log.exception("adapter watcher poll failed")
            await asyncio.sleep(self.interval)

    async def _withdrawn(self, guild_id: int, version: int | None) -> bool:
        """Whether a served version must not go on serving: tainted, or unknown to storage."""
        if version is None:
            return False
        info = await asyncio.to_thread(self.s.store.get_version, guild_id, version)
        return info is None or info.tainted_utc is not None

    async def sync_once(self) -> list[str]:
        """One poll: bring the engine in line with storage. Returns what changed, as lines."""
        wanted = await asyncio.to_thread(self.s.store.active_versions)
        serving = self.s.engine.active_versions()
        # Forget failures the store has moved on from: a version named again later is retried.
        self._failed = {g: v for g, v in self._failed.items() if g in wanted and
                        wanted[g][0] == v}
        changes: list[tuple[int, str]] = []
        for guild_id, (version, path) in sorted(wanted.items()):
            if serving.get(guild_id) == version or self._failed.get(guild_id) == version:
                continue
            try:
                await self.s.engine.activate(guild_id, version, path)
            except Exception as exc:  # one guild's adapter must not stop the others' swaps
                self._failed[guild_id] = version
                keeping = serving.get(guild_id, "the base model")
                if isinstance(exc, AdapterError):
                    log.error("guild %s: cannot activate adapter v%s (%s); keeping %s",
                              guild_id, version, exc, keeping)
                    why = str(exc)
                else:  # a bug, not a bad file: keep the traceback, still contain it
                    log.exception("guild %s: activating adapter v%s failed unexpectedly; "
                                  "keeping %s", guild_id, version, keeping)
                    why = f"internal error: {type(exc).__name__}"
                if await self._withdrawn(guild_id, serving.get(guild_id)):
                    # The version it would keep learned from a member who was forgotten or
                    # opted out: the base model serves instead until a loadable one arrives.
                    try:
                        await self.s.engine.deactivate(guild_id)
                        serving.pop(guild_id, None)
                    except Exception:
                        log.exception("guild %s: deactivating a withdrawn version failed",
                                      guild_id)
                    changes.append((guild_id, f"⚠️ v{version} could not be loaded ({why}); "
                                              "serving the base model."))
                    continue
                changes.append((guild_id, f"⚠️ v{version} could not be loaded ({why}); still "
                                          "serving the previous version."))
                continue
            self._failed.pop(guild_id, None)
            log.info("guild %s: now serving adapter v%s", guild_id, version)
            changes.append((guild_id, f"Now serving model v{version}."))
        for guild_id in sorted(set(serving) - set(wanted)):
            try:
                await self.s.engine.deactivate(guild_id)
            except Exception:  # retried every poll: the guild asked to leave its adapter
                if guild_id not in self._stuck:
                    self._stuck.add(guild_id)
                    log.exception("guild %s: deactivating its adapter failed; retrying every "
                                  "poll", guild_id)
                continue
            self._stuck.discard(guild_id)
            log.info("guild %s: back on the base model", guild_id)
            changes.append((guild_id, "Back on the base model."))
        if self.notify is not None:
            for guild_id, line in changes:
                try:
                    await self.notify(guild_id, line)
                except Exception:  # the admin log is optional; swapping already happened
                    log.exception("admin log post failed")
        return [line for _, line in changes]
