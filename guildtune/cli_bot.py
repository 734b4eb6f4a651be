"""The bot's subcommands of ``guildtune``: run, console, sync, vllm.

``add_commands(sub)`` registers them on the main parser's subparsers; each handler is
``handler(args, cfg) -> int`` (set as ``func``) and the main CLI dispatches.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from typing import Any

from guildtune.cli_types import discord_id
from guildtune.config import Config

log = logging.getLogger(__name__)


def add_commands(sub: Any) -> None:
    """Register ``run``, ``console``, ``sync`` and ``vllm``."""
    p = sub.add_parser("run", help="run the Discord bot (needs DISCORD_TOKEN)")
    p.add_argument("--no-worker", action="store_true",
                   help="do not start a training worker process (run `guildtune worker` "
                        "elsewhere, e.g. on a GPU host)")
    p.set_defaults(func=cmd_run, log_level=logging.INFO)  # a service: its log is its output

    p = sub.add_parser("console", help="chat in the terminal with the same handlers, no Discord "
                                       "(and, with training on, its training worker)")
    p.add_argument("--guild", required=True, type=console_guild, metavar="NAME|ID",
                   help="a guild id (the guild `guildtune import --guild ID` wrote), or a name "
                        "for a local guild (its id is printed at start)")
    p.add_argument("--user", default="you", metavar="NAME", help="local user name")
    p.add_argument("--engine", choices=("model", "echo"), default="model",
                   help="'echo' repeats messages (no model needed) to try the loop")
    p.set_defaults(func=cmd_console)

    p = sub.add_parser("sync", help="register the slash commands with Discord (explicit, "
                                    "never done on start; when sharded, with the config of "
                                    "the process holding shard 0)")
    p.add_argument("--guild", type=discord_id, default=None, metavar="ID",
                   help="sync to one guild (instant) instead of globally (up to an hour)")
    p.set_defaults(func=cmd_sync)

    p = sub.add_parser("vllm", help="start a vLLM server configured from config.toml (for "
                                    "model.backend = \"vllm\")")
    p.add_argument("--python", default=None, metavar="PATH",
                   help="the Python that has vLLM installed (default: $GUILDTUNE_VLLM_PYTHON, "
                        "else this one)")
    p.add_argument("--port", type=int, default=None, help="override model.vllm_url's port")
    p.add_argument("--print", dest="print_only", action="store_true",
                   help="print the command line instead of starting the server")
    p.set_defaults(func=cmd_vllm)


def cmd_run(args: argparse.Namespace, cfg: Config) -> int:
    """guildtune run"""
    from bot.runner import serve

    try:  # a ConfigError (no token, ...) is the CLI's one error line
        asyncio.run(serve(cfg, worker=not args.no_worker))
    except KeyboardInterrupt:
        pass
    return 0


def console_guild(text: str) -> str | int:
    """``--guild`` of the console: digits are a guild id (checked as ``discord_id``), anything
    else a local guild's name."""
    return discord_id(text) if text.isdigit() else text


def cmd_console(args: argparse.Namespace, cfg: Config) -> int:
    """guildtune console --guild NAME|ID: the chat on stdin/stdout; library output and the
    training worker's log in <data_dir>/console.log; the worker (started as ``guildtune run``
    starts it, when the operator's training is on) stops with the console. Ctrl-C ends it at
    once."""
    from bot.console import EchoEngine, run_console
    from bot.runner import spawn_worker, stop_worker
    from bot.services import open_services
    from bot.terminal import library_output_to
    from guildtune.cli import _data_dir

    log_path = _data_dir(cfg) / "console.log"

    async def main() -> int:
        engine = EchoEngine() if args.engine == "echo" else None
        async with open_services(cfg, engine=engine) as services:
            # On the loop's thread, which lives as long as the console (spawn_worker's rule).
            worker = spawn_worker(cfg, log_file=log_path)
            try:
                return await run_console(services, args.guild, user=args.user, stdin=sys.stdin,
                                         out=sys.stdout, worker=worker, log_path=log_path)
            finally:
                await stop_worker(worker)

    if args.engine == "model":  # seconds (minutes when it is fetched), its output in the log
        print(f"loading {cfg.model.name} …", flush=True)
    with library_output_to(log_path):
        try:
            return asyncio.run(main())
        except KeyboardInterrupt:  # Ctrl-C: the session ends, the prompt's line too
            sys.stdout.write("\n")
            return 0


def cmd_sync(args: argparse.Namespace, cfg: Config) -> int:
    """guildtune sync [--guild ID]"""
    from bot.runner import sync_commands

    names = asyncio.run(sync_commands(cfg, args.guild))
    where = f"guild {args.guild}" if args.guild else "globally (visible within an hour)"
    print(f"synced {len(names)} commands {where}: {', '.join(sorted(names))}")
    return 0


def cmd_vllm(args: argparse.Namespace, cfg: Config) -> int:
    """guildtune vllm [--python PATH] [--port N] [--print]"""
    import os

    from guildtune.vllm_server import find_python, server_command

    cmd = server_command(cfg, python=find_python(args.python), port=args.port)
    if args.print_only:
        print(cmd.shell())
        return 0
    print(f"starting: {cmd.shell()}", file=sys.stderr, flush=True)
    # The server replaces this process: nothing is left behind when it stops.
    os.execve(cmd.argv[0], cmd.argv, {**os.environ, **cmd.env})
    return 0  # pragma: no cover - execve does not return
