"""Storage benchmark, on SQLite and PostgreSQL: interactions logged per second (one transaction
each vs batched), training runs claimed and finished per second (one worker, then two worker
processes racing), and ``forget_user`` for a member with 100k rows in a guild of 1M rows, against
a bare DELETE of the same member's interactions as the baseline.

    .venv/bin/python bench/storage_bench.py [--backend sqlite|postgresql|both]
        [--rows 1000000] [--user-rows 100000] [--log 5000] [--runs 1000]

PostgreSQL runs on a private server started here (bench/pg_server.py: fsync,
synchronous_commit and full_page_writes on), measured twice: synchronous_commit on (durable
commits) and off (the closer match to SQLite's WAL + synchronous=NORMAL). Every PostgreSQL number
is also given as a ratio to SQLite's in the same run. Prints tables and writes
bench/results/storage.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from storage import Store, open_store, utc_now  # noqa: E402
from storage.ids import new_ulid  # noqa: E402

G = 1
USER = 424242
RESULTS = Path(__file__).with_name("results")
SPAWN = mp.get_context("spawn")
COLUMNS = ("id", "guild_id", "channel_id", "user_id", "request_message_id", "reply_message_id",
           "context_json", "reply", "created_utc", "updated_utc")


@dataclass
class Backend:
    """Where a measurement's stores live: ``new(name)`` gives a fresh, empty target (a SQLite
    path or a PostgreSQL URL); ``copy(src, name)`` one holding what ``src`` holds (its stores
    closed)."""

    label: str
    new: Callable[[str], str | Path]
    copy: Callable[[str | Path, str], str | Path]
    settings: dict[str, Any]


def sqlite_backend(tmp: Path) -> Backend:
    def copy(src: str | Path, name: str) -> Path:
        dest = tmp / f"{name}.db"
        shutil.copyfile(src, dest)  # closed: the WAL is folded in and removed
        return dest

    return Backend("sqlite", lambda name: tmp / f"{name}.db", copy,
                   {"journal_mode": "wal", "synchronous": "NORMAL (storage/db.py)"})


def postgres_backend(server: Any, synchronous_commit: str) -> Backend:
    from bench.pg_server import new_database, settings_of

    label = "postgresql" if synchronous_commit == "on" else "postgresql-async"

    def new(name: str) -> str:
        return new_database(server, f"{name}_{label.replace('-', '_')}", synchronous_commit)

    def copy(src: str | Path, name: str) -> str:
        template = str(src).split("?")[0].rsplit("/", 1)[1]
        return new_database(server, f"{name}_{label.replace('-', '_')}", synchronous_commit,
                            template=template)

    probe = new("probe")
    return Backend(label, new, copy, settings_of(probe))


def _count(store: Store, table: str) -> int:
    return int(store.db.execute(f"SELECT count(*) FROM {table}").fetchone()[0])


# -- logging -----------------------------------------------------------------------------------

def bench_logging(backend: Backend, n: int) -> dict[str, float]:
    store = open_store(backend.new("log"))
    store.grant_consent(G, USER)
    items = [dict(guild_id=G, channel_id=5, user_id=USER, request_message_id=i,
                  reply_message_id=10**9 + i, reply="a reply of ordinary length, twenty words",
                  context=[{"role": "user", "author_id": USER, "message_id": i,
                            "text": "hello bot, what do you think about this?",
                            "created_utc": utc_now()}])
             for i in range(n)]
    t = time.perf_counter()
    for item in items:
        store.log_interaction(**item)
    single = n / (time.perf_counter() - t)
    t = time.perf_counter()
    for k in range(0, n, 500):
        store.log_interactions(items[k:k + 500])
    batched = n / (time.perf_counter() - t)
    assert _count(store, "interactions") == 2 * n
    store.close()
    return {"single_rows_per_s": single, "batched_rows_per_s": batched,
            "batched_vs_single": batched / single}


# -- the run queue -----------------------------------------------------------------------------

def _claimer(target: str | Path, name: str, out: str, start: Any) -> None:
    """A worker's queue loop without the training: claim, finish, until the queue is empty."""
    store = open_store(target, busy_timeout_ms=30000, write_retries=5)
    start.wait()  # every claimer connected: they now race for the same rows
    got = []
    t0 = time.monotonic()  # CLOCK_MONOTONIC: one clock for every process of the machine
    while (run := store.claim_run(name, lease_seconds=600)) is not None:
        got.append(run.id)
        store.finish_run(run.id, "succeeded", worker=name)
    t1 = time.monotonic()
    store.close()
    Path(out).write_text(json.dumps({"ids": got, "start": t0, "end": t1}))


