"""The per-member share cap counts what the loss sees: supervised tokens times the weight.

Each attack runs twice through ``build_dataset`` on a real store: once with every example
weighing 1 (the cap counted examples only, as before), once as shipped. Shares are measured in
weighted supervised tokens with the same estimate the cap uses.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from guildtune.config import Config
from storage import Store, open_store
from storage.times import format_utc
from tests.fakes import TINY, make_config
from trainer import data
from trainer.data import (RATING_ONLY_GROUP, Example, build_dataset, cap_user_share,
                          estimate_tokens, supervised_mass)

G = 7
CAP = 0.25
T0 = datetime.now(UTC) - timedelta(days=1)
_ids = iter(range(10**6, 10**9))


@pytest.fixture
def cfg(tmp_path: Path) -> Config:
    return make_config(tmp_path, TINY, training={"enabled": True, "heldout_fraction": 0.1},
                       privacy={"max_user_share": CAP})


@pytest.fixture
def store(cfg: Config) -> Iterator[Store]:
    s = open_store(cfg.db_path)
    yield s
    s.close()


def at(i: int) -> str:
    return format_utc(T0 + timedelta(seconds=i))


def opt_in(store: Store, user: int) -> None:
    """Opted in since before T0: the history written at ``at(i)`` is theirs to give (the store
    keeps nothing written before a member's consent)."""
    store.grant_consent(G, user)
    store.db.execute("UPDATE consents SET granted_utc = ? WHERE guild_id = ? AND user_id = ?",
                     [format_utc(T0 - timedelta(days=1)), G, user])


def chat(store: Store, user: int, text: str, reply: str, i: int) -> str:
    """A member asks the bot, gets ``reply`` and likes it; returns the interaction id."""
    opt_in(store, user)
    rid = next(_ids)
    res = store.log_interaction(G, 1, user, reply=reply, reply_message_id=rid, context=[
        {"role": "user", "author_id": user, "message_id": next(_ids), "text": text,
         "created_utc": at(i)}])
    assert res.stored and store.record_feedback(G, rid, user, 1)
    return res.interaction_id


def human_reply(store: Store, parent_user: int, reply_user: int, parent: str, reply: str,
                i: int) -> None:
    """One member answers another in the channel (a training pair with learn_from_humans)."""
    for u in (parent_user, reply_user):
        opt_in(store, u)
    pid = next(_ids)
    assert store.log_message(G, pid, parent_user, parent, created_utc=at(i))
    assert store.log_message(G, next(_ids), reply_user, reply, reply_to_message_id=pid,
                             created_utc=at(i + 1))


@contextmanager
def counting_examples() -> Iterator[None]:
    """The cap as it was: every example weighs the same, so only the example count is capped."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(data, "supervised_mass", lambda *a, **k: 1.0)
        yield


def kept(d: data.Dataset) -> list[Example]:
    return [*d.train, *d.heldout, *d.negatives]


def mass_share(examples: list[Example], key: int, cfg: Config) -> float:
    """``key``'s share of the weighted supervised tokens (a member, or the rating-only slice)."""
    def m(e: Example) -> float:
        return supervised_mass(e, estimate_tokens, cfg.training.max_seq_len)
    return sum(m(e) for e in examples if key in e.cap_keys) / sum(m(e) for e in examples)


def count_share(examples: list[Example], key: int) -> float:
    return sum(key in e.cap_keys for e in examples) / len(examples)


def test_one_member_with_long_messages_is_held_to_the_share_of_tokens(store: Store,
                                                                      cfg: Config) -> None:
    store.update_guild_settings(G, learn_from_humans=True)
    members = list(range(100, 116))
    long_writer = 999
    i = 0
    for n in range(80):  # 16 members answer each other in a sentence or two
        a, b = members[n % 16], members[(n * 7 + 3) % 16]
        if a == b:
            b = members[(n + 1) % 16]
        human_reply(store, a, b, f"how would you do thing {n}?", f"approach {n} worked for me", i)
        i += 2
        if n % 4 == 0 and n < 72:  # and one member answers with an essay, now and then
            human_reply(store, a, long_writer, f"what about case {n}?",
                        f"Essay {n}: " + "a long explanation of each detail. " * 15, i)
            i += 2
    with counting_examples():
        before = kept(build_dataset(store, G, cfg))
    after_data = build_dataset(store, G, cfg)
    after = kept(after_data)
    # Before: under the cap in examples, far over it in what the loss sees.
    assert 0.15 < count_share(before, long_writer) <= CAP  # 18/98 examples
    assert mass_share(before, long_writer, cfg) > 0.75  # ~81% of the weighted tokens
    # After: at or under the cap in weighted supervised tokens; nothing else was lost.
    assert 0 < mass_share(after, long_writer, cfg) <= CAP
    assert sum(long_writer not in e.cap_keys for e in after) == 80
    assert all(mass_share(after, u, cfg) <= CAP for u in members)
    assert after_data.stats["max_member_mass_share"] <= CAP
    assert after_data.stats["tokens_estimated"] is True


def test_four_rating_only_accounts_writing_corrections_share_one_slice_of_tokens(
        store: Store, cfg: Config) -> None:
    """Four accounts that never talked to the bot each send one message: a correction, which
    weighs ``correction_weight`` (2) and is three times as long as the replies it replaces."""
    assert cfg.training.correction_weight == 2.0
    iids = [chat(store, 100 + n, f"question {n}?", f"short answer {n:02d}", n)
            for n in range(12)]
    ring = [700, 701, 702, 703]
    for n, u in enumerate(ring):
        store.grant_consent(G, u)
        assert store.add_correction(G, iids[n * 3], u,
                                    f"Actually the right answer {n} is the one we sell here!!")
    with counting_examples():
        before = kept(build_dataset(store, G, cfg))
    after_data = build_dataset(store, G, cfg)
    after = kept(after_data)
    assert {e.owner for e in before if e.kind == "correction"} == set(ring)
    assert count_share(before, RATING_ONLY_GROUP) <= CAP  # the ring was within the old cap...
    assert mass_share(before, RATING_ONLY_GROUP, cfg) > 0.6  # ...and held two thirds of it
    assert mass_share(after, RATING_ONLY_GROUP, cfg) <= CAP
    assert all(mass_share(after, u, cfg) <= CAP for u in ring)
    assert sum(e.kind == "liked" for e in after) == 12  # the members' own data all stays


def test_a_balanced_community_keeps_all_its_examples(store: Store, cfg: Config) -> None:
    store.update_guild_settings(G, learn_from_humans=True)
    members = list(range(200, 210))
    for u in members:
        store.grant_consent(G, u)
    i = 0
    for n in range(60):
        u = members[n % 10]
        # Replies of ordinary, varied length (20 to 80 characters).
        chat(store, u, f"question {n}?", f"answer {n} " + "la " * (3 + (n * 7) % 20), i)
        i += 1
        if n % 3 == 0:
            human_reply(store, u, members[(n + 3) % 10], f"thoughts on {n}?",
                        f"reply {n} " + "ok " * (4 + (n * 5) % 15), i)
            i += 2
        if n % 10 == 0:  # corrections (weight 2) by members who chat
            iid = chat(store, u, f"another {n}?", f"meh {n}", i)
            i += 1
            assert store.add_correction(G, iid, members[(n + 5) % 10], f"better answer {n}")
    d = build_dataset(store, G, cfg)
    assert d.stats["capped_out"] == 0 and d.stats["kept"] == d.stats["unique"] == 92
    assert d.stats["max_member_mass_share"] <= CAP


def ex(i: int, owner: int, target: str, *, kind: str = "human", weight: float = 1.0) -> Example:
    return Example((("system", "s"), ("user", f"q{i}"), ("assistant", target)), kind, owner,
                   weight=weight, created_utc=f"2024-01-01T00:{i // 60:02d}:{i % 60:02d}")


def test_count_only_and_mass_caps_on_the_same_pool() -> None:
    """The two limits on a plain pool: the long writer fits the example count, not the mass.
    The mass limit is the share plus one ordinary example (twice the median, 2 * 7 tokens)."""
    pool = [ex(i, 1 + i % 8, f"fine answer number {i}") for i in range(80)]  # 7 tokens each
    pool += [ex(100 + i, 9, "x" * 300) for i in range(16)]  # 100 tokens each
    old = cap_user_share(pool, CAP, 1000, mass=lambda e: 1.0)
    new = cap_user_share(pool, CAP, 1000)
    assert sum(e.owner == 9 for e in old) == 16  # 16 of 96 examples, 1600 of 2160 tokens
    # Two essays: 200 of 760 tokens, within 0.25 * 760 + 14; a third would not be.
    assert sum(e.owner == 9 for e in new) == 2
    total = sum(supervised_mass(e) for e in new)
    assert sum(supervised_mass(e) for e in new if e.owner == 9) <= CAP * total + 14
    assert sum(e.owner != 9 for e in new) == 80


def test_four_members_with_different_lengths_each_hold_a_quarter_of_the_tokens() -> None:
    """With 1 / share members, each at the share, examples and tokens cannot both be equal:
    the member with short messages may hold more examples while under the token share."""
    pool = [ex(i, i % 4, "y" * (15 * (1 + i % 4))) for i in range(400)]  # 5, 10, 15, 20 tokens
    chosen = cap_user_share(pool, CAP, 1000)
    total = sum(supervised_mass(e) for e in chosen)
    by_owner = {o: sum(supervised_mass(e) for e in chosen if e.owner == o) for o in range(4)}
    assert all(m <= CAP * total + 2 * 15 for m in by_owner.values()), by_owner
    assert len(chosen) > 150  # not a handful: the limits are met with most of the data


def test_a_members_first_typical_example_is_always_allowed() -> None:
    """Like the count's max(1, ...): a community of three trains on its three ordinary replies
    (each about a third of the tokens); one essay among them is refused, it would be 90%."""
    pool = [ex(0, 1, "all good"), ex(1, 2, "ok then"), ex(2, 3, "fine by me")]
    assert len(cap_user_share(pool, CAP, 1000)) == 3
    chosen = cap_user_share([*pool, ex(3, 4, "x" * 300)], CAP, 1000)
    assert {e.owner for e in chosen} == {1, 2, 3}


def test_budget_and_newest_first_are_kept() -> None:
    pool = [ex(i, 1 + i % 10, f"answer {i}") for i in range(50)]
    chosen = cap_user_share(pool, CAP, 20)
    assert [e.created_utc for e in chosen] == sorted((e.created_utc for e in pool),
                                                    reverse=True)[:20]


def test_token_estimate_and_exact_counts() -> None:
    assert [estimate_tokens(t) for t in ("", "ab", "abc", "abcd", "x" * 300)] == [1, 1, 1, 2, 100]
    long = ex(0, 1, "x" * 30_000, kind="correction", weight=2.0)
    assert supervised_mass(long, max_len=256) == 512.0  # encode keeps at most max_len tokens
    assert supervised_mass(long, lambda s: 7) == 14.0


def test_build_dataset_uses_the_callers_token_count(store: Store, cfg: Config) -> None:
    """A caller with the tokenizer passes the exact count; here member 1's replies tokenize
    into many more tokens than their length suggests, so member 1 is capped."""
    for n in range(20):
        chat(store, 1 + n % 5, f"q {n}", f"answer {n}" + ("!" if n % 5 == 0 else ""), n)
    assert build_dataset(store, G, cfg).stats["capped_out"] == 0

    def count(text: str) -> int:
        return 200 if text.endswith("!") else 3

    d = build_dataset(store, G, cfg, count_tokens=count)
    assert d.stats["tokens_estimated"] is False
    assert d.stats["capped_out"] == 4 and d.stats["max_member_mass_share"] <= CAP
    assert not any(e.owner == 1 for e in kept(d))
