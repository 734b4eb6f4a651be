"""Failures must not look like success: a tainted active version is marked wherever status is
shown, with what will replace it, and `guildtune worker --once` exits 1 when a run failed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bot.handlers import Core, StatusReport
from guildtune.cli import main
from guildtune.config import load_config, parse_config
from storage import Store, open_store
from tests.fakes import TINY, make_services, write_config

G = 42
FORGOTTEN, OTHER = 7, 8
TAINTED = "v2 (tainted: trained on data of a member who was forgotten or opted out)"


def tainted_guild(store: Store, guild_training: bool = True) -> int:
    """v1 clean (was active), v2 active and trained on FORGOTTEN's data; FORGOTTEN is then
    forgotten without replacing v2 at once. Returns the retrain run forget queued."""
    for u in (FORGOTTEN, OTHER):
        store.grant_consent(G, u)
    store.register_version(G, 1, "/adapters/42/1", base_model="tiny", lora={},
                           contributors={OTHER: 5}, activate=True)
    store.register_version(G, 2, "/adapters/42/2", base_model="tiny", lora={},
                           contributors={FORGOTTEN: 3, OTHER: 4}, activate=True)
    store.update_guild_settings(G, training_enabled=guild_training)
    report = store.forget_user(FORGOTTEN, G, strict=False)
    active = store.active_version(G)
    if guild_training:
        assert active is not None and active.version == 2 and active.tainted_utc is not None
    else:  # no retrain can come for a guild with training off: withdrawn at once anyway
        assert active is not None and active.version == 1
    return report.retrain_runs[G]


def test_cli_status_marks_the_tainted_version_and_the_retrain_that_cannot_run(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg_file = write_config(tmp_path, TINY, training={"enabled": False})
    store = open_store(load_config(cfg_file, env={}).db_path)
    run_id = tainted_guild(store)
    store.close()

    assert main(["--config", str(cfg_file), "status"]) == 0
    out = capsys.readouterr().out
    assert "v2 (tainted)" in out and TAINTED in out
    assert (f"retrain run #{run_id} is queued, but training is disabled by the bot's operator "
            "(`training.enabled = false` in the config), so it will fail") in out
    assert "newest clean version: v1" in out

    assert main(["--config", str(cfg_file), "status", "--json"]) == 0
    guild = json.loads(capsys.readouterr().out)["guilds"][0]
    t = guild["active_tainted"]
    assert guild["active_version"] == 2 and t["version"] == 2 and t["tainted_utc"]
    assert t["retrain_run"] == {"id": run_id, "status": "queued"}
    assert t["newest_clean_version"] == 1 and "forgotten or opted out" in t["reason"]


def test_cli_status_says_the_worker_will_replace_it_when_training_is_on(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg_file = write_config(tmp_path, TINY, training={"enabled": True})
    store = open_store(load_config(cfg_file, env={}).db_path)
    run_id = tainted_guild(store, guild_training=True)
    store.close()

    assert main(["--config", str(cfg_file), "status", "--guild", str(G)]) == 0
    out = capsys.readouterr().out
    assert TAINTED in out
    assert (f"retrain run #{run_id} is queued: v2 stays active until a worker trains it and "
            "publishes a clean version") in out


async def test_tune_status_marks_the_tainted_version_and_the_queued_retrain(
        tmp_path: Path) -> None:
    services = make_services(tmp_path, training={"enabled": True})
    run_id = tainted_guild(services.store, guild_training=True)
    rep = await Core(services).status(G, chart=False)
    fields = dict(rep.fields())
    assert fields["Active version"].startswith(TAINTED)
    assert f"retrain run #{run_id} is queued" in fields["Replacement"]
    assert "newest clean version: v1" in fields["Replacement"]
    assert any(line.startswith("Replacement: ") for line in rep.lines())
    services.store.close()


def test_without_an_open_run_the_guild_stays_on_the_tainted_version(store: Store) -> None:
    tainted_guild(store)
    run = store.open_run(G)
    assert run is not None
    on = parse_config({"training": {"enabled": True}}, env={})
    t = StatusReport.taint(store.active_version(G), store.versions(G), None, cfg=on,
                           settings=store.guild_settings(G))
    assert t is not None and t["retrain_run"] is None
    assert t["replacement"].startswith("no retrain queued: the guild stays on v2 until a "
                                       "retrain succeeds")
    clean = store.get_version(G, 1)
    assert StatusReport.taint(clean, store.versions(G), run, cfg=on,
                              settings=store.guild_settings(G)) is None


def test_worker_once_exits_1_and_names_each_failed_run(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg_file = write_config(tmp_path, TINY, training={"enabled": True})
    store = open_store(load_config(cfg_file, env={}).db_path)
    run_id = tainted_guild(store, guild_training=False)  # the retrain cannot run
    store.close()

    assert main(["--config", str(cfg_file), "worker", "--once"]) == 1
    out, err = capsys.readouterr()
    assert (f"run {run_id} (guild {G}) failed: training is off for this server (guild {G}) "
            "until an admin turns it on with `/tune training on`") in err
    assert "handled 1 run(s), 1 failed" in out

    assert main(["--config", str(cfg_file), "worker", "--once"]) == 0  # nothing left: fine
    assert "handled 0 run(s)" in capsys.readouterr().out
