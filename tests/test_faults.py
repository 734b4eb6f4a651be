"""Faults injected on purpose: a SIGKILLed logger, backup under writes and restore, a base model
that will not load, an out-of-memory fit, a full disk while publishing, adapter files deleted or
truncated under a running engine, and a database locked past the busy timeout during a chat.

Each test asserts the promise of issue 7: nothing acknowledged is lost, the database stays sound,
the active version keeps serving, errors are clear, and nothing crash-loops.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from guildtune.config import Config
from storage import Store, StoreError, check_backup, open_store, restore_backup, utc_now
from tests.fakes import (TINY, TINY_TRAINER, FakeEngine, RecordingChannel, import_pairs,
                         make_config, run_cli, write_config)

os.environ.setdefault("OMP_NUM_THREADS", "1")  # spawned children inherit it

ROOT = Path(__file__).resolve().parents[1]
G = 31

# A child that logs consented interactions as fast as it can and prints each id once the write
# has returned, i.e. once it is acknowledged (committed).
BURST_LOGGER = """
import sys
from storage import open_store, utc_now
store = open_store(sys.argv[1])
guild, batch = int(sys.argv[2]), int(sys.argv[3])
store.grant_consent(guild, 7)
print("ready", flush=True)
i = 0
while True:
    items = []
    for _ in range(batch):
        i += 1
        items.append(dict(guild_id=guild, channel_id=1, user_id=7, reply=f"reply {i}",
                          request_message_id=i,
                          context=[{"role": "user", "author_id": 7, "message_id": i,
                                    "text": f"message {i}", "created_utc": utc_now()}]))
    if batch == 1:
        store.log_interaction(**items[0])
    else:
        store.log_interactions(items)
    print(i, flush=True)
"""

# A child that takes the write lock and holds it until its stdin closes.
LOCK_HOLDER = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
sys.stdin.read()
conn.execute("ROLLBACK")
"""


def _child(script: str, *args: object) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", script, *map(str, args)], cwd=ROOT,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def _wait_line(proc: subprocess.Popen[str], want: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        if line.strip() == want:
            return
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"child never printed {want!r} (exit {proc.poll()})")


@contextlib.contextmanager
def locked_by_other_process(db: Path) -> Iterator[None]:
    """Another process holds the database's write lock inside the block."""
    holder = _child(LOCK_HOLDER, db)
    try:
        _wait_line(holder, "locked")
        yield
    finally:
        holder.stdin.close()  # type: ignore[union-attr]
        holder.wait(10)


def _integrity(db: Path) -> str:
    conn = sqlite3.connect(db)
    try:
        return conn.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        conn.close()


def _request_ids(store: Store, guild: int, user: int) -> list[int]:
    return [int(r["request_message_id"]) for r in store.export_user(user, guild)["interactions"]]


def _count(db: Path) -> int:
    conn = sqlite3.connect(db)
    try:
        return conn.execute("SELECT count(*) FROM interactions").fetchone()[0]
    finally:
        conn.close()


# -- the bot process killed mid-burst -----------------------------------------------------------

def test_sigkill_mid_burst_loses_no_acknowledged_interaction(tmp_path: Path) -> None:
    db = tmp_path / "guildtune.db"
    open_store(db).close()
    proc = _child(BURST_LOGGER, db, G, 1)
    _wait_line(proc, "ready")
    acked: list[int] = []
    while len(acked) < 300:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        assert line, f"logger died early (exit {proc.poll()})"
        acked.append(int(line))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    # The child kept writing while we stopped reading at 300: every acknowledgement it wrote
    # before the kill is still in the pipe. Read them all (EOF now that it is dead), so the
    # comparison below is against what was really acknowledged, not against when we looked.
    acked.extend(int(line) for line in proc.stdout.read().split())  # type: ignore[union-attr]
    proc.stdout.close()  # type: ignore[union-attr]

    assert _integrity(db) == "ok"
    store = open_store(db)  # the restart: recovery of the WAL, migrations are a no-op
    try:
        stored = _request_ids(store, G, 7)
        assert set(acked) <= set(stored), "an acknowledged interaction was lost"
        assert len(stored) == len(set(stored)), "an interaction was stored twice"
        # At most the one write in flight at the kill was committed but not acknowledged.
        assert len(stored) - len(acked) <= 1
        assert _integrity(db) == "ok"
    finally:
        store.close()


