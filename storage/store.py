"""The store: every read and write of community data, as narrow verbs over one SQLite file.

Threading: each thread gets its own connection (sqlite3 connections cannot cross threads), all
opened with WAL, ``foreign_keys=ON`` and a busy timeout. Writes run in ``BEGIN IMMEDIATE``
transactions, so a writer waits for the lock up front instead of failing half-way; when the
database stays locked past the busy timeout, the write is retried, then ``StoreBusyError`` says so
(never a silent drop).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import random
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from sqlite_utils import Database

from .ids import new_ulid
from .migrations import migrations
from .times import format_utc, parse_utc, to_utc, utc_now

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

PLACEHOLDER = "[message from a member who has not opted in]"
DELETED = "[deleted message]"
RUN_STATUSES = ("queued", "running", "succeeded", "failed", "rejected")
MAX_TEXT_CHARS = 8000  # longer texts are cut; Discord's own limit is 4,000 for Nitro users


class StoreError(RuntimeError):
    """A store operation that cannot be done; the message says why."""


class StoreBusyError(StoreError):
    """The database stayed locked by another connection past the busy timeout and retries."""


class StoreFullError(StoreError):
    """The disk (or the database's size limit) is full: the write was not made."""


class ConsentChangedError(StoreError):
    """A version whose training data includes a member who has since been forgotten, opted out
    or opted in again after the data was read: it is never registered nor served."""


_utc = format_utc


_USER_MENTION = re.compile(r"<@!?\d+>")
_ROLE_MENTION = re.compile(r"<@&\d+>")
_WORD = re.compile(r"\S+")
QUOTE_MIN_WORDS = 4  # a verbatim run this long of a hidden member's words is cut from replies
CUT = "[…]"


def _clip(text: str) -> str:
    """Text as it may be stored: no NUL bytes (legal in SQLite TEXT, but they break most tools
    that read it back), no raw mention markup (a mention carries a member's id; the front ends
    store readable names, and this catches any path that did not), at most MAX_TEXT_CHARS."""
    text = text.replace("\x00", "")
    if "<@" in text:
        text = _ROLE_MENTION.sub("@role", _USER_MENTION.sub("@member", text))
    return text[:MAX_TEXT_CHARS]


def _norm_word(word: str) -> str:
    return word.strip(".,;:!?\"'()[]{}*_~`").casefold()


def quoted_grams(texts: Iterable[str], n: int = QUOTE_MIN_WORDS) -> set[tuple[str, ...]]:
    """Every run of ``n`` consecutive words of ``texts`` (normalized), to find quotes of them."""
    grams: set[tuple[str, ...]] = set()
    for text in texts:
        words = [w for w in (_norm_word(m.group()) for m in _WORD.finditer(text or "")) if w]
        grams.update(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    return grams


def cut_quotes(text: str, grams: set[tuple[str, ...]], n: int = QUOTE_MIN_WORDS) -> str:
    """``text`` with every verbatim run of ``n`` or more words found in ``grams`` replaced by
    ``[…]``: a reply of the bot that repeats a hidden or forgotten member's words keeps its own
    words only."""
    if not grams or not text:
        return text
    tokens = [(m.start(), m.end(), _norm_word(m.group())) for m in _WORD.finditer(text)]
    tokens = [t for t in tokens if t[2]]
    cut = [False] * len(tokens)
    for i in range(len(tokens) - n + 1):
        if tuple(t[2] for t in tokens[i:i + n]) in grams:
            for j in range(i, i + n):
                cut[j] = True
    if not any(cut):
        return text
    out, pos, i = [], 0, 0
    while i < len(tokens):
        if not cut[i]:
            i += 1
            continue
        j = i
        while j + 1 < len(tokens) and cut[j + 1]:
            j += 1
        out.append(text[pos:tokens[i][0]])
        out.append(CUT)
        pos = tokens[j][1]
        i = j + 1
    out.append(text[pos:])
    return "".join(out)


def _withhold(context: list[dict[str, Any]], consented: set[str],
              ) -> tuple[list[dict[str, Any]], list[str]]:
    """A stored context as training may read it now: turns of members who have opted out
    since it was stored become the placeholder, and the bot's turns lose quotes of them.
    Returns (context, the withheld texts)."""
    hidden = [e.get("text", "") for e in context
              if e.get("role") != "assistant" and e.get("author_id") is not None
              and e["author_id"] not in consented]
    if not hidden:
        return context, []
    grams = quoted_grams(hidden)
    out = []
    for e in context:
        if e.get("role") != "assistant" and e.get("author_id") is not None \
                and e["author_id"] not in consented:
            out.append({"role": "user", "author_id": None, "message_id": None,
                        "text": PLACEHOLDER})
        elif e.get("role") == "assistant":
            out.append({**e, "text": cut_quotes(e.get("text", ""), grams)})
        else:
            out.append(e)
    return out, hidden


def withdrawn_key(guild_id: int, user_id: int) -> str:
    """The key a forget or an opt-out leaves behind (``withdrawn``); guild 0 = every guild."""
    return hashlib.sha256(f"{int(guild_id)}:{int(user_id)}".encode()).hexdigest()


def _name_pattern(user_id: int, names: Iterable[str]) -> re.Pattern[str]:
    """A member's id and names as they appear in stored text: mention markup, the raw id (only
    when it is snowflake-sized: a small number is ordinary chat), and ``@name`` (the front ends
    store mentions as ``@display name``). Bare words are never matched: a member named "the"
    or "Will" must not erase everyone's ordinary words."""
    alts = [rf"<@!?{int(user_id)}>"]
    if len(str(int(user_id))) >= 15:
        alts.append(rf"(?<!\d){int(user_id)}(?!\d)")
    for name in sorted({n.strip().lstrip("@") for n in names if n and n.strip().lstrip("@")}
                       - {"everyone", "here"}, key=len, reverse=True):
        alts.append(rf"(?<![\w@])@{re.escape(name)}(?!\w)")
    return re.compile("|".join(alts), re.IGNORECASE)


@dataclass(frozen=True)
class LogResult:
    """What ``log_interaction`` did: ``stored`` False means nothing was written, and why."""

    stored: bool
    interaction_id: str | None = None
    reason: str = ""


@dataclass(frozen=True)
class GuildSettings:
    guild_id: int
    training_enabled: bool = False
    logging_enabled: bool = True
    learn_from_humans: bool = False
    schedule: str | None = None
    persona: str | None = None
    channels: tuple[int, ...] = ()


@dataclass(frozen=True)
class Run:
    id: int
    guild_id: int
    trigger: str
    requested_by: int | None
    force: bool
    attempt: int
    status: str
    worker: str | None
    lease_expires_utc: str | None
    heartbeat_utc: str | None
    progress: dict[str, Any] | None
    metrics: dict[str, Any] | None
    error: str | None
    version: int | None
    created_utc: str
    started_utc: str | None
    finished_utc: str | None

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Run:
        return cls(
            id=row["id"], guild_id=row["guild_id"], trigger=row["trigger"],
            requested_by=row["requested_by"], force=bool(row["force"]), attempt=row["attempt"],
            status=row["status"], worker=row["worker"],
            lease_expires_utc=row["lease_expires_utc"], heartbeat_utc=row["heartbeat_utc"],
            progress=json.loads(row["progress_json"]) if row["progress_json"] else None,
            metrics=json.loads(row["metrics_json"]) if row["metrics_json"] else None,
            error=row["error"], version=row["version"], created_utc=row["created_utc"],
            started_utc=row["started_utc"], finished_utc=row["finished_utc"],
        )


@dataclass(frozen=True)
class AdapterVersion:
    guild_id: int
    version: int
    path: str
    status: str
    base_model: str
    lora: dict[str, Any]
    metrics: dict[str, Any]
    config: dict[str, Any]
    data_fingerprint: str
    n_examples: int
    run_id: int | None
    created_utc: str
    activated_utc: str | None
    tainted_utc: str | None

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> AdapterVersion:
        return cls(
            guild_id=row["guild_id"], version=row["version"], path=row["path"],
            status=row["status"], base_model=row["base_model"],
            lora=json.loads(row["lora_json"]), metrics=json.loads(row["metrics_json"]),
            config=json.loads(row["config_json"]), data_fingerprint=row["data_fingerprint"],
            n_examples=row["n_examples"], run_id=row["run_id"], created_utc=row["created_utc"],
            activated_utc=row["activated_utc"], tainted_utc=row["tainted_utc"],
        )


@dataclass
class ForgetReport:
    """What ``forget_user`` removed, which versions it tainted and which retrains it queued."""

    user_id: int
    deleted: dict[str, int] = field(default_factory=dict)
    tainted: list[tuple[int, int]] = field(default_factory=list)
    retrain_runs: dict[int, int] = field(default_factory=dict)
    deactivated: list[int] = field(default_factory=list)
    # Guilds where a training run was in flight: its result will not be served, and a retrain
    # without the member follows it (the run's id).
    in_flight: dict[int, int] = field(default_factory=dict)

    @property
    def total_deleted(self) -> int:
        return sum(self.deleted.values())


def _is_locked(exc: sqlite3.OperationalError) -> bool:
    msg = str(exc).lower()
    return "locked" in msg or "busy" in msg


def _is_full(exc: BaseException) -> bool:
    return ("database or disk is full" in str(exc).lower() or
            getattr(exc, "errno", None) == 28)  # ENOSPC


def _writes(fn: Callable[P, T]) -> Callable[P, T]:
    """Run a write verb in one BEGIN IMMEDIATE transaction, retrying while the db is locked."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        self: Store = args[0]  # type: ignore[assignment]
        db = self.db
        if db.conn.in_transaction:  # nested verb: join the caller's transaction
            return fn(*args, **kwargs)
        attempts = self.write_retries + 1
        for attempt in range(1, attempts + 1):
            try:
                with self._transaction(db):
                    return fn(*args, **kwargs)
            except sqlite3.OperationalError as exc:
                if _is_full(exc):
                    raise StoreFullError(
                        f"{self.path}: the disk is full; {fn.__name__} wrote nothing (free "
                        "space, then retry)") from exc
                if not _is_locked(exc):
                    raise
                if attempt == attempts:
                    raise StoreBusyError(
                        f"{self.path} is locked by another process: {fn.__name__} waited "
                        f"{self.busy_timeout_ms} ms x {attempts} tries and wrote nothing; "
                        "stop the other writer (a long `sqlite3` session?) and retry"
                    ) from exc
                log.warning("database locked during %s (try %d/%d), retrying", fn.__name__,
                            attempt, attempts)
                time.sleep(min(0.05 * 2 ** attempt, 1.0) * (0.5 + random.random()))
        raise AssertionError("unreachable")

    return wrapper


class Store:
    """All SQL of guildtune. Safe to share between threads (one connection per thread)."""

    def __init__(self, path: str | os.PathLike[str], *, busy_timeout_ms: int = 5000,
                 write_retries: int = 3) -> None:
        self.path = Path(path)
        self.busy_timeout_ms = busy_timeout_ms
        self.write_retries = write_retries
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()

    # -- connections ---------------------------------------------------------------------------

    @property
    def db(self) -> Database:
        """This thread's connection, opened on first use."""
        db = getattr(self._local, "db", None)
        if db is None:
            conn = sqlite3.connect(self.path, timeout=self.busy_timeout_ms / 1000,
                                   isolation_level=None)
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
            conn.execute("PRAGMA foreign_keys = ON")
            # Deleted rows are overwritten with zeros, not left in free pages: forgotten text
            # must not stay readable in the file (SQLite's default keeps it until reused).
            conn.execute("PRAGMA secure_delete = ON")
            # WAL + NORMAL: a killed process loses nothing committed; only power loss can drop
            # the last transactions, which FULL would cost ~6x in write throughput to prevent.
            conn.execute("PRAGMA synchronous = NORMAL")
            db = Database(conn)
            self._local.db = db
            with self._lock:
                self._all.append(conn)
        return db

    @contextmanager
    def _transaction(self, db: Database) -> Iterator[None]:
        db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            if db.conn.in_transaction:
                db.execute("ROLLBACK")
            raise
        else:
            db.execute("COMMIT")

    def migrate(self) -> list[str]:
        """Apply pending migrations (under the write lock, so two processes cannot race)."""
        db = self.db
        if db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            db.execute("PRAGMA journal_mode = WAL")
        with self._transaction(db):
            pending = [m.name for m in migrations.pending(db)]
            migrations.apply(db)
        return pending

    def close(self) -> None:
        """Close every thread's connection."""
        with self._lock:
            for conn in self._all:
                try:
                    conn.close()
                except sqlite3.ProgrammingError:  # closed from its own thread already
                    pass
            self._all.clear()
        self._local = threading.local()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _rows(self, sql: str, params: Iterable[Any] = ()) -> list[dict[str, Any]]:
        cur = self.db.execute(sql, list(params))
        cols = [c[0] for c in cur.description]
        return [dict(zip(cols, row)) for row in cur.fetchall()]

    def _one(self, sql: str, params: Iterable[Any] = ()) -> dict[str, Any] | None:
        rows = self._rows(sql, params)
        return rows[0] if rows else None

    def _scalar(self, sql: str, params: Iterable[Any] = ()) -> Any:
        row = self.db.execute(sql, list(params)).fetchone()
        return row[0] if row else None

    # -- guild settings ------------------------------------------------------------------------

    def guild_settings(self, guild_id: int) -> GuildSettings:
        row = self._one("SELECT * FROM guild_settings WHERE guild_id = ?", [guild_id])
        if row is None:
            return GuildSettings(guild_id)
        return GuildSettings(
            guild_id, bool(row["training_enabled"]), bool(row["logging_enabled"]),
            bool(row["learn_from_humans"]), row["schedule"], row["persona"],
            tuple(json.loads(row["channels_json"])),
        )

    @_writes
    def update_guild_settings(self, guild_id: int, **changes: Any) -> GuildSettings:
        """Change some of: training_enabled, logging_enabled, learn_from_humans, schedule,
        persona, channels."""
        allowed = {"training_enabled", "logging_enabled", "learn_from_humans", "schedule",
                   "persona", "channels"}
        unknown = set(changes) - allowed
        if unknown:
            raise StoreError(f"unknown guild settings: {', '.join(sorted(unknown))}")
        row: dict[str, Any] = {"guild_id": guild_id, "updated_utc": utc_now()}
        for key, value in changes.items():
            if key == "channels":
                row["channels_json"] = json.dumps(sorted({int(c) for c in value}))
            elif key in ("training_enabled", "logging_enabled", "learn_from_humans"):
                row[key] = int(bool(value))
            else:
                row[key] = value
        self.db["guild_settings"].upsert(row, pk="guild_id")
        return self.guild_settings(guild_id)

    def guild_ids(self) -> list[int]:
        """Every guild the store knows of (settings, consents, data or versions)."""
        rows = self.db.execute(
            "SELECT guild_id FROM guild_settings UNION SELECT guild_id FROM consents "
            "UNION SELECT guild_id FROM interactions UNION SELECT guild_id FROM messages "
            "UNION SELECT guild_id FROM adapter_versions ORDER BY 1").fetchall()
        return [r[0] for r in rows]

    # -- consent -------------------------------------------------------------------------------

    @_writes
    def grant_consent(self, guild_id: int, user_id: int, scope: str = "train") -> bool:
        """Opt a member in. Returns False when they already were."""
        cur = self.db.execute(
            "INSERT OR IGNORE INTO consents (guild_id, user_id, scope, granted_utc) "
            "VALUES (?, ?, ?, ?)", [guild_id, user_id, scope, utc_now()])
        # Their own new choice: an earlier forget or opt-out in this guild no longer keeps their
        # imported history out of it (a forget everywhere still keeps it out of the others).
        self.db.execute("UPDATE withdrawn SET lifted_utc = ? WHERE guild_id = ? AND "
                        "user_key = ? AND lifted_utc IS NULL",
                        [utc_now(), guild_id, withdrawn_key(guild_id, user_id)])
        return cur.rowcount == 1

    def revoke_consent(self, guild_id: int, user_id: int, *, strict: bool = True) -> bool:
        """Opt a member out. Their stored rows stay until they use forget, but nothing of theirs
        is used again: no dataset reads them, the versions trained on them are tainted and
        retrained without them exactly as for a forget (``strict``: the tainted active version
        stops serving at once), and a run in flight is flagged so its result is not served.
        False if they were not opted in."""
        return self._revoke(guild_id, user_id, strict, ForgetReport(user_id))

    @_writes
    def _revoke(self, guild_id: int, user_id: int, strict: bool, report: ForgetReport) -> bool:
        cur = self.db.execute("DELETE FROM consents WHERE guild_id = ? AND user_id = ?",
                              [guild_id, user_id])
        if cur.rowcount != 1:
            return False
        self._mark_withdrawn(guild_id, user_id, "opt-out")
        self._withdraw(user_id, [guild_id], strict, report)
        return True

    def _mark_withdrawn(self, guild_id: int, user_id: int, reason: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO withdrawn (guild_id, user_key, reason, "
                        "withdrawn_utc, lifted_utc) VALUES (?, ?, ?, ?, NULL)",
                        [guild_id, withdrawn_key(guild_id, user_id), reason, utc_now()])

    def has_consent(self, guild_id: int, user_id: int) -> bool:
        return self._scalar("SELECT 1 FROM consents WHERE guild_id = ? AND user_id = ?",
                            [guild_id, user_id]) is not None

    def consented_users(self, guild_id: int) -> set[int]:
        rows = self.db.execute("SELECT user_id FROM consents WHERE guild_id = ?", [guild_id])
        return {r[0] for r in rows}

    def _granted(self, guild_id: int, users: Iterable[Any]) -> dict[int, str]:
        """user -> consent time, for just these users (a message's handful of authors, not the
        whole guild's consent table on every message)."""
        ids = sorted({int(u) for u in users if u is not None})
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        return {r[0]: r[1] for r in self.db.execute(
            f"SELECT user_id, granted_utc FROM consents WHERE guild_id = ? AND user_id IN "
            f"({marks})", [guild_id, *ids])}

    def redact_context(self, guild_id: int, context: list[dict[str, Any]], *,
                       granted: dict[int, str] | None = None) -> list[dict[str, Any]]:
        """The context as it may be stored: text and ids of non-consented authors replaced.

        Entries: ``{"role": "user"|"assistant", "author_id", "message_id", "text",
        "created_utc"}``; ``created_utc`` (when the message was written, any ISO 8601 time) is
        required on every member's turn; the bot's own turns are kept.
        """
        return self._redact(guild_id, context, granted)[0]

    def _redact(self, guild_id: int, context: list[dict[str, Any]],
                granted: dict[int, str] | None = None,
                ) -> tuple[list[dict[str, Any]], list[str]]:
        """(the storable context, the texts it hid)."""
        if granted is None:
            granted = self._granted(guild_id, (e.get("author_id") for e in context))
        out: list[dict[str, Any]] = []
        hidden: list[str] = []
        for n, entry in enumerate(context):
            role = entry.get("role", "user")
            author = entry.get("author_id")
            text = str(entry.get("text", ""))
            if role == "assistant":
                out.append({"role": role, "author_id": None if author is None else str(author),
                            "message_id": None if entry.get("message_id") is None
                            else str(entry["message_id"]), "text": _clip(text),
                            **({"created_utc": to_utc(entry["created_utc"])}
                               if entry.get("created_utc") else {})})
                continue
            written = entry.get("created_utc")
            if author is not None and not written:
                # Without it, text written before its author opted in could not be told apart
                # from text written after: refuse rather than store it.
                raise StoreError(f"context entry {n} has no created_utc (when the message was "
                                 "written); every member's turn needs it")
            since = granted.get(int(author)) if author is not None else None
            try:
                stamp = to_utc(written) if written else None
            except ValueError:
                raise StoreError(f"context entry {n}: created_utc {written!r} is not an "
                                 "ISO 8601 time") from None
            # Consent covers what a member says from the moment they opt in: a message written
            # before that stays a placeholder even when it shows up in a later context.
            if since is not None and stamp is not None and parse_utc(stamp) >= parse_utc(since):
                out.append({"role": role, "author_id": str(author),
                            "message_id": None if entry.get("message_id") is None
                            else str(entry["message_id"]), "text": _clip(text),
                            "created_utc": stamp})
            else:
                hidden.append(text)
                out.append({"role": "user", "author_id": None, "message_id": None,
                            "text": PLACEHOLDER})
        if hidden:
            # The bot's earlier turns may repeat what a hidden member said.
            grams = quoted_grams(hidden)
            for e in out:
                if e["role"] == "assistant":
                    e["text"] = cut_quotes(e["text"], grams)
        return out, hidden

    # -- interactions and messages -------------------------------------------------------------

    @_writes
    def log_interaction(self, guild_id: int, channel_id: int, user_id: int, *,
                        context: list[dict[str, Any]], reply: str,
                        request_message_id: int | None = None,
                        reply_message_id: int | None = None,
                        adapter_version: int | None = None, tokens_in: int = 0,
                        tokens_out: int = 0, latency_ms: float = 0.0) -> LogResult:
        """Store one exchange, only if the guild logs and the member has opted in."""
        if not self.guild_settings(guild_id).logging_enabled:
            return LogResult(False, reason="logging is off in this guild")
        granted = self._granted(guild_id, [user_id, *(e.get("author_id") for e in context)])
        if user_id not in granted:
            return LogResult(False, reason="the member has not opted in")
        now = utc_now()
        iid = new_ulid()
        stored, hidden = self._redact(guild_id, context, granted)
        if hidden:
            reply = cut_quotes(reply, quoted_grams(hidden))
        # A plain INSERT: sqlite-utils' insert() introspects the table on every call (~3x slower).
        self.db.execute(
            "INSERT INTO interactions (id, guild_id, channel_id, user_id, request_message_id, "
            "reply_message_id, context_json, reply, adapter_version, tokens_in, tokens_out, "
            "latency_ms, created_utc, updated_utc) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            [iid, guild_id, channel_id, user_id, request_message_id, reply_message_id,
             json.dumps(stored), _clip(reply),
             adapter_version, tokens_in, tokens_out, latency_ms, now, now])
        return LogResult(True, iid)

    def log_interactions(self, items: Iterable[dict[str, Any]]) -> list[LogResult]:
        """Many ``log_interaction`` calls (keyword dicts) in one transaction."""
        results: list[LogResult] = []

        @_writes
        def batch(store: Store) -> None:
            for item in items:
                results.append(store.log_interaction(**item))

        batch(self)
        return results

    @_writes
    def set_reply_message(self, guild_id: int, interaction_id: str, reply_message_id: int) -> None:
        self.db.execute("UPDATE interactions SET reply_message_id = ?, updated_utc = ? "
                        "WHERE guild_id = ? AND id = ?",
                        [reply_message_id, utc_now(), guild_id, interaction_id])

    def interaction_for_message(self, guild_id: int, message_id: int) -> dict[str, Any] | None:
        """The interaction whose bot reply (or request) is this Discord message."""
        return self._one(
            "SELECT * FROM interactions WHERE guild_id = ? AND "
            "(reply_message_id = ? OR request_message_id = ?) ORDER BY created_utc DESC LIMIT 1",
            [guild_id, message_id, message_id])

    def get_interaction(self, guild_id: int, interaction_id: str) -> dict[str, Any] | None:
        return self._one("SELECT * FROM interactions WHERE guild_id = ? AND id = ?",
                         [guild_id, interaction_id])

    @_writes
    def log_message(self, guild_id: int, message_id: int, user_id: int, text: str, *,
                    channel_id: int = 0, reply_to_message_id: int | None = None,
                    created_utc: str | None = None, source: str = "discord") -> bool:
        """Store a human message, only if its author had opted in when they wrote it (the
        same rule as for contexts). Returns whether it did."""
        since = self._granted(guild_id, [user_id]).get(int(user_id))
        if since is None:
            return False
        if created_utc and parse_utc(to_utc(created_utc)) < parse_utc(since):
            return False  # written before they opted in: not theirs to give yet
        self.db.execute(
            "INSERT OR REPLACE INTO messages (guild_id, message_id, channel_id, user_id, text, "
            "reply_to_message_id, source, created_utc) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [guild_id, message_id, channel_id, user_id, _clip(text), reply_to_message_id, source,
             to_utc(created_utc) if created_utc else utc_now()])
        return True

    @_writes
    def import_messages(self, guild_id: int, rows: Iterable[dict[str, Any]], *,
                        source: dict[str, Any] | None = None) -> int:
        """Load history the operator asserts consent for (scope 'import'); returns rows stored.

        Each row: message_id, user_id, text, and optionally channel_id, reply_to_message_id,
        created_utc (a timestamp with a date, stored through ``to_utc``; absent: now). A row
        whose created_utc is not one is refused (StoreError) and nothing is stored: a time
        compared as a string would let the retention job delete it at once.

        A message id the guild already holds is skipped, never replaced (another file, or a
        live message, may own it); the return value counts only new rows. With ``source``
        (``{"sha256", "file_name"}``) the import is recorded in ``imports``, and a source the
        guild has already imported stores nothing and returns 0 (``import_record`` says when).
        """
        if source is not None and self.import_record(guild_id, source["sha256"]) is not None:
            return 0
        now = utc_now()
        batch: list[tuple[Any, ...]] = []
        for r in rows:
            try:
                ids = [int(r["message_id"]), int(r.get("channel_id") or 0), int(r["user_id"])]
                reply_to = r.get("reply_to_message_id")
                if reply_to is not None:
                    ids.append(int(reply_to))
            except (KeyError, TypeError, ValueError) as exc:
                raise StoreError(f"import: row {len(batch) + 1}: message_id, user_id, "
                                 f"channel_id and reply_to_message_id must be integers ({exc}); "
                                 "nothing was imported") from None
            if not all(-2**63 <= i < 2**63 for i in ids):
                raise StoreError(f"import: row {len(batch) + 1}: an id is outside SQLite's "
                                 "64-bit integers; nothing was imported")
            created = r.get("created_utc")
            try:
                created = now if created is None else to_utc(created)
                if created > now:
                    # A future time would never expire and always count as new data.
                    created = now
            except (TypeError, ValueError):
                raise StoreError(f"import: message {ids[0]}: created_utc {str(created)[:40]!r} is "
                                 "not a timestamp with a date (UTC ISO 8601, e.g. "
                                 "2024-03-01T12:00:00Z); nothing was imported") from None
            batch.append((guild_id, ids[0], ids[1], ids[2], _clip(str(r["text"])),
                          None if reply_to is None else ids[3], "import", created))
        cur = self.db.conn.cursor()
        authors: set[int] = set()
        n = 0
        gone = self._withdrawn(guild_id, {row[3] for row in batch})
        if gone:
            log.info("import into guild %s: skipped the messages of %d member(s) who asked to "
                     "be forgotten or opted out", guild_id, len(gone))
        for row in batch:
            if row[3] in gone:
                continue  # forgotten or opted out: old history does not bring them back
            cur.execute(
                "INSERT OR IGNORE INTO messages (guild_id, message_id, channel_id, user_id, "
                "text, reply_to_message_id, source, created_utc) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                row)
            if cur.rowcount:
                n += 1
                authors.add(row[3])
        cur.executemany(
            "INSERT OR IGNORE INTO consents (guild_id, user_id, scope, granted_utc) "
            "VALUES (?, ?, 'import', ?)", [(guild_id, a, now) for a in sorted(authors)])
        if source is not None:
            cur.execute(
                "INSERT INTO imports (guild_id, source_sha256, file_name, messages, stored, "
                "imported_utc) VALUES (?, ?, ?, ?, ?, ?)",
                [guild_id, str(source["sha256"]), str(source.get("file_name", "")), len(batch),
                 n, now])
        return n

    def _withdrawn(self, guild_id: int, users: Iterable[int]) -> set[int]:
        """Which of ``users`` asked to be forgotten or opted out in the guild, or asked to be
        forgotten everywhere and have not opted in here since."""
        users = set(users)
        here = {withdrawn_key(guild_id, u): u for u in users}
        everywhere = {withdrawn_key(0, u): u for u in users}
        found: set[int] = set()
        for g, keys in ((guild_id, here), (0, everywhere)):
            items = list(keys)
            for i in range(0, len(items), 500):
                chunk = items[i:i + 500]
                found |= {keys[k] for (k,) in self.db.execute(
                    f"SELECT user_key FROM withdrawn WHERE guild_id = ? AND lifted_utc IS NULL "
                    f"AND user_key IN ({','.join('?' * len(chunk))})", [g, *chunk])}
        return found - (set(self._granted(guild_id, found)) if found else set())

    def _cutoffs(self, guild_id: int, users: Iterable[int]) -> dict[int, str]:
        """user -> the time of their last forget or opt-out in the guild (or everywhere): what
        they wrote before it never trains again, even once they opt in anew."""
        keys: dict[str, int] = {}
        for u in {int(x) for x in users}:
            keys[withdrawn_key(guild_id, u)] = u
            keys[withdrawn_key(0, u)] = u
        out: dict[int, str] = {}
        items = list(keys)
        for i in range(0, len(items), 500):
            chunk = items[i:i + 500]
            for k, t in self.db.execute(
                    f"SELECT user_key, withdrawn_utc FROM withdrawn WHERE guild_id IN (?, 0) AND "
                    f"user_key IN ({','.join('?' * len(chunk))})", [guild_id, *chunk]):
                u = keys[k]
                out[u] = max(out.get(u, t), t)
        return out

    def import_record(self, guild_id: int, sha256: str) -> dict[str, Any] | None:
        """The ``imports`` row of a source file already imported into the guild, else None."""
        return self._one("SELECT * FROM imports WHERE guild_id = ? AND source_sha256 = ?",
                         [guild_id, sha256])

    # -- feedback and corrections --------------------------------------------------------------

    @_writes
    def record_feedback(self, guild_id: int, message_id: int, user_id: int, rating: int) -> bool:
        """A member rates the bot reply in Discord message ``message_id`` (+1 or -1).

        Stores nothing (returns False) when the member has not opted in or the reply was not
        logged. A new rating by the same member replaces the old one.
        """
        if rating not in (-1, 1):
            raise StoreError(f"rating must be +1 or -1, not {rating!r}")
        if not self.has_consent(guild_id, user_id):
            return False
        iid = self._scalar("SELECT id FROM interactions WHERE guild_id = ? AND "
                           "reply_message_id = ?", [guild_id, message_id])
        if iid is None:
            return False
        self.db.execute(
            "INSERT OR REPLACE INTO feedback (interaction_id, guild_id, user_id, rating, "
            "created_utc) VALUES (?, ?, ?, ?, ?)", [iid, guild_id, user_id, rating, utc_now()])
        return True

    @_writes
    def remove_feedback(self, guild_id: int, message_id: int, user_id: int,
                        rating: int | None = None) -> bool:
        """Remove a member's rating (only that rating if given: removing 👎 keeps a 👍)."""
        sql = ("DELETE FROM feedback WHERE guild_id = ? AND user_id = ? AND interaction_id IN "
               "(SELECT id FROM interactions WHERE guild_id = ? AND reply_message_id = ?)")
        params: list[Any] = [guild_id, user_id, guild_id, message_id]
        if rating is not None:
            sql += " AND rating = ?"
            params.append(rating)
        return self.db.execute(sql, params).rowcount > 0

    @_writes
    def add_correction(self, guild_id: int, interaction_id: str, user_id: int,
                       text: str) -> str | None:
        """A member's better reply for an interaction; None when nothing was stored."""
        text = _clip(text).strip()
        if not text or not self.has_consent(guild_id, user_id):
            return None
        if self.get_interaction(guild_id, interaction_id) is None:
            return None
        cid = new_ulid()
        self.db["corrections"].insert({"id": cid, "interaction_id": interaction_id,
                                       "guild_id": guild_id, "user_id": user_id, "text": text,
                                       "created_utc": utc_now()})
        return cid

    # -- Discord deletes and edits -------------------------------------------------------------

    def _rewrite_contexts(self, guild_id: int, needle: str,
                          fix: Callable[[dict[str, Any]], dict[str, Any] | None]) -> int:
        """Apply ``fix`` to context entries of the guild's interactions that mention ``needle``."""
        n = 0
        for row in self._rows("SELECT id, context_json FROM interactions WHERE guild_id = ? "
                              "AND instr(context_json, ?) > 0", [guild_id, needle]):
            ctx = json.loads(row["context_json"])
            new = [fix(e) or e for e in ctx]
            if new != ctx:
                self.db.execute("UPDATE interactions SET context_json = ?, updated_utc = ? "
                                "WHERE id = ?", [json.dumps(new), utc_now(), row["id"]])
                n += 1
        return n

    @_writes
    def delete_message(self, guild_id: int, message_id: int) -> int:
        """A Discord message was deleted: remove everything stored from it. Returns rows hit."""
        n = self.db.execute("DELETE FROM interactions WHERE guild_id = ? AND "
                            "(request_message_id = ? OR reply_message_id = ?)",
                            [guild_id, message_id, message_id]).rowcount
        n += self.db.execute("DELETE FROM messages WHERE guild_id = ? AND message_id = ?",
                             [guild_id, message_id]).rowcount
        mid = str(message_id)
        n += self._rewrite_contexts(
            guild_id, f'"{mid}"',
            lambda e: {"role": e["role"], "author_id": None, "message_id": None,
                       "text": DELETED} if e.get("message_id") == mid else None)
        return n

    @_writes
    def edit_message(self, guild_id: int, message_id: int, text: str) -> int:
        """A Discord message was edited: update the stored copies. Returns rows hit."""
        text = _clip(text)
        consented = {str(u) for u in self.consented_users(guild_id)}
        # An author who has opted out since: the new text is not theirs to give, so the stored
        # copy goes instead of being updated.
        n = self.db.execute(
            "DELETE FROM messages WHERE guild_id = ? AND message_id = ? AND user_id NOT IN "
            "(SELECT user_id FROM consents WHERE guild_id = ?)",
            [guild_id, message_id, guild_id]).rowcount
        n += self.db.execute("UPDATE messages SET text = ? WHERE guild_id = ? AND message_id = ?",
                             [text, guild_id, message_id]).rowcount
        mid = str(message_id)

        def fix(e: dict[str, Any]) -> dict[str, Any] | None:
            if e.get("message_id") != mid:
                return None
            if e.get("role") == "assistant":
                # The bot never edits its replies; an update event of one (an embed unfurling,
                # a pin) must not restore words cut from the stored copy.
                return None
            if e.get("author_id") in consented:
                return {**e, "text": text}
            return {"role": "user", "author_id": None, "message_id": None, "text": PLACEHOLDER}

        return n + self._rewrite_contexts(guild_id, f'"{mid}"', fix)

    # -- forget, export, retention -------------------------------------------------------------

    def forget_user(self, user_id: int, guild_id: int | None = None, *,
                    strict: bool = True, names: Iterable[str] = ()) -> ForgetReport:
        """Delete every row of a member (in one guild, or everywhere) in one transaction.

        Also takes them out of what other members' rows hold: their turns in stored contexts
        become the placeholder, verbatim runs of their words in the bot's stored replies are
        cut, and their id and ``names`` (display names the caller knows) are replaced by
        ``@member``. Adapter versions trained on their data are marked tainted and a retrain
        without it is queued; a run in flight is flagged so its result is never served and a
        retrain follows it. With ``strict`` (the default), a tainted active version is replaced
        at once by the newest clean version, or the base model. The WAL is then checkpointed
        so the deleted text does not linger in it.
        """
        report = self._forget_user(user_id, guild_id, strict=strict, names=tuple(names))
        self.checkpoint()
        return report

    @_writes
    def _forget_user(self, user_id: int, guild_id: int | None, *, strict: bool,
                     names: tuple[str, ...]) -> ForgetReport:
        report = ForgetReport(user_id)
        where_g = "" if guild_id is None else " AND guild_id = ?"
        gp: list[Any] = [] if guild_id is None else [guild_id]
        uid = str(user_id)
        # Guilds where they have rows of their own (a run there may have read them) ...
        had_data = sorted({r[0] for r in self.db.execute(
            " UNION ".join(f"SELECT guild_id FROM {t} WHERE user_id = ?{where_g}" for t in (
                "consents", "messages", "interactions", "feedback", "corrections",
                "adapter_contributors")), [x for _ in range(6) for x in (user_id, *gp)])})
        # ... and every guild where other members' rows may hold their words, even after they
        # opted out (no rows of their own left): the one named, or for a forget everywhere,
        # wherever a stored context names them.
        if guild_id is not None:
            guilds = sorted({*had_data, guild_id})
        elif any(n and n.strip() for n in names):  # a mention of them may be in any guild
            guilds = sorted({*had_data, *self.guild_ids()})
        else:
            guilds = sorted({*had_data, *(r[0] for r in self.db.execute(
                "SELECT DISTINCT guild_id FROM interactions WHERE instr(context_json, ?) > 0 "
                "OR instr(reply, ?) > 0", [uid, uid]))})
        self._taint(user_id, guilds, report)
        # What they wrote, to find it quoted in the bot's replies to others (before deletion).
        grams: dict[int, set[tuple[str, ...]]] = {}
        for g in guilds:
            texts = [r[0] for r in self.db.execute(
                "SELECT text FROM messages WHERE guild_id = ? AND user_id = ? UNION ALL "
                "SELECT text FROM corrections WHERE guild_id = ? AND user_id = ?",
                [g, user_id, g, user_id])]
            for (ctx,) in self.db.execute(
                    "SELECT context_json FROM interactions WHERE guild_id = ? AND "
                    "instr(context_json, ?) > 0", [g, f'"{uid}"']):
                texts += [e.get("text", "") for e in json.loads(ctx)
                          if e.get("author_id") == uid and e.get("role") != "assistant"]
            grams[g] = quoted_grams(texts)
        # Their own rows first, so the scrub below only rewrites other members' rows.
        for table in ("adapter_contributors", "feedback", "corrections", "interactions",
                      "messages", "consents"):
            report.deleted[table] = self.db.execute(
                f"DELETE FROM {table} WHERE user_id = ?" + where_g, [user_id, *gp]).rowcount
        scrubbed = 0
        who = _name_pattern(user_id, names)
        has_names = any(n and n.strip().lstrip("@") for n in names)
        for g in guilds:
            since = min((v.activated_utc for gg, vv in report.tainted if gg == g
                         for v in [self.get_version(g, vv)] if v and v.activated_utc),
                        default=None)
            scrubbed += self._scrub_member(g, uid, who, has_names, grams.get(g, set()), since)
        report.deleted["texts_scrubbed"] = scrubbed
        self.db.execute("UPDATE training_runs SET requested_by = NULL WHERE requested_by = ?"
                        + where_g, [user_id, *gp])
        self._mark_withdrawn(0 if guild_id is None else guild_id, user_id, "forget")
        self._withdraw(user_id, guilds, strict, report, tainted_already=True,
                       in_flight_for=had_data)
        return report

    def _taint(self, user_id: int, guilds: Iterable[int], report: ForgetReport) -> None:
        """Mark every version of these guilds trained on the member as tainted."""
        now = utc_now()
        for g in guilds:
            for (v,) in self.db.execute("SELECT version FROM adapter_contributors WHERE "
                                        "guild_id = ? AND user_id = ?", [g, user_id]).fetchall():
                self.db.execute(
                    "UPDATE adapter_versions SET tainted_utc = coalesce(tainted_utc, ?), "
                    "status = CASE WHEN status = 'active' THEN status ELSE 'tainted' END "
                    "WHERE guild_id = ? AND version = ?", [now, g, v])
                report.tainted.append((g, v))

    def _withdraw(self, user_id: int, guilds: Iterable[int], strict: bool,
                  report: ForgetReport, tainted_already: bool = False,
                  in_flight_for: Iterable[int] | None = None) -> None:
        """The model side of a forget or an opt-out, in the caller's transaction: taint the
        versions trained on the member, flag a run in flight (publish refuses its result, and a
        retrain follows it), queue a retrain, and with ``strict`` stop serving a tainted active
        version at once."""
        guilds = sorted(set(guilds))
        if not tainted_already:
            self._taint(user_id, guilds, report)
        for g in sorted(set(guilds if in_flight_for is None else in_flight_for)):
            running = self._scalar("SELECT id FROM training_runs WHERE guild_id = ? AND "
                                   "status = 'running'", [g])
            if running is not None:
                self.db.execute("UPDATE training_runs SET rerun = 1 WHERE id = ?", [running])
                report.in_flight[g] = running
        for g in sorted({g for g, _ in report.tainted}):
            if g not in report.in_flight:
                run_id, _ = self.enqueue_run(g, "forget")
                report.retrain_runs[g] = run_id
            # With training off for the guild no retrain will come to replace it: withdraw now.
            if strict or not self.guild_settings(g).training_enabled:
                active = self.active_version(g)
                if active is not None and active.tainted_utc is not None:
                    self.rollback(g)
                    report.deactivated.append(g)

    def _scrub_member(self, guild_id: int, uid: str, who: re.Pattern[str], has_names: bool,
                      grams: set[tuple[str, ...]], tainted_since: str | None) -> int:
        """Take a forgotten member out of other members' rows of one guild: their context turns
        become the placeholder, their id and mentions become ``@member`` in every stored text,
        and runs of their words are cut from what the bot said (replies and its turns in
        contexts) and from suggested replies, the training targets.

        Where the bot can have said their words: in a conversation they were in, or, once a
        version trained on them served (``tainted_since``), anywhere: a model repeats what it
        memorised."""
        conds = ["instr(context_json, ?) > 0", "instr(reply, ?) > 0"]
        params: list[Any] = [uid, uid]
        if has_names:  # mentions are stored as @name; JSON escapes and case are for Python
            conds += ["instr(context_json, '@') > 0", "instr(reply, '@') > 0"]
        if grams and tainted_since is not None:
            conds.append("created_utc >= ?")
            params.append(tainted_since)
        n = 0
        for row in self._rows(f"SELECT id, context_json, reply FROM interactions WHERE "
                              f"guild_id = ? AND ({' OR '.join(conds)})", [guild_id, *params]):
            ctx = json.loads(row["context_json"])
            new_ctx = []
            for e in ctx:
                if e.get("author_id") == uid and e.get("role") != "assistant":
                    new_ctx.append({"role": "user", "author_id": None, "message_id": None,
                                    "text": PLACEHOLDER})
                elif e.get("role") == "assistant":
                    new_ctx.append({**e, "text": who.sub("@member",
                                                         cut_quotes(e.get("text", ""), grams))})
                else:  # another member's own words: only the id and mentions go
                    new_ctx.append({**e, "text": who.sub("@member", e.get("text", ""))})
            reply = who.sub("@member", cut_quotes(row["reply"], grams))
            if new_ctx != ctx or reply != row["reply"]:
                self.db.execute("UPDATE interactions SET context_json = ?, reply = ?, "
                                "updated_utc = ? WHERE id = ?",
                                [json.dumps(new_ctx), reply, utc_now(), row["id"]])
                n += 1
        for table, key, cut in (("messages", "message_id", False), ("corrections", "id", True)):
            where = ["instr(text, ?) > 0"] + (["instr(text, '@') > 0"] if has_names else [])
            if cut and grams:
                where = ["1"]  # suggested replies are training targets: all of them, few
            for row in self._rows(f"SELECT {key} AS k, text FROM {table} WHERE guild_id = ? "
                                  f"AND ({' OR '.join(where)})",
                                  [guild_id, *([uid] if where != ["1"] else [])]):
                text = who.sub("@member", cut_quotes(row["text"], grams) if cut else row["text"])
                if text != row["text"]:
                    self.db.execute(f"UPDATE {table} SET text = ? WHERE guild_id = ? AND "
                                    f"{key} = ?", [text, guild_id, row["k"]])
                    n += 1
        return n

    def checkpoint(self) -> bool:
        """Fold the WAL into the database and truncate it, so deleted text does not stay in
        the -wal file. False when another connection's reader kept it from completing (the
        WAL is then reused, overwriting those frames, as writes go on)."""
        if self.db.conn.in_transaction:
            return False
        busy = self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
        if busy:
            log.info("WAL checkpoint of %s was blocked by a reader; it truncates later",
                     self.path)
        return not busy

    def export_user(self, user_id: int, guild_id: int | None = None) -> dict[str, Any]:
        """Everything stored of a member, as a JSON-able dict (the /mydata file)."""
        where_g = "" if guild_id is None else " AND guild_id = ?"
        gp: list[Any] = [] if guild_id is None else [guild_id]
        out: dict[str, Any] = {"user_id": str(user_id), "exported_utc": utc_now(),
                               "guild_id": None if guild_id is None else str(guild_id)}
        for table in ("consents", "messages", "interactions", "feedback", "corrections"):
            rows = self._rows(f"SELECT * FROM {table} WHERE user_id = ?{where_g} ORDER BY rowid",
                              [user_id, *gp])
            for r in rows:
                if "context_json" in r:
                    # Other members' messages the caller saw stay (it is the caller's
                    # conversation), but not who wrote them.
                    r["context"] = [
                        e if e.get("author_id") in (None, str(user_id)) else
                        {**e, "author_id": None, "message_id": None}
                        for e in json.loads(r.pop("context_json"))]
                for k, v in list(r.items()):
                    if k.endswith("_id") and isinstance(v, int):
                        r[k] = str(v)  # Discord snowflakes exceed JavaScript's safe integers
            out[table] = rows
        # What they said that is stored inside other members' conversations with the bot.
        uid = str(user_id)
        out["your_messages_in_other_conversations"] = [
            {"guild_id": str(g), "message_id": e.get("message_id"), "text": e.get("text"),
             "created_utc": e.get("created_utc")}
            for g, ctx in self.db.execute(
                "SELECT guild_id, context_json FROM interactions WHERE user_id != ? AND "
                "instr(context_json, ?) > 0" + where_g, [user_id, f'"{uid}"', *gp])
            for e in json.loads(ctx)
            if e.get("author_id") == uid and e.get("role") != "assistant"]
        out["adapter_versions_trained_on_your_data"] = [
            {"guild_id": str(r["guild_id"]), "version": r["version"]} for r in self._rows(
                "SELECT guild_id, version FROM adapter_contributors WHERE user_id = ?" + where_g,
                [user_id, *gp])]
        return out

    def purge_older_than(self, days: int, now: datetime | None = None) -> dict[str, int]:
        """Retention: delete interactions and messages created more than ``days`` ago (0 keeps
        all), then truncate the WAL so the deleted text does not stay in it."""
        out = self._purge_older_than(days, now)
        if any(out.values()):
            self.checkpoint()
        return out

    @_writes
    def _purge_older_than(self, days: int, now: datetime | None = None) -> dict[str, int]:
        """Retention: delete interactions and messages created more than ``days`` ago (0 keeps
        all).

        Times are compared as times. A stamp in the stored form (storage.times) compares as
        text, which is what that form is for; any other value is parsed, and one that is not a
        timestamp (a time of day from an old import, say) is kept and logged, never deleted on
        a string comparison.
        """
        if days <= 0:
            return {}
        cutoff = parse_utc(_utc((now or datetime.now(UTC)) - timedelta(days=days)))
        stored_form = "[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:" \
                      "[0-9][0-9].[0-9][0-9][0-9]Z"
        out: dict[str, int] = {}
        for table in ("interactions", "messages"):
            n = self.db.execute(f"DELETE FROM {table} WHERE created_utc GLOB ? AND "
                                "created_utc < ?", [stored_form, _utc(cutoff)]).rowcount
            expired, unknown = [], 0
            for rowid, value in self.db.execute(
                    f"SELECT rowid, created_utc FROM {table} WHERE created_utc NOT GLOB ?",
                    [stored_form]).fetchall():
                try:
                    if parse_utc(value) < cutoff:
                        expired.append((rowid,))
                except (TypeError, ValueError):
                    unknown += 1
            if expired:
                self.db.conn.executemany(f"DELETE FROM {table} WHERE rowid = ?", expired)
            if unknown:
                log.warning("retention: kept %d %s whose created_utc is not a timestamp", unknown,
                            table)
            out[table] = n + len(expired)
        return out

    # -- the training queue --------------------------------------------------------------------

    @_writes
    def enqueue_run(self, guild_id: int, trigger: str, requested_by: int | None = None,
                    force: bool = False, attempt: int = 1) -> tuple[int, bool]:
        """Queue a training run. Returns (run id, created): an open run of the guild is reused."""
        existing = self._scalar("SELECT id FROM training_runs WHERE guild_id = ? AND status IN "
                                "('queued', 'running')", [guild_id])
        if existing is not None:
            if force:
                self.db.execute("UPDATE training_runs SET force = 1 WHERE id = ?", [existing])
            return existing, False
        cur = self.db.execute(
            "INSERT INTO training_runs (guild_id, trigger, requested_by, force, attempt, status, "
            "created_utc) VALUES (?, ?, ?, ?, ?, 'queued', ?)",
            [guild_id, trigger, requested_by, int(force), attempt, utc_now()])
        return int(cur.lastrowid or 0), True

    @_writes
    def claim_run(self, worker: str, lease_seconds: int = 120,
                  guild_id: int | None = None) -> Run | None:
        """Atomically take the oldest queued run (optionally of one guild) with a lease."""
        where_g = "" if guild_id is None else " AND guild_id = ?"
        row = self._one("SELECT id FROM training_runs WHERE status = 'queued'" + where_g +
                        " ORDER BY id LIMIT 1", [] if guild_id is None else [guild_id])
        if row is None:
            return None
        now = datetime.now(UTC)
        self.db.execute(
            "UPDATE training_runs SET status = 'running', worker = ?, started_utc = ?, "
            "heartbeat_utc = ?, lease_expires_utc = ? WHERE id = ? AND status = 'queued'",
            [worker, _utc(now), _utc(now), _utc(now + timedelta(seconds=lease_seconds)),
             row["id"]])
        return self.get_run(row["id"])

    @_writes
    def heartbeat(self, run_id: int, worker: str, lease_seconds: int = 120,
                  progress: dict[str, Any] | None = None) -> bool:
        """Renew the lease (and store progress). False when the run is no longer this worker's."""
        now = datetime.now(UTC)
        sets = "heartbeat_utc = ?, lease_expires_utc = ?"
        params: list[Any] = [_utc(now), _utc(now + timedelta(seconds=lease_seconds))]
        if progress is not None:
            sets += ", progress_json = ?"
            params.append(json.dumps(progress))
        cur = self.db.execute(f"UPDATE training_runs SET {sets} WHERE id = ? AND worker = ? AND "
                              "status = 'running'", [*params, run_id, worker])
        return cur.rowcount == 1

    @_writes
    def finish_run(self, run_id: int, status: str, *, metrics: dict[str, Any] | None = None,
                   error: str | None = None, version: int | None = None,
                   worker: str | None = None) -> bool:
        """Close a run as succeeded, failed or rejected. False if a worker lost its lease."""
        if status not in ("succeeded", "failed", "rejected"):
            raise StoreError(f"a run cannot finish as {status!r}")
        sql = ("UPDATE training_runs SET status = ?, metrics_json = ?, error = ?, version = ?, "
               "finished_utc = ?, lease_expires_utc = NULL WHERE id = ? AND status = 'running'")
        params: list[Any] = [status, json.dumps(metrics) if metrics is not None else None,
                             error, version, utc_now(), run_id]
        if worker is not None:
            sql += " AND worker = ?"
            params.append(worker)
        if self.db.execute(sql, params).rowcount != 1:
            return False
        self._after_run(run_id)
        return True

    def _after_run(self, run_id: int) -> None:
        """What forgetting owes a guild once one of its runs ends (in the caller's
        transaction): a run a forget or an opt-out landed in is followed by a retrain without
        them, and a tainted version still active (``strict_forget`` off) stops serving now."""
        run = self.get_run(run_id)
        if run is None:
            return
        if self._scalar("SELECT rerun FROM training_runs WHERE id = ?", [run_id]):
            self.enqueue_run(run.guild_id, "forget")
        active = self.active_version(run.guild_id)
        if active is not None and active.tainted_utc is not None:
            self.rollback(run.guild_id)

    @_writes
    def recover_stale_runs(self, now: datetime | None = None, max_attempts: int = 2) -> list[int]:
        """Fail runs whose worker stopped renewing its lease; requeue each once. Returns ids."""
        stamp = _utc(now or datetime.now(UTC))
        stale = self._rows("SELECT * FROM training_runs WHERE status = 'running' AND "
                           "lease_expires_utc < ?", [stamp])
        for r in stale:
            self.db.execute(
                "UPDATE training_runs SET status = 'failed', finished_utc = ?, "
                "lease_expires_utc = NULL, error = ? WHERE id = ?",
                [stamp, f"worker {r['worker']} stopped (lease expired {r['lease_expires_utc']})",
                 r["id"]])
            if r["attempt"] < max_attempts:
                self.enqueue_run(r["guild_id"], r["trigger"], r["requested_by"],
                                 bool(r["force"]), attempt=r["attempt"] + 1)
            self._after_run(r["id"])  # a rerun owed is queued whatever the attempts
        return [r["id"] for r in stale]

    def get_run(self, run_id: int) -> Run | None:
        row = self._one("SELECT * FROM training_runs WHERE id = ?", [run_id])
        return Run.from_row(row) if row else None

    def runs(self, guild_id: int, limit: int = 10) -> list[Run]:
        return [Run.from_row(r) for r in self._rows(
            "SELECT * FROM training_runs WHERE guild_id = ? ORDER BY id DESC LIMIT ?",
            [guild_id, limit])]

    def open_run(self, guild_id: int) -> Run | None:
        row = self._one("SELECT * FROM training_runs WHERE guild_id = ? AND status IN "
                        "('queued', 'running')", [guild_id])
        return Run.from_row(row) if row else None

    # -- adapter versions ----------------------------------------------------------------------

    def next_version(self, guild_id: int) -> int:
        return int(self._scalar("SELECT coalesce(max(version), 0) + 1 FROM adapter_versions "
                                "WHERE guild_id = ?", [guild_id]))

    @_writes
    def register_version(self, guild_id: int, version: int, path: str, *, base_model: str,
                         lora: dict[str, Any], metrics: dict[str, Any] | None = None,
                         config: dict[str, Any] | None = None, data_fingerprint: str = "",
                         contributors: dict[int, int] | None = None, run_id: int | None = None,
                         status: str = "candidate", activate: bool = False,
                         dataset_utc: str | None = None) -> AdapterVersion:
        """Record a published version and whose data it holds; activate it in the same
        transaction when asked.

        Raises ConsentChangedError, registering nothing, when a contributor is no longer opted
        in, or opted in again after ``dataset_utc`` (when the training data was read): a
        version that learned from a member who has since been forgotten or opted out is never
        registered, so it can neither serve nor be rolled back to.
        """
        self.check_contributors(guild_id, contributors or {}, dataset_utc)
        if run_id is not None and self._scalar(
                "SELECT status FROM training_runs WHERE id = ?", [run_id]) not in (None,
                                                                                 "running"):
            # Its lease expired and the run was recovered (failed, requeued): another worker
            # may be training the guild now. A late publisher must not register anything.
            raise StoreError(f"run {run_id} of guild {guild_id} is no longer running (its lease "
                             "was lost); its version is not kept")
        self.db["adapter_versions"].insert({
            "guild_id": guild_id, "version": version, "path": str(path), "status": status,
            "base_model": base_model, "lora_json": json.dumps(lora, sort_keys=True),
            "metrics_json": json.dumps(metrics or {}), "config_json": json.dumps(config or {}),
            "data_fingerprint": data_fingerprint,
            "n_examples": sum((contributors or {}).values()), "run_id": run_id,
            "created_utc": utc_now(),
        })
        self.db.conn.executemany(
            "INSERT INTO adapter_contributors (guild_id, version, user_id, n_examples) "
            "VALUES (?, ?, ?, ?)",
            [(guild_id, version, int(u), int(n)) for u, n in (contributors or {}).items()])
        if activate:
            self.activate_version(guild_id, version)
        return self.get_version(guild_id, version)  # type: ignore[return-value]

    def check_contributors(self, guild_id: int, contributors: Iterable[int],
                           dataset_utc: str | None = None) -> None:
        """Raise ConsentChangedError unless every contributor is opted in now and has been
        since ``dataset_utc`` (a forget followed by a new opt-in is not the same consent)."""
        users = {int(u) for u in contributors}
        granted = self._granted(guild_id, users)
        since = parse_utc(dataset_utc) if dataset_utc else None
        gone = [u for u in users if u not in granted or
                (since is not None and parse_utc(granted[u]) > since)]
        if gone:
            raise ConsentChangedError(
                f"guild {guild_id}: {len(gone)} member(s) whose data this version was trained on "
                "have since been forgotten or opted out; it is not kept, and a retrain without "
                "them follows")

    def newest_clean_version(self, guild_id: int) -> AdapterVersion | None:
        """The newest version that served and was not trained on a forgotten member: the bar a
        new candidate must beat (a tainted version never is)."""
        row = self._one(
            "SELECT * FROM adapter_versions WHERE guild_id = ? AND tainted_utc IS NULL AND "
            "status IN ('active', 'retired') AND activated_utc IS NOT NULL "
            "ORDER BY (status = 'active') DESC, version DESC LIMIT 1", [guild_id])
        return AdapterVersion.from_row(row) if row else None

    @_writes
    def activate_version(self, guild_id: int, version: int) -> AdapterVersion:
        """Make ``version`` the guild's active one; the previous active one is retired."""
        target = self.get_version(guild_id, version)
        if target is None:
            raise StoreError(f"guild {guild_id} has no adapter version {version}")
        if target.tainted_utc is not None:
            raise StoreError(f"version {version} of guild {guild_id} was trained on data of a "
                             "member who asked to be forgotten; it cannot be activated")
        self._retire_active(guild_id)
        self.db.execute("UPDATE adapter_versions SET status = 'active', activated_utc = ? "
                        "WHERE guild_id = ? AND version = ?", [utc_now(), guild_id, version])
        return self.get_version(guild_id, version)  # type: ignore[return-value]

    def _retire_active(self, guild_id: int) -> None:
        self.db.execute(
            "UPDATE adapter_versions SET status = CASE WHEN tainted_utc IS NULL THEN 'retired' "
            "ELSE 'tainted' END WHERE guild_id = ? AND status = 'active'", [guild_id])

    @_writes
    def set_version_status(self, guild_id: int, version: int, status: str) -> None:
        """Mark a non-active version (e.g. 'rejected' by the evaluation gate)."""
        if status not in ("candidate", "retired", "rejected"):
            raise StoreError(f"use activate_version/rollback, not status {status!r}")
        self.db.execute("UPDATE adapter_versions SET status = ? WHERE guild_id = ? AND "
                        "version = ? AND status != 'active'", [status, guild_id, version])

    @_writes
    def rollback(self, guild_id: int) -> AdapterVersion | None:
        """Retire the active version and activate the newest earlier clean one that was
        active before. Returns it, or None when the guild is back on the base model."""
        active = self.active_version(guild_id)
        below = active.version if active else 1 << 62
        prev = self._one(
            "SELECT version FROM adapter_versions WHERE guild_id = ? AND version < ? AND "
            "tainted_utc IS NULL AND status = 'retired' AND activated_utc IS NOT NULL "
            "ORDER BY version DESC LIMIT 1", [guild_id, below])
        self._retire_active(guild_id)
        if prev is None:
            return None
        return self.activate_version(guild_id, prev["version"])

    def get_version(self, guild_id: int, version: int) -> AdapterVersion | None:
        row = self._one("SELECT * FROM adapter_versions WHERE guild_id = ? AND version = ?",
                        [guild_id, version])
        return AdapterVersion.from_row(row) if row else None

    def active_version(self, guild_id: int) -> AdapterVersion | None:
        row = self._one("SELECT * FROM adapter_versions WHERE guild_id = ? AND "
                        "status = 'active'", [guild_id])
        return AdapterVersion.from_row(row) if row else None

    def versions(self, guild_id: int) -> list[AdapterVersion]:
        return [AdapterVersion.from_row(r) for r in self._rows(
            "SELECT * FROM adapter_versions WHERE guild_id = ? ORDER BY version", [guild_id])]

    def active_versions(self) -> dict[int, tuple[int, str]]:
        """guild -> (version, path) of every active version: what the bot should be serving."""
        return {r[0]: (r[1], r[2]) for r in self.db.execute(
            "SELECT guild_id, version, path FROM adapter_versions WHERE status = 'active'")}

    def contributors(self, guild_id: int, version: int) -> dict[int, int]:
        return {r[0]: r[1] for r in self.db.execute(
            "SELECT user_id, n_examples FROM adapter_contributors WHERE guild_id = ? AND "
            "version = ?", [guild_id, version])}

    # -- reads for the trainer and for status --------------------------------------------------

    def rated_interactions(self, guild_id: int) -> list[dict[str, Any]]:
        """What training may read of the guild's interactions: those of members opted in now,
        with the net rating of raters opted in now (``score``), the raters, and the corrections
        of members opted in now; nothing anyone wrote or rated before their last forget or
        opt-out (``_cutoffs``), and their turns in stored contexts as the placeholder."""
        rows = self._rows(
            "SELECT i.id, i.user_id, i.context_json, i.reply, i.adapter_version, i.created_utc "
            "FROM interactions i JOIN consents c ON c.guild_id = i.guild_id AND "
            "c.user_id = i.user_id WHERE i.guild_id = ? ORDER BY i.created_utc DESC", [guild_id])
        ratings = self._rows(
            "SELECT f.interaction_id, f.user_id, f.rating, f.created_utc FROM feedback f JOIN "
            "consents c ON c.guild_id = f.guild_id AND c.user_id = f.user_id "
            "WHERE f.guild_id = ? ORDER BY f.rowid", [guild_id])
        fixes = self._rows(
            "SELECT k.interaction_id, k.user_id, k.text, k.created_utc FROM corrections k "
            "JOIN consents c ON c.guild_id = k.guild_id AND c.user_id = k.user_id "
            "WHERE k.guild_id = ? ORDER BY k.created_utc DESC", [guild_id])
        consented = self.consented_users(guild_id)
        cut = self._cutoffs(guild_id, consented)

        def usable(user: Any, when: str | None) -> bool:
            if user is None or int(user) not in consented:
                return False
            line = cut.get(int(user))
            # Strictly after: a row stamped in the same millisecond as the opt-out is withheld.
            return line is None or (when is not None and when > line)

        by_interaction: dict[str, list[dict[str, Any]]] = {}
        for f in ratings:
            if usable(f["user_id"], f["created_utc"]):
                by_interaction.setdefault(f["interaction_id"], []).append(f)
        corrections: dict[str, list[dict[str, Any]]] = {}
        for c in fixes:
            if usable(c["user_id"], c["created_utc"]):
                corrections.setdefault(c["interaction_id"], []).append(c)
        out = []
        for r in rows:
            if not usable(r["user_id"], r["created_utc"]):
                continue
            ctx = json.loads(r.pop("context_json"))
            ok = {e["author_id"] for e in ctx
                  if e.get("author_id") is not None and e.get("role") != "assistant"
                  and usable(e["author_id"], e.get("created_utc") or r["created_utc"])}
            r["context"], hidden = _withhold(ctx, ok)
            mine = corrections.get(r["id"], [])
            if hidden:  # the reply and suggestions are targets: they must not repeat them
                grams = quoted_grams(hidden)
                r["reply"] = cut_quotes(r["reply"], grams)
                mine = [{**c, "text": cut_quotes(c["text"], grams)} for c in mine]
            rated = by_interaction.get(r["id"], [])
            r["score"] = sum(f["rating"] for f in rated)
            r["raters"] = [f["user_id"] for f in rated]
            r["corrections"] = mine
            out.append(r)
        return out

    def reply_pairs(self, guild_id: int) -> list[dict[str, Any]]:
        """(parent message, reply) pairs between two different members opted in now, neither
        written before its author's last forget or opt-out."""
        pairs = self._rows(
            "SELECT p.message_id AS parent_id, p.user_id AS parent_user, p.text AS parent_text, "
            "p.created_utc AS parent_utc, "
            "r.message_id AS reply_id, r.user_id AS reply_user, r.text AS reply_text, "
            "r.created_utc FROM messages r "
            "JOIN messages p ON p.guild_id = r.guild_id AND p.message_id = r.reply_to_message_id "
            "JOIN consents cr ON cr.guild_id = r.guild_id AND cr.user_id = r.user_id "
            "JOIN consents cp ON cp.guild_id = p.guild_id AND cp.user_id = p.user_id "
            "WHERE r.guild_id = ? AND r.user_id != p.user_id ORDER BY r.created_utc DESC, "
            "r.message_id DESC", [guild_id])
        cut = self._cutoffs(guild_id, {p["parent_user"] for p in pairs} |
                            {p["reply_user"] for p in pairs})
        if not cut:
            return pairs
        return [p for p in pairs
                if p["parent_utc"] > cut.get(p["parent_user"], "")
                and p["created_utc"] > cut.get(p["reply_user"], "")]

    def examples_since(self, guild_id: int, since_utc: str | None) -> int:
        """New training signal since a time: liked or corrected interactions, and replies
        between members (the scheduler's 'enough new data' test)."""
        since = since_utc or ""
        return int(self._scalar(
            "SELECT (SELECT count(DISTINCT interaction_id) FROM feedback WHERE guild_id = ? AND "
            "rating = 1 AND created_utc > ?) + (SELECT count(*) FROM corrections WHERE "
            "guild_id = ? AND created_utc > ?) + (SELECT count(*) FROM messages WHERE "
            "guild_id = ? AND reply_to_message_id IS NOT NULL AND created_utc > ?)",
            [guild_id, since, guild_id, since, guild_id, since]))

    def guild_stats(self, guild_id: int) -> dict[str, Any]:
        """Counts for status displays."""
        q = self._scalar
        active = self.active_version(guild_id)
        open_run = self.open_run(guild_id)
        return {
            "guild_id": guild_id,
            "consented_users": q("SELECT count(*) FROM consents WHERE guild_id = ?", [guild_id]),
            "interactions": q("SELECT count(*) FROM interactions WHERE guild_id = ?", [guild_id]),
            "messages": q("SELECT count(*) FROM messages WHERE guild_id = ?", [guild_id]),
            "likes": q("SELECT count(*) FROM feedback WHERE guild_id = ? AND rating = 1",
                       [guild_id]),
            "dislikes": q("SELECT count(*) FROM feedback WHERE guild_id = ? AND rating = -1",
                          [guild_id]),
            "corrections": q("SELECT count(*) FROM corrections WHERE guild_id = ?", [guild_id]),
            "active_version": active.version if active else None,
            "open_run": None if open_run is None else
            {"id": open_run.id, "status": open_run.status, "progress": open_run.progress},
            "queued_runs": q("SELECT count(*) FROM training_runs WHERE guild_id = ? AND "
                             "status = 'queued'", [guild_id]),
            "examples_since_active": self.examples_since(
                guild_id, active.activated_utc if active else None),
        }

    def like_rate_by_version(self, guild_id: int) -> list[dict[str, Any]]:
        """Per adapter version (None = base): rated replies, likes, dislikes, like rate."""
        rows = self._rows(
            "SELECT i.adapter_version AS version, sum(f.rating = 1) AS likes, "
            "sum(f.rating = -1) AS dislikes FROM feedback f JOIN interactions i ON "
            "i.id = f.interaction_id WHERE f.guild_id = ? GROUP BY i.adapter_version "
            "ORDER BY i.adapter_version", [guild_id])
        for r in rows:
            total = (r["likes"] or 0) + (r["dislikes"] or 0)
            r["like_rate"] = (r["likes"] or 0) / total if total else None
        return rows

    # -- backup --------------------------------------------------------------------------------

    def backup(self, dest: str | os.PathLike[str]) -> Path:
        """Copy the live database to ``dest`` with SQLite's online backup API.

        The copy is taken in one step, i.e. inside one read transaction: under WAL, writers on
        other connections go on and the copy is the database as of one commit, never a mix.
        It is written beside ``dest``, checked with ``PRAGMA integrity_check`` and renamed over
        ``dest``, so a failed or killed backup never leaves a half-written file at ``dest``.
        """
        dest = Path(dest)
        if dest.resolve() == self.path.resolve():
            raise StoreError(f"backup target {dest} is the live database itself")
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
        tmp.unlink(missing_ok=True)
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o600))  # a backup is members' data
        target = sqlite3.connect(tmp, isolation_level=None)
        try:
            # pages=-1: all pages in one step. Stepping page by page would restart whenever
            # another connection writes, and never finish under a steady write load.
            self.db.conn.backup(target, pages=-1)
            # A self-contained file: no -wal beside it that a copy by `cp` could miss.
            target.execute("PRAGMA journal_mode = DELETE")
            problem = _integrity_problem(target)
        except BaseException:
            target.close()
            tmp.unlink(missing_ok=True)
            raise
        target.close()
        if problem:
            tmp.unlink(missing_ok=True)
            raise StoreError(f"backup of {self.path} failed its integrity check: {problem}")
        fsync_path(tmp)
        os.replace(tmp, dest)
        fsync_path(dest.parent)
        log.info("backed up %s to %s", self.path, dest)
        return dest


