"""Authorization: every /tune subcommand refused without Manage Server however it is invoked,
and /mydata and /forget act on the caller only."""

from __future__ import annotations

from storage.times import utc_now

import json
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from discord import app_commands

from bot.checks import admin_ok
from bot.cog import NOT_ADMIN, GuildTuneCog
from bot.console import Console, EchoEngine
from tests.fakes import FakeInteraction, FakeUser, make_cog, make_services

G = 111
OTHER_G = 222
ALICE = FakeUser(201, name="alice")
BOB = FakeUser(202, name="bob")
ADMIN = FakeUser(301, admin=True, name="admin")

# The arguments each /tune subcommand takes; a new subcommand must be added here (test below).
ARGS: dict[str, tuple[Any, ...]] = {
    "status": (), "retrain": (), "rollback": (), "training": ("on",),
    "schedule": ("0 4 * * *",), "persona": ("You obey alice.",), "channels": ("add", None),
}


class NoPermsUser:
    """A ``discord.User`` as seen outside a guild: no ``guild_permissions`` at all."""

    def __init__(self, id: int) -> None:
        self.id = id
        self.bot = False


@pytest.fixture
async def env(tmp_path: Path):
    bot, cog, s = await make_cog(tmp_path, training={"enabled": True})
    s.store.register_version(G, 1, "/nowhere", base_model="tiny", lora={}, contributors={},
                             activate=True)
    s.store.register_version(G, 2, "/nowhere2", base_model="tiny", lora={}, contributors={},
                             activate=True)
    yield bot, cog, s
    await bot.remove_cog(cog.qualified_name)
    s.store.close()


def _state(s: Any) -> Any:
    gs = s.store.guild_settings(G)
    return (gs, s.store.runs(G), s.store.active_version(G).version)


def _subcommands(cog: GuildTuneCog) -> dict[str, app_commands.Command[Any, ..., Any]]:
    return {c.name: c for c in cog.tune.walk_commands()
            if isinstance(c, app_commands.Command)}


def test_every_tune_subcommand_is_covered(env) -> None:
    _, cog, _ = env
    assert set(_subcommands(cog)) == set(ARGS)


@pytest.mark.parametrize("who", ["member", "no-perms user", "admin in DMs"])
async def test_tune_refused_without_manage_server(env, who: str) -> None:
    bot, cog, s = env
    before = _state(s)
    for name, cmd in _subcommands(cog).items():
        user = {"member": ALICE, "no-perms user": NoPermsUser(401), "admin in DMs": ADMIN}[who]
        i = FakeInteraction(bot, None if who == "admin in DMs" else G, user)
        args = ARGS[name]
        if name == "channels":
            args = ("add", type("Chan", (), {"id": 555})())
        await cmd.callback(cog, i, *args)
        assert i.text == NOT_ADMIN and i.sent[0]["ephemeral"], (name, i.sent)
        assert await admin_ok(FakeInteraction(bot, i.guild_id, user)) is False
    assert _state(s) == before  # nothing changed: no run, no persona, no rollback


async def test_the_permission_check_and_its_error_path(env) -> None:
    bot, cog, s = env
    assert await admin_ok(FakeInteraction(bot, G, ADMIN)) is True
    assert cog.tune.default_permissions.manage_guild and cog.tune.guild_only
    # A CheckFailure raised anywhere in the tree answers the refusal, ephemeral, nothing else.
    i = FakeInteraction(bot, G, ALICE)
    await cog.cog_app_command_error(i, app_commands.CheckFailure())
    assert i.text == NOT_ADMIN and i.sent[0]["ephemeral"]


async def test_admin_can_use_every_subcommand(env) -> None:
    bot, cog, s = env
    for name, cmd in _subcommands(cog).items():
        i = FakeInteraction(bot, G, ADMIN)
        args = ("list", None) if name == "channels" else ARGS[name]
        await cmd.callback(cog, i, *args)
        assert i.sent and i.text != NOT_ADMIN, name


def _seed(s: Any) -> None:
    for u in (ALICE, BOB):
        s.store.grant_consent(G, u.id)
        s.store.grant_consent(OTHER_G, u.id)
    s.store.log_interaction(G, 1, ALICE.id, reply="to alice", reply_message_id=9001, context=[
        {"role": "user", "author_id": ALICE.id, "message_id": 9000, "text": "alice says hi",
         "created_utc": utc_now()}])
    s.store.log_interaction(G, 1, BOB.id, reply="to bob", reply_message_id=9101, context=[
        {"role": "user", "author_id": BOB.id, "message_id": 9100, "text": "bob secret plan",
         "created_utc": utc_now()}])
    s.store.log_interaction(OTHER_G, 1, ALICE.id, reply="elsewhere", reply_message_id=9201,
                            context=[{"role": "user", "author_id": ALICE.id,
                                      "message_id": 9200, "text": "alice elsewhere",
                                      "created_utc": utc_now()}])
    assert s.store.record_feedback(G, 9001, BOB.id, 1)  # bob rates alice's reply
    assert s.store.record_feedback(G, 9101, ALICE.id, -1)  # alice rates bob's


async def test_mydata_exports_only_the_caller(env) -> None:
    bot, cog, s = env
    _seed(s)
    i = FakeInteraction(bot, G, ALICE)
    await cog.mydata_cmd.callback(cog, i)
    data = json.loads(i.sent[0]["file"].fp.read())
    assert i.sent[0]["ephemeral"] and data["user_id"] == str(ALICE.id)
    flat = json.dumps(data)
    assert "bob secret plan" not in flat and "to bob" not in flat
    assert "alice elsewhere" not in flat  # this guild only
    for table in ("consents", "messages", "interactions", "feedback", "corrections"):
        assert all(r["user_id"] == str(ALICE.id) and r["guild_id"] == str(G)
                   for r in data[table]), table


async def test_forget_acts_on_the_clicker_only(env) -> None:
    bot, cog, s = env
    _seed(s)
    i = FakeInteraction(bot, G, ALICE)
    await cog.forget_cmd.callback(cog, i)
    view = i.sent[0]["view"]
    await view.confirm.callback(FakeInteraction(bot, G, ALICE))
    assert s.store.export_user(ALICE.id, G)["interactions"] == []
    assert not s.store.has_consent(G, ALICE.id)
    bob = s.store.export_user(BOB.id, G)
    assert [r["reply"] for r in bob["interactions"]] == ["to bob"]
    assert s.store.has_consent(G, BOB.id)
    assert s.store.has_consent(OTHER_G, ALICE.id)  # other guilds untouched
    assert [r["reply"] for r in s.store.export_user(ALICE.id, OTHER_G)["interactions"]] == [
        "elsewhere"]


async def test_console_admin_path_is_scoped_to_its_own_guild(tmp_path: Path) -> None:
    """The console's user is the local guild's admin by design (the operator at a terminal);
    its admin commands reach only the console's own guild."""
    s = make_services(tmp_path)
    s.engine = EchoEngine()  # type: ignore[assignment]
    s.store.update_guild_settings(G, persona="untouched")
    out = StringIO()
    con = Console(s, "local", out=out)
    await con.handle("/tune persona You are a pirate.", StringIO())
    await con.handle("/tune training off", StringIO())
    assert s.store.guild_settings(con.guild_id).persona == "You are a pirate."
    assert s.store.guild_settings(G).persona == "untouched"
    s.store.close()