def _enqueue(store: Store, n: int, first_guild: int) -> tuple[list[int], float]:
    t = time.perf_counter()
    ids = [store.enqueue_run(first_guild + g, "bench")[0] for g in range(n)]  # one a guild
    return ids, n / (time.perf_counter() - t)


def bench_claims(backend: Backend, n: int, tmp: Path, processes: int = 2) -> dict[str, Any]:
    """Enqueue ``n`` runs, then claim_run + finish_run them in one process; enqueue ``n`` more
    and let ``processes`` worker processes race for them."""
    target = backend.new("claims")
    store = open_store(target)
    queued, enqueue_per_s = _enqueue(store, n, 1)
    t = time.perf_counter()
    done = 0
    while (run := store.claim_run("solo", lease_seconds=600)) is not None:
        store.finish_run(run.id, "succeeded", worker="solo")
        done += 1
    single = done / (time.perf_counter() - t)
    assert done == n

    queued, _ = _enqueue(store, n, 1 + n)
    names = [f"worker-{k}" for k in range(processes)]
    start = SPAWN.Barrier(processes + 1)
    outs = {name: tmp / f"{backend.label}-{name}.json" for name in names}
    procs = [SPAWN.Process(target=_claimer, args=(target, name, str(outs[name]), start))
             for name in names]
    for p in procs:
        p.start()
    start.wait()
    for p in procs:
        p.join(600)
    if any(p.exitcode != 0 for p in procs):
        raise RuntimeError(f"a claimer failed: exit codes {[p.exitcode for p in procs]}")
    reports = {name: json.loads(outs[name].read_text()) for name in names}
    claimed = {name: r["ids"] for name, r in reports.items()}
    # From the first claim to the last finish (not process start-up and exit).
    wall = (max(r["end"] for r in reports.values()) -
            min(r["start"] for r in reports.values()))
    everyone = [r for ids in claimed.values() for r in ids]
    # A double claim: one run in two workers' lists, or a run whose row names another worker.
    wrong_worker = sum(1 for name, ids in claimed.items() for r in ids
                       if store.get_run(r).worker != name)
    double = len(everyone) - len(set(everyone))
    never = len(set(queued) - set(everyone))
    store.close()
    return {"enqueue_runs_per_s": enqueue_per_s, "single_runs_per_s": single,
            "concurrent_runs_per_s": n / wall, "concurrent_processes": processes,
            "concurrent_vs_single": (n / wall) / single,
            "claimed_per_process": {k: len(v) for k, v in claimed.items()},
            "double_claims": double + wrong_worker, "never_claimed": never}


# -- forget ------------------------------------------------------------------------------------

def _rows(rows: int, user_rows: int) -> Iterator[tuple[Any, ...]]:
    """A guild of ``rows`` interactions, ``user_rows`` of them by USER."""
    rng = random.Random(0)
    now = utc_now()
    mine = set(rng.sample(range(rows), user_rows))
    for i in range(rows):
        author = USER if i in mine else 1000 + i % 5000
        yield (new_ulid(), G, 5, author, i, 10**9 + i, _context(author, i), "reply", now, now)


def _context(author: int, i: int) -> str:
    return json.dumps([{"role": "user", "author_id": str(author), "message_id": str(i),
                        "text": f"message {i} with a little text to make it realistic"}])


