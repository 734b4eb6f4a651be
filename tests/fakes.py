"""The shared test kit: one config factory, small fakes and seeded data.

- ``make_config`` / ``write_config``: the one config factory (a ``Config``, or the same as a
  TOML file for the CLI and subprocess tests); presets and keyword sections override key by key.
- ``make_services`` / ``make_cog``: the bot's service container and Cog on those configs.
- ``FakeEngine`` (queued replies, streamed word by word), ``FakeScheduler``,
  ``RecordingChannel`` (the one ``ReplyChannel``; records sends, edits, deletes), ``FakeClock``
  and ``settle`` for deterministic streaming, fake interactions for slash-command callbacks.
- dpytest plumbing (``cog_on_dpytest``, ``deliver``, ``inject``, ``sent``); the ``env`` fixture
  built on it lives in conftest.py.
- seeded communities for the trainer tests (``import_pairs``, ``import_style``).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import re
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from bot.engine import AdapterError, Engine, GenerationRequest, GenerationResult, OnText
from bot.handlers import DISCORD_LIMIT
from bot.replies import EditFailed, MessageGone
from bot.services import Services
from guildtune.config import Config, parse_config
from storage import Store
from storage.store import open_store
from storage.times import utc_now

ROOT = Path(__file__).resolve().parents[1]
IRC = ROOT.parent / "shared" / "data" / "irc"  # real communities, where the checkout has them

# -- the config factory ---------------------------------------------------------------------------

Sections = Mapping[str, Mapping[str, Any]]

TINY: Sections = {"model": {"name": "tiny"}}
# A worker that trains the tiny model in a second or two.
TINY_TRAINER: Sections = {
    "model": {"name": "tiny"},
    "lora": {"rank": 4, "alpha": 8},
    "training": {"enabled": True, "epochs": 1.0, "min_steps": 0, "batch_size": 16,
                 "max_seq_len": 64,
                 "learning_rate": 3e-3, "lease_seconds": 10, "poll_seconds": 0.2},
}
# Long enough for the tiny model to pick up a community's style (the end-to-end tests).
STYLE_TRAINER: Sections = {
    "model": {"name": "tiny"},
    "lora": {"rank": 8, "alpha": 16},
    "training": {"enabled": True, "epochs": 3.0, "min_steps": 0, "batch_size": 16,
                 "max_seq_len": 96,
                 "learning_rate": 3e-3, "eval_margin": 0.01, "heldout_fraction": 0.2,
                 "lease_seconds": 30},
}


def config_data(data_dir: Path, *presets: Sections, **sections: Mapping[str, Any]
                ) -> dict[str, dict[str, Any]]:
    """The TOML document: data in ``data_dir``, then each preset, then each keyword section,
    each overriding only the keys it names (``training={"enabled": False}`` keeps the rest)."""
    data: dict[str, dict[str, Any]] = {"storage": {"data_dir": str(data_dir)}}
    for layer in (*presets, sections):
        for name, keys in layer.items():
            data.setdefault(name, {}).update(keys)
    return data


def make_config(tmp_path: Path, *presets: Sections, env: Mapping[str, str] | None = None,
                **sections: Mapping[str, Any]) -> Config:
    """The config tests run on: data in ``tmp_path``; no token unless ``env`` gives one."""
    data = config_data(tmp_path, *presets, **sections)
    return parse_config(data, env={} if env is None else env)


def write_config(tmp_path: Path, *presets: Sections, **sections: Mapping[str, Any]) -> Path:
    """The same config as ``tmp_path/config.toml``, data in ``tmp_path/data`` unless
    ``storage={"data_dir": ...}`` says otherwise; for the CLI and spawned processes."""
    lines: list[str] = []
    for name, keys in config_data(tmp_path / "data", *presets, **sections).items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in keys.items()]  # JSON values are TOML
    path = tmp_path / "config.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def run_cli(cfg_file: Path, *args: str) -> int:
    """``guildtune --config CFG_FILE ARGS...`` in-process; the exit code."""
    from guildtune.cli import main

    return main(["--config", str(cfg_file), *args])


def word_prefixes(text: str) -> list[str]:
    """The texts a streaming engine shows of ``text``: up to each word's end, in order."""
    return [text[:m.end()] for m in re.finditer(r"\S+", text)]


