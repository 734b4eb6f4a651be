from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from storage import Store, open_store


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    """A real SQLite file with the migrations applied."""
    s = open_store(tmp_path / "guildtune.db", busy_timeout_ms=200, write_retries=1)
    yield s
    s.close()
