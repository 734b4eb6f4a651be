"""Imported history: every stored time is a real UTC timestamp (so the retention job neither wipes
undated history nor keeps old history), and importing never overwrites what another file (or a
live message) stored."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from guildtune.config import load_config
from storage import StoreError, open_store
from storage.times import format_utc, parse_utc
from guildtune.schedule import purge_expired

from tests.fakes import IRC, run_cli

# Import, then the retention job: on SQLite and on PostgreSQL (tests/conftest.py: ``backend``).
pytestmark = pytest.mark.backends

G = 7


def write_jsonl(path: Path, n: int, *, time: str | None = "01:00", text: str = "line",
                start: int = 0, **extra: object) -> Path:
    """A community file in the JSONL format: seq start..start+n-1, replies to the line before."""
    lines = [{"community": "c", "part": 0, "seq": i, "author_id": 100 + i % 3,
              "text": f"{text} {i}", "reply_to": [i - 1] if i > start else [], **extra}
             for i in range(start, start + n)]
    for x in lines:
        if time is not None:
            x["time"] = time
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def messages(cfg: Path, guild: int = G) -> list[dict]:
    store = load_config(cfg).open_store()
    try:
        return store._rows("SELECT * FROM messages WHERE guild_id = ? ORDER BY created_utc, "
                           "message_id", [guild])
    finally:
        store.close()


def retention(cfg: Path) -> tuple[dict[str, int], dict[str, int]]:
    """The retention job both ways: the store verb and the scheduler's job function."""
    config = load_config(cfg)
    store = config.open_store()
    try:
        return store.purge_older_than(config.privacy.retention_days), purge_expired(store, config)
    finally:
        store.close()


# -- Task 1: times ---------------------------------------------------------------------------

