"""The Cog's listeners driven through dpytest: each trigger, each ignore rule, reactions,
deletes. A handler exception fails the test (the ``env`` fixture in conftest.py captures
on_error and patches dpytest's reactions)."""

from __future__ import annotations

import discord.ext.test as dpytest
import pytest
from discord.ext.test import backend

from tests.fakes import inject, sent


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


async def test_a_reply_cut_at_max_new_tokens_is_marked_and_logged_unmarked(env) -> None:
    from bot.replies import CUT_MARK, mark_cut

    g = env.guild.id
    env.s.store.grant_consent(g, env.alice.id)
    env.s.engine.cut = True  # the engine stopped at model.max_new_tokens
    await dpytest.message(f"<@{env.bot.user.id}> tell me everything", member=env.alice)
    reply = sent()[0]
    assert reply.content == mark_cut("hi from the bot") == "hi from the bot" + CUT_MARK
    # the model's own words are what training reads: the mark is not the model's
    assert env.s.store.interaction_for_message(g, reply.id)["reply"] == "hi from the bot"


async def test_a_reply_that_ended_is_not_marked(env) -> None:
    await dpytest.message(f"<@{env.bot.user.id}> hello", member=env.alice)
    assert [m.content for m in sent()] == ["hi from the bot"]
