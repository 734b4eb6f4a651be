"""The guildtune Cog: reply listeners, feedback, member data commands and the /tune group.

Intents it relies on (the host decides; the Cog never changes them): guilds, guild messages,
message content (privileged) and guild message reactions. The Cog only adds listeners: it never
overrides the host's ``on_message`` or ``on_error`` and never syncs commands. Its buttons, views
and Discord reply are in ``bot.ui``; the admin check of every /tune command is ``bot.checks``.

Over 400 lines on purpose: discord.py declares listeners and the /tune group on the Cog
class itself; every handler body is a call into ``bot.core``.
"""

from __future__ import annotations

import asyncio
import io
import logging
import re
from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import Any, Literal

import discord
from discord import app_commands
from discord.ext import commands

from bot.checks import ADMIN_PERMISSIONS, NOT_ADMIN, admin_ok, admin_only
from bot.context import Turn, merge_context, reply_reason
from bot.core import Core, UserError
from bot.replies import POLITE_FAILURE
from bot.services import Services
from bot.ui import (
    COG_NAME,
    NO_MENTIONS,
    THUMBS,
    ConsentView,
    DiscordReply,
    ForgetView,
    RateButton,
    SuggestButton,
    answer,
)
from bot.watcher import AdapterWatcher
from guildtune.data_statement import consent_statement
from storage.times import format_utc

log = logging.getLogger(__name__)

__all__ = ["COG_NAME", "NOT_ADMIN", "POLITE_FAILURE", "GuildTuneCog", "RateButton",
           "SuggestButton", "readable_mentions", "services_interval"]

_MENTION = re.compile(r"<@([!&]?)(\d+)>")
_CHANNEL_MENTION = re.compile(r"<#(\d+)>")


def readable_mentions(text: str, *, me: int | None, member: Callable[[int], str | None],
                      role: Callable[[int], str | None],
                      channel: Callable[[int], str | None]) -> str:
    """``text`` with every mention as a name: ``<@id>`` -> ``@name`` (``@member`` when
    ``member`` does not know the id), ``<@&id>`` -> ``@role-name`` (``@role``), ``<#id>`` ->
    ``#name`` (``#channel``); the bot's own mention (``me``) is removed. Never a raw id.

    One pass with a function as the replacement: names are chosen by members, and a name such
    as ``\\g<0>`` or ``x\\`` must stay text (a template would make re.sub raise or inject), nor
    be scanned again for markup.
    """
    def user_or_role(m: re.Match[str]) -> str:
        kind, ident = m[1], int(m[2])
        if kind == "&":
            name = role(ident)
            return "@" + name.lstrip("@") if name else "@role"  # the @everyone role has its @
        if me is not None and ident == me:
            return ""
        name = member(ident)
        return f"@{name}" if name else "@member"

    def chan(m: re.Match[str]) -> str:
        name = channel(int(m[1]))
        return f"#{name}" if name else "#channel"

    return _CHANNEL_MENTION.sub(chan, _MENTION.sub(user_or_role, text)).strip()


# -- the Cog ---------------------------------------------------------------------------------


