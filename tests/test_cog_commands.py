"""Slash commands through their callbacks with fake interactions (dpytest has no slash support)."""

from __future__ import annotations

from storage.times import utc_now

import json

import discord
import pytest

from bot.cog import NOT_ADMIN, POLITE_FAILURE, RateButton, SuggestButton
from bot.handlers import OPERATOR_TRAINING_OFF
from tests.fakes import FakeInteraction, FakeUser, make_cog

G = 111
ALICE = FakeUser(201, name="alice")
ADMIN = FakeUser(301, admin=True, name="admin")


@pytest.fixture
async def env(tmp_path):
    bot, cog, s = await make_cog(tmp_path, training={"enabled": True})
    yield bot, cog, s
    await bot.remove_cog(cog.qualified_name)
    s.store.close()


def inter(bot, user=ALICE, message_id=None):
    return FakeInteraction(bot, G, user, message_id)


def log_reply(s, user_id=ALICE.id, reply_id=9001):
    return s.store.log_interaction(G, 1, user_id, context=[
        {"role": "user", "author_id": user_id, "message_id": 9000, "text": "hi",
         "created_utc": utc_now()}],
        reply="hello", request_message_id=9000, reply_message_id=reply_id).interaction_id


async def test_consent_flow(env) -> None:
    bot, cog, s = env
    i = inter(bot)
    await cog.consent_cmd.callback(cog, i)
    answer = i.sent[0]
    assert answer["ephemeral"] and "What for" in answer["content"]
    assert "not opted in" in answer["content"]
    view = answer["view"]
    b = inter(bot)
    await view.opt_in.callback(b)
    assert s.store.has_consent(G, ALICE.id) and "opted in" in b.text
    b = inter(bot)
    await view.opt_out.callback(b)
    assert not s.store.has_consent(G, ALICE.id) and "opted out" in b.text


async def test_mydata_exports_the_members_rows(env) -> None:
    bot, cog, s = env
    s.store.grant_consent(G, ALICE.id)
    log_reply(s)
    i = inter(bot)
    await cog.mydata_cmd.callback(cog, i)
    f = i.sent[0]["file"]
    assert i.sent[0]["ephemeral"] and f.filename.endswith(".json")
    data = json.loads(f.fp.read())
    assert data["user_id"] == str(ALICE.id)
    assert [r["reply"] for r in data["interactions"]] == ["hello"]
    assert len(data["consents"]) == 1


async def test_forget_deletes_rows_and_queues_retrain(env) -> None:
    bot, cog, s = env
    s.store.grant_consent(G, ALICE.id)
    log_reply(s)
    s.store.register_version(G, 1, "/nowhere", base_model="tiny", lora={},
                             contributors={ALICE.id: 1}, activate=True)
    i = inter(bot)
    await cog.forget_cmd.callback(cog, i)
    view = i.sent[0]["view"]
    c = inter(bot)
    await view.cancel.callback(c)
    assert "Nothing was deleted" in c.text and s.store.guild_stats(G)["interactions"] == 1
    c = inter(bot)
    await view.confirm.callback(c)
    # The default (strict_forget): v1 stops serving at once, and the member is told so.
    assert "went back to a version without your data" in c.text and "retrain" in c.text
    assert s.store.active_version(G) is None
    assert s.store.guild_stats(G)["interactions"] == 0
    assert not s.store.has_consent(G, ALICE.id)
    assert s.store.open_run(G).trigger == "forget"


@pytest.mark.parametrize("name, args", [
    ("tune_status", ()), ("tune_retrain", ()), ("tune_rollback", ()),
    ("tune_training", ("on",)), ("tune_schedule", ("0 4 * * *",)),
    ("tune_persona", ("x",)), ("tune_channels", ("list",)),
])
async def test_non_admin_is_refused_by_the_runtime_check(env, name, args) -> None:
    bot, cog, s = env
    i = inter(bot)  # alice lacks Manage Server
    await getattr(cog, name).callback(cog, i, *args)
    assert i.text == NOT_ADMIN and i.sent[0]["ephemeral"]
    assert s.store.runs(G) == [] and s.store.guild_settings(G).persona is None


def test_tune_group_carries_the_permission_hint(env) -> None:
    _, cog, _ = env
    assert cog.tune.default_permissions.manage_guild and cog.tune.guild_only


