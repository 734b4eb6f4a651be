"""Forgetting reaches the served model on every path a hostile member, a busy worker or a
restart can take: a forget (or an opt-out, or a forget followed by a new opt-in) in the middle of
a training run, the retrain after a forget, the default config, quotes of a member in the bot's
replies, their id and names in other members' texts, and the bytes left on disk."""

from __future__ import annotations

import json
import os
import stat
from datetime import timedelta
from pathlib import Path

import pytest

from bot.handlers import forget_text
from guildtune.config import parse_config
from storage import PLACEHOLDER, ConsentChangedError, Store, open_store, utc_now
from storage.times import format_utc, parse_utc
from tests.fakes import STYLE_TRAINER, import_style, make_config

# The store-level promises hold on PostgreSQL too (tests/conftest.py: ``backend``).
pytestmark = pytest.mark.backends
from trainer.data import build_dataset
from trainer.scrub import scrub

G, H = 1001, 2002
ALICE, BOB, CAROL = 11, 22, 33


def _register(store: Store, version: int, who: dict[int, int], *, dataset_utc: str | None = None,
              activate: bool = True, run_id: int | None = None) -> None:
    store.register_version(G, version, f"/a/{version}", base_model="tiny", lora={},
                           contributors=who, activate=activate, dataset_utc=dataset_utc,
                           run_id=run_id)


def _running(store: Store) -> int:
    run_id, _ = store.enqueue_run(G, "schedule")
    run = store.claim_run("w1", 60, guild_id=G)
    assert run is not None and run.id == run_id
    return run_id


def _contributor_rows(store: Store, user: int) -> int:
    return store.db.execute("SELECT count(*) FROM adapter_contributors WHERE user_id = ?",
                            [user]).fetchone()[0]


# -- a forget while a run is in flight (store level: every interleaving point) -------------------

def test_forget_during_a_run_its_version_is_never_registered_and_a_retrain_follows(
        store: Store) -> None:
    for u in (ALICE, BOB):
        store.grant_consent(G, u)
    run_id = _running(store)
    dataset_utc = utc_now()  # the run reads its data (Alice's included) ...
    report = store.forget_user(ALICE, G)  # ... Alice forgets while it fits
    assert report.in_flight == {G: run_id} and not report.retrain_runs
    text = forget_text(report)
    assert "No model version was trained on your data" not in text
    assert "training run was in progress" in text and "will not be used" in text
    # ... it publishes: refused in the registering transaction, nothing kept, Alice not
    # re-inserted as a contributor.
    with pytest.raises(ConsentChangedError):
        _register(store, 1, {ALICE: 3, BOB: 2}, dataset_utc=dataset_utc, run_id=run_id)
    assert store.versions(G) == [] and store.active_version(G) is None
    assert _contributor_rows(store, ALICE) == 0
    # The run ends (as the pipeline reports it): a retrain without her is queued after it.
    assert store.finish_run(run_id, "rejected", error="not kept")
    follow = store.open_run(G)
    assert follow is not None and follow.id != run_id and follow.trigger == "forget"


def test_forget_then_opt_in_again_during_a_run_still_refuses_that_run(store: Store) -> None:
    for u in (ALICE, BOB):
        store.grant_consent(G, u)
    run_id = _running(store)
    dataset_utc = utc_now()
    store.forget_user(ALICE, G)
    store.grant_consent(G, ALICE)  # back at once: her old data is gone, the run still has it
    with pytest.raises(ConsentChangedError):
        _register(store, 1, {ALICE: 3, BOB: 2}, dataset_utc=dataset_utc, run_id=run_id)
    assert store.versions(G) == []


def test_opt_out_during_a_run_refuses_it_and_taints_what_she_trained(store: Store) -> None:
    for u in (ALICE, BOB):
        store.grant_consent(G, u)
    _register(store, 1, {ALICE: 1, BOB: 1})
    run_id = _running(store)
    dataset_utc = utc_now()
    assert store.revoke_consent(G, ALICE)  # default strict: v1 stops serving at once
    assert store.active_version(G) is None and store.versions(G)[0].tainted_utc
    with pytest.raises(ConsentChangedError):
        _register(store, 2, {ALICE: 3, BOB: 2}, dataset_utc=dataset_utc, run_id=run_id)
    store.finish_run(run_id, "rejected")
    assert store.open_run(G).trigger == "forget"


