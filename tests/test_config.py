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