SIDE_FILES = ("-wal", "-shm", "-journal")


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a rename is durable only once its directory is)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _integrity_problem(conn: sqlite3.Connection) -> str | None:
    """None when ``PRAGMA integrity_check`` says ok, else its first lines."""
    rows = [r[0] for r in conn.execute("PRAGMA integrity_check").fetchall()]
    return None if rows == ["ok"] else "; ".join(str(r) for r in rows[:3])


def check_backup(path: str | os.PathLike[str]) -> int:
    """Raise StoreError unless ``path`` is a guildtune database that passes
    ``PRAGMA integrity_check``. Returns how many guildtune migrations it records."""
    p = Path(path)
    if not p.is_file():
        raise StoreError(f"{p} is not a file")
    try:
        # Read-only and immutable: checking must never create a -wal or change the file.
        conn = sqlite3.connect(f"{p.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise StoreError(f"{p} cannot be opened as a database: {exc}") from None
    try:
        problem = _integrity_problem(conn)
        if problem:
            raise StoreError(f"{p} failed PRAGMA integrity_check: {problem}")
        has_table = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND "
                                 "name = '_sqlite_migrations'").fetchone()
        n = conn.execute("SELECT count(*) FROM _sqlite_migrations WHERE migration_set = ?",
                         [migrations.name]).fetchone()[0] if has_table else 0
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"{p} is not a guildtune database ({exc})") from None
    finally:
        conn.close()
    if not n:
        raise StoreError(f"{p} is a SQLite file but not a guildtune database (no guildtune "
                         "migrations recorded)")
    return n