def test_a_run_whose_worker_died_after_a_forget_is_still_followed_by_a_retrain(
        store: Store) -> None:
    from datetime import UTC, datetime, timedelta

    store.grant_consent(G, ALICE)
    run_id = _running(store)
    store.db.execute("UPDATE training_runs SET attempt = 2 WHERE id = ?", [run_id])  # last try
    store.forget_user(ALICE, G)
    assert store.recover_stale_runs(datetime.now(UTC) + timedelta(hours=1)) == [run_id]
    assert store.open_run(G) is not None and store.open_run(G).trigger == "forget"


def test_clean_run_publishes_even_if_an_unrelated_member_joined_meanwhile(store: Store) -> None:
    for u in (ALICE, BOB):
        store.grant_consent(G, u)
    dataset_utc = utc_now()
    store.grant_consent(G, CAROL)  # not in the data: no reason to refuse
    _register(store, 1, {ALICE: 3, BOB: 2}, dataset_utc=dataset_utc)
    assert store.active_version(G).version == 1


# -- the default config and the non-strict mode --------------------------------------------------

def test_default_config_stops_serving_a_tainted_version_at_once(store: Store) -> None:
    cfg = parse_config({})
    assert cfg.training.strict_forget is True
    for u in (ALICE, BOB):
        store.grant_consent(G, u)
    _register(store, 1, {BOB: 1})
    _register(store, 2, {ALICE: 1, BOB: 1})
    report = store.forget_user(ALICE, G, strict=cfg.training.strict_forget)
    assert report.deactivated == [G]
    assert store.active_version(G).version == 1  # the last clean version serves meanwhile
    assert "went back to a version without your data" in forget_text(report)


def test_non_strict_tainted_version_stops_serving_when_the_retrain_ends_even_rejected(
        store: Store) -> None:
    store.update_guild_settings(G, training_enabled=True)
    for u in (ALICE, BOB):
        store.grant_consent(G, u)
    _register(store, 1, {ALICE: 1, BOB: 1})
    report = store.forget_user(ALICE, G, strict=False)
    assert store.active_version(G).version == 1  # serves until the retrain ends
    run = store.claim_run("w", 60, guild_id=G)
    assert run is not None and run.id == report.retrain_runs[G]
    store.finish_run(run.id, "rejected", error="candidate did not beat the base")
    assert store.active_version(G) is None  # never kept serving past the retrain


def test_the_bar_for_a_retrain_is_the_newest_clean_version(store: Store) -> None:
    store.update_guild_settings(G, training_enabled=True)
    for u in (ALICE, BOB):
        store.grant_consent(G, u)
    _register(store, 1, {BOB: 1})
    _register(store, 2, {ALICE: 1, BOB: 1})
    store.forget_user(ALICE, G, strict=False)
    assert store.active_version(G).version == 2  # tainted, still serving
    assert store.newest_clean_version(G).version == 1


# -- quotes, ids and names ------------------------------------------------------------------------

def _ctx(*turns: tuple[str, int | None, int, str]) -> list[dict]:
    now = utc_now()
    return [{"role": role, "author_id": a, "message_id": m, "text": t, "created_utc": now}
            for role, a, m, t in turns]


def test_reply_quoting_a_member_who_has_not_opted_in_is_cut_at_logging(store: Store) -> None:
    store.grant_consent(G, ALICE)
    secret = "my landlord keeps the spare key under the blue flowerpot"
    res = store.log_interaction(
        G, 1, ALICE, reply=f'Carol said "{secret}", interesting!', reply_message_id=2,
        context=_ctx(("user", CAROL, 100, secret),
                     ("assistant", None, 101, f"Noted: {secret}."),
                     ("user", ALICE, 102, "what did carol say?")))
    row = store.get_interaction(G, res.interaction_id)
    stored = row["reply"] + row["context_json"]
    assert "flowerpot" not in stored and "spare key" not in stored
    assert row["reply"].startswith("Carol said") and "[…]" in row["reply"]
    assert json.loads(row["context_json"])[0]["text"] == PLACEHOLDER


