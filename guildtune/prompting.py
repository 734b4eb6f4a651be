"""How a conversation becomes a chat prompt, shared by the bot (serving) and the trainer
(training examples), so that the model is trained on exactly the prompts it is served.

- ``system_prompt``: the guild's persona, else the configured default.
- ``merge_turns``: consecutive user turns become one.
- ``render_ids``: the chat through the model's template; typed template tokens stay text.
- ``fit_messages``: the one budget rule. Serving (``LocalEngine.prompt_ids``, budget
  ``serving_budget``: ``model.max_context_tokens - model.max_new_tokens``) and training
  (``trainer.fit.encode``, budget ``training.max_seq_len`` minus the target) both trim with it,
  through ``prompt_ids_within`` when they hold the tokenizer; ``estimate_chat`` is the same rule
  on a character estimate for callers without one (the bot's handlers, before the engine).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

log = logging.getLogger(__name__)

# Without a tokenizer a token is estimated as this many characters (BPE tokenizers give ~3-4 on
# chat text; 3 errs on the side of a shorter prompt, and the engine then trims exactly).
CHARS_PER_TOKEN = 3
# Re-cutting rounds before giving up on an exact fit: a cut text can re-tokenize a little
# longer in context (a split multi-byte character, a merge with the template's newline).
MAX_CUTS = 8


def system_prompt(persona: str | None, default: str) -> str:
    """The guild's persona when an admin set one (blank counts as unset, surrounding space is
    dropped), else the configured default. The bot serves and the trainer trains with it."""
    text = (persona or "").strip()
    return text or default


def merge_turns(turns: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """(role, text) turns with consecutive user turns joined by a newline.

    Several members talking in a row are one "user" turn to the model: many chat templates
    expect alternating roles.
    """
    out: list[tuple[str, str]] = []
    for role, text in turns:
        if out and role == "user" and out[-1][0] == "user":
            out[-1] = ("user", out[-1][1] + "\n" + text)
        else:
            out.append((role, text))
    return out


def special_strings(tokenizer: Any) -> list[str]:
    """The tokenizer's special-token strings, longest first."""
    return sorted({t for t in tokenizer.all_special_tokens if t}
                  | {str(t) for t in getattr(tokenizer, "added_tokens_encoder", {})},
                  key=len, reverse=True)


def _escape(content: str, specials: Sequence[str]) -> str:
    for s in specials:
        content = content.replace(s, s[:1] + "\u200b" + s[1:])
    return content


def render_ids(tokenizer: Any, messages: list[dict[str, str]], *,
               add_generation_prompt: bool = True,
               specials: Sequence[str] | None = None) -> list[int]:
    """Token ids of a chat rendered with the model's template, where only the template adds
    special tokens: ``<|im_start|>system`` typed by a member stays plain text and cannot open a
    new turn. Used for serving and for training, so both see the same ids."""
    specials = special_strings(tokenizer) if specials is None else specials
    if not any(s in m.get("content", "") for m in messages for s in specials):
        return list(tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=True,
            return_dict=False))
    # Render with placeholders, then tokenize the template's parts normally and each message's
    # content with split_special_tokens, so typed template tokens are not control tokens.
    marks = [f"\u2063GTMSG{i}\u2063" for i in range(len(messages))]
    templ = [{**m, "content": marks[i]} for i, m in enumerate(messages)]
    text = tokenizer.apply_chat_template(templ, add_generation_prompt=add_generation_prompt,
                                         tokenize=False)
    ids: list[int] = []
    pos = 0
    for i, m in enumerate(messages):
        at = text.find(marks[i], pos)
        if at < 0:  # the template transformed the content: fall back to escaping it
            return render_ids(tokenizer, [{**m, "content": _escape(m.get("content", ""), specials)}
                                          for m in messages],
                              add_generation_prompt=add_generation_prompt, specials=specials)
        ids += tokenizer(text[pos:at], add_special_tokens=False)["input_ids"]
        ids += tokenizer(m["content"], add_special_tokens=False,
                         split_special_tokens=True)["input_ids"]
        pos = at + len(marks[i])
    ids += tokenizer(text[pos:], add_special_tokens=False)["input_ids"]
    return ids


# -- the prompt budget ----------------------------------------------------------------------------


