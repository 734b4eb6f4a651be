"""Secrets: a recognizable fake Discord token never shows up in logs, output, files written,
exceptions or reprs, through the console, the CLI, a demo-like flow and forced failures."""

from __future__ import annotations

from storage.times import utc_now

import dataclasses
import json
import logging
import sqlite3
import tomllib
import traceback
import typing
from io import StringIO
from pathlib import Path
from typing import Any

import discord
import pytest
from discord.ext import commands

from bot.console import EchoEngine, run_console
from bot.engine import AdapterError, validate_adapter_dir
from bot.handlers import AdapterWatcher, Core, Turn
from guildtune.config import REDACTED, Config, ConfigError, load_config, parse_config
from storage import open_store
from storage.store import StoreBusyError
from tests.fakes import (TINY, FakeEngine, FakeInteraction, FakeUser, RecordingChannel,
                         write_config)
from trainer.data import build_dataset

TOKEN = "MTAxNzQ0OTk4NzY1NDMyMTA5.GhIjKl.FAKE-guildtune-token-DO-NOT-LEAK-0123456789"
PIECES = [TOKEN, TOKEN.split(".")[0], TOKEN.split(".")[-1]]  # no fragment either


def assert_clean(*texts: Any) -> None:
    for t in texts:
        s = t if isinstance(t, str) else repr(t)
        for p in PIECES:
            assert p not in s, f"token fragment leaked in: {s[:300]}"


def assert_files_clean(root: Path) -> None:
    for f in root.rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            for p in PIECES:
                assert p.encode() not in data, f"token fragment in {f}"


@pytest.fixture
def cfg_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DISCORD_TOKEN", TOKEN)
    path = write_config(tmp_path, TINY, training={"enabled": True})
    monkeypatch.setenv("GUILDTUNE_CONFIG", str(path))
    return path


def test_config_holds_the_token_but_never_shows_it(cfg_file: Path) -> None:
    cfg = load_config(cfg_file)
    assert cfg.discord.token == TOKEN  # read from the environment
    assert_clean(repr(cfg), str(cfg), repr(cfg.discord), json.dumps(cfg.snapshot(), default=str))


@pytest.mark.parametrize("toml, match", [
    ('[discord]\ntoken = "{tok}"\n', "must not be in the file"),
    ('[discord]\nuser_rate_per_minute = "{tok}"\n', "user_rate_per_minute"),
    ('[nope]\nx = "{tok}"\n', "unknown section"),
    ('discord = "{tok}"\n', r"\[discord\]"),
    ('[training]\nschedule = "{tok} * * * *"\n', "training.schedule"),
    ('[training]\nschedule = "* * * * {tok}"\n', "training.schedule"),
])
def test_config_errors_do_not_echo_the_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             toml: str, match: str) -> None:
    monkeypatch.setenv("DISCORD_TOKEN", TOKEN)
    path = tmp_path / "bad.toml"
    # The token pasted into the file by mistake: the error must not repeat the value.
    path.write_text(toml.format(tok=TOKEN))
    with pytest.raises(ConfigError, match=match) as err:
        load_config(path)
    assert_clean(str(err.value), repr(err.value))
    assert "\n" not in str(err.value) and TOKEN[:6] not in str(err.value)


def _every_config_key() -> list[tuple[str, str, Any]]:
    """(section, key, type) for every field of every config section, the token included."""
    out = []
    for section in dataclasses.fields(Config):
        if section.name == "source":
            continue
        cls = section.default_factory  # type: ignore[misc]
        hints = typing.get_type_hints(cls)
        out += [(section.name, f.name, hints[f.name]) for f in dataclasses.fields(cls)]
    return out


def _wrong_typed_token(tp: Any) -> Any:
    """The token as a value of the wrong type for ``tp``: a bare string where a list, a number,
    a switch or one of a few words belongs; a list holding it where a string belongs."""
    return [TOKEN] if tp is str else TOKEN


def test_every_key_of_config_example_is_covered() -> None:
    example = tomllib.loads(
        (Path(__file__).parent.parent / "config.example.toml").read_text(encoding="utf-8"))
    keys = {(s, k) for s, k, _ in _every_config_key()}
    assert {(s, k) for s, table in example.items() for k in table} <= keys
    assert len(keys) > 50


@pytest.mark.parametrize("section, key, tp", _every_config_key(),
                         ids=[f"{s}.{k}" for s, k, _ in _every_config_key()])
