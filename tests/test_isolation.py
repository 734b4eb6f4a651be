"""Cross-guild isolation over random event streams: no stored context, dataset, status or served
adapter of one guild ever involves another guild.

Every text written in guild ``g`` carries the tag ``G<g>:`` so a leak is visible as a foreign
tag; the same member ids act in every guild (members are in many servers), so consent, ratings
and forgetting in one guild must not reach the others either.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bot.handlers import AdapterWatcher, Core, Turn, UserError
from storage.times import utc_now
from tests.fakes import FakeEngine, RecordingChannel, make_services
from trainer.data import build_dataset

GUILDS = (901, 902, 903)
USERS = (11, 12, 13, 14)
TAGS = {g: f"G{g}:" for g in GUILDS}

guild = st.sampled_from(GUILDS)
user = st.sampled_from(USERS)
events = st.lists(st.one_of(
    st.tuples(st.just("consent"), guild, user, st.booleans()),
    st.tuples(st.just("chat"), guild, user, st.integers(0, 99)),
    st.tuples(st.just("rate"), guild, user, st.integers(0, 20), st.sampled_from([1, -1])),
    st.tuples(st.just("unrate"), guild, user, st.integers(0, 20)),
    st.tuples(st.just("suggest"), guild, user, st.integers(0, 20)),
    st.tuples(st.just("forget"), guild, user),
    st.tuples(st.just("persona"), guild),
    st.tuples(st.just("humans"), guild, st.booleans()),
    st.tuples(st.just("observe"), guild, user, st.integers(0, 20)),
    st.tuples(st.just("version"), guild),
), min_size=1, max_size=40)


class TaggingEngine(FakeEngine):
    """Replies carry the tag of the guild the request was made for."""

    async def generate(self, req: Any, on_text: Any = None) -> Any:
        self.default = f"{TAGS.get(req.guild_id, 'DM:')} reply"
        return await super().generate(req, on_text)


def _foreign(text: str, g: int) -> list[str]:
    return [t for h, t in TAGS.items() if h != g and t in text]


async def _run(tmp: Path, stream: list[tuple]) -> None:
    engine = TaggingEngine()
    s = make_services(tmp, engine=engine, training={"enabled": True},
                      discord={"user_rate_per_minute": 10_000, "guild_rate_per_minute": 10_000})
    core = Core(s)
    watcher = AdapterWatcher(s)
    chan = RecordingChannel()
    replies: dict[int, list[int]] = {g: [] for g in GUILDS}
    history: dict[int, list[Turn]] = {g: [] for g in GUILDS}
    mid = iter(range(10**9, 10**10))
    try:
        for ev in stream:
            kind, g = ev[0], ev[1]
            tag = TAGS[g]
            if kind == "consent":
                await core.consent(g, ev[2], ev[3])
            elif kind == "chat":
                m = next(mid)
                cur = Turn("user", ev[2], m, f"{tag} message {ev[3]} of {ev[2]}",
                           created_utc=utc_now())
                turns = history[g][-4:] + [cur]
                history[g].append(cur)
                out = await core.chat(chan, guild_id=g, channel_id=g * 10, user_id=ev[2],
                                      request_message_id=m, turns=turns)
                req = engine.requests[-1]
                assert req.guild_id == g
                assert not _foreign(json.dumps(req.messages), g)
                if out.result is not None:
                    # served this guild's adapter (or the base model), never another's
                    want = s.store.active_version(g)
                    assert out.result.adapter_version == (want.version if want else None)
                    replies[g].append(out.feedback_message_id)
            elif kind in ("rate", "unrate", "suggest") and replies[g]:
                target = replies[g][ev[3] % len(replies[g])]
                if kind == "rate":
                    await core.rate(g, target, ev[2], ev[4])
                elif kind == "unrate":
                    await core.unrate(g, target, ev[2], 1)
                else:
                    try:
                        await core.suggest(g, target, ev[2], f"{tag} better reply")
                    except UserError:
                        pass
            elif kind == "forget":
                await core.forget(g, ev[2])
            elif kind == "persona":
                await core.set_persona(g, f"{tag} persona")
            elif kind == "humans":
                await core._update(g, learn_from_humans=ev[2])
            elif kind == "observe":
                m = next(mid)
                parent = history[g][ev[3] % len(history[g])].message_id if history[g] else None
                await core.observe_message(g, m, ev[2], f"{tag} human line",
                                           channel_id=g * 10, reply_to=parent)
                history[g].append(Turn("user", ev[2], m, f"{tag} human line",
                                       created_utc=utc_now()))
            elif kind == "version":
                # A new adapter version for g goes live: only g's serving may change.
                before = {h: engine.versions.get(h) for h in GUILDS if h != g}
                v = s.store.next_version(g)
                s.store.register_version(g, v, str(tmp / f"a{g}-{v}"), base_model="tiny",
                                         lora={}, contributors={}, activate=True)
                await watcher.sync_once()
                assert engine.versions.get(g) == v
                assert {h: engine.versions.get(h) for h in GUILDS if h != g} == before
        await _check(s, core)
    finally:
        s.store.close()


async def _check(s: Any, core: Core) -> None:
    totals = {"interactions": 0, "likes": 0, "dislikes": 0, "consented_users": 0,
              "corrections": 0, "messages": 0}
    for g in GUILDS:
        rows = s.store.rated_interactions(g)
        for r in rows:
            text = json.dumps([r["context"], r["reply"], r["corrections"]])
            assert not _foreign(text, g), text
        for p in s.store.reply_pairs(g):
            assert not _foreign(p["parent_text"] + p["reply_text"], g)
        data = build_dataset(s.store, g, s.config)
        for ex in (*data.train, *data.heldout, *data.negatives):
            assert not _foreign(json.dumps(ex.messages), g)
        assert data.guild_id == g
        assert set(data.contributors) <= s.store.consented_users(g)
        stats = s.store.guild_stats(g)
        assert stats["guild_id"] == g
        assert stats["interactions"] >= len(rows)  # rows: those of still-consented members
        for k in totals:
            totals[k] += stats[k]
        rep = await core.status(g, chart=False)
        assert rep.guild_id == g and rep.consented_users == stats["consented_users"]
        assert rep.engine_version == s.engine.versions.get(g)
    # Every row is counted by exactly one guild's status.
    db = s.store.db
    assert totals["interactions"] == db.execute("SELECT count(*) FROM interactions").fetchone()[0]
    assert totals["consented_users"] == db.execute("SELECT count(*) FROM consents").fetchone()[0]
    assert totals["messages"] == db.execute("SELECT count(*) FROM messages").fetchone()[0]
    assert totals["corrections"] == db.execute(
        "SELECT count(*) FROM corrections").fetchone()[0]
    assert totals["likes"] + totals["dislikes"] == db.execute(
        "SELECT count(*) FROM feedback").fetchone()[0]
    # A row's guild matches the guild its parent interaction belongs to.
    assert db.execute("SELECT count(*) FROM feedback f JOIN interactions i ON "
                      "i.id = f.interaction_id WHERE i.guild_id != f.guild_id").fetchone()[0] == 0
    assert db.execute("SELECT count(*) FROM corrections k JOIN interactions i ON "
                      "i.id = k.interaction_id WHERE i.guild_id != k.guild_id").fetchone()[0] == 0


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events)
def test_guilds_never_mix(stream: list[tuple]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(_run(Path(tmp), stream))


def test_a_rating_in_one_guild_cannot_touch_anothers_reply(tmp_path: Path) -> None:
    """Message ids are global on Discord: a reaction event naming guild B and a message of
    guild A must not rate A's reply (the store matches on both)."""
    s = make_services(tmp_path)
    a, b = GUILDS[:2]
    for g in (a, b):
        s.store.grant_consent(g, 11)
    s.store.log_interaction(a, 1, 11, context=[], reply=f"{TAGS[a]} r", reply_message_id=77)
    core = Core(s)
    assert not asyncio.run(core.rate(b, 77, 11, 1))
    assert s.store.guild_stats(a)["likes"] == 0 and s.store.guild_stats(b)["likes"] == 0
    s.store.close()
