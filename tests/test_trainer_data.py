"""Dataset hygiene: the scrubber, the per-member cap, dedupe, the split, consent and targets."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from guildtune.config import Config
from storage import Store, open_store
from storage.times import utc_now
from tests.fakes import TINY, make_config
from trainer.data import (
    Example,
    build_dataset,
    cap_user_share,
    examples_from_messages,
    split_heldout,
)
from trainer.scrub import scrub

os.environ.setdefault("OMP_NUM_THREADS", "1")

G = 7


@pytest.fixture
def cfg(tmp_path: Path) -> Config:
    return make_config(tmp_path, TINY, training={"enabled": True, "correction_weight": 3.0},
                       privacy={"max_user_share": 0.25})


@pytest.fixture
def store(cfg: Config) -> Store:
    s = open_store(cfg.db_path)
    yield s
    s.close()


_mid = iter(range(10_000, 10**9))


def interaction(store: Store, user: int, text: str, reply: str, *, raters: dict[int, int],
                corrections: dict[int, str] | None = None) -> str:
    """A logged exchange of ``user`` with the bot, rated by ``raters`` (user -> +1/-1)."""
    for u in {user, *raters, *(corrections or {})}:
        store.grant_consent(G, u)
    rid = next(_mid)
    res = store.log_interaction(G, 1, user, reply=reply, reply_message_id=rid, context=[
        {"role": "user", "author_id": user, "message_id": next(_mid), "text": text,
         "created_utc": utc_now()}])
    assert res.stored
    for u, rating in raters.items():
        assert store.record_feedback(G, rid, u, rating)
    for u, t in (corrections or {}).items():
        assert store.add_correction(G, res.interaction_id, u, t)
    return res.interaction_id


SECRETS = {
    "email": "write to jane.doe+bot@example.co.uk",
    "obfuscated email": "jane [at] example [dot] org",
    "phone": "call me at +1 (415) 555-0132",
    "bare phone": "my number is 4155550132",
    "intl phone": "ring +44 20 7946 0958 tonight",
    "discord token": "MTA5ODc2NTQzMjEwOTg3NjU0.GhIjKl.abcdefghijklmnopqrstuvwxyz0123456",
    "openai key": "use sk-proj-AbCdEfGhIjKlMnOpQrStUv0123456789",
    "stripe key": "sk_live_51HxYzAbCdEfGhIjKlMn",
    "github token": "ghp_abcdefghijklmnopqrstuvwxyz0123456789",
    "aws key": "AKIAIOSFODNN7EXAMPLE",
    "slack token": "xoxb-123456789012-abcdefghijkl",
    "jwt": "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9",
    "key in url": "see https://api.example.com/v1/items?user=bob&api_key=abc123def456ghi&x=1",
    "token in url": "https://x.example/cb?code=Zx81Kq0ppL&access_token=ya29.a0AfH6SM",
    "password in url": "clone https://bob:hunter2hunter2@git.example.com/repo.git",
    "assigned secret": 'export API_KEY="abcd1234efgh5678"',
    "password": "password: hunter2!x9",
    "private key": "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA\n-----END RSA PRIVATE KEY-----",
}
LEAKS = ["jane", "0132", "4155550132", "7946", "MTA5", "AbCdEfGh", "51HxYz", "ghp_", "AKIA",
         "xoxb", "eyJ", "abc123def456", "Zx81", "ya29", "hunter2", "abcd1234", "MIIE"]


@pytest.mark.parametrize("name", list(SECRETS))
def test_scrubber_removes_secrets_and_contact_data(name: str) -> None:
    out = scrub(SECRETS[name])
    assert not any(leak in out for leak in LEAKS), (name, out)
    assert "[" in out


@pytest.mark.parametrize("text", [
    "released 2018-05-29, rust 1.26.0 at 10.0.0.1 port 8080",
    "issue #12345 and user 6426483 said 2 + 2 = 4",
    "it took 3.5 s and costs $100; see https://doc.rust-lang.org/std/?search=vec",
    "the token type in the lexer is a struct",
])
def test_scrubber_keeps_ordinary_chat(text: str) -> None:
    assert scrub(text) == text


def test_scrubbed_text_reaches_neither_prompt_nor_target(store: Store, cfg: Config) -> None:
    interaction(store, 1, "my mail is a.b@example.com, key ghp_abcdefghijklmnopqrstuvwxyz012345",
                "thanks, I'll DM +1 415 555 0132", raters={2: 1})
    [ex] = build_dataset(store, G, cfg.replace(training={"heldout_fraction": 0.01})).train
    flat = " ".join(c for _, c in ex.messages)
    assert "example.com" not in flat and "ghp_" not in flat and "0132" not in flat
    assert "[email]" in flat and "[token]" in flat and "[phone]" in flat


def test_one_member_liking_hundreds_of_replies_cannot_exceed_the_share(
        store: Store, cfg: Config) -> None:
    fan = 99
    for i in range(200):  # the fan likes 200 replies to 20 different requesters
        interaction(store, 100 + i % 20, f"question {i}", f"answer {i}", raters={fan: 1})
    for i in range(40):  # 40 replies liked by their requesters (members who chat, so their
        # ratings are their own; one-off raters who never chat share one slice: test_hostile)
        interaction(store, 300 + i, f"other question {i}", f"other answer {i}",
                    raters={300 + i: 1})
    data = build_dataset(store, G, cfg)
    kept = [*data.train, *data.heldout]
    assert len(kept) > 40
    mine = sum(1 for e in kept if fan in e.steerers)
    assert mine <= 0.25 * len(kept), (mine, len(kept))
    # and nobody else exceeds it either
    for u in data.contributors:
        assert sum(1 for e in kept if u in e.steerers) <= max(1, 0.25 * len(kept))


def test_cap_counts_correction_authors_and_shrinks_to_a_consistent_size() -> None:
    def ex(i: int, owner: int) -> Example:
        return Example((("system", "s"), ("user", f"q{i}"), ("assistant", f"a{i}")),
                       "correction", owner, created_utc=f"2024-01-01T00:{i:02d}")
    # One author wrote 30 corrections, three others wrote one each: the share can only hold
    # max(1, floor(0.25 * n)) of the prolific author's, for the final n.
    pool = [ex(i, 1) for i in range(30)] + [ex(50 + i, 2 + i) for i in range(3)]
    chosen = cap_user_share(pool, 0.25, 1000)
    n_one = sum(1 for e in chosen if e.owner == 1)
    assert n_one <= max(1, int(0.25 * len(chosen)))
    assert {2, 3, 4} <= {e.owner for e in chosen}
    # newest first within the budget
    assert [e.created_utc for e in cap_user_share(pool, 1.0, 5)] == sorted(
        (e.created_utc for e in pool), reverse=True)[:5]


def test_targets_weights_negatives_and_consent(store: Store, cfg: Config) -> None:
    interaction(store, 1, "q liked", "liked reply", raters={2: 1, 3: 1})
    interaction(store, 1, "q disliked", "bad reply", raters={2: -1},
                corrections={3: "a better reply"})
    interaction(store, 1, "q tie", "meh reply", raters={2: 1, 3: -1})
    interaction(store, 1, "q dup", "liked reply", raters={4: 1})
    interaction(store, 1, "q dup", "liked reply", raters={4: 1})  # duplicate chat
    interaction(store, 5, "q revoked", "revoked reply", raters={2: 1})
    store.revoke_consent(G, 5)
    # share 1.0: member 1 asked everything; the cap has its own tests
    data = build_dataset(store, G, cfg.replace(training={"heldout_fraction": 0.01},
                                               privacy={"max_user_share": 1.0}))
    assert data.stats["n_liked"] == 2  # "q liked" and one "q dup"
    targets = {e.messages[-1][1]: e for e in data.train + data.heldout}
    assert set(targets) == {"liked reply", "a better reply"}  # dup dropped, tie and revoked out
    assert targets["a better reply"].weight == 3.0 and targets["a better reply"].owner == 3
    assert [e.messages[-1][1] for e in data.negatives] == ["bad reply"]
    assert 5 not in data.contributors


def test_split_is_deterministic_and_shared_with_file_eval(tmp_path: Path) -> None:
    f = tmp_path / "c.jsonl"
    f.write_text("\n".join(
        f'{{"part": 0, "seq": {i}, "author_id": {i % 7 + 1}, "text": "msg {i}", '
        f'"reply_to": [{i - 1}]}}' if i else '{"part": 0, "seq": 0, "author_id": 9, '
        '"text": "hello", "reply_to": []}' for i in range(400)))
    from guildtune.community import read_jsonl
    a = examples_from_messages(read_jsonl(f), "persona A")
    b = examples_from_messages(read_jsonl(f), "persona B")
    held_a = [e.key for e in split_heldout(a, 0.15)[1]]
    held_b = [e.key for e in split_heldout(b, 0.15)[1]]
    assert held_a == held_b  # a persona change does not reshuffle the split
    assert len(held_a) == int(0.15 * len(a))


def test_encode_labels_only_the_final_assistant_turn() -> None:
    from guildtune.models import build_tiny_tokenizer
    from trainer.fit import IGNORE, encode

    tok = build_tiny_tokenizer()
    ex = Example((("system", "be brief"), ("user", "hi"), ("assistant", "old bot turn"),
                  ("user", "and now?"), ("assistant", "the target")), "liked", 1)
    enc = encode(tok, ex, 256)
    labelled = [t for t, lab in zip(enc.ids, enc.labels) if lab != IGNORE]
    assert tok.decode(labelled) == "the target<|im_end|>"
    short = encode(tok, ex, 16)
    assert len(short.ids) == 16 and short.labels[-1] != IGNORE


def _pref_ex(i: int, kind: str) -> Example:
    return Example((("system", "s"), ("user", f"question {i}"),
                    ("assistant", f"{'good' if kind == 'liked' else 'bad'} answer {i}")), kind, i)


LIKED = [_pref_ex(i, "liked") for i in range(8)]
DISLIKED = [_pref_ex(i, "disliked") for i in range(4)]


def _fit_tiny(tmp_path: Path, *, preference_loss: bool, negatives: list[Example]
              ) -> tuple[dict[str, Any], float, Any]:
    """A fresh tiny model fitted for a few steps (fixed seed, no dropout, one thread): the
    adapter's weights, the summed log-likelihood of the disliked replies under it, the model."""
    import torch

    from guildtune.models import load_model
    from trainer.fit import collate, encode_all, fit, token_nll

    torch.set_num_threads(1)
    cfg = make_config(tmp_path, TINY, lora={"rank": 4, "alpha": 8, "dropout": 0.0},
                      training={"enabled": True, "max_steps": 4, "epochs": 3.0,
                                "batch_size": 4, "seed": 3, "preference_loss": preference_loss,
                                "preference_weight": 1.0})
    lm = load_model("tiny")  # fit wraps the model in place: a fresh one for every fit
    res = fit(lm.model, lm.tokenizer, LIKED, cfg, negatives=negatives)
    assert res.steps == 4 and all(torch.isfinite(torch.tensor(res.losses)))
    weights = {n: p.detach().clone() for n, p in res.model.named_parameters() if "lora_" in n}
    ids, att, labels, _ = collate(encode_all(lm.tokenizer, DISLIKED, 64),
                                  lm.tokenizer.pad_token_id, torch.device("cpu"))
    with torch.no_grad():
        nll, _ = token_nll(res.model, ids, att, labels)
    return weights, -float(nll.sum()), res.model


