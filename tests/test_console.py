"""The console front end scripted through stdin: chat, rate, retrain, see the new version."""

from __future__ import annotations

import asyncio
import io
import queue
import signal
import sys
import threading
from pathlib import Path

import pytest

from bot.console import CLEAR_LINE, PROMPT, Console, ConsoleChannel, local_id
from bot.core import Core
from bot.services import open_services
from bot.terminal import render_markdown
from storage import open_store
from tests.fakes import (
    TINY,
    TINY_TRAINER,
    FakeEngine,
    import_pairs,
    make_config,
    make_services,
    run_cli,
    word_prefixes,
    write_config,
)


class ScriptedStdin:
    """A stdin whose lines the test feeds while the console runs (readline blocks)."""

    def __init__(self) -> None:
        self.q: queue.Queue[str] = queue.Queue()

    def feed(self, *lines: str) -> None:
        for line in lines:
            self.q.put(line + "\n")

    def close(self) -> None:
        self.q.put("")

    def readline(self) -> str:
        return self.q.get(timeout=10)


async def wait_for(out: io.StringIO, text: str, start: int = 0, timeout: float = 5.0) -> str:
    for _ in range(int(timeout / 0.02)):
        got = out.getvalue()[start:]
        if text in got:
            return got
        await asyncio.sleep(0.02)
    raise AssertionError(f"{text!r} not in console output:\n{out.getvalue()[start:]}")


async def scripted(console: Console, *lines: str) -> int:
    """Run ``console`` with ``lines`` as its whole input (then end of input); its exit code."""
    stdin = ScriptedStdin()
    stdin.feed(*lines)
    stdin.close()
    return await console.run(stdin)


async def test_console_chat_rate_retrain_and_new_version(tmp_path) -> None:
    engine = FakeEngine("hello human")
    s = make_services(tmp_path, engine=engine, training={"enabled": True})
    out = io.StringIO()
    stdin = ScriptedStdin()
    console = Console(s, "testers", out=out)
    task = asyncio.create_task(console.run(stdin))
    g = local_id("guild:testers")

    stdin.feed("/consent on", "hi bot")
    await wait_for(out, "[base model ·")
    assert "guildtune: hello human" in out.getvalue() and "· logged]" in out.getvalue()
    stdin.feed("/rate +")
    await wait_for(out, "rated 👍")
    assert s.store.guild_stats(g)["likes"] == 1

    stdin.feed("/tune retrain")
    await wait_for(out, "until an admin turns it on with `/tune training on`")
    mark = len(out.getvalue())
    stdin.feed("/tune training on", "/tune retrain")
    await wait_for(out, "queued as run #", mark)

    # The trainer (another process) publishes and activates a version through storage.
    run = s.store.claim_run("worker-1")
    s.store.register_version(g, 1, str(tmp_path / "v1"), base_model="tiny", lora={},
                             run_id=run.id, activate=True)
    s.store.finish_run(run.id, "succeeded", metrics={"candidate_loss": 1.5}, version=1)
    await wait_for(out, "[admin log] Now serving model v1.")

    mark = len(out.getvalue())
    stdin.feed("hi again")
    await wait_for(out, "[v1 ·", mark)
    stdin.feed("/tune status")
    got = await wait_for(out, "Next scheduled run", mark)
    assert "Active version: v1" in got and "#1 succeeded" in got
    assert "held-out loss: candidate 1.5000" in got

    stdin.feed("/forget", "yes")
    await wait_for(out, "stored items deleted", mark)
    assert s.store.guild_stats(g)["interactions"] == 0

    stdin.feed("/nonsense", "/quit")
    assert await asyncio.wait_for(task, 5) == 0
    assert "Unknown command /nonsense" in out.getvalue()
    assert not console.watcher.running
    # the conversation reached the engine as chat turns, with the persona on top
    assert engine.requests[-1].messages[0]["role"] == "system"
    assert engine.requests[-1].messages[-1]["content"] == "hi again"
    s.store.close()


