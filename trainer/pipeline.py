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
    """The configured base model (or ``model_name``) from the model cache (``cfg.model_cache``),
    in the dtype the trainer computes in (``fit.weights_dtype``)."""
    from guildtune.models import load_model

    from .fit import weights_dtype

    return load_model(model_name or cfg.model.name, device=cfg.model.device,
                      dtype=weights_dtype(cfg), cache_dir=cfg.model_cache,
                      threads=cfg.model.threads)


def train_guild(store: Store, cfg: Config, guild_id: int, *, force: bool = False,
                skip_gate: bool = False, run_id: int | None = None, model_name: str | None = None,
                progress: Callable[[dict[str, Any]], None] | None = None,
                should_stop: Callable[[], str | None] | None = None,
                loaded: LoadedModel | None = None) -> TrainResult:
    """Train, evaluate, gate and (when it passes, or ``force``) publish + activate a new version.

    ``force``: train even with the guild's own switch off, and promote whatever the gate says;
    ``skip_gate``: only the latter (the guild's switch still applies).

    Raises TrainingError when the run must not or cannot train (gates, no data). A candidate
    that fails the gate is not published; the result says ``rejected`` with the numbers.
    ``should_stop`` is polled during the fit and once more right before publishing.
    """
    from storage import ConsentChangedError, utc_now

    from .data import build_dataset
    from .evaluate import gate
    from .publish import publish

    check_allowed(store, cfg, guild_id, force)
    promote_anyway = force or skip_gate
    t0 = time.perf_counter()
    # Taken before the first read: publish checks every contributor's consent against it, so a
    # forget or an opt-out (or a new opt-in after a forget) during the run is never served.
    dataset_utc = utc_now()
    data = build_dataset(store, guild_id, cfg)
    plan = data.stats["eval"]
    if not data.train or (plan == "too few" and not promote_anyway):
        raise _not_enough(guild_id, data.stats, cfg)
    if progress:
        progress({"phase": "loading model", **data.stats})
    lm = loaded or load_base(cfg, model_name)
    # The bar is the newest clean version: a version trained on a forgotten member is never
    # what a candidate (a retrain without them, above all) has to beat.
    active = store.newest_clean_version(guild_id)
    if active is not None and active.base_model != lm.base_id:
        active = None  # trained on another base: not comparable, and not servable with this one
    try:
        if plan == "k-fold":
            peft_model, metrics = _judge_by_folds(lm, data, cfg, active, progress, should_stop)
        else:
            peft_model, metrics = _judge_by_time(lm, data, cfg, active, progress, should_stop)
        metrics.update({"base_model": lm.base_id, "data_fingerprint": data.fingerprint,
                        "sources": data.stats["sources"], "forced": promote_anyway,
                        "active_version": active.version if active else None})
        if "candidate_loss" in metrics:
            decision = gate(metrics["candidate_loss"], metrics["base_loss"],
                            metrics["active_loss"], cfg.training.eval_margin, promote_anyway,
                            candidate_vs_active=metrics.get("candidate_vs_active_loss"))
        else:
            from .evaluate import GateDecision
            decision = GateDecision(True, "forced by an admin (too few examples to judge)")
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


def _not_enough(guild_id: int, st: dict[str, Any], cfg: Config) -> NotEnoughData:
    """Why a guild cannot train yet, and how many more usable examples the next run needs."""
    from .data import MIN_EXAMPLES

    usable = int(st.get("n_train", 0)) + int(st.get("n_heldout", 0))
    needed = max(1, MIN_EXAMPLES - usable)
    if not st.get("unique"):
        return NotEnoughData(f"guild {guild_id} has no training examples yet (liked replies, "
                             f"corrections, or member replies with learn_from_humans on); it "
                             f"needs at least {MIN_EXAMPLES}", needed)
    capped = int(st.get("capped_out", 0))
    why = (f"; {capped} more were set aside by the per-member share cap "
           f"(privacy.max_user_share = {cfg.privacy.max_user_share}: a community model needs "
           "data from several members)" if capped else "")
    return NotEnoughData(f"guild {guild_id} has {usable} usable examples; a run needs at least "
                         f"{MIN_EXAMPLES} ({needed} more liked replies or corrections){why}",
                         needed)


