"""A private, throwaway PostgreSQL server for the tests and CI.

``PgServer`` runs ``initdb`` into a directory of its own and then ``postgres`` as a child of this
process, listening only on a unix socket in that directory (no TCP port, so two test runs on
one machine never meet). Durability is switched off for speed: the data is thrown away
(``PgServer(settings=...)`` overrides any of ``SETTINGS``: the benchmarks turn it back on).

PostgreSQL refuses to run as root. When this process is root (CI containers often are) the
server runs as the ``postgres`` user (``nobody`` where that is absent) and its directory is
handed to that user; root clients reach the socket regardless of permissions.

The CLI is for .ci/run, where the server must outlive the command that starts it::

    eval "$(python -m tests.pgserver start --dir D)"   # exports GUILDTUNE_TEST_PG_URL
    python -m tests.pgserver stop --dir D
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import os
import pwd
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Self
from urllib.parse import quote, urlsplit, urlunsplit

import psycopg
from psycopg import sql

SUPERUSER = "guildtune"
PORT = 5432  # only names the socket file (.s.PGSQL.5432); the socket dir is private
READY_TIMEOUT_S = 60.0  # waiting for readiness on a loaded CI machine, not a timing assertion
STOP_GRACE_S = 30.0  # a server asked to stop is killed after this
MISSING = ("no PostgreSQL server binaries (initdb/postgres) found; install Debian's "
           "postgresql package")
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
SOCKET_PATH_MAX = 107  # sun_path is 108 bytes with the trailing NUL
SERVICE_USERS = ("postgres", "nobody")
DEBIAN_ROOT = Path("/usr/lib/postgresql")

# Test speed over durability: nothing here is ever read after the run.
SETTINGS = {
    "listen_addresses": "",
    "port": str(PORT),
    "max_connections": "300",  # several test processes, each with a pool
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "unix_socket_permissions": "0777",
    "log_min_messages": "warning",
    "log_min_duration_statement": "-1",
}


@dataclass(frozen=True)
class PgBinaries:
    initdb: Path
    postgres: Path
    pg_ctl: Path | None  # only the CLI's daemon mode needs it

    def version(self) -> str:
        """``postgres --version``'s output, e.g. ``postgres (PostgreSQL) 15.8``."""
        out = subprocess.run([str(self.postgres), "--version"], capture_output=True, text=True,
                             check=True)
        return out.stdout.strip()


def _binaries_in(bindir: Path) -> PgBinaries | None:
    initdb, postgres, pg_ctl = bindir / "initdb", bindir / "postgres", bindir / "pg_ctl"
    if not (os.access(initdb, os.X_OK) and os.access(postgres, os.X_OK)):
        return None
    return PgBinaries(initdb, postgres, pg_ctl if os.access(pg_ctl, os.X_OK) else None)


def _version_key(path: Path) -> tuple[int, ...]:
    # /usr/lib/postgresql/15/bin -> (15,); newest first, and 9.6 sorts below 10.
    return tuple(int(n) for n in re.findall(r"\d+", path.parent.name)) or (0,)


def find_binaries(path: str | None = None,
                  debian_root: Path = DEBIAN_ROOT) -> PgBinaries | None:
    """initdb and postgres from ``path`` (default PATH), else from the newest
    /usr/lib/postgresql/<version>/bin (Debian keeps them off PATH); None when neither has them."""
    initdb, postgres = shutil.which("initdb", path=path), shutil.which("postgres", path=path)
    if initdb and postgres:
        pg_ctl = shutil.which("pg_ctl", path=path)
        return PgBinaries(Path(initdb), Path(postgres), Path(pg_ctl) if pg_ctl else None)
    for bindir in sorted(debian_root.glob("*/bin"), key=_version_key, reverse=True):
        found = _binaries_in(bindir)
        if found is not None:
            return found
    return None


# -- running as someone other than root -----------------------------------------------------------

