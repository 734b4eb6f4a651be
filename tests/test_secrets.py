"""Secrets: a recognizable fake Discord token never shows up in logs, output, files written,
exceptions or reprs, through the console, the CLI, a demo-like flow and forced failures."""

from __future__ import annotations

from storage.times import utc_now

import asyncio
import json
import logging
import sqlite3
import traceback
from io import StringIO
from pathlib import Path
from typing import Any

import discord
import pytest
from discord.ext import commands

from bot.console import EchoEngine, run_console
from bot.engine import AdapterError
from bot.handlers import AdapterWatcher, Core, Turn
from guildtune.config import ConfigError, load_config, parse_config
from storage import open_store
from storage.store import StoreBusyError
from tests.fakes import FakeEngine, FakeInteraction, FakeUser
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
    monkeypatch.setenv("GUILDTUNE_CONFIG", str(tmp_path / "config.toml"))
    path = tmp_path / "config.toml"
    path.write_text(f'[storage]\ndata_dir = "{tmp_path / "data"}"\n[model]\nname = "tiny"\n'
                    '[training]\nenabled = true\n')
    return path


def test_config_holds_the_token_but_never_shows_it(cfg_file: Path) -> None:
    cfg = load_config(cfg_file)
    assert cfg.discord.token == TOKEN  # read from the environment
    assert_clean(repr(cfg), str(cfg), repr(cfg.discord), json.dumps(cfg.snapshot(), default=str))


@pytest.mark.parametrize("toml, match", [
    ('[discord]\ntoken = "{tok}"\n', "must not be in the file"),
    ('[discord]\nuser_rate_per_minute = "{tok}"\n', "user_rate_per_minute"),
    ('[nope]\nx = "{tok}"\n', "unknown section"),
])
def test_config_errors_do_not_echo_the_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             toml: str, match: str) -> None:
    monkeypatch.setenv("DISCORD_TOKEN", TOKEN)
    path = tmp_path / "bad.toml"
    # The token pasted into the file by mistake: the error must not repeat the value.
    path.write_text(toml.format(tok=TOKEN))
    with pytest.raises(ConfigError, match=match) as err:
        load_config(path)
    if "token" in toml.split("=")[0]:
        assert_clean(str(err.value), repr(err.value))


async def test_console_session_and_demo_flow_leak_nothing(cfg_file: Path, tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture,
                                                          capsys: pytest.CaptureFixture[str]
                                                          ) -> None:
    caplog.set_level(logging.DEBUG)
    cfg = load_config(cfg_file)
    from bot.services import build_services

    s = await build_services(cfg, engine=EchoEngine())
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

        class Chan:
            ids = iter(range(10**12, 10**13))

            def typing(self) -> Any:
                return _anull()

            async def send(self, text: str, *, first: bool, last: bool) -> int:
                return next(self.ids)

        for g in (1, 2):
            await core.consent(g, 7, True)
            res = await core.chat(Chan(), guild_id=g, channel_id=3, user_id=7,
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
        await asyncio.to_thread(s.store.close)
    captured = capsys.readouterr()
    assert_clean(out.getvalue(), captured.out, captured.err, caplog.text, status.lines(), lines,
                 [r.getMessage() for r in caplog.records])
    assert_files_clean(tmp_path)


class _anull:
    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *a: object) -> None:
        return None


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
    err = AdapterError(f"cannot load {tmp_path}/adapters/5/v1")
    assert_clean(str(busy.value), repr(busy.value), "".join(traceback.format_exception(
        busy.value)), str(err), repr(err), caplog.text)


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
    path = tmp_path / "config.toml"
    path.write_text(f'[storage]\ndata_dir = "{tmp_path / "data"}"\n')

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
