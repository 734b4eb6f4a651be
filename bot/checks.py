"""The one admin check of the /tune commands: a runtime check paired with the permission hint.

The /tune group carries ``default_permissions=ADMIN_PERMISSIONS``: a hint that Discord applies
to the group only (not to subcommands) and that each server can override, so it never decides
alone. ``admin_only`` is its runtime half, the same permissions checked on every call (in the
spirit of RoboDanny's ``hybrid_permissions_check``, which pairs the two in one decorator).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import discord

from bot.core import UserError
from bot.ui import answer

NOT_ADMIN = "Only members with the **Manage Server** permission can use /tune."
ADMIN_PERMISSIONS = discord.Permissions(manage_guild=True)

F = TypeVar("F", bound=Callable[..., Awaitable[None]])


def is_admin(interaction: discord.Interaction) -> bool:
    """Whether the interaction comes from a guild member holding every ``ADMIN_PERMISSIONS``
    permission (never in DMs, never a user without guild permissions)."""
    perms = getattr(interaction.user, "guild_permissions", None)
    return (interaction.guild_id is not None and perms is not None
            and all(getattr(perms, name) for name, wanted in ADMIN_PERMISSIONS if wanted))


async def admin_ok(interaction: discord.Interaction) -> bool:
    """True for an admin; else answers ``NOT_ADMIN`` (ephemeral) and returns False."""
    if is_admin(interaction):
        return True
    await answer(interaction, NOT_ADMIN)
    return False


def admin_only(func: F) -> F:
    """Decorate an admin command's callback (a Cog method): ``admin_ok`` runs before the body
    however the callback is reached (Discord's tree, or ``command.callback(cog, ...)`` as the
    tests call it), and a ``UserError`` the body raises is answered with its text, ephemeral.
    Anything else propagates to the Cog's ``cog_app_command_error``."""

    @functools.wraps(func)
    async def checked(cog: Any, interaction: discord.Interaction, /, *args: Any,
                      **kwargs: Any) -> None:
        if not await admin_ok(interaction):
            return
        try:
            await func(cog, interaction, *args, **kwargs)
        except UserError as exc:
            await answer(interaction, str(exc))

    # discord.py builds the command's parameters from this signature and resolves string
    # annotations in the callback's module globals, which are this module's for the wrapper:
    # hand it the body's signature with the annotations already evaluated where they were written.
    checked.__signature__ = inspect.signature(func, eval_str=True)  # type: ignore[attr-defined]
    return checked  # type: ignore[return-value]