@dataclass(frozen=True)
class _Account:
    uid: int
    gid: int
    name: str


def _service_account() -> _Account | None:
    """The user the server runs as: None (ourselves) unless we are root."""
    if os.geteuid() != 0:
        return None
    for name in SERVICE_USERS:
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        return _Account(entry.pw_uid, entry.pw_gid, name)
    raise RuntimeError(f"running as root, and PostgreSQL refuses root: none of the users "
                       f"{', '.join(SERVICE_USERS)} exists to run it as; create one "
                       f"(useradd --system postgres) or run the tests as another user")


def _check_reachable(path: Path, account: _Account) -> None:
    # The service user must be able to walk down to its directory; pytest's own tmp dirs
    # (/tmp/pytest-of-root, mode 0700) are not, so say so rather than fail inside initdb.
    for parent in reversed(path.resolve().parents):
        st = parent.stat()
        if st.st_uid == account.uid:
            ok = st.st_mode & 0o100
        elif st.st_gid == account.gid:
            ok = st.st_mode & 0o010
        else:
            ok = st.st_mode & 0o001
        if not ok:
            raise RuntimeError(f"the PostgreSQL server runs as {account.name!r} (we are root) "
                               f"and cannot enter {parent} (mode {st.st_mode & 0o777:o}); "
                               f"give it a directory under /tmp (tempfile.mkdtemp())")


def _chown_tree(path: Path, account: _Account) -> None:
    os.chown(path, account.uid, account.gid)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            os.chown(os.path.join(root, name), account.uid, account.gid, follow_symlinks=False)


def _die_with_parent(sig: int) -> None:
    # Must come after setuid: Linux clears the parent-death signal on a credential change.
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)


def _preexec(account: _Account | None, death_signal: int | None) -> Callable[[], None] | None:
    if account is None and death_signal is None:
        return None
    parent = os.getpid()

    def run_in_child() -> None:
        if account is not None:
            os.setgroups([])
            os.setgid(account.gid)
            os.setuid(account.uid)
        if death_signal is not None:
            _die_with_parent(death_signal)
            if os.getppid() != parent:  # the parent died before prctl: no signal will come
                os.kill(os.getpid(), death_signal)

    return run_in_child


def _child_env(account: _Account | None) -> dict[str, str]:
    # A PGDATA/PGPORT/PGHOST from the caller's shell must not redirect initdb or the server.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    if account is not None:
        env["HOME"] = "/"
        env["USER"] = env["LOGNAME"] = account.name
    return env


def _log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as e:
        return f"(no log: {e})"


# -- URLs and databases ---------------------------------------------------------------------------

def socket_url(socket_dir: Path, dbname: str, user: str = SUPERUSER) -> str:
    """A libpq URL for a server on a unix socket: ``postgresql://user@/db?host=/dir&port=N``."""
    return (f"postgresql://{quote(user)}@/{quote(dbname)}"
            f"?host={quote(str(socket_dir), safe='/')}&port={PORT}")


def with_dbname(url: str, dbname: str) -> str:
    """``url`` pointing at database ``dbname`` instead (a ``postgresql://`` URL)."""
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres"):
        raise ValueError(f"not a postgresql:// URL: {url!r}")
    return urlunsplit(parts._replace(path="/" + quote(dbname)))


def create_database_at(admin_url: str, name: str, template: str | None = None) -> None:
    """CREATE DATABASE ``name`` (from ``template`` when given; it must have no sessions open)
    on the server ``admin_url`` points at."""
    query = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
    if template is not None:
        query = sql.SQL("{} TEMPLATE {}").format(query, sql.Identifier(template))
    # 15's default strategy (WAL_LOG), not FILE_COPY: FILE_COPY checkpoints twice, writing out
    # what the previous tests dirtied, and measured slower in a create-use-drop cycle.
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(query)


