"""The store's verbs, on a real SQLite file and on a real PostgreSQL database (every test that
uses ``store`` or ``store_url`` runs on both; see ``backend`` in tests/conftest.py)."""

from __future__ import annotations

from storage.times import utc_now

import json
import multiprocessing as mp
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from storage import DELETED, PLACEHOLDER, Store, StoreBusyError, StoreError, open_store
from storage.schema import END, START, schema_markdown
from tests.backends import columns, count, intact, table_names

pytestmark = pytest.mark.backends

ROOT = Path(__file__).resolve().parents[1]
G, H = 1001, 2002  # two guilds
ALICE, BOB, CAROL = 11, 22, 33


def _values(obj: object) -> set[str]:
    """Every scalar in a JSON-like value, as strings."""
    if isinstance(obj, dict):
        return set().union(*(_values(v) for v in obj.values())) if obj else set()
    if isinstance(obj, list):
        return set().union(*(_values(v) for v in obj)) if obj else set()
    return {str(obj)}


def ctx(*entries: tuple[int, int, str]) -> list[dict]:
    now = utc_now()
    return [{"role": "user", "author_id": a, "message_id": m, "text": t, "created_utc": now}
            for a, m, t in entries]


def log(store: Store, guild: int, user: int, req: int, reply_msg: int, text: str = "hi",
        **kw):
    return store.log_interaction(guild, 5, user, context=ctx((user, req, text)), reply="hello",
                                 request_message_id=req, reply_message_id=reply_msg, **kw)


def test_migrations_give_the_documented_schema_and_rerun_is_a_noop(tmp_path: Path) -> None:
    store = open_store(tmp_path / "schema.db")  # the README documents SQLite's DDL
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    documented = readme[readme.index(START):readme.index(END) + len(END)]
    assert documented == schema_markdown(), "README schema drifted: run `guildtune schema`"
    before = store.db.execute("SELECT name, sql FROM sqlite_master ORDER BY name").fetchall()
    assert store.migrate() == []
    after = store.db.execute("SELECT name, sql FROM sqlite_master ORDER BY name").fetchall()
    assert before == after
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.db.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    store.close()


def test_every_table_is_keyed_by_guild(store: Store) -> None:
    tables = [t for t in table_names(store) if not t.startswith("_")]
    assert len(tables) == 11
    for table in tables:
        assert "guild_id" in columns(store, table), table


def test_log_interaction_needs_consent_and_redacts_others(store: Store) -> None:
    res = store.log_interaction(G, 5, ALICE, context=ctx((ALICE, 1, "q")), reply="a")
    assert not res.stored and "not opted in" in res.reason
    assert count(store, "interactions") == 0
    store.grant_consent(G, ALICE)
    res = store.log_interaction(G, 5, ALICE, context=ctx((BOB, 1, "bob's secret"),
                                                         (ALICE, 2, "q")), reply="a")
    assert res.stored
    row = store.get_interaction(G, res.interaction_id)
    stored = json.loads(row["context_json"])
    assert stored[0] == {"role": "user", "author_id": None, "message_id": None,
                         "text": PLACEHOLDER}
    assert "bob's secret" not in row["context_json"]
    assert str(BOB) not in _values(stored)
    # consent is per guild
    assert not store.log_interaction(H, 5, ALICE, context=[], reply="a").stored
    store.update_guild_settings(G, logging_enabled=False)
    assert store.log_interaction(G, 5, ALICE, context=[], reply="a").reason.startswith("logging")


def test_feedback_one_per_member_and_only_with_consent(store: Store) -> None:
    store.grant_consent(G, ALICE)
    log(store, G, ALICE, 1, 100)
    assert store.record_feedback(G, 100, ALICE, 1)
    assert store.record_feedback(G, 100, ALICE, -1)  # replaces
    assert not store.record_feedback(G, 100, BOB, 1)  # BOB has not opted in
    assert not store.record_feedback(G, 999, ALICE, 1)  # not a logged reply
    assert not store.record_feedback(H, 100, ALICE, 1)  # other guild
    assert count(store, "feedback") == 1
    assert store.rated_interactions(G)[0]["score"] == -1
    assert not store.remove_feedback(G, 100, ALICE, rating=1)
    assert store.remove_feedback(G, 100, ALICE, rating=-1)
    with pytest.raises(StoreError):
        store.record_feedback(G, 100, ALICE, 2)