def restore_backup(src: str | os.PathLike[str], db_path: str | os.PathLike[str], *,
                   lock_timeout_ms: int = 500) -> Path | None:
    """Replace the database at ``db_path`` with the backup ``src``.

    Refuses (StoreError) a file that is not a sound guildtune database, and (StoreBusyError) a
    live database that another process holds the write lock of. The replaced database is kept
    as ``<db>.before-restore`` (its WAL checkpointed into it first); its -wal/-shm files are
    moved aside with it, because a stale -wal left beside the restored file would be replayed
    into it by SQLite. Returns the path of the kept file (None when there was no database).
    Stop the bot and workers first: only a process writing right now is detected.
    """
    src, db = Path(src), Path(db_path)
    check_backup(src)
    if db.exists() and src.resolve() == db.resolve():
        raise StoreError(f"{src} is the live database itself")
    db.parent.mkdir(parents=True, exist_ok=True)
    tmp = db.with_name(f".{db.name}.restore-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o600))
    # Copy through the backup API (not a file copy): consistent even if src has its own -wal.
    source = sqlite3.connect(f"{src.resolve().as_uri()}?mode=ro", uri=True)
    target = sqlite3.connect(tmp, isolation_level=None)
    try:
        source.backup(target, pages=-1)
        target.execute("PRAGMA journal_mode = WAL")
    except BaseException:
        target.close()
        tmp.unlink(missing_ok=True)
        raise
    finally:
        source.close()
    target.close()
    fsync_path(tmp)

    kept: Path | None = None
    if db.exists():
        conn = sqlite3.connect(db, timeout=lock_timeout_ms / 1000, isolation_level=None)
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(lock_timeout_ms)}")
            try:
                conn.execute("BEGIN IMMEDIATE")
                conn.execute("ROLLBACK")
                # Fold the WAL into the main file so <db>.before-restore is whole on its own.
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.OperationalError as exc:
                tmp.unlink(missing_ok=True)
                if _is_locked(exc):
                    raise StoreBusyError(
                        f"{db} is locked by a running bot or worker; stop them, then restore"
                    ) from None
                raise StoreError(f"{db} cannot be prepared for restore: {exc}") from None
        finally:
            conn.close()
        kept = db.with_name(db.name + ".before-restore")
        for suffix in ("", *SIDE_FILES):
            Path(str(kept) + suffix).unlink(missing_ok=True)
        os.replace(db, kept)
        for suffix in SIDE_FILES:
            side = Path(str(db) + suffix)
            if side.exists():
                os.replace(side, Path(str(kept) + suffix))
    os.replace(tmp, db)
    fsync_path(db.parent)
    log.info("restored %s from %s (previous database kept as %s)", db, src, kept)
    return kept


