"""The Cog's Discord UI: feedback controls, the /consent and /forget views, the reply itself.

- ``RateButton``, ``SuggestButton`` (and its ``SuggestModal``): the persistent controls under a
  bot reply (``feedback_view``), ``DynamicItem``s matched by custom_id, so they answer after a
  restart; they find the Cog's ``Core`` through the client by ``COG_NAME``;
- ``ConsentView``, ``ForgetView``: the ephemeral confirmations of /consent and /forget;
- ``DiscordReply``: the ``ReplyChannel`` over a Discord message (controls under the last part);
- ``answer``: an ephemeral answer to an interaction, responded to or not.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import discord
from discord.ext import commands

from bot.core import Core, UserError
from bot.replies import EditFailed, MessageGone

log = logging.getLogger(__name__)

COG_NAME = "GuildTune"  # the Cog's name (bot.cog); the persistent controls find it by it
THUMBS = {"👍": 1, "👎": -1}
NO_MENTIONS = discord.AllowedMentions.none()


def _core(client: discord.Client) -> Core | None:
    """The loaded Cog's ``Core``, or None when the Cog is not loaded on ``client``."""
    # AutoShardedBot is no commands.Bot subclass: a sharded host has the Cog as well.
    bots = (commands.Bot, commands.AutoShardedBot)
    cog = client.get_cog(COG_NAME) if isinstance(client, bots) else None
    core = getattr(cog, "core", None)
    return core if isinstance(core, Core) else None


async def answer(interaction: discord.Interaction, content: str | None = None, **kw: Any) -> None:
    """An ephemeral answer, whether or not the interaction was already responded to."""
    kw = {k: v for k, v in kw.items() if v is not None}
    if interaction.response.is_done():
        await interaction.followup.send(content, ephemeral=True, **kw)
    else:
        await interaction.response.send_message(content, ephemeral=True, **kw)


# -- persistent feedback controls (survive restarts: matched by custom_id pattern) ------------


class RateButton(discord.ui.DynamicItem[discord.ui.Button[Any]],
                 template=r"guildtune:rate:(?P<direction>up|down)"):
    """👍/👎 as a button (config discord.feedback = "buttons")."""

    def __init__(self, direction: str) -> None:
        self.direction = direction
        super().__init__(discord.ui.Button(
            emoji="👍" if direction == "up" else "👎", style=discord.ButtonStyle.secondary,
            custom_id=f"guildtune:rate:{direction}"))

    @classmethod
    async def from_custom_id(cls, interaction: discord.Interaction, item: discord.ui.Item[Any],
                             match: re.Match[str]) -> RateButton:
        return cls(match["direction"])

    async def callback(self, interaction: discord.Interaction) -> None:
        core = _core(interaction.client)
        if core is None or interaction.guild_id is None or interaction.message is None:
            await answer(interaction, "Ratings are not available here right now.")
            return
        rating = 1 if self.direction == "up" else -1
        limited = core.feedback_limited(interaction.guild_id, interaction.user.id)
        if limited is not None:
            await answer(interaction, limited)
            return
        ok = await core.rate(interaction.guild_id, interaction.message.id, interaction.user.id,
                             rating)
        if ok:
            await answer(interaction, f"Thanks, noted {'👍' if rating > 0 else '👎'}.")
        elif not await core.has_consent(interaction.guild_id, interaction.user.id):
            await answer(interaction, "Ratings are stored only for members who opted in: see "
                                      "/consent.")
        else:
            await answer(interaction, "This reply was not logged (its author had not opted in), "
                                      "so it cannot be rated.")


class SuggestButton(discord.ui.DynamicItem[discord.ui.Button[Any]],
                    template=r"guildtune:suggest"):
    """Opens a modal to write a better reply (stored as a correction)."""

    def __init__(self) -> None:
        super().__init__(discord.ui.Button(label="Suggest a better reply", emoji="✏️",
                                           style=discord.ButtonStyle.secondary,
                                           custom_id="guildtune:suggest"))

    @classmethod
    async def from_custom_id(cls, interaction: discord.Interaction, item: discord.ui.Item[Any],
                             match: re.Match[str]) -> SuggestButton:
        return cls()

    async def callback(self, interaction: discord.Interaction) -> None:
        core = _core(interaction.client)
        if core is None or interaction.guild_id is None or interaction.message is None:
            await answer(interaction, "Suggestions are not available here right now.")
            return
        if not await core.has_consent(interaction.guild_id, interaction.user.id):
            await answer(interaction, "Suggestions are stored only for members who opted in: "
                                      "see /consent.")
            return
        await interaction.response.send_modal(SuggestModal(core, interaction.message.id))


class SuggestModal(discord.ui.Modal, title="Suggest a better reply"):
    """The text of a better reply for one bot message."""

    text: discord.ui.TextInput[Any] = discord.ui.TextInput(
        label="What should the bot have said?", style=discord.TextStyle.paragraph,
        max_length=2000)

    def __init__(self, core: Core, message_id: int) -> None:
        super().__init__()
        self.core = core
        self.message_id = message_id

    async def on_submit(self, interaction: discord.Interaction) -> None:
        assert interaction.guild_id is not None
        try:
            text = await self.core.suggest(interaction.guild_id, self.message_id,
                                           interaction.user.id, str(self.text.value))
        except UserError as exc:
            text = str(exc)
        await answer(interaction, text)


def feedback_view(mode: str) -> discord.ui.View:
    """The controls under a bot reply. Stopped at once: the registered DynamicItems answer the
    clicks, so no per-message View has to stay in memory (nor be lost on restart)."""
    view = discord.ui.View(timeout=None)
    if mode == "buttons":
        view.add_item(RateButton("up"))
        view.add_item(RateButton("down"))
    view.add_item(SuggestButton())
    view.stop()
    return view


