"""The Discord-independent pieces: reply splitting, triggers, context, rate limits."""

from __future__ import annotations

import pytest

from bot.handlers import (RateLimiter, Turn, chat_messages, merge_context, reply_reason,
                          split_reply)

T = "2026-11-26T08:15:00.000Z"  # when the turns below were written (Turn requires it)


def test_split_short_reply_is_one_part() -> None:
    assert split_reply("  hi  ") == ["hi"]


def test_split_long_reply_at_word_boundaries() -> None:
    words = [f"word{i}" for i in range(800)]
    parts = split_reply(" ".join(words))
    assert len(parts) >= 3 and all(len(p) <= 2000 for p in parts)
    assert " ".join(parts).split() == words  # nothing lost, no word cut in two


def test_split_reopens_code_fences() -> None:
    text = "look:\n```py\n" + "x = 1\n" * 600 + "```\ndone"
    parts = split_reply(text)
    assert len(parts) >= 2 and all(len(p) <= 2000 for p in parts)
    for p in parts:
        assert p.count("```") % 2 == 0, p[:40]  # every part renders on its own
    assert parts[1].startswith("```py\n")
    body = "".join(p.replace("```py\n", "").replace("\n```", "") for p in parts)
    assert body.count("x = 1") == 600


def test_split_hard_cuts_a_giant_word() -> None:
    parts = split_reply("a" * 4500)
    assert [len(p) for p in parts] == [1996, 1996, 508]


def test_a_cut_reply_ends_in_the_mark() -> None:
    from bot.replies import CUT_MARK, mark_cut

    assert mark_cut("the quick bro  ") == "the quick bro" + CUT_MARK


def test_a_reply_cut_inside_code_gets_the_mark_after_the_fence() -> None:
    from bot.replies import CUT_MARK, mark_cut

    marked = mark_cut("try:\n```py\nx = 1\nfor i in")
    assert marked == f"try:\n```py\nx = 1\nfor i in\n```\n{CUT_MARK}"
    assert all(part.count("```") % 2 == 0 for part in split_reply(marked))


BASE = dict(is_bot=False, is_system=False, mentions_everyone=False, is_dm=False,
            mentioned_me=False, reply_to_me=False, channel_configured=False)


@pytest.mark.parametrize("changes, expected", [
    ({"mentioned_me": True}, "mention"),
    ({"reply_to_me": True}, "reply"),
    ({"channel_configured": True}, "channel"),
    ({}, None),
    ({"mentioned_me": True, "is_bot": True}, None),
    ({"mentioned_me": True, "is_system": True}, None),
    ({"mentioned_me": True, "mentions_everyone": True}, None),
    ({"is_dm": True}, None),
    ({"is_dm": True, "allow_dms": True}, "dm"),
    ({"mentioned_me": True, "reply_on_mention": False}, None),
    ({"reply_to_me": True, "reply_on_reply": False}, None),
])
def test_reply_reason(changes: dict, expected: str | None) -> None:
    assert reply_reason(**{**BASE, **changes}) == expected


def test_merge_context_keeps_chain_and_newest_recent() -> None:
    chain = [Turn("assistant", 9, 5, "bot said", created_utc=T),
             Turn("user", 1, 2, "root", created_utc=T)]
    recent = [Turn("user", 3, i, f"m{i}", created_utc=T) for i in range(10, 20)] + [chain[0]]
    cur = Turn("user", 1, 30, "now", created_utc=T)
    got = merge_context(chain, recent, cur, limit=4)
    assert [t.message_id for t in got] == [2, 5, 18, 19, 30]


def test_chat_messages_budget_drops_oldest_and_merges_users() -> None:
    turns = [Turn("user", 1, 1, "x" * 500, created_utc=T),
             Turn("assistant", 9, 2, "ok", created_utc=T),
             Turn("user", 1, 3, "a", created_utc=T), Turn("user", 2, 4, "b", created_utc=T)]
    msgs = chat_messages("SYS", turns, max_chars=300)
    assert msgs[0] == {"role": "system", "content": "SYS"}
    assert msgs[1:] == [{"role": "assistant", "content": "ok"},
                        {"role": "user", "content": "a\nb"}]


def test_rate_limiter_sliding_window() -> None:
    now = [1000.0]
    rl = RateLimiter(2, lambda: now[0])
    assert rl.retry_after("u") == 0
    rl.hit("u"); rl.hit("u")
    assert rl.retry_after("u") == pytest.approx(60)
    now[0] += 30
    assert rl.retry_after("u") == pytest.approx(30)
    now[0] += 31
    assert rl.retry_after("u") == 0 and "u" not in rl._hits
