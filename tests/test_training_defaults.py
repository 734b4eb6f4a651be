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
from trainer.fit import MAX_FLOOR_PASSES, fit, plan_steps

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
    assert t.min_steps == 40 and t.epochs == 1.0
    assert plan_steps(7, cfg) == 40  # 50 examples in batches of 8: 40 steps, not 7
    assert plan_steps(3, cfg) == 3 * MAX_FLOOR_PASSES  # 20 examples: 6 passes, not 13
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


def test_the_repetition_penalty_lowers_the_replys_own_tokens_only() -> None:
    """The prompt's words and end-of-turn tokens are not what a loop repeats; lowering them
    makes replies run on (HF's rule) or stop at once (sparing only the end of turn):
    bench/style.py. Both local decoding paths apply the same rule."""
    import torch
    from transformers import RepetitionPenaltyLogitsProcessor

    from bot.engine.base import penalized_tokens
    from bot.engine.local import _scoped_penalty

    assert penalized_tokens([5, 2, 7], [9, 7, 9], {2, 0}) == [7, 9]
    assert penalized_tokens([5, 2, 7], [9, 7, 9], {2, 0}, "turns") == [5, 7, 9]
    assert penalized_tokens([5, 2, 7], [9], {2, 0}, "hf") == [2, 5, 7, 9]
    ids = torch.tensor([[0, 5, 2, 7, 9], [9, 2, 2, 3, 4]])  # prompts of width 4, then a token
    scores = torch.full((2, 12), 4.0)
    scores[:, 9] = -4.0
    ours = _scoped_penalty(2.0, {2, 0}, 4, "reply")(ids, scores.clone())
    hf = RepetitionPenaltyLogitsProcessor(2.0)(ids, scores.clone())
    assert hf[0, 2] == 2.0 and hf[0, 5] == 2.0  # HF lowers the end of turn and the prompt
    assert ours[0, 2] == ours[0, 5] == ours[0, 7] == 4.0  # ours: neither
    assert ours[0, 9] == -8.0 and ours[1, 4] == 2.0  # but the reply's own tokens
    assert ours[1, 3] == 4.0 and ours[1, 9] == -4.0  # the prompt's, unseen: untouched


def test_the_step_loop_lets_a_reply_end_and_echo_the_question() -> None:
    """The end of turn, then a word of the question, lead by a little: HF's rule picks a third
    token (the reply runs on and avoids the member's words); the engine's picks the end."""
    import torch

    from bot.engine.local import LocalEngine
    from bot.engine.steploop import StepLoop, _Live
    from guildtune.config import parse_config

    cfg = parse_config({"model": {"name": "tiny"}}, env={})
    eng = LocalEngine(load_model(TINY), cfg.model, cfg.lora)
    eot = eng._eos[0]
    picked = {}
    for scope in ("reply", "hf"):
        eng.penalty_scope = scope
        loop = StepLoop(eng)
        logits = torch.zeros(64)
        logits[eot], logits[5], logits[7] = 2.0, 1.95, 1.9
        row = _Live(None, [3, eot, 5, eot], "__base__", None, 8, 0.0, 1.0, 1.3)  # type: ignore
        picked[scope] = loop._sample(row, logits)
    assert picked == {"reply": eot, "hf": 7}