def test_delete_and_edit_follow_discord(store: Store) -> None:
    store.grant_consent(G, ALICE)
    store.grant_consent(G, BOB)
    store.update_guild_settings(G, learn_from_humans=True)
    store.log_message(G, 50, BOB, "original")
    res = store.log_interaction(G, 5, ALICE, context=ctx((BOB, 50, "original"), (ALICE, 51, "q")),
                                reply="r", request_message_id=51, reply_message_id=52)
    assert store.edit_message(G, 50, "edited") == 2
    assert "edited" in store.get_interaction(G, res.interaction_id)["context_json"]
    assert store._scalar("SELECT text FROM messages WHERE guild_id = ? AND message_id = ?",
                         [G, 50]) == "edited"
    store.delete_message(G, 50)
    assert count(store, "messages") == 0
    context = json.loads(store.get_interaction(G, res.interaction_id)["context_json"])
    assert context[0]["text"] == DELETED and "edited" not in json.dumps(context)
    store.delete_message(G, 52)  # the bot's reply: the interaction goes
    assert count(store, "interactions") == 0


def test_queue_dedup_claim_lease_and_recovery(store: Store) -> None:
    run_id, created = store.enqueue_run(G, "schedule")
    assert created and store.enqueue_run(G, "manual", requested_by=ALICE) == (run_id, False)
    other, _ = store.enqueue_run(H, "manual")
    run = store.claim_run("w1", lease_seconds=60)
    assert run.id == run_id and run.status == "running"
    assert store.claim_run("w2", guild_id=G) is None  # nothing queued for G any more
    assert store.enqueue_run(G, "manual") == (run_id, False)  # running counts as open
    assert store.heartbeat(run_id, "w1", progress={"step": 3})
    assert not store.heartbeat(run_id, "intruder")
    assert store.get_run(run_id).progress == {"step": 3}
    # the worker dies: its lease expires, the run fails and is retried once
    later = datetime.now(UTC) + timedelta(seconds=300)
    assert store.recover_stale_runs(now=later) == [run_id]
    assert store.get_run(run_id).status == "failed"
    retry = store.open_run(G)
    assert retry.attempt == 2 and retry.status == "queued"
    store.claim_run("w3", guild_id=G)
    assert store.recover_stale_runs(now=later + timedelta(seconds=600)) == [retry.id]
    assert store.open_run(G) is None  # no third attempt
    assert not store.finish_run(retry.id, "succeeded")  # a lost lease cannot finish
    run2 = store.claim_run("w4")
    assert run2.id == other
    assert store.finish_run(other, "rejected", metrics={"candidate_loss": 2.0})
    assert store.get_run(other).metrics == {"candidate_loss": 2.0}


def test_versions_activate_rollback_and_taint(store: Store) -> None:
    lora = {"rank": 4}
    store.update_guild_settings(G, training_enabled=True)  # else no retrain comes: strict
    for u in (ALICE, BOB):
        store.grant_consent(G, u)
    for v, who in ((1, {ALICE: 2}), (2, {BOB: 3}), (3, {ALICE: 1, BOB: 1})):
        store.register_version(G, v, f"/a/{v}", base_model="tiny", lora=lora, contributors=who,
                               activate=True)
    assert store.active_version(G).version == 3
    assert [v.status for v in store.versions(G)] == ["retired", "retired", "active"]
    assert store.rollback(G).version == 2
    report = store.forget_user(BOB, G, strict=False)
    assert sorted(report.tainted) == [(G, 2), (G, 3)] and G in report.retrain_runs
    # non-strict: the tainted active version keeps serving until the retrain replaces it
    assert store.active_version(G).version == 2 and store.active_version(G).tainted_utc
    with pytest.raises(StoreError):
        store.activate_version(G, 3)
    assert store.rollback(G).version == 1  # never back to a tainted version
    assert store.versions(G)[1].status == "tainted"
    assert store.rollback(G) is None and store.active_versions() == {}
    assert store.next_version(G) == 4 and store.next_version(H) == 1