# -- backup and restore --------------------------------------------------------------------------

def test_backup_while_another_process_writes_is_consistent(tmp_path: Path) -> None:
    db = tmp_path / "guildtune.db"
    store = open_store(db)
    writer = _child(BURST_LOGGER, db, G, 5)  # transactions of 5 rows each
    try:
        _wait_line(writer, "ready")
        counts = []
        for k in range(3):
            for _ in range(20):  # let some batches commit between backups
                assert writer.stdout.readline()  # type: ignore[union-attr]
            dest = store.backup(tmp_path / f"b{k}.db")
            assert check_backup(dest) >= 1 and _integrity(dest) == "ok"
            n = _count(dest)
            # Only whole transactions: a copy that mixed two moments would cut a batch.
            assert n > 0 and n % 5 == 0, n
            assert not Path(str(dest) + "-wal").exists()  # self-contained
            counts.append(n)
        assert counts == sorted(counts) and counts[0] < counts[-1]
        assert writer.poll() is None, "the writer was blocked or died during the backups"
    finally:
        writer.kill()
        writer.wait(10)
        writer.stdout.close()  # type: ignore[union-attr]
        store.close()
    assert not list(tmp_path.glob(".*tmp*"))


def test_backup_while_another_thread_writes(tmp_path: Path) -> None:
    import threading

    store = open_store(tmp_path / "guildtune.db")
    store.grant_consent(G, 7)
    stop = threading.Event()

    def write() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            store.log_interactions([dict(guild_id=G, channel_id=1, user_id=7, context=[],
                                         reply="r", request_message_id=i * 10 + k)
                                    for k in range(3)])

    t = threading.Thread(target=write)
    t.start()
    try:
        time.sleep(0.2)
        dest = store.backup(tmp_path / "copy.db")
    finally:
        stop.set()
        t.join()
    n = _count(dest)
    assert n > 0 and n % 3 == 0 and _integrity(dest) == "ok"
    store.close()


@pytest.fixture
def cfg_file(tmp_path: Path) -> Path:
    """conftest's CLI config with a short busy timeout: a locked database fails fast."""
    return write_config(tmp_path, TINY, storage={"busy_timeout_ms": 300})


