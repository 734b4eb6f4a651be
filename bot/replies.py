"""How a reply goes out: split into Discord-sized parts, rate limited, sent to a channel.

``mark_cut`` is the one rule for marking a reply cut at ``model.max_new_tokens`` (the Cog's and
the console's replies both end in ``CUT_MARK``); ``split_reply`` cuts a reply into messages of
at most ``DISCORD_LIMIT`` characters and keeps code fences rendering in every part;
``RateLimiter`` is the sliding one-minute window used for members, guilds and ratings;
``ReplyChannel`` is what a front end (the Cog's Discord reply, the console) hands ``Core.chat``
to send through; ``ReplyStream`` shows a reply while it is being generated (send, then
throttled edits) and ends with exactly the parts of ``split_reply``.
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
# What replaces a half-streamed reply when the chat is cancelled (the bot shuts down).
INTERRUPTED = "(Interrupted: the bot stopped before this reply was finished. Please ask again.)"
# Ends a reply the engine cut at model.max_new_tokens (``GenerationResult.cut``): it may stop
# mid-sentence, and the member should not take it for the whole answer.
CUT_MARK = "…"
FENCE_LANG_MAX = 24  # a reopened code fence keeps its language only when it looks like one
# Interrupt notices still going after their wait timed out: the loop keeps only weak references.
_BACKGROUND: set[asyncio.Task[None]] = set()


def _open_fence(text: str, start: str | None = None) -> str | None:
    """The language of a code fence left open at the end of ``text`` (None when closed)."""
    lang = start
    for line in text.split("\n"):
        s = line.strip()
        if s.startswith("```"):
            lang = s[3:].strip() if lang is None else None
    return lang


def mark_cut(text: str) -> str:
    """A reply cut at ``model.max_new_tokens`` as members see it: ending in ``CUT_MARK``
    (after the code fence it was cut in, closed, so the mark shows outside the code). What is
    logged for training stays the model's own text: the mark is not the model's to learn."""
    text = text.rstrip()
    if _open_fence(text) is not None:
        return f"{text}\n```\n{CUT_MARK}"
    return text + CUT_MARK


def cut_note(max_new_tokens: int) -> str:
    """Why a reply ends in ``CUT_MARK``, for a front end's line about the reply (the
    console's)."""
    return f"{CUT_MARK} cut at model.max_new_tokens = {max_new_tokens}"


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