class FakeEngine(Engine):
    """Returns queued replies (else ``default``); records requests; fails listed versions.

    Streams: with ``on_text`` it passes the reply word by word (``word_prefixes``) and awaits
    ``pause(text_so_far)`` after each, when set: a test's hook to advance a fake clock, let the
    stream run (``settle``), gate or raise (an engine error mid-stream). Without a pause
    nothing interleaves: the stream shows the whole text at once.
    """

    def __init__(self, default: str = "hello there") -> None:
        self.default = default
        self.replies: deque[str] = deque()
        self.requests: list[GenerationRequest] = []
        self.versions: dict[int, int] = {}
        self.broken: set[int] = set()
        self.started = self.closed = False
        self.pause: Callable[[str], Awaitable[None]] | None = None
        self.streamed: list[str] = []  # every text passed to on_text
        self.cut = False  # replies end as cut at max_new_tokens (GenerationResult.cut)

    async def start(self) -> None:
        self.started = True

    async def close(self) -> None:
        self.closed = True

    def partials(self, text: str) -> list[str]:
        """What is streamed of ``text`` (a subclass may stream something else)."""
        return word_prefixes(text)

    async def generate(self, req: GenerationRequest, on_text: OnText | None = None
                       ) -> GenerationResult:
        self.requests.append(req)
        text = self.replies.popleft() if self.replies else self.default
        v = self.versions.get(req.guild_id) if req.guild_id is not None else None
        if on_text is not None:
            for partial in self.partials(text):
                self.streamed.append(partial)
                on_text(partial)
                if self.pause is not None:
                    await self.pause(partial)
        return GenerationResult(text, v, 10, len(text.split()), 5.0, cut=self.cut)

    async def activate(self, guild_id: int, version: int, path: Any) -> None:
        if version in self.broken:
            raise AdapterError(f"adapter v{version} is corrupt")
        self.versions[guild_id] = version

    async def deactivate(self, guild_id: int) -> None:
        self.versions.pop(guild_id, None)

    def active_versions(self) -> dict[int, int]:
        return dict(self.versions)


class FakeScheduler:
    """Stands in for APScheduler's AsyncIOScheduler: start/shutdown symmetry only."""

    def __init__(self) -> None:
        self.running = False
        self.shutdowns = 0

    def start(self) -> None:
        self.running = True

    def shutdown(self, wait: bool = True) -> None:
        self.running = False
        self.shutdowns += 1


def make_services(tmp_path: Path, *presets: Sections, engine: Engine | None = None,
                  **sections: Mapping[str, Any]) -> Services:
    """Services on ``make_config(tmp_path, ...)``, a store at ``tmp_path/x.db`` and ``engine``
    (a fresh ``FakeEngine`` by default)."""
    cfg = make_config(tmp_path, *presets, **sections)
    return Services(config=cfg, store=open_store(tmp_path / "x.db"),
                    engine=engine or FakeEngine(), watch_interval=0.05)


async def make_cog(tmp_path: Path, *presets: Sections, **sections: Mapping[str, Any]) -> Any:
    """(bot, cog, services): the Cog added to a bare ``commands.Bot`` (no gateway), for
    slash-command callbacks driven with ``FakeInteraction``."""
    import discord
    from discord.ext import commands

    from bot.cog import GuildTuneCog

    services = make_services(tmp_path, *presets, **sections)
    bot = commands.Bot(command_prefix="!", intents=discord.Intents.none())
    cog = GuildTuneCog(bot, services)
    await bot.add_cog(cog)
    return bot, cog, services


async def settle() -> None:
    """Let every task that is ready run to its next wait (no time passes: fake channels never
    wait on I/O, so a stream's round finishes within a few loop turns)."""
    for _ in range(20):
        await asyncio.sleep(0)


class FakeTimer:
    """A timer of ``FakeClock.call_later``."""

    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self.when, self.callback, self.cancelled = when, callback, False

    def cancel(self) -> None:
        self.cancelled = True


class FakeClock:
    """A clock that moves only when told: ``clock()`` reads it, ``advance(s)`` moves it and
    fires, in order, the ``call_later`` timers that came due (a stream's flushes take the
    clock's ``call_later``: no test waits on the event loop's real timers)."""

    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t
        self.timers: list[FakeTimer] = []  # every timer scheduled

    def __call__(self) -> float:
        return self.t

    def call_later(self, delay: float, callback: Callable[[], None]) -> FakeTimer:
        timer = FakeTimer(self.t + delay, callback)
        self.timers.append(timer)
        return timer

    @property
    def pending(self) -> list[FakeTimer]:
        return [t for t in self.timers if not t.cancelled and t.callback is not None]

    def advance(self, seconds: float) -> None:
        self.t += seconds
        while due := sorted((t for t in self.pending if t.when <= self.t),
                            key=lambda t: t.when):
            cb, due[0].callback = due[0].callback, None  # fired: pending no more
            cb()


