"""Text rules: what stored text may hold, and how a hidden member's words are found and cut.

Pure functions, no SQL: logging, redaction, forgetting and the trainer's reads all apply these,
so each rule is written once.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

PLACEHOLDER = "[message from a member who has not opted in]"
DELETED = "[deleted message]"
MAX_TEXT_CHARS = 8000  # longer texts are cut; Discord's own limit is 4,000 for Nitro users


_USER_MENTION = re.compile(r"<@!?\d+>")
_ROLE_MENTION = re.compile(r"<@&\d+>")
_WORD = re.compile(r"\S+")
QUOTE_MIN_WORDS = 4  # a verbatim run this long of a hidden member's words is cut from replies
CUT = "[…]"


def _clip(text: str) -> str:
    """Text as it may be stored: no NUL bytes (legal in SQLite TEXT, but they break most tools
    that read it back), no raw mention markup (a mention carries a member's id; the front ends
    store readable names, and this catches any path that did not), at most MAX_TEXT_CHARS."""
    text = text.replace("\x00", "")
    if "<@" in text:
        text = _ROLE_MENTION.sub("@role", _USER_MENTION.sub("@member", text))
    return text[:MAX_TEXT_CHARS]


def _norm_word(word: str) -> str:
    return word.strip(".,;:!?\"'()[]{}*_~`").casefold()


def quoted_grams(texts: Iterable[str], n: int = QUOTE_MIN_WORDS) -> set[tuple[str, ...]]:
    """Every run of ``n`` consecutive words of ``texts`` (normalized), to find quotes of them."""
    grams: set[tuple[str, ...]] = set()
    for text in texts:
        words = [w for w in (_norm_word(m.group()) for m in _WORD.finditer(text or "")) if w]
        grams.update(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    return grams


def cut_quotes(text: str, grams: set[tuple[str, ...]], n: int = QUOTE_MIN_WORDS) -> str:
    """``text`` with every verbatim run of ``n`` or more words found in ``grams`` replaced by
    ``[…]``: a reply of the bot that repeats a hidden or forgotten member's words keeps its own
    words only."""
    if not grams or not text:
        return text
    tokens = [(m.start(), m.end(), _norm_word(m.group())) for m in _WORD.finditer(text)]
    tokens = [t for t in tokens if t[2]]
    cut = [False] * len(tokens)
    for i in range(len(tokens) - n + 1):
        if tuple(t[2] for t in tokens[i:i + n]) in grams:
            for j in range(i, i + n):
                cut[j] = True
    if not any(cut):
        return text
    out, pos, i = [], 0, 0
    while i < len(tokens):
        if not cut[i]:
            i += 1
            continue
        j = i
        while j + 1 < len(tokens) and cut[j + 1]:
            j += 1
        out.append(text[pos:tokens[i][0]])
        out.append(CUT)
        pos = tokens[j][1]
        i = j + 1
    out.append(text[pos:])
    return "".join(out)


def hidden_turn(text: str = PLACEHOLDER) -> dict[str, Any]:
    """A stored context turn whose author and words are not kept: the placeholder of a member
    without consent (or forgotten), or ``DELETED`` for a deleted message."""
    return {"role": "user", "author_id": None, "message_id": None, "text": text}


def _withhold(context: list[dict[str, Any]], consented: set[str],
              ) -> tuple[list[dict[str, Any]], list[str]]:
    """A stored context as training may read it now: turns of members who have opted out
    since it was stored become the placeholder, and the bot's turns lose quotes of them.
    Returns (context, the withheld texts)."""
    hidden = [e.get("text", "") for e in context
              if e.get("role") != "assistant" and e.get("author_id") is not None
              and e["author_id"] not in consented]
    if not hidden:
        return context, []
    grams = quoted_grams(hidden)
    out = []
    for e in context:
        if e.get("role") != "assistant" and e.get("author_id") is not None \
                and e["author_id"] not in consented:
            out.append(hidden_turn())
        elif e.get("role") == "assistant":
            out.append({**e, "text": cut_quotes(e.get("text", ""), grams)})
        else:
            out.append(e)
    return out, hidden


def _name_pattern(user_id: int, names: Iterable[str]) -> re.Pattern[str]:
    """A member's id and names as they appear in stored text: mention markup, the raw id (only
    when it is snowflake-sized: a small number is ordinary chat), and ``@name`` (the front ends
    store mentions as ``@display name``). Bare words are never matched: a member named "the"
    or "Will" must not erase everyone's ordinary words."""
    alts = [rf"<@!?{int(user_id)}>"]
    if len(str(int(user_id))) >= 15:
        alts.append(rf"(?<!\d){int(user_id)}(?!\d)")
    for name in sorted({n.strip().lstrip("@") for n in names if n and n.strip().lstrip("@")}
                       - {"everyone", "here"}, key=len, reverse=True):
        alts.append(rf"(?<![\w@])@{re.escape(name)}(?!\w)")
    return re.compile("|".join(alts), re.IGNORECASE)
