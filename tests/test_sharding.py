"""Sharding: the bot ``guildtune run`` builds from ``discord.shard_count``/``shard_ids`` (real
discord.py objects, no gateway), the Cog working on it, and the one-syncing-process rule.

The config's own errors for these keys are in tests/test_config.py.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import discord
import pytest
from discord.ext import commands

from bot import runner
from bot.cog import COG_NAME, GuildTuneCog, RateButton
from guildtune.config import ConfigError, parse_config
from tests.fakes import FakeInteraction, FakeUser, make_services

G = 111
ALICE = FakeUser(201, name="alice")


def sharding(**discord_keys: Any) -> Any:
    return parse_config({"discord": discord_keys}, env={})


# -- which bot, with which shards ------------------------------------------------------------

def test_unsharded_by_default_a_plain_bot() -> None:
    bot = runner.make_bot(parse_config({}, env={}))
    assert type(bot) is runner.GuildTuneBot
    assert isinstance(bot, commands.Bot) and not isinstance(bot, discord.AutoShardedClient)
    assert bot.shard_count is None
    assert runner.make_bot(sharding(shard_count=0)).__class__ is runner.GuildTuneBot


def test_a_shard_count_builds_an_auto_sharded_bot_running_every_shard() -> None:
    bot = runner.make_bot(sharding(shard_count=4))
    assert isinstance(bot, commands.AutoShardedBot)
    assert bot.shard_count == 4 and bot.shard_ids is None  # None: 0 .. 3, all here
    assert bot.guildtune_config.discord.shard_count == 4
    assert bot.intents == runner.make_intents(bot.guildtune_config)  # the same as unsharded


def test_shard_ids_are_the_shards_this_process_runs() -> None:
    bot = runner.make_bot(sharding(shard_count=4, shard_ids=[2, 3]))
    assert isinstance(bot, commands.AutoShardedBot)
    assert bot.shard_count == 4 and bot.shard_ids == [2, 3]


def test_auto_leaves_the_count_to_discord() -> None:
    bot = runner.make_bot(sharding(shard_count="auto"))
    assert isinstance(bot, commands.AutoShardedBot)
    assert bot.shard_count is None and bot.shard_ids is None


async def launched(bot: Any, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The shard ids discord.py's own ``launch_shards`` connects for ``bot`` (each connection
    recorded instead of opened)."""
    ids: list[int] = []

    async def launch_shard(gateway: Any, shard_id: int, *, initial: bool = False) -> None:
        ids.append(shard_id)

    monkeypatch.setattr(bot, "launch_shard", launch_shard)
    await bot.launch_shards()
    return ids


async def test_this_process_connects_only_its_shards(monkeypatch: pytest.MonkeyPatch) -> None:
    async with runner.make_bot(sharding(shard_count=4, shard_ids=[2, 3])) as bot:
        assert await launched(bot, monkeypatch) == [2, 3]
    async with runner.make_bot(sharding(shard_count=3)) as bot:
        assert await launched(bot, monkeypatch) == [0, 1, 2]


async def test_auto_asks_discord_for_the_count(monkeypatch: pytest.MonkeyPatch) -> None:
    async with runner.make_bot(sharding(shard_count="auto")) as bot:
        async def get_bot_gateway(*args: Any, **kwargs: Any) -> tuple[int, str, dict]:
            return 2, "wss://gateway.discord.gg", {}

        monkeypatch.setattr(bot.http, "get_bot_gateway", get_bot_gateway)
        assert await launched(bot, monkeypatch) == [0, 1]
        assert bot.shard_count == 2


async def test_serve_runs_the_sharded_bot(monkeypatch: pytest.MonkeyPatch) -> None:
    """``guildtune run`` (``serve``) starts the bot built from the config, not a plain Bot."""
    cfg = parse_config({"discord": {"shard_count": 4, "shard_ids": [1]}},
                       env={"DISCORD_TOKEN": "fake.token.value"})
    started: list[Any] = []

    async def start(self: Any, token: str, *, reconnect: bool = True) -> None:
        started.append(self)

    for cls in (runner.GuildTuneBot, runner.ShardedGuildTuneBot):  # never the real gateway
        monkeypatch.setattr(cls, "start", start)
    await runner.serve(cfg, worker=False)
    [bot] = started
    assert isinstance(bot, commands.AutoShardedBot)
    assert (bot.shard_count, bot.shard_ids) == (4, [1])


# -- the Cog on a sharded bot ----------------------------------------------------------------

@pytest.fixture
async def sharded(tmp_path: Path) -> AsyncIterator[tuple[Any, Any]]:
    """(bot, services): a sharded standalone bot whose setup hook loaded the extension over
    ready services (no gateway, no model); every ``tree.sync`` call is recorded in
    ``bot.syncs``."""
    # Closing the bot unloads the extension, which drops bot.* from sys.modules: restore them so
    # later tests keep the class identities they imported.
    saved = {k: v for k, v in sys.modules.items() if k == "bot" or k.startswith("bot.")}
    services = make_services(tmp_path, discord={"shard_count": 2})
    try:
        async with runner.make_bot(services.config) as bot:
            bot.syncs = []

            async def sync(*, guild: Any = None) -> list[Any]:
                bot.syncs.append(guild)
                return []

            bot.tree.sync = sync  # type: ignore[method-assign]
            bot.guildtune_services = services
            await bot.setup_hook()
            yield bot, services
    finally:
        services.store.close()
        sys.modules.update(saved)