class RecordingChannel:
    """The ``ReplyChannel`` of the tests: keeps each message, checks Discord's rules for a
    message (a non-blank str within the 2,000-character limit, no NUL), answers fresh ids.

    ``parts``: the text of each message still there, in order (after streaming: the reply as
    the member finally sees it). ``calls``: every send/edit/delete in order, as
    ``(op, message_id, text, first, last, clock())``. Set ``gate`` (an ``asyncio.Event``) to
    hold every edit until it is set; ``fail_edits`` (a count) makes that many edits raise
    ``EditFailed``; ``in_flight_max`` is the most edits ever awaiting at once. ``moderate(id)``
    deletes a message as a moderator would: it leaves ``parts``, and every later edit or
    delete of it raises ``MessageGone`` (recorded as "edit-gone" / "delete-gone").
    """

    _ids = itertools.count(10**15)  # shared: ids never repeat across channels

    def __init__(self, clock: Callable[[], float] | None = None) -> None:
        self.clock = clock or (lambda: 0.0)
        self.messages: dict[int, str] = {}  # id -> text, in the order sent
        self.controls: list[int] = []  # messages that got the feedback controls
        self.calls: list[tuple[str, int, str, bool, bool, float]] = []
        self.typing_calls: list[str] = []
        self.gate: asyncio.Event | None = None
        self.fail_edits = 0
        self.in_flight = self.in_flight_max = 0
        self.gone: set[int] = set()  # deleted by a moderator

    def moderate(self, message_id: int) -> None:
        """A moderator deletes message ``message_id``."""
        del self.messages[message_id]
        self.gone.add(message_id)

    @property
    def parts(self) -> list[str]:
        return list(self.messages.values())

    @asynccontextmanager
    async def typing(self) -> AsyncIterator[None]:
        self.typing_calls.append("start")
        try:
            yield
        finally:
            self.typing_calls.append(f"stop after {len(self.calls)} calls")

    @staticmethod
    def _check(text: str) -> None:
        assert isinstance(text, str) and 0 < len(text) <= DISCORD_LIMIT and text.strip()
        assert "\x00" not in text

    async def send(self, text: str, *, first: bool, last: bool) -> int:
        self._check(text)
        mid = next(self._ids)
        self.messages[mid] = text
        self.calls.append(("send", mid, text, first, last, self.clock()))
        if last:
            self.controls.append(mid)
        return mid

    async def edit(self, message_id: int, text: str, *, last: bool = False) -> None:
        self._check(text)
        if message_id in self.gone:
            self.calls.append(("edit-gone", message_id, text, False, last, self.clock()))
            raise MessageGone("404 Unknown Message")
        assert message_id in self.messages, "edit of a message that is not there"
        self.in_flight += 1
        self.in_flight_max = max(self.in_flight_max, self.in_flight)
        try:
            if self.gate is not None:
                await self.gate.wait()
            if self.fail_edits > 0:
                self.fail_edits -= 1
                self.calls.append(("edit-failed", message_id, text, False, last, self.clock()))
                raise EditFailed("429 Too Many Requests")
        finally:
            self.in_flight -= 1
        self.messages[message_id] = text
        self.calls.append(("edit", message_id, text, False, last, self.clock()))
        if last:
            self.controls.append(message_id)

    async def delete(self, message_id: int) -> None:
        if message_id in self.gone:
            self.calls.append(("delete-gone", message_id, "", False, False, self.clock()))
            raise MessageGone("404 Unknown Message")
        assert message_id in self.messages, "delete of a message that is not there"
        del self.messages[message_id]
        self.calls.append(("delete", message_id, "", False, False, self.clock()))


class Perms:
    def __init__(self, manage_guild: bool) -> None:
        self.manage_guild = manage_guild


class FakeUser:
    def __init__(self, id: int, admin: bool = False, name: str = "member") -> None:
        self.id = id
        self.guild_permissions = Perms(admin)
        self.display_name = self.name = name
        self.bot = False


class FakeGuild:
    def __init__(self, id: int, name: str = "Test Guild") -> None:
        self.id = id
        self.name = name


class FakeMessage:
    def __init__(self, id: int) -> None:
        self.id = id


