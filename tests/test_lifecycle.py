"""Lifecycle with real processes: the training worker dies with the bot that spawned it (SIGKILL
included), SIGTERM shuts the bot down cleanly, a stopped worker gives its run back, and the
retention job runs although training is off.

Every wait polls a condition up to a generous deadline; nothing asserts on durations.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import discord
import pytest
from discord.ext import commands

from guildtune.config import Config, load_config
from storage import Store, open_store
from storage.times import format_utc
from tests.fakes import TINY_TRAINER, import_pairs, make_services, write_config

ROOT = Path(__file__).resolve().parents[1]
G = 31
DEADLINE_S = 60.0

# A process that starts the worker exactly as `guildtune run` does, then waits to be killed.
SPAWNER = """
import logging, os, sys, threading
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
from guildtune.config import load_config
from bot.runner import spawn_worker
proc = spawn_worker(load_config(sys.argv[1]))
with open(sys.argv[2] + ".tmp", "w") as f:
    f.write(str(proc.pid))
os.replace(sys.argv[2] + ".tmp", sys.argv[2])
threading.Event().wait()
"""

# A process that starts the worker exactly as `guildtune console` does (its log to a file), and
# on Ctrl-C (KeyboardInterrupt) stops it as the console does, then exits.
CONSOLE = """
import asyncio, os, sys, threading
from guildtune.config import load_config
from bot.runner import spawn_worker, stop_worker
proc = spawn_worker(load_config(sys.argv[1]), log_file=sys.argv[3])
with open(sys.argv[2] + ".tmp", "w") as f:
    f.write(str(proc.pid))
os.replace(sys.argv[2] + ".tmp", sys.argv[2])
try:
    threading.Event().wait()
except KeyboardInterrupt:
    asyncio.run(stop_worker(proc))
"""

# `guildtune run`'s serve() with Discord left out: start() loads the extension as login() does
# (over a fake engine and the real store), then idles until the bot is closed.
SERVE = """
import asyncio, json, logging, os, sys
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
from bot import runner, services
from guildtune.config import load_config
from storage.store import Store
from tests.fakes import FakeEngine

cfg_path, pid_file, ready_file, result_file = sys.argv[1:5]
closed = []
real_close = Store.close
def close(self):
    closed.append(str(self.path))
    real_close(self)
Store.close = close

real_open = services.open_services
def open_(config, *, engine=None):
    return real_open(config, engine=FakeEngine())
services.open_services = open_

real_spawn = runner.spawn_worker
def spawn(cfg):
    proc = real_spawn(cfg)
    with open(pid_file + ".tmp", "w") as f:
        f.write(str(proc.pid))
    os.replace(pid_file + ".tmp", pid_file)
    return proc
runner.spawn_worker = spawn

async def start(self, token, *, reconnect=True):
    await self.setup_hook()
    open(ready_file, "w").close()
    while not self.is_closed():
        await asyncio.sleep(0.05)
runner.GuildTuneBot.start = start

asyncio.run(runner.serve(load_config(cfg_path)))
with open(result_file, "w") as f:
    json.dump({"stores_closed": closed}, f)
"""


# The tiny trainer on one thread, with a run long enough to be killed in the middle.
LONG_RUN = {"model": {"threads": 1}, "training": {"epochs": 400.0}}


def env(*, token: bool = False) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if k != "DISCORD_TOKEN"}
    if token:  # serve() refuses to start without one; SERVE's start() never sends it
        e["DISCORD_TOKEN"] = "fake.token.value"
    e["OMP_NUM_THREADS"] = "1"
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    return e


def wait_until(cond: Callable[[], object], what: str, log: Path | None = None,
               timeout: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.1)
    tail = log.read_text(errors="replace")[-3000:] if log is not None and log.exists() else ""
    raise AssertionError(f"{what}: not within {timeout:.0f} s\n{tail}")


def gone(pid: int) -> bool:
    """The process has exited (a zombie nobody reaped yet counts as exited)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] == "Z"
    except (FileNotFoundError, IndexError):
        return True


def read_pid(path: Path) -> int:
    wait_until(path.exists, f"{path.name} written")
    return int(path.read_text())


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test started; whatever is still running at the end is killed."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
            p.wait(30)


