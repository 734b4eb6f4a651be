"""What the bot puts into a prompt and into storage, through the real front ends (the Cog
driven by dpytest, the console driven by its stdin):

- every context turn carries when it was written, so text a member wrote before opting in is
  stored as the placeholder even when it shows up in a later context;
- mentions are stored in one readable form on every path (chat context, kept messages, edits),
  never as raw ids;
- nothing of another guild (a cross-guild reply, a forward, the global message cache) enters a
  guild's prompt or stored context;
- a full disk costs the exchange's log line, never the reply nor the console session.

A handler exception fails a Cog test (on_error is collected by the ``env`` fixtures).
"""

from __future__ import annotations

import errno
import io
import json
import re
import sqlite3
import time
from datetime import UTC, datetime, timedelta, timezone
from collections.abc import Callable, Sequence
from typing import Any

import discord
import discord.ext.test as dpytest
import pytest
from discord.ext.test import backend, factories

from bot.console import Console, local_id
from bot.handlers import Turn
from storage import PLACEHOLDER
from storage.times import format_utc
from tests.fakes import FakeEngine, cog_on_dpytest, deliver, make_services, sent

RAW_ID = re.compile(r"\d{17,19}")


def _context(store: Any, guild_id: int, reply_id: int) -> list[dict[str, Any]]:
    row = store.interaction_for_message(guild_id, reply_id)
    assert row is not None, "the exchange was not logged"
    return json.loads(row["context_json"])


async def post(channel: Any, author: Any, content: str, *, mentions: Sequence[Any] = (),
               role_ids: Sequence[int] = (), snowflake: int | None = None,
               reference: dict[str, Any] | None = None,
               extra: dict[str, Any] | None = None) -> discord.Message:
    """A message with what dpytest.message cannot set: its time (snowflake), mentions of ids
    the guild does not know, role mentions, any message_reference (another guild, a forward)."""
    kw: dict[str, Any] = {} if snowflake is None else {"id_num": snowflake}
    data = factories.make_message_dict(channel, author, content=content,
                                       mentions=list(mentions), **kw)
    data["mention_roles"] = [str(r) for r in role_ids]
    if reference is not None:
        data.update(reference)
    data.update(extra or {})
    return await deliver(channel, data)


def _ref_to(target: discord.Message, *, type: int = 0, guild_id: int | None = None,
            channel_id: int | None = None, resolved: bool = True) -> dict[str, Any]:
    """The message_reference (and referenced_message) Discord sends for a reply (type 0) or a
    forward (type 1) of ``target``; guild and channel can be overridden."""
    ref = {"type": type, "message_id": target.id,
           "channel_id": channel_id if channel_id is not None else target.channel.id,
           "guild_id": guild_id if guild_id is not None else target.guild.id}
    out: dict[str, Any] = {"message_reference": ref}
    if resolved:
        out["referenced_message"] = {**factories.dict_from_message(target),
                                     "channel_id": target.channel.id,
                                     "guild_id": target.guild.id}
    return out


# -- 1. creation time on every path: text written before opting in stays a placeholder --------


