"""The training worker: claims queued runs from the store and trains them one after another.

Each run trains in a child process (multiprocessing ``spawn``): an OOM or a crash in torch ends
the child, not the worker or the bot that started it, and the child's exit returns all GPU
memory. The parent holds the run's lease and renews it with a heartbeat that also stores the
child's progress on the run row. If the worker itself is killed, its child notices that its
parent is gone and exits before publishing; the lease expires and ``recover_stale_runs`` (at
start, and periodically, in any worker) fails the run and requeues it once.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue as queue_mod
import signal
import socket
import threading
import time
import traceback
from typing import TYPE_CHECKING, Any

from .pipeline import OPERATOR_DISABLED, TrainingError

if TYPE_CHECKING:
    from guildtune.config import Config
    from storage import Run, Store

log = logging.getLogger(__name__)

RECOVER_EVERY_S = 30.0
STALE_TEMP_DIR_S = 600.0


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


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

    def update(self, progress: dict[str, Any]) -> None:
        self._progress = dict(progress)
        self._dirty.set()

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
            try:
                ok = self.store.heartbeat(self.run_id, self.worker, self.lease,
                                          progress=self._progress)
            except Exception:  # a busy db must not kill the heartbeat; the lease has slack
                log.exception("heartbeat for run %s failed", self.run_id)
                ok = True
            last = time.monotonic()
            if not ok:
                log.warning("run %s: lease lost; stopping", self.run_id)
                self.lost.set()
                return

    def stop(self) -> None:
        self._halt.set()
        self._dirty.set()
        self.join(timeout=5)


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
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from storage import open_store

    from .pipeline import train_guild

    store = open_store(cfg.db_path, busy_timeout_ms=cfg.storage.busy_timeout_ms,
                       write_retries=cfg.storage.write_retries)
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

    try:
        res = train_guild(store, cfg, guild_id, force=force, run_id=run_id,
                          model_name=model_name, progress=progress, should_stop=should_stop)
        out.put(("result", {"status": res.status, "version": res.version,
                            "metrics": res.metrics, "reason": res.reason}))
    except TrainingError as exc:
        out.put(("error", str(exc)))
    except BaseException as exc:  # report anything; the parent turns it into a failed run
        log.error("run %s crashed:\n%s", run_id, traceback.format_exc())
        out.put(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        store.close()


# -- the parent side ----------------------------------------------------------------------------

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


def execute_run(store: Store, cfg: Config, run: Run, worker: str, *,
                model_name: str | None = None, isolate: bool = True) -> str:
    """Train a claimed run and close it. Returns the final status.

    ``isolate`` (the default) trains in a child process, so an out-of-memory or a crash never
    takes the caller down and GPU memory is returned after each run; ``isolate=False`` trains in
    this process (the one-process demo, where the model libraries are already imported).
    """
    if not cfg.training.enabled:
        store.finish_run(run.id, "failed", error=OPERATOR_DISABLED, worker=worker)
        return "failed"
    if not run.force and not store.guild_settings(run.guild_id).training_enabled:
        store.finish_run(run.id, "failed", worker=worker,
                         error=f"training is off for guild {run.guild_id}")
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
    beat.start()
    child.start()
    log.info("run %s (guild %s): training in child pid %s", run.id, run.guild_id, child.pid)
    outcome: tuple[str, Any] | None = None
    try:
        while outcome is None:
            if beat.lost.is_set():
                child.terminate()
                child.join(10)
                return "lost"
            try:
                kind, payload = out.get(timeout=0.5)
            except queue_mod.Empty:
                if not child.is_alive():
                    # Drain what the child wrote just before exiting.
                    try:
                        kind, payload = out.get(timeout=1.0)
                    except queue_mod.Empty:
                        outcome = ("error", _death_reason(child.exitcode))
                        break
                else:
                    continue
            if kind == "progress":
                beat.update(payload)
            else:
                outcome = (kind, payload)
        child.join(30)
        if child.is_alive():
            child.kill()
    finally:
        beat.stop()
        out.close()
    kind, payload = outcome
    if kind == "result":
        status = payload["status"]
        store.finish_run(run.id, status, metrics=payload["metrics"], version=payload["version"],
                         error=None if status == "succeeded" else payload["reason"],
                         worker=worker)
        log.info("run %s (guild %s): %s %s", run.id, run.guild_id, status,
                 payload["version"] or payload["reason"])
        return status
    store.finish_run(run.id, "failed", error=str(payload)[:2000], worker=worker)
    log.warning("run %s (guild %s) failed: %s", run.id, run.guild_id, payload)
    return "failed"


def _train_here(store: Store, cfg: Config, run: Run, worker: str, *,
                model_name: str | None = None, progress: Any = None) -> Any:
    """Train a claimed run in this process under a heartbeat and close it. Returns the
    TrainResult; re-raises (after closing the run as failed) when it cannot train."""
    from .pipeline import train_guild

    beat = Heartbeat(store, run.id, worker, cfg.training.lease_seconds)
    beat.start()

    def on_progress(p: dict[str, Any]) -> None:
        beat.update(p)
        if progress is not None:
            progress(p)

    def should_stop() -> str | None:
        return "the run's lease was lost" if beat.lost.is_set() else None

    try:
        res = train_guild(store, cfg, run.guild_id, force=run.force, run_id=run.id,
                          model_name=model_name, progress=on_progress, should_stop=should_stop)
    except BaseException as exc:
        beat.stop()
        msg = str(exc) if isinstance(exc, TrainingError) else f"{type(exc).__name__}: {exc}"
        store.finish_run(run.id, "failed", error=msg[:2000], worker=worker)
        raise
    beat.stop()
    store.finish_run(run.id, res.status, metrics=res.metrics, version=res.version,
                     error=None if res.status == "succeeded" else res.reason, worker=worker)
    return res


def train_foreground(store: Store, cfg: Config, guild_id: int, *, force: bool = False,
                     requested_by: int | None = None, model_name: str | None = None,
                     progress: Any = None) -> tuple[int, Any]:
    """Queue a run for the guild, claim it here and train in this process (the CLI's
    ``train``): the queue still guarantees one run per guild. Returns (run id, TrainResult);
    raises TrainingError (the run is closed as failed) when it cannot train."""
    if not cfg.training.enabled:
        raise TrainingError(OPERATOR_DISABLED)
    worker = f"cli:{default_worker_id()}"
    run_id, _ = store.enqueue_run(guild_id, "cli", requested_by, force)
    run = store.claim_run(worker, cfg.training.lease_seconds, guild_id=guild_id)
    if run is None or run.id != run_id:
        raise TrainingError(f"guild {guild_id} already has a run in progress (run {run_id}); "
                            "wait for it or stop its worker")
    return run.id, _train_here(store, cfg, run, worker, model_name=model_name,
                               progress=progress)


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
               store: Store | None = None, isolate: bool = True) -> int:
    """Claim and train queued runs one after another until ``stop`` is set (or, with ``once``,
    until the queue is empty). Returns the number of runs handled."""
    from storage import open_store

    worker = worker_id or default_worker_id()
    stop = stop or threading.Event()
    own = store is None
    store = store or open_store(cfg.db_path, busy_timeout_ms=cfg.storage.busy_timeout_ms,
                                write_retries=cfg.storage.write_retries)
    handled = 0
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
                execute_run(store, cfg, run, worker, model_name=model_name, isolate=isolate)
                handled += 1
                continue
            if once:
                break
            stop.wait(cfg.training.poll_seconds)
    finally:
        if own:
            store.close()
    return handled


def worker_process_main(config_path: str | None = None) -> None:  # pragma: no cover - manual use
    """``python -m trainer.worker [config.toml]``: a standalone worker."""
    from guildtune.config import load_config

    logging.basicConfig(level=logging.INFO)
    run_worker(load_config(config_path))


if __name__ == "__main__":  # pragma: no cover
    import sys

    worker_process_main(sys.argv[1] if len(sys.argv) > 1 else None)