def test_words_written_before_opting_in_are_cut_from_replies_too(store: Store) -> None:
    before = "2020-01-01T00:00:00.000Z"
    store.grant_consent(G, ALICE)
    store.grant_consent(G, BOB)
    ctx = _ctx(("user", ALICE, 2, "what was bob on about?"))
    ctx.insert(0, {"role": "user", "author_id": BOB, "message_id": 1, "created_utc": before,
                   "text": "the merger closes on friday at noon sharp"})
    res = store.log_interaction(G, 1, ALICE, context=ctx,
                                reply="He said the merger closes on friday at noon sharp.")
    row = store.get_interaction(G, res.interaction_id)
    assert "merger" not in row["reply"] + row["context_json"]


def test_forget_cuts_the_members_words_id_and_names_from_other_members_rows(
        store: Store) -> None:
    for u in (ALICE, BOB):
        store.grant_consent(G, u)
    store.update_guild_settings(G, learn_from_humans=True)
    alice_id = 123456789012345678
    store.grant_consent(G, alice_id)
    words = "I will be travelling to Lisbon next tuesday morning"
    res = store.log_interaction(
        G, 1, BOB, reply=f"@Alicewonder told us: {words}. Ask 123456789012345678 for more.",
        context=_ctx(("user", alice_id, 1, words),
                     ("user", BOB, 2, "where is @alicewonder going? ask <@123456789012345678>")))
    store.log_message(G, 3, BOB, "@Alicewonder is fun, ping 123456789012345678, port 5",
                      channel_id=1)
    store.forget_user(alice_id, G, names=["Alicewonder", "alice_w", "the"])
    row = store.get_interaction(G, res.interaction_id)
    texts = row["reply"] + row["context_json"] + json.dumps(store.export_user(BOB, G))
    for gone in ("Lisbon", "Alicewonder", "alicewonder", str(alice_id), "<@"):
        assert gone not in texts, gone
    assert "Ask @member for more" in row["reply"]
    ctx = json.loads(row["context_json"])
    assert ctx[0]["text"] == PLACEHOLDER and ctx[1]["text"].startswith("where is @member")
    # A name that is an ordinary word ("the") only goes where it is a mention.
    assert "the spare" not in texts and "port 5" in texts


def test_forget_after_opting_out_still_scrubs_and_reaches_training(store: Store) -> None:
    """Opting out leaves no rows of their own; the forget must still find their words."""
    alice_id = 123456789012345678
    for u in (alice_id, BOB):
        store.grant_consent(G, u)
    said = "my diagnosis is type one diabetes since march"
    res = store.log_interaction(G, 1, BOB, reply="sorry to hear", reply_message_id=7,
                                context=_ctx(("user", alice_id, 1, said),
                                             ("user", BOB, 2, "what did she say?")))
    assert store.revoke_consent(G, alice_id)
    # Opted out: training reads the row without her words already.
    row = next(r for r in store.rated_interactions(G) if r["id"] == res.interaction_id)
    assert "diabetes" not in json.dumps(row["context"])
    store.forget_user(alice_id, G)
    stored = store.get_interaction(G, res.interaction_id)
    assert "diabetes" not in stored["context_json"] and str(alice_id) not in \
        stored["context_json"]
    # She opts in again, Bob's exchange is liked: the dataset holds nothing of the old words.
    store.grant_consent(G, alice_id)
    store.record_feedback(G, 7, BOB, 1)
    data = build_dataset(store, G, parse_config({"training": {"heldout_fraction": 0.01}}))
    assert data.train or data.heldout, data.stats  # the exchange is trained on, without her
    assert "diabetes" not in json.dumps([e.messages for e in (*data.train, *data.heldout)])
    assert alice_id not in data.contributors


