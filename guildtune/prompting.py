"""How a conversation becomes a chat prompt: one function shared by the bot (serving) and the
trainer (training examples), so that the model is trained on exactly the prompts it is served."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any


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