def _fill(store: Store, rows: int, user_rows: int) -> None:
    """Bulk-load the guild straight through the driver (setup, not a verb under test): one
    executemany transaction on SQLite, COPY on PostgreSQL; then the member's consent."""
    if store.backend == "postgresql":
        raw = store.db.raw
        copy_sql = f"COPY interactions ({', '.join(COLUMNS)}) FROM STDIN"
        with raw.transaction(), raw.cursor() as cur, cur.copy(copy_sql) as copy:
            for row in _rows(rows, user_rows):
                copy.write_row(row)
        # What autovacuum would do after a bulk load: planner statistics, visibility map.
        raw.execute("VACUUM ANALYZE interactions")
    else:
        conn = store.db.conn
        conn.execute("BEGIN")
        insert = (f"INSERT INTO interactions ({', '.join(COLUMNS)}) VALUES "
                  f"({', '.join('?' * len(COLUMNS))})")
        batch: list[tuple[Any, ...]] = []
        for row in _rows(rows, user_rows):
            batch.append(row)
            if len(batch) == 10000:
                conn.executemany(insert, batch)
                batch.clear()
        conn.executemany(insert, batch)
        conn.execute("COMMIT")
    store.grant_consent(G, USER)


def fill_forget_source(backend: Backend, rows: int, user_rows: int) -> tuple[str | Path, float]:
    """A store holding the 1M-row guild, closed; the measured stores are copies of it."""
    target = backend.new("forget_src")
    store = open_store(target)
    t = time.perf_counter()
    _fill(store, rows, user_rows)
    seconds = time.perf_counter() - t
    store.close()
    return target, seconds


def bench_forget(backend: Backend, source: str | Path, user_rows: int) -> dict[str, float]:
    out: dict[str, float] = {}
    for label in ("baseline", "forget"):
        t = time.perf_counter()
        target = backend.copy(source, label)
        out[f"copy_{label}_s"] = time.perf_counter() - t
        store = open_store(target)
        t = time.perf_counter()
        if label == "baseline":
            with store._transaction(store.db):  # BEGIN [IMMEDIATE] ... COMMIT, as a verb's
                store.db.execute("DELETE FROM interactions WHERE guild_id = ? AND user_id = ?",
                                 [G, USER])
        else:
            report = store.forget_user(USER, G)
            assert report.deleted["interactions"] == user_rows
        out[f"{label}_s"] = time.perf_counter() - t
        assert store.db.execute("SELECT count(*) FROM interactions WHERE user_id = ?",
                                [USER]).fetchone()[0] == 0
        store.close()
    out["forget_vs_bare_delete"] = out["forget_s"] / out["baseline_s"]
    return out


# -- report ------------------------------------------------------------------------------------

MEASURES = [  # (section, key, label, unit, higher is better)
    ("logging", "single_rows_per_s", "log_interaction, one transaction each", "rows/s", True),
    ("logging", "batched_rows_per_s", "log_interactions, 500 per transaction", "rows/s", True),
    ("claims", "enqueue_runs_per_s", "enqueue_run", "runs/s", True),
    ("claims", "single_runs_per_s", "claim_run + finish_run, 1 process", "runs/s", True),
    ("claims", "concurrent_runs_per_s", "claim_run + finish_run, 2 processes", "runs/s", True),
    ("forget", "baseline_s", "bare DELETE of 100k of 1M rows", "s", False),
    ("forget", "forget_s", "forget_user of that member", "s", False),
]


