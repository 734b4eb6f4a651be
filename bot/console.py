"""A terminal front end that drives the same handlers as the Discord Cog.

``guildtune console --guild NAME``: type messages to chat in a local fake channel of a local
guild; slash lines run the member and admin commands. The local user is the guild's admin.
This module is a UI: it writes to its output stream on purpose.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any, TextIO

from bot.context import Turn, merge_context
from bot.core import Core, UserError, unstorable
from bot.engine import Engine, GenerationRequest, GenerationResult
from bot.engine.base import OnText
from bot.services import Services
from bot.watcher import AdapterWatcher
from guildtune.data_statement import consent_statement
from storage.times import format_utc

HELP = """commands:
  <text>                    chat with the bot
  /rate + | /rate -         rate the last reply
  /suggest <text>           a better reply for the last one
  /consent [on|off]         the data statement, or opt in / out
  /mydata                   your stored data as JSON
  /forget                   delete your data (asks to confirm)
  /tune status | retrain | rollback | training on|off | schedule <cron>
        | persona [text|reset] | channels list
  /help, /quit"""


def local_id(name: str) -> int:
    """A stable snowflake-sized id for a local guild or user name."""
    return int(hashlib.sha256(name.encode()).hexdigest()[:15], 16)


class EchoEngine(Engine):
    """A model-free engine for trying the loop: repeats the last message, tagged with the
    guild's version, so hot swaps and rollbacks are visible without a model."""

    def __init__(self) -> None:
        self._versions: dict[int, int] = {}

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def generate(self, req: GenerationRequest, on_text: OnText | None = None
                       ) -> GenerationResult:
        last = req.messages[-1]["content"] if req.messages else ""
        v = self._versions.get(req.guild_id) if req.guild_id is not None else None
        text = f"(echo) {last}"
        if on_text is not None:  # word by word, as a model streams
            for m in re.finditer(r"\S+", text):
                on_text(text[:m.end()])
                await asyncio.sleep(0)
        return GenerationResult(text, v, len(last.split()), len(last.split()) + 1, 0.1)

    async def activate(self, guild_id: int, version: int, path: Any) -> None:
        self._versions[guild_id] = version

    async def deactivate(self, guild_id: int) -> None:
        self._versions.pop(guild_id, None)

    def active_versions(self) -> dict[int, int]:
        return dict(self._versions)


class ConsoleChannel:
    """``ReplyChannel`` printing to the terminal; keeps the channel's history as turns.

    A streamed part is printed as it grows: ``guildtune: `` and its first text, then only
    what each edit adds; the line ends when the part is complete (the next part, the last
    part's final edit, or ``end_line`` before other output). An edit that is not an
    extension of what was printed (a part cut at the limit, a corrected or withdrawn reply)
    prints the part again in full on a new line. So the final text of every part is on the
    last ``guildtune:`` line printed for it.
    """

    edit_interval_s = 0.0  # a terminal has no rate limit: show every token

    def __init__(self, out: TextIO, bot_id: int,
                 clock: Callable[[], float] = time.time) -> None:
        self.out = out
        self.bot_id = bot_id
        self.clock = clock
        self.ids = itertools.count(int(time.time() * 1000) << 22)
        self.history: list[Turn] = []
        self._open: int | None = None  # the part whose line is still being written
        self._printed: dict[int, str] = {}  # what the terminal shows of each streamed part

    def new_id(self) -> int:
        return next(self.ids)

    def now_utc(self) -> str:
        """When a console message is written, in the store's format (the console's clock)."""
        return format_utc(datetime.fromtimestamp(self.clock(), UTC))

    def end_line(self) -> None:
        """End a part's line left open by streaming (before any other output)."""
        if self._open is not None:
            self._open = None
            self.out.write("\n")
            self.out.flush()

    @asynccontextmanager
    async def typing(self) -> AsyncIterator[None]:
        self.end_line()
        self.out.write("guildtune is typing…\n")
        self.out.flush()
        yield

    def _print(self, mid: int, text: str, *, last: bool) -> None:
        self.end_line()
        self.out.write(f"guildtune: {text}")
        self._printed[mid] = text
        self._open = mid
        self._close(mid, text, last)

    def _close(self, mid: int, text: str, last: bool) -> None:
        """After a write: a last part is complete (its line ends; it joins the history)."""
        if last:
            self.end_line()
            self._printed.pop(mid, None)
            self.history.append(Turn("assistant", self.bot_id, mid, text,
                                     created_utc=self.now_utc()))
        self.out.flush()

    async def send(self, text: str, *, first: bool, last: bool) -> int:
        mid = self.new_id()
        self._print(mid, text, last=last)
        return mid

    async def edit(self, message_id: int, text: str, *, last: bool = False) -> None:
        shown = self._printed.get(message_id)
        if message_id == self._open and shown is not None and text.startswith(shown):
            self.out.write(text[len(shown):])  # only what is new
            self._printed[message_id] = text
            self._close(message_id, text, last)
        elif shown != text:
            self._print(message_id, text, last=last)  # in full, on a line of its own
        else:
            self._close(message_id, text, last)

    async def delete(self, message_id: int) -> None:
        self._printed.pop(message_id, None)
        self.end_line()
        self.out.write("  [a streamed part above was withdrawn]\n")
        self.out.flush()