@pytest.fixture
def reap_pids() -> Iterator[list[int]]:
    """Pids of grandchildren (workers, training children): killed at the end if a failed test
    left them running, so no orphan outlives the test run."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        if not gone(pid):
            os.kill(pid, signal.SIGKILL)


def start(procs: list[subprocess.Popen[bytes]], argv: list[str], log: Path, *,
          token: bool = False) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        p = subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env(token=token),
                             stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    procs.append(p)
    return p


def queued_run(cfg_file: Path) -> tuple[Config, Store, int]:
    """A guild with enough data to train, and one queued run."""
    cfg = load_config(cfg_file, env={})
    store = open_store(cfg.db_path)
    import_pairs(store, G, 40)
    run_id, _ = store.enqueue_run(G, "manual")
    return cfg, store, run_id


def training_pid(store: Store, run_id: int, log: Path) -> int:
    """The pid of the training child once the run is claimed and the child reports."""
    def started() -> bool:
        run = store.get_run(run_id)
        return run is not None and run.status == "running" and bool((run.progress or {})
                                                                    .get("pid"))
    wait_until(started, "the worker claimed the run and its training child started", log,
               timeout=120)
    return int(store.get_run(run_id).progress["pid"])  # type: ignore[union-attr, index]


def assert_given_back(store: Store, run_id: int) -> None:
    """The run is not left 'running': closed, and the guild has it queued again."""
    run = store.get_run(run_id)
    assert run is not None and run.status != "running", run
    assert run.status == "failed" and "stopped" in (run.error or ""), run
    again = store.open_run(G)
    assert again is not None and again.status == "queued", again
    assert again.trigger == run.trigger and again.attempt == run.attempt


# -- the worker dies with the process that spawned it -------------------------------------------

def test_worker_dies_when_its_spawner_is_sigkilled(tmp_path: Path, procs, reap_pids) -> None:
    cfg_file = write_config(tmp_path, TINY_TRAINER, LONG_RUN)
    log = tmp_path / "spawner.log"
    spawner = start(procs, ["-c", SPAWNER, str(cfg_file), str(tmp_path / "worker.pid")], log)
    worker = read_pid(tmp_path / "worker.pid")
    reap_pids.append(worker)
    db = load_config(cfg_file, env={}).db_path
    wait_until(db.exists, "the worker started and opened the store", log)
    assert not gone(worker)

    spawner.kill()  # SIGKILL: no handler, no finally runs in the spawner
    spawner.wait(DEADLINE_S)
    wait_until(lambda: gone(worker), "the worker exited after its spawner was SIGKILLed", log)


def test_sigkill_of_the_spawner_ends_worker_and_training_child_and_gives_the_run_back(
        tmp_path: Path, procs, reap_pids) -> None:
    cfg_file = write_config(tmp_path, TINY_TRAINER, LONG_RUN)
    _, store, run_id = queued_run(cfg_file)
    log = tmp_path / "spawner.log"
    spawner = start(procs, ["-c", SPAWNER, str(cfg_file), str(tmp_path / "worker.pid")], log)
    worker = read_pid(tmp_path / "worker.pid")
    reap_pids.append(worker)
    child = training_pid(store, run_id, log)
    reap_pids.append(child)

    spawner.kill()
    spawner.wait(DEADLINE_S)
    wait_until(lambda: gone(worker), "the worker exited after its spawner was SIGKILLed", log)
    wait_until(lambda: gone(child), "the training child exited with its worker", log)
    assert_given_back(store, run_id)
    assert store.active_version(G) is None  # nothing published
    store.close()


def test_sigterm_of_the_worker_gives_its_run_back(tmp_path: Path, procs, reap_pids) -> None:
    cfg_file = write_config(tmp_path, TINY_TRAINER, LONG_RUN)
    _, store, run_id = queued_run(cfg_file)
    log = tmp_path / "worker.log"
    worker = start(procs, ["-m", "guildtune", "--config", str(cfg_file), "worker"], log)
    child = training_pid(store, run_id, log)
    reap_pids.append(child)

    worker.send_signal(signal.SIGTERM)
    assert worker.wait(DEADLINE_S) == 0, log.read_text(errors="replace")[-3000:]
    wait_until(lambda: gone(child), "the training child exited with its worker", log)
    assert_given_back(store, run_id)
    assert "SIGTERM: stopping the worker" in log.read_text(errors="replace")
    store.close()


def test_ctrl_c_at_the_consoles_terminal_reaches_only_the_console(tmp_path: Path, procs,
                                                                  reap_pids) -> None:
    """A terminal's Ctrl-C is SIGINT to its whole foreground process group: the console, its
    worker and the worker's training child. Only the console may take it; it stops the worker
    (SIGTERM), which gives the run back: no KeyboardInterrupt traceback in the worker's log."""
    cfg_file = write_config(tmp_path, TINY_TRAINER, LONG_RUN)
    _, store, run_id = queued_run(cfg_file)
    log, worker_log = tmp_path / "console.out", tmp_path / "console.log"
    with open(log, "ab") as out:  # a process group of its own, as a terminal's job is
        console = subprocess.Popen(
            [sys.executable, "-c", CONSOLE, str(cfg_file), str(tmp_path / "worker.pid"),
             str(worker_log)], cwd=ROOT, env=env(), stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT, process_group=0)
    procs.append(console)
    worker = read_pid(tmp_path / "worker.pid")
    reap_pids.append(worker)
    child = training_pid(store, run_id, worker_log)
    reap_pids.append(child)

    os.killpg(console.pid, signal.SIGINT)  # Ctrl-C
    assert console.wait(DEADLINE_S) == 0, log.read_text(errors="replace")[-3000:]
    wait_until(lambda: gone(worker), "the worker exited with the console", worker_log)
    wait_until(lambda: gone(child), "the training child exited with its worker", worker_log)
    text = worker_log.read_text(errors="replace")
    assert "SIGTERM: stopping the worker" in text, text[-3000:]
    assert "SIGINT" not in text and "KeyboardInterrupt" not in text, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    assert_given_back(store, run_id)
    store.close()


