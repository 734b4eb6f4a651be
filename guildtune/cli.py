"""The ``guildtune`` command. Config comes from ``--config FILE``, else $GUILDTUNE_CONFIG, else
./config.toml, else built-in defaults. Errors are one line on stderr and a non-zero exit.

Heavy imports (torch, transformers, peft, discord) happen inside the subcommands that need them,
so ``guildtune --help`` and the storage commands start fast.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .config import Config, ConfigError, load_config

log = logging.getLogger("guildtune")

# Subcommand modules of the other packages; each has add_commands(subparsers).
_PLUGINS = ("guildtune.cli_train", "guildtune.cli_bot", "guildtune.cli_demo")


def _store(cfg: Config):  # noqa: ANN202 - storage import kept local for start-up time
    from storage import open_store

    return open_store(cfg.db_path, busy_timeout_ms=cfg.storage.busy_timeout_ms,
                      write_retries=cfg.storage.write_retries)


def _print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, ensure_ascii=False, default=str)
    sys.stdout.write("\n")


def cmd_init(args: argparse.Namespace, cfg: Config) -> int:
    """Create the data directory and the database."""
    store = _store(cfg)
    store.close()
    (cfg.adapters_dir).mkdir(parents=True, exist_ok=True)
    print(f"data dir: {cfg.data_dir}")
    print(f"database: {cfg.db_path} (schema up to date)")
    print(f"config:   {cfg.source}")
    print(f"training: {'enabled' if cfg.training.enabled else 'disabled'} by the operator"
          + ("" if cfg.training.enabled else
             " (set training.enabled = true once Discord has allowed training on message "
             "content)"))
    return 0


def cmd_status(args: argparse.Namespace, cfg: Config) -> int:
    """Per guild: consented users, interactions, ratings, active version, queued runs."""
    store = _store(cfg)
    try:
        guilds = [args.guild] if args.guild else store.guild_ids()
        stats = [store.guild_stats(g) for g in guilds]
    finally:
        store.close()
    if args.json:
        _print_json({"data_dir": str(cfg.data_dir), "guilds": stats})
        return 0
    print(f"data dir {cfg.data_dir}; training "
          f"{'enabled' if cfg.training.enabled else 'disabled'} by the operator")
    if not stats:
        print("no guilds yet")
        return 0
    header = ("guild", "consented", "interactions", "messages", "likes", "dislikes", "active",
              "queued")
    rows = [(str(s["guild_id"]), str(s["consented_users"]), str(s["interactions"]),
             str(s["messages"]), str(s["likes"]), str(s["dislikes"]),
             "base" if s["active_version"] is None else f"v{s['active_version']}",
             str(s["queued_runs"])) for s in stats]
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    for r in (header, *rows):
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
    return 0


def cmd_export(args: argparse.Namespace, cfg: Config) -> int:
    """Everything stored of one member, as JSON."""
    store = _store(cfg)
    try:
        data = store.export_user(args.user, args.guild)
    finally:
        store.close()
    if args.out:
        Path(args.out).write_text(json.dumps(data, indent=2, ensure_ascii=False),
                                  encoding="utf-8")
        print(f"wrote {args.out}")
    else:
        _print_json(data)
    return 0


def cmd_forget(args: argparse.Namespace, cfg: Config) -> int:
    """Delete every row of one member; taint and retrain the versions trained on them."""
    store = _store(cfg)
    try:
        report = store.forget_user(args.user, args.guild, strict=cfg.training.strict_forget)
    finally:
        store.close()
    print(f"deleted {report.total_deleted} rows of user {args.user}: "
          + ", ".join(f"{k} {v}" for k, v in report.deleted.items() if v))
    for g, v in report.tainted:
        print(f"guild {g}: version {v} was trained on their data; retrain queued "
              f"(run {report.retrain_runs.get(g)})")
    for g in report.deactivated:
        print(f"guild {g}: tainted active version replaced at once (strict_forget)")
    return 0


def cmd_import(args: argparse.Namespace, cfg: Config) -> int:
    """Load a community JSONL (or DiscordChatExporter JSON) file as consented history."""
    from .community import read_community

    messages = read_community(args.file)
    store = _store(cfg)
    try:
        n = store.import_messages(args.guild, (m.as_store_row() for m in messages))
        if args.learn_from_humans:
            store.update_guild_settings(args.guild, learn_from_humans=True)
        pairs = len(store.reply_pairs(args.guild))
    finally:
        store.close()
    authors = len({m.user_id for m in messages})
    print(f"imported {n} messages by {authors} members into guild {args.guild} "
          f"({pairs} reply pairs); the operator asserts their consent and Discord's permission")
    return 0


def cmd_schema(args: argparse.Namespace, cfg: Config) -> int:
    """Print the database schema as Markdown (the README's schema section)."""
    from storage.schema import schema_markdown

    print(schema_markdown())
    return 0


def cmd_backup(args: argparse.Namespace, cfg: Config) -> int:
    """Copy the live database to PATH (SQLite online backup: safe while the bot runs)."""
    store = _store(cfg)
    try:
        dest = store.backup(args.path)
    finally:
        store.close()
    print(f"backed up {cfg.db_path} to {dest} ({dest.stat().st_size} bytes, integrity ok)")
    return 0


def cmd_restore(args: argparse.Namespace, cfg: Config) -> int:
    """Replace the database with the backup at PATH; the old one is kept beside it."""
    from storage import open_store, restore_backup

    kept = restore_backup(args.path, cfg.db_path,
                          lock_timeout_ms=min(cfg.storage.busy_timeout_ms, 1000))
    # Open once: applies any migration newer than the backup, and proves the file opens.
    open_store(cfg.db_path, busy_timeout_ms=cfg.storage.busy_timeout_ms).close()
    print(f"restored {cfg.db_path} from {args.path}"
          + (f"; the replaced database is kept as {kept}" if kept else ""))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="guildtune",
        description="A Discord bot whose model becomes each community's own: per-guild LoRA "
                    "adapters trained from consented feedback and hot-swapped in.")
    parser.add_argument("--config", metavar="FILE",
                        help="config file (default: $GUILDTUNE_CONFIG, ./config.toml, defaults)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"guildtune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("init", help="create the data directory and database")
    p.set_defaults(func=cmd_init)
    p = sub.add_parser("status", help="per-guild counts, active version and queue")
    p.add_argument("--guild", type=int, help="only this guild")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("export", help="everything stored of one member, as JSON")
    p.add_argument("--user", type=int, required=True)
    p.add_argument("--guild", type=int, help="only this guild (default: all)")
    p.add_argument("--out", metavar="FILE", help="write to FILE instead of stdout")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("forget", help="delete every row of one member and retrain without it")
    p.add_argument("--user", type=int, required=True)
    p.add_argument("--guild", type=int, help="only this guild (default: all)")
    p.set_defaults(func=cmd_forget)
    p = sub.add_parser("import", help="load community JSONL history as consented data")
    p.add_argument("--guild", type=int, required=True)
    p.add_argument("--learn-from-humans", action="store_true",
                   help="also let the trainer learn from members' replies to each other")
    p.add_argument("file", metavar="FILE.jsonl")
    p.set_defaults(func=cmd_import)
    p = sub.add_parser("schema", help="print the database schema as Markdown")
    p.set_defaults(func=cmd_schema)
    p = sub.add_parser("backup", help="copy the live database to PATH (safe while it runs)")
    p.add_argument("path", metavar="PATH")
    p.set_defaults(func=cmd_backup)
    p = sub.add_parser("restore", help="replace the database with the backup at PATH")
    p.add_argument("path", metavar="PATH")
    p.set_defaults(func=cmd_restore)

    for name in _PLUGINS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.add_commands(sub)
    return parser


def _known_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [ConfigError]
    for mod, names in (("storage", ("StoreError",)), ("guildtune.community",
                                                      ("CommunityFileError",)),
                       ("guildtune.models", ("ModelError",))):
        module = sys.modules.get(mod)
        if module is None:
            try:
                module = importlib.import_module(mod)
            except ImportError:
                continue
        errors.extend(getattr(module, n) for n in names)
    for mod in ("bot.engine", "trainer"):
        module = sys.modules.get(mod)
        for n in ("AdapterError", "EngineError", "TrainerError"):
            if module is not None and hasattr(module, n):
                errors.append(getattr(module, n))
    return tuple(errors)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        cfg = load_config(args.config)
        return int(args.func(args, cfg) or 0)
    except KeyboardInterrupt:
        print("guildtune: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if isinstance(exc, _known_errors()):
            print(f"guildtune: error: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
