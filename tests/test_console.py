"""The console front end scripted through stdin: chat, rate, retrain, see the new version."""

from __future__ import annotations

import asyncio
import io
import queue

from bot.console import Console, local_id
from tests.fakes import FakeEngine, make_services


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
    stdin = ScriptedStdin()
    stdin.feed("/rate +", "hello")
    stdin.close()
    assert await Console(s, "g", out=out).run(stdin) == 0
    text = out.getvalue()
    assert "No reply to rate yet" in text and "not logged" in text
    s.store.close()
