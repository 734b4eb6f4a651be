"""The engine interface and its types: what the Cog, the console and the watcher code against.

``Engine`` is implemented by ``LocalEngine`` (bot/engine/local.py: the model in this process) and
``VllmEngine`` (bot/engine/vllm.py: a client of a vLLM server); both import this module and never
each other. ``AdapterError`` is the adapter-directory contract's error (guildtune/adapter_dir.py),
re-exported here because every engine raises it.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from guildtune.adapter_dir import AdapterError

if TYPE_CHECKING:
    from guildtune.config import ModelConfig

__all__ = ["BASE_ADAPTER", "FALLBACK_TEXT", "AdapterError", "Engine", "EngineError",
           "GenerationRequest", "GenerationResult", "OnText", "adapter_name"]

BASE_ADAPTER = "__base__"  # peft's name for "no adapter" in a mixed batch
FALLBACK_TEXT = "(no reply)"


@dataclass(frozen=True)
class GenerationRequest:
    """One reply to generate. ``None`` settings take the config defaults; temperature 0 = greedy."""

    guild_id: int | None  # None = DM / base model
    messages: list[dict[str, str]]  # system (persona) + context turns: system/user/assistant
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None

    def settings(self, cfg: ModelConfig) -> tuple[int, float, float, float]:
        """(max_new_tokens, temperature, top_p, repetition_penalty): the request's own where
        it sets them, else the config's; every engine reads them here."""
        return (self.max_new_tokens if self.max_new_tokens is not None else cfg.max_new_tokens,
                self.temperature if self.temperature is not None else cfg.temperature,
                self.top_p if self.top_p is not None else cfg.top_p,
                self.repetition_penalty if self.repetition_penalty is not None
                else cfg.repetition_penalty)


@dataclass(frozen=True)
class GenerationResult:
    text: str
    adapter_version: int | None  # the version that produced it; None = base model
    tokens_in: int
    tokens_out: int
    latency_ms: float
    # Stopped at max_new_tokens rather than at its end of sequence: the text may end mid-sentence.
    cut: bool = False


# Which tokens a repetition penalty lowers (``penalized_tokens``): "reply" (the default), the
# reply's own tokens only; "turns", the prompt's and the reply's but the end-of-turn and padding
# tokens; "hf", every token of prompt and reply, as HF's RepetitionPenaltyLogitsProcessor (and
# vLLM's repetition_penalty) do. "turns" and "hf" are kept for bench/style.py.
PENALTY_SCOPES = ("reply", "turns", "hf")


def penalized_tokens(prompt: Sequence[int], reply: Sequence[int], spare: Collection[int],
                     scope: str = "reply") -> list[int]:
    """The tokens a repetition penalty lowers. A chat prompt holds one end-of-turn token per
    turn, and the member's own words: HF's rule ("hf") lowers both, so with a penalty of 1.15
    SmolLM2's tuned replies ran 2-3x as long as the community's own and looped more often, and
    sparing only the end of turn ("turns") cut them to a word or two and made the adapters' voice
    no more recognisable than the base model's (bench/style.py). A loop is the reply repeating
    itself, so the default penalizes the reply's own tokens only. Both local decoding paths (the
    step loop and HF generate) use this."""
    if scope == "reply":
        return sorted(set(reply))
    if scope == "turns":
        return sorted(set(prompt).union(reply).difference(spare))
    if scope == "hf":
        return sorted(set(prompt).union(reply))
    raise ValueError(f"penalty scope {scope!r} is not one of {', '.join(PENALTY_SCOPES)}")


def stopped_by_length(out: Sequence[int], max_new: int, eos: Collection[int]) -> bool:
    """Whether a reply of tokens ``out`` was cut at ``max_new`` rather than ended by its model
    (``GenerationResult.cut``): both local decoding paths decide it here."""
    return len(out) >= max_new and bool(out) and out[-1] not in eos


# Streaming: called on the event loop with the whole reply text so far (not a delta), each time
# it grew; never with the final text (that is ``GenerationResult.text``, which may differ: it is
# stripped and never empty). Must not block; exceptions it raises are logged and ignored.
OnText = Callable[[str], None]


class EngineError(RuntimeError):
    """Generation failed or the engine is not running; the message is one line."""


def adapter_name(guild_id: int) -> str:
    """The peft adapter name of a guild's slot."""
    return f"g{guild_id}"


class Engine(abc.ABC):
    """Generates replies with a per-guild adapter on one base model."""

    @abc.abstractmethod
    async def start(self) -> None:
        """Start serving (threads, sessions). Call once before ``generate``."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop serving; pending requests fail with EngineError; nothing is left running."""

    @abc.abstractmethod
    async def generate(self, req: GenerationRequest, on_text: OnText | None = None
                       ) -> GenerationResult:
        """Generate one reply with the guild's active adapter (base model when none).

        With ``on_text``, the text generated so far is passed to it as it grows (streaming);
        the result is the same as without it.
        """

    @abc.abstractmethod
    async def activate(self, guild_id: int, version: int, path: str | Path) -> None:
        """Serve ``version`` (adapter dir ``path``) for the guild from now on.

        Raises AdapterError when the adapter is missing, corrupt or does not fit; the guild then
        keeps serving its previous version.
        """

    @abc.abstractmethod
    async def deactivate(self, guild_id: int) -> None:
        """The guild falls back to the base model."""

    async def release_others(self, keep: Collection[int]) -> None:
        """Free what the engine holds for guilds that are neither in ``keep`` (the guilds with
        an active version) nor served now, such as adapters an earlier run left on a vLLM
        server. Called by the watcher after each sync; nothing to free by default."""

    @abc.abstractmethod
    def active_versions(self) -> dict[int, int]:
        """Guild id -> adapter version it is served with (resident or not)."""
