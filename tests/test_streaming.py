"""Streaming replies (issue 12 item 6): the reply appears as it is generated.

``Core.chat`` drives a ``bot.replies.ReplyStream`` with the engine's ``on_text``: the first
text is sent, later texts edit it at most once per ``edit_interval_s`` (a fake clock here: no
sleeps, no timing), a text past 2,000 characters goes on in a new message, and at the end the
messages are exactly ``split_reply`` of the final text with the feedback controls added last.
The fakes interleave deterministically: ``FakeEngine.pause`` runs after each streamed word and
``settle`` lets the stream's round finish.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import logging
import random
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import discord
import discord.ext.test as dpytest
import pytest

from bot.console import ConsoleChannel, EchoEngine
from bot.context import Turn
from bot.core import ChatOutcome, Core
from bot.engine import EngineError, GenerationRequest, GenerationResult
from bot.replies import (
    DISCORD_LIMIT,
    INTERRUPTED,
    POLITE_FAILURE,
    EditFailed,
    MessageGone,
    ReplyStream,
    split_reply,
)
from bot.ui import DiscordReply
from storage.times import utc_now
from tests.fakes import (
    FakeClock,
    FakeEngine,
    RecordingChannel,
    make_services,
    sent,
    settle,
    word_prefixes,
)

G, ALICE = 42, 7


def _services(tmp_path: Path, engine: FakeEngine, clock: FakeClock, **discord: Any) -> Any:
    s = make_services(tmp_path, engine=engine, discord={"user_rate_per_minute": 1000,
                                                        "guild_rate_per_minute": 1000,
                                                        **discord})
    s.clock = clock
    s.store.grant_consent(G, ALICE)
    return s


async def _chat(core: Core, channel: Any, guild_id: int | None = G) -> ChatOutcome:
    mid = 10**14 + len(getattr(core.s.engine, "requests", ()))
    turn = Turn("user", ALICE, mid, "tell me something", created_utc=utc_now())
    return await core.chat(channel, guild_id=guild_id, channel_id=1, user_id=ALICE,
                           request_message_id=mid, turns=[turn])


def _rig(tmp_path: Path, text: str) -> tuple[FakeClock, FakeEngine, Any, RecordingChannel]:
    """A fake clock, an engine streaming ``text``, services on them and a recording channel."""
    clock = FakeClock()
    engine = FakeEngine(text)
    return clock, engine, _services(tmp_path, engine, clock), RecordingChannel(clock)


def _stream() -> tuple[FakeClock, RecordingChannel, ReplyStream]:
    """A ReplyStream (1 s edit interval) on a recording channel and a fake clock, whose
    call_later timers fire on ``advance``."""
    clock = FakeClock()
    ch = RecordingChannel(clock)
    return clock, ch, ReplyStream(ch, clock=clock, edit_interval_s=1.0)


def _ticking(clock: FakeClock, step: float,
             then: Callable[[str], None] | None = None) -> Callable[[str], Any]:
    """A pause that lets ``step`` simulated seconds pass per streamed word, then calls
    ``then(partial)`` (a test's move: refuse edits, delete a part, fail the engine)."""
    async def pause(partial: str) -> None:
        clock.advance(step)
        await settle()
        if then is not None:
            then(partial)
    return pause


def _assert_final(ch: RecordingChannel, out: ChatOutcome, final: str) -> None:
    """The member sees exactly the non-streamed reply, controls on its last part, added last."""
    want = split_reply(final.replace("\x00", "")) or ["…"]
    assert ch.parts == want
    assert out.reply_ids == list(ch.messages)
    assert ch.controls == [out.feedback_message_id] == [out.reply_ids[-1]]
    # The controls come with the last call: nothing of the reply changes after them.
    op, mid, text, _, last, _ = ch.calls[-1]
    assert op in ("send", "edit") and last and mid == out.feedback_message_id
    assert text == want[-1]


# -- the throttle ---------------------------------------------------------------------------------


async def test_stream_edits_at_most_once_per_second(tmp_path: Path) -> None:
    clock = FakeClock()
    text = " ".join(f"word{i}" for i in range(40))
    engine = FakeEngine(text)
    engine.pause = _ticking(clock, 0.25)  # 4 words a second: 10 s of streaming
    s = _services(tmp_path, engine, clock)
    ch = RecordingChannel(clock)
    out = await _chat(Core(s), ch)

    _assert_final(ch, out, text)
    stream_calls = ch.calls[:-1]  # the last call is the final edit (with the controls)
    assert stream_calls[0][0] == "send" and stream_calls[0][2] == "word0"
    edits = [c for c in stream_calls if c[0] == "edit"]
    assert len(edits) >= 5, ch.calls  # the member watched it grow
    times = [c[5] for c in stream_calls]
    assert all(b - a >= 1.0 for a, b in itertools.pairwise(times)), times
    seconds = clock.t - stream_calls[0][5]
    assert len(edits) <= seconds + 1
    # Every edit showed the latest text there was (coalesced), growing.
    shown = [c[2] for c in stream_calls]
    assert all(b.startswith(a) and len(b) > len(a) for a, b in itertools.pairwise(shown))
    row = s.store.interaction_for_message(G, out.feedback_message_id)
    assert row is not None and row["reply"] == text  # logged exactly as before
    s.store.close()


async def test_the_config_sets_the_interval_and_can_switch_streaming_off(
        tmp_path: Path) -> None:
    text = " ".join(f"word{i}" for i in range(40))
    seen = {}
    for name, discord in (("slow", {"stream_edit_interval_s": 4.0}),
                          ("off", {"stream_replies": False})):
        clock = FakeClock()
        engine = FakeEngine(text)
        engine.pause = _ticking(clock, 0.25)
        s = _services(tmp_path / name, engine, clock, **discord)
        ch = RecordingChannel(clock)
        out = await _chat(Core(s), ch)
        _assert_final(ch, out, text)
        seen[name] = [c for c in ch.calls[:-1] if c[0] == "edit"]
        if name == "slow":
            times = [c[5] for c in ch.calls[:-1]]
            assert all(b - a >= 4.0 for a, b in itertools.pairwise(times)), times
        s.store.close()
    assert seen["slow"] and not seen["off"]  # off: one send of the finished reply


async def test_one_edit_in_flight_and_only_the_latest_text_follows(tmp_path: Path) -> None:
    clock, ch, stream = _stream()
    async with stream.typing():
        stream.update("one")
        await settle()
        assert ch.parts == ["one"]
        clock.advance(1.0)
        ch.gate = asyncio.Event()  # the next edit hangs (Discord is slow)
        stream.update("one two")
        await settle()
        assert ch.in_flight == 1
        for text in ("one two three", "one two three four", "one two three four five"):
            clock.advance(1.0)
            stream.update(text)
            await settle()
        assert ch.in_flight_max == 1 and ch.parts == ["one"]
        ch.gate.set()
        await settle()
    # The hung edit landed, then the latest text at once (its second was long up): the two
    # texts in between were never sent.
    assert [c[2] for c in ch.calls] == ["one", "one two", "one two three four five"]
    ids = await stream.finish(["one two three four five six"])
    assert ch.parts == ["one two three four five six"] and ch.controls == ids
    assert ch.in_flight_max == 1


async def test_pending_text_waits_for_the_interval(tmp_path: Path) -> None:
    clock, ch, stream = _stream()
    stream.update("a")
    await settle()
    for word in ("a b", "a b c"):
        clock.advance(0.4)
        stream.update(word)
        await settle()
    assert ch.parts == ["a"]  # 0.8 s after the send: nothing yet
    clock.advance(0.4)
    stream.update("a b c d")
    await settle()
    assert ch.parts == ["a b c d"] and len(ch.calls) == 2


# -- the final text equals the non-streamed one ------------------------------------------------


def _random_text(r: random.Random) -> str:
    """Prose, code fences, long lines, giant words: sometimes far past 2,000 characters."""
    bits: list[str] = []
    for _ in range(r.randint(1, 60)):
        kind = r.random()
        if kind < 0.5:
            bits.append(" ".join(r.choice(["lorem", "ipsum", "x", "dolor", "ßüñ", "🙂", "a.b"])
                                 for _ in range(r.randint(1, 40))))
        elif kind < 0.65:
            lang = r.choice(["", "py", "rust", "x" * 40])
            body = "\n".join(f"    code({i})" for i in range(r.randint(1, 120)))
            bits.append(f"```{lang}\n{body}\n```" if r.random() < 0.8 else f"```{lang}\n{body}")
        elif kind < 0.75:
            bits.append("w" * r.randint(100, 2500))
        elif kind < 0.85:
            bits.append("\x00" + "nul")
        else:
            bits.append("")
        bits.append(r.choice([" ", "\n", "\n\n", "  \n"]))
    return "".join(bits)


class ChunkyEngine(FakeEngine):
    """Streams random growing prefixes (not only at word ends) of ``stream_of``; the result
    may differ from what was streamed (an engine strips, trims a stop string, falls back)."""

    def __init__(self, r: random.Random) -> None:
        super().__init__()
        self.r = r
        self.stream_of: str = ""

    def partials(self, text: str) -> list[str]:
        src = self.stream_of or text
        cuts = sorted({self.r.randint(1, len(src)) for _ in range(self.r.randint(1, 30))})
        return [src[:c] for c in cuts]


@pytest.mark.parametrize("seed", range(40))
async def test_streamed_messages_end_as_split_reply_of_the_final_text(
        tmp_path: Path, seed: int) -> None:
    r = random.Random(seed)
    clock = FakeClock()
    engine = ChunkyEngine(r)
    text = _random_text(r)
    if r.random() < 0.3:  # the final text is not what was streamed
        engine.stream_of = text
        text = r.choice([text.strip()[: r.randint(1, max(1, len(text) // 2))] or "x",
                         "(no reply)", text + " and one more line\n\nafter a paragraph",
                         _random_text(r)])
    engine.replies.append(text)

    async def pause(partial: str) -> None:
        clock.advance(r.choice([0.0, 0.3, 0.9, 1.0, 2.5]))
        if partial == engine.streamed[0] or r.random() < 0.7:
            await settle()
    engine.pause = pause
    s = _services(tmp_path, engine, clock)
    ch = RecordingChannel(clock)
    out = await _chat(Core(s), ch)
    _assert_final(ch, out, text)
    first = split_reply(engine.streamed[0].replace("\x00", ""))
    if first:  # the first text streamed was shown at once, as it was
        assert ch.calls[0][:3] == ("send", ch.calls[0][1], first[0])
    for op, *_ in ch.calls:
        assert op in ("send", "edit", "delete")
    assert s.store.interaction_for_message(G, out.feedback_message_id) is not None
    s.store.close()


# -- past 2,000 characters -------------------------------------------------------------------------


@pytest.mark.parametrize("text", [
    " ".join(f"w{i}" for i in range(1500)),  # ~6,000 characters of prose
    "look:\n```py\n" + "x = 1\n" * 600 + "```\ndone",  # a code fence across the cut
])
async def test_a_reply_crossing_the_limit_goes_on_in_a_new_message(tmp_path: Path,
                                                                   text: str) -> None:
    clock = FakeClock()
    engine = FakeEngine(text)
    engine.pause = _ticking(clock, 1.0)  # every word may be shown
    s = _services(tmp_path, engine, clock)
    ch = RecordingChannel(clock)
    out = await _chat(Core(s), ch)
    want = split_reply(text)
    assert len(want) >= 2
    _assert_final(ch, out, text)
    # When each next message was started, the one before already showed its final part:
    # the stream moved on at a clean split point, a code fence closed.
    sends = [i for i, c in enumerate(ch.calls) if c[0] == "send"]
    assert len(sends) == len(want)
    assert ch.calls[0][2] == word_prefixes(text)[0]  # streamed from the first word
    assert sum(c[0] == "edit" for c in ch.calls) > 100
    for k, at in enumerate(sends[1:], start=1):
        before = [c for c in ch.calls[:at] if c[1] == out.reply_ids[k - 1]]
        assert before[-1][2] == want[k - 1]
    assert all(len(c[2]) <= DISCORD_LIMIT for c in ch.calls)
    s.store.close()


# -- failures --------------------------------------------------------------------------------------


async def test_engine_error_mid_stream_replaces_the_half_reply(tmp_path: Path) -> None:
    clock = FakeClock()
    engine = FakeEngine(" ".join(f"w{i}" for i in range(1000)))

    async def pause(text: str) -> None:
        clock.advance(1.0)
        await settle()
        if len(text) > 2500:  # two messages shown by now
            raise EngineError("CUDA out of memory")
    engine.pause = pause
    s = _services(tmp_path, engine, clock)
    ch = RecordingChannel(clock)
    with pytest.raises(EngineError):
        await _chat(Core(s), ch)
    assert ch.parts == [POLITE_FAILURE]  # no half reply left standing
    assert ch.controls == []  # nothing to rate: nothing was logged
    assert s.store.guild_stats(G)["interactions"] == 0
    s.store.close()


async def test_engine_error_before_any_text_sends_nothing(tmp_path: Path) -> None:
    class Failing(FakeEngine):
        async def generate(self, req: GenerationRequest, on_text: Any = None
                           ) -> GenerationResult:
            raise EngineError("engine is not running")

    s = _services(tmp_path, Failing(), FakeClock())
    ch = RecordingChannel()
    with pytest.raises(EngineError):
        await _chat(Core(s), ch)
    assert ch.calls == [] and ch.typing_calls == ["start", "stop after 0 calls"]
    s.store.close()


async def test_refused_edits_are_logged_and_the_final_edit_is_retried(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    text = " ".join(f"w{i}" for i in range(12))
    clock, engine, s, ch = _rig(tmp_path, text)

    async def pause(partial: str) -> None:
        clock.advance(1.0)
        if partial.endswith("w3"):
            ch.fail_edits = 1  # one streamed edit refused
        if partial.endswith("w11"):
            ch.fail_edits = 1  # and the first try of the final edit
        await settle()
    engine.pause = pause
    out = await _chat(Core(s), ch)
    _assert_final(ch, out, text)
    assert [c[0] for c in ch.calls].count("edit-failed") == 2
    assert len(ch.parts) == 1  # retried in place: no second message
    assert sum("editing reply message" in r.getMessage() for r in caplog.records) == 2
    s.store.close()


async def test_a_final_edit_refused_twice_sends_the_reply_anew(tmp_path: Path) -> None:
    text = " ".join(f"w{i}" for i in range(1000))  # three parts
    clock, engine, s, ch = _rig(tmp_path, text)

    def then(partial: str) -> None:
        if partial.endswith("w999"):
            ch.fail_edits = 10**6  # Discord refuses every edit from now on
    engine.pause = _ticking(clock, 1.0, then)
    out = await _chat(Core(s), ch)
    _assert_final(ch, out, text)  # nothing lost, in order, controls on the last part
    row = s.store.interaction_for_message(G, out.feedback_message_id)
    assert row is not None and row["reply"] == text
    s.store.close()


# -- what did not change -----------------------------------------------------------------------


async def test_typing_lasts_until_the_first_part_is_sent(tmp_path: Path) -> None:
    clock = FakeClock()
    engine = FakeEngine("a b c d e")
    engine.pause = _ticking(clock, 0.5)
    s = _services(tmp_path, engine, clock)
    ch = RecordingChannel(clock)
    await _chat(Core(s), ch)
    assert ch.typing_calls == ["start", "stop after 0 calls"]
    assert ch.calls[0][0] == "send" and ch.calls[0][2] == "a"
    s.store.close()


async def test_a_channel_without_edit_gets_the_whole_reply(tmp_path: Path) -> None:
    class SendOnly:
        def __init__(self) -> None:
            self.inner = RecordingChannel()
            self.typing = self.inner.typing
            self.send = self.inner.send

    engine = FakeEngine("one two three")
    s = _services(tmp_path, engine, FakeClock())
    ch = SendOnly()
    await _chat(Core(s), ch)
    assert ch.inner.parts == ["one two three"] and engine.streamed == []
    s.store.close()


async def test_dms_stream_without_controls_nor_log(tmp_path: Path) -> None:
    clock = FakeClock()
    engine = FakeEngine("a b c")
    engine.pause = _ticking(clock, 1.0)
    s = _services(tmp_path, engine, clock)
    reply, log = _fake_discord(guild=False)
    out = await _chat(Core(s), DiscordReply(reply, "reactions"), guild_id=None)
    assert out.reply_ids and not out.logged
    assert not any(op in ("react", "edit+view") for op, *_ in log)
    s.store.close()


# -- the Cog's Discord reply over fake discord objects ---------------------------------------------


def _http_error(status: int = 429) -> discord.HTTPException:
    return discord.HTTPException(SimpleNamespace(status=status, reason="Too Many Requests"),
                                 "rate limited")


def _not_found() -> discord.NotFound:
    return discord.NotFound(SimpleNamespace(status=404, reason="Not Found"),
                            {"code": 10008, "message": "Unknown Message"})


def _fake_discord(*, guild: bool = True) -> tuple[Any, list[tuple[str, int, Any]]]:
    """A member's message to reply to; every call on the bot's messages lands in ``log`` as
    (op, message id, content or emoji). ``fail`` on the channel: edits to refuse; ``gone``:
    the ids of messages a moderator deleted (their edits and deletes: 404 Unknown Message)."""
    log: list[tuple[str, int, Any]] = []
    ids = iter(range(5000, 6000))

    class Msg:
        def __init__(self, content: str) -> None:
            self.id = next(ids)
            self.content = content
            self.channel = channel

        async def edit(self, *, content: str, allowed_mentions: Any, view: Any = None) -> Any:
            assert allowed_mentions is not None
            if self.id in channel.gone:
                log.append(("edit-404", self.id, content))
                raise _not_found()
            if channel.fail > 0:
                channel.fail -= 1
                log.append(("edit-failed", self.id, content))
                raise _http_error()
            self.content = content
            log.append(("edit+view" if view is not None else "edit", self.id, content))
            return self

        async def add_reaction(self, emoji: str) -> None:
            log.append(("react", self.id, emoji))

        async def delete(self) -> None:
            if self.id in channel.gone:
                log.append(("delete-404", self.id, None))
                raise _not_found()
            log.append(("delete", self.id, None))

    class Typing:
        async def __aenter__(self) -> None:
            log.append(("typing", 0, "start"))

        async def __aexit__(self, *exc: object) -> None:
            log.append(("typing", 0, "stop"))

    class Channel:
        id = 77
        fail = 0

        def __init__(self) -> None:
            self.gone: set[int] = set()

        def typing(self) -> Typing:
            return Typing()

        async def send(self, content: str, **kw: Any) -> Msg:
            m = Msg(content)
            log.append(("send+view" if kw.get("view") else "send", m.id, content))
            return m

    channel = Channel()

    class Request:
        id = 1

        def __init__(self) -> None:
            self.channel = channel
            self.guild = SimpleNamespace(id=G) if guild else None

        async def reply(self, content: str, **kw: Any) -> Msg:
            return await channel.send(content, **kw)

    return Request(), log


async def test_discord_reply_streams_then_adds_reactions_after_the_final_edit(
        tmp_path: Path) -> None:
    clock = FakeClock()
    text = " ".join(f"w{i}" for i in range(12))
    engine = FakeEngine(text)
    engine.pause = _ticking(clock, 0.5)
    s = _services(tmp_path, engine, clock)
    request, log = _fake_discord()
    out = await _chat(Core(s), DiscordReply(request, "reactions"))
    ops = [op for op, *_ in log]
    assert ops[:3] == ["typing", "typing", "send"]  # typing until the first part
    assert ops.count("edit") >= 3
    assert ops[-3:] == ["edit+view", "react", "react"]  # the controls once it is complete
    assert log[-3][2] == text and {e for *_, e in log[-2:]} == {"👍", "👎"}
    assert out.feedback_message_id == log[-1][1]
    assert s.store.interaction_for_message(G, out.feedback_message_id) is not None
    s.store.close()


async def test_discord_reply_survives_refused_edits(tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    clock = FakeClock()
    text = " ".join(f"w{i}" for i in range(12))
    engine = FakeEngine(text)
    s = _services(tmp_path, engine, clock)
    request, log = _fake_discord()

    def then(partial: str) -> None:
        if partial.endswith("w2"):
            request.channel.fail = 1  # a streamed edit refused: logged, streaming goes on
        if partial.endswith("w11"):
            request.channel.fail = 2  # the final edit and its retry refused
    engine.pause = _ticking(clock, 1.0, then)
    out = await _chat(Core(s), DiscordReply(request, "buttons"))
    ops = [op for op, *_ in log]
    assert ops.count("edit-failed") == 3
    # The reply went out anew (with its controls) and the stale half reply was deleted.
    assert ops[-2:] == ["delete", "send+view"] and log[-1][2] == text
    assert out.reply_ids == [log[-1][1]]
    assert "react" not in ops  # buttons mode: the view carries the controls
    assert any("HTTPException" in r.getMessage() for r in caplog.records)
    s.store.close()


async def test_cog_streams_through_discord(env, monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole Cog on dpytest: the reply is edited into place, reactions on the result."""
    clock = FakeClock()
    env.s.clock = clock
    env.s.store.grant_consent(env.guild.id, env.alice.id)
    text = " ".join(f"w{i}" for i in range(30))
    env.s.engine.replies.append(text)
    env.s.engine.pause = _ticking(clock, 0.5)
    edits: list[str] = []
    orig = discord.Message.edit

    async def edit(self: discord.Message, **kw: Any) -> Any:
        edits.append(kw["content"])
        return await orig(self, **kw)

    monkeypatch.setattr(discord.Message, "edit", edit)
    await dpytest.message(f"<@{env.bot.user.id}> stream please", member=env.alice)
    (reply,) = sent()
    assert reply.content == "w0"  # what was sent first; the rest came by edits
    assert len(edits) >= 5 and edits[-1] == text
    assert (await env.channel.fetch_message(reply.id)).content == text
    assert {str(r.emoji) for r in reply.reactions} == {"👍", "👎"}
    assert env.s.store.interaction_for_message(env.guild.id, reply.id) is not None


# -- the console ------------------------------------------------------------------------------------


class Writes(io.StringIO):
    """A terminal that remembers each write."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, s: str) -> int:
        self.writes.append(s)
        return super().write(s)


async def test_console_prints_the_reply_as_it_grows(tmp_path: Path) -> None:
    s = _services(tmp_path, EchoEngine(), FakeClock())  # type: ignore[arg-type]
    out = Writes()
    ch = ConsoleChannel(out, bot_id=1)
    result = await _chat(Core(s), ch)
    line = "guildtune: (echo) tell me something\n"
    assert out.getvalue() == "guildtune is typing…\n" + line  # the final text, once
    assert out.writes.count("guildtune: (echo)") == 1  # the first word, then...
    assert " me" in out.writes and " something" in out.writes  # ...only what was new
    assert ch.history[-1].text == "(echo) tell me something"
    assert ch.history[-1].message_id == result.feedback_message_id
    s.store.close()


async def test_console_reprints_a_part_that_did_not_just_grow(tmp_path: Path) -> None:
    class Rewriting(FakeEngine):
        def partials(self, text: str) -> list[str]:
            return ["Hello wor", "Hello world, friend"]

    engine = Rewriting("Hello, world.")
    engine.pause = lambda _: settle()
    s = _services(tmp_path, engine, FakeClock())
    out = Writes()
    ch = ConsoleChannel(out, bot_id=1)
    await _chat(Core(s), ch)
    lines = out.getvalue().splitlines()
    assert lines[1:] == ["guildtune: Hello world, friend", "guildtune: Hello, world."]
    assert out.writes[1:3] == ["guildtune: Hello wor", "ld, friend"]  # streamed
    assert out.getvalue().endswith("\n") and ch.history[-1].text == "Hello, world."
    s.store.close()


async def test_console_streams_long_replies_part_by_part(tmp_path: Path) -> None:
    text = " ".join(f"w{i}" for i in range(1000))
    engine = FakeEngine(text)
    engine.pause = lambda _: settle()
    s = _services(tmp_path, engine, FakeClock())
    out = io.StringIO()
    ch = ConsoleChannel(out, bot_id=1)
    await _chat(Core(s), ch)
    lines = [ln.removeprefix("guildtune: ") for ln in out.getvalue().splitlines()[1:]]
    want = split_reply(text)
    assert len(want) == 3 and lines[-1] == want[-1]
    # Each part ends on a full line of its own; a line the cut at the limit made too long is
    # followed at once by the part it became.
    rest = list(lines)
    for part in want:
        while rest[0] != part:
            stale = rest.pop(0)
            assert stale.startswith(rest[0]) and rest[0] in want, (stale[-30:], rest[0][-30:])
        rest.pop(0)
    assert rest == []
    s.store.close()


def test_word_prefixes() -> None:
    assert word_prefixes("  a  bc\nd ") == ["  a", "  a  bc", "  a  bc\nd"]


# -- a reply a moderator deleted while it streamed --------------------------------------------------


async def test_a_reply_deleted_by_a_moderator_mid_stream_is_not_posted_again(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Discord answers 404 Unknown Message to every edit of a deleted message: the stream
    stops there, sends nothing anew, adds no controls, and the reply is not logged."""
    caplog.set_level(logging.INFO, logger="bot.replies")
    clock = FakeClock()
    text = " ".join(f"w{i}" for i in range(12))
    engine = FakeEngine(text)
    s = _services(tmp_path, engine, clock)
    request, log = _fake_discord()

    async def pause(partial: str) -> None:
        clock.advance(1.0)
        if partial.endswith("w3"):
            request.channel.gone.add(log[-1][1])  # the moderator deletes the reply
        await settle()
    engine.pause = pause
    out = await _chat(Core(s), DiscordReply(request, "reactions"))
    ops = [op for op, *_ in log]
    assert ops.count("send") == 1 and "send+view" not in ops  # never posted again
    assert ops.count("edit-404") == 1  # streaming stopped at the first 404
    assert ops[-1] == "edit-404" and "react" not in ops and "edit+view" not in ops
    assert out.reply_ids == [] and out.feedback_message_id is None and not out.logged
    assert s.store.guild_stats(G)["interactions"] == 0  # kept out of the training data
    gone = [r for r in caplog.records if "withdrawn" in r.getMessage()]
    assert len(gone) == 1 and gone[0].levelno == logging.INFO
    s.store.close()


async def test_a_part_deleted_by_a_moderator_withdraws_the_whole_reply(tmp_path: Path) -> None:
    text = " ".join(f"w{i}" for i in range(1000))  # three parts
    clock, engine, s, ch = _rig(tmp_path, text)

    def then(partial: str) -> None:
        if partial.endswith("w600") and not ch.gone:
            ch.moderate(list(ch.messages)[-1])  # the second part, streaming now
    engine.pause = _ticking(clock, 1.0, then)
    out = await _chat(Core(s), ch)
    ops = [c[0] for c in ch.calls]
    assert ops.count("send") == 2 and ops.count("edit-gone") == 1
    assert ch.parts == [] and ops[-1] == "delete"  # the first part went too
    assert ch.controls == [] and out.reply_ids == [] and not out.logged
    assert s.store.guild_stats(G)["interactions"] == 0
    s.store.close()


async def test_a_reply_deleted_before_its_final_edit_is_not_sent_anew(tmp_path: Path) -> None:
    text = " ".join(f"w{i}" for i in range(12))
    clock, engine, s, ch = _rig(tmp_path, text)

    def then(partial: str) -> None:
        if partial == text:
            ch.moderate(next(iter(ch.messages)))
    engine.pause = _ticking(clock, 0.5, then)
    out = await _chat(Core(s), ch)
    ops = [c[0] for c in ch.calls]
    assert ops.count("send") == 1 and ops[-1] == "edit-gone"  # not retried, not re-sent
    assert ch.calls[-1][4]  # it was the final edit (the one with the controls)
    assert ch.parts == [] and ch.controls == [] and out.reply_ids == [] and not out.logged
    assert s.store.guild_stats(G)["interactions"] == 0
    s.store.close()


async def test_an_engine_error_after_a_moderator_deleted_the_reply_sends_no_notice(
        tmp_path: Path) -> None:
    clock = FakeClock()
    engine = FakeEngine(" ".join(f"w{i}" for i in range(12)))
    ch = RecordingChannel(clock)

    def then(partial: str) -> None:
        if partial.endswith("w3"):
            ch.moderate(next(iter(ch.messages)))
        if partial.endswith("w6"):
            raise EngineError("CUDA out of memory")
    engine.pause = _ticking(clock, 1.0, then)
    s = _services(tmp_path, engine, clock)
    with pytest.raises(EngineError):
        await _chat(Core(s), ch)
    assert ch.parts == [] and [c[0] for c in ch.calls].count("send") == 1  # no POLITE_FAILURE
    s.store.close()


async def test_discord_reply_tells_a_deleted_message_from_a_refused_edit() -> None:
    request, _ = _fake_discord()
    reply = DiscordReply(request, "buttons")
    a = await reply.send("one", first=True, last=False)
    b = await reply.send("two", first=False, last=False)
    request.channel.fail = 1
    with pytest.raises(EditFailed) as refused:
        await reply.edit(a, "one more")
    assert not isinstance(refused.value, MessageGone)  # a 429: retried, then sent anew
    request.channel.gone |= {a, b}
    with pytest.raises(MessageGone):
        await reply.edit(a, "one more")
    with pytest.raises(MessageGone):
        await reply.delete(b)


async def test_a_leftover_part_deleted_already_is_no_failure(
        caplog: pytest.LogCaptureFixture) -> None:
    """``finish`` deletes a streamed part the final reply no longer has: gone already is fine
    (no warning), and the reply is not withdrawn over it."""
    caplog.set_level(logging.DEBUG, logger="bot.replies")
    clock, ch, stream = _stream()
    stream.update(" ".join(f"w{i}" for i in range(600)))  # two parts
    await settle()
    assert len(ch.parts) == 2
    ch.moderate(list(ch.messages)[1])
    ids = await stream.finish(["short now"])
    assert ch.parts == ["short now"] and ch.controls == ids and not stream.withdrawn
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


# -- a chat cancelled mid-stream (the bot shuts down) ----------------------------------------------


def _gated_engine(clock: FakeClock, text: str, stop_after: str) -> tuple[FakeEngine,
                                                                          asyncio.Event]:
    """Streams ``text`` a word a second, then hangs after the word ``stop_after`` (once its
    round is done): the event returned is set when it hangs."""
    engine = FakeEngine(text)
    hung = asyncio.Event()

    async def pause(partial: str) -> None:
        clock.advance(1.0)
        await settle()
        if partial.endswith(stop_after):
            hung.set()
            await asyncio.Event().wait()  # until cancelled
    engine.pause = pause
    return engine, hung


async def test_cancelling_a_chat_mid_stream_leaves_a_notice(tmp_path: Path) -> None:
    clock = FakeClock()
    engine, hung = _gated_engine(clock, " ".join(f"w{i}" for i in range(1000)), "w700")
    s = _services(tmp_path, engine, clock)
    ch = RecordingChannel(clock)
    task = asyncio.create_task(_chat(Core(s), ch))
    await hung.wait()
    assert len(ch.parts) == 2  # two messages of half reply shown
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert ch.parts == [INTERRUPTED] and ch.controls == []  # one notice, nothing to rate
    assert s.store.guild_stats(G)["interactions"] == 0
    s.store.close()


async def test_cancelling_a_chat_before_any_text_sends_nothing(tmp_path: Path) -> None:
    clock = FakeClock()
    engine = FakeEngine("a b c")
    started, gate = asyncio.Event(), asyncio.Event()

    async def generate(req: GenerationRequest, on_text: Any = None) -> GenerationResult:
        started.set()
        await gate.wait()
        raise AssertionError("cancelled before")
    engine.generate = generate  # type: ignore[method-assign]
    s = _services(tmp_path, engine, clock)
    ch = RecordingChannel(clock)
    task = asyncio.create_task(_chat(Core(s), ch))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert ch.calls == [] and ch.typing_calls == ["start", "stop after 0 calls"]
    s.store.close()


async def test_a_cancelled_chat_does_not_wait_on_a_hung_discord(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The notice is bounded by ``interrupt_timeout_s`` (0 here: no real time passes); past
    it the cancel goes on and the notice lands whenever Discord answers."""
    monkeypatch.setattr(ReplyStream, "interrupt_timeout_s", 0.0)
    clock = FakeClock()
    engine, hung = _gated_engine(clock, " ".join(f"w{i}" for i in range(12)), "w4")
    s = _services(tmp_path, engine, clock)
    ch = RecordingChannel(clock)
    task = asyncio.create_task(_chat(Core(s), ch))
    await hung.wait()
    ch.gate = asyncio.Event()  # Discord hangs from now on
    task.cancel()
    await settle()
    assert task.cancelled()  # the chat did not wait for Discord
    assert ch.parts == ["w0 w1 w2 w3 w4"]
    ch.gate.set()  # Discord answers: the shielded notice lands
    await settle()
    assert ch.parts == [INTERRUPTED] and ch.controls == []
    s.store.close()


async def test_interrupt_waits_for_the_round_in_flight_then_shows_the_notice() -> None:
    clock, ch, stream = _stream()
    stream.update("one")
    await settle()
    clock.advance(1.0)
    ch.gate = asyncio.Event()
    stream.update("one two")  # an edit in flight: it is not cancelled half done
    await settle()
    job = asyncio.create_task(stream.interrupt())
    await settle()
    assert not job.done() and ch.parts == ["one"]
    ch.gate.set()
    await job
    assert [c[2] for c in ch.calls] == ["one", "one two", INTERRUPTED]
    assert ch.parts == [INTERRUPTED]


# -- a pending text is shown when the interval is up, updates or not ---------------------------------


TimerClock = FakeClock  # (its call_later timers fire on advance)


async def test_a_pending_text_is_shown_when_updates_stop() -> None:
    """An engine row finished but its batch goes on: no more ``update``; the text held back
    by the throttle is shown once the interval is up, not at ``finish``."""
    clock, ch, stream = _stream()
    stream.update("Hello")
    await settle()
    clock.advance(0.5)
    stream.update("Hello, here is the whole")
    stream.update("Hello, here is the whole answer")
    await settle()
    assert ch.parts == ["Hello"] and len(clock.pending) == 1  # one flush, 0.5 s away
    assert clock.pending[0].when == clock.t + 0.5
    clock.advance(0.4)
    await settle()
    assert ch.parts == ["Hello"]  # the throttle still holds
    clock.advance(0.1)
    await settle()
    assert ch.parts == ["Hello, here is the whole answer"] and not clock.pending
    assert [c[5] - ch.calls[0][5] for c in ch.calls] == [0.0, 1.0]


async def test_a_text_arriving_during_a_round_is_flushed_after_it() -> None:
    clock, ch, stream = _stream()
    stream.update("a")
    await settle()
    clock.advance(1.0)
    ch.gate = asyncio.Event()
    stream.update("a b")  # the edit hangs
    await settle()
    stream.update("a b c")  # meanwhile: pending, no flush while a round is in flight
    await settle()
    assert not clock.pending
    clock.advance(0.25)
    ch.gate.set()
    await settle()
    assert ch.parts == ["a b"] and len(clock.pending) == 1  # due 1 s after that round began
    clock.advance(0.75)
    await settle()
    assert ch.parts == ["a b c"]


async def test_the_flush_is_cancelled_by_finish_abort_and_interrupt() -> None:
    for end in ("finish", "abort", "interrupt", "cancel"):
        clock, ch, stream = _stream()
        stream.update("a")
        await settle()
        clock.advance(0.5)
        stream.update("a b")
        await settle()
        (timer,) = clock.pending
        if end == "finish":
            await stream.finish(["a b c"])
        elif end == "abort":
            await stream.abort()
        elif end == "interrupt":
            await stream.interrupt()
        else:
            stream.cancel()
        assert timer.cancelled, end
        clock.advance(5.0)
        await settle()
        assert len(ch.calls) == (1 if end == "cancel" else 2), (end, ch.calls)


async def test_a_flush_that_fires_early_is_scheduled_again() -> None:
    """The default timer runs on the event loop's clock, the throttle on ``clock``: a flush
    that finds the interval not up yet (the clocks drift) schedules itself for the rest."""
    clock = FakeClock()
    scheduled: list[tuple[float, Callable[[], None]]] = []

    def call_later(delay: float, callback: Callable[[], None]) -> Any:
        scheduled.append((delay, callback))
        return SimpleNamespace(cancel=lambda: None)
    ch = RecordingChannel(clock)
    stream = ReplyStream(ch, clock=clock, edit_interval_s=1.0, call_later=call_later)
    stream.update("a")
    await settle()
    clock.advance(0.25)
    stream.update("a b")
    assert [d for d, _ in scheduled] == [0.75]
    clock.advance(0.5)
    scheduled[0][1]()  # fires 0.25 s early by ``clock``
    await settle()
    assert ch.parts == ["a"] and [d for d, _ in scheduled] == [0.75, 0.25]
    clock.advance(0.25)
    scheduled[1][1]()
    await settle()
    assert ch.parts == ["a b"] and len(scheduled) == 2


async def test_the_flush_uses_the_event_loop_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    loop = asyncio.get_running_loop()
    calls: list[tuple[float, Callable[[], None]]] = []
    monkeypatch.setattr(loop, "call_later", lambda d, cb: calls.append((d, cb)) or
                        SimpleNamespace(cancel=lambda: None))
    now = [1_000_000.0]

    def clock() -> float:  # no call_later of its own: production's time.time has none either
        return now[0]

    ch = RecordingChannel(clock)
    stream = ReplyStream(ch, clock=clock, edit_interval_s=2.0)
    stream.update("a")
    await settle()
    now[0] += 0.5
    stream.update("a b")
    assert [d for d, _ in calls] == [1.5]
    now[0] += 1.5
    calls[0][1]()
    await settle()
    assert ch.parts == ["a b"]


async def test_core_shows_the_last_text_while_the_batch_goes_on(tmp_path: Path) -> None:
    """Through ``Core.chat``: the stream schedules on the services' clock (a TimerClock)."""
    clock = TimerClock()
    text = " ".join(f"w{i}" for i in range(9))
    engine = FakeEngine(text)
    seen: list[list[str]] = []

    async def pause(partial: str) -> None:
        clock.advance(0.3)
        await settle()
        if partial == text:  # the row is done; the batch runs 5 s more without on_text
            clock.advance(5.0)
            await settle()
            seen.append(ch.parts)
    engine.pause = pause
    s = _services(tmp_path, engine, clock)
    ch = RecordingChannel(clock)
    out = await _chat(Core(s), ch)
    assert seen == [[text]]  # shown before the result came
    _assert_final(ch, out, text)
    s.store.close()