MIN_UNSEEN = 4  # fewer examples newer than the active version: judge it on all (a harder bar)


def unseen_by(active: Any, examples: list[Any]) -> list[Any]:
    """The examples written after ``active`` was published: certainly not in its training data,
    so its loss on them is not flattered by memory. Fewer than MIN_UNSEEN: all ``examples`` (the
    bar is then higher than it should be, never lower)."""
    from storage.times import parse_utc

    if active is None:
        return examples
    since = parse_utc(active.created_utc)
    fresh = []
    for e in examples:
        try:
            if e.created_utc and parse_utc(e.created_utc) > since:
                fresh.append(e)
        except ValueError:
            continue
    return fresh if len(fresh) >= MIN_UNSEEN else examples


LOSS_CURVE_POINTS = 500  # a longer fit's curve is kept as this many means of equal runs of steps


def loss_curve(losses: list[float], points: int = LOSS_CURVE_POINTS) -> tuple[list[float], int]:
    """The fit's training loss per step, or for a fit of more than ``points`` steps the mean
    of every ``every`` steps; returns (curve, every)."""
    every = max(1, -(-len(losses) // points))
    curve = [sum(part) / len(part) for part in
             (losses[i:i + every] for i in range(0, len(losses), every))]
    return [round(x, 4) for x in curve], every


def _fit_metrics(result: Any) -> dict[str, Any]:
    curve, every = loss_curve(result.losses)
    return {"steps": result.steps, "tokens": result.tokens,
            "train_seconds": round(result.seconds, 2),
            "tokens_per_s": round(result.tokens_per_s, 1),
            "train_loss": round(result.final_loss, 4), "stopped": result.stopped,
            "loss_curve": curve, "loss_curve_every": every}


def _active_loss(peft_model: Any, lm: LoadedModel, examples: list[Any], active: Any,
                 ml: int, metrics: dict[str, Any]) -> float | None:
    from .evaluate import adapter_loss

    if active is None:
        return None
    try:
        return adapter_loss(peft_model, lm.tokenizer, examples, active.path, ml)
    except Exception as exc:  # its files are gone or broken: judge against the base
        log.warning("active version v%s cannot be evaluated (%s); the candidate is judged "
                    "against the base model", active.version, exc)
        metrics["active_error"] = f"{type(exc).__name__}: {exc}"[:300]
        return None


def _judge_by_time(lm: LoadedModel, data: Any, cfg: Config, active: Any,
                   progress: Callable[[dict[str, Any]], None] | None,
                   should_stop: Callable[[], str | None] | None) -> tuple[Any, dict[str, Any]]:
    """Fit on the past, judge base, active and candidate on the newest slice (one model: the
    adapters are switched, never copied)."""
    from .evaluate import base_loss, heldout_loss
    from .fit import fit

    ml = cfg.training.max_seq_len
    result = fit(lm.model, lm.tokenizer, data.train, cfg, negatives=data.negatives,
                 progress=progress, should_stop=should_stop)
    peft_model = result.model
    metrics: dict[str, Any] = {"eval": "time split" if data.heldout else "none",
                               "n_train": len(data.train), "n_heldout": len(data.heldout),
                               "n_negatives": len(data.negatives), **_fit_metrics(result)}
    if data.heldout:
        if progress:
            progress({"phase": "evaluating", "step": result.steps, "total_steps": result.steps})
        metrics["base_loss"] = base_loss(peft_model, lm.tokenizer, data.heldout, ml)
        metrics["candidate_loss"] = heldout_loss(peft_model, lm.tokenizer, data.heldout,
                                                 max_seq_len=ml)[0]
        judged = unseen_by(active, data.heldout)
        metrics["active_loss"] = _active_loss(peft_model, lm, judged, active, ml, metrics)
        if active is not None:
            metrics["n_judged_vs_active"] = len(judged)
            metrics["candidate_vs_active_loss"] = heldout_loss(
                peft_model, lm.tokenizer, judged, max_seq_len=ml)[0]
    return peft_model, metrics


def _judge_by_folds(lm: LoadedModel, data: Any, cfg: Config, active: Any,
                    progress: Callable[[dict[str, Any]], None] | None,
                    should_stop: Callable[[], str | None] | None) -> tuple[Any, dict[str, Any]]:
    """The gate for a small dataset: k blocks of time, each judged by an adapter trained on
    the others (the candidate's loss is pooled over every example), then the adapter that is
    published is trained on all of them. Every example is judged once, so a dataset too small
    for a held-out slice still gets a gate, and the same data never fails for want of one."""
    from .data import time_folds
    from .evaluate import heldout_loss
    from .fit import fit

    ml = cfg.training.max_seq_len
    folds = time_folds(data.train)
    judged = {e.key for e in unseen_by(active, data.train)}
    base = lm.model
    total, count = 0.0, 0
    vs_active, n_vs_active = 0.0, 0
    # The run's time budget is shared by the k fold fits and the final one, and its ETA counts
    # the fits still to come (each about as long as the current one).
    budget_s, spent, stopped = cfg.training.time_budget_minutes * 60, 0.0, 0

    def ahead(fits_after: int) -> Callable[[dict[str, Any]], None] | None:
        if progress is None:
            return None

        def emit(p: dict[str, Any]) -> None:
            if fits_after and "eta_s" in p and "elapsed_s" in p:
                p = {**p, "eta_s": round(p["eta_s"] + fits_after * (p["elapsed_s"]
                                                                    + p["eta_s"]), 1)}
            progress(p)
        return emit

    for i, fold in enumerate(folds):
        if progress:
            progress({"phase": f"k-fold {i + 1}/{len(folds)}"})
        rest = [e for j, f in enumerate(folds) if j != i for e in f]
        result = fit(base, lm.tokenizer, rest, cfg, negatives=data.negatives,
                     progress=ahead(len(folds) - i), should_stop=should_stop,
                     time_budget_s=(budget_s - spent) / (len(folds) + 1 - i))
        spent += result.seconds
        stopped += result.stopped is not None
        loss, n = heldout_loss(result.model, lm.tokenizer, fold, max_seq_len=ml)
        if n:
            total, count = total + loss * n, count + n
        mine = [e for e in fold if e.key in judged]
        if active is not None and mine:
            loss, n = heldout_loss(result.model, lm.tokenizer, mine, max_seq_len=ml)
            vs_active, n_vs_active = vs_active + loss * n, n_vs_active + n
        base = result.model.unload()  # the base again, without this fold's LoRA layers
    metrics: dict[str, Any] = {"eval": f"k-fold k={len(folds)}", "n_train": len(data.train),
                               "n_heldout": 0, "n_negatives": len(data.negatives)}
    if count:
        metrics["candidate_loss"] = total / count
        metrics["base_loss"] = heldout_loss(base, lm.tokenizer, data.train, max_seq_len=ml)[0]
    if progress:
        progress({"phase": "training"})
    result = fit(base, lm.tokenizer, data.train, cfg, negatives=data.negatives,
                 progress=progress, should_stop=should_stop,
                 time_budget_s=max(0.0, budget_s - spent))
    metrics.update(_fit_metrics(result))
    metrics["folds_stopped"] = stopped  # fold fits cut short by the time budget
    if count:
        judged_examples = [e for e in data.train if e.key in judged]
        metrics["active_loss"] = _active_loss(result.model, lm, judged_examples, active, ml,
                                              metrics)
        if active is not None and n_vs_active:
            metrics["n_judged_vs_active"] = len(judged_examples)
            metrics["candidate_vs_active_loss"] = vs_active / n_vs_active
    return result.model, metrics
