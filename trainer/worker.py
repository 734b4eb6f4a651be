"""The training worker: claims queued runs from the store and trains them one after another.

Each run trains in a child process (multiprocessing ``spawn``): an OOM or a crash in torch ends
the child, not the worker or the bot that started it, and the child's exit returns all GPU
memory. The parent holds the run's lease and renews it with a heartbeat that also stores the
child's progress on the run row. If the worker itself is killed, its child notices that its
parent is gone and exits before publishing; the lease expires and ``recover_stale_runs`` (at
start, and periodically, in any worker) fails the run and requeues it once.

Stopping: ``run_worker_process`` (the ``guildtune worker`` process) turns SIGTERM and SIGINT into
a graceful stop: the training child is ended, the run it held is given back (closed as failed
and queued again), and the process exits. A worker that the bot or the console spawned ignores
SIGINT, and so do its training children (Ctrl-C at their terminal is theirs: they stop it with
SIGTERM). Such a worker also stops when its spawner dies, SIGKILL included (``watch_parent``:
Linux's parent-death signal, or a reparenting check).

Over 400 lines on purpose: the claim loop, the heartbeat, the training child and the
signal handling meet at the run's lease; the child could move to its own module next.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import multiprocessing as mp
import os
import queue as queue_mod
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Self

from guildtune.policy import operator_block, training_block
from guildtune.progress import ProgressLog

from .pipeline import NotEnoughData, TrainingError

if TYPE_CHECKING:
    from guildtune.config import Config
    from storage import Run, Store

log = logging.getLogger(__name__)

RECOVER_EVERY_S = 30.0
STALE_TEMP_DIR_S = 600.0
CHILD_TERM_GRACE_S = 10.0  # a training child asked to stop is killed after this
STOP_GRACE_S = 60.0  # a worker asked to stop exits after this even if the run loop hangs
SIGNAL_POLL_S = 0.2  # how soon a SIGTERM/SIGINT becomes the worker's stop
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


# -- dying with the parent ------------------------------------------------------------------------

def set_parent_death_signal(sig: int) -> bool:
    """Ask Linux to send ``sig`` to this process when the thread that started it exits (the
    parent dying, SIGKILL included). False where ``prctl`` is not available (not Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        ok = libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False
    if not ok:
        log.warning("prctl(PR_SET_PDEATHSIG) failed: %s", os.strerror(ctypes.get_errno()))
    return ok


def watch_parent(parent_pid: int, *, poll_s: float = 0.5) -> None:
    """Make this process receive SIGTERM when ``parent_pid``, the process that spawned it, dies
    however it dies (a ``finally`` in the parent does not run on SIGKILL).

    On Linux the kernel sends it (parent-death signal); the parent may have died before that
    was set, so the parent pid is checked once after. Elsewhere a daemon thread watches for
    this process being reparented. The SIGTERM handler (``run_worker_process``) does the rest.
    """
    def gone() -> None:
        log.warning("the process that started this worker (pid %s) is gone: stopping",
                    parent_pid)
        os.kill(os.getpid(), signal.SIGTERM)

    if set_parent_death_signal(signal.SIGTERM):
        if os.getppid() != parent_pid:
            gone()
        return

    def poll() -> None:
        while os.getppid() == parent_pid:
            time.sleep(poll_s)
        gone()

    threading.Thread(target=poll, name="guildtune-parent-watch", daemon=True).start()


@dataclass(frozen=True)
class RunOutcome:
    """How one claimed run ended in this worker. ``status``: succeeded, rejected, failed,
    lost (the lease went to another worker) or released (the worker was stopped; the run
    was queued again)."""

    run_id: int
    guild_id: int
    status: str
    error: str | None = None

    @property
    def failed(self) -> bool:
        return self.status in ("failed", "lost")


class WorkerReport(int):
    """What ``run_worker`` did. It is the number of runs handled (what ``run_worker`` used to
    return, so ``report == 1`` still reads), and ``runs`` lists each run's outcome."""

    runs: tuple[RunOutcome, ...]

    def __new__(cls, runs: Sequence[RunOutcome] = ()) -> Self:
        obj = super().__new__(cls, len(runs))
        obj.runs = tuple(runs)
        return obj

    @property
    def failed(self) -> list[RunOutcome]:
        """The runs that failed (or were lost): a caller that exits 0 on these would lie."""
        return [r for r in self.runs if r.failed]

    def __getnewargs__(self) -> tuple[tuple[RunOutcome, ...]]:  # type: ignore[override]
        return (self.runs,)  # pickles as itself, not as the bare count

    def __repr__(self) -> str:
        return f"WorkerReport({list(self.runs)!r})"


class Heartbeat(threading.Thread):
    """Renews a run's lease every ``lease/4`` seconds (sooner when progress changed, at most
    once a second) and stores the latest progress. ``lost`` is set when the lease is gone."""

    def __init__(self, store: Store, run_id: int, worker: str, lease_seconds: int) -> None:
        super().__init__(name=f"heartbeat-{run_id}", daemon=True)
        self.store, self.run_id, self.worker, self.lease = store, run_id, worker, lease_seconds
        self.lost = threading.Event()
        self._halt = threading.Event()
        self._progress: dict[str, Any] | None = None
        self._dirty = threading.Event()
        self._updates = 0  # progress dicts received
        self._stored = 0  # of them, how many were in the store when last written

    def update(self, progress: dict[str, Any]) -> None:
        self._progress = dict(progress)
        self._updates += 1
        self._dirty.set()

    def _write(self) -> bool:
        """Renew the lease and store the latest progress; False when the lease is lost."""
        seen = self._updates
        try:
            ok = self.store.heartbeat(self.run_id, self.worker, self.lease,
                                      progress=self._progress)
        except Exception:  # a busy db must not kill the heartbeat; the lease has slack
            log.exception("heartbeat for run %s failed", self.run_id)
            return True
        if ok:
            self._stored = seen
        return ok

    def run(self) -> None:
        interval = max(1.0, self.lease / 4)
        last = 0.0
        while not self._halt.is_set():
            self._dirty.wait(timeout=max(0.0, interval - (time.monotonic() - last)))
            if self._halt.is_set():
                break
            now = time.monotonic()
            if self._dirty.is_set() and now - last < 1.0 and now - last < interval:
                self._halt.wait(1.0 - (now - last))  # throttle progress writes to 1/s
                continue
            self._dirty.clear()
            ok = self._write()
            last = time.monotonic()
            if not ok:
                log.warning("run %s: lease lost; stopping", self.run_id)
                self.lost.set()
                return

    def stop(self) -> None:
        """Stop beating; progress the throttle held back (the run's last phase) is written."""
        self._halt.set()
        self._dirty.set()
        self.join(timeout=5)
        if not self.is_alive() and not self.lost.is_set() and self._stored != self._updates:
            self._write()


def failure(exc: BaseException) -> dict[str, Any]:
    """How a run that raised ``exc`` failed, as the child reports it and the run records it:
    ``error``, one line (a TrainingError's own words, else the exception's type and message),
    and for ``NotEnoughData`` ``needed``, how many more usable examples the next run needs."""
    error = str(exc) if isinstance(exc, TrainingError) else f"{type(exc).__name__}: {exc}"
    out: dict[str, Any] = {"error": error}
    if isinstance(exc, NotEnoughData):
        out["needed"] = int(exc.needed)
    return out


# -- the child process --------------------------------------------------------------------------

def _watch_parent(parent_pid: int) -> None:
    # Reparenting means the worker died (SIGKILL included): stop at once, publish nothing.
    while True:
        if os.getppid() != parent_pid:
            os._exit(3)
        time.sleep(0.2)


def _child_main(cfg: Config, run_id: int, guild_id: int, force: bool, worker: str,
                parent_pid: int, out: Any, model_name: str | None) -> None:
    """Entry point of the training child: train one run, report through ``out``."""
    # Killed with the worker (nothing to give back: the worker holds the lease), at once where
    # the kernel can do it, else within the watcher's poll.
    set_parent_death_signal(signal.SIGKILL)
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from .pipeline import train_guild

    store = cfg.open_store()
    checked = [0.0]

    def should_stop() -> str | None:
        now = time.monotonic()
        if now - checked[0] < 5.0:
            return None
        checked[0] = now
        run = store.get_run(run_id)
        if run is None or run.status != "running" or run.worker != worker:
            return "the run's lease was lost"
        return None

    def progress(p: dict[str, Any]) -> None:
        out.put(("progress", {**p, "pid": os.getpid()}))

    # What the child sends: ("progress", dict) any number of times, then one ("result",
    # TrainResult's fields) or ("error", ``failure(exc)``).
    try:
        res = train_guild(store, cfg, guild_id, force=force, run_id=run_id,
                          model_name=model_name, progress=progress, should_stop=should_stop)
        out.put(("result", {"status": res.status, "version": res.version,
                            "metrics": res.metrics, "reason": res.reason}))
    except BaseException as exc:  # report anything; the parent turns it into a failed run
        if not isinstance(exc, TrainingError):
            log.error("run %s crashed:\n%s", run_id, traceback.format_exc())
        out.put(("error", failure(exc)))
    finally:
        store.close()


# -- the parent side ----------------------------------------------------------------------------

def _fail(store: Store, run: Run, worker: str, failed: dict[str, Any]) -> bool:
    """Close a run as failed with ``failure``'s fields: the error, and ``needed`` in the run's
    metrics (where /tune status reads how many more examples the next run needs)."""
    needed = failed.get("needed")
    return store.finish_run(run.id, "failed", error=str(failed["error"])[:2000],
                            metrics=None if needed is None else {"needed": needed},
                            worker=worker)


def progress_log(run: Run, *, quiet: bool = False) -> ProgressLog:
    """Follows a run's progress: fills in each dict's phase and logs a line on each phase
    change and every ~30 s in between (``quiet``: none; the caller shows progress itself)."""
    return ProgressLog(f"run {run.id} (guild {run.guild_id})", logger=None if quiet else log)


def _death_reason(exitcode: int | None) -> str:
    """Why a training child ended without a report, for the run's error and the admin."""
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        # The kernel's out-of-memory killer sends SIGKILL: say so, it is the usual cause.
        hint = (" (out of memory? the kernel's OOM killer sends SIGKILL)"
                if -exitcode == signal.SIGKILL else "")
        return f"training process was killed by {name}{hint}; see the worker log"
    return f"training process died (exit code {exitcode}); see the worker log"


def _release(store: Store, run: Run, worker: str, why: str) -> None:
    """Give a claimed run back when the worker stops before it finished: closed as failed
    (saying why) and queued again with the same attempt number (a stopped worker is not the
    run's fault), so no run stays 'running' until its lease runs out."""
    if not store.finish_run(run.id, "failed", error=why, worker=worker):
        return  # the lease had already gone to another worker
    new_id, _ = store.enqueue_run(run.guild_id, run.trigger, run.requested_by, run.force,
                                  attempt=run.attempt)
    log.warning("run %s (guild %s): %s; queued again as run %s", run.id, run.guild_id, why,
                new_id)


def execute_run(store: Store, cfg: Config, run: Run, worker: str, *,
                model_name: str | None = None, isolate: bool = True,
                stop: threading.Event | None = None) -> str:
    """Train a claimed run and close it. Returns the final status.

    ``isolate`` (the default) trains in a child process, so an out-of-memory or a crash never
    takes the caller down and GPU memory is returned after each run; ``isolate=False`` trains in
    this process (the one-process demo, where the model libraries are already imported).
    When ``stop`` is set during an isolated run, the child is ended and the run is given back
    (``_release``): the status is then 'released'.
    """
    blocked = training_block(cfg, store.guild_settings(run.guild_id), run.force)
    if blocked is not None:
        store.finish_run(run.id, "failed", error=blocked, worker=worker)
        return "failed"
    if not isolate:
        try:
            return _train_here(store, cfg, run, worker, model_name=model_name).status
        except Exception as exc:  # closed as failed by _train_here; the worker goes on
            log.warning("run %s (guild %s) failed: %s", run.id, run.guild_id, exc)
            return "failed"
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    child = ctx.Process(target=_child_main, name=f"guildtune-train-{run.id}",
                        args=(cfg, run.id, run.guild_id, run.force, worker, os.getpid(), out,
                              model_name))
    beat = Heartbeat(store, run.id, worker, cfg.training.lease_seconds)
    follow = progress_log(run)
    beat.start()
    child.start()
    log.info("run %s (guild %s): training in child pid %s", run.id, run.guild_id, child.pid)
    outcome: tuple[str, Any] | None = None
    kill_at: float | None = None  # set once the child was asked to stop
    try:
        while outcome is None:
            if beat.lost.is_set():
                child.terminate()
                child.join(10)
                return "lost"
            if kill_at is None and stop is not None and stop.is_set():
                log.warning("run %s (guild %s): worker stopping; ending training child %s",
                            run.id, run.guild_id, child.pid)
                child.terminate()
                kill_at = time.monotonic() + CHILD_TERM_GRACE_S
            try:
                kind, payload = out.get(timeout=0.5)
            except queue_mod.Empty:
                if not child.is_alive():
                    # Drain what the child wrote just before exiting.
                    try:
                        kind, payload = out.get(timeout=1.0)
                    except queue_mod.Empty:
                        outcome = ("error", {"error": _death_reason(child.exitcode)})
                        break
                else:
                    if kill_at is not None and time.monotonic() > kill_at:
                        child.kill()
                    continue
            if kind == "progress":
                beat.update(follow.update(payload))
            else:
                outcome = (kind, payload)
        child.join(30)
        if child.is_alive():
            child.kill()
    finally:
        beat.stop()
        out.close()
    kind, payload = outcome
    if kind != "result" and stop is not None and stop.is_set():
        # Ended because the worker is stopping (SIGTERM, Ctrl+C reaching the child too, the
        # bot gone): not the run's failure. A result that made it out is still recorded.
        _release(store, run, worker, f"worker {worker} stopped before the run finished")
        return "released"
    if kind == "result":
        status = payload["status"]
        store.finish_run(run.id, status, metrics=payload["metrics"], version=payload["version"],
                         error=None if status == "succeeded" else payload["reason"],
                         worker=worker)
        log.info("run %s (guild %s): %s %s", run.id, run.guild_id, status,
                 payload["version"] or payload["reason"])
        return status
    _fail(store, run, worker, payload)
    log.warning("run %s (guild %s) failed: %s", run.id, run.guild_id, payload["error"])
    return "failed"


def _train_here(store: Store, cfg: Config, run: Run, worker: str, *,
                model_name: str | None = None, progress: Any = None,
                skip_gate: bool = False) -> Any:
    """Train a claimed run in this process under a heartbeat and close it. Returns the
    TrainResult; re-raises (after closing the run as failed) when it cannot train.
    ``skip_gate``: promote whatever the gate says (``train_guild``).
    ``progress`` gets each progress dict with its phase filled in; without it, progress is
    logged (``progress_log``)."""
    from .pipeline import train_guild

    beat = Heartbeat(store, run.id, worker, cfg.training.lease_seconds)
    follow = progress_log(run, quiet=progress is not None)
    beat.start()

    def on_progress(p: dict[str, Any]) -> None:
        record = follow.update(p)
        beat.update(record)
        if progress is not None:
            progress(record)

    def should_stop() -> str | None:
        return "the run's lease was lost" if beat.lost.is_set() else None

    try:
        res = train_guild(store, cfg, run.guild_id, force=run.force, skip_gate=skip_gate,
                          run_id=run.id, model_name=model_name, progress=on_progress,
                          should_stop=should_stop)
    except BaseException as exc:
        beat.stop()
        _fail(store, run, worker, failure(exc))
        raise
    beat.stop()
    store.finish_run(run.id, res.status, metrics=res.metrics, version=res.version,
                     error=None if res.status == "succeeded" else res.reason, worker=worker)
    return res


def train_foreground(store: Store, cfg: Config, guild_id: int, *, force: bool = False,
                     skip_gate: bool = False, requested_by: int | None = None,
                     model_name: str | None = None, progress: Any = None) -> tuple[int, Any]:
    """Queue a run for the guild, claim it here and train in this process (the CLI's
    ``train``): the queue still guarantees one run per guild. Returns (run id, TrainResult);
    raises TrainingError (the run is closed as failed) when it cannot train. ``force`` and
    ``skip_gate`` as for ``trainer.pipeline.train_guild``."""
    blocked = operator_block(cfg)  # the guild's switch: train_guild, with ``force``
    if blocked is not None:
        raise TrainingError(blocked)
    worker = f"cli:{default_worker_id()}"
    run_id, _ = store.enqueue_run(guild_id, "cli", requested_by, force)
    run = store.claim_run(worker, cfg.training.lease_seconds, guild_id=guild_id)
    if run is None or run.id != run_id:
        raise TrainingError(f"guild {guild_id} already has a run in progress (run {run_id}); "
                            "wait for it or stop its worker")
    return run.id, _train_here(store, cfg, run, worker, model_name=model_name,
                               progress=progress, skip_gate=skip_gate)


def _clean_stale_temp_dirs(cfg: Config) -> None:
    # Temp dirs older than any publish could take are leftovers of a killed publisher.
    root = cfg.adapters_dir
    if not root.is_dir():
        return
    now = time.time()
    for tmp in root.glob("*/.tmp-*"):
        try:
            if now - tmp.stat().st_mtime > STALE_TEMP_DIR_S:
                import shutil
                shutil.rmtree(tmp, ignore_errors=True)
        except FileNotFoundError:
            pass


def run_worker(cfg: Config, *, once: bool = False, worker_id: str | None = None,
               stop: threading.Event | None = None, model_name: str | None = None,
               store: Store | None = None, isolate: bool = True) -> WorkerReport:
    """Claim and train queued runs one after another until ``stop`` is set (or, with ``once``,
    until the queue is empty). Returns a ``WorkerReport``: the number of runs handled, with
    each run's outcome (``report.failed`` lists the failures)."""
    worker = worker_id or default_worker_id()
    stop = stop or threading.Event()
    own = store is None
    store = store or cfg.open_store()
    outcomes: list[RunOutcome] = []
    try:
        _clean_stale_temp_dirs(cfg)
        last_recover = 0.0
        while not stop.is_set():
            if time.monotonic() - last_recover > RECOVER_EVERY_S:
                recovered = store.recover_stale_runs()
                if recovered:
                    log.warning("recovered stale runs %s (failed; requeued once)", recovered)
                last_recover = time.monotonic()
            run = store.claim_run(worker, cfg.training.lease_seconds)
            if run is not None:
                status = execute_run(store, cfg, run, worker, model_name=model_name,
                                     isolate=isolate, stop=stop)
                done = store.get_run(run.id)
                error = None if status == "succeeded" or done is None else done.error
                if status == "lost":
                    error = "the run's lease was lost to another worker"
                outcomes.append(RunOutcome(run.id, run.guild_id, status, error))
                continue
            if once:
                break
            stop.wait(cfg.training.poll_seconds)
    finally:
        if own:
            store.close()
    return WorkerReport(outcomes)


def run_worker_process(cfg: Config, *, once: bool = False, store: Store | None = None,
                       parent_pid: int | None = None) -> WorkerReport:
    """The main of a worker process (``guildtune worker``): ``run_worker`` in a thread, with
    SIGTERM and SIGINT turned into a graceful stop (the run in progress is given back, see
    ``execute_run``), and, with ``parent_pid``, a stop when that process dies (``watch_parent``).
    Call it from the main thread."""
    stop = threading.Event()
    signalled: list[int] = []

    def on_signal(signum: int, frame: Any) -> None:
        # Records the signal, nothing more: no lock, no logging. A second signal can land
        # inside this handler (Ctrl-C reaches the worker, and its parent's SIGTERM follows at
        # once), and a handler that takes a lock (stop.set() takes the Event's) then waits for
        # itself forever. The loop below turns the record into the stop.
        signalled.append(signum)

    # Handlers can only be installed from the main thread (elsewhere: the caller's stop rules).
    # An ignored SIGINT stays ignored (a worker spawned by the bot or the console, see
    # ``guildtune.cli_train.cmd_worker``): the training children inherit it ignored, where a
    # handler here would leave them Python's KeyboardInterrupt.
    main_thread = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)
                if main_thread and not (s == signal.SIGINT
                                        and signal.getsignal(s) is signal.SIG_IGN)}
    try:
        if parent_pid is not None:
            watch_parent(parent_pid)
        log.info("worker pid %s ready%s", os.getpid(),
                 f" (stops when pid {parent_pid} ends)" if parent_pid is not None else "")
        result: dict[str, Any] = {}

        def main() -> None:
            try:
                result["report"] = run_worker(cfg, once=once, stop=stop, store=store)
            except BaseException as exc:  # re-raised in the main thread
                result["error"] = exc

        thread = threading.Thread(target=main, name="guildtune-worker")
        thread.start()
        deadline: float | None = None
        while thread.is_alive():
            thread.join(SIGNAL_POLL_S)
            if signalled and not stop.is_set():
                log.warning("%s: stopping the worker (the run in progress is given back)",
                            signal.Signals(signalled[0]).name)
                stop.set()
            if stop.is_set():
                deadline = deadline or time.monotonic() + STOP_GRACE_S
                if time.monotonic() > deadline:
                    log.error("the worker did not stop within %.0f s: exiting now",
                              STOP_GRACE_S)
                    os._exit(1)
        if "error" in result:
            raise result["error"]
        return result["report"]
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def worker_process_main(config_path: str | None = None) -> None:  # pragma: no cover - manual use
    """``python -m trainer.worker [config.toml]``: a standalone worker."""
    from guildtune.config import load_config

    logging.basicConfig(level=logging.INFO)
    run_worker_process(load_config(config_path))


if __name__ == "__main__":  # pragma: no cover
    worker_process_main(sys.argv[1] if len(sys.argv) > 1 else None)
