"""Scheduling: APScheduler 3 jobs that only enqueue training runs; workers do the training.

One cron job per guild with training enabled (the guild's own schedule, else
``training.schedule``), each calling ``enqueue_if_due``: a run is queued when at least
``training.min_new_examples`` new examples arrived since the active version was activated. A
sync job re-reads guild settings every ``SYNC_SECONDS`` and adds, moves or drops the cron jobs.
These live in ONE scheduler, the worker's; the store deduplicates anyway (one queued or running
run per guild). A daily job (and one a minute after start) applies the retention period,
``privacy.retention_days``, in every scheduler, the bot's included, whatever the training
switch says.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from guildtune.policy import (
    RETENTION_JOB,
    SYNC_JOB,
    TRAIN_JOB_PREFIX,
    may_train,
    operator_block,
)

if TYPE_CHECKING:
    from guildtune.config import Config
    from storage import Store

log = logging.getLogger(__name__)

SYNC_SECONDS = 30  # how soon the worker follows a guild's new switch or schedule
JOB_PREFIX = TRAIN_JOB_PREFIX  # the job ids live in guildtune.policy: the bot signals SYNC_JOB


def purge_expired(store: Store, cfg: Config) -> dict[str, int]:
    """Retention: delete interactions and messages older than ``privacy.retention_days``, and
    the files of adapter versions withdrawn by a forget or an opt-out."""
    from guildtune.adapter_dir import prune_withdrawn

    deleted = store.purge_older_than(cfg.privacy.retention_days)
    if any(deleted.values()):
        log.info("retention (%s days): deleted %s", cfg.privacy.retention_days, deleted)
    pruned = prune_withdrawn(store, cfg)
    if pruned:
        deleted["withdrawn_versions"] = len(pruned)
    return deleted


def enqueue_if_due(store: Store, cfg: Config, guild_id: int) -> int | None:
    """Queue a 'schedule' run for the guild when training is allowed and enough new examples
    arrived since its active version. Returns the new run id, or None."""
    if not may_train(cfg, store.guild_settings(guild_id)):
        return None
    active = store.active_version(guild_id)
    new = store.examples_since(guild_id, active.activated_utc if active else None)
    if new < cfg.training.min_new_examples:
        log.debug("guild %s: %d new examples < %d, not queued", guild_id, new,
                  cfg.training.min_new_examples)
        return None
    run_id, created = store.enqueue_run(guild_id, "schedule")
    if created:
        log.info("guild %s: %d new examples, queued run %s", guild_id, new, run_id)
    return run_id if created else None


def enqueue_due(store: Store, cfg: Config, guild_ids: list[int] | None = None) -> list[int]:
    """``enqueue_if_due`` for the given guilds (default: every guild the store knows).
    Returns the ids of runs queued now."""
    if operator_block(cfg) is not None:
        return []
    out = []
    for g in guild_ids if guild_ids is not None else store.guild_ids():
        run_id = enqueue_if_due(store, cfg, g)
        if run_id is not None:
            out.append(run_id)
    return out


def guild_schedules(store: Store, cfg: Config) -> dict[int, str]:
    """guild -> crontab, for every guild that may train (none while the operator has training
    off)."""
    out = {}
    for g in store.guild_ids():
        s = store.guild_settings(g)
        if may_train(cfg, s):
            out[g] = s.schedule or cfg.training.schedule
    return out


def sync_jobs(scheduler: Any, store: Store, cfg: Config) -> None:
    """Make the scheduler's per-guild cron jobs match the guilds' current settings."""
    from apscheduler.triggers.cron import CronTrigger

    wanted = guild_schedules(store, cfg) if operator_block(cfg) is None else {}
    for job in scheduler.get_jobs():
        if job.id.startswith(JOB_PREFIX) and int(job.id[len(JOB_PREFIX):]) not in wanted:
            job.remove()
    for g, cron in wanted.items():
        try:
            trigger = CronTrigger.from_crontab(cron, timezone="UTC")
        except ValueError:
            log.warning("guild %s: bad schedule %r, using %r", g, cron, cfg.training.schedule)
            cron = cfg.training.schedule
            trigger = CronTrigger.from_crontab(cron, timezone="UTC")
        job_id = f"{JOB_PREFIX}{g}"
        job = scheduler.get_job(job_id)
        if job is not None and str(job.trigger) == str(trigger):
            continue  # unchanged: keep its next run time
        scheduler.add_job(enqueue_if_due, trigger, args=(store, cfg, g), id=job_id,
                          replace_existing=True, name=f"enqueue training for guild {g}")


def make_scheduler(store: Store, cfg: Config, asyncio: bool = True,
                   background: bool = False, training: bool = True) -> Any:
    """An APScheduler 3 scheduler, not yet started: the retention job always, the per-guild
    training jobs and their sync only with ``training`` and when the operator enabled training.

    One scheduler enqueues training: the worker's (``training=True``). The bot's scheduler
    (``training=False``) only applies retention; the bot signals through the store (a guild's
    switch and schedule are settings rows, which the worker's sync job reads every
    ``SYNC_SECONDS``) and queues runs itself only when an admin asks (``/tune retrain``).

    ``asyncio=True``: an AsyncIOScheduler; start it inside the running loop (the bot's
    ``cog_load``) and ``shutdown()`` it in ``cog_unload``. Its plain-function jobs run in a thread
    pool, so the store's SQL never blocks the event loop. ``asyncio=False``: a
    BlockingScheduler for a standalone process (``start()`` blocks), or with ``background=True``
    a BackgroundScheduler (the ``guildtune worker`` runs it beside its claim loop).

    Whoever holds the scheduler re-syncs it at once (a guild's switch or schedule just changed)
    by running its ``guildtune.policy.SYNC_JOB`` job; the bot does so without importing this
    module.
    """
    from apscheduler.triggers.interval import IntervalTrigger

    opts = {"timezone": "UTC", "job_defaults": {"coalesce": True, "max_instances": 1,
                                                "misfire_grace_time": 3600}}
    if asyncio:
        from apscheduler.schedulers.asyncio import AsyncIOScheduler
        scheduler: Any = AsyncIOScheduler(**opts)
    elif background:
        from apscheduler.schedulers.background import BackgroundScheduler
        scheduler = BackgroundScheduler(**opts)
    else:
        from apscheduler.schedulers.blocking import BlockingScheduler
        scheduler = BlockingScheduler(**opts)
    if training and operator_block(cfg) is None:
        sync_jobs(scheduler, store, cfg)
        scheduler.add_job(sync_jobs, IntervalTrigger(seconds=SYNC_SECONDS),
                          args=(scheduler, store, cfg), id=SYNC_JOB,
                          replace_existing=True, name="sync guild training schedules")
    # Always (whatever the training switch): retention, and with retention_days = 0 still
    # the deletion of withdrawn adapters' files.
    from datetime import UTC, datetime, timedelta

    from apscheduler.triggers.cron import CronTrigger

    # Daily, and once a minute after start (a bot restarted every night would otherwise
    # never reach the daily slot; the minute keeps it out of the start-up rush).
    scheduler.add_job(purge_expired, CronTrigger(hour=3, minute=30, timezone="UTC"),
                      args=(store, cfg), id=RETENTION_JOB, replace_existing=True,
                      next_run_time=datetime.now(UTC) + timedelta(minutes=1),
                      name="apply the retention period")
    return scheduler
