"""Test helper: real peft adapter directories on the tiny model, as the trainer would publish them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from guildtune import adapter_dir
from guildtune.config import LoraConfig
from guildtune.models import TINY_BASE_ID

# Small rank keeps adapter creation fast; the engine only needs the shape to match config.
TINY_LORA = LoraConfig(rank=4, alpha=8, dropout=0.0)


def write_meta(path: Path, *, guild_id: int, version: int, base_model: str = TINY_BASE_ID,
               lora: dict[str, Any] | None = None) -> None:
    """Write the publisher's guildtune.json next to an adapter (the fields the engines check)."""
    adapter_dir.write_meta(path, adapter_dir.adapter_meta(
        guild_id=guild_id, version=version, base_model=base_model,
        lora=lora if lora is not None else TINY_LORA.shape()))


class AdapterFactory:
    """Saves seeded random LoRA adapters for the tiny model; one peft model reused for speed."""

    def __init__(self, root: Path, lora: LoraConfig = TINY_LORA) -> None:
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model

        from guildtune.models import build_tiny_model

        self.root = root
        self.lora = lora
        base, _ = build_tiny_model()
        cfg = PeftLoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=0.0,
                             target_modules=list(lora.target_modules))
        self.model = get_peft_model(base, cfg)

    def make(self, guild_id: int, version: int, seed: int | None = None,
             name: str | None = None) -> Path:
        """A complete adapter version dir whose weights depend on ``seed`` (default: version)."""
        import torch

        gen = torch.Generator().manual_seed(seed if seed is not None else version * 1000 + guild_id)
        with torch.no_grad():
            for n, p in self.model.named_parameters():
                if "lora_B" in n or "lora_A" in n:
                    # lora_B is zero at init: perturb it so the adapter changes the output.
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        path = self.root / (name or f"{guild_id}/{version}")
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path)
        write_meta(path, guild_id=guild_id, version=version, lora=self.lora.shape())
        return path