def test_strict_forget_replaces_the_active_version_at_once(store: Store) -> None:
    for u in (ALICE, BOB):
        store.grant_consent(G, u)
    store.register_version(G, 1, "/a/1", base_model="tiny", lora={}, contributors={BOB: 1},
                           activate=True)
    store.register_version(G, 2, "/a/2", base_model="tiny", lora={}, contributors={ALICE: 1},
                           activate=True)
    report = store.forget_user(ALICE, G, strict=True)
    assert report.deactivated == [G]
    assert store.active_version(G).version == 1


def test_export_holds_only_the_callers_data(store: Store) -> None:
    for u in (ALICE, BOB):
        store.grant_consent(G, u)
    log(store, G, ALICE, 1, 100, text="alice text")
    log(store, G, BOB, 2, 200, text="bob text")
    data = store.export_user(ALICE)
    dumped = json.dumps(data)
    assert "alice text" in dumped and "bob text" not in dumped
    assert str(BOB) not in _values(data)  # no field holds Bob's id (substrings of stamps may)
    assert data["interactions"][0]["user_id"] == str(ALICE)


def test_retention_purge(store: Store) -> None:
    store.grant_consent(G, ALICE)
    log(store, G, ALICE, 1, 100)
    assert store.purge_older_than(30) == {"interactions": 0, "messages": 0}
    future = datetime.now(UTC) + timedelta(days=31)
    assert store.purge_older_than(30, now=future)["interactions"] == 1


def test_a_locked_database_retries_then_says_so(tmp_path: Path) -> None:
    path = tmp_path / "locked.db"
    open_store(path).close()
    store = open_store(path, busy_timeout_ms=50, write_retries=2)
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(StoreBusyError, match="locked by another process"):
            store.grant_consent(G, ALICE)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert store.grant_consent(G, ALICE)  # and it works once the lock is gone
    store.close()


def _writer(path: str | Path, guild: int, n: int) -> None:
    store = open_store(path, busy_timeout_ms=10000)
    store.grant_consent(guild, ALICE)
    for i in range(n):
        assert log(store, guild, ALICE, i, 10_000 + i).stored
    store.close()


def test_two_processes_writing_concurrently_lose_nothing(store_url: Path | str) -> None:
    path = store_url
    open_store(path).close()
    ctx_ = mp.get_context("spawn")
    procs = [ctx_.Process(target=_writer, args=(path, g, 300)) for g in (G, H)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    store = open_store(path)
    assert count(store, "interactions") == 600
    assert count(store, "interactions", "guild_id = ?", [G]) == 300
    assert intact(store)
    store.close()


def test_a_file_that_is_not_a_database_gives_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="not a usable guildtune database"):
        open_store(bad)


def test_import_messages_and_reply_pairs(store: Store) -> None:
    rows = [{"message_id": 1, "user_id": ALICE, "text": "how do I x?"},
            {"message_id": 2, "user_id": BOB, "text": "like this", "reply_to_message_id": 1},
            {"message_id": 3, "user_id": BOB, "text": "self reply", "reply_to_message_id": 2}]
    assert store.import_messages(G, rows) == 3
    pairs = store.reply_pairs(G)
    assert [(p["parent_text"], p["reply_text"]) for p in pairs] == [("how do I x?", "like this")]
    store.revoke_consent(G, ALICE)
    assert store.reply_pairs(G) == []  # revoked members' data no longer trains
    assert store.reply_pairs(H) == []


def test_rows_stamped_in_one_millisecond_keep_their_order_on_every_backend(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    import storage.records
    import storage.times

    frozen = "2026-11-26T12:00:00.000Z"  # every row in the same millisecond
    monkeypatch.setattr(storage.records, "utc_now", lambda: frozen)
    monkeypatch.setattr(storage.times, "utc_now", lambda: frozen)
    store.grant_consent(G, ALICE)
    for i in range(30):
        assert store.log_interaction(G, 5, ALICE, context=[], reply=f"r{i}",
                                     reply_message_id=100 + i).stored
    got = [r["reply"] for r in store.rated_interactions(G)]
    assert got == [f"r{i}" for i in reversed(range(30))]  # newest first, as made
