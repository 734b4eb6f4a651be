"""The model engine: one base model, a LoRA adapter per guild, hot swap, mixed-adapter batching.

- ``base``: the ``Engine`` interface the Cog and the console code against, its request/result
  types and errors;
- ``local``: ``LocalEngine``, the model in this process (a model thread); ``steploop``: its
  continuous batching; ``peft_adapters``: its peft side (load, prepared hot swap, delete);
  ``handoff``: what the event loop and the model thread hand each other;
- ``slots``: ``AdapterSlots``, which adapter version each guild serves and which are loaded
  (LRU, load, hot swap, rebuild on failure), testable without a model;
- ``vllm``: ``VllmEngine``, a client of a vLLM server;
- ``factory``: ``create_engine``, the configured one of the two.

Adapter directories are checked by ``guildtune.adapter_dir.validate_adapter_dir`` (re-exported
here). Importing this package is cheap: no torch, peft or aiohttp until an engine is made.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bot.engine.base import (
    BASE_ADAPTER,
    FALLBACK_TEXT,
    AdapterError,
    Engine,
    EngineError,
    GenerationRequest,
    GenerationResult,
    OnText,
    adapter_name,
)
from bot.engine.factory import create_engine
from bot.engine.local import LocalEngine
from guildtune.adapter_dir import validate_adapter_dir

if TYPE_CHECKING:
    from bot.engine.vllm import VllmEngine

__all__ = ["BASE_ADAPTER", "FALLBACK_TEXT", "AdapterError", "Engine", "EngineError",
           "GenerationRequest", "GenerationResult", "LocalEngine", "OnText", "VllmEngine",
           "adapter_name",
           "create_engine", "validate_adapter_dir"]


def __getattr__(name: str) -> Any:
    # VllmEngine on first use only: its module imports aiohttp, which a local setup never needs.
    if name == "VllmEngine":
        from bot.engine.vllm import VllmEngine

        return VllmEngine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