async def test_the_extension_loads_on_a_sharded_bot_and_never_syncs(sharded: Any) -> None:
    bot, _ = sharded
    assert isinstance(bot, commands.AutoShardedBot)
    cog = bot.get_cog(COG_NAME)
    assert isinstance(cog, GuildTuneCog) and cog.watcher.running  # one Cog for all shards
    assert {c.name for c in bot.tree.get_commands()} >= {"tune", "consent", "forget"}
    assert bot.syncs == []  # not on start, not per shard: guildtune sync does it


async def test_a_shard_process_loads_only_its_own_guilds_adapters(
        sharded: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    bot, services = sharded
    mine, theirs = 1001, 2002  # a guild on this process's shards, one on another process's
    for g in (mine, theirs):
        services.store.register_version(g, 1, f"/adapters/{g}/1", base_model="tiny",
                                        lora={}, activate=True)
    monkeypatch.setattr(bot, "get_guild", lambda g: object() if g == mine else None)
    cog = bot.get_cog(COG_NAME)
    await cog.watcher.sync_once()
    assert services.engine.active_versions() == {mine: 1}


async def test_feedback_buttons_find_the_cog_on_a_sharded_bot(tmp_path: Path) -> None:
    """The persistent buttons reach the Cog through the client; an AutoShardedBot is not a
    commands.Bot, and a check for one alone made every click on a sharded bot fail."""
    # The Cog added directly, not through load_extension: unloading an extension drops the
    # bot.* modules, and this module's RateButton must meet the Core class it knows.
    s = make_services(tmp_path, discord={"shard_count": 2})
    bot = runner.make_bot(s.config)
    cog = GuildTuneCog(bot, s)
    await bot.add_cog(cog)
    try:
        s.store.grant_consent(G, ALICE.id)
        s.store.log_interaction(G, 1, ALICE.id, context=[
            {"role": "user", "author_id": ALICE.id, "message_id": 9000, "text": "hi",
             "created_utc": "2026-01-01T00:00:00.000Z"}],
            reply="hello", request_message_id=9000, reply_message_id=9001)
        i = FakeInteraction(bot, G, ALICE, 9001)
        await RateButton("down").callback(i)
        assert "noted 👎" in i.text and s.store.guild_stats(G)["dislikes"] == 1
    finally:
        await bot.remove_cog(cog.qualified_name)
        s.store.close()


# -- who syncs the slash commands ------------------------------------------------------------

@pytest.mark.parametrize("keys, syncs", [
    ({}, True),  # one connection, one process
    ({"shard_count": 4}, True),  # every shard in this process
    ({"shard_count": "auto"}, True),
    ({"shard_count": 4, "shard_ids": [0, 1]}, True),  # holds shard 0
    ({"shard_count": 4, "shard_ids": [3, 0]}, True),
    ({"shard_count": 4, "shard_ids": [2, 3]}, False),
    ({"shard_count": 4, "shard_ids": [1]}, False),
])
def test_only_the_process_holding_shard_zero_syncs(keys: dict, syncs: bool) -> None:
    assert runner.syncs_commands(sharding(**keys)) is syncs


@pytest.fixture
def fake_discord_http(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """``guildtune sync`` against no Discord: login accepted, each tree sync recorded."""
    synced: list[Any] = []

    async def login(self: Any, token: str) -> None:
        return None

    async def sync(self: Any, *, guild: Any = None) -> list[Any]:
        synced.append(guild)
        return []

    monkeypatch.setattr(discord.Client, "login", login)
    monkeypatch.setattr(discord.app_commands.CommandTree, "sync", sync)
    return synced


async def test_guildtune_sync_refuses_a_process_without_shard_zero(
        fake_discord_http: list[Any]) -> None:
    cfg = parse_config({"discord": {"shard_count": 4, "shard_ids": [2, 3]}},
                       env={"DISCORD_TOKEN": "fake.token.value"})
    with pytest.raises(ConfigError) as exc:
        await runner.sync_commands(cfg)
    msg = str(exc.value)
    assert "[2, 3]" in msg and "shard 0" in msg and "\n" not in msg
    assert fake_discord_http == []


async def test_guildtune_sync_syncs_once_from_the_shard_zero_process(
        fake_discord_http: list[Any]) -> None:
    cfg = parse_config({"discord": {"shard_count": 4, "shard_ids": [0, 1]}},
                       env={"DISCORD_TOKEN": "fake.token.value"})
    assert await runner.sync_commands(cfg) == []
    assert fake_discord_http == [None]  # one global sync, whatever the number of shards
