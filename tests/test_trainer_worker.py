"""The queue side: the worker process (spawned training child, lease, SIGKILL recovery), the
operator's and guild's gates, and the scheduler that only enqueues."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import signal
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import ClassVar

import pytest

from guildtune.config import Config
from guildtune.policy import GUILD_OFF
from storage import open_store
from trainer.pipeline import OPERATOR_DISABLED, train_guild
from guildtune.schedule import enqueue_due, make_scheduler
from tests.fakes import TINY_TRAINER, import_pairs, make_config
from trainer.worker import run_worker

os.environ.setdefault("OMP_NUM_THREADS", "1")  # the spawned processes inherit it

G = 11


# A guild is due for training after 5 new examples (the default is 20): small queue tests.
FEW_NEW = {"training": {"min_new_examples": 5}}


def visible_versions(cfg: Config, guild: int) -> list[str]:
    return sorted(p.name for p in (cfg.adapters_dir / str(guild)).iterdir())


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:  # a zombie waiting for init to reap it is gone too
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] == "Z"
    except (FileNotFoundError, IndexError):
        return True


@pytest.mark.backends  # on PostgreSQL too: the worker of another host, sharing storage.url
def test_sigkilled_worker_publishes_nothing_and_its_run_is_recovered(
        tmp_path: Path, store_url: Path | str) -> None:
    cfg = make_config(tmp_path, TINY_TRAINER, FEW_NEW, storage={"url": str(store_url)})
    store = cfg.open_store()
    import_pairs(store, G)
    assert train_guild(store, cfg, G).status == "succeeded"
    assert visible_versions(cfg, G) == ["1"]

    # A run long enough to be killed mid-fit.
    slow = cfg.replace(training={"epochs": 400.0})
    run_id, _ = store.enqueue_run(G, "manual")
    worker = mp.get_context("spawn").Process(target=run_worker, args=(slow,),
                                             kwargs={"once": True, "worker_id": "w-killed"})
    worker.start()
    deadline = time.monotonic() + 120
    progress: dict = {}
    while time.monotonic() < deadline:
        progress = store.get_run(run_id).progress or {}
        if progress.get("step", 0) >= 2:
            break
        time.sleep(0.2)
    assert progress.get("step", 0) >= 2, "training never started"
    assert progress["total_steps"] > progress["step"] and "tokens_per_s" in progress
    os.kill(worker.pid, signal.SIGKILL)
    worker.join(10)
    child = progress["pid"]
    deadline = time.monotonic() + 15
    while not _gone(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _gone(child), "the training child outlived its worker"

    assert visible_versions(cfg, G) == ["1"]  # nothing partial, nothing new
    assert store.active_version(G).version == 1
    assert store.get_run(run_id).status == "running"  # until its lease runs out
    later = datetime.now(UTC) + timedelta(seconds=cfg.training.lease_seconds + 1)
    assert store.recover_stale_runs(now=later) == [run_id]
    failed = store.get_run(run_id)
    assert failed.status == "failed" and "w-killed" in failed.error
    retry = store.open_run(G)
    assert retry.status == "queued" and retry.attempt == 2

    # A healthy worker takes the retry; training runs in its own child process.
    assert run_worker(cfg, once=True, worker_id="w-ok") == 1
    done = store.get_run(retry.id)
    assert done.status in ("succeeded", "rejected"), done.error
    assert done.metrics["candidate_loss"] > 0 and done.progress["step"] >= 1
    assert store.active_version(G).version in (1, 2)
    store.close()


def test_operator_gate_fails_runs_fast(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, TINY_TRAINER, FEW_NEW, training={"enabled": False})
    store = open_store(cfg.db_path)
    import_pairs(store, G, 10)
    run_id, _ = store.enqueue_run(G, "manual", force=True)
    t = time.monotonic()
    assert run_worker(cfg, once=True) == 1
    assert time.monotonic() - t < 5
    run = store.get_run(run_id)
    assert run.status == "failed" and run.error == OPERATOR_DISABLED
    assert enqueue_due(store, cfg) == []  # and nothing is scheduled


def test_guild_gate_unless_forced(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, TINY_TRAINER, FEW_NEW)
    store = open_store(cfg.db_path)
    import_pairs(store, G, 10)
    store.update_guild_settings(G, training_enabled=False)
    run_id, _ = store.enqueue_run(G, "manual")
    run_worker(cfg, once=True)
    assert store.get_run(run_id).error == GUILD_OFF.format(guild_id=G)


def test_schedule_enqueues_only_when_enough_new_examples(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, TINY_TRAINER, FEW_NEW)
    store = open_store(cfg.db_path)
    import_pairs(store, 1, 20)  # on, 20 new examples
    import_pairs(store, 2, 20)
    store.update_guild_settings(2, training_enabled=False)  # off
    import_pairs(store, 3, 3)  # on, too few
    queued = enqueue_due(store, cfg)
    assert [store.get_run(r).guild_id for r in queued] == [1]
    assert store.get_run(queued[0]).trigger == "schedule"
    assert enqueue_due(store, cfg) == []  # one open run per guild

    store.update_guild_settings(3, schedule="*/5 * * * *")
    sched = make_scheduler(store, cfg, asyncio=False, background=True)
    jobs = {j.id: j for j in sched.get_jobs()}
    assert set(jobs) == {"guildtune-train-1", "guildtune-train-3", "guildtune-sync",
                         "guildtune-retention"}
    assert "*/5" in str(jobs["guildtune-train-3"].trigger)

    async def in_loop() -> int:
        s = make_scheduler(store, cfg)  # AsyncIOScheduler: started inside the running loop
        s.start()
        n = len(s.get_jobs())
        s.shutdown(wait=False)
        return n

    assert asyncio.run(in_loop()) == 4  # the three above + the daily retention job


def test_retention_runs_from_the_scheduler(tmp_path: Path) -> None:
    """privacy.retention_days is applied by a scheduler job (daily, and soon after start)."""
    from guildtune.schedule import RETENTION_JOB, purge_expired

    cfg = make_config(tmp_path, privacy={"retention_days": 30})
    store = open_store(cfg.db_path)
    store.grant_consent(1, 5)
    store.log_interaction(1, 2, 5, context=[], reply="old")
    store.db.execute("UPDATE interactions SET created_utc = ?",  # age the row by 40 days
                     [(datetime.now(UTC) - timedelta(days=40)).strftime("%Y-%m-%dT%H:%M:%S.000Z")])
    store.log_interaction(1, 2, 5, context=[], reply="new")
    sched = make_scheduler(store, cfg, asyncio=False, background=True)
    job = sched.get_job(RETENTION_JOB)
    assert job is not None
    # The job is the purge with this store and config, daily at 03:30 UTC.
    assert job.func is purge_expired
    assert job.args == (store, cfg) and job.kwargs == {}
    assert str(job.trigger) == "cron[hour='3', minute='30']"
    # Run it as APScheduler would: the old row goes, the new one stays.
    assert job.func(*job.args, **job.kwargs) == {"interactions": 1, "messages": 0}
    assert [r["reply"] for r in store.rated_interactions(1)] == ["new"]
    off = make_config(tmp_path, privacy={"retention_days": 0})
    # retention_days = 0 keeps all history, but the job still runs: it also deletes the files
    # of adapter versions withdrawn by a forget.
    job_off = make_scheduler(store, off, asyncio=False, background=True).get_job(RETENTION_JOB)
    assert job_off is not None and job_off.func is purge_expired
    assert job_off.args == (store, off) and job_off.kwargs == {}
    assert job_off.func(*job_off.args, **job_off.kwargs) == {}
    assert [r["reply"] for r in store.rated_interactions(1)] == ["new"]
    store.close()


def test_the_last_progress_is_stored_though_the_throttle_held_it_back(tmp_path: Path) -> None:
    """The heartbeat writes progress at most once a second; a run's last phase arrives right
    before it ends. Stopping the heartbeat writes what it held back."""
    from trainer.worker import Heartbeat

    store = open_store(tmp_path / "hb.db")
    store.enqueue_run(G, "manual")
    run = store.claim_run("w-hb", 60, guild_id=G)
    beat = Heartbeat(store, run.id, "w-hb", 60)
    beat.start()
    beat.update({"phase": "training", "step": 1})
    deadline = time.monotonic() + 60
    while (store.get_run(run.id).progress or {}).get("step") != 1:  # the first write landed
        assert time.monotonic() < deadline
        time.sleep(0.01)
    beat.update({"phase": "evaluating", "step": 3})  # within the second: held back
    beat.stop()
    assert store.get_run(run.id).progress == {"phase": "evaluating", "step": 3}
    store.close()


class _OwnedLock:
    """A lock that fails, rather than waits forever, when the thread holding it asks again."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.owner: int | None = None

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if self.owner == threading.get_ident():
            if not blocking:
                return False
            raise AssertionError("a signal handler waited for a lock its own thread holds")
        got = self._lock.acquire(blocking, timeout)
        if got:
            self.owner = threading.get_ident()
        return got

    def release(self) -> None:
        self.owner = None
        self._lock.release()

    def _is_owned(self) -> bool:  # what threading.Condition asks
        return self.owner == threading.get_ident()

    __enter__ = acquire

    def __exit__(self, *exc: object) -> None:
        self.release()