def test_preference_term_uses_disliked_replies(tmp_path: Path) -> None:
    """With training.preference_loss, the disliked replies passed to fit change the adapter and
    make those replies less likely; without it they change nothing."""
    import torch

    from guildtune.models import build_tiny_tokenizer
    from trainer.fit import collate, encode_all, kto_loss

    def max_change(a: dict[str, Any], b: dict[str, Any]) -> float:
        assert a.keys() == b.keys()
        return max(float((a[k] - b[k]).abs().max()) for k in a)

    w_neg, lp_neg, model = _fit_tiny(tmp_path, preference_loss=True, negatives=DISLIKED)
    w_none, lp_none, _ = _fit_tiny(tmp_path, preference_loss=True, negatives=[])
    assert max_change(w_neg, w_none) > 0, "fit ignored the disliked replies"
    assert lp_neg < lp_none - 0.05, (lp_neg, lp_none)  # pushed down, not merely changed

    w_off_neg, lp_off_neg, _ = _fit_tiny(tmp_path, preference_loss=False, negatives=DISLIKED)
    w_off_none, lp_off_none, _ = _fit_tiny(tmp_path, preference_loss=False, negatives=[])
    assert max_change(w_off_neg, w_off_none) == 0 and lp_off_neg == lp_off_none, \
        "disliked replies changed the fit although training.preference_loss is false"

    # The term itself: a value in (0, 1) whose gradient reaches the adapter's weights.
    tok = build_tiny_tokenizer()
    batch = collate(encode_all(tok, [LIKED[0], DISLIKED[1]], 64), tok.pad_token_id,
                    torch.device("cpu"))
    value = kto_loss(model, batch, torch.tensor([True, False]), beta=0.1)
    assert 0 < float(value) < 1
    value.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0
               for n, p in model.named_parameters() if "lora_" in n)
