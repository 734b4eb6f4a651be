"""The handlers' dependencies in one small typed container (RoboDanny's "bot as services").

Discord, the console and the tests build one ``Services`` and hand it to ``bot.core.Core``;
tests and the console inject fakes (engine, clock) here instead of patching modules.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bot.engine import Engine
    from guildtune.config import Config
    from storage.store import Store


@dataclass
class Services:
    """What the handlers need. ``owned`` lists what the creator must close on shutdown."""

    config: Config
    store: Store
    engine: Engine
    scheduler: Any | None = None  # an APScheduler AsyncIOScheduler, started by the owner
    clock: Callable[[], float] = time.time  # wall-clock seconds; rate limits and cooldowns
    watch_interval: float = 5.0  # seconds between hot-swap polls
    owned: set[str] = field(default_factory=set)  # subset of {"store", "engine"}


async def build_services(config: Config, *, engine: Engine | None = None) -> Services:
    """Open the store and create the configured engine (off the event loop: loading a model
    takes seconds). What it creates is marked ``owned`` so the Cog closes it on unload."""
    import asyncio

    from storage.store import open_store

    owned = {"store"}
    store = await asyncio.to_thread(open_store, config.db_path,
                                    busy_timeout_ms=config.storage.busy_timeout_ms,
                                    write_retries=config.storage.write_retries)
    if engine is None:
        from bot.engine import create_engine  # torch only when a real engine is wanted

        try:
            engine = await asyncio.to_thread(create_engine, config.model, config.lora,
                                             cache_dir=config.data_dir)
        except BaseException:
            await asyncio.to_thread(store.close)
            raise
        owned.add("engine")
    return Services(config=config, store=store, engine=engine, owned=owned)


@asynccontextmanager
async def open_services(config: Config, *, engine: Engine | None = None,
                        ) -> AsyncIterator[Services]:
    """The services of a front end that owns them (console, demo): the store and the engine,
    started, for the length of one ``async with``; on the way out what was opened here is
    closed, engine first (discord.py's ``advanced_startup``: whoever opens a resource owns it).
    The extension (``bot.setup``) hands them to the Cog instead, which closes them in
    ``cog_unload``."""
    import asyncio

    services = await build_services(config, engine=engine)
    try:
        if "engine" in services.owned:
            await services.engine.start()
        yield services
    finally:
        if "engine" in services.owned:
            await services.engine.close()
        if "store" in services.owned:
            await asyncio.to_thread(services.store.close)
