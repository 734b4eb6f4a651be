"""Training examples for one guild, built only from data of members who are still opted in.

An ``Example`` is a chat (system prompt, context turns, final assistant turn) whose final turn is
the target. Sources:

- ``liked``: a bot reply with a net positive rating; prompt = the stored context, target = reply.
- ``correction``: a member's better reply for an interaction; weighted ``correction_weight``.
- ``human``: when the guild has ``learn_from_humans`` on, a consented member's reply to another
  consented member's message (how the community itself answers).
- ``disliked``: a bot reply with a net negative rating; never a target, only the undesirable side
  of the optional preference term.

Whose example is it? The requester (liked/disliked bot replies), the correction's author, the
human reply's author - and every member who rated it, because a rating steers the model as much
as writing does. ``max_user_share`` caps each of them: one member liking hundreds of replies
cannot fill the dataset. A rating counts against the share only when the example depends on
it: a reply liked by its requester and by a fan who likes everything stays in (the fan's vote is
set aside), so a fan cannot shrink the dataset either. ``contributors`` is wider: everyone whose
text or rating is in an example, so that forgetting any of them taints the version.

What the share counts. The loss is a weighted mean over supervised tokens, so the share is
counted in what the loss sees: target tokens times the example's weight (``supervised_mass``).
Counting examples alone let one member with long messages hold 18% of the examples but 81% of
the supervised tokens, and corrections (``correction_weight``) weigh double per example. The
example count stays capped too (as before), except for a member who stays clearly under the
token share: many short messages are little signal. Both limits have the slack of one ordinary
example: ``max(1, floor(share * n))`` examples, and ``share`` of the tokens plus twice the median
example. So a small community can train at all, and four members who each hold a quarter need
not be equal to the token, while one essay or one heavy correction cannot take a dataset over.

Rings of accounts. A per-member cap alone does not stop ten fresh accounts that opt in and only
rate (or only suggest replies): each stays under the share while together they pick most of the
dataset. So members who have never talked to the bot in this guild (fewer than
``privacy.min_own_interactions`` logged exchanges of their own: "rating-only" accounts) also count, all
together, as one pseudo-member (``RATING_ONLY_GROUP``) under the same ``max_user_share``: any
example they rated or wrote a correction for counts against that shared slice too. Rating-only
members together therefore weigh as much as one member, however many accounts they are;
members who chat with the bot keep their own full share. The requester rating their own reply
adds no steerer and is never "rating-only". Limit: an account that chats once escapes the group
(each chat is rate limited, logged and itself capped); a consent-age rule would also need the
store to return when each rater opted in.

This module does not import torch; tokenization happens in ``trainer.fit``.

Over 400 lines on purpose: the example sources, scrubbing and the per-member share cap are
one rule about what a guild's model may learn from, read together.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from guildtune import prompting
from guildtune.community import ChatMessage, stable_hash
from guildtune.community import reply_pairs as file_reply_pairs
from guildtune.prompting import CHARS_PER_TOKEN, merge_turns

from .scrub import scrub

log = logging.getLogger(__name__)

# The fewest usable (desirable) examples a run trains from; below this it fails with
# pipeline.NotEnoughData and says how many more it needs. Small sets are judged by k-fold.
MIN_EXAMPLES = 10
RATING_ONLY_GROUP = -1  # the pseudo-member id of that slice (Discord ids are positive)
# Where a target came from (``Example.kind`` of the desirable examples), in the order reports
# list them: members' replies to each other (imported history, or chat logged with
# learn_from_humans on), bot replies members liked, and better replies members wrote.
SOURCES = ("human", "liked", "correction")


@dataclass(frozen=True)
class Example:
    """One training chat; ``messages[-1]`` is the assistant target."""

    messages: tuple[tuple[str, str], ...]  # (role, content); hashable for dedupe
    kind: str  # liked | correction | human | disliked
    owner: int | None  # whose example it is (requester, correction or reply author)
    raters: frozenset[int] = frozenset()
    authors: frozenset[int] = frozenset()  # everyone whose text appears (for forgetting)
    weight: float = 1.0
    created_utc: str = ""
    score: int = 0  # net rating (liked > 0, disliked < 0)
    newcomers: frozenset[int] = frozenset()  # steerers who never chatted with the bot here

    @property
    def rating_only(self) -> bool:
        """Steered by a member who never chatted with the bot in this guild."""
        return bool(self.newcomers)

    @property
    def cap_keys(self) -> set[int]:
        """What the share cap counts this example against: its steerers, plus the shared
        rating-only slice when a rating-only member steered it."""
        keys = self.steerers
        if self.newcomers:
            keys.add(RATING_ONLY_GROUP)
        return keys

    @property
    def key(self) -> str:
        """Content key without the system prompt: a persona change must not reshuffle the
        split, and the same (prompt, reply) found in a file maps to the same key."""
        body = [m for m in self.messages if m[0] != "system"]
        return json.dumps(body, ensure_ascii=False)

    @property
    def desirable(self) -> bool:
        return self.kind != "disliked"

    @property
    def steerers(self) -> set[int]:
        """Members whose share of the dataset this example counts against."""
        out = set(self.raters)
        if self.owner is not None:
            out.add(self.owner)
        return out

    def chat(self) -> list[dict[str, str]]:
        return [{"role": r, "content": c} for r, c in self.messages]


@dataclass
class Dataset:
    """A guild's examples after hygiene, caps and the split."""

    guild_id: int
    train: list[Example]
    heldout: list[Example]
    negatives: list[Example]  # disliked replies in the train split (preference term only)
    fingerprint: str
    contributors: dict[int, int]
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return len(self.train) + len(self.heldout) + len(self.negatives)


