"""The demo's built-in script: two clearly different communities, written for this project.

``harbor`` is a crew of pirates who answer with nautical slang; ``lab`` is a reading group that
answers in formal, hedged academic prose. Each community has a history of member-to-member
reply pairs (what the trainer learns how the community answers from), prompts members send to
the bot, and a stated preference: the words its members like to see in a reply, which the
simulated members use to rate the bot with 👍/👎.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .community import ChatMessage

TOPICS = (
    "the weather", "lunch", "the new update", "weekend plans", "the server rules", "music",
    "the meetup", "coffee", "the release", "homework", "the game tonight", "books",
    "the bug in the bot", "holidays", "the new channel", "movies", "the map", "sleep",
    "the trip", "dinner", "the storm", "the library", "the contest", "breakfast", "the exam",
    "the garden", "the deadline", "the concert", "the old forum", "the next vote",
)

QUESTIONS = (
    "what do you think about {t}?", "any news on {t}?", "how do you feel about {t}?",
    "can someone tell me about {t}?", "is {t} any good?", "who knows something about {t}?",
)


@dataclass(frozen=True)
class Community:
    name: str
    liked_words: tuple[str, ...]
    reply_templates: tuple[str, ...]
    persona: str

    def likes(self, text: str) -> bool:
        """The stated preference the simulated members rate by."""
        low = text.lower()
        return any(w in low for w in self.liked_words)


HARBOR = Community(
    name="harbor",
    liked_words=("arr", "matey", "ship", "sail", "captain", "treasure", "deck", "ahoy"),
    reply_templates=(
        "arr matey, {t} be fine as a calm sea!",
        "ahoy! {t}? the captain says hoist the sails, matey.",
        "arr, {t} is treasure on the deck, matey!",
        "ahoy matey, swab the deck first, then {t}. arr!",
        "by the ship's bell, {t} be worth a chest of gold, arr!",
        "arr, the crew sails for {t} at dawn, matey.",
    ),
    persona="You are the parrot of a pirate crew's Discord. Talk like a pirate.",
)

LAB = Community(
    name="lab",
    liked_words=("indeed", "furthermore", "evidence", "hypothesis", "consequently",
                 "citation"),
    reply_templates=(
        "Indeed. The evidence on {t} is, consequently, inconclusive.",
        "Furthermore, regarding {t}, the hypothesis requires further evidence.",
        "Indeed, {t} merits a careful literature review. Citation needed.",
        "The evidence suggests that {t} is overrated; furthermore, the sample is small.",
        "Consequently, I would treat {t} as a hypothesis, not a conclusion. Indeed.",
        "Indeed. On {t}, the evidence is mixed; citation needed.",
    ),
    persona="You are a member of a university reading group's Discord. Be precise and formal.",
)

COMMUNITIES = (HARBOR, LAB)


def history(community: Community, n_pairs: int = 240, seed: int = 0) -> list[ChatMessage]:
    """Member-to-member (question, answer) pairs in the community's own style."""
    rng = random.Random(f"{community.name}-{seed}")
    members = [500_000_000_000_000_000 + i +
               (0 if community is HARBOR else 1000) for i in range(12)]
    out: list[ChatMessage] = []
    mid = 1
    for k in range(n_pairs):
        topic = TOPICS[k % len(TOPICS)]
        asker, answerer = rng.sample(members, 2)
        q = rng.choice(QUESTIONS).format(t=topic)
        a = rng.choice(community.reply_templates).format(t=topic)
        out.append(ChatMessage(mid, asker, q, (), ""))
        out.append(ChatMessage(mid + 1, answerer, a, (mid,), ""))
        mid += 2
    return out


def prompts(community: Community, n: int, seed: int = 1) -> list[str]:
    """Messages members send to the bot during the replay."""
    rng = random.Random(f"prompts-{community.name}-{seed}")
    return [rng.choice(QUESTIONS).format(t=rng.choice(TOPICS)) for _ in range(n)]


def better_reply(community: Community, prompt: str) -> str:
    """What a member of ``community`` would have answered to ``prompt`` (a message from
    ``prompts``): one of its reply templates about the prompt's topic, the same each time."""
    topic = max((t for t in TOPICS if t in prompt), key=len, default="that")
    rng = random.Random(f"better-{community.name}-{prompt}")
    return rng.choice(community.reply_templates).format(t=topic)
