"""Training subcommands of the ``guildtune`` CLI: train, worker, eval, rollback.

``guildtune.cli`` calls ``add_commands(sub)`` and dispatches ``args.func(args, cfg)``.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from guildtune.cli_types import CommandError, discord_id
from guildtune.config import Config
from guildtune.policy import GUILD_OFF, operator_block

log = logging.getLogger(__name__)

# Set by the process that spawns a worker (``guildtune run``) to its own pid: the worker stops
# when that process dies, however it dies.
PARENT_PID_ENV = "GUILDTUNE_WORKER_PARENT_PID"


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register train, worker, eval and rollback on the CLI's subparsers."""
    p = sub.add_parser("train", help="train a guild's adapter now, whatever its schedule, in "
                                     "the foreground (the guild's training switch must be on: "
                                     "`guildtune guild --training on`)")
    p.add_argument("--guild", type=discord_id, required=True, help="guild id")
    p.add_argument("--skip-gate", action="store_true",
                   help="make the new version active even if it does not beat the base model "
                        "and the active version on held-out data (and train with too few "
                        "examples to judge)")
    p.add_argument("--force", action="store_true",
                   help="--skip-gate, and train even if the guild's own training switch is off "
                        "(the operator's training.enabled still applies)")
    p.add_argument("--model", help="override model.name (e.g. tiny for a smoke run)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("worker", help="claim and train queued runs (and run the schedule)")
    p.add_argument("--once", action="store_true",
                   help="train what is queued now, then exit (no schedule)")
    p.set_defaults(func=cmd_worker, log_level=logging.INFO)  # a service: its log is its output

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


def cmd_train(args: argparse.Namespace, cfg: Config) -> int:
    """Foreground training: a progress bar on a terminal, else a progress line in the log on
    each phase change and every ~30 s (``guildtune.progress.ProgressLog``, through the
    worker); prints the gate's numbers."""
    from rich.console import Console

    from guildtune.models import check_model_source
    from trainer.pipeline import TrainingError
    from trainer.worker import train_foreground

    if args.model:
        cfg = cfg.replace(model={"name": args.model})
    check_model_source(cfg.model.name)  # before a bar or a log line: the error is all there is
    console = Console(stderr=True)
    store = cfg.open_store()
    train = functools.partial(train_foreground, store, cfg, args.guild, force=args.force,
                              skip_gate=args.skip_gate, model_name=args.model)
    try:
        try:
            if console.is_terminal:
                with _progress_bar(console, args.guild) as progress:
                    run_id, res = train(progress=progress)
            else:  # a service, a pipe, CI: no bar to redraw, so log lines instead
                log_progress = logging.getLogger("trainer.worker")
                if not log_progress.isEnabledFor(logging.INFO):
                    log_progress.setLevel(logging.INFO)
                run_id, res = train()
        except TrainingError as exc:
            raise CommandError(f"{exc}{_train_hint(store, args, exc)}") from None
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
    if res.status != "succeeded":
        raise CommandError(f"run {run_id}: the new version was not kept: {res.reason}; guild "
                           f"{args.guild} keeps the version it had")
    return 0


def _train_hint(store: Any, args: argparse.Namespace, exc: Exception) -> str:
    """What the operator can do about a run that could not train, for the CLI's error line:
    the guild's switch, or the imported history it does not learn from."""
    from trainer.pipeline import NotEnoughData

    if not args.force and GUILD_OFF.split("{")[0] in str(exc):
        return (f", or from this shell with `guildtune guild --guild {args.guild} --training on` "
                "(--force trains once anyway, and also skips the evaluation gate)")
    gs = store.guild_settings(args.guild)
    if isinstance(exc, NotEnoughData) and not gs.learn_from_humans:
        pairs = len(store.reply_pairs(args.guild))
        if pairs:
            return (f"; its {pairs} imported reply pairs are not trained on while "
                    f"learn_from_humans is off (`guildtune guild --guild {args.guild} "
                    "--learn-from-humans on`)")
    return ""


@contextmanager
def _progress_bar(console: Any, guild_id: int) -> Iterator[Callable[[dict[str, Any]], None]]:
    """A rich progress bar for a terminal; yields the callback that moves it. The bar is drawn
    from the first progress report on (a run refused before it draws nothing) and erased when
    the run ends in an error, so the CLI's error line is all that is left on stderr."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("loss {task.fields[loss]}  {task.fields[tps]} tok/s"),
                   TimeRemainingColumn(), console=console, transient=False)
    task = bar.add_task(f"guild {guild_id}: preparing", total=None, loss="-", tps="-")

    def progress(p: dict[str, Any]) -> None:
        if not bar.live.is_started:
            bar.start()
        # ``p["phase"]`` is filled in by the worker (``guildtune.progress.phase_of``).
        bar.update(task, description=f"guild {guild_id}: {p.get('phase', 'training')}")
        if "total_steps" in p and "step" in p:
            bar.update(task, total=p["total_steps"], completed=p["step"])
        if "loss" in p:
            bar.update(task, loss=p["loss"], tps=p.get("tokens_per_s", "-"))

    try:
        yield progress
    except BaseException:
        bar.live.transient = True
        raise
    finally:
        bar.stop()


def _parent_pid() -> int | None:
    """The pid of the process that spawned this worker (``bot.runner.spawn_worker`` sets
    ``PARENT_PID_ENV``): the worker stops when it dies."""
    value = os.environ.get(PARENT_PID_ENV, "").strip()
    return int(value) if value.isdigit() else None


def cmd_worker(args: argparse.Namespace, cfg: Config) -> int:
    """Run the worker loop (and, unless --once, the schedule) until SIGTERM/SIGINT, or until
    the process that spawned it dies. With --once: 1 when any run it handled failed.

    A worker spawned by the bot or the console ignores SIGINT: Ctrl-C at their terminal
    reaches every process of its group, but it is theirs; they stop the worker with SIGTERM,
    and the training children it starts inherit the ignored SIGINT (no KeyboardInterrupt
    traceback in the worker's log)."""
    parent_pid = _parent_pid()
    if parent_pid is not None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # first: the imports below take a while
    from guildtune.schedule import make_scheduler
    from trainer.worker import run_worker_process

    off = operator_block(cfg)
    if off is not None:
        log.warning("%s: queued runs will fail at once", off)
    store = cfg.open_store()
    scheduler = None
    try:
        if not args.once:
            # Also applies privacy.retention_days, whatever the training switch says.
            scheduler = make_scheduler(store, cfg, asyncio=False, background=True)
            scheduler.start()
        report = run_worker_process(cfg, once=args.once, store=store, parent_pid=parent_pid)
    finally:
        if scheduler is not None:
            scheduler.shutdown(wait=False)
        store.close()
    if not args.once:
        return 0  # a long-running worker logged each failure as it happened
    failed = [f"run {r.run_id} (guild {r.guild_id}) {r.status}: "
              f"{r.error or 'no error recorded'}" for r in report.failed]
    if len(failed) > 1:  # the error is one line: the list goes with the report
        print("\n".join(failed))
    print(f"handled {len(report.runs)} run(s)"
          + (f", {len(report.failed)} failed" if report.failed else ""))
    if failed:
        raise CommandError(failed[0] if len(failed) == 1 else
                           f"{len(failed)} of {len(report.runs)} runs failed (listed above)")
    return 0


def cmd_eval(args: argparse.Namespace, cfg: Config) -> int:
    """Base vs active adapter on the held-out reply pairs of a community file."""
    from guildtune.community import read_community, stable_hash
    from trainer.data import examples_from_messages, heldout_of, system_prompt

    store = cfg.open_store()
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
        raise CommandError(f"{args.data} has no held-out reply pairs "
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
    from guildtune.cli import no_database

    missing = no_database(cfg)
    if missing is not None:
        raise CommandError(f"{missing}; nothing to roll back")
    store = cfg.open_store()
    try:
        before = store.active_version(args.guild)
        if before is None:
            raise CommandError(f"guild {args.guild} is already on the base model; nothing to "
                               "roll back")
        after = store.rollback(args.guild)
    finally:
        store.close()
    was = f"v{before.version}"
    now = f"v{after.version}" if after else "the base model"
    print(f"guild {args.guild}: {was} -> {now}")
    return 0
