"""The adapter slots of a local engine: which version each guild serves and which are loaded.

``AdapterSlots`` holds the policy, in the spirit of vLLM's ``lora/worker_manager.py``: the
version each guild should serve (with its directory, so an evicted adapter can reload), the
adapters resident in the model in least-recently-used order under a cap, load, hot swap of a
resident guild's new version, eviction, and the rebuild of a slot when a swap fails. The model
side is behind ``AdapterBackend`` (load, hot swap from files or from weights prepared off the
model thread, delete), so the policy is tested
with a fake and no model (tests/test_engine_slots.py); ``PeftAdapters`` in bot/engine/peft_adapters.py
is the real one.

Not thread-safe: only the model thread calls it, between batches, except ``versions`` and
``resident``, which return copies for other threads to read.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Collection
from pathlib import Path
from typing import Any, Protocol

from bot.engine.base import BASE_ADAPTER, AdapterError, adapter_name

log = logging.getLogger(__name__)


class AdapterBackend(Protocol):
    """The model side of the slots. Names are ``adapter_name(guild_id)``."""

    def load(self, name: str, path: Path) -> None:
        """Load the adapter at ``path`` under ``name``; on failure raise and leave no adapter
        of that name behind."""

    def hotswap(self, name: str, path: Path) -> None:
        """Replace the weights of the loaded adapter ``name`` in place. May fail half way
        (the slot is then unusable until deleted)."""

    def swap_prepared(self, name: str, prepared: Any) -> bool:
        """Copy weights read earlier (off the model thread) into the loaded adapter ``name``.
        Return False, changing nothing, when they do not fit it (a key or shape differs: the
        slots then use ``hotswap``); may fail half way like ``hotswap``."""

    def delete(self, name: str) -> None:
        """Unload the adapter ``name``."""


class AdapterSlots:
    """Per-guild adapter versions over a backend holding at most ``capacity`` of them."""

    def __init__(self, backend: AdapterBackend, capacity: int) -> None:
        self._backend = backend
        self._capacity = capacity
        self._wanted: dict[int, tuple[int, Path]] = {}  # guild -> (version, dir) it should serve
        self._resident: OrderedDict[int, int] = OrderedDict()  # guild -> loaded version, LRU
        self._versions: dict[int, int] = {}  # published copy for other threads
        # Guilds whose adapters no load may evict now (the step loop sets it around a control
        # to the guilds with running rows).
        self.pinned: frozenset[int | None] = frozenset()

    # -- reads ----------------------------------------------------------------------------------

    def versions(self) -> dict[int, int]:
        """Guild id -> the version it serves, resident or not (a copy; any thread)."""
        return dict(self._versions)

    def resident(self) -> list[int]:
        """Guilds whose adapter is loaded now, least recently used first."""
        return list(self._resident)

    def wants(self, guild_id: int | None) -> bool:
        """Whether the guild is served by an adapter (else by the base model)."""
        return guild_id in self._wanted

    # -- serving --------------------------------------------------------------------------------

    def serving(self, guild_id: int | None,
                protect: Collection[int | None] = ()) -> tuple[str, int | None]:
        """The adapter name and version that serve the guild now, reloading an evicted adapter
        on demand (never evicting a guild in ``protect``: the rest of the current batch).

        A guild whose files vanished since activation is served by the base model from now on
        (``BASE_ADAPTER``, None) and is no longer wanted.
        """
        if guild_id is None or guild_id not in self._wanted:
            return BASE_ADAPTER, None
        version, path = self._wanted[guild_id]
        if self._resident.get(guild_id) != version:
            try:
                self._load(guild_id, version, path, protect=protect)
            except Exception as exc:
                # Files vanished since activation: answer from the base model rather than fail,
                # and stop wanting that version. Otherwise every request of the guild retries
                # the load, logs again and evicts another guild's adapter to make room; now
                # versions() tells the truth and the AdapterWatcher re-activates (or reports
                # the broken version) once.
                log.error("guild %s: cannot reload adapter v%s (%s); serving base model",
                          guild_id, version, exc)
                self._wanted.pop(guild_id, None)
                self._publish()
                return BASE_ADAPTER, None
        self._resident.move_to_end(guild_id)
        return adapter_name(guild_id), version

    def trim(self, protect: Collection[int | None] = (), room: int = 0) -> None:
        """Evict least recently used adapters (not in ``protect``) until at most
        ``capacity - room`` are resident."""
        cap = self._capacity - room
        for gid in list(self._resident):
            if len(self._resident) <= cap:
                break
            if gid in protect:
                continue
            self._backend.delete(adapter_name(gid))
            del self._resident[gid]
            log.debug("guild %s: adapter evicted (LRU)", gid)

    # -- changes --------------------------------------------------------------------------------

    def activate(self, guild_id: int, version: int, path: Path, prepared: Any = None) -> None:
        """Serve ``version`` (a validated directory) for the guild: a hot swap when the guild's
        slot is resident (from ``prepared``, the version's weights read off the model thread,
        when given and they fit; else from the files), else a load. Raises AdapterError when it
        fails; the guild then keeps its previous version (its slot rebuilt from that version's
        directory)."""
        if self._wanted.get(guild_id) == (version, path) and \
                self._resident.get(guild_id) == version:
            # Already serving exactly this version (two pollers raced): versions are immutable,
            # so there is nothing to swap.
            return
        if guild_id in self._resident:
            self._swap(guild_id, version, path, prepared)
        else:
            self._load(guild_id, version, path, protect={guild_id})
        self._wanted[guild_id] = (version, path)
        self._publish()

    def deactivate(self, guild_id: int) -> None:
        """Unload the guild's adapter; it is served by the base model from now on."""
        if guild_id in self._resident:
            self._backend.delete(adapter_name(guild_id))
            del self._resident[guild_id]
        self._wanted.pop(guild_id, None)
        self._publish()
        log.info("guild %s: adapter deactivated, serving base model", guild_id)

    # -- internals ------------------------------------------------------------------------------

    def _publish(self) -> None:
        self._versions = {g: v for g, (v, _) in self._wanted.items()}

    def _load(self, guild_id: int, version: int, path: Path,
              protect: Collection[int | None]) -> None:
        self.trim({*protect, *self.pinned}, room=1)
        t0 = time.perf_counter()
        try:
            self._backend.load(adapter_name(guild_id), path)
        except Exception as exc:
            raise AdapterError(f"adapter for guild {guild_id} v{version} at {path}: "
                               f"load failed ({type(exc).__name__}: {exc})") from None
        self._resident[guild_id] = version
        self._resident.move_to_end(guild_id)
        log.info("guild %s: loaded adapter v%s in %.0f ms", guild_id, version,
                 (time.perf_counter() - t0) * 1000)

    def _swap(self, guild_id: int, version: int, path: Path, prepared: Any = None) -> None:
        name = adapter_name(guild_id)
        t0 = time.perf_counter()
        how = "prepared weights"
        try:
            if prepared is None or not self._backend.swap_prepared(name, prepared):
                if prepared is not None:
                    log.warning("guild %s: prepared weights of v%s do not fit the resident "
                                "adapter; hot-swapping from the files", guild_id, version)
                how = "files"
                self._backend.hotswap(name, path)
        except Exception as exc:
            # A hot swap is not atomic: rebuild the slot from the previous version.
            self._backend.delete(name)
            del self._resident[guild_id]
            old = self._wanted.get(guild_id)
            if old is not None:
                try:
                    self._load(guild_id, old[0], old[1], protect={guild_id})
                except AdapterError:
                    log.error("guild %s: previous adapter v%s failed to reload too",
                              guild_id, old[0])
            raise AdapterError(f"adapter for guild {guild_id} v{version} at {path}: hot "
                               f"swap failed ({type(exc).__name__}: {exc})") from None
        self._resident[guild_id] = version
        self._resident.move_to_end(guild_id)
        log.info("guild %s: hot-swapped to v%s in %.1f ms (%s)", guild_id, version,
                 (time.perf_counter() - t0) * 1000, how)
