"""The shipped training and decoding defaults (set from bench/data_curve.py and bench/style.py)
are the ones a run uses, the example config shows them, and a small guild's first run is not a
handful of steps."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from guildtune.config import ConfigError, parse_config
from guildtune.models import TINY, load_model
from tests.fakes import TINY_TRAINER, make_config
from trainer.data import Example
from trainer.fit import fit, plan_steps

ROOT = Path(__file__).resolve().parents[1]


def test_the_example_config_shows_every_shipped_default() -> None:
    shipped = parse_config({}, env={})
    example = parse_config(tomllib.loads((ROOT / "config.example.toml").read_text("utf-8")),
                           env={})
    for section in dataclasses.fields(shipped):
        ours, theirs = getattr(shipped, section.name), getattr(example, section.name)
        if not dataclasses.is_dataclass(ours):
            continue
        for key in dataclasses.fields(ours):
            assert getattr(theirs, key.name) == getattr(ours, key.name), \
                f"config.example.toml [{section.name}] {key.name} differs from the default"


def test_a_small_dataset_is_passed_over_several_times_and_a_large_one_once() -> None:
    cfg = parse_config({}, env={})
    t = cfg.training
    assert t.min_steps > 0 and t.epochs == 1.0
    assert plan_steps(3, cfg) == t.min_steps  # 20 examples in batches of 8: not 3 steps
    assert plan_steps(500, cfg) == 500  # 4,000 examples: one pass
    assert plan_steps(3, cfg.replace(training={"max_steps": 5})) == 5  # the cap wins
    assert plan_steps(3, cfg.replace(training={"min_steps": 0})) == 3


def test_min_steps_must_be_a_whole_number_of_steps() -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config({"training": {"min_steps": -1}}, env={})
    assert "training.min_steps = -1" in str(exc.value) and "\n" not in str(exc.value)


def test_a_real_fit_of_a_small_guild_runs_the_minimum_steps(tmp_path: Path) -> None:
    """12 examples, one batch of 16: without the floor the whole run is one optimizer step."""
    train = [Example((("user", f"question {i}"), ("assistant", f"answer {i} ok")), "liked", i,
                     created_utc=f"2026-01-01T00:00:{i:02d}.000Z") for i in range(12)]
    for floor, steps in ((6, 6), (0, 1)):
        cfg = make_config(tmp_path / str(floor), TINY_TRAINER, training={"min_steps": floor})
        lm = load_model(TINY)
        result = fit(lm.model, lm.tokenizer, train, cfg)
        assert result.steps == steps and len(result.losses) == steps
