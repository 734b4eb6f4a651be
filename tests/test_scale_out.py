"""Past one machine: several processes share one store (a SQLite file on one host, a PostgreSQL
database across hosts). Each test runs on both backends (tests/conftest.py: ``backend``)."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from storage import open_store

pytestmark = pytest.mark.backends

SPAWN = mp.get_context("spawn")


def _claimer(url: str | Path, name: str, out: str, start: mp.synchronize.Barrier) -> None:
    """A worker's queue loop, without the training: claim, finish, until the queue is empty."""
    store = open_store(url, busy_timeout_ms=30000, write_retries=5)
    start.wait()  # every claimer connected: they now race for the same rows
    got = []
    while (run := store.claim_run(name, lease_seconds=600)) is not None:
        assert run.worker == name and run.status == "running"
        got.append(run.id)
        assert store.heartbeat(run.id, name, progress={"step": 1})
        assert store.finish_run(run.id, "succeeded", worker=name)
    store.close()
    Path(out).write_text(json.dumps(got))


def test_three_worker_processes_never_claim_the_same_run(store_url: Path | str,
                                                         tmp_path: Path) -> None:
    store = open_store(store_url)
    queued = [store.enqueue_run(g, "manual")[0] for g in range(1, 151)]
    names = ["host-a", "host-b", "host-c"]
    start = SPAWN.Barrier(len(names) + 1)
    procs = [SPAWN.Process(target=_claimer, args=(store_url, n, str(tmp_path / n), start))
             for n in names]
    for p in procs:
        p.start()
    start.wait()
    for p in procs:
        p.join(300)
        assert p.exitcode == 0
    claimed = {n: json.loads((tmp_path / n).read_text()) for n in names}
    everyone = [r for ids in claimed.values() for r in ids]
    assert sorted(everyone) == sorted(queued), "a run was claimed twice, or never"
    for n, ids in claimed.items():
        for r in ids:
            run = store.get_run(r)
            assert run.status == "succeeded" and run.worker == n
    store.close()


def _claim_then_die(url: str | Path, ready: str) -> None:
    store = open_store(url)
    run = store.claim_run("host-dead", lease_seconds=120)
    Path(ready).write_text(str(run.id))
    os.kill(os.getpid(), signal.SIGKILL)  # mid-run: no finish, no lease release


def test_a_killed_workers_run_is_recovered_and_taken_by_another_process(
        store_url: Path | str, tmp_path: Path) -> None:
    store = open_store(store_url)
    run_id, _ = store.enqueue_run(7, "manual")
    dead = SPAWN.Process(target=_claim_then_die, args=(store_url, str(tmp_path / "ready")))
    dead.start()
    dead.join(120)
    assert dead.exitcode == -signal.SIGKILL
    assert int((tmp_path / "ready").read_text()) == run_id
    assert store.get_run(run_id).status == "running"  # its lease still holds it
    assert store.claim_run("host-b") is None  # nobody takes a leased run
    later = datetime.now(UTC) + timedelta(seconds=121)
    assert store.recover_stale_runs(now=later) == [run_id]
    assert "host-dead" in store.get_run(run_id).error
    other = open_store(store_url)  # another process, another connection
    retry = other.claim_run("host-b")
    assert retry is not None and retry.id != run_id and retry.attempt == 2
    assert retry.guild_id == 7 and retry.worker == "host-b"
    other.close()
    store.close()