def test_an_opted_out_members_turns_do_not_block_every_later_publish(store: Store) -> None:
    for u in (ALICE, BOB):
        store.grant_consent(G, u)
    for i in range(5):
        store.log_interaction(G, 1, BOB, reply=f"reply {i}", reply_message_id=100 + i,
                              context=_ctx(("user", ALICE, 10 + i, f"alice says {i} things"),
                                           ("user", BOB, 20 + i, f"bob asks {i}")))
        store.record_feedback(G, 100 + i, BOB, 1)
    store.revoke_consent(G, ALICE)
    data = build_dataset(store, G, parse_config({"training": {"heldout_fraction": 0.01}}))
    assert data.train + data.heldout and ALICE not in data.contributors
    dataset_utc = utc_now()
    _register(store, 1, data.contributors, dataset_utc=None)  # no ConsentChangedError
    assert store.active_version(G).version == 1 and dataset_utc


def test_raw_mentions_never_reach_storage_or_a_training_target(store: Store) -> None:
    store.grant_consent(G, ALICE)
    store.log_message(G, 5, ALICE, "hey <@!123456789012345678> and <@&987654321098765432>")
    text = store.db.execute("SELECT text FROM messages").fetchone()[0]
    assert text == "hey @member and @role"
    assert "[id]" in scrub("ask 123456789012345678 about it")
    assert "123456789012345678" not in scrub("<@123456789012345678> and 123456789012345678")


def test_a_context_turn_without_its_creation_time_is_refused(store: Store) -> None:
    from storage import StoreError

    store.grant_consent(G, ALICE)
    with pytest.raises(StoreError, match="created_utc"):
        store.log_interaction(G, 1, ALICE, reply="r", context=[
            {"role": "user", "author_id": ALICE, "message_id": 1, "text": "hi"}])
    assert store.db.execute("SELECT count(*) FROM interactions").fetchone()[0] == 0


# -- what stays on disk ---------------------------------------------------------------------------

def test_forgotten_text_leaves_the_database_file_and_its_wal(tmp_path: Path) -> None:
    db = tmp_path / "data" / "guildtune.db"
    store = open_store(db)
    try:
        store.grant_consent(G, ALICE)
        store.grant_consent(G, BOB)
        marker = "zebracornflakes-" * 20
        for i in range(50):
            store.log_interaction(G, 1, ALICE, reply=f"ok {i}", request_message_id=i,
                                  context=_ctx(("user", ALICE, i, f"{marker} {i}")))
            store.log_interaction(G, 1, BOB, reply=f"fine {i}", request_message_id=1000 + i,
                                  context=_ctx(("user", BOB, 1000 + i, f"bob says {i}")))
        store.checkpoint()  # the marker is in the main file's pages now, not only the WAL
        store.forget_user(ALICE, G)
        for path in (db, Path(str(db) + "-wal")):
            if path.exists():
                assert b"zebracornflakes" not in path.read_bytes(), path.name
        assert store.db.execute("SELECT count(*) FROM interactions").fetchone()[0] == 50
    finally:
        store.close()


def test_data_dir_database_and_backups_are_private_to_the_operator(tmp_path: Path) -> None:
    db = tmp_path / "fresh" / "guildtune.db"
    store = open_store(db)
    try:
        store.grant_consent(G, ALICE)
        backup = store.backup(tmp_path / "b" / "backup.db")
    finally:
        store.close()
    assert stat.S_IMODE(os.stat(db.parent).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(db).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(backup).st_mode) == 0o600


# -- the real pipeline: a forget lands in the middle of a fit -------------------------------------

@pytest.fixture
def pirate(tmp_path: Path, store_url: Path | str):
    cfg = make_config(tmp_path, STYLE_TRAINER, training={"epochs": 1.0},
                      storage={"url": str(store_url)})
    store = cfg.open_store()
    import_style(store, 1, "pirate", n=80, seed=1)
    yield cfg, store
    store.close()


def test_forget_in_the_middle_of_a_real_fit_is_never_served(pirate) -> None:
    from trainer.worker import train_foreground

    cfg, store = pirate
    member = max(build_dataset(store, 1, cfg).contributors.items(), key=lambda kv: kv[1])[0]
    reports = []

    def progress(p: dict) -> None:
        if p.get("phase") == "loading model" and not reports:  # dataset read, fit next
            reports.append(store.forget_user(member, 1))

    run_id, res = train_foreground(store, cfg, 1, progress=progress)
    assert reports and reports[0].in_flight == {1: run_id}
    assert res.status == "rejected" and "forgotten or opted out" in res.reason
    assert store.versions(1) == [] and store.active_version(1) is None
    assert not any(p.name.isdigit() for p in (cfg.adapters_dir / "1").glob("*")) \
        if (cfg.adapters_dir / "1").exists() else True
    assert _contributor_rows(store, member) == 0
    retrain = store.open_run(1)
    assert retrain is not None and retrain.trigger == "forget"