MIN_HELDOUT = 16  # fewer newest examples than this are too noisy a gate: k-fold instead
FOLDS = 5


def by_time(examples: Iterable[Example]) -> list[Example]:
    """Oldest first; examples of the same instant in a fixed order (a hash of their content),
    so the same dataset always splits the same way."""
    return sorted(examples, key=lambda e: (e.created_utc, stable_hash("split", e.key)))


def split_heldout(examples: Iterable[Example], fraction: float) -> tuple[list[Example],
                                                                         list[Example]]:
    """The time split: (train, held out), the newest ``fraction`` held out. A live community is
    trained on its past and talks to the adapter in its future; a random slice of the same
    weeks would let the gate reward memorising this month's topics."""
    ordered = by_time(examples)
    n_held = int(len(ordered) * fraction)
    return ordered[:len(ordered) - n_held], ordered[len(ordered) - n_held:]


def heldout_of(examples: Iterable[Example], cfg: Any) -> list[Example]:
    """The held-out slice a training run on ``examples`` would judge on: the newest
    ``training.max_examples`` (a run trains on no more), deduplicated, then their newest
    ``heldout_fraction`` (for a set judged by k-fold, which trains on all it uses: the pairs
    older than those). ``guildtune eval`` of a community file uses it, so an adapter trained on
    that file is never scored on pairs it trained on."""
    t = cfg.training
    newest = dedupe(sorted(examples, key=lambda e: e.created_utc, reverse=True))
    used = newest[:t.max_examples]
    if evaluation_plan(len(used), t.heldout_fraction) == "time split":
        return split_heldout(used, t.heldout_fraction)[1]
    return newest[t.max_examples:]  # the k-fold gate trains on all it uses: only the rest


def time_folds(examples: Iterable[Example], k: int = FOLDS) -> list[list[Example]]:
    """``k`` contiguous blocks of time (oldest first), for the k-fold gate of a small dataset:
    each block is judged by an adapter trained on all the others."""
    ordered = by_time(examples)
    k = max(1, min(k, len(ordered)))
    bounds = [round(i * len(ordered) / k) for i in range(k + 1)]
    return [ordered[bounds[i]:bounds[i + 1]] for i in range(k)]


def evaluation_plan(n_usable: int, fraction: float) -> str:
    """How a run with ``n_usable`` desirable examples is judged: "time split", "k-fold", or
    "too few" (below MIN_EXAMPLES)."""
    if n_usable < MIN_EXAMPLES:
        return "too few"
    return "time split" if int(n_usable * fraction) >= MIN_HELDOUT else "k-fold"


def system_prompt(store: Any, guild_id: int, default: str) -> str:
    """The guild's persona when an admin set one, else the configured system prompt: the rule
    the bot serves with (``guildtune.prompting.system_prompt``)."""
    return prompting.system_prompt(store.guild_settings(guild_id).persona, default)


def _clean(text: str | None) -> str:
    return scrub((text or "").replace("\x00", "")).strip()


def _context_turns(context: list[dict[str, Any]]) -> tuple[list[tuple[str, str]], set[int]]:
    turns: list[tuple[str, str]] = []
    authors: set[int] = set()
    for entry in context:
        text = _clean(entry.get("text"))
        if not text:
            continue
        role = "assistant" if entry.get("role") == "assistant" else "user"
        if entry.get("author_id") is not None and role == "user":
            authors.add(int(entry["author_id"]))
        turns.append((role, text))
    # Chat templates expect the last context turn to be the user's; a context that ends with the
    # bot has nothing the reply answers.
    while turns and turns[-1][0] != "user":
        turns.pop()
    return merge_turns(turns), authors


