"""The handlers' dependencies in one small typed container (RoboDanny's "bot as services").

Discord, the console and the tests build one ``Services`` and hand it to ``bot.core.Core``;
tests and the console inject fakes (engine, clock) here instead of patching modules.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bot.engine import Engine
    from guildtune.config import Config
    from storage.store import Store


@dataclass
class Services:
    """What the handlers need. It owns nothing: whoever opened the store and the engine closes
    them (``open_services``, or the host that built this)."""

    config: Config
    store: Store
    engine: Engine
    scheduler: Any | None = None  # an APScheduler AsyncIOScheduler, started by the owner
    clock: Callable[[], float] = time.time  # wall-clock seconds; rate limits and cooldowns
    watch_interval: float = 5.0  # seconds between hot-swap polls


@asynccontextmanager
async def open_services(config: Config, *, engine: Engine | None = None,
                        ) -> AsyncIterator[Services]:
    """The one owner of the store and the engine: opens the store and (unless ``engine`` is
    given: its caller owns it) creates and starts the configured engine, off the event loop
    (loading a model takes seconds); on the way out closes what it opened, engine first
    (discord.py's ``advanced_startup``: whoever opens a resource owns it). The console and the
    demo hold it for one ``async with``; the extension (``bot.setup``) enters it on an exit
    stack that it hands to the Cog, which closes it in ``cog_unload``."""
    import asyncio

    store = await asyncio.to_thread(config.open_store)
    made = None
    try:
        if engine is None:
            from bot.engine import create_engine  # torch only when a real engine is wanted

            made = engine = await asyncio.to_thread(create_engine, config.model, config.lora,
                                                    cache_dir=config.model_cache,
                                                    data_dir=config.data_dir)
            await made.start()
        yield Services(config=config, store=store, engine=engine)
    finally:
        if made is not None:
            await made.close()
        await asyncio.to_thread(store.close)