def test_retrain_after_a_forget_replaces_the_tainted_version(pirate) -> None:
    from trainer.pipeline import train_guild
    from trainer.worker import run_worker

    cfg, store = pirate
    first = train_guild(store, cfg, 1)
    assert first.status == "succeeded" and first.version == 1
    member = max(store.contributors(1, 1).items(), key=lambda kv: kv[1])[0]
    report = store.forget_user(member, 1, strict=False)
    assert store.active_version(1).tainted_utc  # non-strict: still serving, marked
    run_worker(cfg, once=True, store=store, isolate=False)
    run = store.get_run(report.retrain_runs[1])
    assert run.status == "succeeded", (run.error, run.metrics)
    # Judged against the base, not against the tainted version it replaces.
    assert run.metrics["active_version"] is None
    active = store.active_version(1)
    assert active.version == 2 and active.tainted_utc is None
    assert member not in store.contributors(1, 2)


def test_the_consent_text_promises_what_the_config_does() -> None:
    from bot.handlers import consent_statement

    strict = consent_statement("S", parse_config({}))
    assert "replies to other opted-in members" in strict and "at once" in strict
    lax = consent_statement("S", parse_config({"training": {"strict_forget": False,
                                                            "enabled": True}}))
    assert "at once" not in lax and "next training run ends" in lax
    # With training off no retrain comes: withdrawn at once whatever strict_forget says.
    off = parse_config({"training": {"strict_forget": False}})
    assert off.training.withdraw_at_once and "at once" in consent_statement("S", off)
    assert "365 days" in strict


def test_an_import_of_old_history_does_not_bring_a_forgotten_member_back(store: Store) -> None:
    ALICE = 900_000_000_000_000_011  # noqa: N806 - a real-sized id, to search the table for
    rows = [{"message_id": i, "user_id": ALICE if i % 2 else BOB, "text": f"old message {i}",
             "created_utc": utc_now()} for i in range(1, 7)]
    assert store.import_messages(G, rows[:2]) == 2
    store.forget_user(ALICE, G)
    # The operator imports an updated log that still holds her old messages.
    assert store.import_messages(G, rows) == 2  # Bob's two new ones; all of hers skipped
    assert store.db.execute("SELECT count(*) FROM messages WHERE user_id = ?",
                            [ALICE]).fetchone()[0] == 0
    assert not store.has_consent(G, ALICE)
    assert str(ALICE) not in json.dumps(store.db.execute("SELECT * FROM withdrawn").fetchall())
    # A forget everywhere keeps her out of every guild; her own new opt-in lifts it there only.
    store.forget_user(ALICE)
    assert store.import_messages(H, rows[:1]) == 0
    store.grant_consent(H, ALICE)
    assert store.import_messages(H, rows[:1]) == 1
    third = 3003
    assert store.import_messages(third, rows[:1]) == 0 and not store.has_consent(third, ALICE)


def test_an_import_does_not_override_an_opt_out(store: Store) -> None:
    rows = [{"message_id": 1, "user_id": ALICE, "text": "old words", "created_utc": utc_now()}]
    store.grant_consent(G, ALICE)
    assert store.revoke_consent(G, ALICE)
    assert store.import_messages(G, rows) == 0
    assert not store.has_consent(G, ALICE)  # her live chat is still not logged
    assert not store.log_interaction(G, 1, ALICE, context=[], reply="r").stored
    store.grant_consent(G, ALICE)  # her own choice again
    assert store.import_messages(G, rows) == 1


def test_a_message_written_before_opting_in_is_not_kept_even_if_logged_late(
        store: Store) -> None:
    store.grant_consent(G, ALICE)
    assert not store.log_message(G, 1, ALICE, "said before opting in",
                                 created_utc="2020-01-01T00:00:00Z")
    assert store.log_message(G, 2, ALICE, "said after", created_utc=utc_now())
    assert [r[0] for r in store.db.execute("SELECT text FROM messages")] == ["said after"]