# -- ephemeral confirmation views ----------------------------------------------------------


class ConsentView(discord.ui.View):
    """Opt-in / opt-out under the /consent statement."""

    def __init__(self, core: Core) -> None:
        super().__init__(timeout=600)
        self.core = core

    @discord.ui.button(label="Opt in", style=discord.ButtonStyle.success)
    async def opt_in(self, interaction: discord.Interaction, button: discord.ui.Button[Any]) -> None:
        assert interaction.guild_id is not None
        await answer(interaction, await self.core.consent(interaction.guild_id,
                                                          interaction.user.id, True))

    @discord.ui.button(label="Opt out", style=discord.ButtonStyle.secondary)
    async def opt_out(self, interaction: discord.Interaction,
                      button: discord.ui.Button[Any]) -> None:
        assert interaction.guild_id is not None
        await answer(interaction, await self.core.consent(interaction.guild_id,
                                                          interaction.user.id, False))


class ForgetView(discord.ui.View):
    """The confirmation of /forget."""

    def __init__(self, core: Core) -> None:
        super().__init__(timeout=120)
        self.core = core

    @discord.ui.button(label="Delete my data", style=discord.ButtonStyle.danger)
    async def confirm(self, interaction: discord.Interaction,
                      button: discord.ui.Button[Any]) -> None:
        assert interaction.guild_id is not None
        self.stop()
        user = interaction.user
        # Their names too: other members' stored messages may name them in plain text.
        names = {n for n in (user.name, getattr(user, "global_name", None),
                             getattr(user, "display_name", None), getattr(user, "nick", None))
                 if n}
        await answer(interaction, await self.core.forget(interaction.guild_id, user.id,
                                                         sorted(names)))

    @discord.ui.button(label="Cancel", style=discord.ButtonStyle.secondary)
    async def cancel(self, interaction: discord.Interaction,
                     button: discord.ui.Button[Any]) -> None:
        self.stop()
        await answer(interaction, "Nothing was deleted.")


# -- replies in Discord --------------------------------------------------------------------


class DiscordReply:
    """``ReplyChannel`` over a Discord message: reply to it, controls under the last part.

    Streaming (``bot.replies.ReplyStream``) edits the parts it sent: the messages are kept by
    id; a refused edit or delete raises ``EditFailed`` (the stream logs it and goes on), one
    of a message that is not there any more (404: a moderator deleted it) ``MessageGone`` (the
    stream withdraws the reply: nothing of it is posted again). The
    controls (the view, and 👍/👎 with ``feedback = "reactions"``) go on a part when it is sent
    as the last one, or when the finished reply's last part is edited with ``last``.
    """

    def __init__(self, message: discord.Message, feedback: str) -> None:
        self.message = message
        self.feedback = feedback
        self.guild = message.guild is not None
        self._sent: dict[int, discord.Message] = {}
        self._text: dict[int, str] = {}
        self._controls: set[int] = set()

    @asynccontextmanager
    async def typing(self) -> AsyncIterator[None]:
        try:
            cm = self.message.channel.typing()
            await cm.__aenter__()
        except discord.HTTPException:  # typing is cosmetic: never lose a reply over it
            cm = None
        try:
            yield
        finally:
            if cm is not None:
                await cm.__aexit__(None, None, None)

    async def send(self, text: str, *, first: bool, last: bool) -> int:
        kw: dict[str, Any] = {"allowed_mentions": NO_MENTIONS}
        controls = last and self.guild
        if controls:
            kw["view"] = feedback_view(self.feedback)
        sent: discord.Message | None = None
        if first:
            try:
                sent = await self.message.reply(text, mention_author=False, **kw)
            except discord.HTTPException:  # the request was deleted meanwhile: still answer
                sent = None
        if sent is None:
            sent = await self.message.channel.send(text, **kw)
        self._sent[sent.id] = sent
        self._text[sent.id] = text
        if controls:
            self._controls.add(sent.id)
            await self._react(sent)
        return sent.id

    async def edit(self, message_id: int, text: str, *, last: bool = False) -> None:
        sent = self._sent[message_id]
        controls = last and self.guild and message_id not in self._controls
        kw: dict[str, Any] = {"allowed_mentions": NO_MENTIONS}
        if controls:
            kw["view"] = feedback_view(self.feedback)
        if text != self._text[message_id] or controls:
            try:
                await sent.edit(content=text, **kw)
            except discord.NotFound as exc:  # deleted by a moderator (10008 Unknown Message)
                raise MessageGone(f"{type(exc).__name__}: {exc}") from exc
            except discord.HTTPException as exc:  # rate limited, no permission...
                raise EditFailed(f"{type(exc).__name__}: {exc}") from exc
            self._text[message_id] = text
        if controls:  # only once the reply is complete: nobody rates half a reply
            self._controls.add(message_id)
            await self._react(sent)

    async def delete(self, message_id: int) -> None:
        sent = self._sent.pop(message_id)
        self._text.pop(message_id, None)
        try:
            await sent.delete()
        except discord.NotFound as exc:
            raise MessageGone(f"{type(exc).__name__}: {exc}") from exc
        except discord.HTTPException as exc:
            raise EditFailed(f"{type(exc).__name__}: {exc}") from exc

    async def _react(self, sent: discord.Message) -> None:
        if self.feedback != "reactions":
            return
        for emoji in THUMBS:
            try:
                await sent.add_reaction(emoji)
            except discord.HTTPException:  # missing Add Reactions permission
                log.warning("cannot add reactions in channel %s", sent.channel.id)
                break
