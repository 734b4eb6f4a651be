"""A hostile review of issue 13, kept: each test once showed a broken promise."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch

from bot.core import Core
from guildtune.config import parse_config
from guildtune.models import TINY, load_model, resolve_device
from storage import open_store
from tests.fakes import (
    TINY_TRAINER,
    liked_replies,
    make_config,
    padded_batch,
    services_on,
)
from trainer import fit as fit_mod
from trainer.data import Example
from trainer.pipeline import train_guild
from trainer.worker import execute_run

G = 1337


# -- 1. the fit's own attention drops Gemma-2's attention softcapping ---------------------------

def test_training_attention_keeps_gemma2_softcapping() -> None:
    """training_attention swaps in _train_attention for any 'eager'/'sdpa' model; its ``**_``
    swallows the ``softcap`` kwarg Gemma-2 passes, so the fit trains (and reports the loss of) a
    different function from the one the model serves."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    model = Gemma2ForCausalLM(Gemma2Config(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
        attn_logit_softcapping=5.0)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.5)
    ids, att, labels = padded_batch(300, 4)
    with torch.no_grad():
        ref, _ = fit_mod.token_nll(model, ids, att, labels)
        with fit_mod.training_attention(model, torch.device("cpu")):
            ours, _ = fit_mod.token_nll(model, ids, att, labels)
    assert torch.allclose(ours, ref, atol=1e-3), (ours - ref).abs().max()


# -- 2. the preference term ignores the token budget -------------------------------------------

def test_the_preference_term_stays_within_the_token_budget() -> None:
    """max_batch_tokens promises 'most tokens forwarded at once'; the KTO term collates
    2 x batch_size//2 rows unpadded-to-budget and forwards them whole (twice: policy, ref)."""
    cfg = parse_config({"model": {"name": TINY}, "lora": {"rank": 4, "alpha": 8},
                        "training": {"enabled": True, "max_steps": 1, "batch_size": 16,
                                     "max_seq_len": 64, "max_batch_tokens": 64,
                                     "preference_loss": True, "precision": "fp32"}})
    lm = load_model(TINY, dtype="float32")
    r = random.Random(3)
    train = [Example((("user", "hi " * r.randint(5, 20)),
                      ("assistant", f"reply {i} " * r.randint(2, 8))), "liked", i)
             for i in range(16)]
    neg = [Example((("user", "hi " * r.randint(5, 20)),
                    ("assistant", f"bad {i} " * r.randint(2, 8))), "disliked", i)
           for i in range(16)]
    seen: list[int] = []
    real = fit_mod.token_nll

    def spy(model: Any, ids: torch.Tensor, att: torch.Tensor, labels: torch.Tensor) -> Any:
        seen.append(ids.numel())
        return real(model, ids, att, labels)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fit_mod, "token_nll", spy)
        fit_mod.fit(lm.model, lm.tokenizer, train, cfg, negatives=neg)
    assert max(seen) <= 64, seen


# -- 3. training.precision = "fp32" on a GPU loads (and evaluates) the base in bf16 -----------

def test_fp32_precision_on_a_gpu_loads_fp32_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """weights_dtype returns "auto" when precision resolves to fp32, and resolve_device's "auto"
    is bf16 on CUDA: the frozen base is bf16 with no autocast at all (less precise than "bf16"),
    and heldout_loss, seeing bf16 embeddings, then evaluates under bf16 autocast."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg = parse_config({"training": {"precision": "fp32"}})
    _, dtype = resolve_device(cfg.model.device, fit_mod.weights_dtype(cfg))
    assert dtype == torch.float32


# -- 4. the k-fold gate runs k + 1 fits, each with the whole time budget -----------------------

class _Clock:
    """perf_counter for trainer.fit: every call is 2 s later (about a step)."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        self.now += 2.0
        return self.now


def _kfold_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
               **training: Any) -> tuple[list[Any], list[dict]]:
    cfg = make_config(tmp_path, TINY_TRAINER, training={
        **TINY_TRAINER["training"], "batch_size": 4, **training})
    store = open_store(cfg.db_path)
    liked_replies(store, G, 20)
    monkeypatch.setattr(fit_mod, "time", _Clock())
    fits: list[Any] = []
    real = fit_mod.fit

    def counting(*a: Any, **k: Any) -> Any:
        res = real(*a, **k)
        fits.append(res)
        return res

    monkeypatch.setattr(fit_mod, "fit", counting)
    seen: list[dict] = []
    res = train_guild(store, cfg, G, progress=lambda p: seen.append(dict(p)))
    store.close()
    assert res.metrics["eval"].startswith("k-fold")
    return fits, seen


