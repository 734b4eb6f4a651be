"""Issue 15 (in part): what a new operator or admin trips over in the first hour."""

from __future__ import annotations

from collections.abc import Iterator
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


# -- a Hugging Face id where the hub cannot be reached -------------------------------------------

@pytest.fixture
def no_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The hub's endpoint is a local port nothing listens on (refused at once, as a machine
    without internet refuses or fails to resolve), the Hugging Face cache an empty folder, and
    HF_HUB_OFFLINE unset. Returns the cache folder."""
    import socket

    from huggingface_hub import constants

    from guildtune import models

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed when the block ends: connections are refused
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    reachable = models.hub_reachable  # a test may replace it: its answers are cached
    reachable.cache_clear()
    yield cache
    reachable.cache_clear()


def _cache_hub_model(cache: Path, name: str) -> Path:
    """``name`` as a download leaves it in the Hugging Face cache (the tiny model's files in
    a snapshot that refs/main names); returns the snapshot folder."""
    from guildtune.models import build_tiny_model

    repo = cache / f"models--{name.replace('/', '--')}"
    snapshot = repo / "snapshots" / ("0" * 40)
    model, tok = build_tiny_model()
    model.save_pretrained(snapshot)
    tok.save_pretrained(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    return snapshot


def test_a_hub_id_fails_at_once_when_the_hub_cannot_be_reached(no_hub: Path) -> None:
    from guildtune.models import ModelError, resolve_checkpoint

    with pytest.raises(ModelError) as err:
        resolve_checkpoint("nosuch/x", no_hub)
    assert str(err.value).startswith("model.name 'nosuch/x': the Hugging Face hub cannot be "
                                     "reached (offline? ")
    assert "use a local folder, 'smollm2-135m' or 'tiny'" in str(err.value)


def test_train_with_an_unreachable_hub_id_is_one_line_before_any_run(
        no_hub: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from storage import open_store
    from tests.fakes import TINY, import_pairs, write_config

    cfg = write_config(tmp_path, TINY, training={"enabled": True})
    with open_store(tmp_path / "data" / "guildtune.db") as store:
        import_pairs(store, G, 20)
    assert main(["--config", str(cfg), "train", "--guild", str(G), "--force", "--model",
                 "nosuch/x"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the Hugging Face hub cannot be reached" in err[0], err
    with open_store(tmp_path / "data" / "guildtune.db") as store:
        assert store.runs(G) == []  # refused before a run was queued, as a bad folder is


def test_a_cached_hub_model_loads_when_the_hub_cannot_be_reached(no_hub: Path) -> None:
    from guildtune.models import load_model, resolve_checkpoint

    snapshot = _cache_hub_model(no_hub, "someone/small-chat")
    # The cached files, and the id as the base adapters record (as when the hub answered).
    assert resolve_checkpoint("someone/small-chat", no_hub) == (snapshot, "someone/small-chat")
    lm = load_model("someone/small-chat", device="cpu", dtype="float32", cache_dir=no_hub)
    assert lm.base_id == "someone/small-chat" and lm.model.config.num_hidden_layers == 2


def test_hf_hub_offline_uses_the_cache_and_never_asks_the_hub(
        no_hub: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    from guildtune import models

    def asked(endpoint: str) -> None:
        raise AssertionError("the hub was asked although HF_HUB_OFFLINE is set")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(models, "hub_reachable", asked)
    with pytest.raises(models.ModelError, match="not in the Hugging Face cache .* and "
                                                "HF_HUB_OFFLINE is set"):
        models.resolve_checkpoint("nosuch/x", no_hub)
    _cache_hub_model(no_hub, "someone/small-chat")
    # transformers loads it from the cache by its id, offline, as it always did
    assert models.resolve_checkpoint("someone/small-chat", no_hub) == ("someone/small-chat",) * 2


def test_the_hub_counts_as_reachable_when_it_answers_anything(no_hub: Path) -> None:
    import http.server
    import threading

    from huggingface_hub import constants

    from guildtune.models import hub_reachable

    assert hub_reachable(constants.ENDPOINT)  # refused: why, in a few words
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:  # its answer is an error status (501): still an answer
        assert hub_reachable(f"http://127.0.0.1:{server.server_port}") is None
    finally:
        server.shutdown()
        server.server_close()


# -- commands that read or delete members' data never create the database -------------------------

@pytest.mark.parametrize("args, rc, stream, needle", [
    (("export", "--user", "5"), 1, "err", "; nothing is stored for member 5"),
    (("forget", "--user", "5"), 0, "out", ": nothing stored for member 5, nothing deleted"),
    (("backup", "b.db"), 1, "err", "; nothing to back up"),
    (("rollback", "--guild", "5"), 1, "err", "; nothing to roll back"),
])
def test_no_database_yet_is_said_not_created(tmp_path: Path, args: tuple[str, ...], rc: int,
                                             stream: str, needle: str,
                                             capsys: pytest.CaptureFixture) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[storage]\ndata_dir = "{tmp_path / "d"}"\n')
    assert main(["--config", str(cfg), *args]) == rc
    captured = capsys.readouterr()
    lines = getattr(captured, stream).strip().splitlines()
    assert len(lines) == 1, lines
    assert f"no database yet at {tmp_path / 'd' / 'guildtune.db'}" in lines[0] and \
        needle in lines[0]
    assert (captured.out if stream == "err" else captured.err) == ""
    assert not (tmp_path / "d").exists()
