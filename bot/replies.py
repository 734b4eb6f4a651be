"""How a reply goes out: split into Discord-sized parts, rate limited, sent to a channel.

``split_reply`` cuts a reply into messages of at most ``DISCORD_LIMIT`` characters and keeps
code fences rendering in every part; ``RateLimiter`` is the sliding one-minute window used for
members, guilds and ratings; ``ReplyChannel`` is what a front end (the Cog's Discord reply, the
console) hands ``Core.chat`` to send through. No store, no engine, no discord.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

DISCORD_LIMIT = 2000
FENCE_LANG_MAX = 24  # a reopened code fence keeps its language only when it looks like one


def _open_fence(text: str, start: str | None = None) -> str | None:
    """The language of a code fence left open at the end of ``text`` (None when closed)."""
    lang = start
    for line in text.split("\n"):
        s = line.strip()
        if s.startswith("```"):
            lang = s[3:].strip() if lang is None else None
    return lang


def split_reply(text: str, limit: int = DISCORD_LIMIT) -> list[str]:
    """Split a reply into messages of at most ``limit`` characters.

    Cuts at a paragraph, else a line, else a space, else hard; a code fence open at a cut is
    closed and reopened (same language) in the next part, so each part renders on its own.
    """
    text = text.strip()
    parts: list[str] = []
    fence: str | None = None
    while text:
        # A fence "language" is whatever follows ``` on its line: a hostile or runaway reply can
        # make it thousands of characters, which would not fit in the reopened part.
        lang = fence if fence is not None and len(fence) <= FENCE_LANG_MAX else ""
        prefix = "" if fence is None else f"```{lang}\n"
        if len(prefix) + len(text) <= limit:
            parts.append(prefix + text)
            break
        room = limit - len(prefix) - 4  # 4: room to close a fence ("\n```")
        window = text[:room]
        cut, skip = room, 0
        for sep in ("\n\n", "\n", " "):
            i = window.rfind(sep)
            if i > room // 3:
                cut, skip = i, len(sep)
                break
        chunk, text = text[:cut].rstrip(), text[cut + skip:]
        fence_after = _open_fence(chunk, fence)
        body = prefix + chunk
        if fence_after is not None:
            body += "\n```"
        parts.append(body)
        fence = fence_after
        if fence is None:
            text = text.lstrip("\n")
    return [p for p in parts if p.strip()]


class RateLimiter:
    """Sliding one-minute windows per key (a member, a guild)."""

    def __init__(self, per_minute: int, clock: Callable[[], float]) -> None:
        self.per_minute = per_minute
        self.clock = clock
        self._hits: dict[Any, deque[float]] = {}

    def retry_after(self, key: Any) -> float:
        """Seconds until ``key`` may act again (0 = now), without counting a hit."""
        now = self.clock()
        q = self._hits.get(key)
        if q is None:
            return 0.0
        while q and now - q[0] >= 60.0:
            q.popleft()
        if not q:
            del self._hits[key]  # keeps the dict from growing with every member ever seen
            return 0.0
        return 0.0 if len(q) < self.per_minute else 60.0 - (now - q[0])

    def hit(self, key: Any) -> None:
        self._hits.setdefault(key, deque()).append(self.clock())


class ReplyChannel(Protocol):
    """Where a reply goes: a Discord channel (cog) or the terminal (console)."""

    def typing(self) -> AbstractAsyncContextManager[Any]:
        """Shown while generating."""

    async def send(self, text: str, *, first: bool, last: bool) -> int:
        """Send one part of the reply; returns its message id. ``last`` carries the feedback
        controls (reactions or buttons)."""