def test_a_k_fold_run_keeps_to_the_time_budget(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """training.time_budget_minutes: 'A run stops and evaluates what it has after this long'.
    _judge_by_folds calls fit() k + 1 = 6 times and each fit restarts its own clock."""
    fits, _ = _kfold_run(tmp_path, monkeypatch, epochs=50.0, time_budget_minutes=1.0)
    spent = sum(f.seconds for f in fits)
    # Each fit may finish the step that crossed its share (2 s here); six whole budgets was
    # the defect (each fit alone would run its 60 s).
    assert spent <= 60 + 2 * 2 * len(fits), f"{len(fits)} fits, {spent:.0f} s of a 60 s budget"


def test_k_fold_progress_eta_counts_the_fits_still_to_come(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The 'about N left' of a k-fold run's progress (log, /tune status, the CLI bar) is the
    current fit's alone: in fold 1 it ignores the 4 folds and the final fit still to run."""
    fits, seen = _kfold_run(tmp_path, monkeypatch, epochs=1.0)  # 4-5 steps a fit
    first = next(p for p in seen if "eta_s" in p)
    total = sum(f.seconds for f in fits)
    remaining = total - first["elapsed_s"]
    assert first["eta_s"] >= 0.5 * remaining, (first, remaining)


# -- 5. status's "needs N more" outlives the data that answered it ------------------------------

async def test_status_needed_is_not_stale_after_the_data_arrived(tmp_path: Path) -> None:
    """The README: '/tune status says how many more examples the next run needs'. It prints the
    last failed run's ``needed`` as is, after those examples have arrived."""
    s = services_on(make_config(tmp_path, TINY_TRAINER))
    liked_replies(s.store, G, 3)
    s.store.enqueue_run(G, "manual")
    run = s.store.claim_run("w", 60, guild_id=G)
    assert execute_run(s.store, s.config, run, "w", isolate=False) == "failed"
    needed = s.store.get_run(run.id).metrics["needed"]
    assert needed == 7
    liked_replies(s.store, G, needed, start=3)  # exactly what it asked for
    last = dict((await Core(s).status(G, chart=False)).fields())["Last run"]
    s.store.close()
    assert f"needs {needed} more" not in last, last


# -- 6. a budget that is not a multiple of 32 is exceeded by every padded row --------------------

def test_a_row_padded_to_32_stays_within_a_valid_budget() -> None:
    """Config accepts max_batch_tokens = max_seq_len = 100; collate pads a 100-token row to 128,
    so every forward is 28% over 'the most tokens forwarded at once'."""
    from guildtune.config import ConfigError

    with pytest.raises(ConfigError, match="max_batch_tokens = 100 .* rounded up to 32, 128"):
        parse_config({"training": {"max_seq_len": 100, "max_batch_tokens": 100}})
    cfg = parse_config({"training": {"max_seq_len": 100, "max_batch_tokens": 128}})
    e = fit_mod.Encoded(list(range(3, 103)), [fit_mod.IGNORE] * 50 + list(range(53, 103)), 1.0)
    budget = cfg.training.max_batch_tokens
    for piece in fit_mod.token_slices([e, e], budget, fit_mod.PAD_MULTIPLE):
        ids, _, _, _ = fit_mod.collate(piece, 0, torch.device("cpu"), fit_mod.PAD_MULTIPLE)
        assert ids.numel() <= budget, ids.shape


# -- 7. status pairs the candidate's loss on all examples with the active's on a subset ---------

def test_gate_line_compares_candidate_and_active_on_the_same_examples() -> None:
    """The gate judges candidate_vs_active_loss against active_loss (same examples, those new
    since the active version); gate_line prints candidate_loss (all examples) beside active_loss,
    so status can read 'candidate 1.0000 ... vs active 1.1000' above a rejection."""
    from guildtune.progress import gate_line

    m = {"candidate_loss": 1.0, "base_loss": 1.5, "active_loss": 1.1,
         "candidate_vs_active_loss": 1.2, "n_judged_vs_active": 12, "active_version": 2,
         "eval": "k-fold k=5", "n_heldout": 0, "n_train": 32,
         "gate": "candidate loss 1.2000 does not beat the active version's 1.1000 by 1.0%"}
    losses = gate_line(m).split("; gate:")[0]
    assert "1.2000" in losses, losses