class _SecondSignalInside(threading.Event):
    """The worker's stop Event, with SIGTERM landing inside its ``set()`` while that holds
    the Event's lock (as when Ctrl-C reaches the worker and its parent's SIGTERM follows)."""

    made: ClassVar[list[_SecondSignalInside]] = []

    def __init__(self) -> None:
        super().__init__()
        self._cond = threading.Condition(_OwnedLock())
        self.nested = False
        _SecondSignalInside.made.append(self)

    def set(self) -> None:
        with self._cond:
            if not self.nested and threading.current_thread() is threading.main_thread():
                self.nested = True
                signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)
            self._flag = True
            self._cond.notify_all()


def test_a_second_signal_inside_the_first_handler_still_stops_the_worker(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGINT, then SIGTERM while the first is being handled: the worker stops (before, the
    second handler waited for the stop Event's lock that the first held: a hang until the
    parent killed it)."""
    import trainer.worker
    from trainer.worker import run_worker_process

    class Threading:  # trainer.worker's threading, with its stop Event replaced
        Event = _SecondSignalInside

        def __getattr__(self, name: str) -> object:
            return getattr(threading, name)

    cfg = make_config(tmp_path, TINY_TRAINER)
    store = open_store(cfg.db_path)
    monkeypatch.setattr(trainer.worker, "threading", Threading())

    def interrupt_when_running() -> None:
        while not any(t.name == "guildtune-worker" for t in threading.enumerate()):
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGINT)

    helper = threading.Thread(target=interrupt_when_running)
    helper.start()
    try:
        assert run_worker_process(cfg, store=store) == 0  # no run was queued
    finally:
        helper.join()
        for stop in _SecondSignalInside.made:  # a worker thread left running ends too
            stop._flag = True
        store.close()
    assert any(e.nested for e in _SecondSignalInside.made)


def test_a_worker_started_with_sigint_ignored_keeps_it_ignored(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker the bot or the console spawned ignores Ctrl-C (``cmd_worker``): its loop must
    not install a SIGINT handler over that, or its training children (which inherit an
    ignored signal, not a handler) would get Ctrl-C as a KeyboardInterrupt. SIGTERM still
    stops it."""
    import trainer.worker
    from trainer.worker import run_worker_process

    seen: dict[str, object] = {}

    def fake_run_worker(cfg: Config, **_: object) -> int:
        seen["int"] = signal.getsignal(signal.SIGINT)
        seen["term"] = signal.getsignal(signal.SIGTERM)
        return 0

    monkeypatch.setattr(trainer.worker, "run_worker", fake_run_worker)
    cfg = make_config(tmp_path, TINY_TRAINER)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        assert run_worker_process(cfg) == 0
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # and so it stays
    finally:
        signal.signal(signal.SIGINT, previous)
    assert seen["int"] is signal.SIG_IGN
    assert callable(seen["term"]) and seen["term"] is not signal.SIG_DFL
