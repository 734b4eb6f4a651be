"""Fixtures shared by the test modules; the fakes and factories they use are in tests/fakes.py.

Test modules import shared code as ``tests.<module>`` (tests/ is a package, so pytest puts the
repository root on sys.path whichever way it is started), never from another test module.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from storage import Store, open_store
from tests.fakes import TINY, FakeEngine, cog_on_dpytest, make_services, write_config

# Tests never write the user's model cache: the default one (Config.model_cache without
# model.cache_dir) is a throwaway directory for this run, set at import so spawned children
# inherit it.
_MODEL_CACHE = tempfile.mkdtemp(prefix="guildtune-test-models-")
os.environ["GUILDTUNE_MODEL_CACHE"] = _MODEL_CACHE
atexit.register(shutil.rmtree, _MODEL_CACHE, True)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    """A real SQLite file with the migrations applied."""
    s = open_store(tmp_path / "guildtune.db", busy_timeout_ms=200, write_retries=1)
    yield s
    s.close()


@pytest.fixture
def cfg_file(tmp_path: Path) -> Path:
    """A config file for the CLI: the tiny model, data in ``tmp_path/data``."""
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
