"""What only the PostgreSQL store has: its own migrations (held to SQLite's), the SQL it
rewrites, its write lock, a lost connection, and errors that name the server without the
password. The verbs themselves are tested on both backends (test_storage, test_scale_out,
test_privacy_property)."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest

from guildtune.config import ConfigError
from storage import Store, StoreBusyError, StoreError, open_store, utc_now
from storage.migrations import migrations
from storage.pg_migrations import PG_MIGRATIONS
from storage.postgres import WRITE_LOCK_KEY, pg_sql, redact_url
from tests.backends import columns, count, table_names
from tests.fakes import make_config, run_cli, write_config

G, ALICE = 4242, 77


def test_pg_migrations_are_sqlites_one_for_one() -> None:
    assert [n for n, _ in PG_MIGRATIONS] == [m.name for m in migrations._migrations]


def test_both_schemas_have_the_same_tables_and_columns(pg_url: str, tmp_path: Path) -> None:
    pg, lite = open_store(pg_url), open_store(tmp_path / "lite.db")
    assert table_names(pg) == sorted(table_names(lite))
    for table in table_names(lite):
        assert columns(pg, table) == columns(lite, table), table
    assert pg.migrate() == [] and lite.migrate() == []  # rerun: nothing pending
    assert count(pg, "_sqlite_migrations") == count(lite, "_sqlite_migrations") == 5
    pg.close()
    lite.close()


def test_placeholders_are_rewritten_outside_literals_only() -> None:
    assert pg_sql("SELECT '?', \"a?\" FROM t WHERE x = ? AND y LIKE '5%'") == \
        "SELECT '?', \"a?\" FROM t WHERE x = %s AND y LIKE '5%%'"
    assert pg_sql("SELECT 'it''s ?' WHERE a = ?") == "SELECT 'it''s ?' WHERE a = %s"


def test_text_with_placeholder_and_percent_characters_round_trips(pg_url: str) -> None:
    store = open_store(pg_url)
    store.grant_consent(G, ALICE)
    odd = "50% of ? is %s and %(x)s; 'quoted' \"double\" \\ back"
    res = store.log_interaction(G, 1, ALICE, context=[
        {"role": "user", "author_id": ALICE, "message_id": 9, "text": odd,
         "created_utc": utc_now()}], reply=odd, reply_message_id=10)
    assert store.get_interaction(G, res.interaction_id)["reply"] == odd
    assert store.update_guild_settings(G, persona=odd).persona == odd
    store.close()


def test_a_held_write_lock_retries_then_says_so(pg_url: str) -> None:
    store = open_store(pg_url, busy_timeout_ms=50, write_retries=2)
    blocker = psycopg.connect(pg_url)  # a long transaction holding the store's write lock
    blocker.execute("SELECT pg_advisory_xact_lock(%s)", [WRITE_LOCK_KEY])
    try:
        with pytest.raises(StoreBusyError, match="is busy: grant_consent waited 50 ms"):
            store.grant_consent(G, ALICE)
        assert not store.has_consent(G, ALICE)  # nothing half-written
        assert store.guild_stats(G)["consented_users"] == 0  # readers never wait
    finally:
        blocker.rollback()
        blocker.close()
    assert store.grant_consent(G, ALICE)  # and it works once the lock is gone
    store.close()


def test_a_claim_does_not_wait_for_another_claim_but_waits_for_a_write(pg_url: str) -> None:
    store = open_store(pg_url, busy_timeout_ms=50, write_retries=0)
    first, _ = store.enqueue_run(1, "manual")
    second, _ = store.enqueue_run(2, "manual")
    other = psycopg.connect(pg_url)  # another host's claim, mid-transaction
    other.execute("SELECT pg_advisory_xact_lock_shared(%s)", [WRITE_LOCK_KEY])
    row = other.execute("SELECT id FROM training_runs WHERE status = 'queued' ORDER BY id "
                        "LIMIT 1 FOR UPDATE SKIP LOCKED").fetchone()
    assert row[0] == first
    run = store.claim_run("host-b")  # skips the locked row instead of waiting or taking it
    assert run is not None and run.id == second
    with pytest.raises(StoreBusyError):  # a forget, an enqueue... wait for the claim
        store.enqueue_run(3, "manual")
    other.rollback()
    other.close()
    assert store.enqueue_run(3, "manual")[1]
    store.close()


def test_a_lost_connection_is_reopened_and_the_write_retried(pg_url: str) -> None:
    store = open_store(pg_url, busy_timeout_ms=1000, write_retries=2)
    store.grant_consent(G, ALICE)
    pid = store.db.raw.info.backend_pid
    admin = psycopg.connect(pg_url, autocommit=True)  # a server restart, a failover, an idle kill
    assert admin.execute("SELECT pg_terminate_backend(%s)", [pid]).fetchone()[0]
    admin.close()
    assert store.update_guild_settings(G, persona="after").persona == "after"
    assert store.db.raw.info.backend_pid != pid
    store.close()


def test_errors_name_the_server_without_its_password(pg_url: str) -> None:
    url = pg_url.replace("postgresql://guildtune@", "postgresql://guildtune:s3cret@")
    bad = url.replace("/guildtune_test_", "/no_such_db_")
    with pytest.raises(StoreError, match="cannot connect to") as err:
        open_store(bad)
    assert "s3cret" not in str(err.value) and "***" in str(err.value)
    assert "\n" not in str(err.value)
    assert redact_url("postgresql://u:pw@h:5/d") == "postgresql://u:***@h:5/d"


def test_backup_and_restore_point_to_pg_dump(pg_url: str, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    store: Store = open_store(pg_url)
    with pytest.raises(StoreError, match="pg_dump"):
        store.backup(tmp_path / "b.db")
    store.close()
    cfg_file = write_config(tmp_path, storage={"url": pg_url})
    assert run_cli(cfg_file, "backup", str(tmp_path / "b.db")) == 1
    assert run_cli(cfg_file, "restore", str(tmp_path / "b.db")) == 1
    err = capsys.readouterr().err
    assert "pg_dump" in err and "pg_restore" in err


def test_the_cli_works_on_a_postgresql_url(pg_url: str, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    cfg_file = write_config(tmp_path, storage={"url": pg_url})
    assert run_cli(cfg_file, "init") == 0
    assert run_cli(cfg_file, "guild", "--guild", str(G), "--training", "on") == 0
    cfg = make_config(tmp_path, storage={"url": pg_url})
    store = cfg.open_store()
    assert store.backend == "postgresql" and store.guild_settings(G).training_enabled
    assert not (tmp_path / "data" / "guildtune.db").exists()  # no SQLite file on the side
    store.close()


def test_a_bad_url_scheme_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="storage.url"):
        make_config(tmp_path, storage={"url": "mysql://x/y"})


def _vacuums(url: str, table: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute("SELECT vacuum_count FROM pg_stat_user_tables WHERE relname = %s",
                            [table]).fetchone()[0]


def test_a_forget_vacuums_the_members_tables(pg_url: str) -> None:
    store = open_store(pg_url)
    store.grant_consent(G, ALICE)
    store.log_interaction(G, 1, ALICE, context=[
        {"role": "user", "author_id": ALICE, "message_id": 9, "text": "mine",
         "created_utc": utc_now()}], reply="r", reply_message_id=10)
    before = _vacuums(pg_url, "interactions")
    report = store.forget_user(ALICE, G)
    assert report.deleted["interactions"] == 1
    assert _vacuums(pg_url, "interactions") == before + 1  # the dead row version is gone
    store.close()


def test_the_data_statement_says_what_a_forget_does_to_the_bytes(tmp_path: Path) -> None:
    from guildtune.data_statement import ERASE, _values

    lite = make_config(tmp_path)
    pg = make_config(tmp_path, storage={"url": "postgresql://u@h/d"})
    assert _values(lite)["erase"] == ERASE["sqlite"] and "secure_delete" in ERASE["sqlite"]
    assert _values(pg)["erase"] == ERASE["postgresql"] and "secure_delete" not in _values(pg)[
        "erase"]


def test_a_connection_lost_while_committing_is_never_written_twice(
        pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from storage.postgres import PgDb

    store = open_store(pg_url, busy_timeout_ms=1000, write_retries=3)
    store.grant_consent(G, ALICE)
    real = PgDb.execute

    def commit_then_drop(self: PgDb, sql: str, params=()):  # noqa: ANN001, ANN202
        out = real(self, sql, params)
        if sql == "COMMIT":  # applied by the server; the reply never arrives
            self.raw.close()
            raise psycopg.OperationalError("server closed the connection unexpectedly")
        return out

    monkeypatch.setattr(PgDb, "execute", commit_then_drop)
    with pytest.raises(StoreError, match="may or may not have been written"):
        store.log_interaction(G, 1, ALICE, context=[
            {"role": "user", "author_id": ALICE, "message_id": 9, "text": "once",
             "created_utc": utc_now()}], reply="r", reply_message_id=10)
    monkeypatch.setattr(PgDb, "execute", real)
    assert count(store, "interactions") == 1  # written once, not retried into a twin
    store.close()


def test_a_write_during_a_server_outage_waits_for_the_server(
        pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import storage.db

    store = open_store(pg_url, busy_timeout_ms=1000, write_retries=3)
    store.grant_consent(G, ALICE)
    admin = psycopg.connect(pg_url, autocommit=True)
    admin.execute("SELECT pg_terminate_backend(%s)", [store.db.raw.info.backend_pid])
    admin.close()
    real_connect, refused = psycopg.connect, []

    def restarting(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - the server is restarting
        if len(refused) < 2:
            refused.append(1)
            raise psycopg.OperationalError("connection refused")
        return real_connect(*args, **kwargs)

    waits: list[float] = []
    monkeypatch.setattr(psycopg, "connect", restarting)
    monkeypatch.setattr(storage.db.time, "sleep", waits.append)
    assert store.update_guild_settings(G, persona="back").persona == "back"
    assert len(refused) == 2 and len(waits) == 3 and sum(waits) > 1.0  # seconds, not ms
    store.close()


def test_a_read_on_a_dropped_connection_reconnects(pg_url: str) -> None:
    store = open_store(pg_url)
    store.grant_consent(G, ALICE)
    admin = psycopg.connect(pg_url, autocommit=True)
    admin.execute("SELECT pg_terminate_backend(%s)", [store.db.raw.info.backend_pid])
    admin.close()
    assert store.has_consent(G, ALICE)  # no raw psycopg error reaches the caller
    store.close()


def test_a_forget_stands_when_its_vacuum_cannot_run(pg_url: str) -> None:
    store = open_store(pg_url, busy_timeout_ms=100)
    store.grant_consent(G, ALICE)
    other = psycopg.connect(pg_url)  # an ANALYZE or CREATE INDEX CONCURRENTLY, say
    other.execute("LOCK TABLE messages IN SHARE UPDATE EXCLUSIVE MODE")
    try:
        report = store.forget_user(ALICE, G)  # no error: the forget is committed
        assert report.deleted["consents"] == 1 and not store.has_consent(G, ALICE)
        assert store.checkpoint() is False  # the cleanup says it waits for autovacuum
    finally:
        other.rollback()
        other.close()
    assert store.checkpoint() is True
    store.close()


def test_a_runtime_role_without_create_opens_a_migrated_database(pg_url: str) -> None:
    open_store(pg_url).close()  # migrated by the owner (guildtune init)
    role = "gt_app_" + urlsplit(pg_url).path.lstrip("/")[-20:]  # roles are per server
    admin = psycopg.connect(pg_url, autocommit=True)
    admin.execute(f"CREATE ROLE {role} LOGIN")
    admin.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
    admin.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role}")
    admin.execute(f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {role}")
    try:
        store = open_store(pg_url.replace("//guildtune@", f"//{role}@"))
        assert store.grant_consent(G, ALICE) and store.migrate() == []
        store.close()
    finally:
        admin.execute(f"DROP OWNED BY {role}")
        admin.execute(f"DROP ROLE {role}")
        admin.close()


def test_read_commands_create_no_tables_in_an_empty_database(
        pg_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg_file = write_config(tmp_path, storage={"url": pg_url})
    assert run_cli(cfg_file, "export", "--user", "5") == 1
    assert "no guildtune tables yet" in capsys.readouterr().err
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
                            ).fetchone()[0] == 0


def test_bools_and_nul_characters_are_stored_as_on_sqlite(pg_url: str) -> None:
    store = open_store(pg_url)
    store.grant_consent(G, ALICE)
    assert store.update_guild_settings(G, persona="a\x00b").persona == "a\ufffdb"
    run_id, _ = store.enqueue_run(G, "manual", requested_by=True)
    assert store.get_run(run_id).requested_by == 1
    assert redact_url("postgresql://u@h/d?sslpassword=a&password=b") == \
        "postgresql://u@h/d?sslpassword=***&password=***"
    store.close()
