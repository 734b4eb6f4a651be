"""The standalone bot: ``guildtune run`` (serve) and ``guildtune sync`` (register commands).

Intents: guilds, guild messages, message content (privileged: enable it in the Developer
Portal), guild reactions; DM messages and reactions only when ``discord.allow_dms``. Commands are
never synced on start: syncing is an explicit owner action (``guildtune sync``), because every
sync counts against a daily limit and a half-deployed version would overwrite the live commands.

Sharding (``discord.shard_count``, ``discord.shard_ids``; ``make_bot``): an
``AutoShardedBot`` runs this process's shards over one Cog, one store and one engine, so nothing
here is per connection: the Cog keys its state by guild, never asks for ``bot.latency`` or waits
on readiness, and sets no presence. Several processes split the shards and share one PostgreSQL
and one vLLM server; the command tree is one per application, so only the config that holds
shard 0 (or all shards) may sync it (``syncs_commands``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import discord
from discord.ext import commands

from guildtune.cli_train import PARENT_PID_ENV
from guildtune.config import ENV_TOKEN, Config, ConfigError

log = logging.getLogger(__name__)


def make_intents(cfg: Config) -> discord.Intents:
    """Exactly the intents guildtune needs, nothing more."""
    intents = discord.Intents.none()
    intents.guilds = True
    intents.guild_messages = True
    intents.message_content = True
    intents.guild_reactions = True
    if cfg.discord.allow_dms:
        intents.dm_messages = True
        intents.dm_reactions = True
    return intents


class _Standalone:
    """What the standalone bot adds to discord.py's bot class, sharded or not: its only feature
    is the guildtune extension."""

    def __init__(self, cfg: Config, **kwargs: Any) -> None:
        super().__init__(command_prefix=commands.when_mentioned,  # type: ignore[call-arg]
                         intents=make_intents(cfg),
                         allowed_mentions=discord.AllowedMentions.none(), **kwargs)
        self.guildtune_config = cfg

    async def setup_hook(self) -> None:
        await self.load_extension("bot")  # type: ignore[attr-defined]

    async def on_message(self, message: discord.Message) -> None:
        # No prefix commands in the standalone bot: a mention is a chat message for the Cog's
        # listener, not a command to parse (which would log CommandNotFound on every mention).
        return None


class GuildTuneBot(_Standalone, commands.Bot):
    """The standalone bot on one gateway connection (``discord.shard_count = 0``)."""


class ShardedGuildTuneBot(_Standalone, commands.AutoShardedBot):
    """The standalone bot running shards: ``discord.shard_count`` of them in all, of which this
    process runs ``discord.shard_ids`` (all when empty)."""


def shard_options(cfg: Config) -> dict[str, Any]:
    """``AutoShardedBot``'s ``shard_count`` and ``shard_ids`` from the config: None for "auto"
    (the library asks Discord) and for no ids (the library runs 0 .. shard_count - 1)."""
    d = cfg.discord
    return {"shard_count": None if d.shard_count == "auto" else d.shard_count,
            "shard_ids": list(d.shard_ids) or None}


def make_bot(cfg: Config, **kwargs: Any) -> GuildTuneBot | ShardedGuildTuneBot:
    """The bot ``guildtune run`` serves: sharded when ``discord.shard_count`` is set, else a
    plain ``commands.Bot`` on one connection."""
    if not cfg.discord.sharded:
        return GuildTuneBot(cfg, **kwargs)
    return ShardedGuildTuneBot(cfg, **shard_options(cfg), **kwargs)


def syncs_commands(cfg: Config) -> bool:
    """Whether this config is the one whose ``guildtune sync`` registers the slash commands.

    The command tree belongs to the application, not to a shard or a process: a sync from each
    of several processes would only spend Discord's daily sync limit (and a host still on the
    old version could overwrite the new commands). The rule: the process that holds shard 0
    syncs; that is every config without ``discord.shard_ids`` (unsharded, or all shards in one
    process) and any config whose ``shard_ids`` include 0.
    """
    ids = cfg.discord.shard_ids
    return not ids or 0 in ids


def require_token(cfg: Config) -> str:
    """The token, or a one-line ConfigError telling how to provide it."""
    if not cfg.discord.token:
        raise ConfigError(f"{ENV_TOKEN} is not set: export {ENV_TOKEN}=<your bot token> (from "
                          "the Discord Developer Portal, Bot tab) and run again")
    return cfg.discord.token


def spawn_worker(cfg: Config, *, log_file: Path | None = None
                 ) -> subprocess.Popen[bytes] | None:
    """Start the training worker in its own process (an OOM there never takes the bot down);
    None when the operator's ``training.enabled`` is off. Its output goes where this process's
    goes, or is appended to ``log_file`` (the console: its terminal is the chat).

    The worker dies with this process, SIGKILL included: it is told this pid
    (``PARENT_PID_ENV``) and asks the kernel for SIGTERM when its parent goes (Linux), or
    watches for being reparented; on SIGTERM it gives its run back and exits. Linux sends that
    signal when the spawning *thread* exits: call this from a thread that lives as long as the
    bot (``serve`` calls it on the event loop's thread), not from ``asyncio.to_thread``.
    """
    if not cfg.training.enabled:
        return None
    cmd = [sys.executable, "-m", "guildtune"]
    if cfg.source not in ("built-in defaults", "<dict>"):
        cmd += ["--config", cfg.source]
    cmd.append("worker")
    log.info("starting training worker: %s", " ".join(cmd))
    # The worker never talks to Discord: it does not get the token.
    env = {k: v for k, v in os.environ.items() if k != ENV_TOKEN}
    env[PARENT_PID_ENV] = str(os.getpid())
    # Its own process group: the terminal's Ctrl-C, Ctrl-\ and Ctrl-Z go to the bot or the
    # console only, which stops the worker itself (stop_worker); it dies with us regardless
    # (PR_SET_PDEATHSIG, set by the worker).
    if log_file is None:
        return subprocess.Popen(cmd, env=env, process_group=0)
    with open(log_file, "ab") as out:  # the child has its own copy of the descriptor
        return subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, process_group=0)


async def stop_worker(proc: subprocess.Popen[bytes] | None, timeout: float = 30.0) -> None:
    """SIGTERM the worker (it gives its run back), wait for it, SIGKILL it past ``timeout``."""
    if proc is None or proc.poll() is not None:
        return
    log.info("stopping the training worker (pid %s)", proc.pid)
    proc.terminate()
    try:
        await asyncio.to_thread(proc.wait, timeout)
    except subprocess.TimeoutExpired:
        log.warning("the training worker (pid %s) did not stop within %.0f s: killing it",
                    proc.pid, timeout)
        proc.kill()
        await asyncio.to_thread(proc.wait)
    log.info("training worker stopped (exit code %s)", proc.returncode)


async def serve(cfg: Config, *, worker: bool = True) -> None:
    """Run the bot until it is closed (Ctrl+C, or SIGTERM: logged, then the bot closes, which
    unloads the Cog and closes the store, and the worker is stopped)."""
    token = require_token(cfg)
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    bot: GuildTuneBot | ShardedGuildTuneBot | None = None
    closing: set[asyncio.Task[None]] = set()

    def on_sigterm() -> None:
        if stopping.is_set():
            return
        log.warning("SIGTERM: shutting down (closing the bot and the store, stopping the "
                    "training worker)")
        stopping.set()
        if bot is not None:
            task = loop.create_task(bot.close())
            closing.add(task)
            task.add_done_callback(closing.discard)

    try:
        loop.add_signal_handler(signal.SIGTERM, on_sigterm)
        handled = True
    except (NotImplementedError, RuntimeError):  # not Unix, or not the main thread
        handled = False
    proc = spawn_worker(cfg) if worker else None
    d = cfg.discord
    if d.sharded:
        log.info("sharded: shards %s of %s in this process",
                 list(d.shard_ids) or "all", d.shard_count)
    try:
        async with make_bot(cfg) as bot:
            if stopping.is_set():
                return
            try:
                await bot.start(token)
            except discord.LoginFailure:
                raise ConfigError(f"Discord refused the token in {ENV_TOKEN} (wrong, revoked or "
                                  "not a bot token): copy it again from the Developer Portal, "
                                  "Bot tab") from None
            except discord.PrivilegedIntentsRequired:
                raise ConfigError("the Message Content intent is not enabled for this bot: turn "
                                  "it on in the Developer Portal, Bot tab, Privileged Gateway "
                                  "Intents") from None
            if closing:
                await asyncio.gather(*closing, return_exceptions=True)
            if stopping.is_set():
                # Again: an extension that finished loading after the first close (SIGTERM
                # during start-up) is unloaded too, so its Cog closes the store.
                await bot.close()
    finally:
        await stop_worker(proc)
        if handled:
            loop.remove_signal_handler(signal.SIGTERM)
        if stopping.is_set():
            log.info("shut down")


async def sync_commands(cfg: Config, guild_id: int | None = None) -> list[str]:
    """Register the slash commands with Discord (globally, or to one guild at once).

    Logs in over HTTP only (no gateway) and builds the commands without loading a model.
    Refused (``ConfigError``) for a config that does not hold shard 0 (``syncs_commands``).
    """
    from bot.cog import GuildTuneCog
    from bot.services import Services

    if not syncs_commands(cfg):
        raise ConfigError(
            f"guildtune sync: this config runs shards {list(cfg.discord.shard_ids)} "
            "(discord.shard_ids), not shard 0: the slash commands are one set per application, "
            "synced once; run guildtune sync with the config of the process that holds shard 0")
    token = require_token(cfg)
    bot = commands.Bot(command_prefix=commands.when_mentioned, intents=discord.Intents.none())
    # The tree only needs the command definitions: a Cog over placeholder services is enough.
    cog = GuildTuneCog(bot, Services(config=cfg, store=None, engine=None))  # type: ignore[arg-type]
    for cmd in cog.get_app_commands():
        bot.tree.add_command(cmd)
    async with bot:
        await bot.login(token)
        guild = discord.Object(id=guild_id) if guild_id else None
        if guild is not None:
            bot.tree.copy_global_to(guild=guild)
        synced = await bot.tree.sync(guild=guild)
    return [c.name for c in synced]