async def test_cog_stores_pre_consent_text_as_placeholder(env) -> None:
    g = env.guild.id
    # Alice wrote this an hour ago (a snowflake carries its creation time), before opting in.
    hour_ago = discord.utils.time_snowflake(datetime.now(UTC) - timedelta(hours=1))
    early = await post(env.channel, env.alice, "my old secret, not for storage",
                       snowflake=hour_ago)
    env.s.store.grant_consent(g, env.alice.id)  # then she opted in
    env.s.store.grant_consent(g, env.bob.id)
    env.s.engine.replies.append("noted")
    msg = await dpytest.message(f"<@{env.bot.user.id}> what did alice say?", member=env.bob)
    (reply,) = sent()
    # The prompt may show it (it is in the channel); storage may not.
    assert "my old secret" in json.dumps(env.s.engine.requests[-1].messages)
    ctx = _context(env.s.store, g, reply.id)
    assert "my old secret" not in json.dumps(ctx)
    assert {"role": "user", "author_id": None, "message_id": None,
            "text": PLACEHOLDER} in ctx
    assert ctx[-1]["text"] == "what did alice say?"
    assert ctx[-1]["created_utc"] == format_utc(msg.created_at)
    assert early.created_at < msg.created_at

    # The bot's own turn carries its message's time too, and a later message of Alice (after
    # she opted in) is stored in full.
    env.s.engine.replies.append("again")
    await dpytest.message(f"<@{env.bot.user.id}> now I am in", member=env.alice)
    (reply2,) = sent()
    ctx2 = _context(env.s.store, g, reply2.id)
    mine = [e for e in ctx2 if e["role"] == "assistant"]
    assert mine and all(e["created_utc"] == format_utc(reply.created_at) for e in mine)
    assert ctx2[-1]["text"] == "now I am in"
    assert "my old secret" not in json.dumps(ctx2)


class Lines:
    """A console stdin: hands out its lines, running the callables between them (to move the
    console's clock), then end of input."""

    def __init__(self, *items: str | Callable[[], None]) -> None:
        self.items = list(items)

    def readline(self) -> str:
        while self.items:
            item = self.items.pop(0)
            if callable(item):
                item()
                continue
            return item + "\n"
        return ""


async def test_console_stores_pre_consent_text_as_placeholder(tmp_path) -> None:
    s = make_services(tmp_path, engine=FakeEngine("hello human"))
    now = [time.time() - 3600]  # the console's clock: an hour ago until she has opted in
    s.clock = lambda: now[0]

    def back_to_now() -> None:
        now[0] = time.time()

    out = io.StringIO()
    console = Console(s, "testers", out=out)
    rc = await console.run(Lines("my old secret, typed before opting in", "/consent on",
                                 back_to_now, "what did I say?", "/quit"))
    assert rc == 0
    g = local_id("guild:testers")
    assert "You opted in" in out.getvalue() and "· logged]" in out.getvalue()
    ctx = _context(s.store, g, console.last_reply)
    assert "my old secret" not in json.dumps(ctx)
    assert ctx[0] == {"role": "user", "author_id": None, "message_id": None,
                      "text": PLACEHOLDER}
    assert ctx[-1]["text"] == "what did I say?" and ctx[-1]["created_utc"]
    assert [e["role"] for e in ctx] == ["user", "assistant", "user"]
    assert all(e.get("created_utc") for e in ctx[1:])  # the bot's turn too
    s.store.close()


def test_turn_requires_when_it_was_written() -> None:
    with pytest.raises(TypeError):
        Turn("user", 1, 2, "hi")  # type: ignore[call-arg]
    t = Turn("user", 1, 2, "hi", created_utc=datetime(2026, 11, 26, 9, 15, 0, 123456,
                                                       tzinfo=timezone(timedelta(hours=1))))
    assert t.stored()["created_utc"] == "2026-11-26T08:15:00.123Z"
    assert Turn("assistant", None, 3, "ok",
                created_utc="2026-11-26T08:15:00Z").stored()["created_utc"] == (
        "2026-11-26T08:15:00.000Z")
    with pytest.raises(ValueError):
        Turn("user", 1, 2, "hi", created_utc="08:15")


# -- 2. mentions in one readable form on every path -------------------------------------------


