"""What the model is asked: when to answer, the conversation as ``Turn``s, and the prompt.

``reply_reason`` decides whether a message gets an answer; ``Turn`` is one message as the
handlers see it; ``merge_context`` picks the turns (reply chain first, then recent messages);
``chat_messages`` fits them with the system prompt into a character budget (``CHARS_PER_TOKEN``
converts the model's token budget). Pure functions and data: no store, no engine, no discord.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from guildtune.prompting import CHARS_PER_TOKEN, estimate_chat
from storage.times import to_utc


def reply_reason(*, is_bot: bool, is_system: bool, mentions_everyone: bool, is_dm: bool,
                 mentioned_me: bool, reply_to_me: bool, channel_configured: bool,
                 reply_on_mention: bool = True, reply_on_reply: bool = True,
                 allow_dms: bool = False) -> str | None:
    """Why the bot should answer this message ("mention", "reply", "channel", "dm"), or None."""
    if is_bot or is_system or mentions_everyone:
        return None  # bots (itself included) never trigger a reply: no loops between bots
    if is_dm:
        return "dm" if allow_dms else None
    if mentioned_me and reply_on_mention:
        return "mention"
    if reply_to_me and reply_on_reply:
        return "reply"
    if channel_configured:
        return "channel"
    return None



@dataclass(frozen=True)
class Turn:
    """One message of the conversation, as the handlers see it.

    ``created_utc`` is when the message was written (a Discord message's ``created_at``, the
    console's clock), in the store's format. It is required, with no default: the store keeps a
    member's text only when it was written after they opted in, and refuses a turn without it.
    """

    role: str  # "user" or "assistant" (the bot's own messages)
    author_id: int | None
    message_id: int | None
    text: str
    created_utc: str = field(kw_only=True)

    def __post_init__(self) -> None:
        # One stored form (UTC, ms, "Z") whatever the caller had: a datetime or any ISO 8601
        # time; anything else is a ValueError here, not a bad row later.
        object.__setattr__(self, "created_utc", to_utc(self.created_utc))

    def stored(self) -> dict[str, Any]:
        """The shape ``store.log_interaction`` takes (it redacts non-consented authors)."""
        return {"role": self.role, "author_id": self.author_id, "message_id": self.message_id,
                "text": self.text, "created_utc": self.created_utc}


def merge_context(chain: Sequence[Turn], recent: Sequence[Turn], current: Turn,
                  limit: int) -> list[Turn]:
    """Reply chain + recent channel messages + the current one, oldest first, deduplicated.

    The reply chain is kept first (it is what the member is answering), then the newest of the
    recent messages fill up to ``limit`` turns before the current message.
    """
    seen = {current.message_id}
    picked: list[Turn] = []
    for t in list(chain) + sorted(recent, key=lambda t: t.message_id or 0, reverse=True):
        if len(picked) >= limit:
            break
        if t.message_id in seen or not t.text.strip():
            continue
        seen.add(t.message_id)
        picked.append(t)
    picked.sort(key=lambda t: t.message_id or 0)  # snowflakes grow with time
    return picked + [current]


def chat_messages(system_prompt: str, turns: Sequence[Turn], max_chars: int) -> list[dict[str, str]]:
    """Chat messages for the engine: system prompt + turns within a character budget, by the
    one rule serving and training share (``guildtune.prompting.fit_messages``): oldest turns go
    first, the current (last) turn always stays, cut from its start if it alone is too long;
    consecutive user turns are merged (many chat templates expect alternating roles)."""
    return estimate_chat(system_prompt, [(t.role, t.text) for t in turns],
                         max_chars // CHARS_PER_TOKEN)


def kept_turns(turns: Sequence[Turn], shown: Sequence[dict[str, str]]) -> list[Turn]:
    """The turns behind ``shown`` (what ``chat_messages`` returned for ``turns``), so that what
    is stored is what the model was shown, not the wider window around it. ``chat_messages``
    merges consecutive user turns into one message and drops the oldest messages whole, so the
    kept turns are those of its last ``len(shown) - 1`` merged groups (one message is the
    system prompt)."""
    starts = [i for i, t in enumerate(turns)
              if i == 0 or not (t.role == "user" and turns[i - 1].role == "user")]
    dropped = max(len(starts) - (len(shown) - 1), 0)
    return list(turns[starts[dropped]:]) if dropped < len(starts) else list(turns[-1:])
