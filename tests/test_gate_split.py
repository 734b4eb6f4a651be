"""The gate judges on the future, and small data still gets a gate (issue 13, items 1, 3-5).

- the held-out slice is the newest examples, the same for the same data whatever the order it
  arrived in, and the preference term never uses a disliked reply from that slice;
- a guild with ~20 liked replies trains its first adapter (k-fold gate), the same data never
  fails for want of a held-out slice, and a guild short of data is told how many more it needs;
- the fit's memory savers change nothing but memory: the fused, sliced output layer gives the
  plain cross entropy's values and gradients, and a batch run in token-budget pieces gives the
  same step as the whole batch.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from guildtune.config import parse_config
from guildtune.models import TINY, load_model
from storage import open_store
from tests.fakes import (
    TINY_TRAINER,
    import_style,
    liked_replies,
    make_config,
    padded_batch,
)
from trainer import fit as fit_mod
from trainer.data import (
    MIN_EXAMPLES,
    MIN_HELDOUT,
    Example,
    build_dataset,
    evaluation_plan,
    split_heldout,
    time_folds,
)
from trainer.pipeline import NotEnoughData, train_guild

G = 4242
# Enough passes for the tiny model to learn a repeated reply from 16 examples.
SMALL = {**TINY_TRAINER["training"], "epochs": 8.0, "batch_size": 8}


def ex(i: int, t: str, kind: str = "liked") -> Example:
    return Example((("user", f"q{i}"), ("assistant", f"a{i}")), kind, 1 + i % 5,
                   created_utc=t)


# -- the time split ----------------------------------------------------------------------------

def test_the_newest_examples_are_held_out_whatever_the_order_they_came_in() -> None:
    r = random.Random(1)
    items = [ex(i, f"2024-05-{1 + i // 10:02d}T00:00:{i % 10:02d}") for i in range(200)]
    items += [ex(1000 + i, "2024-05-30T00:00:00") for i in range(10)]  # a tie at the edge
    shuffled = items[:]
    r.shuffle(shuffled)
    train, held = split_heldout(items, 0.15)
    train2, held2 = split_heldout(shuffled, 0.15)
    assert [e.key for e in held] == [e.key for e in held2] and len(held) == int(0.15 * 210)
    assert {e.key for e in train} == {e.key for e in train2}
    assert max(e.created_utc for e in train) <= min(e.created_utc for e in held)
    # Newer data pushes the old held-out examples into training.
    newer = [ex(2000 + i, "2024-06-01T00:00:00") for i in range(40)]
    train3, held3 = split_heldout(items + newer, 0.15)
    assert {e.key for e in held3} <= {e.key for e in newer}
    assert {e.key for e in held} <= {e.key for e in train3}


def test_a_guilds_dataset_holds_out_its_newest_and_no_newer_negatives(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, TINY_TRAINER, training={"heldout_fraction": 0.15})
    store = open_store(cfg.db_path)
    liked_replies(store, G, 60)
    liked_replies(store, G, 12, start=60, score=-1)  # disliked, between old and new
    liked_replies(store, G, 80, start=72)
    data = build_dataset(store, G, cfg)
    assert data.stats["eval"] == "time split" and len(data.heldout) == int(140 * 0.15)
    newest = sorted(data.train + data.heldout, key=lambda e: e.created_utc)[-len(data.heldout):]
    assert {e.key for e in data.heldout} == {e.key for e in newest}
    assert len(data.negatives) == 12
    cutoff = min(e.created_utc for e in data.heldout)
    assert all(e.created_utc <= cutoff for e in data.negatives)
    # The same data splits the same way on every run.
    again = build_dataset(store, G, cfg)
    assert [e.key for e in again.heldout] == [e.key for e in data.heldout]
    store.close()


def test_time_folds_cover_every_example_once_in_blocks_of_time() -> None:
    items = [ex(i, f"2024-05-01T00:{i:02d}:00") for i in range(23)]
    folds = time_folds(list(reversed(items)), 5)
    assert len(folds) == 5 and {len(f) for f in folds} <= {4, 5}
    flat = [e.key for f in folds for e in f]
    assert sorted(flat) == sorted(e.key for e in items) and len(set(flat)) == 23
    assert flat == [e.key for e in items]  # contiguous, oldest first


@pytest.mark.parametrize(("n", "plan"), [(0, "too few"), (MIN_EXAMPLES - 1, "too few"),
                                        (MIN_EXAMPLES, "k-fold"), (106, "k-fold"),
                                        (107, "time split")])
def test_the_plan_follows_the_size(n: int, plan: str) -> None:
    assert evaluation_plan(n, 0.15) == plan
    if plan == "time split":
        assert int(n * 0.15) >= MIN_HELDOUT


# -- small data ----------------------------------------------------------------------------------

def test_twenty_liked_replies_train_a_first_adapter_and_the_same_data_never_fails_for_want_of_a_slice(
        tmp_path: Path) -> None:
    cfg = make_config(tmp_path, TINY_TRAINER, training=SMALL)
    store = open_store(cfg.db_path)
    liked_replies(store, G, 20)
    phases: list[str] = []
    res = train_guild(store, cfg, G,
                      progress=lambda p: phases.append(p["phase"]) if "phase" in p else None)
    assert res.status == "succeeded", res.metrics
    m = res.metrics
    assert m["eval"] == "k-fold k=5" and m["n_train"] == 20 and m["n_heldout"] == 0
    assert m["candidate_loss"] < m["base_loss"] and m["active_loss"] is None
    assert [p for p in phases if p.startswith("k-fold")] == [f"k-fold {i}/5" for i in
                                                            range(1, 6)]
    assert phases[-1] == "training"  # the published adapter is trained on all 20
    assert store.active_version(G).version == res.version
    # Again on the same data: judged against that version now, and it runs (never "too few").
    # Nothing is newer than the version, so it is judged on all 20 (a bar it trained on).
    again = train_guild(store, cfg, G)
    assert again.status in ("succeeded", "rejected")
    assert again.metrics["active_loss"] is not None and again.metrics["eval"] == "k-fold k=5"
    assert again.metrics["n_judged_vs_active"] == 20
    # Twelve new replies: the active version is judged on those alone (it never saw them),
    # against the fold adapters' losses on the same twelve.
    bar = store.active_version(G)
    liked_replies(store, G, 12, start=20)
    third = train_guild(store, cfg, G)
    m3 = third.metrics
    assert m3["active_version"] == bar.version and m3["n_judged_vs_active"] == 12
    assert m3["candidate_vs_active_loss"] != m3["candidate_loss"]
    assert (third.status == "succeeded") == (
        m3["candidate_vs_active_loss"] <= m3["active_loss"] * (1 - cfg.training.eval_margin)
        and m3["candidate_loss"] < m3["base_loss"])
    store.close()


def test_a_guild_short_of_data_is_told_how_many_more_it_needs(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, TINY_TRAINER, training=SMALL)
    store = open_store(cfg.db_path)
    store.update_guild_settings(G, training_enabled=True)
    with pytest.raises(NotEnoughData) as none:
        train_guild(store, cfg, G)
    assert none.value.needed == MIN_EXAMPLES and "no training examples yet" in str(none.value)
    liked_replies(store, G, MIN_EXAMPLES - 1)
    with pytest.raises(NotEnoughData) as short:
        train_guild(store, cfg, G)
    assert short.value.needed == 1 and "1 more" in str(short.value)
    assert store.active_version(G) is None
    liked_replies(store, G, 1, start=MIN_EXAMPLES - 1)
    assert train_guild(store, cfg, G).status in ("succeeded", "rejected")
    store.close()


def test_a_large_dataset_is_judged_on_its_newest_slice(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, TINY_TRAINER)
    store = open_store(cfg.db_path)
    import_style(store, G, "pirate", n=120)
    res = train_guild(store, cfg, G)
    data = build_dataset(store, G, cfg)
    n = len(data.train) + len(data.heldout)
    assert res.metrics["eval"] == "time split" and n > 100
    assert res.metrics["n_heldout"] == len(data.heldout) == int(n * cfg.training.heldout_fraction)
    store.close()


# -- memory savers that change nothing else ------------------------------------------------------

@pytest.mark.parametrize("amp", [False, True])
def test_the_fused_sliced_output_layer_equals_plain_cross_entropy(
        amp: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fit_mod, "HEAD_CHUNK", 7)  # several slices and a ragged last one
    torch.manual_seed(0)
    head = torch.nn.Linear(32, 500, bias=False).requires_grad_(False)
    h = torch.randn(30, 32, requires_grad=True)
    t = torch.randint(0, 500, (30,))
    w = torch.rand(30)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        nll = fit_mod.head_nll(head, h, t)
    (nll * w).sum().backward()
    fused = h.grad.clone()
    h.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        ref = F.cross_entropy(head(h).float(), t, reduction="none")
    (ref * w).sum().backward()
    tol = 2e-2 if amp else 1e-5
    assert torch.allclose(nll, ref, atol=tol) and torch.allclose(fused, h.grad, atol=tol)


def test_a_trainable_output_layer_takes_the_plain_path() -> None:
    head = torch.nn.Linear(8, 20)
    h = torch.randn(5, 8)
    t = torch.randint(0, 20, (5,))
    nll = fit_mod.head_nll(head, h, t)
    nll.sum().backward()
    assert head.weight.grad is not None  # gradients reach a layer that learns


def _one_step(cfg_sections: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
              seen: list[int] | None = None) -> dict[str, torch.Tensor]:
    """The LoRA gradients of the first step (read where the fit clips them)."""
    cfg = parse_config({"storage": {"data_dir": str(tmp_path)}, "model": {"name": TINY},
                        "lora": {"rank": 4, "alpha": 8, "dropout": 0.0},
                        "training": {"enabled": True, "max_steps": 1, "batch_size": 16,
                                     "max_seq_len": 64, "precision": "fp32", **cfg_sections}})
    lm = load_model(TINY, dtype="float32")
    r = random.Random(3)
    train = [Example((("user", "hi " * r.randint(1, 20)), ("assistant", f"reply {i} " * r.randint(
        1, 8))), "liked", i % 4) for i in range(16)]
    grads: dict[str, torch.Tensor] = {}
    clip = torch.nn.utils.clip_grad_norm_

    def record(params, *a, **k):  # type: ignore[no-untyped-def]
        if not grads:
            grads.update({str(i): p.grad.detach().clone() for i, p in enumerate(params)})
        return clip(params, *a, **k)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", record)
    if seen is not None:
        real = fit_mod.collate

        def spy(items, pad_id, device, multiple=1):  # type: ignore[no-untyped-def]
            out = real(items, pad_id, device, multiple)
            seen.append(out[0].numel())
            return out
        monkeypatch.setattr(fit_mod, "collate", spy)
    fit_mod.fit(lm.model, lm.tokenizer, train, cfg)
    return grads


def test_a_batch_cut_to_the_token_budget_takes_the_same_step(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    whole = _one_step({"max_batch_tokens": 4096}, tmp_path / "a", monkeypatch)
    seen: list[int] = []
    cut = _one_step({"max_batch_tokens": 64}, tmp_path / "b", monkeypatch, seen)
    assert len(seen) > 1 and max(seen) <= 64  # no forward over the budget
    assert whole.keys() == cut.keys() and any(g.abs().sum() > 0 for g in whole.values())
    for k in whole:
        assert torch.allclose(whole[k], cut[k], rtol=1e-4, atol=1e-7), k


def test_precision_follows_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert fit_mod.compute_dtype(cpu, "fp32") is None
    assert fit_mod.compute_dtype(cuda, "auto") is torch.bfloat16
    assert fit_mod.compute_dtype(cpu, "bf16") is torch.bfloat16
    monkeypatch.setattr(fit_mod, "_cpu_has_fast_bf16", lambda: False)
    assert fit_mod.compute_dtype(cpu, "auto") is None
    cfg = parse_config({"model": {"device": "cpu"}})
    assert fit_mod.weights_dtype(cfg) == "float32"  # fp32 weights where bf16 is slow
    monkeypatch.setattr(fit_mod, "_cpu_has_fast_bf16", lambda: True)
    assert fit_mod.compute_dtype(cpu, "auto") is torch.bfloat16
    assert fit_mod.weights_dtype(cfg) == "bfloat16"
    assert fit_mod.weights_dtype(cfg.replace(training={"precision": "fp32"})) == "float32"
    assert fit_mod.weights_dtype(cfg.replace(model={"dtype": "float32"})) == "float32"


def test_the_fits_attention_on_a_cpu_gives_the_models_own_numbers() -> None:
    """The training attention (softmax kept in bf16, eager matmuls) is the same function as the
    model's own attention: causal, padding-masked, at every labelled position."""
    lm = load_model(TINY, dtype="float32")
    ids, att, labels = padded_batch(500, 6)
    with torch.no_grad():
        ref, _ = fit_mod.token_nll(lm.model, ids, att, labels)
        with fit_mod.training_attention(lm.model, torch.device("cpu")):
            assert lm.model.config._attn_implementation == fit_mod.TRAIN_ATTENTION
            ours, _ = fit_mod.token_nll(lm.model, ids, att, labels)
    assert lm.model.config._attn_implementation == "sdpa"  # given back after the fit
    assert torch.allclose(ours, ref, atol=1e-4), (ours - ref).abs().max()


