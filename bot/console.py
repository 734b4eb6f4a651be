"""A terminal front end that drives the same handlers as the Discord Cog.

``guildtune console --guild NAME|ID``: type messages to chat in a local fake channel of a local
guild; slash lines run the member and admin commands. The local user is the guild's admin.
With the operator's training on, ``guildtune console`` also runs the bot's training worker
(``bot.runner.spawn_worker``): a retrain queued here trains, its progress shows here, and the
adapter watcher swaps the new version in, as in the bot.

What the terminal shows: a ``you>`` prompt (a scripted stdin's lines are echoed after it, so
the output reads as a transcript); replies streamed as they grow, Discord markdown in terminal
styles when the output is a terminal (``bot.terminal.render_markdown``; a pipe gets the text
as Discord would); library logs and warnings in a log file, never in the chat
(``bot.terminal.library_output_to``, which ``guildtune console`` wraps the session in).
This module is a UI: it writes to its output stream on purpose.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TextIO

from bot.context import Turn, merge_context
from bot.core import Core, UserError, unstorable
from bot.engine import Engine, GenerationRequest, GenerationResult
from bot.engine.base import OnText
from bot.replies import cut_note
from bot.services import Services
from bot.status import FINISHED, run_summary
from bot.terminal import is_terminal, read_line, render_markdown
from bot.watcher import AdapterWatcher, cancel_and_wait, poll_forever
from guildtune.data_statement import consent_statement
from guildtune.policy import explain, operator_block
from guildtune.progress import LOG_EVERY_S, phase_of, progress_line
from storage.times import format_utc

log = logging.getLogger(__name__)

HELP = """commands:
  <text>                    chat with the bot
  /rate + | /rate -         rate the last reply
  /suggest <text>           a better reply for the last one
  /consent [on|off]         the data statement, or opt in / out
  /mydata                   your stored data as JSON
  /forget                   delete your data (asks to confirm)
  /tune status | retrain | rollback | training on|off | schedule <cron>
        | persona [text|reset] | channels list
  /wait                     wait until this guild's training run has ended (for scripts)
  /help, /quit (or Ctrl-D, Ctrl-C)"""

PROMPT = "you> "
CLEAR_LINE = "\r\x1b[K"  # back to the line's start and erase it (the prompt being shown)


def local_id(name: str) -> int:
    """A stable snowflake-sized id for a local guild or user name."""
    return int(hashlib.sha256(name.encode()).hexdigest()[:15], 16)


def console_guild(guild: str | int) -> tuple[str, int]:
    """(name, id) of the console's guild: an id as given (``--guild 42`` is the guild that
    ``guildtune import --guild 42`` wrote), a name as a local guild with an id derived from it."""
    if isinstance(guild, int) or guild.isdigit():
        return str(guild), int(guild)
    return guild, local_id("guild:" + guild)


class Worker(Protocol):
    """The training worker process the console started (``subprocess.Popen``)."""

    def poll(self) -> int | None: ...


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
    last ``guildtune:`` line printed for it. With ``styled``, parts are shown through
    ``render_markdown`` (an open line as a streamed prefix, ``final=False``).
    """

    edit_interval_s = 0.0  # a terminal has no rate limit: show every token

    def __init__(self, out: TextIO, bot_id: int,
                 clock: Callable[[], float] = time.time, *, styled: bool = False) -> None:
        self.out = out
        self.bot_id = bot_id
        self.clock = clock
        self.styled = styled
        self.ids = itertools.count(int(time.time() * 1000) << 22)
        self.history: list[Turn] = []
        self._open: int | None = None  # the part whose line is still being written
        self._printed: dict[int, str] = {}  # the text of each streamed part the terminal shows

    def new_id(self) -> int:
        return next(self.ids)

    def now_utc(self) -> str:
        """When a console message is written, in the store's format (the console's clock)."""
        return format_utc(datetime.fromtimestamp(self.clock(), UTC))

    def show(self, text: str, *, final: bool = True) -> str:
        """``text`` as the terminal shows it."""
        return render_markdown(text, final=final) if self.styled else text

    def end_line(self) -> None:
        """End a part's line left open by streaming (before any other output)."""
        if self._open is not None:
            mid, self._open = self._open, None
            text = self._printed.get(mid, "")
            self.out.write(self.show(text)[len(self.show(text, final=False)):] + "\n")
            self.out.flush()

    @asynccontextmanager
    async def typing(self) -> AsyncIterator[None]:
        self.end_line()
        self.out.write("guildtune is typing…\n")
        self.out.flush()
        yield

    def _print(self, mid: int, text: str, *, last: bool) -> None:
        self.end_line()
        self.out.write("guildtune: " + self.show(text, final=last))
        self._printed[mid] = text
        self._open = mid
        self._close(mid, text, last)

    def _close(self, mid: int, text: str, last: bool) -> None:
        """After a write: a last part is complete (its line ends; it joins the history)."""
        if last:
            if self._open == mid:
                self._open = None  # its final rendering is written: only the line's end is left
                self.out.write("\n")
            else:
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
            # only what is new (a prefix's rendering is a prefix of the whole's)
            self.out.write(self.show(text, final=last)[len(self.show(shown, final=False)):])
            self._printed[message_id] = text
            self._close(message_id, text, last)
        elif shown != text:
            self._print(message_id, text, last=last)  # in full, on a line of its own
        else:
            if last and message_id == self._open:
                self.end_line()  # the rest of its final rendering, and the line's end
            self._close(message_id, text, last)

    async def delete(self, message_id: int) -> None:
        self.end_line()
        self._printed.pop(message_id, None)
        self.out.write("  [a streamed part above was withdrawn]\n")
        self.out.flush()