def open_store(path: str | os.PathLike[str], *, busy_timeout_ms: int = 5000,
               write_retries: int = 3) -> Store:
    """Open (creating if needed) the database at ``path`` and apply pending migrations."""
    p = Path(path)
    # Only the operator's account may read members' data: the directory 0700 when we create
    # it, the database 0600 (SQLite gives its -wal and -shm files the database's mode).
    p.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not p.exists():
        os.close(os.open(p, os.O_WRONLY | os.O_CREAT, 0o600))
    elif p.stat().st_mode & 0o077 and p.stat().st_uid == os.geteuid():
        # A database from before this rule (or copied in): members' data, operator-only.
        for f in (p, *(Path(str(p) + x) for x in SIDE_FILES)):
            if f.exists():
                os.chmod(f, 0o600)
        log.info("made %s readable by its owner only (0600)", p)
    store = Store(p, busy_timeout_ms=busy_timeout_ms, write_retries=write_retries)
    try:
        store.migrate()
    except sqlite3.DatabaseError as exc:
        store.close()
        if isinstance(exc, sqlite3.OperationalError) and _is_locked(exc):
            raise StoreBusyError(f"{p} is locked by another process; cannot migrate") from exc
        raise StoreError(f"{p} is not a usable guildtune database: {exc}") from exc
    return store