async def test_mentions_are_stored_in_one_readable_form(env) -> None:
    g = env.guild.id
    store = env.s.store
    store.update_guild_settings(g, learn_from_humans=True)
    store.grant_consent(g, env.alice.id)
    role = backend.make_role("helpers", env.guild)
    stranger = 123456789012345678  # in no cache, in no payload
    msg = await post(env.channel, env.alice,
                     f"<@{env.bot.user.id}> ping <@{env.bob.id}> and <@{stranger}> and "
                     f"<@&{role.id}> in <#{env.channel.id}>",
                     mentions=[env.bob], role_ids=[role.id])
    (reply,) = sent()
    want = (f"ping @{env.bob.display_name} and @member and @helpers in "
            f"#{env.channel.name}")
    assert env.s.engine.requests[-1].messages[-1]["content"] == want
    kept = store.export_user(env.alice.id, g)["messages"]
    assert [m["text"] for m in kept] == [want]
    assert _context(store, g, reply.id)[-1]["text"] == want

    # The edit's raw payload names a member the guild's cache does not hold (Carol).
    carol = {"id": "223456789012345678", "username": "carol", "global_name": "Carol G",
             "discriminator": "0", "avatar": None}
    data = factories.make_message_dict(
        env.channel, env.alice, id_num=msg.id,
        content=f"edited: <@{env.bob.id}> <@!{carol['id']}> <@{stranger}> <@&{role.id}>")
    data["mentions"] = [factories.dict_from_user(env.bot.get_user(env.bob.id)), carol]
    data["mention_roles"] = [str(role.id)]
    data["member"] = {**data["member"], "roles": []}  # dpytest's member dict lacks them
    backend.get_state().parse_message_update(data)
    await dpytest.run_all_events()
    edited = f"edited: @{env.bob.display_name} @Carol G @member @helpers"
    assert [m["text"] for m in store.export_user(env.alice.id, g)["messages"]] == [edited]
    assert _context(store, g, reply.id)[-1]["text"] == edited

    texts = [m["text"] for m in store.export_user(env.alice.id, g)["messages"]]
    for row in store.export_user(env.alice.id, g)["interactions"]:
        texts.append(row["reply"])
        ctx = row["context"] if "context" in row else json.loads(row["context_json"])
        texts += [e["text"] for e in ctx]
    assert texts and not [t for t in texts if "<@" in t or RAW_ID.search(t)], texts


# -- 3. nothing of another guild --------------------------------------------------------------


@pytest.fixture
async def two_guilds(tmp_path, reaction_patch):
    services = make_services(tmp_path, engine=FakeEngine("hi from the bot"))
    async with cog_on_dpytest(services, guilds=2) as e:
        e.a, e.b = e.config.guilds[0], e.config.guilds[1]
        e.chan_a, e.chan_b = e.a.text_channels[0], e.b.text_channels[0]
        e.a_members = [m for m in e.config.members if m.guild.id == e.a.id]
        e.b_members = [m for m in e.config.members if m.guild.id == e.b.id]
        yield e


@pytest.mark.parametrize("how", ["reply", "reply, not resolved", "forward",
                                 "reference claims this guild"])
async def test_another_guilds_messages_never_enter_context(two_guilds, how: str) -> None:
    e = two_guilds
    store = e.s.store
    a1, a2 = e.a_members[0], e.a_members[1]
    root = await dpytest.message("GUILD-A root secret", channel=e.chan_a, member=a1)
    leaf = await post(e.chan_a, a2, "GUILD-A reply secret", reference=_ref_to(root))
    # Guild B answers every message in its channel; its member and (as members of B too) the
    # authors of guild A opted in there, so storage would keep their text if it got in.
    b = e.b_members[0]
    store.update_guild_settings(e.b.id, channels=[e.chan_b.id])
    for u in (b.id, a1.id, a2.id):
        store.grant_consent(e.b.id, u)
    await dpytest.message("earlier talk in B", channel=e.chan_b, member=b)
    sent()
    if how == "forward":
        snapshot = {"message": {"type": 0, "content": "", "embeds": [], "attachments": [],
                                "timestamp": leaf.created_at.isoformat(),
                                "edited_timestamp": None, "flags": 0, "mentions": [],
                                "mention_roles": [], "components": []}}
        msg = await post(e.chan_b, b, "", reference={
            **_ref_to(leaf, type=1, resolved=False), "message_snapshots": [snapshot]})
    elif how == "reference claims this guild":
        # Only the id is guild A's: the client's global cache would resolve it.
        msg = await post(e.chan_b, b, "look at this", reference=_ref_to(
            leaf, guild_id=e.b.id, channel_id=e.chan_b.id, resolved=False))
    else:
        msg = await post(e.chan_b, b, "look at this",
                         reference=_ref_to(leaf, resolved=how == "reply"))
    assert msg.reference is not None
    (reply,) = sent()
    prompt = json.dumps(e.s.engine.requests[-1].messages)
    assert e.s.engine.requests[-1].guild_id == e.b.id
    assert "GUILD-A" not in prompt and "earlier talk in B" in prompt
    ctx = _context(store, e.b.id, reply.id)
    assert "GUILD-A" not in json.dumps(ctx)
    assert {str(a1.id), str(a2.id), str(root.id), str(leaf.id)}.isdisjoint(
        {str(x.get("author_id")) for x in ctx} | {str(x.get("message_id")) for x in ctx})