async def test_console_ends_at_end_of_input(tmp_path) -> None:
    s = make_services(tmp_path)
    out = io.StringIO()
    assert await scripted(Console(s, "g", out=out), "/rate +", "hello") == 0
    text = out.getvalue()
    assert "No reply to rate yet" in text and "not logged" in text
    s.store.close()


# -- training: the bot's worker runs in the console -----------------------------------------------


@pytest.mark.slow
def test_console_trains_a_retrain_with_the_bots_worker_and_serves_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
        ) -> None:
    """``guildtune console`` starts the training worker the way ``guildtune run`` does: a
    retrain typed in the console trains, its progress and outcome show, the new version
    answers, and the worker stops with the console. ``/wait`` holds the script until then."""
    cfg_file = write_config(tmp_path, TINY_TRAINER, privacy={"retention_days": 0})
    data = tmp_path / "data"
    data.mkdir()
    store = open_store(data / "guildtune.db")
    import_pairs(store, 42)  # what `guildtune import --guild 42 --learn-from-humans` stores
    store.close()
    script = ["/consent on", "question 1?", "/rate +", "/suggest answer 1 ok", "/tune retrain",
              "/wait", "question 2?", "/quit"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(f"{x}\n" for x in script)))
    assert run_cli(cfg_file, "console", "--guild", "42", "--engine", "echo") == 0
    out, err = capfd.readouterr()
    assert err == ""  # the worker's log and library output went to the log file
    assert "Training: on; a worker trains this console's runs" in out
    assert "Retrain queued as run #1" in out
    assert "[training] run #1: " in out  # its progress, as the worker stores it
    done = out.index("[training] run #1 succeeded (manual")
    live = out.index("[admin log] Now serving model v1.")  # either first: it goes live, then
    assert max(done, live) < out.index(f"{PROMPT}question 2?") < out.index("[v1 · ")  # ends
    log = (data / "console.log").read_text()
    assert "starting training worker" in log and "training worker stopped" in log
    assert "run 1 (guild 42): succeeded" in log


async def test_console_says_the_operators_training_is_off_and_how_to_turn_it_on(
        tmp_path: Path) -> None:
    s = make_services(tmp_path)  # training.enabled = false, the default
    out = io.StringIO()
    assert await scripted(Console(s, "g", out=out), "/tune retrain") == 0
    lines = out.getvalue().splitlines()
    assert lines[1].startswith("Training: off. You are the operator here: set `enabled = "
                               "true` under [training]")
    retrain = next(x for x in lines if x.startswith("! "))
    assert "`training.enabled = false`" in retrain and "set `enabled = true`" in retrain
    assert s.store.runs(local_id("guild:g")) == []
    s.store.close()


async def test_console_tells_a_runs_progress_and_how_it_ended(tmp_path: Path) -> None:
    s = make_services(tmp_path, training={"enabled": True})
    out = io.StringIO()
    console = Console(s, "g", out=out)
    g = console.guild_id
    run_id, _ = s.store.enqueue_run(g, "manual")
    run = s.store.claim_run("w")
    s.store.heartbeat(run.id, "w", progress={"phase": "training", "step": 3, "total_steps": 9,
                                             "loss": 1.25})
    await console.follow_training()
    await console.follow_training()  # nothing new: nothing said
    s.store.finish_run(run_id, "rejected", metrics={"candidate_loss": 2.0, "base_loss": 1.5,
                                                    "gate": "no better than the base model"})
    await console.follow_training()
    when = s.store.get_run(run_id).finished_utc[:16].replace("T", " ")
    assert out.getvalue().splitlines() == [
        f"[training] run #{run_id}: training, step 3/9, loss 1.2500",
        (f"[training] run #{run_id} rejected (manual, {when} UTC); held-out loss: candidate "
         "2.0000 vs base 1.5000; gate: no better than the base model")]
    s.store.close()


class DeadWorker:
    def poll(self) -> int | None:
        return 3


