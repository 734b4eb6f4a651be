"""Issue 15 (in part): what a new operator or admin trips over in the first hour."""

from __future__ import annotations

from pathlib import Path

import pytest

from bot.core import Core, UserError
from guildtune.cli import main
from tests.fakes import make_services

G = 4242


def test_every_command_takes_config_after_the_command_too(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[storage]\ndata_dir = "{tmp_path / "d"}"\n')
    assert main(["init", "--config", str(cfg)]) == 0
    assert str(tmp_path / "d") in capsys.readouterr().out
    assert main(["status", "--config", str(cfg)]) == 0
    assert main(["--config", str(cfg), "status"]) == 0
    assert main(["schema", "--config", str(cfg)]) == 0


async def test_a_failed_retrain_does_not_use_up_the_cooldown(tmp_path: Path) -> None:
    s = make_services(tmp_path, training={"enabled": True})
    s.store.update_guild_settings(G, training_enabled=True)
    core = Core(s)
    assert "queued as run" in await core.retrain(G, 1)
    run = s.store.claim_run("w", 60, guild_id=G)
    s.store.finish_run(run.id, "failed", error="set aside by the share cap")
    assert "queued as run" in await core.retrain(G, 1)  # not refused by the cooldown
    run = s.store.claim_run("w", 60, guild_id=G)
    s.store.finish_run(run.id, "rejected", error="did not beat the base")
    with pytest.raises(UserError, match="A retrain was requested"):
        await core.retrain(G, 1)  # a run that trained does count
    s.store.close()


async def test_persona_without_text_shows_it_and_only_reset_resets(tmp_path: Path) -> None:
    s = make_services(tmp_path)
    core = Core(s)
    assert "default system prompt" in await core.set_persona(G, None)
    await core.set_persona(G, "You are a pirate.")
    shown = await core.set_persona(G, "")
    assert "You are a pirate." in shown and s.store.guild_settings(G).persona
    assert "reset" in await core.set_persona(G, "reset")
    assert s.store.guild_settings(G).persona is None
    s.store.close()


def test_status_never_creates_the_database(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[storage]\ndata_dir = "{tmp_path / "d"}"\n')
    assert main(["--config", str(cfg), "status"]) == 0
    assert "guildtune init" in capsys.readouterr().out
    assert not (tmp_path / "d" / "guildtune.db").exists()


def test_import_says_when_history_will_not_be_trained_on(tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    import json

    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[storage]\ndata_dir = "{tmp_path / "d"}"\n')
    f = tmp_path / "c.jsonl"
    f.write_text("\n".join(json.dumps({"community": "c", "part": 0, "seq": i,
                                       "time": f"2026-11-20T10:00:0{i}Z", "author_id": 1 + i % 2,
                                       "text": f"line {i}", "reply_to": [i - 1] if i else []})
                           for i in range(4)))
    assert main(["--config", str(cfg), "import", "--guild", "7", str(f)]) == 0
    assert "not trained on" in capsys.readouterr().out
    assert main(["--config", str(cfg), "import", "--guild", "7", "--learn-from-humans",
                 str(f)]) == 0  # already imported: turns learning on, stores nothing twice
    out = capsys.readouterr().out
    assert "already imported" in out and "not trained on" not in out
    from storage import open_store

    with open_store(tmp_path / "d" / "guildtune.db") as store:
        assert store.guild_settings(7).learn_from_humans
