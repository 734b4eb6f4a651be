"""Storage benchmark: interactions logged per second (one transaction each vs batched), and
``forget_user`` for a member with 100k rows in a guild of 1M rows, against a bare DELETE of the
same member's interactions as the baseline.

    .venv/bin/python bench/storage_bench.py [--rows 1000000] [--user-rows 100000] [--log 5000]

Prints a table and writes bench/results/storage.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import tempfile
import time
from pathlib import Path

from storage import open_store, utc_now
from storage.ids import new_ulid

G = 1
USER = 424242
RESULTS = Path(__file__).with_name("results")


def _context(author: int, i: int) -> str:
    return json.dumps([{"role": "user", "author_id": str(author), "message_id": str(i),
                        "text": f"message {i} with a little text to make it realistic"}])


def bench_logging(tmp: Path, n: int) -> dict[str, float]:
    store = open_store(tmp / "log.db")
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
    assert store.db["interactions"].count == 2 * n
    store.close()
    return {"single_rows_per_s": single, "batched_rows_per_s": batched,
            "batched_vs_single": batched / single}


def _fill(store, rows: int, user_rows: int) -> None:
    """A guild of ``rows`` interactions, ``user_rows`` of them by USER, rated and quoted."""
    rng = random.Random(0)
    now = utc_now()
    mine = set(rng.sample(range(rows), user_rows))
    conn = store.db.conn
    conn.execute("BEGIN")
    batch = []
    for i in range(rows):
        author = USER if i in mine else 1000 + i % 5000
        batch.append((new_ulid(), G, 5, author, i, 10**9 + i, _context(author, i), "reply", now,
                      now))
        if len(batch) == 10000:
            conn.executemany("INSERT INTO interactions (id, guild_id, channel_id, user_id, "
                             "request_message_id, reply_message_id, context_json, reply, "
                             "created_utc, updated_utc) VALUES (?,?,?,?,?,?,?,?,?,?)", batch)
            batch.clear()
    conn.execute("COMMIT")
    conn.execute("INSERT INTO consents (guild_id, user_id, granted_utc) VALUES (?, ?, ?)",
                 [G, USER, now])


def bench_forget(tmp: Path, rows: int, user_rows: int) -> dict[str, float]:
    out: dict[str, float] = {}
    for label in ("baseline", "forget"):
        store = open_store(tmp / f"{label}.db")
        t = time.perf_counter()
        _fill(store, rows, user_rows)
        out[f"fill_{label}_s"] = time.perf_counter() - t
        t = time.perf_counter()
        if label == "baseline":
            store.db.execute("BEGIN")
            store.db.execute("DELETE FROM interactions WHERE guild_id = ? AND user_id = ?",
                             [G, USER])
            store.db.execute("COMMIT")
        else:
            report = store.forget_user(USER, G)
            assert report.deleted["interactions"] == user_rows
        out[f"{label}_s"] = time.perf_counter() - t
        assert store.db.execute("SELECT count(*) FROM interactions WHERE user_id = ?",
                                [USER]).fetchone()[0] == 0
        store.close()
    out["forget_vs_bare_delete"] = out["forget_s"] / out["baseline_s"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--user-rows", type=int, default=100_000)
    ap.add_argument("--log", type=int, default=5000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        logging_ = bench_logging(Path(tmp), args.log)
        forget = bench_forget(Path(tmp), args.rows, args.user_rows)
    result = {"machine": f"{platform.machine()} {platform.processor() or ''} "
                         f"python {platform.python_version()}",
              "args": vars(args), "logging": logging_, "forget": forget}
    print(f"{'measure':<44}{'value':>14}")
    print(f"{'log_interaction, one transaction each':<44}"
          f"{logging_['single_rows_per_s']:>10.0f} r/s")
    print(f"{'log_interactions, 500 per transaction':<44}"
          f"{logging_['batched_rows_per_s']:>10.0f} r/s")
    print(f"{'  ratio batched / single':<44}{logging_['batched_vs_single']:>13.1f}x")
    print(f"{'bare DELETE of the member (baseline)':<44}{forget['baseline_s']:>12.2f} s")
    print(f"{'forget_user (all tables, contexts, taint)':<44}{forget['forget_s']:>12.2f} s")
    print(f"{'  ratio forget_user / bare DELETE':<44}{forget['forget_vs_bare_delete']:>13.1f}x")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "storage.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