class MessageGone(EditFailed):
    """The message is not there any more (Discord: 404 Unknown Message): a moderator deleted
    it. The stream withdraws the whole reply (``ReplyStream.withdrawn``): nothing of it is
    sent again, its other parts are deleted, and ``Core.chat`` does not log it."""


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
        Raises ``MessageGone`` when the message was deleted (by a moderator), ``EditFailed``
        when the platform refused."""

    async def delete(self, message_id: int) -> None:
        """Remove a part sent before (a streamed part the final reply no longer has).
        Raises ``MessageGone`` when it is gone already, ``EditFailed`` when the platform
        refused."""


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
    ``POLITE_FAILURE``, ``interrupt`` (the chat was cancelled) with ``INTERRUPTED``.

    A pending text the throttle holds back is shown when the interval is up even if no
    ``update`` follows (an engine row that finished while its batch goes on): a flush is
    scheduled with ``call_later(delay, callback)`` (one at a time, cancelled at the end), the
    delay computed from ``clock``. ``call_later`` defaults to the clock's own ``call_later``
    when it has one (a test clock that runs timers in its own time), else the event loop's.

    A message found deleted (``MessageGone``: a moderator removed it) withdraws the reply:
    streaming stops, its other parts are deleted, nothing is sent again (not even by
    ``finish`` or ``abort``) and ``withdrawn`` tells ``Core.chat`` not to log it.
    """

    interrupt_timeout_s = 5.0  # how long a cancelled chat may spend replacing its half reply

    def __init__(self, channel: ReplyChannel, *, clock: Callable[[], float],
                 edit_interval_s: float, limit: int = DISCORD_LIMIT,
                 call_later: Callable[[float, Callable[[], None]], Any] | None = None) -> None:
        # edit_interval_s: discord.stream_edit_interval_s (Discord allows about five edits per
        # five seconds per channel; one a second leaves room for the other replies).
        self.channel = channel
        self.clock = clock
        self.interval = edit_interval_s
        self.limit = limit
        self._call_later = call_later or getattr(clock, "call_later", None)
        self._timer: Any = None  # the scheduled flush (a handle with ``cancel``), one at most
        self.withdrawn = False  # a moderator deleted a part: the reply is gone, not to log
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
        self._pump()

    def _pump(self) -> None:
        """Start a round for the pending text now if the throttle allows, else schedule one."""
        if self._closed or self._latest is None:
            return
        if self._task is not None and not self._task.done():
            return  # one round in flight: it shows the latest text when the throttle allows
        if self._due():
            self._cancel_timer()
            self._task = asyncio.get_running_loop().create_task(self._rounds())
        else:
            self._arm()

    def _due(self) -> bool:
        return (not self.ids or self._last_round is None
                or self.clock() - self._last_round >= self.interval)

    def _arm(self) -> None:
        """Schedule a flush for when the interval is up (unless one is scheduled already)."""
        if self._timer is not None or self._last_round is None:
            return
        # Never longer than the interval: a clock set back must not hide the text for long.
        delay = min(self.interval, max(0.0, self.interval - (self.clock() - self._last_round)))
        call_later = self._call_later or asyncio.get_running_loop().call_later
        self._timer = call_later(delay, self._flush)

    def _flush(self) -> None:
        self._timer = None
        self._pump()  # not due yet (the loop's clock ran ahead of ``clock``): scheduled anew

    def _cancel_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()

    async def _rounds(self) -> None:
        try:
            while self._latest is not None and not self._closed and self._due():
                text, self._latest = self._latest, None
                await self._show(text)
        except Exception:  # the channel broke: stop streaming; ``finish`` sends the reply
            log.warning("streaming a reply failed; the full reply follows at the end",
                        exc_info=True)
            self._closed = True
        if not self._closed and self._latest is not None:
            self._arm()  # a text came during the round, within the interval: shown when due

    async def _show(self, text: str) -> None:
        parts = split_reply(text.replace("\x00", ""), self.limit)
        if not parts:
            return
        self._last_round = self.clock()
        for i, part in enumerate(parts):
            if i < len(self.ids):
                if self.shown[i] != part:  # the streamed part, or an earlier one getting its end
                    await self._edit(i, part, last=False, final=False)
                    if self.withdrawn:
                        return
            else:
                if i == 0:
                    await self._stop_typing()
                self.ids.append(await self.channel.send(part, first=i == 0, last=False))
                self.shown.append(part)

    async def _edit(self, i: int, text: str, *, last: bool, final: bool) -> bool:
        """Edit message ``i``; a refused edit is logged, and tried once more when ``final``;
        a deleted message withdraws the reply (never tried again)."""
        for attempt in range(2 if final else 1):
            try:
                await self.channel.edit(self.ids[i], text, last=last)
            except MessageGone as exc:
                self._gone(self.ids[i], exc)
                return False
            except EditFailed as exc:
                log.warning("editing reply message %s failed (try %d): %s", self.ids[i],
                            attempt + 1, exc)
                self.shown[i] = None
                continue
            self.shown[i] = text
            return True
        return False

    def _gone(self, message_id: int, exc: Exception) -> None:
        """Message ``message_id`` was deleted (by a moderator): withdraw the whole reply."""
        self._dropped.add(message_id)  # nothing left there to delete
        if not self.withdrawn:
            log.info("reply message %s was deleted (by a moderator?): the reply is withdrawn, "
                     "not sent again nor logged (%s)", message_id, exc)
        self.withdrawn = True
        self._closed = True
        self._cancel_timer()

    async def _withdraw(self, sent: Sequence[int] = ()) -> None:
        """Delete what is left of a withdrawn reply (streamed messages and ``sent``)."""
        for mid in (*self.ids, *sent):
            if mid not in self._dropped:
                self._dropped.add(mid)
                await self._delete(mid)

    async def _delete(self, message_id: int) -> None:
        try:
            await self.channel.delete(message_id)
        except MessageGone as exc:  # deleted already: what was wanted
            log.debug("reply message %s was deleted already: %s", message_id, exc)
        except EditFailed as exc:
            log.warning("deleting reply message %s failed: %s", message_id, exc)

    async def _settle(self) -> None:
        """Stop streaming and wait for the round in flight (it never raises; a round that
        was cancelled counts as done)."""
        self._closed = True
        self._cancel_timer()
        if self._task is not None:
            await asyncio.wait([self._task])
        await self._stop_typing()

    def cancel(self) -> None:
        """Stop at once: the round in flight is cancelled."""
        self._closed = True
        self._cancel_timer()
        if self._task is not None and not self._task.done():
            self._task.cancel()

    async def interrupt(self, notice: str = INTERRUPTED) -> None:
        """The chat was cancelled (the bot shuts down): replace a shown half reply with
        ``notice``, best effort and for at most ``interrupt_timeout_s``.

        The work runs shielded from the cancellation in a task of its own (the round in
        flight finishes first, so no message is left half sent and unknown); past the
        timeout it is left to finish on its own. Channel errors are logged, never raised;
        the caller re-raises its ``CancelledError`` (a second cancellation ends the wait).
        """
        self._closed = True
        self._cancel_timer()
        job = asyncio.get_running_loop().create_task(self._abort_quietly(notice))
        _BACKGROUND.add(job)  # a strong reference while it may outlive this wait
        job.add_done_callback(_BACKGROUND.discard)
        try:
            await asyncio.wait_for(asyncio.shield(job), self.interrupt_timeout_s)
        except TimeoutError:
            log.warning("replacing an interrupted reply took over %.0f s: left to finish",
                        self.interrupt_timeout_s)

    async def _abort_quietly(self, notice: str) -> None:
        try:
            await self.abort(notice)
        except Exception:
            log.warning("could not replace an interrupted reply", exc_info=True)

    # -- the end ---------------------------------------------------------------------------------

    async def finish(self, parts: Sequence[str]) -> list[int]:
        """Make the messages exactly ``parts`` (the feedback controls on the last); their ids.

        Without any streamed message this is the plain send of every part. A final edit that
        fails twice is replaced by sending that part and every later one anew (in order), the
        stale messages deleted, so nothing of the reply is lost. A withdrawn reply (a part
        deleted by a moderator, now or while streaming) is not sent again: what is left of it
        is deleted and the ids are ``[]``.
        """
        await self._settle()
        if self.withdrawn:
            await self._withdraw()
            return []
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
                if self.withdrawn:
                    await self._withdraw(ids)
                    return []
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
        controls); nothing is sent when nothing was shown, nor when the reply was withdrawn
        (a moderator deleted it: what is left of it is deleted)."""
        await self._settle()
        if self.withdrawn:
            await self._withdraw()
            return
        if not self.ids:
            return
        if await self._edit(0, notice, last=False, final=True):
            await self._drop([self.ids[0]])
        elif self.withdrawn:
            await self._withdraw()
        else:
            await self._drop([])
            await self.channel.send(notice, first=True, last=False)
