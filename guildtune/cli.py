"""The ``guildtune`` command. Config comes from ``--config FILE``, else $GUILDTUNE_CONFIG, else
./config.toml, else built-in defaults. An expected error is one line on stderr, ``guildtune:
error: <message>``, and nothing else: exit 2 for a usage mistake, 1 for a failure (the rule and
its one printer: ``guildtune.cli_types``; the messages: ``error_line``).

Heavy imports (torch, transformers, peft, discord) happen inside the subcommands that need them,
so ``guildtune --help`` and the storage commands start fast.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sqlite3
import sys
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from . import __version__
from .cli_types import (
    FAILURE_EXIT,
    CommandError,
    Parser,
    add_config_option,
    discord_id,
    print_error,
)
from .config import Config, ConfigError, load_config
from .policy import operator_block

log = logging.getLogger("guildtune")

# Subcommand modules of the other packages; each has add_commands(subparsers).
_PLUGINS = ("guildtune.cli_train", "guildtune.cli_bot", "guildtune.cli_demo")


def _data_dir(cfg: Config) -> Path:
    """The data directory, created with mode 0700 (it holds members' data) when missing; a
    ConfigError naming ``storage.data_dir`` when it cannot be used."""
    d = cfg.data_dir
    where = f"config: storage.data_dir = {str(d)!r}"
    if d.exists() and not d.is_dir():
        raise ConfigError(f"{where} is a file, not a directory")
    created = not d.exists()
    try:
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        if created:
            d.chmod(0o700)  # mkdir's mode is masked by the umask
    except OSError as exc:
        raise ConfigError(f"{where} cannot be created: {exc.strerror or exc}"
                          + (f" ({exc.filename})" if exc.filename else "")) from None
    if not os.access(d, os.W_OK | os.X_OK):
        raise ConfigError(f"{where} is not writable by this user; fix its owner or mode, or "
                          "choose another directory")
    return d


def _store(cfg: Config):  # noqa: ANN202 - storage import kept local for start-up time
    _data_dir(cfg)
    return cfg.open_store()


def no_database(cfg: Config) -> str | None:
    """What a command says when there is no database yet (None: there is one, or the data dir
    is a file, which ``_store`` reports). A command that reads or deletes members' data asks
    this before ``_store``, which would create an empty database as a side effect."""
    from storage.store import store_exists
    from storage.postgres import redact_url

    where = cfg.store_url
    if cfg.data_dir.is_file() or store_exists(where):
        return None
    if isinstance(where, str):
        return f"no guildtune tables yet in {redact_url(where)} (`guildtune init` creates them)"
    return f"no database yet at {where} (`guildtune init` creates it)"


def _print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, ensure_ascii=False, default=str)
    sys.stdout.write("\n")


def cmd_init(args: argparse.Namespace, cfg: Config) -> int:
    """Create the data directory (mode 0700) and the database."""
    store = _store(cfg)
    where = store.where  # a file, or the server's URL without its password
    store.close()
    (cfg.adapters_dir).mkdir(parents=True, exist_ok=True)
    print(f"data dir: {cfg.data_dir}")
    print(f"database: {where} (schema up to date)")
    print(f"config:   {cfg.source}")
    off = operator_block(cfg)
    print("training: enabled by the operator" if off is None else
          f"training: {off}; set it to true once Discord has allowed training on message "
          "content (see the README)")
    return 0


def cmd_status(args: argparse.Namespace, cfg: Config) -> int:
    """Per guild: consented users, interactions, ratings, active version, queued runs; a
    tainted active version is marked, with what will replace it (``active_tainted``)."""
    # No discord, no torch in it; the same words as /tune status.
    from bot.status import StatusReport

    missing = no_database(cfg)
    if missing is not None:  # a status never creates the database as a side effect
        if args.json:
            _print_json({"data_dir": str(cfg.data_dir), "guilds": []})
        else:
            print(f"{missing}; no guilds")
        return 0
    store = _store(cfg)
    try:
        guilds = [args.guild] if args.guild else store.guild_ids()
        stats = []
        for g in guilds:
            s = store.guild_stats(g)
            active = store.active_version(g)
            s["active_tainted"] = None if active is None or active.tainted_utc is None else \
                StatusReport.taint(active, store.versions(g), store.open_run(g), cfg=cfg,
                                   settings=store.guild_settings(g))
            stats.append(s)
    finally:
        store.close()
    if args.json:
        _print_json({"data_dir": str(cfg.data_dir), "guilds": stats})
        return 0
    print(f"data dir {cfg.data_dir}; "
          f"{operator_block(cfg) or 'training is enabled by the operator'}")
    if not stats:
        print("no guilds yet")
        return 0
    header = ("guild", "consented", "interactions", "messages", "likes", "dislikes", "active",
              "queued")
    rows = [(str(s["guild_id"]), str(s["consented_users"]), str(s["interactions"]),
             str(s["messages"]), str(s["likes"]), str(s["dislikes"]),
             "base" if s["active_version"] is None else f"v{s['active_version']}"
             + (" (tainted)" if s["active_tainted"] else ""),
             str(s["queued_runs"])) for s in stats]
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    for r in (header, *rows):
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
    for s in stats:
        t = s["active_tainted"]
        if t:
            print(f"guild {s['guild_id']}: v{t['version']} (tainted: {t['reason']}); "
                  f"{t['replacement']}")
    return 0


def cmd_export(args: argparse.Namespace, cfg: Config) -> int:
    """Everything stored of one member, as JSON; an error when nothing is (so an id typed
    wrong is not mistaken for a member with no data)."""
    missing = no_database(cfg)
    if missing is not None:
        raise CommandError(f"{missing}; nothing is stored for member {args.user}")
    store = _store(cfg)
    try:
        data = store.export_user(args.user, args.guild)
    finally:
        store.close()
    if not any(v for v in data.values() if isinstance(v, list)):
        raise CommandError(f"nothing is stored for member {args.user}{_in_guild(args.guild)}")
    if args.out:
        # A member's data: readable by the operator's account only, also when the file existed.
        fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(data, indent=2, ensure_ascii=False))
        print(f"wrote {args.out}")
    else:
        _print_json(data)
    return 0


def cmd_forget(args: argparse.Namespace, cfg: Config) -> int:
    """Delete every row of one member; taint and retrain the versions trained on them."""
    missing = no_database(cfg)
    if missing is not None:  # as for a member the store does not know: safe to repeat, exit 0
        print(f"{missing}: nothing stored for member {args.user}, nothing deleted; for a later "
              "import to leave their messages out, forget them again once it exists")
        return 0
    store = _store(cfg)
    try:
        report = store.forget_user(args.user, args.guild,
                                   strict=cfg.training.withdraw_at_once, names=args.name or ())
        from guildtune.adapter_dir import prune_withdrawn

        pruned = prune_withdrawn(store, cfg)
    finally:
        store.close()
    parts = ", ".join(f"{k} {v}" for k, v in report.deleted.items() if v)
    if parts:
        print(f"deleted {report.total_deleted} rows of user {args.user}: {parts}")
    else:
        # Not an error: a forget is safe to repeat, and it still did its part: the member is
        # recorded as withdrawn, so a later import leaves their messages out.
        print(f"nothing stored for member {args.user}{_in_guild(args.guild)}: nothing deleted; "
              "their withdrawal is recorded, so a later import leaves their messages out")
    for g, v in report.tainted:
        print(f"guild {g}: version {v} was trained on their data; it will not be used again")
    for g, run_id in report.retrain_runs.items():
        print(f"guild {g}: retrain without their data queued (run {run_id})")
    for g, run_id in report.in_flight.items():
        print(f"guild {g}: run {run_id} in progress may include their data: its result will "
              "not be used; a retrain follows it")
    for g in report.deactivated:
        print(f"guild {g}: tainted active version replaced at once (strict_forget)")
    for g, v in pruned:
        print(f"guild {g}: files of withdrawn version {v} deleted")
    return 0


def cmd_import(args: argparse.Namespace, cfg: Config) -> int:
    """Load a community JSONL (or DiscordChatExporter JSON) file as consented history.

    Every time is stored as a UTC timestamp; times without a date are dated (and the import
    says how). Message ids come from each message's identity in its file, and a message id the
    guild already holds is never replaced: two files both survive, and importing the same file
    again stores nothing."""
    from storage.times import format_utc

    from .community import load_community

    src = load_community(args.file)
    messages = src.messages
    store = _store(cfg)
    try:
        before = store.import_record(args.guild, src.sha256)
        n = 0 if before else store.import_messages(
            args.guild, (m.as_store_row() for m in messages),
            source={"sha256": src.sha256, "file_name": src.path.name})
        if args.learn_from_humans:
            store.update_guild_settings(args.guild, learn_from_humans=True)
        learns = store.guild_settings(args.guild).learn_from_humans
        pairs = len(store.reply_pairs(args.guild))
    finally:
        store.close()
    if before:
        same = "" if before["file_name"] == src.path.name else \
            f" (the same bytes as {before['file_name']})"
        print(f"already imported: {src.path.name}{same} was imported into guild {args.guild} "
              f"on {before['imported_utc']} ({before['stored']} messages stored then); "
              "nothing stored")
        return 0
    if n == 0:
        print(f"already imported: all {len(messages)} messages of {src.path.name} are already "
              f"stored in guild {args.guild}; nothing stored")
        return 0
    authors = len({m.user_id for m in messages})
    skipped = len(messages) - n
    print(f"imported {n} messages by {authors} members into guild {args.guild} "
          f"({pairs} reply pairs)"
          + (f"; {skipped} messages were already stored and kept as they were" if skipped
             else "") + "; the operator asserts their consent and Discord's permission")
    note = src.dating_note()
    if note:
        print(f"note: {note}")
    print(f"note: {_history_use(args.guild, learns, pairs)}")
    days = cfg.privacy.retention_days
    if days > 0:
        cutoff = format_utc(datetime.now(UTC) - timedelta(days=days))
        old = sum(m.time < cutoff for m in messages)
        if old:
            print(f"note: {old} of these messages are older than privacy.retention_days "
                  f"({days} days): the retention job deletes them within a minute of the next "
                  "bot or worker start (privacy.retention_days = 0 keeps everything)")
    return 0


def _in_guild(guild_id: int | None) -> str:
    return "" if guild_id is None else f" in guild {guild_id}"


def _history_use(guild_id: int, learns: bool, pairs: int) -> str:
    """What a guild's imported history is used for, and the switch that changes it (one line).
    Imported messages never reach the bot's prompts (those come from the live channel); only
    the trainer reads them, as reply pairs, and only with learn_from_humans on."""
    switch = f"`guildtune guild --guild {guild_id} --learn-from-humans"
    if learns:
        return (f"guild {guild_id} learns from members' replies to each other: its {pairs} "
                "reply pairs are trained on from the next run on, within privacy.max_user_share "
                f"({switch} off` stops that)")
    return (f"guild {guild_id} does not learn from members' replies to each other, so this "
            "history is stored (counted in status, in export and forget) but not trained on; "
            f"{switch} on` turns that on (or import again with --learn-from-humans; nothing is "
            "stored twice)")


def cmd_guild(args: argparse.Namespace, cfg: Config) -> int:
    """Show a guild's switches, or set them: ``--training`` is the guild's own training switch
    (what an admin's ``/tune training`` sets; the operator's ``training.enabled`` still
    applies), ``--learn-from-humans`` whether members' replies to each other are trained on.
    A running worker follows a change within ``guildtune.schedule.SYNC_SECONDS``."""
    changes = {key: value == "on" for key, value in (("training_enabled", args.training),
                                                     ("learn_from_humans",
                                                      args.learn_from_humans))
               if value is not None}
    missing = no_database(cfg)
    if not changes and missing is not None:
        raise CommandError(missing)
    store = _store(cfg)
    try:
        gs = (store.update_guild_settings(args.guild, **changes) if changes
              else store.guild_settings(args.guild))
        pairs = len(store.reply_pairs(args.guild))
    finally:
        store.close()
    off = operator_block(cfg)
    print(f"guild {args.guild}: training {'on' if gs.training_enabled else 'off'}"
          + (f" (but {off})" if gs.training_enabled and off else "")
          + f"; schedule {gs.schedule or cfg.training.schedule} UTC"
          + ("" if gs.schedule else " (the config's default)"))
    print(_history_use(args.guild, gs.learn_from_humans, pairs))
    return 0


def cmd_schema(args: argparse.Namespace, cfg: Config) -> int:
    """Print the database schema as Markdown (the README's schema section)."""
    from storage.schema import schema_markdown

    print(schema_markdown())
    return 0


def cmd_backup(args: argparse.Namespace, cfg: Config) -> int:
    """Copy the live database to PATH (SQLite online backup: safe while the bot runs)."""
    missing = no_database(cfg)
    if missing is not None:  # a backup of an empty database it just created would mislead
        raise CommandError(f"{missing}; nothing to back up")
    store = _store(cfg)
    try:
        dest = store.backup(args.path)
    finally:
        store.close()
    print(f"backed up {cfg.db_path} to {dest} ({dest.stat().st_size} bytes, integrity ok)")
    return 0


def cmd_restore(args: argparse.Namespace, cfg: Config) -> int:
    """Replace the database with the backup at PATH; the old one is kept beside it."""
    from storage import restore_backup

    if isinstance(cfg.store_url, str):
        raise CommandError("storage.url is a PostgreSQL database: restore it with pg_restore "
                           "(see the README's Scaling out), not guildtune restore")
    kept = restore_backup(args.path, cfg.db_path,
                          lock_timeout_ms=min(cfg.storage.busy_timeout_ms, 1000))
    # Open once: applies any migration newer than the backup, and proves the file opens.
    cfg.open_store().close()
    print(f"restored {cfg.db_path} from {args.path}"
          + (f"; the replaced database is kept as {kept}" if kept else ""))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
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
    p.add_argument("--guild", type=discord_id, help="only this guild")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("export", help="everything stored of one member, as JSON")
    p.add_argument("--user", type=discord_id, required=True)
    p.add_argument("--guild", type=discord_id, help="only this guild (default: all)")
    p.add_argument("--out", metavar="FILE", help="write to FILE instead of stdout")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("forget", help="delete every row of one member and retrain without it")
    p.add_argument("--user", type=discord_id, required=True)
    p.add_argument("--guild", type=discord_id, help="only this guild (default: all)")
    p.add_argument("--name", action="append", metavar="NAME",
                   help="a name of theirs (repeatable) to remove from other members' stored "
                        "texts too; their id always is")
    p.set_defaults(func=cmd_forget)
    p = sub.add_parser("import", help="load community JSONL history as consented data")
    p.add_argument("--guild", type=discord_id, required=True)
    p.add_argument("--learn-from-humans", action="store_true",
                   help="also let the trainer learn from members' replies to each other")
    p.add_argument("file", metavar="FILE.jsonl")
    p.set_defaults(func=cmd_import)
    p = sub.add_parser("guild", help="show or set a guild's switches: training, "
                                     "learning from members' replies")
    p.add_argument("--guild", type=discord_id, required=True, help="guild id")
    p.add_argument("--training", choices=("on", "off"),
                   help="the guild's own training switch (as an admin's `/tune training`); "
                        "the operator's training.enabled still applies")
    p.add_argument("--learn-from-humans", choices=("on", "off"),
                   help="train on members' replies to each other (imported history included)")
    p.set_defaults(func=cmd_guild)
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
    for command in sub.choices.values():  # every command takes --config, before or after it
        add_config_option(command)
    return parser


def _known_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [ConfigError, CommandError]
    for mod, names in (("storage", ("StoreError",)), ("guildtune.community",
                                                      ("CommunityFileError",)),
                       ("guildtune.models", ("ModelError",)),
                       ("guildtune.vllm_server", ("VllmSetupError",))):
        module = sys.modules.get(mod)
        if module is None:
            try:
                module = importlib.import_module(mod)
            except ImportError:
                continue
        errors.extend(getattr(module, n) for n in names)
    for mod in ("bot.engine", "trainer"):
        module = sys.modules.get(mod)
        for n in ("AdapterError", "EngineError", "TrainingError"):
            if module is not None and hasattr(module, n):
                errors.append(getattr(module, n))
    return tuple(errors)


# SQLite result codes of a database file that is damaged or is not a database at all.
_DAMAGED = ("SQLITE_CORRUPT", "SQLITE_NOTADB")
# ... and of a database the environment keeps us from using (not a bug of ours).
_UNUSABLE = ("SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_FULL", "SQLITE_IOERR", "SQLITE_CANTOPEN",
             "SQLITE_READONLY", "SQLITE_PERM")


def _sqlite_code(exc: BaseException) -> str:
    return str(getattr(exc, "sqlite_errorname", "") or "")


def error_line(exc: BaseException, cfg: Config | None = None) -> str | None:
    """The one line an expected error gets on stderr, or None for a bug (which keeps its
    traceback). The one home for mapping errors to messages: the known error classes, a
    damaged or unusable database (also as the cause of a StoreError), and file system errors."""
    db = str(cfg.db_path) if cfg is not None else "the database"
    for e in (exc, exc.__cause__):
        if isinstance(e, sqlite3.DatabaseError) and _sqlite_code(e).startswith(_DAMAGED):
            return (f"{db} is damaged ({e}); restore the last good backup with `guildtune "
                    "restore BACKUP` (the damaged file is kept beside it as "
                    "<db>.before-restore)")
    if isinstance(exc, _known_errors()):
        msg = str(exc)
    elif isinstance(exc, sqlite3.DatabaseError) and _sqlite_code(exc).startswith(_UNUSABLE):
        msg = f"{db}: {exc}"
    elif isinstance(exc, OSError) and exc.strerror:
        msg = f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    else:
        return None
    return " ".join(msg.split("\n")).strip() or type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Warnings and worse only, so an expected error is the one line on stderr; the services
    # (run, worker) set log_level INFO, their log being what they show.
    logging.basicConfig(level=logging.DEBUG if args.verbose else
                        getattr(args, "log_level", logging.WARNING),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    cfg: Config | None = None
    try:
        cfg = load_config(args.config)
        return int(args.func(args, cfg) or 0)
    except KeyboardInterrupt:
        print("guildtune: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        line = error_line(exc, cfg)
        if line is None:
            raise
        print_error(line)
        return FAILURE_EXIT


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