def drop_database_at(admin_url: str, name: str) -> None:
    """DROP DATABASE ``name`` if it exists, ending any sessions still open on it."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(name)))


# -- the server -----------------------------------------------------------------------------------

class PgServer:
    """A private PostgreSQL server: ``start(base_dir)`` then ``url(db)``; ``stop()`` ends it.

    ``base_dir`` is an empty directory the server owns (data, socket and log go inside it);
    when we are root it is handed to the service user, so make it with ``tempfile.mkdtemp()``
    rather than under pytest's root-only tmp dirs. The child gets SIGQUIT (immediate shutdown)
    if the thread that started it exits, so call ``start`` from the main thread.
    """

    def __init__(self, binaries: PgBinaries | None = None,
                 settings: Mapping[str, str] | None = None) -> None:
        found = binaries or find_binaries()
        if found is None:
            raise RuntimeError(MISSING)
        self.binaries = found
        # Over SETTINGS (e.g. the benchmarks' fsync/synchronous_commit "on"); the tests pass none.
        self.settings = dict(settings or {})
        self.base_dir: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self._account: _Account | None = None

    # paths inside base_dir
    @property
    def data_dir(self) -> Path:
        return self._dir("data")

    @property
    def socket_dir(self) -> Path:
        return self._dir("socket")

    @property
    def log_path(self) -> Path:
        return self._dir("postgres.log")

    def _dir(self, name: str) -> Path:
        if self.base_dir is None:
            raise RuntimeError("the PostgreSQL server is not started")
        return self.base_dir / name

    def url(self, dbname: str = "postgres") -> str:
        """The libpq URL of database ``dbname`` (``postgres`` is the maintenance database)."""
        return socket_url(self.socket_dir, dbname)

    def create_database(self, name: str, template: str | None = None) -> str:
        """Create database ``name`` (a copy of ``template`` when given); returns its URL."""
        create_database_at(self.url(), name, template)
        return self.url(name)

    def drop_database(self, name: str) -> None:
        drop_database_at(self.url(), name)

    # lifecycle
    def init(self, base_dir: Path) -> None:
        """``initdb`` into ``base_dir/data`` and write the test settings; starts nothing."""
        self.base_dir = Path(base_dir).resolve()
        self.base_dir.mkdir(parents=True, exist_ok=True)
        socket_file = self.socket_dir / f".s.PGSQL.{PORT}"
        if len(str(socket_file)) > SOCKET_PATH_MAX:
            raise RuntimeError(f"socket path {socket_file} is longer than {SOCKET_PATH_MAX} "
                               f"bytes; give the server a shorter base_dir")
        self._account = _service_account()
        self.socket_dir.mkdir(exist_ok=True)
        if self._account is not None:
            _check_reachable(self.base_dir, self._account)
            _chown_tree(self.base_dir, self._account)
        argv = [str(self.binaries.initdb), "-D", str(self.data_dir), "-U", SUPERUSER,
                "--auth=trust", "--encoding=UTF8", "--no-locale", "--no-sync"]
        with open(self.base_dir / "initdb.log", "wb") as log_file:
            done = subprocess.run(argv, stdout=log_file, stderr=subprocess.STDOUT, check=False,
                                  env=_child_env(self._account), cwd=self.base_dir,
                                  preexec_fn=_preexec(self._account, None))
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed (exit {done.returncode}):\n"
                               f"{_log_tail(self.base_dir / 'initdb.log')}")
        settings = {**SETTINGS, **self.settings,
                    "unix_socket_directories": str(self.socket_dir)}
        with open(self.data_dir / "postgresql.conf", "a") as conf:
            conf.write("\n# tests/pgserver.py: a throwaway test server"
                       f"{' (settings overridden)' if self.settings else ''}\n")
            conf.writelines(f"{key} = '{value}'\n" for key, value in settings.items())

    def start(self, base_dir: Path) -> None:
        """initdb, then ``postgres`` as a child process; returns once it accepts connections."""
        self.init(base_dir)
        self.launch()

    def launch(self) -> None:
        """Run ``postgres`` on the directory ``init`` made, as a child that dies with us; returns
        once it accepts connections, raises with its log (and stops it) otherwise."""
        argv = [str(self.binaries.postgres), "-D", str(self.data_dir)]
        with open(self.log_path, "ab") as log_file:
            self.proc = subprocess.Popen(
                argv, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=_child_env(self._account), cwd=self.base_dir, start_new_session=True,
                preexec_fn=_preexec(self._account, signal.SIGQUIT))  # noqa: PLW1509
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Poll a connection until the server answers; raise with its log if it exits first."""
        deadline = time.monotonic() + timeout_s
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited with {self.proc.returncode} before "
                                   f"accepting connections:\n{_log_tail(self.log_path)}")
            try:
                with psycopg.connect(self.url(), connect_timeout=5) as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.OperationalError as e:
                last_error = e
            time.sleep(0.05)
        raise RuntimeError(f"postgres did not accept connections within {timeout_s:.0f}s "
                           f"({last_error}):\n{_log_tail(self.log_path)}")

    def stop(self) -> None:
        """Fast shutdown (SIGINT: sessions are ended), then SIGKILL after STOP_GRACE_S."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- CLI for .ci/run: a daemon that outlives the command ------------------------------------------

def _pg_ctl(binaries: PgBinaries) -> Path:
    if binaries.pg_ctl is None:
        raise RuntimeError(f"no pg_ctl beside {binaries.postgres}")
    return binaries.pg_ctl


def _run_as_owner(argv: list[str], data_dir: Path) -> subprocess.CompletedProcess[str]:
    account = None
    if os.geteuid() == 0:
        st = data_dir.stat()
        account = _Account(st.st_uid, st.st_gid, pwd.getpwuid(st.st_uid).pw_name)
    return subprocess.run(argv, capture_output=True, text=True, check=False,
                          env=_child_env(account), cwd=data_dir.parent,
                          preexec_fn=_preexec(account, None))


def cli_start(base_dir: Path) -> str:
    """initdb and ``pg_ctl start -w`` in ``base_dir``; returns the maintenance database URL."""
    server = PgServer()
    pg_ctl = _pg_ctl(server.binaries)
    server.init(base_dir)
    done = _run_as_owner([str(pg_ctl), "start", "-w", "-t", str(int(READY_TIMEOUT_S)),
                          "-D", str(server.data_dir), "-l", str(server.log_path)],
                         server.data_dir)
    if done.returncode != 0:
        raise RuntimeError(f"pg_ctl start failed (exit {done.returncode}): {done.stdout}"
                           f"{done.stderr}\n{_log_tail(server.log_path)}")
    server.wait_ready()
    return server.url()


def cli_stop(base_dir: Path) -> None:
    """``pg_ctl stop -m fast``; nothing to do when no server was initialised there."""
    data_dir = Path(base_dir).resolve() / "data"
    if not (data_dir / "postmaster.pid").exists():
        return
    binaries = find_binaries()
    if binaries is None:
        raise RuntimeError(MISSING)
    done = _run_as_owner([str(_pg_ctl(binaries)), "stop", "-m", "fast", "-w",
                          "-t", str(int(STOP_GRACE_S)), "-D", str(data_dir)], data_dir)
    if done.returncode != 0:
        raise RuntimeError(f"pg_ctl stop failed (exit {done.returncode}): {done.stdout}"
                           f"{done.stderr}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.pgserver", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["start", "stop"])
    parser.add_argument("--dir", required=True, type=Path,
                        help="an empty directory for the server (data, socket, log)")
    args = parser.parse_args(argv)
    try:
        if args.action == "start":
            url = cli_start(args.dir)
            print(f"export GUILDTUNE_TEST_PG_URL={shlex.quote(url)}")
        else:
            cli_stop(args.dir)
    except RuntimeError as e:
        print(f"tests.pgserver {args.action}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