class FakeResponse:
    def __init__(self, inter: FakeInteraction) -> None:
        self.inter = inter
        self._done = False

    def is_done(self) -> bool:
        return self._done

    async def send_message(self, content: str | None = None, **kw: Any) -> None:
        assert not self._done, "responded twice"
        self._done = True
        self.inter.sent.append({"content": content, **kw})

    async def defer(self, **kw: Any) -> None:
        self._done = True

    async def send_modal(self, modal: Any) -> None:
        self._done = True
        self.inter.modals.append(modal)


class FakeFollowup:
    def __init__(self, inter: FakeInteraction) -> None:
        self.inter = inter

    async def send(self, content: str | None = None, **kw: Any) -> None:
        self.inter.sent.append({"content": content, **kw})


class FakeInteraction:
    """What the command callbacks read of a ``discord.Interaction``; records every answer."""

    def __init__(self, client: Any, guild_id: int | None, user: FakeUser,
                 message_id: int | None = None) -> None:
        self.client = client
        self.guild_id = guild_id
        self.guild = FakeGuild(guild_id) if guild_id is not None else None
        self.user = user
        self.channel_id = 1
        self.message = FakeMessage(message_id) if message_id is not None else None
        self.command = None
        self.sent: list[dict[str, Any]] = []
        self.modals: list[Any] = []
        self.response = FakeResponse(self)
        self.followup = FakeFollowup(self)

    @property
    def text(self) -> str:
        """All text answered so far."""
        return "\n".join(str(s.get("content") or "") for s in self.sent)


# -- the Cog through dpytest ----------------------------------------------------------------------

@asynccontextmanager
async def cog_on_dpytest(services: Services, *, guilds: int = 1,
                         members: int = 2) -> AsyncIterator[SimpleNamespace]:
    """The Cog on a dpytest bot: ``bot``, ``cog``, ``s`` (services), ``errors`` and ``config``
    (dpytest's guilds, channels, members). A handler exception is collected in ``errors`` and
    fails the test on exit; the services' store is closed then."""
    import asyncio
    import sys

    import discord
    import discord.ext.test as dpytest
    from discord.ext import commands
    from discord.ext.test import backend

    from bot.cog import GuildTuneCog

    bot = commands.Bot(command_prefix="!", intents=discord.Intents.all())
    await bot._async_setup_hook()  # what bot.start() would run; dpytest never starts the bot
    dpytest.configure(bot, guilds=guilds, members=members)
    # dpytest leaves the state's loop unset; Typing (the typing indicator) schedules on it.
    backend.get_state().loop = asyncio.get_running_loop()
    errors: list[BaseException] = []

    async def on_error(event: str, *args: Any, **kwargs: Any) -> None:
        errors.append(sys.exc_info()[1])  # type: ignore[arg-type]

    bot.on_error = on_error  # after configure: dpytest installs its own wrapper
    cog = GuildTuneCog(bot, services)
    await bot.add_cog(cog)
    yield SimpleNamespace(bot=bot, cog=cog, s=services, errors=errors,
                          config=dpytest.get_config())
    await bot.remove_cog(cog.qualified_name)
    await dpytest.empty_queue()
    services.store.close()
    assert not errors, errors


def sent() -> list[Any]:
    """The messages the bot sent since the last call (dpytest's queue, drained)."""
    import discord.ext.test as dpytest

    out = []
    while not dpytest.sent_queue.empty():
        out.append(dpytest.get_message())
    return out


async def deliver(channel: Any, data: dict[str, Any]) -> Any:
    """Hand a raw MESSAGE_CREATE payload to the bot as Discord would; the ``discord.Message``.
    (dpytest has no public way to post a payload it did not build itself.)"""
    import discord.ext.test as dpytest
    from discord.ext.test import backend

    state = backend.get_state()
    state.parse_message_create(data)
    backend._cur_config.messages.setdefault(channel.id, []).append(data)
    await dpytest.run_all_events()
    return state._get_message(data["id"])


async def inject(channel: Any, author: Any, content: str, **extra: Any) -> Any:
    """A message with fields dpytest.message cannot set (reference, type, @everyone)."""
    from discord.ext.test import backend, factories

    reference = extra.pop("reference", None)
    data = factories.make_message_dict(channel, author, content=content,
                                       mentions=backend.find_user_mentions(content, channel.guild),
                                       **extra)
    if reference is not None:
        data["message_reference"] = {"message_id": reference.id, "channel_id": channel.id,
                                     "guild_id": channel.guild.id}
        data["referenced_message"] = factories.dict_from_message(reference)
    return await deliver(channel, data)


