"""Fixtures shared by the test modules; the fakes and factories they use are in tests/fakes.py.

Test modules import shared code as ``tests.<module>`` (tests/ is a package, so pytest puts the
repository root on sys.path whichever way it is started), never from another test module.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from storage import Store, open_store
from tests.pg import SessionPostgres, drop_fresh_database, fresh_database, session_postgres
from tests.fakes import TINY, FakeEngine, cog_on_dpytest, make_services, write_config

# Tests never write the user's model cache: the default one (Config.model_cache without
# model.cache_dir) is a throwaway directory for this run, set at import so spawned children
# inherit it.
_MODEL_CACHE = tempfile.mkdtemp(prefix="guildtune-test-models-")
os.environ["GUILDTUNE_MODEL_CACHE"] = _MODEL_CACHE
atexit.register(shutil.rmtree, _MODEL_CACHE, True)


# -- storage backends --------------------------------------------------------------------------
# A test module marked ``pytest.mark.backends`` runs each test that uses ``backend`` (through
# ``store``, ``store_url`` or ``make_store``) twice: on a SQLite file and on a fresh database of
# a real PostgreSQL server (tests/pg.py: the one .ci/run started, or a private one). Without a
# PostgreSQL server binary the PostgreSQL half is skipped, saying why.


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" in metafunc.fixturenames and metafunc.definition.get_closest_marker("backends"):
        metafunc.parametrize("backend", ["sqlite", "postgresql"], indirect=True)


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> str:
    """"sqlite" (the default), or "postgresql" in a module marked ``backends``."""
    return getattr(request, "param", "sqlite")


@pytest.fixture(scope="session")
def pg_session() -> Iterator[SessionPostgres]:
    with session_postgres() as pg:
        yield pg


@pytest.fixture
def pg_url(pg_session: SessionPostgres) -> Iterator[str]:
    """A fresh, empty database on the session's PostgreSQL server (dropped afterwards)."""
    if pg_session.admin_url is None:
        pytest.skip(pg_session.skip_reason)
    url = fresh_database(pg_session)
    yield url
    drop_fresh_database(pg_session, url)


@pytest.fixture
def store_url(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Path | str:
    """Where a test's store lives: a SQLite file path, or a fresh PostgreSQL database's URL."""
    if backend == "postgresql":
        return request.getfixturevalue("pg_url")
    return tmp_path / "guildtune.db"


@pytest.fixture
def store(store_url: Path | str) -> Iterator[Store]:
    """A real database (SQLite file, or PostgreSQL: see ``backend``), migrations applied."""
    s = open_store(store_url, busy_timeout_ms=200, write_retries=1)
    yield s
    s.close()


@pytest.fixture
def make_store(backend: str, tmp_path: Path,
               request: pytest.FixtureRequest) -> Iterator[Callable[[], Store]]:
    """A factory of empty stores for tests that need many (property tests): a new SQLite file
    each call, or, on PostgreSQL, one database emptied (TRUNCATE) for each call."""
    opened: list[Store] = []
    counter = iter(range(10**9))

    def make() -> Store:
        if backend == "postgresql":
            url = request.getfixturevalue("pg_url")
            for s in opened:
                s.close()
            opened.clear()
            s = open_store(url)
            tables = [r[0] for r in s.db.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() AND "
                "tablename NOT LIKE '\\_%'")]
            s.db.execute(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE")
        else:
            s = open_store(tmp_path / f"store-{next(counter)}.db")
        opened.append(s)
        return s

    yield make
    for s in opened:
        s.close()


@pytest.fixture
def cfg_file(tmp_path: Path, backend: str, request: pytest.FixtureRequest) -> Path:
    """A config file for the CLI: the tiny model, data in ``tmp_path/data`` (and the database
    there, or in a fresh PostgreSQL database: see ``backend``)."""
    if backend == "postgresql":
        return write_config(tmp_path, TINY, storage={"url": request.getfixturevalue("pg_url")})
    return write_config(tmp_path, TINY)


@pytest.fixture
def reaction_patch(monkeypatch: pytest.MonkeyPatch) -> None:
    # dpytest's reaction payloads lack "type" and "burst": discord.py would raise KeyError
    # inside the handler (see ../shared/FACTS.md).
    import discord

    state = discord.state.ConnectionState
    for name in ("parse_message_reaction_add", "parse_message_reaction_remove"):
        orig = getattr(state, name)

        def patched(self: Any, data: dict, _orig: Any = orig) -> Any:
            data.setdefault("type", 0)
            data.setdefault("burst", False)
            return _orig(self, data)

        monkeypatch.setattr(state, name, patched)


@pytest.fixture
async def env(tmp_path: Path, reaction_patch: None) -> AsyncIterator[SimpleNamespace]:
    """The Cog on a dpytest bot with one guild, one channel, members ``alice`` and ``bob``;
    the engine answers "hi from the bot". A handler exception fails the test."""
    services = make_services(tmp_path, engine=FakeEngine("hi from the bot"))
    async with cog_on_dpytest(services) as e:
        e.guild, e.channel = e.config.guilds[0], e.config.channels[0]
        e.alice, e.bob = e.config.members[0], e.config.members[1]
        yield e