async def test_training_schedule_retrain_status_rollback(env) -> None:
    bot, cog, s = env
    i = inter(bot, ADMIN)
    await cog.tune_retrain.callback(cog, i, )
    assert i.text == (f"Training is off for this server (guild {G}) until an admin turns it "
                      "on with `/tune training on`.")  # guild training is off by default
    i = inter(bot, ADMIN)
    await cog.tune_training.callback(cog, i, "on")
    assert "Training is on" in i.text and s.store.guild_settings(G).training_enabled
    i = inter(bot, ADMIN)
    await cog.tune_schedule.callback(cog, i, "every day")
    assert "not a 5-field crontab" in i.text and s.store.guild_settings(G).schedule is None
    i = inter(bot, ADMIN)
    await cog.tune_schedule.callback(cog, i, "30 3 * * 1")
    assert s.store.guild_settings(G).schedule == "30 3 * * 1" and "Next run" in i.text
    i = inter(bot, ADMIN)
    await cog.tune_retrain.callback(cog, i)
    assert "queued as run #" in i.text and s.store.open_run(G).trigger == "manual"
    # A finished run starts the cooldown.
    run = s.store.claim_run("w1")
    s.store.finish_run(run.id, "succeeded", metrics={"base_loss": 2.5, "candidate_loss": 2.1},
                       version=2)
    i = inter(bot, ADMIN)
    await cog.tune_retrain.callback(cog, i)
    assert "next one is possible in" in i.text
    # Versions, ratings and a status embed with chart.
    s.store.grant_consent(G, ALICE.id)
    for v in (1, 2):
        s.store.register_version(G, v, f"/a/{v}", base_model="tiny", lora={}, activate=True)
    s.store.record_feedback(G, 9001, ALICE.id, 1) if log_reply(s) else None
    i = inter(bot, ADMIN)
    await cog.tune_status.callback(cog, i)
    embed = i.sent[0]["embed"]
    fields = {f.name: f.value for f in embed.fields}
    assert fields["Active version"].startswith("v2")
    assert "succeeded" in fields["Last run"]
    assert "held-out loss: candidate 2.1000 vs base 2.5000" in fields["Last run"]
    assert "30 3 * * 1" in fields["Next scheduled run"]
    assert i.sent[0]["file"].filename == "like_rate.png"
    assert embed.image.url == "attachment://like_rate.png"
    i = inter(bot, ADMIN)
    await cog.tune_rollback.callback(cog, i)
    assert "now uses v1" in i.text and s.store.active_version(G).version == 1
    assert s.engine.active_versions() == {G: 1}  # the rollback swapped at once


async def test_training_refused_while_operator_disabled(tmp_path) -> None:
    bot, cog, s = await make_cog(tmp_path)  # training.enabled defaults to false
    i = inter(bot, ADMIN)
    await cog.tune_training.callback(cog, i, "on")
    assert i.text == OPERATOR_TRAINING_OFF and "Developer Policy" in i.text
    assert not s.store.guild_settings(G).training_enabled
    i = inter(bot, ADMIN)
    await cog.tune_retrain.callback(cog, i)
    assert i.text == OPERATOR_TRAINING_OFF and s.store.runs(G) == []
    await bot.remove_cog(cog.qualified_name)
    s.store.close()


async def test_persona_and_channels(env) -> None:
    bot, cog, s = env
    i = inter(bot, ADMIN)
    await cog.tune_persona.callback(cog, i, "You are terse.")
    assert s.store.guild_settings(G).persona == "You are terse."
    i = inter(bot, ADMIN)
    await cog.tune_persona.callback(cog, i, "x" * 5000)
    assert "keep it under" in i.text and s.store.guild_settings(G).persona == "You are terse."
    i = inter(bot, ADMIN)
    await cog.tune_persona.callback(cog, i, None)  # shows it: an empty command never wipes it
    assert "You are terse." in i.text and s.store.guild_settings(G).persona == "You are terse."
    i = inter(bot, ADMIN)
    await cog.tune_persona.callback(cog, i, "reset")
    assert s.store.guild_settings(G).persona is None
    chan = discord.Object(id=555)
    i = inter(bot, ADMIN)
    await cog.tune_channels.callback(cog, i, "add", chan)
    assert s.store.guild_settings(G).channels == (555,) and "<#555>" in i.text
    i = inter(bot, ADMIN)
    await cog.tune_channels.callback(cog, i, "remove", discord.Object(id=556))
    assert "not in the list" in i.text
    i = inter(bot, ADMIN)
    await cog.tune_channels.callback(cog, i, "remove", chan)
    assert s.store.guild_settings(G).channels == ()


async def test_unknown_errors_are_logged_and_answered_politely(env, caplog) -> None:
    bot, cog, s = env
    i = inter(bot, ADMIN)
    err = discord.app_commands.CommandInvokeError.__new__(
        discord.app_commands.CommandInvokeError)
    err.original = RuntimeError("boom")
    err.command = None
    await cog.cog_app_command_error(i, err)
    assert i.text == POLITE_FAILURE
    assert any(r.exc_info and "boom" in str(r.exc_info[1]) for r in caplog.records)


async def test_buttons_rate_and_suggest(env) -> None:
    bot, cog, s = env
    s.store.grant_consent(G, ALICE.id)
    iid = log_reply(s)
    await bot.remove_cog(cog.qualified_name)  # the DynamicItems find the cog through the bot
    await bot.add_cog(cog)
    i = inter(bot, ALICE, message_id=9001)
    await RateButton("down").callback(i)
    assert "noted 👎" in i.text and s.store.guild_stats(G)["dislikes"] == 1
    i = inter(bot, FakeUser(999), message_id=9001)
    await RateButton("up").callback(i)
    assert "opted in" in i.text and s.store.guild_stats(G)["likes"] == 0
    i = inter(bot, ALICE, message_id=9001)
    await SuggestButton().callback(i)
    modal = i.modals[0]
    modal.text._value = "a much better reply"
    m = inter(bot, ALICE, message_id=9001)
    await modal.on_submit(m)
    assert "Thanks" in m.text
    assert s.store.rated_interactions(G)[0]["corrections"][0]["text"] == "a much better reply"
    assert s.store.rated_interactions(G)[0]["id"] == iid
