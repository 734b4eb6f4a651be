"""``guildtune demo``: the offline end-to-end loop with a report (see guildtune.demo)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .config import Config


def _count(text: str) -> int:
    """A number of prompts: a whole number, 0 or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative")
    return value


def cmd_demo(args: argparse.Namespace, cfg: Config) -> int:
    from rich.console import Console

    from .demo import demo_config, run_demo

    out = Path(args.out).resolve()
    dcfg = demo_config(cfg, out, args.model)
    console = Console()
    console.print(f"[bold]guildtune demo[/bold]: model {dcfg.model.name}, data dir "
                  f"{dcfg.data_dir}, report in {out}")
    report = run_demo(dcfg, out, [Path(p) for p in args.data], args.rounds, console,
                      args.feedback_rounds)
    # The Markdown as written: rich markup would eat "[like-rate]" of an image link, and
    # wrapping at the terminal's width would break the tables' rows.
    console.print(report.read_text(encoding="utf-8"), markup=False, highlight=False,
                  soft_wrap=True)
    console.print(f"[bold]report:[/bold] {report}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the whole loop offline: two guilds, feedback, training, "
                                    "hot swap, a report")
    p.add_argument("--model", help="base model for the demo (default: the configured one, "
                                   "smollm2-135m; 'tiny' runs in seconds)")
    p.add_argument("--data", action="append", default=[], metavar="FILE",
                   help="a community JSONL or DiscordChatExporter JSON file, one guild each "
                        "(repeat; default: the built-in two communities)")
    p.add_argument("--rounds", type=int, default=12,
                   help="prompts per guild replayed before and after training")
    p.add_argument("--feedback-rounds", type=_count, default=None, metavar="N",
                   help="prompts per guild before and after the feedback-only retrain (new "
                        "guilds with no imported history; default: --rounds, at least 12, "
                        "which a first run needs; 0 leaves that phase out)")
    p.add_argument("--out", default="guildtune-demo", help="report directory")
    p.set_defaults(func=cmd_demo)