class Console:
    """The console session: one local guild, channel and user.

    ``worker``: the training worker process started for this session (None: none runs here);
    ``log_path``: where library output and the worker's log go (named at start)."""

    def __init__(self, services: Services, guild: str | int, *, user: str = "you",
                 out: TextIO, worker: Worker | None = None,
                 log_path: Path | None = None) -> None:
        self.s = services
        self.guild_name, self.guild_id = console_guild(guild)
        self.user_id = local_id("user:" + user)
        self.channel_id = local_id("channel:" + self.guild_name)
        self.out = out
        self.worker = worker
        self.log_path = log_path
        self.core = Core(services)
        self.channel = ConsoleChannel(out, bot_id=local_id("bot"), clock=services.clock,
                                      styled=is_terminal(out))
        self.watcher = AdapterWatcher(services, services.watch_interval, self._notify)
        self.last_reply: int | None = None
        self._prompting = False  # the prompt is on screen, waiting for a line
        self._following: asyncio.Task[None] | None = None
        self._follow_lock = asyncio.Lock()
        self._reported: int | None = None  # the newest finished run already told of
        self._progress: tuple[int, str, float] | None = None  # (run, phase, when) last shown
        self._worker_gone = False
        self._swaps: list[str] = []  # swap lines held until their run's outcome is told

    @property
    def guild_label(self) -> str:
        """The guild as the operator finds it again (``guildtune status --guild ID``)."""
        if self.guild_name == str(self.guild_id):
            return f"guild {self.guild_id}"
        return f"guild {self.guild_name!r} (id {self.guild_id})"

    def say(self, text: str, *, markdown: bool = True) -> None:
        """Print a line (or lines), ``markdown`` as the terminal shows it; with the prompt on
        screen (a terminal waiting for input: a swap or a training line arrived), above it,
        and the prompt again."""
        self.channel.end_line()
        if markdown:
            text = self.channel.show(text)
        if self._prompting:
            self.out.write(CLEAR_LINE + text + "\n" + PROMPT)
        else:
            self.out.write(text + "\n")
        self.out.flush()

    async def _notify(self, guild_id: int, line: str) -> None:
        if guild_id != self.guild_id:
            return
        # The trainer activates a new version a moment before its worker records the run's
        # end, and the watcher may swap it in between: the run's outcome is told first, then
        # the swap it led to (``follow_training`` lets the line out).
        self._swaps.append(f"[admin log] {line}")
        await self.follow_training()

    def _training_line(self) -> str:
        """What the start says of training: off (and how to turn it on), or who trains."""
        off = operator_block(self.s.config)
        if off is not None:
            return f"Training: off. {self._turn_on()}"
        if self.worker is None:
            return ("Training: on, but no worker runs in this console: a retrain waits for "
                    "`guildtune worker`.")
        return ("Training: on; a worker trains this console's runs: `/tune training on`, then "
                "`/tune retrain`; `/wait` waits for the new version.")

    def _turn_on(self) -> str:
        source = self.s.config.source
        where = source if source not in ("built-in defaults", "<dict>") else \
            "a config file (`guildtune --config FILE console ...`)"
        return (f"You are the operator here: set `enabled = true` under [training] in {where} "
                "and start the console again to train from it.")

    async def _next_line(self, stdin: TextIO) -> str:
        """The next input line ("" at end of input), after the prompt on a terminal; else
        (a script, or the output going to a file) the line is echoed after it, so the output
        reads as a transcript."""
        prompt = is_terminal(stdin) and self.channel.styled  # a person at a terminal
        if prompt:
            self.channel.end_line()
            self.out.write(PROMPT)
            self.out.flush()
            self._prompting = True
        try:
            line = await read_line(stdin)
        finally:
            self._prompting = False
        if not prompt and line.strip():
            self.say(PROMPT + line.rstrip("\n"), markdown=False)
        elif prompt and not line:  # Ctrl-D: end the prompt's line
            self.out.write("\n")
        return line

    async def run(self, stdin: TextIO) -> int:
        """Read lines until /quit or end of input. Returns an exit code."""
        self.say(f"guildtune console · {self.guild_label} · /help for commands")
        self.say(self._training_line())
        if self.log_path is not None:
            what = ("Library logs, warnings and the worker's log" if self.worker is not None
                    else "Library logs and warnings")
            self.say(f"{what} go to {self.log_path}.")
        await self._start_following()
        self.watcher.start()
        try:
            while True:
                line = await self._next_line(stdin)
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
            await self._stop_following()
            self._tell_swaps()  # a swap whose run had not ended by now is still told
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
            self.say(json.dumps(json.loads(await self.core.export(g, u)), indent=2),
                     markdown=False)
        elif cmd == "forget":
            self.say("Delete everything stored about you here? type yes to confirm")
            answer = (await self._next_line(stdin)).strip().lower()
            self.say(await self.core.forget(g, u) if answer in ("y", "yes") else
                     "Nothing was deleted.")
        elif cmd == "tune":
            await self.tune(rest)
        elif cmd == "wait":
            await self.wait_for_training()
        else:
            raise UserError(f"Unknown command /{cmd}; /help lists them.")

    async def tune(self, rest: str) -> None:
        """The admin commands (the console user is the local guild's admin)."""
        sub, _, arg = rest.partition(" ")
        arg = arg.strip()
        g = self.guild_id
        if sub == "status":
            rep = await self.core.status(g, chart=False)
            self.say(f"Guild: {self.guild_label}")
            for line in rep.lines():
                self.say(line)
        elif sub == "retrain":
            off = operator_block(self.s.config)
            if off is not None:  # Core's refusal is for an admin; here the operator is typing
                raise UserError(f"{explain(off)} {self._turn_on()}")
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

    # -- training, as the worker reports it through storage --------------------------------------

    async def _start_following(self) -> None:
        """Follow this guild's runs from now on (a run that ended before is not told again)."""
        runs = await asyncio.to_thread(self.s.store.runs, self.guild_id, 1)
        if runs and runs[0].status in FINISHED:
            self._reported = runs[0].id
        self._following = asyncio.get_running_loop().create_task(
            self._follow(), name="guildtune-console-training")

    async def _stop_following(self) -> None:
        task, self._following = self._following, None
        await cancel_and_wait(task)

    async def _follow(self) -> None:
        # Keep following: one failed look must not end it.
        await poll_forever(self.follow_training, lambda: self.s.watch_interval,
                           "following the guild's training")

    def _worker_down(self) -> str | None:
        """Why no worker will train a queued run, or None while one runs here."""
        if self.worker is None:
            return ("no training worker runs in this console (the operator's training is off, "
                    "or `guildtune worker` runs elsewhere)")
        code = self.worker.poll()
        if code is None:
            return None
        where = f"; its log: {self.log_path}" if self.log_path else ""
        return f"the training worker stopped (exit code {code}){where}"

    async def follow_training(self) -> None:
        """One look at this guild's newest run: a line when its phase changes (else at most
        every ``LOG_EVERY_S``, when it moved) and one when it has ended; a line when the worker
        died."""
        async with self._follow_lock:
            if self.worker is not None and not self._worker_gone:
                down = self._worker_down()
                if down is not None:
                    self._worker_gone = True
                    self.say(f"[training] {down}")
            runs = await asyncio.to_thread(self.s.store.runs, self.guild_id, 1)
            run = runs[0] if runs else None
            if run is not None:
                self._tell_run(run)
            if self._swaps and not await self._run_publishing(run):
                self._tell_swaps()

    def _tell_run(self, run: Any) -> None:
        """A line for this guild's newest run: its end once, its phase as it changes."""
        if run.status in FINISHED:
            if self._reported != run.id:
                self._reported = run.id
                self.say(f"[training] run {run_summary(run)}")
            return
        if run.status != "running" or not run.progress:
            return
        phase, now = phase_of(run.progress), self.s.clock()
        last = self._progress
        if (last is None or last[:2] != (run.id, phase)
                or now - last[2] >= LOG_EVERY_S):
            self._progress = (run.id, phase, now)
            self.say(f"[training] run #{run.id}: {progress_line(run.progress)}")

    async def _run_publishing(self, run: Any) -> bool:
        """Whether ``run`` is still running although the active version is its own (it has
        published; its end is recorded next): swap lines wait for that end. A worker seen
        dead here will record nothing more: they wait no longer."""
        if run is None or run.status != "running" or self._worker_gone:
            return False
        active = await asyncio.to_thread(self.s.store.active_version, self.guild_id)
        return active is not None and active.run_id == run.id

    def _tell_swaps(self) -> None:
        lines, self._swaps = self._swaps, []
        for line in lines:
            self.say(line)

    async def wait_for_training(self) -> None:
        """/wait: until this guild's queued or running run has ended, and the version it
        published serves (a script goes on with the new version)."""
        if await asyncio.to_thread(self.s.store.open_run, self.guild_id) is None:
            raise UserError("No training run is queued or running here.")
        while await asyncio.to_thread(self.s.store.open_run, self.guild_id) is not None:
            down = self._worker_down()
            if down is not None:
                raise UserError(f"Not waiting: {down}.")
            await self.follow_training()
            await asyncio.sleep(self.s.watch_interval)
        await self.follow_training()
        await self.watcher.sync_once()  # now rather than at the watcher's next poll

    # -- chat --------------------------------------------------------------------------------------

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
        cut = f"{cut_note(self.s.config.model.max_new_tokens)} · " if out.result.cut else ""
        self.say(f"  [{cut}{'base model' if v is None else f'v{v}'} · "
                 f"{out.result.latency_ms:.0f} ms · {stored}]")


async def run_console(services: Services, guild: str | int, *, user: str = "you",
                      stdin: TextIO, out: TextIO, worker: Worker | None = None,
                      log_path: Path | None = None) -> int:
    """Run a console session on ``services`` until /quit or end of input."""
    return await Console(services, guild, user=user, out=out, worker=worker,
                         log_path=log_path).run(stdin)
