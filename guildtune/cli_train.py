"""Training subcommands of the ``guildtune`` CLI: train, worker, eval, rollback.

``guildtune.cli`` calls ``add_commands(sub)`` and dispatches ``args.func(args, cfg)``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from guildtune.cli_types import discord_id
from guildtune.config import Config
from guildtune.policy import GUILD_OFF, operator_block

log = logging.getLogger(__name__)

# Set by the process that spawns a worker (``guildtune run``) to its own pid: the worker stops
# when that process dies, however it dies.
PARENT_PID_ENV = "GUILDTUNE_WORKER_PARENT_PID"


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register train, worker, eval and rollback on the CLI's subparsers."""
    p = sub.add_parser("train", help="train a guild's adapter now, in the foreground")
    p.add_argument("--guild", type=discord_id, required=True, help="guild id")
    p.add_argument("--force", action="store_true",
                   help="train even if the guild has training off, and promote even if the "
                        "evaluation gate would reject")
    p.add_argument("--model", help="override model.name (e.g. tiny for a smoke run)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("worker", help="claim and train queued runs (and run the schedule)")
    p.add_argument("--once", action="store_true",
                   help="train what is queued now, then exit (no schedule)")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("eval", help="held-out loss of the base model and the guild's active "
                                    "adapter on a community file (one JSON object)")
    p.add_argument("--guild", type=discord_id, required=True, help="guild id")
    p.add_argument("--data", required=True, help="community JSONL (or Discord export JSON)")
    p.add_argument("--max-pairs", type=int, default=0, metavar="N",
                   help="evaluate at most N held-out pairs (a fixed, hash-ordered subset)")
    p.add_argument("--no-base", action="store_true",
                   help="skip the base model's loss (when comparing many adapters)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("rollback", help="re-activate the guild's previous adapter version")
    p.add_argument("--guild", type=discord_id, required=True, help="guild id")
    p.set_defaults(func=cmd_rollback)


def _store(cfg: Config) -> Any:
    from storage import open_store

    return open_store(cfg.db_path, busy_timeout_ms=cfg.storage.busy_timeout_ms,
                      write_retries=cfg.storage.write_retries)


def cmd_train(args: argparse.Namespace, cfg: Config) -> int:
    """Foreground training: a progress bar on a terminal, else a progress line in the log on
    each phase change and every ~30 s (``guildtune.progress.ProgressLog``, through the
    worker); prints the gate's numbers."""
    from rich.console import Console

    from trainer.pipeline import TrainingError
    from trainer.worker import train_foreground

    if args.model:
        cfg = cfg.replace(model={"name": args.model})
    console = Console(stderr=True)
    store = _store(cfg)
    try:
        try:
            if console.is_terminal:
                with _progress_bar(console, args.guild) as progress:
                    run_id, res = train_foreground(store, cfg, args.guild, force=args.force,
                                                   model_name=args.model, progress=progress)
            else:  # a service, a pipe, CI: no bar to redraw, so log lines instead
                run_id, res = train_foreground(store, cfg, args.guild, force=args.force,
                                               model_name=args.model)
        except TrainingError as exc:
            hint = ("" if args.force or GUILD_OFF.split("{")[0] not in str(exc) else
                    " (or train it now anyway with --force)")
            raise SystemExit(f"error: {exc}{hint}") from None
    finally:
        store.close()
    m = res.metrics

    def fmt(x: Any) -> str:
        return "-" if x is None else f"{x:.4f}"

    print(f"run {run_id}: {res.status}" + (f", version {res.version} active"
                                           if res.version else ""))
    print(f"held-out loss per token: base {fmt(m.get('base_loss'))}  active "
          f"v{m.get('active_version') or '-'} {fmt(m.get('active_loss'))}  candidate "
          f"{fmt(m.get('candidate_loss'))}  ({m['n_heldout']} held-out, {m['n_train']} train)")
    print(f"gate: {m.get('gate')}")
    print(f"{m['steps']} steps, {m['tokens']} tokens, {m['tokens_per_s']} tok/s, "
          f"{m['train_seconds']} s training")
    return 0 if res.status == "succeeded" else 2


@contextmanager
def _progress_bar(console: Any, guild_id: int) -> Iterator[Callable[[dict[str, Any]], None]]:
    """A rich progress bar for a terminal; yields the callback that moves it."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("loss {task.fields[loss]}  {task.fields[tps]} tok/s"),
                  TimeRemainingColumn(), console=console, transient=False) as bar:
        task = bar.add_task(f"guild {guild_id}: preparing", total=None, loss="-", tps="-")

        def progress(p: dict[str, Any]) -> None:
            # ``p["phase"]`` is filled in by the worker (``guildtune.progress.phase_of``).
            bar.update(task, description=f"guild {guild_id}: {p.get('phase', 'training')}")
            if "total_steps" in p and "step" in p:
                bar.update(task, total=p["total_steps"], completed=p["step"])
            if "loss" in p:
                bar.update(task, loss=p["loss"], tps=p.get("tokens_per_s", "-"))

        yield progress


def _parent_pid() -> int | None:
    """The pid of the process that spawned this worker (``bot.runner.spawn_worker`` sets
    ``PARENT_PID_ENV``): the worker stops when it dies."""
    value = os.environ.get(PARENT_PID_ENV, "").strip()
    return int(value) if value.isdigit() else None


def cmd_worker(args: argparse.Namespace, cfg: Config) -> int:
    """Run the worker loop (and, unless --once, the schedule) until SIGTERM/SIGINT, or until
    the process that spawned it dies. With --once: 1 when any run it handled failed."""
    from guildtune.schedule import make_scheduler
    from trainer.worker import run_worker_process

    off = operator_block(cfg)
    if off is not None:
        log.warning("%s: queued runs will fail at once", off)
    store = _store(cfg)
    scheduler = None
    try:
        if not args.once:
            # Also applies privacy.retention_days, whatever the training switch says.
            scheduler = make_scheduler(store, cfg, asyncio=False, background=True)
            scheduler.start()
        report = run_worker_process(cfg, once=args.once, store=store, parent_pid=_parent_pid())
    finally:
        if scheduler is not None:
            scheduler.shutdown(wait=False)
        store.close()
    if not args.once:
        return 0  # a long-running worker logged each failure as it happened
    for r in report.failed:
        print(f"run {r.run_id} (guild {r.guild_id}) {r.status}: {r.error or 'no error recorded'}",
              file=sys.stderr)
    print(f"handled {len(report.runs)} run(s)"
          + (f", {len(report.failed)} failed" if report.failed else ""))
    return 1 if report.failed else 0


def cmd_eval(args: argparse.Namespace, cfg: Config) -> int:
    """Base vs active adapter on the held-out reply pairs of a community file."""
    from guildtune.community import read_community, stable_hash
    from trainer.data import examples_from_messages, heldout_of, system_prompt

    store = _store(cfg)
    try:
        active = store.active_version(args.guild)
        system = system_prompt(store, args.guild, cfg.model.system_prompt)
    finally:
        store.close()
    examples = examples_from_messages(read_community(args.data), system)
    held = heldout_of(examples, cfg)
    if args.max_pairs > 0:
        held = sorted(held, key=lambda e: stable_hash("eval", e.key))[:args.max_pairs]
    if not held:
        raise SystemExit(f"error: {args.data} has no held-out reply pairs "
                         f"({len(examples)} pairs in all)")
    model_name = cfg.model.name
    if active is not None:
        # Evaluate the adapter on the base it was trained on (named in its config snapshot).
        model_name = (active.config.get("model") or {}).get("name") or model_name
    from trainer.evaluate import base_loss
    from trainer.pipeline import load_base

    lm = load_base(cfg, model_name)
    from guildtune.models import ModelError

    if active is not None and active.base_model != lm.base_id:
        raise ModelError(f"guild {args.guild}'s version {active.version} was trained on "
                         f"{active.base_model}, but {model_name!r} loads {lm.base_id}")
    ml = cfg.training.max_seq_len
    out: dict[str, Any] = {"guild_id": args.guild, "model": lm.base_id, "pairs": len(held),
                           "total_pairs": len(examples), "adapter_version": None,
                           "adapter_loss": None}
    if active is None:
        from trainer.evaluate import heldout_loss
        out["base_loss"] = heldout_loss(lm.model, lm.tokenizer, held, max_seq_len=ml)[0]
    else:
        from peft import PeftModel

        model = PeftModel.from_pretrained(lm.model, active.path)
        out["base_loss"] = None if args.no_base else base_loss(model, lm.tokenizer, held, ml)
        from trainer.evaluate import heldout_loss
        out["adapter_loss"] = heldout_loss(model, lm.tokenizer, held, max_seq_len=ml)[0]
        out["adapter_version"] = active.version
        if out["base_loss"] is not None:
            out["relative_change"] = out["adapter_loss"] / out["base_loss"] - 1
    print(json.dumps(out))
    return 0


def cmd_rollback(args: argparse.Namespace, cfg: Config) -> int:
    """Retire the active version and re-activate the previous clean one (or the base)."""
    store = _store(cfg)
    try:
        before = store.active_version(args.guild)
        if before is None:
            raise SystemExit(f"error: guild {args.guild} is already on the base model; nothing "
                             "to roll back")
        after = store.rollback(args.guild)
    finally:
        store.close()
    was = f"v{before.version}"
    now = f"v{after.version}" if after else "the base model"
    print(f"guild {args.guild}: {was} -> {now}")
    return 0