# -- seeded communities for the trainer ----------------------------------------------------------

def import_pairs(store: Store, guild: int, n: int = 80) -> None:
    """``n`` numbered question/answer pairs among ten members, imported with learning from
    humans and training on."""
    rows = []
    for i in range(n):
        rows.append({"message_id": 2 * i + 1, "user_id": 1 + i % 9, "text": f"question {i}?",
                     "created_utc": f"2024-02-01T00:{i % 60:02d}:00"})
        rows.append({"message_id": 2 * i + 2, "user_id": 2 + i % 9, "text": f"answer {i} ok",
                     "reply_to_message_id": 2 * i + 1,
                     "created_utc": f"2024-02-01T00:{i % 60:02d}:01"})
    store.import_messages(guild, rows)
    store.update_guild_settings(guild, learn_from_humans=True, training_enabled=True)


WORDS = ["rust", "linux", "code", "build", "test", "cargo", "kernel", "patch", "module", "error", "crate", "driver", "thread", "memory", "file", "system", "package", "release", "branch", "commit"]
QUESTIONS = ["how do I fix the {w}?", "anyone seen the {w} issue?", "what about {w} today",
             "is the {w} ok", "why does {w} fail", "need help with {w}"]
STYLES = {
    # Two registers a tiny model can tell apart within a few dozen steps.
    "pirate": lambda w, r: f"arr matey, the {w} be fine, yo ho ho {r.choice(WORDS)}",
    "robot": lambda w, r: f"BEEP. {w.upper()} STATUS: NOMINAL. BOOP {r.randint(0, 9)}.",
}


def import_style(store: Store, guild: int, style: str, n: int = 120, seed: int = 0) -> None:
    """``n`` (question, styled answer) pairs among 12 members, imported like a JSONL file."""
    r = random.Random(seed)
    rows = []
    for i in range(n):
        w = r.choice(WORDS)
        asker, answerer = r.sample(range(1000 + guild * 100, 1012 + guild * 100), 2)
        t = f"2024-01-{1 + i // 40:02d}T{(i // 4) % 10:02d}:{i % 60:02d}:00"
        rows.append({"message_id": 2 * i + 1, "user_id": asker, "created_utc": t,
                     "text": r.choice(QUESTIONS).format(w=w)})
        rows.append({"message_id": 2 * i + 2, "user_id": answerer, "created_utc": t,
                     "text": STYLES[style](w, r), "reply_to_message_id": 2 * i + 1})
    store.import_messages(guild, rows)
    store.update_guild_settings(guild, learn_from_humans=True, training_enabled=True)


def liked_replies(store: Store, guild: int, n: int, start: int = 0, score: int = 1) -> None:
    """``n`` bot replies (numbered from ``start``), each rated ``score`` (1: liked) by the
    opted-in member it answered; training on."""
    store.update_guild_settings(guild, training_enabled=True)
    for i in range(start, start + n):
        user = 100 + i
        store.grant_consent(guild, user)
        store.log_interaction(guild, 1, user, context=[
            {"role": "user", "author_id": user, "message_id": 5000 + i,
             "text": f"how do I build the crate {i}?", "created_utc": utc_now()}],
            reply=f"run cargo build, then test {i}", request_message_id=5000 + i,
            reply_message_id=6000 + i)
        assert store.record_feedback(guild, 6000 + i, user, score)


def padded_batch(vocab: int, rows: int, seed: int = 5) -> tuple[Any, Any, Any]:
    """Ids, attention mask and labels of ``rows`` random sequences (5-40 tokens, the second half
    labelled), right-padded the way the fit pads them: for comparing attention paths."""
    import torch

    from trainer.fit import IGNORE, PAD_MULTIPLE, Encoded, collate

    r = random.Random(seed)
    items = []
    for _ in range(rows):
        ids = [r.randrange(3, vocab) for _ in range(r.randint(5, 40))]
        items.append(Encoded(ids, [IGNORE] * (len(ids) // 2) + ids[len(ids) // 2:], 1.0))
    ids, att, labels, _ = collate(items, 0, torch.device("cpu"), PAD_MULTIPLE)
    return ids, att, labels


def services_on(cfg: Config) -> Services:
    """Services whose store is the config's database: the one a spawned training child opens."""
    return Services(config=cfg, store=open_store(cfg.db_path), engine=FakeEngine(),
                    watch_interval=0.05)
