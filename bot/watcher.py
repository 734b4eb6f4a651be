"""Hot swap: ``AdapterWatcher`` keeps the engine serving the versions storage names active.

The trainer publishes and the admins roll back in another process; the bot learns of it only
through SQLite, by polling. One guild's broken adapter never stops the others' swaps, and a
served version found tainted is withdrawn when its replacement cannot load.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from bot.engine import AdapterError
from bot.services import Services

log = logging.getLogger(__name__)


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel a polling task and wait until it has ended (None: nothing to stop)."""
    if task is not None:
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass


async def poll_forever(step: Callable[[], Awaitable[Any]], interval: Callable[[], float],
                       what: str) -> None:
    """Run ``step`` every ``interval()`` seconds until cancelled; a failed step is logged and
    the polling goes on (the watcher's and the console's loops)."""
    while True:
        try:
            await step()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s failed", what)
        await asyncio.sleep(interval())


class AdapterWatcher:
    """Keeps the engine serving what storage says is active (new versions, rollbacks).

    Polls ``store.active_versions()`` every ``interval`` seconds: the trainer runs in another
    process and meets the bot only through SQLite. A guild whose activation fails (an
    AdapterError, or anything unexpected) is logged and keeps its old version; the other guilds'
    swaps and deactivations in the same poll go on. ``_failed`` is the one home of the backoff
    rule: the same (guild, version) is not retried until storage names another version.

    ``serves(guild_id)``, when given, says which guilds this process answers (a shard process:
    the guilds on its shards); the others' versions are neither loaded nor kept.
    """

    def __init__(self, services: Services, interval: float = 5.0,
                 notify: Callable[[int, str], Awaitable[None]] | None = None,
                 serves: Callable[[int], bool] | None = None) -> None:
        self.s = services
        self.serves = serves
        self.interval = interval
        self.notify = notify
        self._task: asyncio.Task[None] | None = None
        self._failed: dict[int, int] = {}  # guild -> version whose activation failed
        self._stuck: set[int] = set()  # guilds whose deactivation failed (retried every poll)
        self._lock = asyncio.Lock()  # one poll at a time: a change is made and told once

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Start polling (inside the running loop)."""
        if not self.running:
            self._task = asyncio.get_running_loop().create_task(self._loop(),
                                                               name="guildtune-adapter-watcher")

    async def stop(self) -> None:
        """Stop polling and wait until the task has ended."""
        task, self._task = self._task, None
        await cancel_and_wait(task)

    async def _loop(self) -> None:
        # Keep watching: a bad poll must not end hot swapping.
        await poll_forever(self.sync_once, lambda: self.interval, "adapter watcher poll")

    async def _withdrawn(self, guild_id: int, version: int | None) -> bool:
        """Whether a served version must not go on serving: tainted, or unknown to storage."""
        if version is None:
            return False
        info = await asyncio.to_thread(self.s.store.get_version, guild_id, version)
        return info is None or info.tainted_utc is not None

    async def sync_once(self) -> list[str]:
        """One poll: bring the engine in line with storage. Returns what changed, as lines.
        A front end may call it besides the loop (a rollback, the console's /wait): polls
        take turns."""
        async with self._lock:
            return await self._sync()

    async def _sync(self) -> list[str]:
        wanted = await asyncio.to_thread(self.s.store.active_versions)
        if self.serves is not None:
            wanted = {g: v for g, v in wanted.items() if self.serves(g)}
        serving = self.s.engine.active_versions()
        # Forget failures the store has moved on from: a version named again later is retried.
        self._failed = {g: v for g, v in self._failed.items() if g in wanted and
                        wanted[g][0] == v}
        changes: list[tuple[int, str]] = []
        for guild_id, (version, path) in sorted(wanted.items()):
            if serving.get(guild_id) == version or self._failed.get(guild_id) == version:
                continue
            try:
                await self.s.engine.activate(guild_id, version, path)
            except Exception as exc:  # one guild's adapter must not stop the others' swaps
                self._failed[guild_id] = version
                keeping = serving.get(guild_id, "the base model")
                if isinstance(exc, AdapterError):
                    log.error("guild %s: cannot activate adapter v%s (%s); keeping %s",
                              guild_id, version, exc, keeping)
                    why = str(exc)
                else:  # a bug, not a bad file: keep the traceback, still contain it
                    log.exception("guild %s: activating adapter v%s failed unexpectedly; "
                                  "keeping %s", guild_id, version, keeping)
                    why = f"internal error: {type(exc).__name__}"
                if await self._withdrawn(guild_id, serving.get(guild_id)):
                    # The version it would keep learned from a member who was forgotten or
                    # opted out: the base model serves instead until a loadable one arrives.
                    try:
                        await self.s.engine.deactivate(guild_id)
                        serving.pop(guild_id, None)
                    except Exception:
                        log.exception("guild %s: deactivating a withdrawn version failed",
                                      guild_id)
                    changes.append((guild_id, f"⚠️ v{version} could not be loaded ({why}); "
                                              "serving the base model."))
                    continue
                changes.append((guild_id, f"⚠️ v{version} could not be loaded ({why}); still "
                                          "serving the previous version."))
                continue
            self._failed.pop(guild_id, None)
            log.info("guild %s: now serving adapter v%s", guild_id, version)
            changes.append((guild_id, f"Now serving model v{version}."))
        for guild_id in sorted(set(serving) - set(wanted)):
            try:
                await self.s.engine.deactivate(guild_id)
            except Exception:  # retried every poll: the guild asked to leave its adapter
                if guild_id not in self._stuck:
                    self._stuck.add(guild_id)
                    log.exception("guild %s: deactivating its adapter failed; retrying every "
                                  "poll", guild_id)
                continue
            self._stuck.discard(guild_id)
            log.info("guild %s: back on the base model", guild_id)
            changes.append((guild_id, "Back on the base model."))
        try:
            await self.s.engine.release_others(set(wanted))
        except Exception:  # leftovers only cost memory; the next poll tries again
            log.warning("releasing adapters of guilds without a version failed", exc_info=True)
        if self.notify is not None:
            for guild_id, line in changes:
                try:
                    await self.notify(guild_id, line)
                except Exception:  # the admin log is optional; swapping already happened
                    log.exception("admin log post failed")
        return [line for _, line in changes]