def test_withdrawn_versions_files_are_deleted_by_the_retention_job(tmp_path: Path) -> None:
    from guildtune.schedule import purge_expired

    cfg = make_config(tmp_path, privacy={"retention_days": 0})
    store = open_store(cfg.db_path)
    try:
        for u in (ALICE, BOB):
            store.grant_consent(G, u)
        dirs = {}
        for v, who in ((1, {BOB: 1}), (2, {ALICE: 1, BOB: 1})):
            d = cfg.adapters_dir / str(G) / str(v)
            d.mkdir(parents=True)
            (d / "adapter_model.safetensors").write_bytes(b"weights")
            dirs[v] = d
            store.register_version(G, v, str(d), base_model="tiny", lora={}, contributors=who,
                                   activate=True)
        outside = tmp_path / "elsewhere"  # a row must never delete outside the adapters dir
        outside.mkdir()
        store.register_version(G, 3, str(outside), base_model="tiny", lora={},
                               contributors={ALICE: 1}, activate=True)
        store.forget_user(ALICE, G)
        assert store.active_version(G).version == 1
        assert purge_expired(store, cfg)["withdrawn_versions"] == 1
        assert not dirs[2].exists() and outside.exists()
        assert store.get_version(G, 2).tainted_utc  # the record stays
    finally:
        store.close()


def test_mydata_includes_what_they_said_inside_other_members_conversations(
        store: Store) -> None:
    alice_id = 123456789012345678
    for u in (alice_id, BOB):
        store.grant_consent(G, u)
    store.log_interaction(G, 1, BOB, reply="ok", context=_ctx(
        ("user", alice_id, 1, "alice's words in bob's chat"), ("user", BOB, 2, "hm?")))
    data = store.export_user(alice_id, G)
    assert [m["text"] for m in data["your_messages_in_other_conversations"]] == [
        "alice's words in bob's chat"]
    assert "hm?" not in json.dumps(data)


