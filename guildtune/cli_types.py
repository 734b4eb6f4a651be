"""What every ``guildtune`` subcommand shares: what an id is, the parser, and the one form of an
expected error (one home for each).

An expected error is one line on stderr, ``guildtune: error: <message>``, and nothing else:
exit code 2 for a usage mistake (argparse's own errors, a bad argument value), 1 for a failure.
A command raises ``CommandError`` (or a known error class, ``guildtune.cli.error_line``) and
``guildtune.cli.main`` prints it with ``print_error``; no command prints its own error.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

PROG = "guildtune"
USAGE_EXIT = 2  # a usage mistake: the command line, not the world, is wrong
FAILURE_EXIT = 1


class CommandError(Exception):
    """An expected failure of a command; its message is the error line (exit 1)."""


def print_error(message: str) -> None:
    """Write ``guildtune: error: <message>`` as one line on stderr: the only way an expected
    error reaches the operator."""
    line = " ".join(message.split("\n")).strip()
    print(f"{PROG}: error: {line}", file=sys.stderr, flush=True)


class Parser(argparse.ArgumentParser):
    """argparse with the CLI's error line: a usage mistake is one line naming the command and
    where its usage is (``--help``), exit 2. Subcommands' parsers are of this class too
    (``add_subparsers`` uses the parent's class)."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix(PROG).strip()
        print_error(f"{command + ': ' if command else ''}{message}; see `{self.prog} --help`")
        self.exit(USAGE_EXIT)


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