@pytest.mark.skipif(not (IRC / "irc-linux.jsonl").is_file(), reason="shared data not present")
def test_a_real_undated_community_survives_the_retention_job(
        cfg_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # irc-linux.jsonl has times of day only ("01:00"): before, they were stored as is and the
    # retention job (a minute after a bot or worker starts) deleted the whole history.
    assert run_cli(cfg_file, "import", "--guild", str(G), str(IRC / "irc-linux.jsonl")) == 0
    assert load_config(cfg_file).privacy.retention_days == 365
    assert retention(cfg_file) == ({"interactions": 0, "messages": 0},
                                   {"interactions": 0, "messages": 0})
    rows = messages(cfg_file)
    assert len(rows) == 1915
    out = capsys.readouterr().out
    assert "times in irc-linux.jsonl have no date; dated" in out and "import" in out
    assert "imported 1915 messages" in out
    now = datetime.now(UTC)
    for r in rows:
        assert format_utc(parse_utc(r["created_utc"])) == r["created_utc"]  # the stored form
        assert now - timedelta(days=2) < parse_utc(r["created_utc"]) <= now


def test_times_of_day_take_the_files_dates(cfg_file: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    today = datetime.now(UTC).date()
    day = (today - timedelta(days=3)).isoformat()
    f = tmp_path / "c.jsonl"
    lines = [{"part": 0, "seq": 0, "time": "23:50", "author_id": 1, "text": "a", "reply_to": []},
             {"part": 0, "seq": 1, "time": "23:55", "date": day, "author_id": 2, "text": "b",
              "reply_to": [0]},
             {"part": 0, "seq": 2, "time": f"{today.isoformat()}T00:05:00", "author_id": 1,
              "text": "c", "reply_to": [1]},
             {"part": 0, "seq": 3, "time": "00:10", "author_id": 2, "text": "d",
              "reply_to": [2]}]
    f.write_text("\n".join(json.dumps(x) for x in lines))
    assert run_cli(cfg_file, "import", "--guild", str(G), str(f)) == 0
    assert "nearest date in the file" in capsys.readouterr().out
    got = {r["text"]: r["created_utc"] for r in messages(cfg_file)}
    assert got == {"a": f"{day}T23:50:00.000Z", "b": f"{day}T23:55:00.000Z",
                   "c": f"{today}T00:05:00.000Z", "d": f"{today}T00:10:00.000Z"}


def test_a_date_in_the_file_name_dates_the_times(cfg_file: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    day = (datetime.now(UTC) - timedelta(days=10)).date().isoformat()
    f = write_jsonl(tmp_path / f"linux-{day}.jsonl", 3, time="12:30")
    assert run_cli(cfg_file, "import", "--guild", str(G), str(f)) == 0
    assert f"dated {day} (the date in the file name)" in capsys.readouterr().out
    assert {r["created_utc"] for r in messages(cfg_file)} == {f"{day}T12:30:00.000Z"}


def test_an_old_dated_import_is_deleted_by_retention(cfg_file: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    old = (datetime.now(UTC) - timedelta(days=730)).strftime("%Y-%m-%dT%H:%M:%S")
    f = write_jsonl(tmp_path / "old.jsonl", 4, time=old)
    assert run_cli(cfg_file, "import", "--guild", str(G), str(f)) == 0
    assert len(messages(cfg_file)) == 4
    assert retention(cfg_file)[0] == {"interactions": 0, "messages": 4}
    assert messages(cfg_file) == []
    out = capsys.readouterr().out  # the import warned that this would happen
    assert "4 of these messages are older than privacy.retention_days (365 days)" in out


def test_the_scheduler_job_deletes_an_old_dated_import(cfg_file: Path, tmp_path: Path) -> None:
    old = (datetime.now(UTC) - timedelta(days=730)).strftime("%Y-%m-%dT%H:%M:%S")
    recent = (datetime.now(UTC) - timedelta(days=30)).strftime("%Y-%m-%dT%H:%M:%S")
    assert run_cli(cfg_file, "import", "--guild", str(G),
                   str(write_jsonl(tmp_path / "old.jsonl", 4, time=old))) == 0
    assert run_cli(cfg_file, "import", "--guild", str(G),
                   str(write_jsonl(tmp_path / "new.jsonl", 2, time=recent, text="new"))) == 0
    config = load_config(cfg_file)
    store = config.open_store()
    try:
        assert purge_expired(store, config) == {"interactions": 0, "messages": 4}
    finally:
        store.close()
    assert sorted(r["text"] for r in messages(cfg_file)) == ["new 0", "new 1"]


def test_import_messages_refuses_a_time_that_is_not_a_timestamp(tmp_path: Path) -> None:
    store = open_store(tmp_path / "g.db")
    try:
        with pytest.raises(StoreError, match="'01:00' is not a timestamp"):
            store.import_messages(G, [
                {"message_id": 1, "user_id": 5, "text": "ok", "created_utc": "2024-03-01T10:00Z"},
                {"message_id": 2, "user_id": 5, "text": "bad", "created_utc": "01:00"}])
        assert store.db["messages"].count == 0 and store.db["consents"].count == 0
        assert store.import_messages(G, [{"message_id": 1, "user_id": 5, "text": "ok",
                                          "created_utc": "2024-03-01T10:00:00+02:00"}]) == 1
        assert store.db.execute("SELECT created_utc FROM messages").fetchone()[0] == \
            "2024-03-01T08:00:00.000Z"
    finally:
        store.close()


def test_retention_never_deletes_on_a_string_comparison(tmp_path: Path) -> None:
    store = open_store(tmp_path / "g.db")
    try:
        rows = [(1, "01:00"), (2, "not a time"), (3, "2020-01-01 10:00:00"),
                (4, "2020-01-01T10:00:00.000Z"), (5, format_utc(datetime.now(UTC)))]
        for mid, created in rows:  # as an old version (or a careless caller) stored them
            store.db.execute("INSERT INTO messages (guild_id, message_id, user_id, text, "
                             "created_utc) VALUES (?, ?, 1, 'x', ?)", [G, mid, created])
        assert store.purge_older_than(365) == {"interactions": 0, "messages": 2}
        left = [r[0] for r in store.db.execute("SELECT message_id FROM messages ORDER BY 1")]
        assert left == [1, 2, 5]  # unknown strings are kept, old times deleted
    finally:
        store.close()


def test_the_migration_repairs_times_stored_as_text(tmp_path: Path) -> None:
    path = tmp_path / "g.db"
    store = open_store(path)
    for mid, created in ((1, "01:00"), (2, ""), (3, "2020-01-01T10:00:00"),
                         (4, "2026-01-02T03:04:05.678Z")):
        store.db.execute("INSERT INTO messages (guild_id, message_id, user_id, text, "
                         "created_utc) VALUES (?, ?, 1, 'x', ?)", [G, mid, created])
    store.db.execute("INSERT INTO interactions (id, guild_id, channel_id, user_id, "
                     "context_json, reply, created_utc, updated_utc) VALUES "
                     "('i', ?, 1, 1, '[]', 'r', '12:00', '12:00')", [G])
    # As a database from before the repair: the migration has not run on these rows yet.
    store.db.execute("DELETE FROM _sqlite_migrations WHERE name = 'm003_stamp_undated_times'")
    store.close()
    before = datetime.now(UTC) - timedelta(seconds=1)
    store = open_store(path)
    try:
        got = dict(store.db.execute("SELECT message_id, created_utc FROM messages").fetchall())
        assert got[3] == "2020-01-01T10:00:00.000Z" and got[4] == "2026-01-02T03:04:05.678Z"
        stamped = store.db.execute("SELECT created_utc FROM interactions").fetchone()[0]
        for value in (got[1], got[2], stamped):
            assert before <= parse_utc(value) <= datetime.now(UTC)
            assert format_utc(parse_utc(value)) == value
        # The repaired rows' retention clock starts now: the default period keeps them.
        assert store.purge_older_than(365) == {"interactions": 0, "messages": 1}
    finally:
        store.close()


# -- Task 2: a second import must not overwrite the first ----------------------------------

def test_two_files_of_one_community_both_survive(cfg_file: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", 5, text="from a")
    b = write_jsonl(tmp_path / "b.jsonl", 3, text="from b")  # the same (part, seq) numbers
    assert run_cli(cfg_file, "import", "--guild", str(G), str(a)) == 0
    assert run_cli(cfg_file, "import", "--guild", str(G), str(b)) == 0
    out = capsys.readouterr().out
    assert "imported 5 messages" in out and "imported 3 messages" in out
    texts = sorted(r["text"] for r in messages(cfg_file))
    assert texts == sorted([f"from a {i}" for i in range(5)] + [f"from b {i}" for i in range(3)])
    store = load_config(cfg_file).open_store()
    try:  # reply links stay inside their own file
        pairs = {(p["parent_text"], p["reply_text"]) for p in store.reply_pairs(G)}
    finally:
        store.close()
    assert ("from a 0", "from a 1") in pairs and ("from b 0", "from b 1") in pairs
    assert not any(p.split()[1] != r.split()[1] for p, r in pairs)


@pytest.mark.skipif(not IRC.is_dir(), reason="shared data not present")
def test_two_real_communities_in_one_guild_both_survive(cfg_file: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("irc-linux.jsonl", "irc-rust.jsonl"):  # both have part 0, seq 0..
        assert run_cli(cfg_file, "import", "--guild", str(G), "--learn-from-humans",
                       str(IRC / name)) == 0
    assert "imported 3564 messages" in capsys.readouterr().out
    assert len(messages(cfg_file)) == 1915 + 3564


def test_importing_the_same_file_again_stores_nothing(cfg_file: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", 5)
    assert run_cli(cfg_file, "import", "--guild", str(G), str(a)) == 0
    first = messages(cfg_file)
    capsys.readouterr()
    copy = tmp_path / "elsewhere.jsonl"
    copy.write_bytes(a.read_bytes())
    for f in (a, copy):
        assert run_cli(cfg_file, "import", "--guild", str(G), str(f)) == 0
        out = capsys.readouterr().out
        assert "already imported" in out and "imported 5" not in out
    assert messages(cfg_file) == first
    # Another guild is another guild: the file imports there.
    assert run_cli(cfg_file, "import", "--guild", "8", str(a)) == 0
    assert "imported 5 messages" in capsys.readouterr().out


def test_a_file_with_lines_appended_adds_only_the_new_lines(
        cfg_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = write_jsonl(tmp_path / "log.jsonl", 5)
    assert run_cli(cfg_file, "import", "--guild", str(G), str(f)) == 0
    with f.open("a") as fh:
        fh.write(write_jsonl(tmp_path / "more.jsonl", 2, start=5).read_text())
    assert run_cli(cfg_file, "import", "--guild", str(G), str(f)) == 0
    out = capsys.readouterr().out.splitlines()
    assert any(line.startswith("imported 2 messages") and "5 messages were already stored" in line
               for line in out), out
    assert len(messages(cfg_file)) == 7


def test_a_forgotten_member_does_not_come_back_with_the_same_file(
        cfg_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", 6)
    assert run_cli(cfg_file, "import", "--guild", str(G), str(a)) == 0
    assert run_cli(cfg_file, "forget", "--user", "100") == 0
    assert run_cli(cfg_file, "import", "--guild", str(G), str(a)) == 0
    assert "already imported" in capsys.readouterr().out
    assert {r["user_id"] for r in messages(cfg_file)} == {101, 102}


def test_an_import_never_replaces_a_live_message(cfg_file: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    store = load_config(cfg_file).open_store()
    try:
        store.grant_consent(G, 11)
        assert store.log_message(G, 1001, 11, "the live text")
    finally:
        store.close()
    export = tmp_path / "export.json"
    export.write_text(json.dumps({"channel": {"name": "general"}, "messages": [
        {"id": "1001", "type": "Default", "timestamp": "2026-01-01T00:00:00+00:00",
         "content": "an older export of it", "author": {"id": "11", "name": "ann"}},
        {"id": "1002", "type": "Reply", "timestamp": "2026-01-01T00:01:00+00:00",
         "content": "a reply", "author": {"id": "22", "name": "bo"},
         "reference": {"messageId": "1001"}}]}))
    assert run_cli(cfg_file, "import", "--guild", str(G), str(export)) == 0
    assert "1 messages were already stored" in capsys.readouterr().out
    got = {r["message_id"]: r for r in messages(cfg_file)}
    assert got[1001]["text"] == "the live text" and got[1001]["source"] == "discord"
    assert got[1002]["text"] == "a reply" and got[1002]["created_utc"] == \
        "2026-01-01T00:01:00.000Z"
