"""Argument types shared by every ``guildtune`` subcommand (one home for what an id is)."""

from __future__ import annotations

import argparse


def discord_id(text: str) -> int:
    """A guild or member id: a non-negative 64-bit integer, as Discord's snowflakes are."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an id (digits only)") from None
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"{text} is not an id: out of the 64-bit range")
    return value


def add_config_option(p: argparse.ArgumentParser) -> None:
    """``--config FILE`` on a subcommand too (``guildtune init --config X`` as well as
    ``guildtune --config X init``). SUPPRESS: a subcommand's default must not overwrite a value
    given before the subcommand."""
    try:
        p.add_argument("--config", default=argparse.SUPPRESS, metavar="FILE",
                       help="config file (TOML); also accepted before the command")
    except argparse.ArgumentError:  # the subcommand has it already
        pass
