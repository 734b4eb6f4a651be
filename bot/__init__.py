"""guildtune as a discord.py extension: ``await bot.load_extension("bot")``.

The host may set, before loading:
- ``bot.guildtune_services``: a ready ``bot.services.Services`` (the host then owns and closes
  its store and engine), or
- ``bot.guildtune_config``: a ``guildtune.config.Config``; else ``load_config()`` is used.

Importing this package is cheap (no discord, no torch).
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


async def setup(bot: Any) -> None:
    """Add the guildtune Cog (and its services) to ``bot``."""
    from contextlib import AsyncExitStack

    from bot.cog import GuildTuneCog
    from bot.services import open_services

    services = getattr(bot, "guildtune_services", None)
    owner = AsyncExitStack()  # what this extension opens, the Cog closes in cog_unload
    if services is None:
        config = getattr(bot, "guildtune_config", None)
        if config is None:
            from guildtune.config import load_config

            config = load_config()
        services = await owner.enter_async_context(open_services(config))
    try:
        await bot.add_cog(GuildTuneCog(bot, services, owner=owner))
    except BaseException:
        await owner.aclose()
        raise
    log.info("guildtune loaded (%s)", services.config.source)


async def teardown(bot: Any) -> None:
    """discord.py removes the Cog (whose cog_unload stops everything it started) first."""
    log.info("guildtune unloaded")
