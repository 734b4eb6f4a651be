"""``create_engine``: the configured engine backend.

Both backends are imported only when chosen: the vLLM client loads only the tokenizer, the local
engine does not need aiohttp.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bot.engine.base import Engine
    from guildtune.config import LoraConfig, ModelConfig


def create_engine(model_cfg: ModelConfig, lora_cfg: LoraConfig, *,
                  cache_dir: Path | None = None, data_dir: Path | None = None) -> Engine:
    """The configured backend: a LocalEngine on the loaded model, or a VllmEngine client.

    ``cache_dir`` is the model cache (``Config.model_cache``; None: the default one);
    ``data_dir`` is the data dir the adapters come from, which names them on a vLLM server
    (None: ``cache_dir``, for callers that keep both in one directory, else the cwd).
    Loading a local model takes seconds: call this off the event loop (e.g. asyncio.to_thread).
    """
    if model_cfg.backend == "vllm":
        from bot.engine.vllm import VllmEngine, instance_id
        from guildtune.models import load_tokenizer, resolve_checkpoint

        # The bot renders prompts itself (the trainer's ids, the budget); only the tokenizer
        # is loaded here, and the base id adapters are checked against. Adapter names on the
        # server carry the data dir they come from.
        _, base_id = resolve_checkpoint(model_cfg.name, cache_dir)
        return VllmEngine(model_cfg, lora_cfg, load_tokenizer(model_cfg.name, cache_dir),
                          instance=instance_id(data_dir or cache_dir or Path.cwd()),
                          base_id=base_id)
    from bot.engine.local import LocalEngine
    from guildtune.models import load_model

    loaded = load_model(model_cfg.name, device=model_cfg.device, dtype=model_cfg.dtype,
                        cache_dir=cache_dir, threads=model_cfg.threads)
    return LocalEngine(loaded, model_cfg, lora_cfg)