def examples_from_interactions(rows: Iterable[dict[str, Any]], system: str,
                               correction_weight: float,
                               min_own_interactions: int = 1) -> list[Example]:
    """Liked, corrected and disliked bot replies (rows of ``Store.rated_interactions``)."""
    rows = list(rows)
    # The rows are every logged exchange of still-consented members: who has chatted here.
    own = Counter(int(r["user_id"]) for r in rows)

    def newcomers(members: Iterable[int]) -> frozenset[int]:
        return frozenset(u for u in members if own[u] < min_own_interactions)

    out: list[Example] = []
    for row in rows:
        turns, authors = _context_turns(row.get("context") or [])
        if not turns:
            continue
        prompt = (("system", system), *turns)
        owner = int(row["user_id"])
        raters = frozenset(int(u) for u in row.get("raters") or [])
        base_authors = frozenset(authors | {owner} | set(raters))
        score = int(row.get("score") or 0)
        reply = _clean(row.get("reply"))
        new = newcomers(raters - {owner})
        if reply and score > 0:
            out.append(Example((*prompt, ("assistant", reply)), "liked", owner, raters,
                               base_authors, 1.0, row.get("created_utc") or "", score, new))
        elif reply and score < 0:
            out.append(Example((*prompt, ("assistant", reply)), "disliked", owner, raters,
                               base_authors, 1.0, row.get("created_utc") or "", score, new))
        for corr in row.get("corrections") or []:
            text = _clean(corr.get("text"))
            if text:
                author = int(corr["user_id"])
                out.append(Example((*prompt, ("assistant", text)), "correction", author,
                                   frozenset(), frozenset(authors | {owner, author}),
                                   correction_weight, corr.get("created_utc") or "", 0,
                                   newcomers([author])))
    return out


def examples_from_pairs(pairs: Iterable[dict[str, Any]], system: str) -> list[Example]:
    """Human (parent, reply) pairs, rows of ``Store.reply_pairs``."""
    out = []
    for p in pairs:
        parent, reply = _clean(p["parent_text"]), _clean(p["reply_text"])
        if parent and reply:
            out.append(Example((("system", system), ("user", parent), ("assistant", reply)),
                               "human", int(p["reply_user"]), frozenset(),
                               frozenset({int(p["reply_user"]), int(p["parent_user"])}), 1.0,
                               p.get("created_utc") or ""))
    return out


def examples_from_messages(messages: list[ChatMessage], system: str) -> list[Example]:
    """The reply pairs of a community file, exactly as ``import`` + training would see them."""
    return examples_from_pairs(
        ({"parent_text": p.text, "reply_text": r.text, "parent_user": p.user_id,
          "reply_user": r.user_id, "created_utc": r.time} for p, r in file_reply_pairs(messages)),
        system)


def dedupe(examples: Iterable[Example]) -> list[Example]:
    """Drop repeated (prompt, target) chats, keeping the first (the newest, given the order).
    A liked and a disliked copy of the same chat cancel out: both are dropped."""
    seen: dict[str, Example] = {}
    conflicted: set[str] = set()
    for ex in examples:
        k = ex.key
        prev = seen.get(k)
        if prev is None:
            seen[k] = ex
        elif prev.desirable != ex.desirable:
            conflicted.add(k)
    return [ex for k, ex in seen.items() if k not in conflicted]