async def test_console_says_when_its_worker_died_and_does_not_wait_for_it(
        tmp_path: Path) -> None:
    s = make_services(tmp_path, training={"enabled": True})
    out = io.StringIO()
    console = Console(s, "g", out=out, worker=DeadWorker(), log_path=tmp_path / "c.log")
    assert await scripted(console, "/tune training on", "/tune retrain", "/wait") == 0
    text = out.getvalue()
    assert f"Not waiting: the training worker stopped (exit code 3); its log: {tmp_path}" in text
    assert "[training] the training worker stopped (exit code 3)" in text
    s.store.close()


# -- the guild's id ------------------------------------------------------------------------------


async def test_console_shows_a_named_guilds_id(tmp_path: Path) -> None:
    s = make_services(tmp_path)
    out = io.StringIO()
    await scripted(Console(s, "mytest", out=out), "/tune status")
    g = local_id("guild:mytest")
    lines = out.getvalue().splitlines()
    assert f"guild 'mytest' (id {g})" in lines[0]
    assert f"Guild: guild 'mytest' (id {g})" in lines
    s.store.close()


async def test_console_guild_given_as_an_id_is_that_guild(tmp_path: Path) -> None:
    s = make_services(tmp_path, training={"enabled": True})
    import_pairs(s.store, 42, 5)  # as `guildtune import --guild 42` wrote it (training on)
    out = io.StringIO()
    console = Console(s, "42", out=out)
    await scripted(console, "/tune status", "/consent on")
    assert console.guild_id == 42 and "guild 42 · /help" in out.getvalue()
    assert "Training: on" in out.getvalue()  # guild 42's own switch, not a fresh guild's
    assert s.store.has_consent(42, console.user_id)
    s.store.close()


# -- what the terminal shows ---------------------------------------------------------------------


async def test_persona_without_text_shows_it_and_keeps_it(tmp_path: Path) -> None:
    s = make_services(tmp_path)
    out = io.StringIO()
    console = Console(s, "g", out=out)
    await scripted(console, "/tune persona Talk like a pirate.", "/tune persona")
    assert "This server's persona: “Talk like a pirate.”" in out.getvalue()
    assert s.store.guild_settings(console.guild_id).persona == "Talk like a pirate."
    s.store.close()


async def test_status_cuts_a_long_run_error_between_words(tmp_path: Path) -> None:
    from trainer.pipeline import _not_enough

    s = make_services(tmp_path, training={"enabled": True})
    console = Console(s, "g", out=io.StringIO())
    g = console.guild_id
    share_cap = _not_enough(g, {"n_train": 6, "n_heldout": 2, "unique": 20, "capped_out": 12},
                            s.config)
    for error in (str(share_cap), "word " * 100):
        run_id, _ = s.store.enqueue_run(g, "manual")
        s.store.claim_run("w")
        s.store.finish_run(run_id, "failed", metrics={"needed": 2}, error=error)
        last = next(x for x in (await console.core.status(g, chart=False)).lines()
                    if x.startswith("Last run: "))
        if error == str(share_cap):  # the reason and its config key, whole
            assert last.endswith(f"; {share_cap}")
        else:
            assert last.endswith("; " + "word " * 59 + "word…")
    s.store.close()


async def test_a_reply_cut_at_max_new_tokens_says_so(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, TINY, model={"max_new_tokens": 3, "temperature": 0.0})
    async with open_services(cfg) as s:  # the real tiny model: it never ends in 3 tokens
        out = io.StringIO()
        await scripted(Console(s, "g", out=out), "hello there")
    meta = [x for x in out.getvalue().splitlines() if x.startswith("  [")]
    assert meta and meta[0].startswith("  [… cut at model.max_new_tokens = 3 · base model")


async def test_the_console_marks_a_cut_reply_by_the_cogs_rule(tmp_path: Path) -> None:
    from bot.replies import mark_cut

    engine = FakeEngine("hello human")
    engine.cut = True
    s = make_services(tmp_path, engine=engine)
    out = io.StringIO()
    await scripted(Console(s, "g", out=out), "hello")
    lines = out.getvalue().splitlines()
    reply = next(x for x in lines if x.startswith("guildtune: "))
    assert reply == "guildtune: " + mark_cut("hello human")  # what a Discord member sees
    assert lines[lines.index(reply) + 1].startswith(
        f"  [… cut at model.max_new_tokens = {s.config.model.max_new_tokens} · base model")
    s.store.close()