class GuildTuneCog(commands.Cog, name=COG_NAME):
    """Per-guild tuned chat, feedback, consent and admin commands."""

    tune = app_commands.Group(
        name="tune", description="Manage this server's tuned model",
        guild_only=True, default_permissions=ADMIN_PERMISSIONS)

    def __init__(self, bot: commands.Bot, services: Services, *,
                 owner: AsyncExitStack | None = None) -> None:
        self.bot = bot
        self.services = services
        # What the extension opened for this Cog (store, engine): closed in cog_unload. A host
        # that handed its own services in closes them itself.
        self._owner = owner
        self.core = Core(services)
        # A shard process loads only its own guilds' adapters (a guild is cached by the time
        # its first message arrives; one that joins later is picked up by the next poll).
        self.watcher = AdapterWatcher(
            services, services_interval(services), self._admin_log,
            serves=(lambda g: bot.get_guild(g) is not None)
            if isinstance(bot, commands.AutoShardedBot) else None)
        self._scheduler: Any | None = None  # the scheduler this Cog started (and stops)

    # -- lifecycle: what cog_load starts, cog_unload stops ------------------------------------

    async def cog_load(self) -> None:
        self.bot.add_dynamic_items(RateButton, SuggestButton)
        self.watcher.start()
        self._start_scheduler()

    async def cog_unload(self) -> None:
        await self.watcher.stop()
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)
            self._scheduler = None
            # AsyncIOScheduler.shutdown runs via call_soon_threadsafe: let it finish before
            # unload returns, so nothing of ours is still running afterwards.
            await asyncio.sleep(0)
        self.bot.remove_dynamic_items(RateButton, SuggestButton)
        if self._owner is not None:
            owner, self._owner = self._owner, None
            await owner.aclose()

    def _start_scheduler(self) -> None:
        # Always: the retention job (privacy.retention_days, promised by /consent) runs whatever
        # the training switch says. Only that: the worker's scheduler is the one that enqueues
        # training; the bot signals through the settings rows it writes.
        s = self.services
        sched = s.scheduler
        if sched is None:
            from guildtune.schedule import make_scheduler

            try:
                sched = make_scheduler(s.store, s.config, asyncio=True, training=False)
            except Exception:  # chat must keep working without the scheduler
                log.exception("scheduler failed to start: no retention purge in this process")
                return
            s.scheduler = sched
        if not getattr(sched, "running", False):
            sched.start()
            self._scheduler = sched

    async def _admin_log(self, guild_id: int, line: str) -> None:
        channel_id = self.services.config.discord.admin_log_channel
        if not channel_id:
            return
        channel = self.bot.get_channel(channel_id)
        if isinstance(channel, discord.abc.Messageable):
            guild = self.bot.get_guild(guild_id)
            name = guild.name if guild else str(guild_id)
            await channel.send(f"guildtune · {name}: {line}", allowed_mentions=NO_MENTIONS)

    # -- messages ------------------------------------------------------------------------------

    def _readable(self, text: str, guild: discord.Guild | None, names: dict[int, str]) -> str:
        """``text`` with mention markup in the one stored and prompted form: ``@name`` for a
        member (the guild's cache first, then ``names`` from the message or its raw payload,
        else ``@member``), ``@role-name`` (else ``@role``), ``#channel-name`` (else
        ``#channel``); the bot's own mention is dropped. Used for chat context, kept messages
        and edits alike, so no stored text carries a raw id."""
        me = self.bot.user

        def member(user_id: int) -> str | None:
            m = guild.get_member(user_id) if guild is not None else None
            return m.display_name if m is not None else names.get(user_id)

        def role(role_id: int) -> str | None:
            r = guild.get_role(role_id) if guild is not None else None
            return r.name if r is not None else None

        def channel(channel_id: int) -> str | None:
            # Only this guild's channels: another guild's channel name is not ours to show.
            c = guild.get_channel_or_thread(channel_id) if guild is not None else None
            return c.name if c is not None else None

        return readable_mentions(text, me=me.id if me is not None else None, member=member,
                                 role=role, channel=channel)

    def _text(self, message: discord.Message) -> str:
        """A member's message as the bot stores and prompts it (see ``_readable``)."""
        return self._readable(message.content, message.guild,
                              {u.id: u.display_name for u in message.mentions})

    @staticmethod
    def _reply_reference(message: discord.Message) -> discord.MessageReference | None:
        """The message's reference when it is a reply within its own channel and guild, else
        None. A forward (``MessageReferenceType.forward``), a crosspost from a followed channel
        or anything pointing at another guild or channel carries someone else's conversation:
        it is never followed into this guild's context."""
        ref = message.reference
        if ref is None or ref.message_id is None:
            return None
        if ref.type is not discord.MessageReferenceType.reply:
            return None
        home = message.guild.id if message.guild is not None else None
        if ref.guild_id is not None and ref.guild_id != home:
            return None
        if ref.channel_id != message.channel.id:  # Discord replies stay in their channel
            return None
        return ref

    @staticmethod
    def _same_place(found: discord.Message, message: discord.Message) -> bool:
        """Whether ``found`` is a message of ``message``'s channel and guild. The client's
        message cache is global (every guild): what it returns is checked, not trusted."""
        home = message.guild.id if message.guild is not None else None
        where = found.guild.id if found.guild is not None else None
        return where == home and found.channel.id == message.channel.id

    async def _referenced(self, message: discord.Message) -> discord.Message | None:
        """The message that ``message`` replies to, in the same channel and guild, or None."""
        ref = self._reply_reference(message)
        if ref is None:
            return None
        found = ref.resolved if isinstance(ref.resolved, discord.Message) else ref.cached_message
        if found is None:
            # Only ever in the current channel (checked above to be the reply's).
            try:
                found = await message.channel.fetch_message(
                    ref.message_id)  # type: ignore[arg-type]
            except discord.HTTPException:
                return None
        if found.id != ref.message_id or not self._same_place(found, message):
            return None
        return found

    def _turn(self, message: discord.Message) -> Turn:
        me = self.bot.user
        mine = me is not None and message.author.id == me.id
        return Turn("assistant" if mine else "user", message.author.id, message.id,
                    message.content if mine else self._text(message),
                    created_utc=format_utc(message.created_at))

    async def _context(self, message: discord.Message,
                       parent: discord.Message | None) -> list[Turn]:
        limit = self.services.config.discord.context_messages
        chain: list[Turn] = []
        node = parent
        while node is not None and len(chain) < limit:
            if not self._same_place(node, message):
                break  # never another guild's (or channel's) conversation
            chain.append(self._turn(node))
            node = await self._referenced(node)
        recent: list[Turn] = []
        if limit > len(chain):
            try:
                async for m in message.channel.history(limit=limit, before=message):
                    if not m.is_system() and self._same_place(m, message):
                        recent.append(self._turn(m))
            except (discord.HTTPException, AttributeError):  # no Read History permission
                pass
        return merge_context(chain, recent, self._turn(message), limit)

    @commands.Cog.listener("on_message")
    async def guildtune_on_message(self, message: discord.Message) -> None:
        me = self.bot.user
        if me is None:
            return
        guild_id = message.guild.id if message.guild else None
        d = self.services.config.discord
        system = message.is_system()
        if guild_id is not None and not message.author.bot and not system:
            # The same readable text as chat context; a reply's parent only within this guild
            # and channel (a forward or a cross-guild reference is not a reply pair here).
            ref = self._reply_reference(message)
            await self.core.observe_message(guild_id, message.id, message.author.id,
                                            self._text(message), channel_id=message.channel.id,
                                            reply_to=ref.message_id if ref else None,
                                            created_utc=format_utc(message.created_at))
        if message.author.bot or system or message.mention_everyone:
            return
        parent = await self._referenced(message)
        configured = (guild_id is not None and
                      message.channel.id in await self.core.answer_channels(guild_id))
        reason = reply_reason(
            is_bot=message.author.bot, is_system=system, mentions_everyone=message.mention_everyone,
            is_dm=guild_id is None,
            mentioned_me=bool(re.search(rf"<@!?{me.id}>", message.content)),
            reply_to_me=parent is not None and parent.author.id == me.id,
            channel_configured=configured, reply_on_mention=d.reply_on_mention,
            reply_on_reply=d.reply_on_reply, allow_dms=d.allow_dms)
        if reason is None:
            return
        turns = await self._context(message, parent)
        await self.core.chat(DiscordReply(message, d.feedback), guild_id=guild_id,
                             channel_id=message.channel.id, user_id=message.author.id,
                             request_message_id=message.id, turns=turns, bot_id=me.id)

    # -- raw events: work on messages that are not in the cache --------------------------------

    @commands.Cog.listener("on_raw_reaction_add")
    async def guildtune_reaction_add(self, payload: discord.RawReactionActionEvent) -> None:
        rating = THUMBS.get(str(payload.emoji))
        if rating is None or payload.guild_id is None or self._is_me(payload.user_id):
            return
        if payload.member is not None and payload.member.bot:
            return
        await self.core.rate(payload.guild_id, payload.message_id, payload.user_id, rating)

    @commands.Cog.listener("on_raw_reaction_remove")
    async def guildtune_reaction_remove(self, payload: discord.RawReactionActionEvent) -> None:
        rating = THUMBS.get(str(payload.emoji))
        if rating is None or payload.guild_id is None or self._is_me(payload.user_id):
            return
        await self.core.unrate(payload.guild_id, payload.message_id, payload.user_id, rating)

    @commands.Cog.listener("on_raw_message_delete")
    async def guildtune_message_delete(self, payload: discord.RawMessageDeleteEvent) -> None:
        if payload.guild_id is not None:
            await self.core.message_deleted(payload.guild_id, payload.message_id)

    @commands.Cog.listener("on_raw_bulk_message_delete")
    async def guildtune_bulk_delete(self, payload: discord.RawBulkMessageDeleteEvent) -> None:
        if payload.guild_id is not None:
            for message_id in payload.message_ids:
                await self.core.message_deleted(payload.guild_id, message_id)

    @commands.Cog.listener("on_raw_message_edit")
    async def guildtune_message_edit(self, payload: discord.RawMessageUpdateEvent) -> None:
        data: dict[str, Any] = dict(payload.data)
        content = data.get("content")
        if payload.guild_id is None or content is None:  # embed-only updates carry no text
            return
        author = data.get("author") or {}
        if not self._is_me(int(author.get("id") or 0)):
            # The raw payload's own mention list names members the cache may not hold.
            names: dict[int, str] = {}
            for u in data.get("mentions") or []:
                name = ((u.get("member") or {}).get("nick") or u.get("global_name") or
                        u.get("username"))
                if u.get("id") and name:
                    names[int(u["id"])] = str(name)
            content = self._readable(content, self.bot.get_guild(payload.guild_id), names)
        await self.core.message_edited(payload.guild_id, payload.message_id, content)

    def _is_me(self, user_id: int) -> bool:
        return self.bot.user is not None and self.bot.user.id == user_id

    # -- command plumbing ----------------------------------------------------------------------

    # The one admin check (bot.checks), also under the Cog's own name: tests ask it directly.
    _admin_ok = staticmethod(admin_ok)

    async def cog_app_command_error(self, interaction: discord.Interaction,
                                    error: app_commands.AppCommandError) -> None:
        original = getattr(error, "original", error)
        if isinstance(original, UserError):
            await answer(interaction, str(original))
            return
        if isinstance(error, app_commands.CheckFailure):
            await answer(interaction, str(error) or NOT_ADMIN)
            return
        cmd = interaction.command.qualified_name if interaction.command else "?"
        log.error("/%s failed in guild %s", cmd, interaction.guild_id, exc_info=original)
        try:
            await answer(interaction, POLITE_FAILURE)
        except discord.HTTPException:
            pass

    # -- member commands -----------------------------------------------------------------------

    @app_commands.command(name="consent",
                          description="What guildtune stores about you; opt in or out")
    @app_commands.guild_only()
    async def consent_cmd(self, interaction: discord.Interaction) -> None:
        assert interaction.guild_id is not None
        name = interaction.guild.name if interaction.guild else "this server"
        state = await self.core.has_consent(interaction.guild_id, interaction.user.id)
        text = consent_statement(name, self.services.config)
        text += f"\n\nYou are currently **{'opted in' if state else 'not opted in'}**."
        await answer(interaction, text, view=ConsentView(self.core))

    @app_commands.command(name="mydata", description="Get everything stored about you, as JSON")
    @app_commands.guild_only()
    async def mydata_cmd(self, interaction: discord.Interaction) -> None:
        assert interaction.guild_id is not None
        data = await self.core.export(interaction.guild_id, interaction.user.id)
        file = discord.File(io.BytesIO(data),
                            filename=f"guildtune-{interaction.guild_id}-{interaction.user.id}.json")
        await answer(interaction, "Everything guildtune stored about you in this server:",
                     file=file)

    @app_commands.command(name="forget",
                          description="Delete everything stored about you in this server")
    @app_commands.guild_only()
    async def forget_cmd(self, interaction: discord.Interaction) -> None:
        await answer(interaction, "This deletes your messages, ratings and suggestions stored in "
                                  "this server, opts you out, and retrains any model version "
                                  "that learned from them. Continue?", view=ForgetView(self.core))

    # -- /tune: each command admin_only (bot.checks), the runtime half of the group's hint --

    @tune.command(name="status", description="Active version, data since, last and next run")
    @admin_only
    async def tune_status(self, interaction: discord.Interaction) -> None:
        assert interaction.guild_id is not None
        rep = await self.core.status(interaction.guild_id)
        name = interaction.guild.name if interaction.guild else str(interaction.guild_id)
        embed = discord.Embed(title=f"guildtune · {name}", colour=discord.Colour.blurple())
        for key, value in rep.fields():
            wide = ("Replacement", "Last run", "Running", "Next scheduled run") + (
                ("Active version",) if rep.tainted else ())
            embed.add_field(name=key, value=value[:1024], inline=key not in wide)
        file = None
        if rep.chart_png:
            file = discord.File(io.BytesIO(rep.chart_png), filename="like_rate.png")
            embed.set_image(url="attachment://like_rate.png")
        await answer(interaction, embed=embed, file=file)

    @tune.command(name="retrain", description="Queue a training run now")
    @admin_only
    async def tune_retrain(self, interaction: discord.Interaction) -> None:
        assert interaction.guild_id is not None
        await answer(interaction, await self.core.retrain(interaction.guild_id,
                                                          interaction.user.id))

    @tune.command(name="rollback", description="Go back to the previous model version")
    @admin_only
    async def tune_rollback(self, interaction: discord.Interaction) -> None:
        assert interaction.guild_id is not None
        text = await self.core.rollback(interaction.guild_id)
        await self.watcher.sync_once()  # swap now rather than at the next poll
        await answer(interaction, text)

    @tune.command(name="training", description="Turn training on or off for this server")
    @app_commands.describe(state="on or off")
    @admin_only
    async def tune_training(self, interaction: discord.Interaction,
                            state: Literal["on", "off"]) -> None:
        assert interaction.guild_id is not None
        await answer(interaction, await self.core.set_training(interaction.guild_id,
                                                               state == "on"))

    @tune.command(name="schedule", description="When to retrain (5-field crontab, UTC)")
    @app_commands.describe(crontab="e.g. '0 4 * * *' = every day at 04:00 UTC")
    @admin_only
    async def tune_schedule(self, interaction: discord.Interaction, crontab: str) -> None:
        assert interaction.guild_id is not None
        await answer(interaction, await self.core.set_schedule(interaction.guild_id, crontab))

    @tune.command(name="persona", description="Show or set this server's system prompt")
    @app_commands.describe(text="How the bot should behave here; `reset` for the default; "
                                "leave empty to see it")
    @admin_only
    async def tune_persona(self, interaction: discord.Interaction,
                           text: str | None = None) -> None:
        assert interaction.guild_id is not None
        await answer(interaction, await self.core.set_persona(interaction.guild_id, text))

    @tune.command(name="channels", description="Channels where the bot answers every message")
    @app_commands.describe(action="add, remove or list", channel="the channel")
    @admin_only
    async def tune_channels(self, interaction: discord.Interaction,
                            action: Literal["add", "remove", "list"],
                            channel: discord.TextChannel | None = None) -> None:
        assert interaction.guild_id is not None
        await answer(interaction, await self.core.channels(
            interaction.guild_id, action, channel.id if channel else None))


def services_interval(services: Services) -> float:
    """Seconds between adapter-watcher polls (Services.watch_interval, default 5)."""
    return float(getattr(services, "watch_interval", 5.0))
