"""guildtune as a discord.py extension: ``await bot.load_extension("bot")``.

The host may set, before loading:
- ``bot.guildtune_services``: a ready ``bot.services.Services`` (the host then owns and closes
  its store and engine), or
- ``bot.guildtune_config``: a ``guildtune.config.Config``; else ``load_config()`` is used.

Importing this package is cheap (no discord, no torch): the trainer imports ``bot.engine``
helpers and must not pull discord in.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


async def setup(bot: Any) -> None:
    """Add the guildtune Cog (and its services) to ``bot``."""
    from bot.cog import GuildTuneCog
    from bot.services import build_services

    services = getattr(bot, "guildtune_services", None)
    if services is None:
        config = getattr(bot, "guildtune_config", None)
        if config is None:
            from guildtune.config import load_config

            config = load_config()
        services = await build_services(config)
    await bot.add_cog(GuildTuneCog(bot, services))
    log.info("guildtune loaded (%s)", services.config.source)


async def teardown(bot: Any) -> None:
    """discord.py removes the Cog (whose cog_unload stops everything it started) first."""
    log.info("guildtune unloaded")
