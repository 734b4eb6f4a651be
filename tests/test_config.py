"""Config: every class of mistake fails at start with one line naming key, value and fix."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from guildtune.config import ConfigError, load_config, parse_config

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_and_example_are_valid() -> None:
    cfg = parse_config({}, env={})
    assert cfg.training.enabled is False  # training stays off until the operator enables it
    example = tomllib.loads((ROOT / "config.example.toml").read_text(encoding="utf-8"))
    ex = parse_config(example, env={})
    assert ex.lora.shape() == cfg.lora.shape()


def test_every_example_key_is_commented() -> None:
    lines = (ROOT / "config.example.toml").read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if "=" in line and not line.lstrip().startswith("#"):
            assert lines[i - 1].lstrip().startswith("#") or "#" in line, \
                f"config.example.toml line {i + 1} has no comment: {line}"


@pytest.mark.parametrize("data, expected", [
    ({"modle": {}}, "unknown section [modle]"),
    ({"model": {"nmae": "x"}}, "unknown key model.nmae"),
    ({"model": {"max_new_tokens": "many"}}, "model.max_new_tokens = 'many' is not allowed: an integer"),
    ({"training": {"enabled": "yes"}}, "training.enabled = 'yes' is not allowed: true or false"),
    ({"lora": {"rank": 0}}, "lora.rank = 0 is not allowed"),
    ({"lora": {"target_modules": []}}, "lora.target_modules"),
    ({"lora": {"target_modules": "q_proj"}}, "a list of a string"),
    ({"model": {"dtype": "fp8"}}, "model.dtype = 'fp8' is not allowed: one of"),
    ({"model": {"device": "gpu"}}, "model.device = 'gpu'"),
    ({"training": {"schedule": "every night"}}, "training.schedule = 'every night'"),
    ({"privacy": {"max_user_share": 1.5}}, "privacy.max_user_share = 1.5"),
    ({"training": {"heldout_fraction": 0.9}}, "training.heldout_fraction = 0.9"),
    ({"discord": {"token": "abc"}}, "DISCORD_TOKEN"),
    ({"model": []}, "[model]"),
])
def test_bad_config_gives_one_clear_line(data: dict, expected: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config(data, env={})
    msg = str(exc.value)
    assert expected in msg and "\n" not in msg


def test_token_comes_from_the_environment_and_never_shows(tmp_path: Path) -> None:
    cfg = parse_config({}, env={"DISCORD_TOKEN": "sekrit.token.value"})
    assert cfg.discord.token == "sekrit.token.value"
    assert "sekrit" not in repr(cfg) and "sekrit" not in str(cfg.snapshot())


def test_load_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert load_config(env={}).source == "built-in defaults"
    (tmp_path / "config.toml").write_text('[model]\nname = "tiny"\n')
    assert load_config(env={}).model.name == "tiny"
    other = tmp_path / "other.toml"
    other.write_text('[model]\nname = "from-env"\n')
    assert load_config(env={"GUILDTUNE_CONFIG": str(other)}).model.name == "from-env"
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml", env={})
    (tmp_path / "broken.toml").write_text("[model\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(tmp_path / "broken.toml", env={})


# -- storage.url: "" (the SQLite file in data_dir), a SQLite path, or a PostgreSQL URL ---------

@pytest.mark.parametrize("url, expected", [
    ("mysql://db.example/guildtune", "mysql:// is not supported"),  # another scheme
    ("sqlite:///tmp/x.db", "sqlite:// is not supported"),  # a path, not a URL, for SQLite
    ("/tmp/x\x00.db", "NUL character"),
    ("   ", "only blanks"),
])
def test_a_bad_storage_url_gives_one_clear_line(url: str, expected: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config({"storage": {"url": url}}, env={})
    msg = str(exc.value)
    assert "storage.url = " in msg and expected in msg and "\n" not in msg
    assert "postgresql://" in msg and "SQLite" in msg  # says which forms are accepted


def test_a_storage_url_that_is_a_directory_names_the_file_to_use(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config({"storage": {"url": str(tmp_path)}}, env={})
    assert "is a directory" in str(exc.value) and "guildtune.db" in str(exc.value)


def test_a_storage_url_password_never_shows(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config({"storage": {"url": "mysql://bot:hunter2@db/x"}}, env={})
    assert "hunter2" not in str(exc.value) and "bot:***@db" in str(exc.value)
    cfg = parse_config({"storage": {"url": "postgresql://bot:hunter2@db:5432/x"}}, env={})
    assert cfg.store_url == "postgresql://bot:hunter2@db:5432/x"  # the store gets it whole
    assert "hunter2" not in repr(cfg) and "hunter2" not in str(cfg.snapshot())
    assert cfg.snapshot()["storage"]["url"] == "postgresql://bot:***@db:5432/x"


def test_store_url_is_the_database_to_open(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    data = {"data_dir": str(tmp_path / "data")}
    default = parse_config({"storage": data}, env={})
    assert default.store_url == default.db_path == tmp_path / "data" / "guildtune.db"
    on_file = parse_config({"storage": {**data, "url": "~/shared/bot.db"}}, env={})
    assert on_file.store_url == tmp_path / "shared" / "bot.db"
    assert on_file.db_path == tmp_path / "data" / "guildtune.db"  # unchanged for its callers
    for url in ("postgresql://bot@db.internal:5432/guildtune", "postgres://bot@db/guildtune",
                "PostgreSQL://bot@db/guildtune"):
        pg = parse_config({"storage": {"url": url}}, env={})
        assert pg.store_url == url and isinstance(pg.store_url, str)


# -- discord.shard_count / shard_ids ---------------------------------------------------------

@pytest.mark.parametrize("keys, expected", [
    ({"shard_count": -1}, "discord.shard_count = -1 is not allowed: the total number of shards"),
    ({"shard_count": "two"}, "discord.shard_count = 'two' is not allowed: an integer or 'auto'"),
    ({"shard_count": 2.5}, "discord.shard_count = 2.5 is not allowed: an integer or 'auto'"),
    ({"shard_count": True}, "discord.shard_count = True is not allowed"),
    ({"shard_count": "auto", "shard_ids": [0]},
     "discord.shard_ids = [0] is not allowed: shard ids need a numeric discord.shard_count"),
    ({"shard_ids": [0]}, "shard ids need discord.shard_count set to the total number"),
    ({"shard_count": 4, "shard_ids": [0, 4]}, "each id must be from 0 to 3"),
    ({"shard_count": 4, "shard_ids": [-1]}, "out of range: -1"),
    ({"shard_count": 4, "shard_ids": [1, 2, 1]}, "listed more than once: 1"),
    ({"shard_count": 4, "shard_ids": ["1"]}, "discord.shard_ids[0] = '1' is not allowed"),
    ({"shard_count": 4, "shard_ids": 1}, "discord.shard_ids = 1 is not allowed: a list of"),
])
def test_bad_sharding_gives_one_clear_line(keys: dict, expected: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config({"discord": keys}, env={})
    msg = str(exc.value)
    assert expected in msg and "\n" not in msg


def test_sharding_is_off_by_default_and_takes_a_count_or_auto() -> None:
    d = parse_config({}, env={}).discord
    assert d.shard_count == 0 and d.shard_ids == () and not d.sharded
    d = parse_config({"discord": {"shard_count": "auto"}}, env={}).discord
    assert d.shard_count == "auto" and d.sharded
    d = parse_config({"discord": {"shard_count": 4, "shard_ids": [3, 1]}}, env={}).discord
    assert d.shard_count == 4 and d.shard_ids == (3, 1) and d.sharded
