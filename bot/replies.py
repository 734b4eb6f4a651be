"""How a reply goes out: split into Discord-sized parts, rate limited, sent to a channel.

``split_reply`` cuts a reply into messages of at most ``DISCORD_LIMIT`` characters and keeps
code fences rendering in every part; ``RateLimiter`` is the sliding one-minute window used for
members, guilds and ratings; ``ReplyChannel`` is what a front end (the Cog's Discord reply, the
console) hands ``Core.chat`` to send through; ``ReplyStream`` shows a reply while it is being
generated (send, then throttled edits) and ends with exactly the parts of ``split_reply``.
No store, no engine, no discord.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Protocol

log = logging.getLogger(__name__)

DISCORD_LIMIT = 2000
# What a member sees where a reply failed (the Cog's slash commands, a stream cut by an error).
POLITE_FAILURE = ("Sorry, something went wrong on my side. The bot's operator can find the "
                  "details in the log.")
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


class EditFailed(Exception):
    """A channel could not edit or delete one of its messages (Discord said no): the stream
    logs it and goes on; the final edit is retried once, then the text is sent anew."""


class ReplyChannel(Protocol):
    """Where a reply goes: a Discord channel (cog) or the terminal (console).

    A channel without ``edit`` gets the whole reply at the end (no streaming). One may set
    ``edit_interval_s`` (float) to replace the configured streaming throttle (the terminal: 0).
    """

    def typing(self) -> AbstractAsyncContextManager[Any]:
        """Shown while generating (until the first part is sent)."""

    async def send(self, text: str, *, first: bool, last: bool) -> int:
        """Send one part of the reply; returns its message id. ``last`` carries the feedback
        controls (reactions or buttons)."""

    async def edit(self, message_id: int, text: str, *, last: bool = False) -> None:
        """Replace the text of a part sent before. ``last``: the reply is complete and this
        is its last part: it gets the feedback controls now (even when the text is the same).
        Raises ``EditFailed`` when the platform refused."""

    async def delete(self, message_id: int) -> None:
        """Remove a part sent before (a streamed part the final reply no longer has).
        Raises ``EditFailed`` when the platform refused."""


class ReplyStream:
    """A reply shown while it is generated, driven by ``Core.chat``.

    ``update`` (the engine's ``on_text``, on the event loop) takes the whole text so far: the
    first text is sent at once, later texts edit it, at most one round of sends/edits per
    ``edit_interval_s`` of ``clock`` and never two at a time (a text arriving meanwhile only
    replaces the pending one: the latest is shown next). The text so far is cut with
    ``split_reply``: once it passes the limit the earlier parts get their final content and the
    stream goes on in a new message. ``finish`` makes the messages exactly ``split_reply`` of
    the final text (edits, sends what is missing, deletes what is left over) and puts the
    feedback controls on the last part only then; ``abort`` replaces a shown half reply with
    ``POLITE_FAILURE``. Nothing here waits on a timer: a pending text is shown on the next
    ``update`` the throttle allows, or by ``finish``.
    """

    def __init__(self, channel: ReplyChannel, *, clock: Callable[[], float],
                 edit_interval_s: float, limit: int = DISCORD_LIMIT) -> None:
        # edit_interval_s: discord.stream_edit_interval_s (Discord allows about five edits per
        # five seconds per channel; one a second leaves room for the other replies).
        self.channel = channel
        self.clock = clock
        self.interval = edit_interval_s
        self.limit = limit
        self.ids: list[int] = []  # the messages sent, in order
        self.shown: list[str | None] = []  # their text (None: unknown after a failed edit)
        self._latest: str | None = None  # the newest text not shown yet
        self._last_round: float | None = None
        self._task: asyncio.Task[None] | None = None
        self._typing: AbstractAsyncContextManager[Any] | None = None
        self._closed = False
        self._dropped: set[int] = set()

    # -- typing: from the start until the first part is sent ----------------------------------

    @asynccontextmanager
    async def typing(self) -> AsyncIterator[ReplyStream]:
        cm = self.channel.typing()
        await cm.__aenter__()
        self._typing = cm
        try:
            yield self
        finally:
            await self._stop_typing()

    async def _stop_typing(self) -> None:
        cm, self._typing = self._typing, None
        if cm is not None:
            await cm.__aexit__(None, None, None)

    # -- while generating ----------------------------------------------------------------------

    def update(self, text: str) -> None:
        """The reply so far (an ``OnText``): shown now or later, never blocks, never raises."""
        if self._closed:
            return
        self._latest = text
        if self._task is not None and not self._task.done():
            return  # one round in flight: it shows the latest text when the throttle allows
        if self._due():
            self._task = asyncio.get_running_loop().create_task(self._rounds())

    def _due(self) -> bool:
        return (not self.ids or self._last_round is None
                or self.clock() - self._last_round >= self.interval)

    async def _rounds(self) -> None:
        try:
            while self._latest is not None and not self._closed and self._due():
                text, self._latest = self._latest, None
                await self._show(text)
        except Exception:  # the channel broke: stop streaming; ``finish`` sends the reply
            log.warning("streaming a reply failed; the full reply follows at the end",
                        exc_info=True)
            self._closed = True

    async def _show(self, text: str) -> None:
        parts = split_reply(text.replace("\x00", ""), self.limit)
        if not parts:
            return
        self._last_round = self.clock()
        for i, part in enumerate(parts):
            if i < len(self.ids):
                if self.shown[i] != part:  # the streamed part, or an earlier one getting its end
                    await self._edit(i, part, last=False, final=False)
            else:
                if i == 0:
                    await self._stop_typing()
                self.ids.append(await self.channel.send(part, first=i == 0, last=False))
                self.shown.append(part)

    async def _edit(self, i: int, text: str, *, last: bool, final: bool) -> bool:
        """Edit message ``i``; a refused edit is logged, and tried once more when ``final``."""
        for attempt in range(2 if final else 1):
            try:
                await self.channel.edit(self.ids[i], text, last=last)
            except EditFailed as exc:
                log.warning("editing reply message %s failed (try %d): %s", self.ids[i],
                            attempt + 1, exc)
                self.shown[i] = None
                continue
            self.shown[i] = text
            return True
        return False

    async def _delete(self, message_id: int) -> None:
        try:
            await self.channel.delete(message_id)
        except EditFailed as exc:
            log.warning("deleting reply message %s failed: %s", message_id, exc)

    async def _settle(self) -> None:
        """Stop streaming and wait for the round in flight (it never raises)."""
        self._closed = True
        if self._task is not None:
            await self._task
        await self._stop_typing()

    def cancel(self) -> None:
        """Stop at once (the chat was cancelled): the round in flight is cancelled."""
        self._closed = True
        if self._task is not None and not self._task.done():
            self._task.cancel()

    # -- the end ---------------------------------------------------------------------------------

    async def finish(self, parts: Sequence[str]) -> list[int]:
        """Make the messages exactly ``parts`` (the feedback controls on the last); their ids.

        Without any streamed message this is the plain send of every part. A final edit that
        fails twice is replaced by sending that part and every later one anew (in order), the
        stale messages deleted, so nothing of the reply is lost.
        """
        await self._settle()
        ids: list[int] = []
        fresh = False
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if last:  # what the reply no longer has goes before the controls come
                await self._drop(ids, keep=None if fresh else i)
            if not fresh and i < len(self.ids):
                if self.shown[i] == part and not last:
                    ids.append(self.ids[i])
                    continue
                if await self._edit(i, part, last=last, final=True):
                    ids.append(self.ids[i])
                    continue
                fresh = True  # sent anew below, and so is every later part, to keep the order
            if last:
                await self._drop(ids)
            ids.append(await self.channel.send(part, first=i == 0, last=last))
        await self._drop(ids)  # nothing left by now, unless ``parts`` was empty
        return ids

    async def _drop(self, ids: list[int], keep: int | None = None) -> None:
        """Delete the streamed messages not in ``ids`` (but the one at index ``keep``)."""
        for j, mid in enumerate(self.ids):
            if mid not in ids and j != keep and mid not in self._dropped:
                self._dropped.add(mid)
                await self._delete(mid)

    async def abort(self, notice: str = POLITE_FAILURE) -> None:
        """Generation failed: a half reply shown is replaced by ``notice`` (without feedback
        controls); nothing is sent when nothing was shown."""
        await self._settle()
        if not self.ids:
            return
        if await self._edit(0, notice, last=False, final=True):
            await self._drop([self.ids[0]])
        else:
            await self._drop([])
            await self.channel.send(notice, first=True, last=False)
