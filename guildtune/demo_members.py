"""Simulated members, for the demo and the closed-loop benchmark (``bench/closed_loop.py``).

One home for what a simulated member does with the bot: ask through the bot's own handlers
(``bot.core.Core.chat``), judge the reply by a stated preference, rate it 👍/👎
(``Core.rate``), and, disliking it, perhaps write a better one (``Core.suggest``). The demo and
the benchmark differ only in who rates, what they like and what they would have written.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from storage.times import utc_now


class ReplayChannel:
    """A ``ReplyChannel`` that keeps what the bot sent (the replay reads and rates it)."""

    def __init__(self) -> None:
        self.ids = itertools.count(900_000_000_000_000_000)
        self.sent: list[tuple[int, str]] = []

    def new_id(self) -> int:
        return next(self.ids)

    @asynccontextmanager
    async def typing(self) -> Any:
        yield

    async def send(self, text: str, *, first: bool, last: bool) -> int:
        mid = self.new_id()
        self.sent.append((mid, text))
        return mid


class FastClock:
    """A clock that advances a minute per reading, so rate limits never refuse the replay
    (simulated members write faster than any human)."""

    def __init__(self) -> None:
        self.t = time.time()

    def __call__(self) -> float:
        self.t += 60.0
        return self.t


@dataclass
class Exchange:
    """One message to the bot and what came of it."""

    member: int
    prompt: str
    reply: str | None  # None: the bot did not answer (refused or failed)
    version: int | None  # the adapter version that answered (None: the base model)
    liked: bool | None  # the asker's judgment (None without a reply)
    corrected: bool  # a better reply was stored for it
    seconds: float  # Core.chat, from the message to the last part sent
    turns: list[Any] = field(default_factory=list)  # the member's turn and the bot's


async def member_turn(core: Any, channel: ReplayChannel, *, guild_id: int, member: int,
                      text: str, likes: Callable[[str], bool], raters: Sequence[int],
                      context: Sequence[Any] = (),
                      better: Callable[[], str | None] | None = None) -> Exchange:
    """``member`` sends ``text`` (after ``context``, earlier ``bot.context.Turn``s) to the bot;
    each of ``raters`` rates the reply 👍 when ``likes(reply)``, else 👎 (the store keeps only
    opted-in members' ratings). A disliked reply gets ``better()`` as the asker's better reply
    when it returns one (called only then, so a random draw in it happens only then)."""
    from bot.context import Turn
    from bot.handlers import UserError

    mid = channel.new_id()
    turn = Turn("user", member, mid, text, created_utc=utc_now())
    t = time.perf_counter()
    out = await core.chat(channel, guild_id=guild_id, channel_id=guild_id + 1, user_id=member,
                          request_message_id=mid, turns=[*context, turn])
    seconds = time.perf_counter() - t
    if out.result is None:
        return Exchange(member, text, None, None, None, False, seconds, [turn])
    reply = out.result.text
    fid = out.feedback_message_id
    liked = likes(reply)
    for rater in raters:
        await core.rate(guild_id, fid, rater, 1 if liked else -1)
    corrected = False
    if not liked and better is not None:
        text_better = better()
        if text_better:
            try:
                await core.suggest(guild_id, fid, member, text_better)
                corrected = True
            except UserError:  # the asker had not opted in: nothing is stored
                pass
    return Exchange(member, text, reply, out.result.adapter_version, liked, corrected, seconds,
                    [turn, Turn("assistant", None, fid, reply, created_utc=utc_now())])