# -- 4. a full disk costs the log line, not the reply nor the console -------------------------


def _disk_full_errors() -> list[BaseException]:
    errs: list[BaseException] = [sqlite3.OperationalError("database or disk is full"),
                                 OSError(errno.ENOSPC, "No space left on device")]
    try:
        from storage.store import StoreFullError
    except ImportError:  # storage without its own error class: sqlite3's and the OS's remain
        return errs
    return [StoreFullError("x.db: the disk is full; log_interaction wrote nothing"), *errs]


def _failing(exc: BaseException) -> Callable[..., Any]:
    def write(*args: Any, **kwargs: Any) -> Any:
        raise exc
    return write


@pytest.mark.parametrize("exc", _disk_full_errors(), ids=lambda e: type(e).__name__)
async def test_console_survives_a_full_disk(tmp_path, monkeypatch, exc) -> None:
    s = make_services(tmp_path, engine=FakeEngine("hello human"))
    out = io.StringIO()
    console = Console(s, "testers", out=out)
    # /consent on is written first; then the disk fills up.
    stdin = Lines("/consent on", lambda: monkeypatch.setattr(
        s.store, "log_interaction", _failing(exc)), "hi bot", "/consent off", "still there?",
        "/quit")
    assert await console.run(stdin) == 0
    text = out.getvalue()
    assert text.count("guildtune: hello human") == 2  # both replies shown
    lines = [ln for ln in text.splitlines() if "not stored: the disk is full" in ln]
    assert len(lines) == 2, text  # one line for each exchange, saying why
    assert "You opted out" in text  # the session kept going between them
    s.store.close()


async def test_console_command_on_a_full_disk_keeps_the_session(tmp_path, monkeypatch) -> None:
    s = make_services(tmp_path, engine=FakeEngine("hello human"))
    monkeypatch.setattr(s.store, "grant_consent",
                        _failing(sqlite3.OperationalError("database or disk is full")))
    out = io.StringIO()
    assert await Console(s, "testers", out=out).run(Lines("/consent on", "hi", "/quit")) == 0
    assert "! not done: the disk is full" in out.getvalue()
    assert "guildtune: hello human" in out.getvalue()
    s.store.close()


@pytest.mark.parametrize("write", ["log_interaction", "log_message"])
@pytest.mark.parametrize("exc", _disk_full_errors(), ids=lambda e: type(e).__name__)
async def test_bot_answers_on_a_full_disk(env, monkeypatch, exc, write: str) -> None:
    """Logging the exchange (after the reply) or keeping the member's message (before it):
    either write failing on a full disk leaves the reply and raises nothing in the handler."""
    g = env.guild.id
    env.s.store.update_guild_settings(g, learn_from_humans=True)
    env.s.store.grant_consent(g, env.alice.id)
    monkeypatch.setattr(env.s.store, write, _failing(exc))
    await dpytest.message(f"<@{env.bot.user.id}> are you there?", member=env.alice)
    assert [m.content for m in sent()] == ["hi from the bot"]
    assert env.errors == []