def ratios(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Each PostgreSQL value over SQLite's (speed for rates: > 1 is PostgreSQL faster; for
    seconds, time over time: > 1 is PostgreSQL slower)."""
    base = results.get("sqlite")
    out: dict[str, dict[str, float]] = {}
    if base is None:
        return out
    for label, r in results.items():
        if label == "sqlite":
            continue
        out[label] = {f"{section}.{key}": r[section][key] / base[section][key]
                      for section, key, *_ in MEASURES
                      if section in r and section in base}
    return out


def print_tables(result: dict[str, Any]) -> None:
    labels = list(result["backends"])
    head = f"{'measure':<40}" + "".join(f"{label:>24}" for label in labels)
    rat = result["ratios"]
    print(head)
    for section, key, name, unit, _ in MEASURES:
        cells = []
        for label in labels:
            r = result["backends"][label].get(section)
            if r is None:
                cells.append(f"{'-':>24}")
                continue
            v = r[key]
            txt = f"{v:,.0f} {unit}" if unit != "s" else f"{v:.2f} s"
            if label in rat and f"{section}.{key}" in rat[label]:
                txt += f" {rat[label][f'{section}.{key}']:.2f}x"
            cells.append(f"{txt:>24}")
        print(f"{name:<40}" + "".join(cells))
    print("(PostgreSQL cells: value and its ratio to SQLite's; for s, > 1x is slower)")
    for label in labels:
        c = result["backends"][label].get("claims")
        if c:
            print(f"{label}: 2 processes claimed {c['claimed_per_process']}, double claims "
                  f"{c['double_claims']}, never claimed {c['never_claimed']}")


def main() -> None:
    from bench import pg_server

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", choices=("sqlite", "postgresql", "both"),
                    default="both" if pg_server.available() else "sqlite",
                    help="default: both when a PostgreSQL server binary is found")
    ap.add_argument("--pg-sync", choices=("on", "off", "both"), default="both",
                    help="PostgreSQL synchronous_commit to measure (the server has fsync on)")
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--user-rows", type=int, default=100_000)
    ap.add_argument("--log", type=int, default=5000)
    ap.add_argument("--runs", type=int, default=1000, help="runs enqueued, then claimed")
    ap.add_argument("--skip", default="", help="comma list of logging,claims,forget")
    ap.add_argument("--out", type=Path, default=RESULTS / "storage.json")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    results: dict[str, dict[str, Any]] = {}
    timings: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        backends: list[Backend] = []
        if args.backend in ("sqlite", "both"):
            backends.append(sqlite_backend(Path(tmp)))
        if args.backend in ("postgresql", "both"):
            server = stack.enter_context(pg_server.durable_postgres())
            for sync in (("on", "off") if args.pg_sync == "both" else (args.pg_sync,)):
                backends.append(postgres_backend(server, sync))
        for b in backends:
            results[b.label] = {"settings": b.settings}
        # Measure by measure, the backends one after the other: the machine is shared, and
        # a ratio compares numbers taken a minute apart rather than several.
        if "logging" not in skip:
            for b in backends:
                results[b.label]["logging"] = bench_logging(b, args.log)
                print(b.label, "logging", results[b.label]["logging"], flush=True)
        if "claims" not in skip:
            for b in backends:
                results[b.label]["claims"] = bench_claims(b, args.runs, Path(tmp))
                print(b.label, "claims", results[b.label]["claims"], flush=True)
        if "forget" not in skip:
            # One fill a backend (the PostgreSQL databases of both settings copy one source).
            sources: dict[str, tuple[str | Path, float]] = {}
            for b in backends:
                kind = "postgresql" if b.label.startswith("postgresql") else b.label
                if kind not in sources:
                    sources[kind] = fill_forget_source(b, args.rows, args.user_rows)
                    timings[f"fill_{kind}_s"] = sources[kind][1]
                    print(kind, f"filled in {sources[kind][1]:.1f} s", flush=True)
                results[b.label]["forget"] = bench_forget(b, sources[kind][0], args.user_rows)
                print(b.label, "forget", results[b.label]["forget"], flush=True)
    result = {"machine": f"{platform.machine()} {platform.processor() or ''} "
                         f"python {platform.python_version()} cpus {os.cpu_count()}",
              "load_average_at_end": os.getloadavg(),
              "args": {k: str(v) for k, v in vars(args).items() if k != "out"},
              "setup_seconds": timings, "backends": results, "ratios": ratios(results)}
    print_tables(result)
    args.out.parent.mkdir(exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