class Console:
    """The console session: one local guild, channel and user."""

    def __init__(self, services: Services, guild: str, *, user: str = "you",
                 out: TextIO) -> None:
        self.s = services
        self.guild_name = guild
        self.guild_id = local_id("guild:" + guild)
        self.user_id = local_id("user:" + user)
        self.channel_id = local_id("channel:" + guild)
        self.out = out
        self.core = Core(services)
        self.channel = ConsoleChannel(out, bot_id=local_id("bot"), clock=services.clock)
        self.watcher = AdapterWatcher(services, services.watch_interval, self._notify)
        self.last_reply: int | None = None

    def say(self, text: str) -> None:
        self.channel.end_line()
        self.out.write(text + "\n")
        self.out.flush()

    async def _notify(self, guild_id: int, line: str) -> None:
        if guild_id == self.guild_id:
            self.say(f"[admin log] {line}")

    async def run(self, stdin: TextIO) -> int:
        """Read lines until /quit or end of input. Returns an exit code."""
        self.say(f"guildtune console · guild {self.guild_name!r} · /help for commands")
        self.watcher.start()
        try:
            while True:
                line = await asyncio.to_thread(stdin.readline)
                if not line:
                    break
                line = line.strip()
                if not line:
                    continue
                if line in ("/quit", "/exit"):
                    break
                try:
                    await self.handle(line, stdin)
                except UserError as exc:
                    self.say(f"! {exc}")
                except Exception as exc:
                    # A command that writes (/consent, /rate...) on a full disk or a locked
                    # database: say so and keep the session, as chat does.
                    why = unstorable(exc)
                    if why is None:
                        raise
                    self.say(f"! not done: {why}")
        finally:
            await self.watcher.stop()
        return 0

    async def handle(self, line: str, stdin: TextIO) -> None:
        """One input line: a command or a chat message."""
        if not line.startswith("/"):
            await self.chat(line)
            return
        cmd, _, rest = line[1:].partition(" ")
        rest = rest.strip()
        g, u = self.guild_id, self.user_id
        if cmd == "help":
            self.say(HELP)
        elif cmd == "rate":
            if self.last_reply is None:
                raise UserError("No reply to rate yet.")
            rating = {"+": 1, "up": 1, "👍": 1, "-": -1, "down": -1, "👎": -1}.get(rest)
            if rating is None:
                raise UserError("Use /rate + or /rate -.")
            ok = await self.core.rate(g, self.last_reply, u, rating)
            self.say("rated " + ("👍" if rating > 0 else "👎") if ok else
                     "not stored (opt in with /consent on; the reply must have been logged)")
        elif cmd == "suggest":
            if self.last_reply is None:
                raise UserError("No reply to improve yet.")
            self.say(await self.core.suggest(g, self.last_reply, u, rest))
        elif cmd == "consent":
            if rest in ("on", "off"):
                self.say(await self.core.consent(g, u, rest == "on"))
            else:
                state = await self.core.has_consent(g, u)
                self.say(consent_statement(self.guild_name, self.s.config))
                self.say(f"You are {'opted in' if state else 'not opted in'}: /consent on|off")
        elif cmd == "mydata":
            self.say(json.dumps(json.loads(await self.core.export(g, u)), indent=2))
        elif cmd == "forget":
            self.say("Delete everything stored about you here? type yes to confirm")
            answer = (await asyncio.to_thread(stdin.readline)).strip().lower()
            self.say(await self.core.forget(g, u) if answer in ("y", "yes") else
                     "Nothing was deleted.")
        elif cmd == "tune":
            await self.tune(rest)
        else:
            raise UserError(f"Unknown command /{cmd}; /help lists them.")

    async def tune(self, rest: str) -> None:
        """The admin commands (the console user is the local guild's admin)."""
        sub, _, arg = rest.partition(" ")
        arg = arg.strip()
        g = self.guild_id
        if sub == "status":
            rep = await self.core.status(g, chart=False)
            for line in rep.lines():
                self.say(line)
        elif sub == "retrain":
            self.say(await self.core.retrain(g, self.user_id))
        elif sub == "rollback":
            self.say(await self.core.rollback(g))
            await self.watcher.sync_once()
        elif sub == "training" and arg in ("on", "off"):
            self.say(await self.core.set_training(g, arg == "on"))
        elif sub == "schedule" and arg:
            self.say(await self.core.set_schedule(g, arg))
        elif sub == "persona":
            self.say(await self.core.set_persona(g, arg or None))
        elif sub == "channels":
            self.say(await self.core.channels(g, "list", None))
        else:
            raise UserError("Use /tune status | retrain | rollback | training on|off | "
                            "schedule <cron> | persona [text|reset] | channels list")

    async def chat(self, text: str) -> None:
        """Send ``text`` as the local user and print the reply."""
        mid = self.channel.new_id()
        current = Turn("user", self.user_id, mid, text, created_utc=self.channel.now_utc())
        turns = merge_context([], self.channel.history,
                              current, self.s.config.discord.context_messages)
        self.channel.history.append(current)
        del self.channel.history[:-200]  # a long session must not grow without bound
        out = await self.core.chat(self.channel, guild_id=self.guild_id,
                                   channel_id=self.channel_id, user_id=self.user_id,
                                   request_message_id=mid, turns=turns)
        if out.result is None:
            return
        self.last_reply = out.feedback_message_id
        v = out.result.adapter_version
        if out.not_stored is not None:
            stored = f"not stored: {out.not_stored}"
        else:
            stored = "logged" if out.logged else "not logged (/consent on to allow)"
        self.say(f"  [{'base model' if v is None else f'v{v}'} · "
                 f"{out.result.latency_ms:.0f} ms · {stored}]")


async def run_console(services: Services, guild: str, *, user: str = "you",
                      stdin: TextIO, out: TextIO) -> int:
    """Run a console session on ``services`` until /quit or end of input."""
    return await Console(services, guild, user=user, out=out).run(stdin)
