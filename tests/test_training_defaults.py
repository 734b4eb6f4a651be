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


def test_the_repetition_penalty_spares_the_end_of_turn() -> None:
    """A chat prompt holds an end-of-turn token per turn; HF's penalty lowers it and replies
    run on (bench/style.py). Both local decoding paths penalize every seen token but those."""
    import torch
    from transformers import RepetitionPenaltyLogitsProcessor

    from bot.engine.base import penalized_tokens
    from bot.engine.local import _sparing_penalty

    assert penalized_tokens([5, 2, 7, 2, 9, 7], {2, 0}) == [5, 7, 9]
    ids = torch.tensor([[0, 5, 2, 7], [9, 2, 2, 3]])
    scores = torch.full((2, 12), 4.0)
    scores[:, 8] = -4.0
    ours = _sparing_penalty(2.0, {2, 0})(ids, scores.clone())
    hf = RepetitionPenaltyLogitsProcessor(2.0)(ids, scores.clone())
    assert hf[0, 2] == 2.0 and hf[1, 2] == 2.0  # HF lowers the end of turn
    assert ours[0, 2] == 4.0 and ours[1, 2] == 4.0 and ours[0, 0] == 4.0  # ours spares it
    assert ours[0, 5] == ours[0, 7] == ours[1, 9] == ours[1, 3] == 2.0  # and lowers the rest
    assert ours[0, 9] == 4.0 and ours[0, 8] == -4.0  # unseen tokens are untouched


def test_the_step_loop_ends_a_reply_its_model_wants_to_end() -> None:
    """The end of turn is the top token by a little, and was in the prompt: HF's rule picks
    another token (the reply runs on), the engine's picks the end of turn."""
    import torch

    from bot.engine.local import LocalEngine
    from bot.engine.steploop import StepLoop, _Live
    from guildtune.config import parse_config

    cfg = parse_config({"model": {"name": "tiny"}}, env={})
    eng = LocalEngine(load_model(TINY), cfg.model, cfg.lora)
    eot = eng._eos[0]
    picked = {}
    for spare in (True, False):
        eng.spare_end_of_turn = spare
        loop = StepLoop(eng)
        logits = torch.zeros(64)
        logits[eot], logits[7] = 2.0, 1.9
        row = _Live(None, [3, eot, 5, eot], "__base__", None, 8, 0.0, 1.0, 1.3)  # type: ignore
        picked[spare] = loop._sample(row, logits)
    assert picked == {True: eot, False: 7}
