"""guildtune: per-community LoRA personalization for a Discord bot.

The packages: ``storage`` (SQLite, the only SQL), ``trainer`` (dataset, LoRA fit, eval gate,
publish, queue worker), ``bot`` (engine and discord.py Cog), and this one, which ties them
together (config, model resolution, community data formats, the ``guildtune`` CLI).
"""

__version__ = "0.1.0"
