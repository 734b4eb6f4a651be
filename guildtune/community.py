"""Community chat files: the community JSONL format (see shared/DESIGN.md) and
DiscordChatExporter JSON exports, both read into one shape for import, eval and the demo.

A JSONL line: ``community``, ``part``, ``seq``, ``time``, ``author_id``, ``text``, ``reply_to``
(earlier ``seq`` numbers in the same part). Message ids for storage are derived from
(part, seq) so that reply links survive the import.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Imported messages get ids far below real Discord snowflakes (which start near 2**52 for
# 2015), so they can never collide with live message ids of the same guild.
_PART_STRIDE = 10_000_000


class CommunityFileError(ValueError):
    """A community file that cannot be read; the message names the file, line and field."""


@dataclass(frozen=True)
class ChatMessage:
    message_id: int
    user_id: int
    text: str
    reply_to: tuple[int, ...]
    time: str
    author: str = ""
    community: str = ""

    def as_store_row(self) -> dict[str, Any]:
        return {"message_id": self.message_id, "user_id": self.user_id, "text": self.text,
                "reply_to_message_id": self.reply_to[0] if self.reply_to else None,
                "created_utc": self.time}


def _message_id(part: int, seq: int) -> int:
    return 1 + part * _PART_STRIDE + seq


def read_jsonl(path: str | Path) -> list[ChatMessage]:
    """Read a community JSONL file; raises CommunityFileError naming the line and field."""
    p = Path(path)
    if not p.is_file():
        raise CommunityFileError(f"{p}: no such file")
    out: list[ChatMessage] = []
    with p.open(encoding="utf-8", errors="strict") as fh:
        try:
            lines = list(fh)
        except UnicodeDecodeError as exc:
            raise CommunityFileError(f"{p}: not UTF-8 text ({exc.reason})") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CommunityFileError(f"{p}:{lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise CommunityFileError(f"{p}:{lineno}: expected a JSON object")
        for key, types in (("part", int), ("seq", int), ("author_id", (int, str)),
                           ("text", str), ("reply_to", list)):
            if key not in obj:
                raise CommunityFileError(f"{p}:{lineno}: missing field {key!r}")
            if not isinstance(obj[key], types) or isinstance(obj[key], bool):
                raise CommunityFileError(f"{p}:{lineno}: field {key!r} has the wrong type "
                                         f"({type(obj[key]).__name__})")
        try:
            author_id = int(obj["author_id"])
            replies = tuple(_message_id(obj["part"], int(s)) for s in obj["reply_to"])
        except (TypeError, ValueError):
            raise CommunityFileError(f"{p}:{lineno}: author_id and reply_to must be "
                                     "integers") from None
        out.append(ChatMessage(_message_id(obj["part"], obj["seq"]), author_id, obj["text"],
                               replies, str(obj.get("time") or ""), str(obj.get("author", "")),
                               str(obj.get("community", ""))))
    if not out:
        raise CommunityFileError(f"{p}: no messages")
    return out


def read_discord_export(path: str | Path) -> list[ChatMessage]:
    """Read a DiscordChatExporter JSON export (``{"messages": [{"id", "author": {"id"},
    "content", "timestamp", "reference": {"messageId"}}]}``)."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CommunityFileError(f"{p}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CommunityFileError(f"{p}: not a JSON document ({exc})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("messages"), list):
        raise CommunityFileError(f"{p}: not a DiscordChatExporter export (no 'messages' list)")
    out = []
    for i, m in enumerate(doc["messages"]):
        where = f"{p}: messages[{i}]"
        if not isinstance(m, dict):
            raise CommunityFileError(f"{where}: expected an object")
        try:
            mid = int(m["id"])
            author = m["author"]
            uid = int(author["id"])
        except (KeyError, TypeError, ValueError):
            raise CommunityFileError(f"{where}: missing or bad 'id' or 'author.id'") from None
        if author.get("isBot"):
            continue
        text = m.get("content")
        if not isinstance(text, str):
            raise CommunityFileError(f"{where}: 'content' must be a string")
        if not text.strip() or m.get("type", "Default") not in ("Default", "Reply"):
            continue
        ref = (m.get("reference") or {}).get("messageId")
        out.append(ChatMessage(mid, uid, text, (int(ref),) if ref else (), str(
            m.get("timestamp") or ""), str(author.get("name", "")),
            str((doc.get("channel") or {}).get("name", ""))))
    if not out:
        raise CommunityFileError(f"{p}: no messages")
    return out


def read_community(path: str | Path) -> list[ChatMessage]:
    """Either format, by content: a JSON document with 'messages' or JSON lines."""
    p = Path(path)
    if p.suffix.lower() == ".json":
        return read_discord_export(p)
    return read_jsonl(p)


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