def test_no_config_error_echoes_a_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        section: str, key: str, tp: Any) -> None:
    """A token pasted into any key, as a value of the wrong type: the error names the key and
    what is allowed, on one line, and shows the value redacted."""
    monkeypatch.setenv("DISCORD_TOKEN", TOKEN)
    path = tmp_path / "bad.toml"
    path.write_text(f"[{section}]\n{key} = {json.dumps(_wrong_typed_token(tp))}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert_clean(msg, repr(err.value))
    assert f"{section}.{key}" in msg and "\n" not in msg, msg
    if (section, key) != ("discord", "token"):  # that one says where the token belongs
        assert f"= {REDACTED} is not allowed: " in msg, msg


# String keys whose validation refuses a token-shaped string (the others take any string).
REFUSE_A_TOKEN = {("discord", "token"), ("model", "device"), ("model", "vllm_url"),
                  ("training", "schedule"), ("training", "precision")}


@pytest.mark.parametrize("section, key", [(s, k) for s, k, tp in _every_config_key() if tp is str],
                         ids=[f"{s}.{k}" for s, k, tp in _every_config_key() if tp is str])
def test_a_token_in_a_string_key_loads_or_fails_without_echo(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, section: str, key: str) -> None:
    """The right type but a token for a value: the keys that refuse it do not show it."""
    monkeypatch.setenv("DISCORD_TOKEN", TOKEN)
    path = tmp_path / "bad.toml"
    path.write_text(f"[{section}]\n{key} = {json.dumps(TOKEN)}\n")
    if (section, key) not in REFUSE_A_TOKEN:
        load_config(path)
        return
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert_clean(msg, repr(err.value))
    assert f"{section}.{key}" in msg and "\n" not in msg and TOKEN[:6] not in msg, msg


def test_ordinary_values_are_still_shown_in_config_errors(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[model]\ndevice = "gpu0"\nmax_new_tokens = "many"\n')
    with pytest.raises(ConfigError, match=r"model\.max_new_tokens = 'many' is not allowed"):
        load_config(path, env={})
    path.write_text('[model]\ndevice = "gpu0"\n')
    with pytest.raises(ConfigError, match=r"model\.device = 'gpu0' is not allowed: one of"):
        load_config(path, env={})


async def test_console_session_and_demo_flow_leak_nothing(cfg_file: Path, tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture,
                                                          capsys: pytest.CaptureFixture[str]
                                                          ) -> None:
    caplog.set_level(logging.DEBUG)
    cfg = load_config(cfg_file)
    from contextlib import AsyncExitStack

    from bot.services import open_services

    owner = AsyncExitStack()
    s = await owner.enter_async_context(open_services(cfg, engine=EchoEngine()))
    try:
        out = StringIO()
        script = ("hello bot\n/consent on\nhow are you\n/rate +\n/suggest better words\n"
                  "/mydata\n/tune status\n/tune training on\n/tune retrain\n/tune persona hi\n"
                  "/bogus\n/forget\nyes\n/quit\n")
        assert await run_console(s, "secretguild", stdin=StringIO(script), out=out) == 0
        # A demo-like flow: two guilds chat, rate, build datasets, a version goes live.
        eng = FakeEngine("a fine answer")
        s.engine = eng
        core = Core(s)

        for g in (1, 2):
            await core.consent(g, 7, True)
            res = await core.chat(RecordingChannel(), guild_id=g, channel_id=3, user_id=7,
                                  request_message_id=50 + g, turns=[Turn("user", 7, 50 + g, "hi",
                                                                         created_utc=utc_now())])
            await core.rate(g, res.feedback_message_id, 7, 1)
            data = build_dataset(s.store, g, cfg)
            (tmp_path / f"dataset-{g}.json").write_text(json.dumps(
                {"stats": data.stats, "fp": data.fingerprint, "cfg": cfg.snapshot()}))
        status = await core.status(1, chart=False)
        # Forced failures: an adapter that cannot load, and the watcher logs it.
        s.store.register_version(1, 1, str(tmp_path / "gone"), base_model="tiny", lora={},
                                 contributors={}, activate=True)
        eng.broken.add(1)
        lines = await AdapterWatcher(s).sync_once()
    finally:
        await owner.aclose()
    captured = capsys.readouterr()
    assert_clean(out.getvalue(), captured.out, captured.err, caplog.text, status.lines(), lines,
                 [r.getMessage() for r in caplog.records])
    assert_files_clean(tmp_path)


def test_cli_status_and_export_leak_nothing(cfg_file: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str],
                                            caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    from guildtune.cli import main

    cfg = load_config(cfg_file)
    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    store = open_store(cfg.db_path)
    store.grant_consent(5, 9)
    store.log_interaction(5, 1, 9, context=[], reply="r", reply_message_id=1)
    store.close()
    c = ["--config", str(cfg_file)]
    codes = [main([*c, "status"]), main([*c, "status", "--json"]),
             main([*c, "export", "--user", "9", "--out", str(tmp_path / "export.json")]),
             main([*c, "export", "--user", "9"])]
    assert codes == [0, 0, 0, 0]
    captured = capsys.readouterr()
    assert_clean(captured.out, captured.err, caplog.text)
    assert_files_clean(tmp_path)


def test_forced_store_busy_and_adapter_errors(cfg_file: Path, tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    cfg = load_config(cfg_file)
    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    store = open_store(cfg.db_path, busy_timeout_ms=20, write_retries=1)
    store.grant_consent(5, 9)
    blocker = sqlite3.connect(cfg.db_path)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(StoreBusyError) as busy:
            store.grant_consent(5, 10)
    finally:
        blocker.rollback()
        blocker.close()
        store.close()
    # Adapter refusals as the engine's validator words them: a version directory that is gone
    # and one without its publisher metadata.
    adapter_errors = []
    empty = cfg.adapters_dir / "5" / "v2"
    empty.mkdir(parents=True)
    for version, path in ((1, cfg.adapters_dir / "5" / "v1"), (2, empty)):
        with pytest.raises(AdapterError) as refused:
            validate_adapter_dir(path, guild_id=5, version=version, base_id="tiny",
                                 lora_shape=cfg.lora.shape())
        assert str(path) in str(refused.value)
        adapter_errors += [str(refused.value), repr(refused.value)]
    assert "is locked by another process" in str(busy.value)
    assert_clean(str(busy.value), repr(busy.value), "".join(traceback.format_exception(
        busy.value)), *adapter_errors, caplog.text)


async def test_command_failure_is_logged_without_the_token(cfg_file: Path,
                                                           caplog: pytest.LogCaptureFixture
                                                           ) -> None:
    caplog.set_level(logging.DEBUG)
    from bot.cog import POLITE_FAILURE, GuildTuneCog
    from bot.services import Services

    cfg = load_config(cfg_file)
    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    store = open_store(cfg.db_path)
    bot = commands.Bot(command_prefix="!", intents=discord.Intents.none())
    cog = GuildTuneCog(bot, Services(config=cfg, store=store, engine=FakeEngine()))
    i = FakeInteraction(bot, 5, FakeUser(1, admin=True))
    try:
        raise StoreBusyError("the database stayed locked")
    except StoreBusyError as exc:
        from discord import app_commands

        wrapped = app_commands.CommandInvokeError.__new__(app_commands.CommandInvokeError)
        wrapped.original = exc  # type: ignore[attr-defined]
        wrapped.command = None  # type: ignore[attr-defined]
        Exception.__init__(wrapped, "Command raised an exception")
        await cog.cog_app_command_error(i, wrapped)
    store.close()
    assert i.text == POLITE_FAILURE
    assert_clean(caplog.text, i.text)


@pytest.mark.parametrize("token", ["", TOKEN])
def test_runner_missing_or_invalid_token_prints_no_token(tmp_path: Path, token: str,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str],
                                                         caplog: pytest.LogCaptureFixture
                                                         ) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("DISCORD_TOKEN", token)
    path = write_config(tmp_path)

    async def refuse(self: Any, tok: str) -> Any:  # what Discord answers to a bad token
        raise discord.LoginFailure("Improper token has been passed.")

    monkeypatch.setattr(discord.http.HTTPClient, "static_login", refuse)
    from guildtune.cli import main

    code = main(["run", "--no-worker", "--config", str(path)])  # one line, no traceback
    captured = capsys.readouterr()
    assert code != 0
    assert ("DISCORD_TOKEN is not set" if not token else "Discord refused the token") in \
        captured.err
    assert len(captured.err.strip().splitlines()) == 1
    assert_clean(captured.out, captured.err, caplog.text)
    assert_files_clean(tmp_path)


def test_parse_config_from_a_dict_keeps_token_out_of_snapshot() -> None:
    cfg = parse_config({}, env={"DISCORD_TOKEN": TOKEN})
    assert cfg.discord.token == TOKEN
    assert_clean(repr(cfg), json.dumps(cfg.snapshot(), default=str))
