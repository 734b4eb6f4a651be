"""guildtune trainer: consented feedback -> dataset -> LoRA fit -> evaluation gate -> atomic
publish, driven by a storage-backed queue (worker); the APScheduler jobs that only enqueue live
in the kernel (``guildtune.schedule``), so the bot schedules without importing the trainer.

Importing this package is cheap (no torch): the heavy modules (``fit``, ``evaluate``,
``pipeline.train_guild``'s internals) import torch when used.

Entry points for the bot and the CLI:
- ``trainer.worker.run_worker(cfg, once=..., stop=...)`` (spawn it in its own process)
- ``trainer.worker.train_foreground(store, cfg, guild_id, force=...)``
- ``trainer.pipeline.train_guild(store, cfg, guild_id, ...)``
"""

from __future__ import annotations

from .pipeline import OPERATOR_DISABLED, TrainingError, TrainResult

__all__ = ["OPERATOR_DISABLED", "TrainResult", "TrainingError"]
