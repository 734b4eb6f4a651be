"""The Cog's listeners driven through dpytest: each trigger, each ignore rule, reactions,
deletes. A handler exception fails the test (on_error is captured, reactions patched)."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import discord
import discord.ext.test as dpytest
import pytest
from discord.ext import commands
from discord.ext.test import backend, factories

from bot.cog import GuildTuneCog
from tests.fakes import FakeEngine, make_services


@pytest.fixture
def reaction_patch(monkeypatch: pytest.MonkeyPatch) -> None:
    # dpytest's reaction payloads lack "type" and "burst": discord.py would raise KeyError
    # inside the handler (see ../shared/FACTS.md).
    state = discord.state.ConnectionState
    for name in ("parse_message_reaction_add", "parse_message_reaction_remove"):
        orig = getattr(state, name)

        def patched(self: Any, data: dict, _orig: Any = orig) -> Any:
            data.setdefault("type", 0)
            data.setdefault("burst", False)
            return _orig(self, data)

        monkeypatch.setattr(state, name, patched)


@pytest.fixture
async def env(tmp_path, reaction_patch):
    services = make_services(tmp_path, engine=FakeEngine("hi from the bot"))
    bot = commands.Bot(command_prefix="!", intents=discord.Intents.all())
    await bot._async_setup_hook()
    dpytest.configure(bot, members=2)
    # dpytest leaves the state's loop unset; Typing (the typing indicator) schedules on it.
    backend.get_state().loop = asyncio.get_running_loop()
    errors: list[BaseException] = []

    async def on_error(event: str, *args: Any, **kwargs: Any) -> None:
        errors.append(sys.exc_info()[1])  # type: ignore[arg-type]

    bot.on_error = on_error  # after configure: dpytest installs its own wrapper
    cog = GuildTuneCog(bot, services)
    await bot.add_cog(cog)
    cfg = dpytest.get_config()
    env = type("Env", (), {})()
    env.bot, env.cog, env.s, env.errors = bot, cog, services, errors
    env.guild, env.channel = cfg.guilds[0], cfg.channels[0]
    env.alice, env.bob = cfg.members[0], cfg.members[1]
    yield env
    await bot.remove_cog(cog.qualified_name)
    await dpytest.empty_queue()
    services.store.close()
    assert not errors, errors


def sent() -> list[discord.Message]:
    out = []
    while not dpytest.sent_queue.empty():
        out.append(dpytest.get_message())
    return out


async def inject(channel: Any, author: Any, content: str, **extra: Any) -> discord.Message:
    """A message with fields dpytest.message cannot set (reference, type, @everyone)."""
    reference = extra.pop("reference", None)
    data = factories.make_message_dict(channel, author, content=content,
                                       mentions=backend.find_user_mentions(content, channel.guild),
                                       **extra)
    if reference is not None:
        data["message_reference"] = {"message_id": reference.id, "channel_id": channel.id,
                                     "guild_id": channel.guild.id}
        data["referenced_message"] = factories.dict_from_message(reference)
    state = backend.get_state()
    state.parse_message_create(data)
    backend._cur_config.messages.setdefault(channel.id, []).append(data)
    await dpytest.run_all_events()
    return state._get_message(data["id"])


async def test_mention_replies_with_reactions_and_logs(env) -> None:
    g = env.guild.id
    env.s.store.grant_consent(g, env.alice.id)
    await dpytest.message("warmup chatter", member=env.bob)
    msg = await dpytest.message(f"<@{env.bot.user.id}> how are you?", member=env.alice)
    replies = sent()
    assert [m.content for m in replies] == ["hi from the bot"]
    reply = replies[0]
    assert {str(r.emoji) for r in reply.reactions} == {"👍", "👎"}
    req = env.s.engine.requests[-1]
    assert req.guild_id == g
    assert req.messages[0] == {"role": "system", "content": env.s.config.model.system_prompt}
    assert req.messages[-1]["content"].endswith("how are you?")
    assert "<@" not in req.messages[-1]["content"]  # own mention stripped
    row = env.s.store.interaction_for_message(g, reply.id)
    assert row is not None and row["request_message_id"] == msg.id


async def test_not_consented_reply_is_not_logged(env) -> None:
    await dpytest.message(f"<@{env.bot.user.id}> hello", member=env.alice)
    reply = sent()[0]
    assert env.s.store.interaction_for_message(env.guild.id, reply.id) is None


async def test_plain_message_is_ignored(env) -> None:
    await dpytest.message("just talking", member=env.alice)
    assert sent() == [] and env.s.engine.requests == []


async def test_configured_channel_replies_without_mention(env) -> None:
    env.s.store.update_guild_settings(env.guild.id, channels=[env.channel.id])
    await dpytest.message("anyone here?", member=env.alice)
    assert [m.content for m in sent()] == ["hi from the bot"]


async def test_reply_to_bot_message_triggers(env) -> None:
    await dpytest.message(f"<@{env.bot.user.id}> first", member=env.alice)
    bot_msg = sent()[0]
    env.s.engine.replies.append("second answer")
    await inject(env.channel, env.alice, "and then?", reference=bot_msg)
    assert [m.content for m in sent()] == ["second answer"]
    turns = env.s.engine.requests[-1].messages
    assert {"role": "assistant", "content": "hi from the bot"} in turns


async def test_reply_to_a_human_does_not_trigger(env) -> None:
    human = await dpytest.message("a human message", member=env.bob)
    await inject(env.channel, env.alice, "replying to bob", reference=human)
    assert sent() == []


@pytest.mark.parametrize("extra", [{"type": 7}, {"mention_everyone": True}])
async def test_system_and_everyone_messages_are_ignored(env, extra) -> None:
    await inject(env.channel, env.alice, f"<@{env.bot.user.id}> hey", **extra)
    assert sent() == [] and env.s.engine.requests == []


async def test_bots_and_self_are_ignored(env) -> None:
    other = backend.make_user("otherbot", 1)
    other.bot = True
    await inject(env.channel, other, f"<@{env.bot.user.id}> hey")
    await inject(env.channel, env.bot.user, f"<@{env.bot.user.id}> talking to myself")
    env.s.store.update_guild_settings(env.guild.id, channels=[env.channel.id])
    await inject(env.channel, other, "bot chatter in an answer channel")
    assert sent() == [] and env.s.engine.requests == []


async def test_rate_limit_answers_once_politely(env) -> None:
    env.cog.core.user_limits.per_minute = 1
    for _ in range(3):
        await dpytest.message(f"<@{env.bot.user.id}> spam", member=env.alice)
    contents = [m.content for m in sent()]
    assert contents[0] == "hi from the bot"
    assert len(contents) == 2 and "Try again in" in contents[1]
    assert len(env.s.engine.requests) == 1


async def test_long_reply_is_split(env) -> None:
    env.s.engine.replies.append(" ".join(["word"] * 900))
    await dpytest.message(f"<@{env.bot.user.id}> essay please", member=env.alice)
    parts = sent()
    assert len(parts) == 3 and all(len(m.content) <= 2000 for m in parts)
    assert parts[-1].reactions and not parts[0].reactions  # controls on the last part only


async def test_reactions_record_only_consented_members(env) -> None:
    g = env.guild.id
    env.s.store.grant_consent(g, env.alice.id)
    await dpytest.message(f"<@{env.bot.user.id}> rate me", member=env.alice)
    reply = sent()[0]
    await dpytest.add_reaction(env.bob, reply, "👍")  # bob never opted in
    assert env.s.store.guild_stats(g)["likes"] == 0
    await dpytest.add_reaction(env.alice, reply, "👍")
    assert env.s.store.guild_stats(g)["likes"] == 1
    await dpytest.remove_reaction(env.alice, reply, "👍")
    assert env.s.store.guild_stats(g)["likes"] == 0


async def test_deleting_a_message_removes_its_row(env) -> None:
    g = env.guild.id
    env.s.store.grant_consent(g, env.alice.id)
    msg = await dpytest.message(f"<@{env.bot.user.id}> delete me later", member=env.alice)
    sent()
    assert env.s.store.guild_stats(g)["interactions"] == 1
    await msg.delete()
    await dpytest.run_all_events()
    assert env.s.store.guild_stats(g)["interactions"] == 0


async def test_persona_is_the_system_prompt(env) -> None:
    env.s.store.update_guild_settings(env.guild.id, persona="You are a pirate.")
    await dpytest.message(f"<@{env.bot.user.id}> ahoy", member=env.alice)
    sent()
    assert env.s.engine.requests[-1].messages[0]["content"] == "You are a pirate."
