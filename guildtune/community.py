"""Community chat files: the community JSONL format (see shared/DESIGN.md) and
DiscordChatExporter JSON exports, both read into one shape for import, eval and the demo.

A JSONL line: ``community``, ``part``, ``seq``, ``time``, ``author_id``, ``text``, ``reply_to``
(earlier ``seq`` numbers in the same part), optionally ``date`` (``YYYY-MM-DD``).

Times become stored timestamps (UTC ISO 8601, ``storage.times``) as the file is read. A line
whose ``time`` is a time of day (``"01:00"``, as in older IRC logs) gets a date: its own
``date``, else the nearest earlier date in the file (the first one for lines before it), else a
date in the file name (``#linux-2024-03-01.jsonl``), else the import date; ``CommunityFile``
says which, so that ``import`` can tell the operator.

Message ids are a 63-bit hash of the message's identity in the file (community, part, seq,
time, author, text), never of its position alone: two different files of one community cannot
overwrite each other's messages, and reading the same file again gives the same ids (a repeated
import is idempotent, a file with lines appended adds only the new ones). Reply links are
resolved to those ids within the file.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any

from storage.times import format_utc, to_utc

# Ids and author ids are SQLite INTEGERs (signed 64 bits); part and seq are JSON-safe integers.
_MAX_ID = 2**63 - 1
_MAX_SEQ = 2**53 - 1
_TIME_OF_DAY = re.compile(r"(\d{1,2}):(\d{2})(?::(\d{2})(?:\.(\d{1,6}))?)?")
_DATE_IN_NAME = re.compile(r"(?<!\d)(\d{4}-\d{2}-\d{2})(?!\d)")

class CommunityFileError(ValueError):
    """A community file that cannot be read; the message names the file, line and field."""


@dataclass(frozen=True)
class ChatMessage:
    message_id: int
    user_id: int
    text: str
    reply_to: tuple[int, ...]
    time: str  # the stored form: UTC ISO 8601 with a date (storage.times)
    author: str = ""
    community: str = ""

    def as_store_row(self) -> dict[str, Any]:
        return {"message_id": self.message_id, "user_id": self.user_id, "text": self.text,
                "reply_to_message_id": self.reply_to[0] if self.reply_to else None,
                "created_utc": self.time or None}  # none: the import time


@dataclass(frozen=True)
class CommunityFile:
    """A read community file: its messages, a hash of its bytes (what ``import`` records) and
    how times without a date were dated."""

    path: Path
    messages: list[ChatMessage]
    sha256: str
    undated: int = 0  # messages whose time had no date
    dated_from: str = ""  # "the nearest date in the file", "the file name", "the import date"
    dates: tuple[str, ...] = field(default=())  # the dates given to them, in file order

    def dating_note(self) -> str | None:
        """One line for the operator when some times had no date, else None."""
        if not self.undated:
            return None
        shown = self.dates[0] if len(self.dates) == 1 else \
            f"{self.dates[0]} to {max(self.dates)}"
        return (f"{self.undated} of {len(self.messages)} times in {self.path.name} have no date; "
                f"dated {shown} ({self.dated_from})")


def _message_id(*identity: object) -> int:
    """A stable id in 1..2**63-1 from a message's identity in its file."""
    h = hashlib.blake2b("\x1f".join(map(str, identity)).encode("utf-8"), digest_size=8,
                        person=b"guildtune-msg")
    return int.from_bytes(h.digest(), "big") & _MAX_ID or 1