def test_eval_of_a_file_never_scores_an_adapter_on_pairs_it_trained_on(tmp_path: Path) -> None:
    """A file longer than training.max_examples: the run trains on its newest 60 and holds out
    the newest of those; ``guildtune eval`` of the same file judges on exactly that slice, never
    on the file's newest 15% (which holds pairs the run trained on)."""
    from guildtune.community import read_jsonl
    from trainer.data import examples_from_messages, heldout_of, system_prompt

    lines = []
    for i in range(400):
        lines.append(json.dumps({
            "community": "t", "part": 0, "seq": i, "author_id": 1 + i % 7,
            "time": f"2024-03-{1 + i // 100:02d}T{(i // 10) % 10:02d}:{i % 60:02d}:00",
            "text": f"question {i}?" if i % 2 == 0 else f"answer {i} ok",
            "reply_to": [] if i % 2 == 0 else [i - 1]}))
    f = tmp_path / "c.jsonl"
    f.write_text("\n".join(lines), encoding="utf-8")
    cfg = make_config(tmp_path, TINY_TRAINER, training={"max_examples": 150},
                      privacy={"max_user_share": 1.0})
    store = open_store(cfg.db_path)
    store.import_messages(G, [m.as_store_row() for m in read_jsonl(f)])
    store.update_guild_settings(G, learn_from_humans=True, training_enabled=True)
    system = system_prompt(store, G, cfg.model.system_prompt)
    file_examples = examples_from_messages(read_jsonl(f), system)
    for cap, plan in ((150, "time split"), (60, "k-fold")):
        c = cfg.replace(training={"max_examples": cap})
        data = build_dataset(store, G, c)
        assert data.stats["eval"] == plan and len(data.train) + len(data.heldout) == cap
        trained = {e.key for e in data.train}
        held = {e.key for e in heldout_of(file_examples, c)}
        assert held and not held & trained, plan
        if plan == "time split":
            assert held == {e.key for e in data.heldout}  # the very slice the gate used
        naive = {e.key for e in split_heldout(file_examples, c.training.heldout_fraction)[1]}
        assert naive & trained  # what eval scored before: pairs the adapter trained on
    store.close()