def estimate_tokens(text: str) -> int:
    """A deterministic stand-in for the tokenizer's count of a target: one token per
    ``CHARS_PER_TOKEN`` characters, at least 1 (the end-of-turn token is always supervised)."""
    return max(1, -(-len(text) // CHARS_PER_TOKEN))


def supervised_mass(ex: Example, count_tokens: Callable[[str], int] = estimate_tokens,
                    max_len: int | None = None) -> float:
    """What the loss sees of ``ex``: its target's tokens (at most ``max_len``, what
    ``trainer.fit.encode`` keeps of a target at most) times its weight. The cross entropy is a
    weighted mean over supervised tokens, so this is the example's pull on the gradient.
    A disliked reply counts the same way for the preference term that scores it."""
    tokens = max(1, int(count_tokens(ex.messages[-1][1])))
    if max_len is not None:
        tokens = min(tokens, max_len)
    return tokens * ex.weight


def _counted(ex: Example, fits: Callable[[int], bool]) -> set[int] | None:
    """The keys ``ex`` counts against if it is selected now, or None when it cannot be.
    ``fits(key)`` says whether the key has room for ``ex`` under both limits.

    A rater at their limit is set aside rather than dropping the example when the example does
    not depend on them: its net rating keeps its sign even if every set-aside rating were
    removed. The example is then exactly what it would be without them, so it does not count
    against them. Without this, one member rating every reply would shrink the whole dataset to
    a single example (a denial of training by a fan or a ring).
    """
    keys = ex.cap_keys
    if all(fits(k) for k in keys):
        return keys
    drop = {u for u in ex.raters if u != ex.owner and not fits(u)}
    if not fits(RATING_ONLY_GROUP):
        drop |= ex.newcomers - {ex.owner}
    margin = (ex.score if ex.kind == "liked" else -ex.score) - len(drop)
    if not drop or margin <= 0 or ex.kind not in ("liked", "disliked"):
        return None
    rest = ex.steerers - drop
    if ex.newcomers - drop:
        rest.add(RATING_ONLY_GROUP)
    return rest if all(fits(k) for k in rest) else None


class _Tally:
    """Per cap key: the examples and the supervised mass counted against it, and the limits.

    A key may hold ``max_mass`` plus ``slack`` (one ordinary example) of mass. It may hold
    ``max_examples`` examples, or more while its mass stays ``slack`` under ``max_mass``: many
    short messages are little signal. (Without that exception about ``1 / share`` members, each
    at the share, would have to be equal both in examples and in tokens: only a handful of
    examples can be.)
    """

    def __init__(self, max_examples: int, max_mass: float, slack: float) -> None:
        self.max_examples, self.max_mass, self.slack = max_examples, max_mass, slack
        self.n: Counter[int] = Counter()
        self.mass: defaultdict[int, float] = defaultdict(float)

    def fits(self, key: int, mass: float) -> bool:
        after = self.mass.get(key, 0.0) + mass
        if self.n[key] < self.max_examples:
            return after <= self.max_mass + self.slack
        return after <= self.max_mass - self.slack

    def add(self, keys: set[int], mass: float) -> None:
        for k in keys:
            self.n[k] += 1
            self.mass[k] += mass

    def holds(self, share: float, n: int, total: float) -> bool:
        """Does the selection (``n`` examples, ``total`` mass) fit its own limits?"""
        max_n, max_m = max(1, math.floor(share * n)), share * total
        return all(m <= max_m + self.slack and (self.n[k] <= max_n or m <= max_m - self.slack)
                   for k, m in self.mass.items())


_SLOW_ROUNDS = 32  # after this many rounds the mass target shrinks by at least 10% a round


def _fixpoint(ordered: list[Example], weights: list[float], share: float, budget: int,
              slack: float) -> tuple[list[int], _Tally, float]:
    """Indices (into ``ordered``, newest first) of the largest greedy selection that fits its
    own limits, its tally and its total mass. The limits depend on the final selection, which
    depends on the limits: start from upper bounds and tighten until the selection fits."""
    n_target = min(budget, len(ordered))
    by_mass = sorted(weights)
    m_target = sum(by_mass[len(by_mass) - n_target:])  # no selection can weigh more
    rounds = 0
    while True:
        rounds += 1
        tally = _Tally(max(1, math.floor(share * n_target)), share * m_target, slack)
        chosen: list[int] = []
        total = 0.0
        for i, (ex, m) in enumerate(zip(ordered, weights)):
            if len(chosen) >= n_target:
                break
            who = _counted(ex, lambda k, m=m, t=tally: t.fits(k, m))
            if who is None:
                continue
            tally.add(who, m)
            chosen.append(i)
            total += m
        if not chosen or tally.holds(share, len(chosen), total):
            return chosen, tally, total
        # A broken limit means the selection is smaller than its target in that unit, so a
        # target strictly shrinks and this ends.
        n_target = min(n_target, len(chosen))
        m_target = min(m_target, total)
        if rounds > _SLOW_ROUNDS:  # a guard: bounded rounds, the limits hold either way
            m_target *= 0.9


def _select(examples: list[Example], share: float, budget: int,
            mass: Callable[[Example], float]) -> tuple[list[Example], _Tally, float]:
    """``cap_user_share`` with the tally and the total mass of the selection it returns."""
    ordered = sorted(examples, key=lambda e: e.created_utc, reverse=True)
    weights = [mass(e) for e in ordered]
    # The slack is one ordinary example: twice the median of the selection the example count
    # alone allows (one member cannot move that median by flooding: they hold <= share of it).
    base, _, _ = _fixpoint(ordered, [0.0] * len(ordered), share, budget, math.inf)
    base_mass = sorted(weights[i] for i in base)
    slack = 2 * base_mass[len(base_mass) // 2] if base_mass else 0.0
    chosen, tally, total = _fixpoint(ordered, weights, share, budget, slack)
    return [ordered[i] for i in chosen], tally, total


def cap_user_share(examples: list[Example], share: float, budget: int,
                   mass: Callable[[Example], float] = supervised_mass) -> list[Example]:
    """Newest-first selection of at most ``budget`` examples in which no member steers (owns or
    rated) more than ``share`` of the total ``mass`` (weighted supervised tokens) plus one
    ordinary example (twice the median example), nor more than ``max(1, floor(share * n))`` of
    the ``n`` selected examples unless their mass stays one ordinary example under the share;
    rating-only members count together as one (``Example.cap_keys``).

    ``mass=lambda e: 1.0`` gives exactly the example count alone (the cap before it counted
    tokens): the count limit is then the tighter one.
    """
    return _select(examples, share, budget, mass)[0]


def source_counts(examples: Iterable[Example]) -> dict[str, int]:
    """How many of ``examples`` came from each of ``SOURCES`` (every source listed, 0 too)."""
    kinds = Counter(e.kind for e in examples)
    return {k: kinds[k] for k in SOURCES}


def fingerprint(examples: Iterable[Example]) -> str:
    """A hash of the dataset's content (order-independent) and weights."""
    h = hashlib.sha256()
    for k in sorted(f"{e.kind}|{e.weight}|{e.key}|{e.messages[0][1]}" for e in examples):
        h.update(k.encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()[:16]


def build_dataset(store: Any, guild_id: int, cfg: Any, *,
                  count_tokens: Callable[[str], int] | None = None) -> Dataset:
    """Every training example of a guild from the store: consented data only, scrubbed,
    deduplicated, capped per member, newest first within ``training.max_examples``, split.

    ``count_tokens`` counts a target's tokens for the share cap; without it the count is
    ``estimate_tokens`` (a caller holding the tokenizer can pass the exact count).
    """
    t = cfg.training
    system = system_prompt(store, guild_id, cfg.model.system_prompt)
    raw = examples_from_interactions(store.rated_interactions(guild_id), system,
                                     t.correction_weight, cfg.privacy.min_own_interactions)
    if store.guild_settings(guild_id).learn_from_humans:
        raw += examples_from_pairs(store.reply_pairs(guild_id), system)
    raw.sort(key=lambda e: e.created_utc, reverse=True)
    unique = dedupe(raw)
    count = count_tokens or estimate_tokens
    kept, tally, mass = _select(unique, cfg.privacy.max_user_share, t.max_examples,
                                lambda e: supervised_mass(e, count, t.max_seq_len))
    # Disliked replies are never scored as targets; the preference term uses those older
    # than the held-out slice.
    wanted = [ex for ex in kept if ex.desirable]
    plan = evaluation_plan(len(wanted), t.heldout_fraction)
    if plan == "time split":
        train, heldout = split_heldout(wanted, t.heldout_fraction)
        cutoff = (heldout[0].created_utc, stable_hash("split", heldout[0].key))
        negatives = [ex for ex in by_time(kept) if not ex.desirable
                     and (ex.created_utc, stable_hash("split", ex.key)) < cutoff]
    else:  # k-fold (or too few): every desirable example trains; the folds judge
        train, heldout = by_time(wanted), []
        negatives = [ex for ex in by_time(kept) if not ex.desirable]
    contributors: Counter[int] = Counter()
    for ex in (*train, *heldout, *negatives):
        contributors.update(ex.authors | ex.steerers)
    by_kind = Counter(e.kind for e in kept)
    stats = {"raw": len(raw), "unique": len(unique), "kept": len(kept),
             "capped_out": len(unique) - len(kept),
             "rating_only": sum(e.rating_only for e in kept),
             **{f"n_{k}": v for k, v in by_kind.items()},
             "n_train": len(train), "n_heldout": len(heldout), "n_negatives": len(negatives),
             "eval": plan,
             # Where the examples a run uses came from: the fit's (train) and the gate's
             # (held out; with k-fold, every example is in train and judged by the folds).
             "sources": {"train": source_counts(train), "heldout": source_counts(heldout)},
             # Weighted supervised tokens (estimated unless a tokenizer counted them) and the
             # largest share of them one member (or the rating-only slice) steers.
             "supervised_mass": round(mass, 1), "tokens_estimated": count_tokens is None,
             "max_member_mass_share": round(max(tally.mass.values(), default=0.0) / mass, 3)
             if mass else 0.0}
    log.info("guild %s dataset: %s", guild_id, stats)
    return Dataset(guild_id, train, heldout, negatives,
                   fingerprint([*train, *heldout, *negatives]), dict(contributors), stats)
