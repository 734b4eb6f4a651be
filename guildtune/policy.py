"""The training policy: may guild G train now, and if not, why not, in one sentence.

Two of the three consents gate a run (the members' own opt-ins gate each row, in the dataset):
the operator's ``training.enabled`` in the config, which no one else can override, and the
guild admins' ``/tune training on``, which a forced run (``guildtune train --force``) skips.
Every place that decides or explains it calls ``training_block``: the bot's /tune commands
and status, the scheduler, the worker and the pipeline, and the CLI, so a member, an admin and
the operator read the same words. Kernel module: imports nothing of bot/ or trainer/.
"""

from __future__ import annotations

from typing import Any, Protocol

# The reasons, one line each; written into a failed run's ``error`` and shown as is.
OPERATOR_OFF = ("training is disabled by the bot's operator (`training.enabled = false` in the "
                "config)")
GUILD_OFF = ("training is off for this server (guild {guild_id}) until an admin turns it on "
             "with `/tune training on`")

# Why the operator's switch is off by default, for whoever is refused by it (in Discord) and for
# the operator (``guildtune init``); the README's "Discord's policy on training" says the same.
DISCORD_POLICY = (
    "Discord's Developer Policy forbids using message content to train AI models unless Discord "
    "has granted express permission, and members opting in does not replace that permission. "
    "The operator has to hold it before enabling training; until then the bot chats with the "
    "base model and nothing is trained."
)

# The scheduler's job ids. The bot asks the scheduler it was handed to re-sync at once by
# running the SYNC_JOB (it never imports the trainer's scheduling code).
SYNC_JOB = "guildtune-sync"
TRAIN_JOB_PREFIX = "guildtune-train-"
RETENTION_JOB = "guildtune-retention"


class GuildSwitch(Protocol):
    """What the policy reads of a guild's settings (``storage.GuildSettings``)."""

    guild_id: int
    training_enabled: bool


def operator_block(cfg: Any) -> str | None:
    """None when the operator enabled training; else the reason, ``OPERATOR_OFF``."""
    return None if cfg.training.enabled else OPERATOR_OFF


def training_block(cfg: Any, settings: GuildSwitch, force: bool = False) -> str | None:
    """None when the guild of ``settings`` may train now; else the one-line reason.

    The operator's switch always applies; the guild's own switch unless ``force`` (an
    operator's forced run, or a retrain queued with force)."""
    off = operator_block(cfg)
    if off is not None:
        return off
    if not force and not settings.training_enabled:
        return GUILD_OFF.format(guild_id=settings.guild_id)
    return None


def may_train(cfg: Any, settings: GuildSwitch, force: bool = False) -> bool:
    """``training_block(...) is None``: for the places that only need the yes or no."""
    return training_block(cfg, settings, force) is None


def sentence(reason: str) -> str:
    """A reason as a sentence on its own (capitalised, full stop), for a chat reply."""
    return reason[:1].upper() + reason[1:] + ("" if reason.endswith(".") else ".")


def explain(reason: str) -> str:
    """What a person refused is told in chat (Discord, the console): the reason as a sentence,
    and for the operator's switch Discord's policy behind it."""
    return sentence(reason) + (f" {DISCORD_POLICY}" if reason == OPERATOR_OFF else "")