def test_backup_restore_round_trip_through_the_cli(cfg_file: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "data" / "guildtune.db"
    store = open_store(db)
    store.grant_consent(G, 7)
    for i in range(5):
        store.log_interaction(G, 1, 7, context=[], reply="before", request_message_id=i)
    assert run_cli(cfg_file, "backup", str(tmp_path / "snap.db")) == 0
    assert "integrity ok" in capsys.readouterr().out
    for i in range(5, 8):
        store.log_interaction(G, 1, 7, context=[], reply="after", request_message_id=i)
    store.close()  # the bot is stopped before a restore
    # A leftover -wal of the old database must not be replayed into the restored one.
    other = open_store(db)
    other.log_interaction(G, 1, 7, context=[], reply="in wal", request_message_id=99)
    idle = sqlite3.connect(db)  # an idle reader keeps -wal/-shm on disk
    idle.execute("SELECT 1").fetchone()

    assert run_cli(cfg_file, "restore", str(tmp_path / "snap.db")) == 0
    out = capsys.readouterr().out
    assert "before-restore" in out
    idle.close()
    other.close()
    kept = db.with_name(db.name + ".before-restore")
    restored = open_store(db)
    try:
        assert sorted(_request_ids(restored, G, 7)) == [0, 1, 2, 3, 4]
        assert _integrity(db) == "ok"
    finally:
        restored.close()
    assert _count(kept) == 9  # the replaced database, its WAL folded in, is whole
    assert _integrity(kept) == "ok"


def test_restore_refuses_a_non_database_with_one_line(cfg_file: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "data" / "guildtune.db"
    store = open_store(db)
    store.grant_consent(G, 7)
    store.close()
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database\n" * 100)
    plain = tmp_path / "plain.db"
    conn = sqlite3.connect(plain)
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    conn.close()
    for bad, needle in ((junk, "not a guildtune database"), (plain, "not a guildtune database"),
                        (tmp_path / "missing.db", "not a file")):
        assert run_cli(cfg_file, "restore", str(bad)) == 1
        err = capsys.readouterr().err.strip()
        assert needle in err and "\n" not in err and err.startswith("guildtune: error:"), err
    assert not db.with_name(db.name + ".before-restore").exists()
    again = open_store(db)
    assert again.has_consent(G, 7)  # the live database is untouched
    again.close()


def test_restore_refused_while_a_process_holds_the_database(cfg_file: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str],
                                                            ) -> None:
    db = tmp_path / "data" / "guildtune.db"
    store = open_store(db)
    store.backup(tmp_path / "snap.db")
    store.close()
    with locked_by_other_process(db):
        assert run_cli(cfg_file, "restore", str(tmp_path / "snap.db")) == 1
    err = capsys.readouterr().err.strip()
    assert "locked by a running bot or worker" in err and "\n" not in err
    assert not db.with_name(db.name + ".before-restore").exists()
    assert not list(db.parent.glob(".*restore*"))
    assert restore_backup(tmp_path / "snap.db", db) is not None  # fine once it is released


def test_backup_refuses_the_live_file(tmp_path: Path) -> None:
    store = open_store(tmp_path / "guildtune.db")
    with pytest.raises(StoreError, match="live database"):
        store.backup(tmp_path / "guildtune.db")
    store.close()


# -- the trainer: model load, out of memory, full disk ------------------------------------------

@pytest.fixture
def trained(tmp_path: Path) -> Iterator[tuple[Config, Store]]:
    """A guild with data and an active, published version 1."""
    import torch

    from trainer.pipeline import train_guild

    torch.set_num_threads(1)
    cfg = make_config(tmp_path, TINY_TRAINER, storage={"data_dir": str(tmp_path / "data")},
                      model={"threads": 1})
    store = open_store(cfg.db_path)
    import_pairs(store, G, 60)
    assert train_guild(store, cfg, G, force=True).status == "succeeded"
    assert store.active_version(G).version == 1
    yield cfg, store
    store.close()


def _visible(cfg: Config, guild: int) -> list[str]:
    return sorted(p.name for p in (cfg.adapters_dir / str(guild)).iterdir())


def _assert_v1_still_serves(cfg: Config, store: Store) -> None:
    from guildtune.adapter_dir import validate_adapter_dir
    from guildtune.models import TINY_BASE_ID

    active = store.active_version(G)
    assert active is not None and active.version == 1
    validate_adapter_dir(active.path, guild_id=G, version=1, base_id=TINY_BASE_ID,
                         lora_shape=cfg.lora.shape())
    assert _visible(cfg, G) == ["1"]  # nothing partial, nothing new
    assert [v.version for v in store.versions(G)] == [1]


def _next_run_succeeds(cfg: Config, store: Store) -> None:
    from trainer.worker import run_worker

    run_id, created = store.enqueue_run(G, "schedule", force=True)
    assert created
    assert run_worker(cfg, once=True, isolate=False, store=store, worker_id="w-next") == 1
    run = store.get_run(run_id)
    assert run.status == "succeeded", run.error
    assert store.active_version(G).version == 2


def test_base_model_that_fails_to_load_fails_the_run_and_the_next_one_runs(
        trained: tuple[Config, Store], tmp_path: Path) -> None:
    from trainer.worker import run_worker

    cfg, store = trained
    broken = cfg.replace(model={"name": str(tmp_path / "no-such-model-dir")})
    run_id, _ = store.enqueue_run(G, "schedule", force=True)
    # The real path: a spawned training child that cannot load its base model.
    assert run_worker(broken, once=True, worker_id="w-broken") == 1
    run = store.get_run(run_id)
    assert run.status == "failed"
    assert "model.name: no such folder" in run.error and "no-such-model-dir" in run.error, \
        run.error
    assert "\n" not in run.error
    _assert_v1_still_serves(cfg, store)
    _next_run_succeeds(cfg, store)


def test_out_of_memory_in_the_fit_fails_the_run_and_the_next_one_runs(
        trained: tuple[Config, Store], monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from trainer.worker import execute_run

    cfg, store = trained

    def oom(*args: Any, **kwargs: Any) -> Any:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr("trainer.fit.fit", oom)
    run_id, _ = store.enqueue_run(G, "schedule", force=True)
    run = store.claim_run("w-oom", cfg.training.lease_seconds)
    assert execute_run(store, cfg, run, "w-oom", isolate=False) == "failed"
    failed = store.get_run(run_id)
    assert failed.status == "failed" and "out of memory" in failed.error.lower(), failed.error
    _assert_v1_still_serves(cfg, store)
    monkeypatch.undo()
    _next_run_succeeds(cfg, store)


def test_full_disk_while_publishing_leaves_no_partial_version(
        trained: tuple[Config, Store], monkeypatch: pytest.MonkeyPatch) -> None:
    from trainer import publish
    from trainer.worker import execute_run

    cfg, store = trained
    seen: list[Path] = []

    def disk_full(root: Path) -> None:
        # The adapter files are in the temp dir by now; the disk fills as they are flushed.
        seen.append(root)
        assert any(root.iterdir())
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(root))

    monkeypatch.setattr(publish, "_fsync_tree", disk_full)
    before = store.next_version(G)
    run_id, _ = store.enqueue_run(G, "schedule", force=True)
    run = store.claim_run("w-full", cfg.training.lease_seconds)
    assert execute_run(store, cfg, run, "w-full", isolate=False) == "failed"
    failed = store.get_run(run_id)
    assert failed.status == "failed" and "No space left on device" in failed.error, failed.error
    assert seen and not seen[0].exists()  # the temp dir is gone
    assert store.next_version(G) == before
    _assert_v1_still_serves(cfg, store)
    monkeypatch.undo()
    _next_run_succeeds(cfg, store)


def test_training_child_killed_like_the_oom_killer_fails_the_run_worker_survives(
        trained: tuple[Config, Store]) -> None:
    """The worker's own tests SIGKILL the worker; here the kernel kills the training child
    (what its out-of-memory killer does): the worker survives, names the cause, goes on."""
    import threading

    from trainer.worker import execute_run

    cfg, store = trained
    slow = cfg.replace(training={"epochs": 400.0})
    run_id, _ = store.enqueue_run(G, "schedule", force=True)
    run = store.claim_run("w-oomkill", cfg.training.lease_seconds)
    result: list[str] = []
    t = threading.Thread(target=lambda: result.append(
        execute_run(store, slow, run, "w-oomkill", isolate=True)))
    t.start()
    deadline = time.monotonic() + 120
    pid = None
    while time.monotonic() < deadline and pid is None:
        prog = store.get_run(run_id).progress or {}
        pid = prog.get("pid") if prog.get("step", 0) >= 1 else None
        time.sleep(0.2)
    assert pid, "training never started"
    os.kill(pid, signal.SIGKILL)
    t.join(60)
    assert result == ["failed"]
    failed = store.get_run(run_id)
    assert "killed by SIGKILL" in failed.error and "out of memory" in failed.error, failed.error
    _assert_v1_still_serves(cfg, store)
    _next_run_succeeds(cfg, store)


# -- the engine and the watcher: files deleted or truncated under a running bot -----------------

@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[Any, Any, Store]]:
    """A LocalEngine on the tiny model (one resident adapter at most), a store and a watcher."""
    import torch

    from bot.engine import LocalEngine
    from bot.handlers import AdapterWatcher
    from bot.services import Services
    from guildtune.config import ModelConfig
    from guildtune.models import load_model
    from tests.helpers_adapters import TINY_LORA

    torch.set_num_threads(1)
    mcfg = ModelConfig(name="tiny", device="cpu", dtype="float32", max_new_tokens=6,
                       temperature=0.0, repetition_penalty=1.0, max_context_tokens=128,
                       max_batch_size=4, batch_wait_ms=5, max_resident_adapters=1)
    engine = LocalEngine(load_model("tiny", device="cpu", dtype="float32"), mcfg, TINY_LORA)
    await engine.start()
    store = open_store(tmp_path / "guildtune.db")
    cfg = make_config(tmp_path)
    watcher = AdapterWatcher(Services(config=cfg, store=store, engine=engine), interval=0.05)
    yield engine, watcher, store
    await watcher.stop()
    await engine.close()
    store.close()