def _int_field(where: str, key: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise CommunityFileError(f"{where}: field {key!r} has the wrong type "
                                 f"({type(value).__name__})")
    if not low <= value <= high:
        raise CommunityFileError(f"{where}: field {key!r} is out of range ({_short(value)}; "
                                 f"an integer from {low} to {high})")
    return value


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _id_value(where: str, key: str, value: Any) -> int:
    """An id given as an integer or a string of digits (Discord ids are strings in JSON)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise TypeError(key)
    if isinstance(value, str) and not value.strip().isdigit():
        raise ValueError
    n = int(value)
    if not 0 <= n <= _MAX_ID:
        raise CommunityFileError(f"{where}: {key} is out of range ({_short(value)}; ids are "
                                 f"integers from 0 to {_MAX_ID})")
    return n


def _parse_date(where: str, value: Any) -> str:
    try:
        if not isinstance(value, str):
            raise TypeError("date")
        return date.fromisoformat(value.strip()).isoformat()
    except (TypeError, ValueError):
        raise CommunityFileError(f"{where}: field 'date' = {_short(value)} is not a date "
                                 "(YYYY-MM-DD)") from None


def _parse_time(where: str, value: Any) -> tuple[str | None, time | None]:
    """(stored stamp, None) for a date-time; (None, time of day) for a time of day or none."""
    if value is None or value == "":
        return None, time(0, 0)
    if not isinstance(value, str):
        raise CommunityFileError(f"{where}: field 'time' has the wrong type "
                                 f"({type(value).__name__})")
    m = _TIME_OF_DAY.fullmatch(value.strip())
    try:
        if m:
            h, mi, sec, frac = m.groups()
            return None, time(int(h), int(mi), int(sec or 0), int((frac or "0").ljust(6, "0")))
        return to_utc(value), None
    except ValueError:
        raise CommunityFileError(f"{where}: field 'time' = {_short(value)} is neither an ISO 8601 "
                                 "date-time nor a time of day (HH:MM)") from None


def _fallback_date(p: Path, now: datetime) -> tuple[str, str]:
    """The date for times of a file that holds no date at all, and where it came from."""
    for m in _DATE_IN_NAME.finditer(p.name):
        try:
            return date.fromisoformat(m.group(1)).isoformat(), "the date in the file name"
        except ValueError:
            continue
    return now.astimezone(UTC).date().isoformat(), "the import date"


def _read_bytes(p: Path) -> bytes:
    if not p.is_file():
        raise CommunityFileError(f"{p}: no such file")
    try:
        return p.read_bytes()
    except OSError as exc:
        raise CommunityFileError(f"{p}: cannot be read ({exc.strerror})") from None


def load_jsonl(path: str | Path, now: datetime | None = None) -> CommunityFile:
    """Read a community JSONL file; raises CommunityFileError naming the line and field.
    ``now`` (default: the current time) dates a file that holds no date at all."""
    p = Path(path)
    raw = _read_bytes(p)
    try:
        lines = raw.decode("utf-8").split("\n")
    except UnicodeDecodeError as exc:
        raise CommunityFileError(f"{p}: not UTF-8 text ({exc.reason})") from None
    parsed: list[dict[str, Any]] = []
    line_of: dict[tuple[int, int], int] = {}
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{p}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CommunityFileError(f"{where}: not valid JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise CommunityFileError(f"{where}: expected a JSON object")
        for key, types in (("part", int), ("seq", int), ("author_id", (int, str)),
                           ("text", str), ("reply_to", list)):
            if key not in obj:
                raise CommunityFileError(f"{where}: missing field {key!r}")
            if not isinstance(obj[key], types) or isinstance(obj[key], bool):
                raise CommunityFileError(f"{where}: field {key!r} has the wrong type "
                                         f"({type(obj[key]).__name__})")
        part = _int_field(where, "part", obj["part"], 0, _MAX_SEQ)
        seq = _int_field(where, "seq", obj["seq"], 0, _MAX_SEQ)
        try:
            author_id = _id_value(where, "author_id", obj["author_id"])
            replies = [_id_value(where, "reply_to", s) for s in obj["reply_to"]]
        except (TypeError, ValueError) as exc:
            if isinstance(exc, CommunityFileError):
                raise
            raise CommunityFileError(f"{where}: author_id and reply_to must be "
                                     "integers") from None
        if (part, seq) in line_of:
            raise CommunityFileError(f"{where}: part {part} seq {seq} repeats line "
                                     f"{line_of[part, seq]} (seq must be unique in its part)")
        line_of[part, seq] = lineno
        stamp, tod = _parse_time(where, obj.get("time"))
        day = _parse_date(where, obj["date"]) if obj.get("date") not in (None, "") else None
        community = str(obj.get("community", ""))
        parsed.append({"part": part, "seq": seq, "author_id": author_id, "replies": replies,
                       "stamp": stamp, "tod": tod, "day": day, "obj": obj,
                       "id": _message_id(community, part, seq, obj.get("date") or "",
                                         obj.get("time") or "", author_id, obj["text"])})
    if not parsed:
        raise CommunityFileError(f"{p}: no messages")

    # Times of day take the nearest earlier date of the file (logs are in time order).
    known = [r["day"] or (r["obj"]["time"].strip()[:10] if r["stamp"] else None) for r in parsed]
    first = next((d for d in known if d), None)
    if first is not None:
        dated_from = "the nearest date in the file"
    else:
        now_utc = (now or datetime.now(UTC)).astimezone(UTC)
        first, dated_from = _fallback_date(p, now_utc)
        if dated_from == "the import date" and any(
                datetime.combine(date.fromisoformat(r["day"] or first), r["tod"], UTC) > now_utc
                for r in parsed if r["stamp"] is None):
            # No stored time may lie in the future (it would count as new data for hours).
            first = (now_utc - timedelta(days=1)).date().isoformat()
            dated_from = "the day before the import: some times of day are later than now"
    ids = {(r["part"], r["seq"]): r["id"] for r in parsed}
    out: list[ChatMessage] = []
    undated: list[str] = []
    current = first
    for r, day in zip(parsed, known):
        current = day or current
        stamp = r["stamp"]
        if stamp is None:
            stamp = format_utc(datetime.combine(date.fromisoformat(r["day"] or current), r["tod"]))
            if r["day"] is None:
                undated.append(current)
        replies = tuple(ids[r["part"], s] for s in r["replies"] if (r["part"], s) in ids)
        obj = r["obj"]
        out.append(ChatMessage(r["id"], r["author_id"], obj["text"], replies, stamp,
                               str(obj.get("author", "")), str(obj.get("community", ""))))
    return CommunityFile(p, out, hashlib.sha256(raw).hexdigest(), len(undated), dated_from,
                         tuple(dict.fromkeys(undated)))


def read_jsonl(path: str | Path) -> list[ChatMessage]:
    """The messages of a community JSONL file (``load_jsonl``)."""
    return load_jsonl(path).messages


def load_discord_export(path: str | Path, now: datetime | None = None) -> CommunityFile:
    """Read a DiscordChatExporter JSON export (``{"messages": [{"id", "author": {"id"},
    "content", "timestamp", "reference": {"messageId"}}]}``). Its ids are real snowflakes and
    are kept; a message without a timestamp is dated at ``now`` (default: the import time)."""
    p = Path(path)
    raw = _read_bytes(p)
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CommunityFileError(f"{p}: not a JSON document ({exc})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("messages"), list):
        raise CommunityFileError(f"{p}: not a DiscordChatExporter export (no 'messages' list)")
    now_utc = now or datetime.now(UTC)
    out = []
    undated = 0
    for i, m in enumerate(doc["messages"]):
        where = f"{p}: messages[{i}]"
        if not isinstance(m, dict):
            raise CommunityFileError(f"{where}: expected an object")
        try:
            mid = _id_value(where, "'id'", m["id"])
            author = m["author"]
            uid = _id_value(where, "'author.id'", author["id"])
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, CommunityFileError):
                raise
            raise CommunityFileError(f"{where}: missing or bad 'id' or 'author.id'") from None
        if author.get("isBot"):
            continue
        text = m.get("content")
        if not isinstance(text, str):
            raise CommunityFileError(f"{where}: 'content' must be a string")
        if not text.strip() or m.get("type", "Default") not in ("Default", "Reply"):
            continue
        reference = m.get("reference") or {}
        if not isinstance(reference, dict):
            raise CommunityFileError(f"{where}: 'reference' must be an object")
        ref = reference.get("messageId")
        try:
            reply_to = (_id_value(where, "'reference.messageId'", ref),) if ref else ()
        except (TypeError, ValueError) as exc:
            if isinstance(exc, CommunityFileError):
                raise
            raise CommunityFileError(f"{where}: 'reference.messageId' = {_short(ref)} is not a "
                                     "message id (an integer)") from None
        stamp = m.get("timestamp")
        if stamp in (None, ""):
            undated += 1
            created = format_utc(now_utc)
        else:
            try:
                created = to_utc(stamp)
            except ValueError:
                raise CommunityFileError(f"{where}: 'timestamp' = {_short(stamp)} is not an ISO "
                                         "8601 date-time") from None
        out.append(ChatMessage(mid, uid, text, reply_to, created, str(author.get("name", "")),
                               str((doc.get("channel") or {}).get("name", ""))))
    if not out:
        raise CommunityFileError(f"{p}: no messages")
    return CommunityFile(p, out, hashlib.sha256(raw).hexdigest(), undated, "the import date",
                         (now_utc.astimezone(UTC).date().isoformat(),) if undated else ())


def read_discord_export(path: str | Path) -> list[ChatMessage]:
    """The messages of a DiscordChatExporter JSON export (``load_discord_export``)."""
    return load_discord_export(path).messages


def load_community(path: str | Path, now: datetime | None = None) -> CommunityFile:
    """Either format, by suffix: ``.json`` is a DiscordChatExporter export, else JSON lines."""
    p = Path(path)
    if p.suffix.lower() == ".json":
        return load_discord_export(p, now)
    return load_jsonl(p, now)


def read_community(path: str | Path) -> list[ChatMessage]:
    """The messages of a community file in either format (``load_community``)."""
    return load_community(path).messages


def reply_pairs(messages: list[ChatMessage]) -> Iterator[tuple[ChatMessage, ChatMessage]]:
    """(parent, reply) pairs whose authors differ: how the community answers."""
    by_id = {m.message_id: m for m in messages}
    for m in messages:
        for parent_id in m.reply_to[:1]:
            parent = by_id.get(parent_id)
            if parent is not None and parent.user_id != m.user_id and parent.text.strip() \
                    and m.text.strip():
                yield parent, m


def stable_hash(*parts: str) -> int:
    """A process-independent hash (Python's hash() is salted per process)."""
    h = hashlib.blake2b("\x1f".join(parts).encode("utf-8"), digest_size=8)
    return int.from_bytes(h.digest(), "big")
