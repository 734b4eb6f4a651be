"""train_guild: dataset -> fit -> evaluate -> gate -> publish. Used by the worker and the CLI."""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from guildtune.policy import OPERATOR_OFF, training_block

if TYPE_CHECKING:
    from guildtune.config import Config
    from guildtune.models import LoadedModel
    from storage import Store

log = logging.getLogger(__name__)

OPERATOR_DISABLED = OPERATOR_OFF  # the name the trainer's callers know (guildtune.policy)


class TrainingError(RuntimeError):
    """A run that cannot train; the message says why, in one line, for the admin."""


class NotEnoughData(TrainingError):
    """Too few usable examples to train and judge an adapter; ``needed`` more would do."""

    def __init__(self, message: str, needed: int) -> None:
        super().__init__(message)
        self.needed = needed


@dataclass
class TrainResult:
    status: str  # "succeeded" | "rejected"
    version: int | None
    metrics: dict[str, Any] = field(default_factory=dict)
    reason: str = ""


def check_allowed(store: Store, cfg: Config, guild_id: int, force: bool) -> None:
    """Raise TrainingError with ``guildtune.policy.training_block``'s reason when the guild
    may not train (the operator's gate always, the guild admin's unless forced)."""
    reason = training_block(cfg, store.guild_settings(guild_id), force)
    if reason is not None:
        raise TrainingError(reason)


def load_base(cfg: Config, model_name: str | None = None) -> LoadedModel:
    """The configured base model (or ``model_name``), cached under the data dir."""
    from guildtune.models import load_model

    return load_model(model_name or cfg.model.name, device=cfg.model.device,
                      dtype=cfg.model.dtype, cache_dir=cfg.data_dir, threads=cfg.model.threads)


def train_guild(store: Store, cfg: Config, guild_id: int, *, force: bool = False,
                run_id: int | None = None, model_name: str | None = None,
                progress: Callable[[dict[str, Any]], None] | None = None,
                should_stop: Callable[[], str | None] | None = None,
                loaded: LoadedModel | None = None) -> TrainResult:
    """Train, evaluate, gate and (when it passes, or ``force``) publish + activate a new version.

    Raises TrainingError when the run must not or cannot train (gates, no data). A candidate
    that fails the gate is not published; the result says ``rejected`` with the numbers.
    ``should_stop`` is polled during the fit and once more right before publishing.
    """
    from storage import ConsentChangedError, utc_now

    from .data import build_dataset
    from .evaluate import adapter_loss, base_loss, gate, heldout_loss
    from .fit import fit
    from .publish import publish

    check_allowed(store, cfg, guild_id, force)
    t0 = time.perf_counter()
    # Taken before the first read: publish checks every contributor's consent against it, so a
    # forget or an opt-out (or a new opt-in after a forget) during the run is never served.
    dataset_utc = utc_now()
    data = build_dataset(store, guild_id, cfg)
    if not data.train:
        st = data.stats
        if not st.get("unique"):
            raise TrainingError(f"guild {guild_id} has no training examples yet (liked replies, "
                                "corrections, or member replies with learn_from_humans on)")
        raise TrainingError(
            f"guild {guild_id} has {st['unique']} examples but none left to train on: "
            f"{st.get('capped_out', 0)} set aside by the per-member share cap "
            f"(privacy.max_user_share = {cfg.privacy.max_user_share}: a community model needs "
            f"data from several members), {st.get('n_heldout', 0)} held out for the gate")
    if not data.heldout and not force:
        raise TrainingError(f"guild {guild_id} has too few examples to hold any out for the "
                            f"evaluation gate ({len(data.train)} examples)")
    if progress:
        progress({"phase": "loading model", **data.stats})
    lm = loaded or load_base(cfg, model_name)
    ml = cfg.training.max_seq_len
    # The bar is the newest clean version: a version trained on a forgotten member is never
    # what a candidate (a retrain without them, above all) has to beat.
    active = store.newest_clean_version(guild_id)
    try:
        result = fit(lm.model, lm.tokenizer, data.train, cfg, negatives=data.negatives,
                     progress=progress, should_stop=should_stop)
        peft_model = result.model
        if progress:
            progress({"phase": "evaluating", "step": result.steps, "total_steps": result.steps})
        metrics: dict[str, Any] = {
            "n_train": len(data.train), "n_heldout": len(data.heldout),
            "n_negatives": len(data.negatives), "steps": result.steps, "tokens": result.tokens,
            "train_seconds": round(result.seconds, 2),
            "tokens_per_s": round(result.tokens_per_s, 1),
            "train_loss": round(result.final_loss, 4), "stopped": result.stopped,
            "base_model": lm.base_id, "data_fingerprint": data.fingerprint, "forced": force,
        }
        if data.heldout:
            metrics["base_loss"] = base_loss(peft_model, lm.tokenizer, data.heldout, ml)
            metrics["candidate_loss"] = heldout_loss(peft_model, lm.tokenizer, data.heldout,
                                                     max_seq_len=ml)[0]
            metrics["active_loss"] = None
            metrics["active_version"] = active.version if active else None
            if active is not None and active.base_model == lm.base_id:
                # Only comparable on the base it was trained on; another base means the active
                # version cannot be served with this model anyway.
                try:
                    metrics["active_loss"] = adapter_loss(peft_model, lm.tokenizer,
                                                          data.heldout, active.path, ml)
                except Exception as exc:  # its files are gone or broken: judge against base
                    log.warning("guild %s: active version v%s cannot be evaluated (%s); the "
                                "candidate is judged against the base model", guild_id,
                                active.version, exc)
                    metrics["active_error"] = f"{type(exc).__name__}: {exc}"[:300]
            decision = gate(metrics["candidate_loss"], metrics["base_loss"],
                            metrics["active_loss"], cfg.training.eval_margin, force)
        else:
            from .evaluate import GateDecision
            decision = GateDecision(True, "forced by an admin (no held-out data)")
        metrics["gate"] = decision.reason
        metrics["total_seconds"] = round(time.perf_counter() - t0, 2)
        if not decision.promote:
            log.info("guild %s: candidate rejected: %s", guild_id, decision.reason)
            return TrainResult("rejected", None, metrics, decision.reason)
        reason = should_stop() if should_stop is not None else None
        if reason:
            from .fit import TrainingStopped
            raise TrainingStopped(reason)
        try:
            record = publish(store, cfg, guild_id, peft_model, base_model=lm.base_id,
                             metrics=metrics, data_fingerprint=data.fingerprint,
                             contributors=data.contributors, run_id=run_id, activate=True,
                             dataset_utc=dataset_utc)
        except ConsentChangedError as exc:
            log.info("guild %s: candidate not kept: %s", guild_id, exc)
            metrics["gate"] = str(exc)
            return TrainResult("rejected", None, metrics, str(exc))
        metrics["total_seconds"] = round(time.perf_counter() - t0, 2)
        return TrainResult("succeeded", record.version, metrics, decision.reason)
    finally:
        if loaded is None:
            del lm
        gc.collect()
        try:
            import torch
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:  # pragma: no cover
            pass
