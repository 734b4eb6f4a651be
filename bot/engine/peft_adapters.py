"""The peft side of a local engine's adapter slots: LoRA adapters in one PeftModel around the
base model (``PeftAdapters``, the ``AdapterBackend`` of ``AdapterSlots``), and hot-swap weights
read and mapped off the model thread (``PreparedAdapter``). Model thread only, except
``PeftAdapters.prepare``, which runs in the thread that validates a new version.
"""

from __future__ import annotations

import json
import logging
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from guildtune.adapter_dir import ADAPTER_CONFIG, ADAPTER_WEIGHTS

if TYPE_CHECKING:
    from guildtune.models import LoadedModel

log = logging.getLogger(__name__)


class PeftAdapters:
    """The model side of the adapter slots: LoRA adapters in one PeftModel around the base.

    The PeftModel is created at the first load and kept (empty) after the last delete, so a
    later load adds to it. Model thread only.
    """

    def __init__(self, loaded: LoadedModel) -> None:
        self._loaded = loaded
        self.model: Any = None  # PeftModel, created at the first adapter load
        # peft upcasts bf16/fp16 adapters to fp32 by default (exact, slower); False keeps them
        # in the model's dtype.
        self.autocast = True
        self._layers: dict[str, list[tuple[str, Any]]] = {}  # name -> its LoRA layers

    def load(self, name: str, path: Path) -> None:
        """Load the adapter at ``path`` as ``name``; a failed load leaves no ``name`` behind."""
        from peft import PeftModel

        self._layers.pop(name, None)
        try:
            if self.model is None:
                # First adapter: wrap the base model once; later adapters are added to it.
                self.model = PeftModel.from_pretrained(
                    self._loaded.model, str(path), adapter_name=name, is_trainable=False,
                    autocast_adapter_dtype=self.autocast)
                self.model.eval()
            else:
                self.model.load_adapter(str(path), adapter_name=name, is_trainable=False,
                                        autocast_adapter_dtype=self.autocast)
                if self.model.active_adapter not in self.model.peft_config:
                    # The previously active adapter was deleted; peft needs one active adapter
                    # even when every row names its own via adapter_names.
                    self.model.set_adapter(name, inference_mode=True)
        except Exception:
            if self.model is not None and name in self.model.peft_config:
                self.delete(name)
            raise

    def hotswap(self, name: str, path: Path) -> None:
        """Replace the weights of ``name`` in place (not atomic: the slots rebuild on failure)."""
        from peft.utils.hotswap import hotswap_adapter

        hotswap_adapter(self.model, str(path), adapter_name=name,
                        torch_device=str(self._loaded.device))

    def prepare(self, path: Path) -> PreparedAdapter | None:
        """Read an adapter version's weights for ``swap_prepared``: any thread (it touches no
        model state). None when the adapter is not a plain LoRA this fast path handles (the
        slots then use ``hotswap``)."""
        import torch
        from safetensors.torch import load_file

        cfg = json.loads((path / ADAPTER_CONFIG).read_text(encoding="utf-8"))
        if cfg.get("use_dora") or cfg.get("lora_bias") or cfg.get("rank_pattern") or \
                cfg.get("alpha_pattern") or cfg.get("modules_to_save"):
            return None
        r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
        scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        # Resident adapter weights are fp32 even on a bf16 base (peft's autocast_adapter_dtype);
        # copy_ converts anyway, this only moves the conversion off the model thread.
        want = torch.float32 if self.autocast and \
            self._loaded.dtype in (torch.bfloat16, torch.float16) else self._loaded.dtype
        weights: dict[tuple[str, str], Any] = {}
        for key, t in load_file(str(path / ADAPTER_WEIGHTS),
                                device=str(self._loaded.device)).items():
            m = _LORA_KEY.fullmatch(key)
            if m is None:
                return None
            weights[(m.group(1), m.group(2))] = t.to(want) if t.is_floating_point() else t
        return PreparedAdapter(weights, scaling, alpha)

    def swap_prepared(self, name: str, prepared: PreparedAdapter) -> bool:
        """Copy prepared weights into the resident adapter ``name`` in place. Checks every key
        and shape first: returns False (nothing changed) when they do not match the resident
        adapter's modules exactly; only a failure inside the copies can leave it half swapped."""
        import torch
        from peft.tuners.lora import LoraLayer

        if name not in self._layers:  # the LoRA layers holding ``name``, found once per load
            self._layers[name] = [(n, m) for n, m in self.model.named_modules()
                                  if isinstance(m, LoraLayer) and name in m.lora_A]
        targets: list[tuple[Any, Any]] = []
        layers: list[Any] = []
        seen: set[tuple[str, str]] = set()
        for mod_name, module in self._layers[name]:
            layers.append(module)
            for part in ("lora_A", "lora_B"):
                src = prepared.weights.get((mod_name, part))
                dst = getattr(module, part)[name].weight
                if src is None or tuple(src.shape) != tuple(dst.shape):
                    return False
                targets.append((dst, src))
                seen.add((mod_name, part))
        if not layers or seen != set(prepared.weights):
            return False
        with torch.no_grad():
            for dst, src in targets:
                dst.copy_(src)
            for module in layers:
                module.scaling[name] = prepared.scaling
                module.lora_alpha[name] = prepared.alpha
        self.model.peft_config[name].lora_alpha = prepared.alpha
        return True

    def delete(self, name: str) -> None:
        self._layers.pop(name, None)
        with warnings.catch_warnings():
            # peft warns when the active adapter goes; we route rows by adapter_names anyway.
            warnings.filterwarnings("ignore", message=".*was active which is now deleted.*")
            self.model.delete_adapter(name)


# A saved LoRA weight: "<module path>.lora_A.weight" / "<module path>.lora_B.weight".
_LORA_KEY = re.compile(r"(.+)\.(lora_A|lora_B)\.weight")


@dataclass
class PreparedAdapter:
    """An adapter version's weights read off the model thread: (module path, lora_A|lora_B)
    -> tensor on the model's device in the resident adapters' dtype, and its LoRA scaling."""

    weights: dict[tuple[str, str], Any]
    scaling: float
    alpha: float