# -- guildtune run: SIGTERM is a clean shutdown ---------------------------------------------------

def test_sigterm_of_the_bot_closes_it_and_stops_the_worker(tmp_path: Path, procs,
                                                           reap_pids) -> None:
    cfg_file = write_config(tmp_path, TINY_TRAINER, LONG_RUN)
    log = tmp_path / "bot.log"
    files = [tmp_path / n for n in ("worker.pid", "ready", "result.json")]
    bot = start(procs, ["-c", SERVE, str(cfg_file), *map(str, files)], log, token=True)
    worker = read_pid(files[0])
    reap_pids.append(worker)
    wait_until(files[1].exists, "the bot loaded the extension", log)

    bot.send_signal(signal.SIGTERM)
    assert bot.wait(DEADLINE_S) == 0, log.read_text(errors="replace")[-3000:]
    wait_until(lambda: gone(worker), "the worker exited with the bot", log)
    text = log.read_text(errors="replace")
    assert "SIGTERM: shutting down" in text and "training worker stopped" in text
    result = json.loads(files[2].read_text())
    assert str(load_config(cfg_file, env={}).db_path) in result["stores_closed"]


# -- retention runs whatever the training switch says ---------------------------------------------

@pytest.fixture
def keep_modules() -> Iterator[None]:
    # unload_extension drops bot.* from sys.modules; restore them for later tests.
    saved = {k: v for k, v in sys.modules.items() if k == "bot" or k.startswith("bot.")}
    yield
    sys.modules.update(saved)


async def test_retention_job_runs_with_training_off(tmp_path: Path, keep_modules) -> None:
    from guildtune.schedule import JOB_PREFIX, RETENTION_JOB

    services = make_services(tmp_path)  # the default config: training off
    cfg, store = services.config, services.store
    assert not cfg.training.enabled and cfg.privacy.retention_days > 0
    store.grant_consent(G, 5)
    store.log_interaction(G, 2, 5, context=[], reply="old")
    old = format_utc(datetime.now(UTC) - timedelta(days=cfg.privacy.retention_days + 1))
    store.db.execute("UPDATE interactions SET created_utc = ?", [old])
    store.log_interaction(G, 2, 5, context=[], reply="new")

    host = commands.Bot(command_prefix="?", intents=discord.Intents.none())
    host.guildtune_services = services
    await host.load_extension("bot")
    sched = services.scheduler
    assert sched is not None and sched.running
    job = sched.get_job(RETENTION_JOB)
    assert job is not None, [j.id for j in sched.get_jobs()]
    assert not [j.id for j in sched.get_jobs() if j.id.startswith(JOB_PREFIX)]
    await asyncio.to_thread(job.func, *job.args)  # what the scheduler runs
    assert [r["reply"] for r in await asyncio.to_thread(store.rated_interactions, G)] == ["new"]
    await host.unload_extension("bot")
    assert not sched.running
    store.close()