def test_an_existing_database_is_made_private_and_future_import_times_are_clamped(
        tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    open_store(db).close()
    os.chmod(db, 0o644)
    store = open_store(db)
    try:
        assert stat.S_IMODE(os.stat(db).st_mode) == 0o600
        store.import_messages(G, [{"message_id": 1, "user_id": ALICE, "text": "x",
                                   "created_utc": "2999-01-01T00:00:00Z"}])
        assert store.db.execute("SELECT created_utc FROM messages").fetchone()[0] <= utc_now()
    finally:
        store.close()


def test_words_a_tainted_version_memorised_are_cut_from_replies_anywhere(store: Store) -> None:
    """v1 learned Alice's words and repeats them in Bob's chat, where she never spoke."""
    alice_id = 123456789012345678
    for u in (alice_id, BOB):
        store.grant_consent(G, u)
    secret = "my cousin lives at 42 harbour road and works nights"
    store.log_message(G, 1, alice_id, secret)
    _register(store, 1, {alice_id: 1, BOB: 1})
    res = store.log_interaction(G, 1, BOB, reply=f"Sure: {secret}.", reply_message_id=9,
                                adapter_version=1,
                                context=_ctx(("user", BOB, 8, "tell me something")))
    store.record_feedback(G, 9, BOB, 1)
    store.forget_user(alice_id, G)
    row = next(r for r in store.rated_interactions(G) if r["id"] == res.interaction_id)
    assert "harbour" not in row["reply"] and row["reply"].startswith("Sure:")


@pytest.mark.parametrize("name", ["Zoë", 'bob "the" builder', "back\\slash", "Ольга", "ÅSA"])
def test_mentions_of_names_with_any_characters_are_removed(store: Store, name: str) -> None:
    alice_id = 123456789012345678
    for u in (alice_id, BOB):
        store.grant_consent(G, u)
    res = store.log_interaction(G, 1, BOB, reply=f"yes, @{name.lower()} did",
                                context=_ctx(("user", BOB, 2, f"did @{name} say so?")))
    store.log_message(G, 3, BOB, f"hi @{name.upper()}")
    store.forget_user(alice_id, G, names=[name])
    row = store.get_interaction(G, res.interaction_id)
    ctx = json.loads(row["context_json"])
    assert ctx[0]["text"] == "did @member say so?" and row["reply"] == "yes, @member did"
    assert store.db.execute("SELECT text FROM messages").fetchone()[0] == "hi @member"


def test_forget_everywhere_removes_mentions_in_guilds_without_their_rows(store: Store) -> None:
    store.grant_consent(H, BOB)
    store.log_message(H, 1, BOB, "did @alice leave? she was nice")
    store.forget_user(123456789012345678, names=["alice"])
    assert store.db.execute("SELECT text FROM messages").fetchone()[0] == \
        "did @member leave? she was nice"


def test_forget_leaves_other_members_own_words_and_cuts_quotes_in_suggestions(
        store: Store) -> None:
    alice_id = 123456789012345678
    for u in (alice_id, BOB, CAROL):
        store.grant_consent(G, u)
    said = "thank you so much for asking, my number is five five five one two"
    res = store.log_interaction(
        G, 1, BOB, reply=f"Alice said {said}", reply_message_id=5,
        context=_ctx(("user", alice_id, 1, said),
                     ("user", BOB, 2, "thank you so much for this, i will try it")))
    store.add_correction(G, res.interaction_id, CAROL, f"she said {said}, call her")
    store.forget_user(alice_id, G)
    row = store.get_interaction(G, res.interaction_id)
    assert json.loads(row["context_json"])[1]["text"] == \
        "thank you so much for this, i will try it"
    assert "five five" not in row["reply"]
    correction = store.db.execute("SELECT text FROM corrections").fetchone()[0]
    assert "five five" not in correction and correction.startswith("she said")


def test_opting_in_again_does_not_bring_back_what_was_withdrawn(store: Store) -> None:
    alice_id = 123456789012345678
    store.update_guild_settings(G, learn_from_humans=True)
    for u in (alice_id, BOB):
        store.grant_consent(G, u)
    store.log_interaction(G, 1, alice_id, reply="first reply", reply_message_id=10,
                          context=_ctx(("user", alice_id, 11, "secret one before opting out")))
    store.record_feedback(G, 10, alice_id, 1)
    store.log_interaction(G, 1, BOB, reply="ok", reply_message_id=20,
                          context=_ctx(("user", alice_id, 21, "secret two in bob's chat"),
                                       ("user", BOB, 22, "hm")))
    store.record_feedback(G, 20, alice_id, 1)
    store.log_message(G, 30, BOB, "question for alice", channel_id=1)
    store.log_message(G, 31, alice_id, "secret three as a reply", channel_id=1,
                      reply_to_message_id=30)
    store.revoke_consent(G, alice_id)
    store.grant_consent(G, alice_id)  # back: only what she writes from now on
    later = format_utc(parse_utc(utc_now()) + timedelta(seconds=1))  # no clock races
    store.log_message(G, 32, alice_id, "new words after", channel_id=1, reply_to_message_id=30,
                      created_utc=later)
    dump = json.dumps(store.rated_interactions(G)) + json.dumps(store.reply_pairs(G))
    for old in ("secret one", "secret two", "secret three"):
        assert old not in dump, old
    assert "new words after" in dump
    rows = store.rated_interactions(G)
    assert [r["user_id"] for r in rows] == [BOB] and rows[0]["score"] == 0  # her old 👍 gone


def test_a_run_whose_lease_was_lost_cannot_publish(store: Store) -> None:
    from datetime import UTC, datetime, timedelta

    from storage import StoreError

    store.grant_consent(G, ALICE)
    run_id = _running(store)
    store.recover_stale_runs(datetime.now(UTC) + timedelta(hours=1))  # another worker has it
    with pytest.raises(StoreError, match="no longer running"):
        _register(store, 1, {ALICE: 1}, run_id=run_id)
    assert store.versions(G) == []


def test_rollback_from_the_base_model_is_not_a_toggle(store: Store) -> None:
    store.grant_consent(G, ALICE)
    _register(store, 1, {ALICE: 1})
    assert store.rollback(G) is None and store.active_version(G) is None
    assert store.rollback(G) is None and store.active_version(G) is None  # stays on the base