def _register(store: Store, guild: int, version: int, path: Path) -> None:
    from guildtune.models import TINY_BASE_ID
    from tests.helpers_adapters import TINY_LORA

    store.register_version(guild, version, str(path), base_model=TINY_BASE_ID,
                           lora=TINY_LORA.shape(), activate=True)


def _req(guild: int | None) -> Any:
    from bot.engine import GenerationRequest

    return GenerationRequest(guild, [{"role": "system", "content": "you are a bot"},
                                     {"role": "user", "content": "hello there, how are you"}])


async def test_version_dir_deleted_under_a_running_engine(served, tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    from tests.helpers_adapters import AdapterFactory

    engine, watcher, store = served
    factory = AdapterFactory(tmp_path / "adapters")
    a, b = G, G + 1
    _register(store, a, 1, factory.make(a, 1))
    _register(store, b, 1, factory.make(b, 1))
    base = (await engine.generate(_req(None))).text
    assert len(await watcher.sync_once()) == 2
    with_a = await engine.generate(_req(a))
    assert with_a.adapter_version == 1 and with_a.text != base

    shutil.rmtree(tmp_path / "adapters" / str(a) / "1")
    # Resident weights keep serving although the files are gone.
    assert (await engine.generate(_req(a))).text == with_a.text
    # Evicted by the other guild (one resident slot), a reload fails: the base model answers.
    assert (await engine.generate(_req(b))).adapter_version == 1
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        for _ in range(5):
            res = await engine.generate(_req(a))
            assert (res.text, res.adapter_version) == (base, None)
            assert (await engine.generate(_req(b))).adapter_version == 1
        watcher.start()
        await asyncio.sleep(0.5)  # ~10 polls
        assert watcher.running
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    # One reload error and one refused re-activation, not one per request or per poll.
    assert 1 <= len(errors) <= 2, [r.getMessage() for r in errors]
    assert all(str(a) in r.getMessage() for r in errors)
    assert engine.resident_guilds() == [b]  # guild b was not evicted over and over


async def test_truncated_new_version_keeps_the_previous_one_serving(
        served, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from tests.helpers_adapters import AdapterFactory

    engine, watcher, store = served
    factory = AdapterFactory(tmp_path / "adapters")
    _register(store, G, 1, factory.make(G, 1))
    await watcher.sync_once()
    before = await engine.generate(_req(G))
    bad = factory.make(G, 2)
    f = bad / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    _register(store, G, 2, bad)
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        lines = await watcher.sync_once()
        assert len(lines) == 1 and "could not be loaded" in lines[0] and "truncated" in lines[0]
        for _ in range(3):  # the same broken version is not retried on every poll
            assert await watcher.sync_once() == []
    assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) == 1
    after = await engine.generate(_req(G))
    assert (after.text, after.adapter_version) == (before.text, 1)


# -- the database locked past the busy timeout during a chat ------------------------------------

async def _chat_while_locked(tmp_path: Path) -> tuple[RecordingChannel, Any, BaseException | None]:
    """Core.chat for a consented member while another process holds the write lock longer
    than the busy timeout and retries. Returns (channel, outcome, what chat raised)."""
    from bot.handlers import Core, Turn
    from bot.services import Services

    db = tmp_path / "guildtune.db"
    store = open_store(db, busy_timeout_ms=100, write_retries=1)
    store.grant_consent(G, 7)
    cfg = make_config(tmp_path)
    core = Core(Services(config=cfg, store=store, engine=FakeEngine("the reply")))
    channel = RecordingChannel()
    outcome: Any = None
    raised: BaseException | None = None
    try:
        with locked_by_other_process(db):
            try:
                outcome = await core.chat(channel, guild_id=G, channel_id=1, user_id=7,
                                          request_message_id=5,
                                          turns=[Turn("user", 7, 5, "hi", created_utc=utc_now())])
            except Exception as exc:  # noqa: BLE001 - judged by the callers
                raised = exc
        assert _integrity(db) == "ok"
        assert store.interaction_for_message(G, 5) is None  # nothing half-written
    finally:
        store.close()
    return channel, outcome, raised


async def test_locked_database_during_chat_the_reply_still_goes_out(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    channel, outcome, raised = await _chat_while_locked(tmp_path)
    assert channel.parts == ["the reply"]  # the member got the answer before logging was tried
    # Nothing raised after the reply went out; the store's clear busy error is the reason the
    # outcome gives, and the one warning logged, on one line.
    assert raised is None, f"{type(raised).__name__}: {raised}"
    assert outcome.not_stored == "the database is locked by another process"
    warnings = [r.getMessage() for r in caplog.records if "not logged" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "is locked by another process" in warnings[0] and "\n" not in warnings[0]


async def test_locked_database_during_chat_returns_unlogged_outcome(tmp_path: Path) -> None:
    channel, outcome, raised = await _chat_while_locked(tmp_path)
    assert raised is None, f"{type(raised).__name__}: {raised}"
    assert channel.parts == ["the reply"] and outcome is not None and not outcome.logged
