"""Property: over random event streams (chat, consent, ratings, edits, forgets, and training
runs that start and publish at random points), nothing of a member without consent at the time
is stored, a forgotten member appears nowhere (every column of every table is scanned), no
active version was trained on a member who is not opted in, and every forget report is true."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from storage import ConsentChangedError, Store, utc_now
from tests.backends import columns, count, intact, rows, table_names

# Each property holds on SQLite and on PostgreSQL (tests/conftest.py: ``backend``).
pytestmark = pytest.mark.backends
# One store factory serves every example (each call gives an empty store): not a leak.
ONE_FACTORY = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture]

GUILDS = (111_000_000_000_000_001, 111_000_000_000_000_002)
USERS = tuple(900_000_000_000_000_001 + k for k in range(4))
BOT = 555_000_000_000_000_000

guild = st.sampled_from(GUILDS)
user = st.sampled_from(USERS)
events = st.lists(st.one_of(
    st.tuples(st.just("grant"), guild, user),
    st.tuples(st.just("revoke"), guild, user),
    st.tuples(st.just("ask"), guild, user),  # a member talks to the bot
    st.tuples(st.just("chat"), guild, user),  # a member talks to members
    st.tuples(st.just("react"), guild, user, st.integers(0, 30), st.sampled_from([1, -1])),
    st.tuples(st.just("unreact"), guild, user, st.integers(0, 30)),
    st.tuples(st.just("correct"), guild, user, st.integers(0, 30)),
    st.tuples(st.just("edit"), guild, st.integers(0, 60)),
    st.tuples(st.just("delete"), guild, st.integers(0, 60)),
    st.tuples(st.just("forget"), st.one_of(st.none(), guild), user),
    st.tuples(st.just("run_start"), guild),  # a worker claims a run and reads its dataset
    st.tuples(st.just("run_publish"), guild),  # ... and, some events later, publishes it
), max_size=60)


def _dataset_members(store, g: int) -> dict[int, int]:
    """Whose data a run reading guild ``g`` now would train on (a superset of what
    ``build_dataset`` keeps: every opted-in member with a stored row, and every rater)."""
    who: dict[int, int] = {}
    for r in store.rated_interactions(g):
        for u in (r["user_id"], *r["raters"], *(c["user_id"] for c in r["corrections"])):
            who[int(u)] = who.get(int(u), 0) + 1
    for p in store.reply_pairs(g):
        for u in (p["parent_user"], p["reply_user"]):
            who[int(u)] = who.get(int(u), 0) + 1
    return who


def _check_served(store, consented: set[tuple[int, int]]) -> None:
    for g, (v, _) in store.active_versions().items():
        for u in store.contributors(g, v):
            assert (g, u) in consented, f"active v{v} of {g} learned from {u}, not opted in"


def _dump(store) -> str:
    """Every value of every row of every table, as one string."""
    parts = []
    for table in table_names(store):
        for row in rows(store, table):
            parts.extend(str(v) for v in row)
    return "\x1e".join(parts)


@settings(max_examples=80, deadline=None, suppress_health_check=ONE_FACTORY)
@given(events)
def test_consent_and_forgetting_hold_over_random_streams(make_store: Callable[[], Store],
                                                         stream: list[tuple]) -> None:
    check_stream(make_store(), stream)


def check_stream(store: Store, stream: list[tuple]) -> None:
    consented: set[tuple[int, int]] = set()
    forbidden: set[str] = set()  # texts written while their author had no consent
    written: dict[int, set[str]] = {u: set() for u in USERS}
    forgotten: set[tuple[int | None, int]] = set()
    messages: list[tuple[int, int]] = []  # (guild, message id) seen so far
    recent: dict[int, list[tuple[int, int, str, str]]] = {g: [] for g in GUILDS}
    replies: dict[int, list[int]] = {g: [] for g in GUILDS}
    counter = 0
    runs: dict[int, tuple[int, str, dict[int, int]]] = {}  # guild -> run in flight
    left: set[tuple[int, int]] = set()  # (guild, member) who left since the runs started
    for g in GUILDS:
        store.update_guild_settings(g, learn_from_humans=True)
    for ev in stream:
        kind = ev[0]
        counter += 1
        if kind == "grant":
            time.sleep(0.002)  # so "before consent" and "after" differ in the timestamps
            store.grant_consent(ev[1], ev[2])
            time.sleep(0.002)
            consented.add((ev[1], ev[2]))
            forgotten = {f for f in forgotten if f[1] != ev[2]}
        elif kind == "revoke":
            store.revoke_consent(ev[1], ev[2])
            consented.discard((ev[1], ev[2]))
            left.add((ev[1], ev[2]))
        elif kind in ("ask", "chat", "correct"):
            # recent: (author, message id, text, time written)
            g, u = ev[1], ev[2]
            text = f"tok{counter:05d}x"
            (written[u].add(text) if (g, u) in consented else forbidden.add(text))
            at = utc_now()
            mid = 700_000_000_000_000_000 + counter
            if kind == "chat":
                store.log_message(g, mid, u, text)
            elif kind == "ask":
                context = [{"role": "user", "author_id": a, "message_id": m, "text": t,
                            "created_utc": w} for a, m, t, w in recent[g][-3:]]
                context.append({"role": "user", "author_id": u, "message_id": mid,
                                "text": text, "created_utc": at})
                reply_id = 800_000_000_000_000_000 + counter
                store.log_interaction(g, 5, u, context=context, reply=f"bot{counter}",
                                      request_message_id=mid, reply_message_id=reply_id)
                replies[g].append(reply_id)
            else:
                rows = store.rated_interactions(g)
                if rows:
                    store.add_correction(g, rows[ev[3] % len(rows)]["id"], u, text)
            recent[g].append((u, mid, text, at))
            messages.append((g, mid))
        elif kind in ("react", "unreact"):
            g, u = ev[1], ev[2]
            if replies[g]:
                rid = replies[g][ev[3] % len(replies[g])]
                if kind == "react":
                    store.record_feedback(g, rid, u, ev[4])
                else:
                    store.remove_feedback(g, rid, u)
        elif kind in ("edit", "delete"):
            if messages:
                g, mid = messages[ev[2] % len(messages)]
                if kind == "edit":
                    text = f"tok{counter:05d}e"
                    forbidden.add(text)  # edits of non-consented messages must not land
                    # only a consented author's stored copy may take the edit
                    store.edit_message(g, mid, text)
                    owner = next((a for a, m, _, _ in recent[g] if m == mid), None)
                    if owner is not None and (g, owner) in consented:
                        forbidden.discard(text)
                        written[owner].add(text)
                else:
                    store.delete_message(g, mid)
        elif kind == "run_start" and ev[1] not in runs:
            g = ev[1]
            store.enqueue_run(g, "schedule")
            run = store.claim_run("w", 600, guild_id=g)
            if run is not None:
                at = utc_now()
                runs[g] = (run.id, at, _dataset_members(store, g))
                left = {x for x in left if x[0] != g}
        elif kind == "run_publish" and ev[1] in runs:
            g = ev[1]
            run_id, at, who = runs.pop(g)
            try:
                store.register_version(g, store.next_version(g), f"/a/{counter}",
                                       base_model="tiny", lora={}, contributors=who,
                                       run_id=run_id, activate=True, dataset_utc=at)
                status = "succeeded"
                assert not any((g, u) in left for u in who), "kept a run a member left"
            except ConsentChangedError:
                status = "rejected"
                # A member who left during the run (even if back since) makes it unclean.
                assert any((g, u) not in consented or (g, u) in left for u in who), \
                    "refused a clean run"
            store.finish_run(run_id, status)
        elif kind == "forget":
            g, u = ev[1], ev[2]
            scope = GUILDS if g is None else (g,)
            trained = {(gg, v.version) for gg in scope for v in store.versions(gg)
                       if u in store.contributors(gg, v.version)}
            in_flight = {gg: runs[gg][0] for gg in scope if gg in runs and
                         store.db.execute(
                             "SELECT 1 FROM consents WHERE guild_id = ? AND user_id = ? "
                             "UNION SELECT 1 FROM interactions WHERE guild_id = ? AND "
                             "user_id = ? UNION SELECT 1 FROM messages WHERE guild_id = ? "
                             "AND user_id = ? UNION SELECT 1 FROM feedback WHERE "
                             "guild_id = ? AND user_id = ?", [gg, u] * 4).fetchone()}
            report = store.forget_user(u, g)
            left |= {(gg, u) for gg in scope}
            # The report is true: every version trained on them, every run in flight.
            assert set(report.tainted) == trained
            assert report.in_flight == in_flight
            for gg, _ in trained:
                active = store.active_version(gg)
                assert active is None or active.tainted_utc is None
            forgotten.add((g, u))
            if g is None:
                consented = {c for c in consented if c[1] != u}
                written[u] = set()
            else:
                consented.discard((g, u))
        _check_served(store, consented)
    dump = _dump(store)
    for text in forbidden:
        assert text not in dump, f"stored text of a member without consent: {text}"
    for g, u in forgotten:
        if g is None:
            assert str(u) not in dump, f"forgotten member {u} still stored"
        else:
            for table in table_names(store):
                cols = columns(store, table)
                if "guild_id" in cols and "user_id" in cols:
                    n = count(store, table, "guild_id = ? AND user_id = ?", [g, u])
                    assert n == 0, (table, g, u)
    assert intact(store)


# A narrower alphabet, so that the interleavings that matter (data, a run starts, consent
# changes, the run publishes) come up in most streams rather than in a few.
few_users = st.sampled_from(USERS[:3])
one_guild = st.just(GUILDS[0])
grant, ask = (st.tuples(st.just(k), one_guild, few_users) for k in ("grant", "ask"))
run_events = st.lists(st.one_of(
    grant, grant, ask, ask,  # listed twice: members with data are what a run can learn from
    st.tuples(st.just("revoke"), one_guild, few_users),
    st.tuples(st.just("forget"), st.one_of(st.none(), one_guild), few_users),
    st.tuples(st.just("run_start"), one_guild),
    st.tuples(st.just("run_publish"), one_guild),
), max_size=25)


@settings(max_examples=200, deadline=None, suppress_health_check=ONE_FACTORY)
@given(run_events)
def test_no_served_version_learned_from_a_member_who_left_over_run_interleavings(
        make_store: Callable[[], Store], stream: list[tuple]) -> None:
    check_stream(make_store(), stream)


def _round(asker: int, leaver: int, action: str, publish_first: bool) -> list[tuple]:
    """One shape that matters, varied: data, a run starts and reads it, a member leaves (or
    comes back) before or after the run publishes."""
    g = GUILDS[0]
    leave = {"none": [], "revoke": [("revoke", g, leaver)], "forget": [("forget", g, leaver)],
             "forget_all": [("forget", None, leaver)],
             "regrant": [("forget", g, leaver), ("grant", g, leaver)]}[action]
    start = [("grant", g, asker), ("ask", g, asker), ("run_start", g)]
    publish = [("run_publish", g)]
    return start + (publish + leave if publish_first else leave + publish)


rounds = st.lists(st.tuples(few_users, few_users,
                            st.sampled_from(["none", "revoke", "forget", "forget_all",
                                             "regrant"]), st.booleans()),
                  min_size=1, max_size=5)


@settings(max_examples=60, deadline=None, suppress_health_check=ONE_FACTORY)
@given(rounds)
def test_every_run_round_ends_with_nothing_served_from_a_member_who_left(
        make_store: Callable[[], Store], spec: list[tuple[int, int, str, bool]]) -> None:
    check_stream(make_store(), [ev for r in spec for ev in _round(*r)])