async def test_a_new_versions_run_outcome_comes_before_its_swap(tmp_path: Path) -> None:
    """The trainer activates the version a moment before its worker records the run's end;
    the watcher may swap it in between: the console still tells the outcome first."""
    s = make_services(tmp_path, training={"enabled": True})
    out = io.StringIO()
    console = Console(s, "g", out=out)
    g = console.guild_id
    s.store.enqueue_run(g, "manual")
    run = s.store.claim_run("worker-1")
    s.store.register_version(g, 1, str(tmp_path / "v1"), base_model="tiny", lora={},
                             run_id=run.id, activate=True)
    await console.watcher.sync_once()  # swapped in while the run is still running
    await console.follow_training()
    assert "Now serving model v1" not in out.getvalue()
    s.store.finish_run(run.id, "succeeded", metrics={"candidate_loss": 1.5}, version=1)
    await console.follow_training()
    text = out.getvalue()
    assert f"[training] run #{run.id} succeeded" in text
    assert text.index(f"[training] run #{run.id} succeeded") < \
        text.index("[admin log] Now serving model v1.")
    s.store.close()


async def test_a_swap_no_running_run_published_is_told_at_once(tmp_path: Path) -> None:
    s = make_services(tmp_path)
    out = io.StringIO()
    console = Console(s, "g", out=out)
    g = console.guild_id
    s.store.register_version(g, 1, str(tmp_path / "v1"), base_model="tiny", lora={},
                             activate=True)
    await console.watcher.sync_once()  # no run of this console's guild is running
    assert "[admin log] Now serving model v1." in out.getvalue()
    s.store.close()


async def test_a_reply_that_ended_is_not_marked_cut(tmp_path: Path) -> None:
    s = make_services(tmp_path)
    out = io.StringIO()
    await scripted(Console(s, "g", out=out), "hello")
    assert "  [base model · " in out.getvalue() and "cut at" not in out.getvalue()
    s.store.close()


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class TerminalStdin(ScriptedStdin):
    """A terminal's stdin: a read waits for a line as long as it takes (no timeout);
    ``waiting`` is set while it does."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting = threading.Event()

    def isatty(self) -> bool:
        return True

    def readline(self) -> str:
        self.waiting.set()
        line = self.q.get()
        self.waiting.clear()
        return line


async def test_a_terminal_gets_a_prompt_and_lines_that_arrive_go_above_it(
        tmp_path: Path) -> None:
    s = make_services(tmp_path)
    out = Terminal()
    stdin = TerminalStdin()
    console = Console(s, "g", out=out)
    task = asyncio.create_task(console.run(stdin))
    await asyncio.to_thread(stdin.waiting.wait)
    assert out.getvalue().endswith("\n" + PROMPT)
    await console._notify(console.guild_id, "Now serving model v1.")
    assert out.getvalue().endswith(
        f"\n{PROMPT}{CLEAR_LINE}[admin log] Now serving model v1.\n{PROMPT}")
    stdin.feed("/quit")
    assert await task == 0
    s.store.close()


async def test_a_scripts_lines_are_echoed_after_the_prompt(tmp_path: Path) -> None:
    s = make_services(tmp_path)
    out = io.StringIO()
    await scripted(Console(s, "g", out=out), "hi bot", "/quit")
    lines = out.getvalue().splitlines()
    assert lines[lines.index(f"{PROMPT}hi bot") + 1] == "guildtune is typing…"
    s.store.close()


def test_ctrl_c_ends_the_console_at_once(tmp_path: Path) -> None:
    """Ctrl-C while the console waits for a line: asyncio.run ends without waiting for Enter
    (no executor thread of its own is left blocked in readline) and the session closes."""
    s = make_services(tmp_path)
    stdin = TerminalStdin()
    freed_by_watchdog = threading.Event()

    def watchdog() -> None:  # only if the exit waits for the read: unblock it, fail below
        freed_by_watchdog.set()
        stdin.close()

    timer = threading.Timer(60, watchdog)
    console = Console(s, "g", out=io.StringIO())

    async def main() -> None:
        task = asyncio.create_task(console.run(stdin))
        await asyncio.to_thread(stdin.waiting.wait)
        signal.raise_signal(signal.SIGINT)
        await task

    # A console process starts with Python's own SIGINT handler (asyncio.run turns it into a
    # cancel only then); an earlier test in this process may have left another one.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            asyncio.run(main())
    finally:
        signal.signal(signal.SIGINT, previous)
        timer.cancel()
        stdin.close()  # the abandoned read ends too
    assert not freed_by_watchdog.is_set()
    assert not console.watcher.running
    s.store.close()


def test_library_output_goes_to_the_log_file_not_the_chat(tmp_path: Path) -> None:
    """In a process of its own (a real stderr): log records, warnings, a library's own
    handler (transformers keeps one) and native writes to fd 2 go to the file; the chat
    (stdout) gets none of it, and stderr is the terminal again afterwards."""
    import subprocess

    code = f"""
