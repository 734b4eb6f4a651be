"""``Core``: the chat, feedback, member and admin handlers shared by the Cog and the console.

The front ends translate their events into plain data (ids, text, ``Turn`` lists) and a small
``ReplyChannel`` to send through; everything they have in common lives here, so the console runs
exactly what Discord runs. Store calls go through ``asyncio.to_thread`` (the Store is sync and
holds one SQLite connection per thread); generation goes through the engine, never the loop.
Also here: ``UserError`` (a refusal shown to the member as is), ``ChatOutcome`` (what a chat
did), ``unstorable`` (which write failures cost only the stored copy) and ``forget_text``.

Over 400 lines on purpose: ``Core`` is one class, the handlers both front ends share;
splitting it by command group (chat, feedback, member data, admin) is the next step.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

from bot.context import CHARS_PER_TOKEN, Turn, chat_messages, kept_turns
from bot.engine import GenerationRequest, GenerationResult
from bot.replies import (
    RateLimiter,
    ReplyChannel,
    ReplyStream,
    mark_cut,
    split_reply,
)
from bot.services import Services
from bot.status import FINISHED, StatusReport, like_rate_chart
from guildtune.policy import (
    OPERATOR_OFF,
    SYNC_JOB,
    explain,
    operator_block,
    training_block,
)
from guildtune.prompting import serving_budget, system_prompt
from storage.store import StoreBusyError, StoreFullError

log = logging.getLogger(__name__)

T = TypeVar("T")

PERSONA_MAX_CHARS = 1500
SETTINGS_TTL_S = 30.0

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



def _parse_utc(stamp: str) -> datetime:
    return datetime.strptime(stamp.rstrip("Z")[:19], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC)


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
        return system_prompt(gs.persona, self.s.config.model.system_prompt)

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
        max_chars = serving_budget(m.max_context_tokens, m.max_new_tokens) * CHARS_PER_TOKEN
        persona = await self.persona(guild_id)
        msgs = chat_messages(persona, turns, max_chars)
        # DMs use the base model: no guild, so no guild's adapter and nothing logged.
        req = GenerationRequest(guild_id, msgs)
        stream = self._stream(channel)
        if stream is None:
            async with channel.typing():
                result = await self.s.engine.generate(req)
        else:
            try:
                async with stream.typing():  # until the first part is shown
                    result = await self.s.engine.generate(req, on_text=stream.update)
            except Exception:
                try:
                    await stream.abort()  # no half reply left standing without a word
                except Exception:  # the channel broke too: the engine's error is the story
                    log.warning("could not withdraw a half-streamed reply", exc_info=True)
                raise
            except asyncio.CancelledError:
                # The bot shuts down (or the chat was cancelled): the half reply shown gets a
                # notice, best effort and bounded (``interrupt_timeout_s``), then the cancel
                # goes on.
                await stream.interrupt()
                raise
            except BaseException:
                stream.cancel()
                raise
        # NUL bytes are never legitimate chat text (Discord rejects them, SQLite tools choke).
        reply_text = result.text.replace("\x00", "")
        # A reply cut at max_new_tokens says so (the one rule for the Cog and the console);
        # the log keeps the model's own words.
        parts = split_reply(mark_cut(reply_text) if result.cut else reply_text) or ["…"]
        out = ChatOutcome(result=result)
        if stream is None:
            for i, part in enumerate(parts):
                out.reply_ids.append(await channel.send(part, first=i == 0,
                                                        last=i == len(parts) - 1))
        else:
            # The streamed messages become exactly ``parts``; the controls come last.
            out.reply_ids = await stream.finish(parts)
            if stream.withdrawn:
                # A moderator deleted the reply while it streamed: it is not posted again,
                # and a moderated reply is kept out of the training data (nothing logged).
                return out
        if guild_id is not None:
            # What the model was shown, not the wider window the front end collected.
            context = [t.stored() for t in kept_turns(turns, msgs)]
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

    def _stream(self, channel: ReplyChannel) -> ReplyStream | None:
        """The stream that shows this reply as it is generated, or None: streaming is off
        (``discord.stream_replies``) or the channel cannot edit."""
        d = self.s.config.discord
        if not d.stream_replies or not callable(getattr(channel, "edit", None)):
            return None
        interval = getattr(channel, "edit_interval_s", None)
        if interval is None:
            interval = d.stream_edit_interval_s
        return ReplyStream(channel, clock=self.s.clock, edit_interval_s=float(interval))

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
        last = next((r for r in runs if r.status in FINISHED), None)
        if last is not None and (last.metrics or {}).get("needed") is not None:
            # What arrived since that run read its data counts toward what it said it needed.
            stats["examples_since_last_run"] = await self._db(
                store.examples_since, guild_id, last.created_utc)
        cfg = self.s.config
        tainted = None
        if active is not None and active.tainted_utc is not None:
            tainted = StatusReport.taint(
                active, await self._db(store.versions, guild_id),
                await self._db(store.open_run, guild_id), cfg=cfg, settings=gs)
        schedule = gs.schedule or self.s.config.training.schedule
        png = None
        if chart:
            rows = await self._db(store.like_rate_by_version, guild_id)
            png = await asyncio.to_thread(like_rate_chart, rows)
        return StatusReport.build(
            guild_id, cfg=cfg, settings=gs, stats=stats, active=active, runs=runs,
            engine_version=self.s.engine.active_versions().get(guild_id), schedule=schedule,
            next_run=self._next_run(schedule, training_block(cfg, gs) is None),
            tainted=tainted, chart_png=png)

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
            # A run that could not train (refused, crashed) does not use up the cooldown.
            if r.trigger == "manual" and r.status != "failed":
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
        """The setting is the signal: the worker's scheduler, the one that enqueues training,
        reads it within ``guildtune.schedule.SYNC_SECONDS``. A host that handed the extension a
        scheduler with training jobs of its own (a ``guildtune.policy.SYNC_JOB``) gets it
        applied now; the bot's own scheduler only applies retention and has nothing to move."""
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
        """Show the guild's system prompt (no text), reset it to the default (``reset``), or
        set it. An empty command never wipes a persona an admin wrote."""
        text = (text or "").strip()
        if not text:
            gs = await self.settings(guild_id)
            if not gs.persona:
                return ("This server uses the default system prompt: "
                        f"“{self.s.config.model.system_prompt}”. Set one with "
                        "`/tune persona <text>`.")
            return (f"This server's persona: “{gs.persona}”. `/tune persona reset` "
                    "goes back to the default.")
        if text.lower() == "reset":
            await self._update(guild_id, persona=None)
            return "Persona reset to the default system prompt."
        if len(text) > PERSONA_MAX_CHARS:
            raise UserError(f"The persona is {len(text)} characters; keep it under "
                            f"{PERSONA_MAX_CHARS} (it uses the model's context).")
        await self._update(guild_id, persona=text)
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
