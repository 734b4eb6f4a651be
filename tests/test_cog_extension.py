"""Loading guildtune into a host bot is polite: the host's commands, intents and error handler
stay as they were, the hot-swap watcher runs while loaded, and unloading leaves nothing behind."""

from __future__ import annotations

import asyncio
import sys
import threading

import discord
import pytest
from discord.ext import commands

from tests.fakes import FakeEngine, FakeScheduler, make_services, write_config


@pytest.fixture
def keep_modules():
    # unload_extension drops bot.* from sys.modules; restore them so later tests keep the
    # class identities they imported.
    saved = {k: v for k, v in sys.modules.items() if k == "bot" or k.startswith("bot.")}
    yield
    sys.modules.update(saved)


async def test_load_and_unload_into_a_host_bot(tmp_path, keep_modules) -> None:
    intents = discord.Intents.default()
    host = commands.Bot(command_prefix="?", intents=intents)

    @host.command()
    async def ping(ctx: commands.Context) -> None:
        await ctx.send("pong")

    @host.tree.command(name="hostcmd", description="the host's own")
    async def hostcmd(interaction: discord.Interaction) -> None:
        pass

    async def host_on_error(event: str, *a: object, **k: object) -> None:
        pass

    host.on_error = host_on_error
    intents_before = host.intents.value
    tree_before = {c.name for c in host.tree.get_commands()}
    threads_before = threading.active_count()

    engine = FakeEngine()
    services = make_services(tmp_path, engine=engine, training={"enabled": True})
    services.scheduler = FakeScheduler()
    services.store.register_version(42, 1, str(tmp_path / "a1"), base_model="tiny", lora={},
                                    activate=True)
    host.guildtune_services = services
    await host.load_extension("bot")
    cog = host.get_cog("GuildTune")
    assert cog is not None
    assert {c.name for c in host.tree.get_commands()} == tree_before | {
        "consent", "mydata", "forget", "tune"}
    assert services.scheduler.running
    for _ in range(100):  # the watcher activates what storage says is active
        if engine.active_versions() == {42: 1}:
            break
        await asyncio.sleep(0.02)
    assert engine.active_versions() == {42: 1}
    names = {t.get_name() for t in asyncio.all_tasks()}
    assert "guildtune-adapter-watcher" in names

    await host.unload_extension("bot")
    assert host.get_cog("GuildTune") is None
    assert host.get_command("ping") is not None
    assert {c.name for c in host.tree.get_commands()} == tree_before
    assert host.intents.value == intents_before
    assert host.on_error is host_on_error
    assert "on_message" not in host.__dict__ and "on_error" in host.__dict__
    assert not services.scheduler.running and services.scheduler.shutdowns == 1
    await asyncio.sleep(0)
    assert not any(t.get_name().startswith("guildtune") for t in asyncio.all_tasks())
    assert threading.active_count() <= threads_before + 2  # to_thread workers are pooled
    assert not host._connection._view_store._dynamic_items  # buttons unregistered
    assert not engine.closed  # the host gave the engine: the host closes it
    services.store.close()


async def test_watcher_keeps_serving_when_an_adapter_is_broken(tmp_path, caplog) -> None:
    from bot.handlers import AdapterWatcher

    engine = FakeEngine()
    s = make_services(tmp_path, engine=engine)
    seen: list[str] = []

    async def notify(guild_id: int, line: str) -> None:
        seen.append(line)

    w = AdapterWatcher(s, 0.01, notify)
    s.store.register_version(7, 1, "/a/1", base_model="tiny", lora={}, activate=True)
    assert await w.sync_once() == ["Now serving model v1."]
    engine.broken.add(2)
    s.store.register_version(7, 2, "/a/2", base_model="tiny", lora={}, activate=True)
    out = await w.sync_once()
    assert "could not be loaded" in out[0] and engine.active_versions() == {7: 1}
    assert await w.sync_once() == []  # not retried every poll
    s.store.rollback(7)
    s.store.rollback(7)
    assert await w.sync_once() == ["Back on the base model."] and engine.active_versions() == {}
    assert len(seen) == 3
    s.store.close()


async def test_extension_imports_without_torch() -> None:
    import subprocess

    code = ("import sys, bot, bot.handlers, bot.cog, bot.console, bot.runner, "
            "guildtune.cli_bot; assert 'torch' not in sys.modules, 'torch imported'")
    res = await asyncio.to_thread(subprocess.run, [sys.executable, "-c", code],
                                  capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


async def test_real_scheduler_starts_in_cog_load_and_stops_in_unload(tmp_path, keep_modules) -> None:
    pytest.importorskip("guildtune.schedule")
    host = commands.Bot(command_prefix="?", intents=discord.Intents.none())
    services = make_services(tmp_path, training={"enabled": True})
    host.guildtune_services = services
    await host.load_extension("bot")
    sched = services.scheduler
    assert sched is not None and sched.running
    # The bot's scheduler only applies retention: one scheduler (the worker's) enqueues.
    from guildtune.schedule import RETENTION_JOB, make_scheduler, sync_jobs

    assert [j.id for j in sched.get_jobs()] == [RETENTION_JOB]
    cog = host.get_cog("GuildTune")
    await cog.core.set_training(5, True)  # the bot signals through the settings row ...
    await cog.core.set_schedule(5, "15 2 * * *")
    worker = make_scheduler(services.store, services.config, asyncio=False, background=True)
    sync = worker.get_job("guildtune-sync")
    assert sync.func is sync_jobs and sync.trigger.interval.total_seconds() <= 60
    sync.func(*sync.args)  # ... which the worker's sync job reads (every SYNC_SECONDS)
    job = worker.get_job("guildtune-train-5")
    assert job is not None and "hour='2'" in str(job.trigger) and "minute='15'" in str(job.trigger)
    assert sched.get_job("guildtune-train-5") is None
    await host.unload_extension("bot")
    assert not sched.running
    services.store.close()


def test_standalone_bot_spawns_the_worker_without_the_token(tmp_path, monkeypatch) -> None:
    """`guildtune run` starts `python -m guildtune [--config F] worker`; the worker never gets
    the Discord token."""
    import subprocess

    from bot import runner
    from guildtune.config import load_config

    cfg_file = write_config(tmp_path, storage={"data_dir": str(tmp_path)},
                            training={"enabled": True})
    cfg = load_config(cfg_file, env={"DISCORD_TOKEN": "tok.en.value"})
    seen = {}

    class FakePopen:
        def __init__(self, cmd, env=None, process_group=None):
            seen["cmd"], seen["env"], seen["group"] = cmd, env, process_group

    monkeypatch.setenv("DISCORD_TOKEN", "tok.en.value")
    monkeypatch.setattr(subprocess, "Popen", FakePopen)
    runner.spawn_worker(cfg)
    assert seen["cmd"][1:] == ["-m", "guildtune", "--config", str(cfg_file), "worker"]
    assert "DISCORD_TOKEN" not in seen["env"]
    assert seen["group"] == 0  # its own process group: the terminal's Ctrl-C is not its
    from guildtune.cli import build_parser

    build_parser().parse_args(seen["cmd"][3:])  # the worker's command line parses
