"""The private PostgreSQL server the storage tests run against (tests/pgserver.py, tests/pg.py)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tests import pg
from tests.pgserver import MISSING, PgServer, find_binaries, main

BINARIES = find_binaries()
needs_binaries = pytest.mark.skipif(BINARIES is None, reason=MISSING)
REPO = Path(__file__).resolve().parent.parent
GONE_WITHIN_S = 60.0  # waiting for an exit on a loaded machine, not a timing assertion


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


def _wait_gone(pid: int) -> bool:
    deadline = time.monotonic() + GONE_WITHIN_S
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def base_dir() -> Iterator[Path]:
    # Not tmp_path: under root the server's own user cannot enter /tmp/pytest-of-root.
    path = Path(tempfile.mkdtemp(prefix="guildtune-pg-test-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def session() -> Iterator[pg.SessionPostgres]:
    with pg.session_postgres() as found:
        if found.admin_url is None:
            pytest.skip(found.skip_reason)
        yield found


@needs_binaries
def test_server_starts_on_a_private_socket_only(base_dir: Path) -> None:
    with PgServer() as server:
        server.start(base_dir)
        with psycopg.connect(server.url()) as conn:
            assert conn.execute("SHOW listen_addresses").fetchone() == ("",)
            assert conn.execute("SHOW unix_socket_directories").fetchone() == (
                str(server.socket_dir),)
            assert conn.execute("SHOW fsync").fetchone() == ("off",)
            assert conn.execute("SHOW server_encoding").fetchone() == ("UTF8",)
        if os.geteuid() == 0:  # PostgreSQL refuses root: it runs as the service user
            assert os.stat(f"/proc/{server.proc.pid}").st_uid != 0  # type: ignore[union-attr]


def test_fresh_database_takes_a_table(session: pg.SessionPostgres) -> None:
    with pg.fresh_database_url(session) as url, psycopg.connect(url) as conn:
        conn.execute("CREATE TABLE notes (id bigint PRIMARY KEY, body text NOT NULL)")
        conn.execute("INSERT INTO notes VALUES (1, 'héllo'), (2, 'world')")
        assert conn.execute("SELECT body FROM notes ORDER BY id").fetchall() == [
            ("héllo",), ("world",)]


def test_fresh_databases_are_isolated(session: pg.SessionPostgres) -> None:
    with pg.fresh_database_url(session) as a, pg.fresh_database_url(session) as b:
        assert a != b
        with psycopg.connect(a) as conn:
            conn.execute("CREATE TABLE only_in_a (x int)")
            conn.execute("INSERT INTO only_in_a VALUES (1)")
        with psycopg.connect(b) as conn:
            assert conn.execute("SELECT to_regclass('only_in_a')").fetchone() == (None,)


def test_a_fresh_database_is_dropped_even_with_sessions_open(
        session: pg.SessionPostgres) -> None:
    url = pg.fresh_database(session)
    name = url.split("?")[0].rsplit("/", 1)[1]
    left_open = psycopg.connect(url)  # a pool a test forgot to close
    try:
        pg.drop_fresh_database(session, url)
    finally:
        left_open.close()
    with psycopg.connect(session.admin_url, autocommit=True) as conn:  # type: ignore[arg-type]
        assert conn.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                            (name,)).fetchone() is None


def test_drop_refuses_a_database_it_did_not_make(session: pg.SessionPostgres) -> None:
    with pytest.raises(ValueError, match="not a database fresh_database made"):
        pg.drop_fresh_database(session, session.admin_url)  # type: ignore[arg-type]


@needs_binaries
def test_server_child_is_gone_after_stop(base_dir: Path) -> None:
    server = PgServer()
    server.start(base_dir)
    proc = server.proc
    assert proc is not None and proc.poll() is None
    socket_file = server.socket_dir / ".s.PGSQL.5432"
    assert socket_file.exists()
    server.stop()
    assert proc.poll() is not None
    assert not _alive(proc.pid)
    assert not socket_file.exists()  # a clean shutdown removes it
    server.stop()  # stopping twice is harmless


@needs_binaries
def test_server_dies_with_the_process_that_started_it(base_dir: Path) -> None:
    # The parent is SIGKILLed, so no stop() and no finally runs: only PR_SET_PDEATHSIG is left.
    script = ("import sys, time\nfrom pathlib import Path\nfrom tests.pgserver import PgServer\n"
              "s = PgServer()\ns.start(Path(sys.argv[1]))\nprint(s.proc.pid, flush=True)\n"
              "time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", script, str(base_dir)], cwd=REPO,
                              stdout=subprocess.PIPE, text=True)
    postmaster = 0
    try:
        line = parent.stdout.readline()  # type: ignore[union-attr]
        assert line.strip().isdigit(), f"the parent did not start a server: {line!r}"
        postmaster = int(line)
        assert _alive(postmaster)
        parent.kill()
        parent.wait()
        assert _wait_gone(postmaster), "postgres outlived the process that started it"
    finally:
        parent.kill()
        parent.wait()
        if parent.stdout is not None:
            parent.stdout.close()
        if postmaster and _alive(postmaster):  # the feature is broken: leave no server behind
            os.kill(postmaster, signal.SIGQUIT)


@needs_binaries
def test_cli_starts_a_daemon_and_stops_it(base_dir: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["start", "--dir", str(base_dir)]) == 0
    try:
        out = capsys.readouterr().out.strip()
        assert out.startswith(f"export {pg.URL_ENV}=")
        url = out.split("=", 1)[1].strip("'")
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT current_database()").fetchone() == ("postgres",)
        pid = int((base_dir / "data" / "postmaster.pid").read_text().split()[0])
    finally:
        assert main(["stop", "--dir", str(base_dir)]) == 0
    assert _wait_gone(pid)
    assert main(["stop", "--dir", str(base_dir)]) == 0  # stopping twice is harmless


def _fake_bindir(root: Path, version: str, names: tuple[str, ...]) -> Path:
    bindir = root / version / "bin"
    bindir.mkdir(parents=True)
    for name in names:
        (bindir / name).write_text("#!/bin/sh\n")
        (bindir / name).chmod(0o755)
    return bindir


def test_find_binaries_prefers_path_then_the_newest_debian_version(tmp_path: Path) -> None:
    debian = tmp_path / "usr-lib-postgresql"
    for version in ("9.6", "10", "15"):
        _fake_bindir(debian, version, ("initdb", "postgres", "pg_ctl"))
    _fake_bindir(debian, "16", ("pg_ctl",))  # a client-only install: no server there
    empty = tmp_path / "empty"
    empty.mkdir()
    found = find_binaries(path=str(empty), debian_root=debian)
    assert found is not None and found.initdb == debian / "15" / "bin" / "initdb"
    on_path = _fake_bindir(tmp_path / "local", "x", ("initdb", "postgres"))
    found = find_binaries(path=str(on_path), debian_root=debian)
    assert found is not None and found.postgres == on_path / "postgres"
    assert found.pg_ctl is None
    assert find_binaries(path=str(empty), debian_root=tmp_path / "nowhere") is None


def test_no_binaries_means_a_skip_that_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pg, "find_binaries", lambda: None)
    with pg.session_postgres(environ={}) as found:
        assert found.admin_url is None
        assert found.skip_reason == MISSING
        assert "install Debian's postgresql package" in found.skip_reason


def test_the_url_variable_wins_over_a_private_server(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_server() -> None:
        raise AssertionError("started a private server although a URL was given")

    monkeypatch.setattr(pg, "find_binaries", no_server)
    url = "postgresql://someone@db.example/postgres"
    with pg.session_postgres(environ={pg.URL_ENV: url}) as found:
        assert found.admin_url == url
    assert (pg.with_dbname(url, "guildtune_test_1")
            == "postgresql://someone@db.example/guildtune_test_1")


def test_server_failing_to_start_raises_with_its_log(base_dir: Path) -> None:
    if BINARIES is None:
        pytest.skip(MISSING)
    server = PgServer()
    server.init(base_dir)
    with open(server.data_dir / "postgresql.conf", "a") as conf:
        conf.write("no_such_setting_at_all = 1\n")
    with pytest.raises(RuntimeError, match="no_such_setting_at_all"):
        server.launch()
    assert server.proc is None
