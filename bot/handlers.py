"""A façade: re-exports the names ``bot.handlers`` held before it was split; no code lives here.

Import from the modules that hold them in new code:
- ``bot.context``: when to answer and what the model is asked (``reply_reason``, ``Turn``,
  ``merge_context``, ``chat_messages``, ``CHARS_PER_TOKEN``);
- ``bot.replies``: reply splitting and rate limiting (``split_reply``, ``DISCORD_LIMIT``,
  ``RateLimiter``, ``ReplyChannel``);
- ``bot.status``: ``StatusReport``, what /tune status says;
- ``bot.watcher``: ``AdapterWatcher``, the hot swap;
- ``bot.core``: ``Core``, the chat, feedback, member and admin handlers, with ``UserError``,
  ``ChatOutcome``, ``unstorable``, ``forget_text`` and ``OPERATOR_TRAINING_OFF``;
- ``guildtune.data_statement``: ``consent_statement``.
"""

from __future__ import annotations

from bot.context import (
                      CHARS_PER_TOKEN,
                      Turn,
                      chat_messages,
                      merge_context,
                      reply_reason,
)
from bot.core import (
                      OPERATOR_TRAINING_OFF,
                      PERSONA_MAX_CHARS,
                      SETTINGS_TTL_S,
                      ChatOutcome,
                      Core,
                      UserError,
                      forget_text,
                      unstorable,
)
from bot.replies import (
                      DISCORD_LIMIT,
                      FENCE_LANG_MAX,
                      RateLimiter,
                      ReplyChannel,
                      split_reply,
)
from bot.status import StatusReport
from bot.watcher import AdapterWatcher
from guildtune.data_statement import consent_statement

__all__ = ["CHARS_PER_TOKEN", "DISCORD_LIMIT", "FENCE_LANG_MAX", "OPERATOR_TRAINING_OFF",
           "PERSONA_MAX_CHARS", "SETTINGS_TTL_S", "AdapterWatcher", "ChatOutcome", "Core",
           "RateLimiter", "ReplyChannel", "StatusReport", "Turn", "UserError", "chat_messages",
           "consent_statement", "forget_text", "merge_context", "reply_reason", "split_reply",
           "unstorable"]
