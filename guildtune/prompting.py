"""How a conversation becomes a chat prompt: one function shared by the bot (serving) and the
trainer (training examples), so that the model is trained on exactly the prompts it is served."""

from __future__ import annotations

from collections.abc import Iterable


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