import logging, os, sys, warnings
from bot.terminal import library_output_to
logging.basicConfig(level=logging.WARNING)  # as guildtune.cli.main sets it up
own = logging.getLogger("transformers")
own.addHandler(logging.StreamHandler(sys.stderr))
own.propagate = False
with library_output_to({str(tmp_path / "console.log")!r}):
    print("the chat")
    own.warning("a library's own handler")
    logging.getLogger("bot.watcher").info("guild 1: now serving adapter v1")
    warnings.warn("a deprecation", FutureWarning)
    os.write(2, b"a progress bar\\n")
    sys.stderr.write("to sys.stderr\\n")
logging.getLogger("after").error("the terminal again")
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1], check=False)
    assert res.returncode == 0, res.stderr
    assert res.stdout == "the chat\n"
    assert res.stderr == "ERROR:after:the terminal again\n"
    text = (tmp_path / "console.log").read_text()
    for line in ("a library's own handler", "now serving adapter v1", "a deprecation",
                 "a progress bar", "to sys.stderr"):
        assert line in text


def test_render_markdown_styles_discord_markup() -> None:
    assert render_markdown("**bold** and `x*y` and a ** b") == (
        "\x1b[0m\x1b[1mbold\x1b[0m and \x1b[0m\x1b[36mx*y\x1b[0m and a ** b")
    assert render_markdown("~~no~~ ||spoiler|| __u__ \\*lit\\*") == (
        "\x1b[0m\x1b[9mno\x1b[0m \x1b[0m\x1b[7mspoiler\x1b[0m \x1b[0m\x1b[4mu\x1b[0m *lit*")
    assert render_markdown("```py\na **b**\n```") == "\x1b[0m\x1b[36mpy\na **b**\n\x1b[0m"
    assert render_markdown("**open") == "\x1b[0m\x1b[1mopen\x1b[0m"  # ended by the line


def test_render_markdown_of_a_stream_grows_by_prefixes() -> None:
    text = "Use **bold**, `code` and ```\nblock **x**\n``` ~~old~~ a * b \\*"
    whole = render_markdown(text)
    for i in range(len(text) + 1):
        assert whole.startswith(render_markdown(text[:i], final=False)), text[:i]


async def test_a_terminal_streams_a_styled_reply(tmp_path: Path) -> None:
    engine = FakeEngine("it is **very** `fine`")
    s = make_services(tmp_path, engine=engine)
    out = Terminal()
    ch = ConsoleChannel(out, bot_id=1, styled=True)
    from bot.context import Turn

    await Core(s).chat(ch, guild_id=1, channel_id=2, user_id=3, request_message_id=4,
                       turns=[Turn("user", 3, 4, "hi", created_utc=ch.now_utc())])
    assert len(engine.streamed) == len(word_prefixes(engine.default))
    assert out.getvalue() == ("guildtune is typing…\nguildtune: "
                              + render_markdown("it is **very** `fine`") + "\n")
    assert ch.history[-1].text == "it is **very** `fine`"  # the text itself, unstyled
    s.store.close()