def serving_budget(max_context_tokens: int, max_new_tokens: int) -> int:
    """Tokens the prompt may take when serving: the context minus the room of the reply, and
    never under a quarter of the context (a request for a very long reply keeps some prompt)."""
    return max(max_context_tokens - max_new_tokens, max_context_tokens // 4)


class PromptMeter(Protocol):
    """How ``fit_messages`` measures a prompt and cuts a message, in the budget's unit."""

    def length(self, messages: Sequence[Mapping[str, str]]) -> int:
        """The length of the prompt the messages make (generation prompt included)."""

    def size(self, text: str) -> int:
        """The length of one message's text."""

    def tail(self, text: str, n: int) -> str:
        """The text without its first ``n`` units: its end."""

    def head(self, text: str, n: int) -> str:
        """The text's first ``n`` units: its start."""


class TemplateTokens:
    """Exact: the tokens of the chat rendered by ``render_ids`` with a generation prompt."""

    def __init__(self, tokenizer: Any, specials: Sequence[str] | None = None) -> None:
        self.tokenizer = tokenizer
        self.specials = special_strings(tokenizer) if specials is None else specials

    def render(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        return render_ids(self.tokenizer, [dict(m) for m in messages],
                          add_generation_prompt=True, specials=self.specials)

    def length(self, messages: Sequence[Mapping[str, str]]) -> int:
        return len(self.render(messages))

    def _ids(self, text: str) -> list[int]:
        # As render_ids tokenizes content: typed template tokens are text, not control tokens.
        return self.tokenizer(text, add_special_tokens=False,
                              split_special_tokens=True)["input_ids"]

    def size(self, text: str) -> int:
        return len(self._ids(text))

    # A cut inside a character's bytes decodes to U+FFFD: drop that piece of a character, so
    # the cut text is the original's own end (or start) whenever the tokenizer round-trips.
    def tail(self, text: str, n: int) -> str:
        cut = self.tokenizer.decode(self._ids(text)[n:])
        whole = cut.lstrip("\ufffd")
        return whole if text.endswith(whole) else cut

    def head(self, text: str, n: int) -> str:
        cut = self.tokenizer.decode(self._ids(text)[:n]) if n > 0 else ""
        whole = cut.rstrip("\ufffd")
        return whole if text.startswith(whole) else cut


class CharEstimate:
    """Estimated: characters of the messages' contents (the budget is then tokens times
    ``CHARS_PER_TOKEN``); the template's own tokens are not counted."""

    def length(self, messages: Sequence[Mapping[str, str]]) -> int:
        return sum(len(m.get("content", "")) for m in messages)

    def size(self, text: str) -> int:
        return len(text)

    def tail(self, text: str, n: int) -> str:
        return text[n:]

    def head(self, text: str, n: int) -> str:
        return text[:max(n, 0)]


def fit_messages(messages: Sequence[Mapping[str, str]], meter: PromptMeter,
                 budget: int) -> list[dict[str, str]]:
    """The messages (leading system messages, then turns, oldest first) that fit ``budget`` as
    ``meter`` measures it. The one rule, for serving and for training:

    1. The leading system messages always stay.
    2. The oldest turns go first, each one whole; the newest turn is never dropped.
    3. Still over: when the system prompt leaves room (for a unit of the newest turn at least),
       it stays whole and the newest (only) turn is cut from its start, so its end, what the
       member just said, stays. A system prompt that fills the budget on its own is cut at its
       end instead, to the room the newest turn leaves (all of it when the newest turn alone
       is over the budget, which is then cut too).

    Only the template's own tokens over the budget (a budget smaller than an empty chat) can
    leave the result over it; callers holding the ids cut them (``prompt_ids_within``).
    """
    msgs = [dict(m) for m in messages]
    n_sys = 0
    while n_sys < len(msgs) and msgs[n_sys].get("role") == "system":
        n_sys += 1
    system, turns = msgs[:n_sys], msgs[n_sys:]
    start = 0
    length = meter.length(msgs)
    while length > budget and start < len(turns) - 1:
        start += 1
        length = meter.length(system + turns[start:])
    if start:
        log.debug("prompt over %d: dropped the %d oldest turns", budget, start)
    out = system + turns[start:]
    for _ in range(MAX_CUTS):
        over = length - budget
        if over <= 0:
            break
        newest = meter.size(out[-1]["content"]) if turns else 0
        first = meter.size(out[0]["content"]) if system else 0
        if newest > over:  # the system prompt leaves room: cut the newest turn's start
            out[-1] = {**out[-1], "content": meter.tail(out[-1]["content"], over)}
        elif first:  # the system prompt fills the budget alone: cut its end
            out[0] = {**out[0], "content": meter.head(out[0]["content"], first - over)}
        elif newest:
            out[-1] = {**out[-1], "content": ""}
        else:
            break  # nothing left to cut: the template alone is over the budget
        length = meter.length(out)
    return out


def prompt_ids_within(tokenizer: Any, messages: Sequence[Mapping[str, str]], budget: int, *,
                      specials: Sequence[str] | None = None) -> list[int]:
    """Token ids of the chat with a generation prompt, trimmed to ``budget`` tokens by
    ``fit_messages``; the ids the engine serves and the prompt a training example is fitted
    on. A template longer than the budget by itself keeps its end (the generation prompt)."""
    meter = TemplateTokens(tokenizer, specials)
    return meter.render(fit_messages(messages, meter, budget))[-budget:] if budget > 0 else []


def estimate_chat(system: str, turns: Iterable[tuple[str, str]],
                  budget_tokens: int) -> list[dict[str, str]]:
    """Chat messages for the engine from a system prompt and (role, text) turns, oldest first:
    consecutive user turns merged (``merge_turns``), then trimmed by ``fit_messages`` to
    ``budget_tokens`` estimated at ``CHARS_PER_TOKEN`` characters a token. For callers without
    the tokenizer; the engine then trims the same way on exact tokens."""
    msgs = [{"role": "system", "content": system},
            *({"role": role, "content": text} for role, text in merge_turns(turns))]
    return fit_messages(msgs, CharEstimate(), budget_tokens * CHARS_PER_TOKEN)
