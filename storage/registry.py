"""The adapter registry: each guild's published versions, which one serves, whose data each
holds, and the contributor check that keeps a version trained on a withdrawn member out.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .db import ConsentChangedError, StoreBase, StoreError, _writes
from .times import parse_utc, utc_now


@dataclass(frozen=True)
class AdapterVersion:
    guild_id: int
    version: int
    path: str
    status: str
    base_model: str
    lora: dict[str, Any]
    metrics: dict[str, Any]
    config: dict[str, Any]
    data_fingerprint: str
    n_examples: int
    run_id: int | None
    created_utc: str
    activated_utc: str | None
    tainted_utc: str | None

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> AdapterVersion:
        return cls(
            guild_id=row["guild_id"], version=row["version"], path=row["path"],
            status=row["status"], base_model=row["base_model"],
            lora=json.loads(row["lora_json"]), metrics=json.loads(row["metrics_json"]),
            config=json.loads(row["config_json"]), data_fingerprint=row["data_fingerprint"],
            n_examples=row["n_examples"], run_id=row["run_id"], created_utc=row["created_utc"],
            activated_utc=row["activated_utc"], tainted_utc=row["tainted_utc"],
        )


class RegistryMixin(StoreBase):
    """Adapter versions and the contributor check (verbs of ``Store``). Uses consent's
    ``_granted``, on ``Store``."""

    def next_version(self, guild_id: int) -> int:
        return int(self._scalar("SELECT coalesce(max(version), 0) + 1 FROM adapter_versions "
                                "WHERE guild_id = ?", [guild_id]))

    @_writes
    def register_version(self, guild_id: int, version: int, path: str, *, base_model: str,
                         lora: dict[str, Any], metrics: dict[str, Any] | None = None,
                         config: dict[str, Any] | None = None, data_fingerprint: str = "",
                         contributors: dict[int, int] | None = None, run_id: int | None = None,
                         status: str = "candidate", activate: bool = False,
                         dataset_utc: str | None = None) -> AdapterVersion:
        """Record a published version and whose data it holds; activate it in the same
        transaction when asked.

        Raises ConsentChangedError, registering nothing, when a contributor is no longer opted
        in, or opted in again after ``dataset_utc`` (when the training data was read): a
        version that learned from a member who has since been forgotten or opted out is never
        registered, so it can neither serve nor be rolled back to.
        """
        self.check_contributors(guild_id, contributors or {}, dataset_utc)
        if run_id is not None and self._scalar(
                "SELECT status FROM training_runs WHERE id = ?", [run_id]) not in (None,
                                                                                 "running"):
            # Its lease expired and the run was recovered (failed, requeued): another worker
            # may be training the guild now. A late publisher must not register anything.
            raise StoreError(f"run {run_id} of guild {guild_id} is no longer running (its lease "
                             "was lost); its version is not kept")
        self.db.execute(
            "INSERT INTO adapter_versions (guild_id, version, path, status, base_model, "
            "lora_json, metrics_json, config_json, data_fingerprint, n_examples, run_id, "
            "created_utc) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [guild_id, version, str(path), status, base_model, json.dumps(lora, sort_keys=True),
             json.dumps(metrics or {}), json.dumps(config or {}), data_fingerprint,
             sum((contributors or {}).values()), run_id, utc_now()])
        self.db.conn.executemany(
            "INSERT INTO adapter_contributors (guild_id, version, user_id, n_examples) "
            "VALUES (?, ?, ?, ?)",
            [(guild_id, version, int(u), int(n)) for u, n in (contributors or {}).items()])
        if activate:
            self.activate_version(guild_id, version)
        return self.get_version(guild_id, version)  # type: ignore[return-value]

    def check_contributors(self, guild_id: int, contributors: Iterable[int],
                           dataset_utc: str | None = None) -> None:
        """Raise ConsentChangedError unless every contributor is opted in now and has been
        since ``dataset_utc`` (a forget followed by a new opt-in is not the same consent)."""
        users = {int(u) for u in contributors}
        granted = self._granted(guild_id, users)
        since = parse_utc(dataset_utc) if dataset_utc else None
        gone = [u for u in users if u not in granted or
                (since is not None and parse_utc(granted[u]) > since)]
        if gone:
            raise ConsentChangedError(
                f"guild {guild_id}: {len(gone)} member(s) whose data this version was trained on "
                "have since been forgotten or opted out; it is not kept, and a retrain without "
                "them follows")

    def newest_clean_version(self, guild_id: int) -> AdapterVersion | None:
        """The newest version that served and was not trained on a forgotten member: the bar a
        new candidate must beat (a tainted version never is)."""
        row = self._one(
            "SELECT * FROM adapter_versions WHERE guild_id = ? AND tainted_utc IS NULL AND "
            "status IN ('active', 'retired') AND activated_utc IS NOT NULL "
            "ORDER BY (status = 'active') DESC, version DESC LIMIT 1", [guild_id])
        return AdapterVersion.from_row(row) if row else None

    @_writes
    def activate_version(self, guild_id: int, version: int) -> AdapterVersion:
        """Make ``version`` the guild's active one; the previous active one is retired."""
        target = self.get_version(guild_id, version)
        if target is None:
            raise StoreError(f"guild {guild_id} has no adapter version {version}")
        if target.tainted_utc is not None:
            raise StoreError(f"version {version} of guild {guild_id} was trained on data of a "
                             "member who asked to be forgotten; it cannot be activated")
        self._retire_active(guild_id)
        self.db.execute("UPDATE adapter_versions SET status = 'active', activated_utc = ? "
                        "WHERE guild_id = ? AND version = ?", [utc_now(), guild_id, version])
        return self.get_version(guild_id, version)  # type: ignore[return-value]

    def _retire_active(self, guild_id: int) -> None:
        self.db.execute(
            "UPDATE adapter_versions SET status = CASE WHEN tainted_utc IS NULL THEN 'retired' "
            "ELSE 'tainted' END WHERE guild_id = ? AND status = 'active'", [guild_id])

    @_writes
    def set_version_status(self, guild_id: int, version: int, status: str) -> None:
        """Mark a non-active version (e.g. 'rejected' by the evaluation gate)."""
        if status not in ("candidate", "retired", "rejected"):
            raise StoreError(f"use activate_version/rollback, not status {status!r}")
        self.db.execute("UPDATE adapter_versions SET status = ? WHERE guild_id = ? AND "
                        "version = ? AND status != 'active'", [status, guild_id, version])

    @_writes
    def rollback(self, guild_id: int) -> AdapterVersion | None:
        """Retire the active version and activate the newest earlier clean one that was
        active before. Returns it, or None when the guild is back on the base model."""
        active = self.active_version(guild_id)
        if active is None:
            return None  # already on the base model: nothing to roll back (never a toggle)
        below = active.version
        prev = self._one(
            "SELECT version FROM adapter_versions WHERE guild_id = ? AND version < ? AND "
            "tainted_utc IS NULL AND status = 'retired' AND activated_utc IS NOT NULL "
            "ORDER BY version DESC LIMIT 1", [guild_id, below])
        self._retire_active(guild_id)
        if prev is None:
            return None
        return self.activate_version(guild_id, prev["version"])

    def get_version(self, guild_id: int, version: int) -> AdapterVersion | None:
        row = self._one("SELECT * FROM adapter_versions WHERE guild_id = ? AND version = ?",
                        [guild_id, version])
        return AdapterVersion.from_row(row) if row else None

    def active_version(self, guild_id: int) -> AdapterVersion | None:
        row = self._one("SELECT * FROM adapter_versions WHERE guild_id = ? AND "
                        "status = 'active'", [guild_id])
        return AdapterVersion.from_row(row) if row else None

    def versions(self, guild_id: int) -> list[AdapterVersion]:
        return [AdapterVersion.from_row(r) for r in self._rows(
            "SELECT * FROM adapter_versions WHERE guild_id = ? ORDER BY version", [guild_id])]

    def active_versions(self) -> dict[int, tuple[int, str]]:
        """guild -> (version, path) of every active version: what the bot should be serving."""
        return {r[0]: (r[1], r[2]) for r in self.db.execute(
            "SELECT guild_id, version, path FROM adapter_versions WHERE status = 'active'")}

    def contributors(self, guild_id: int, version: int) -> dict[int, int]:
        return {r[0]: r[1] for r in self.db.execute(
            "SELECT user_id, n_examples FROM adapter_contributors WHERE guild_id = ? AND "
            "version = ?", [guild_id, version])}
