"""The training queue: runs enqueued by the schedulers and admins, claimed by workers under a
lease that a heartbeat renews, finished once, and recovered when a worker stops renewing it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from .db import StoreBase, StoreError, _writes, row_locks
from .times import format_utc as _utc
from .times import utc_now

RUN_STATUSES = ("queued", "running", "succeeded", "failed", "rejected")


@dataclass(frozen=True)
class Run:
    id: int
    guild_id: int
    trigger: str
    requested_by: int | None
    force: bool
    attempt: int
    status: str
    worker: str | None
    lease_expires_utc: str | None
    heartbeat_utc: str | None
    progress: dict[str, Any] | None
    metrics: dict[str, Any] | None
    error: str | None
    version: int | None
    created_utc: str
    started_utc: str | None
    finished_utc: str | None

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Run:
        return cls(
            id=row["id"], guild_id=row["guild_id"], trigger=row["trigger"],
            requested_by=row["requested_by"], force=bool(row["force"]), attempt=row["attempt"],
            status=row["status"], worker=row["worker"],
            lease_expires_utc=row["lease_expires_utc"], heartbeat_utc=row["heartbeat_utc"],
            progress=json.loads(row["progress_json"]) if row["progress_json"] else None,
            metrics=json.loads(row["metrics_json"]) if row["metrics_json"] else None,
            error=row["error"], version=row["version"], created_utc=row["created_utc"],
            started_utc=row["started_utc"], finished_utc=row["finished_utc"],
        )


class QueueMixin(StoreBase):
    """The run queue (verbs of ``Store``). Uses the registry's ``active_version`` and
    ``rollback``, on ``Store``."""

    @_writes
    def enqueue_run(self, guild_id: int, trigger: str, requested_by: int | None = None,
                    force: bool = False, attempt: int = 1) -> tuple[int, bool]:
        """Queue a training run. Returns (run id, created): an open run of the guild is reused."""
        existing = self._scalar("SELECT id FROM training_runs WHERE guild_id = ? AND status IN "
                                "('queued', 'running')", [guild_id])
        if existing is not None:
            if force:
                self.db.execute("UPDATE training_runs SET force = 1 WHERE id = ?", [existing])
            return existing, False
        run_id = self.db.execute(
            "INSERT INTO training_runs (guild_id, trigger, requested_by, force, attempt, status, "
            "created_utc) VALUES (?, ?, ?, ?, ?, 'queued', ?) RETURNING id",
            [guild_id, trigger, requested_by, int(force), attempt, utc_now()]).fetchone()[0]
        return int(run_id), True

    @_writes
    @row_locks
    def claim_run(self, worker: str, lease_seconds: int = 120,
                  guild_id: int | None = None) -> Run | None:
        """Atomically take the oldest queued run (optionally of one guild) with a lease."""
        where_g = "" if guild_id is None else " AND guild_id = ?"
        row = self._one("SELECT id FROM training_runs WHERE status = 'queued'" + where_g +
                        " ORDER BY id LIMIT 1" + self._claim_filter(),
                        [] if guild_id is None else [guild_id])
        if row is None:
            return None
        now = datetime.now(UTC)
        took = self.db.execute(
            "UPDATE training_runs SET status = 'running', worker = ?, started_utc = ?, "
            "heartbeat_utc = ?, lease_expires_utc = ? WHERE id = ? AND status = 'queued'",
            [worker, _utc(now), _utc(now), _utc(now + timedelta(seconds=lease_seconds)),
             row["id"]]).rowcount
        return self.get_run(row["id"]) if took == 1 else None  # never another worker's run

    @_writes
    def heartbeat(self, run_id: int, worker: str, lease_seconds: int = 120,
                  progress: dict[str, Any] | None = None) -> bool:
        """Renew the lease (and store progress). False when the run is no longer this worker's."""
        now = datetime.now(UTC)
        sets = "heartbeat_utc = ?, lease_expires_utc = ?"
        params: list[Any] = [_utc(now), _utc(now + timedelta(seconds=lease_seconds))]
        if progress is not None:
            sets += ", progress_json = ?"
            params.append(json.dumps(progress))
        cur = self.db.execute(f"UPDATE training_runs SET {sets} WHERE id = ? AND worker = ? AND "
                              "status = 'running'", [*params, run_id, worker])
        return cur.rowcount == 1

    @_writes
    def finish_run(self, run_id: int, status: str, *, metrics: dict[str, Any] | None = None,
                   error: str | None = None, version: int | None = None,
                   worker: str | None = None) -> bool:
        """Close a run as succeeded, failed or rejected. False if a worker lost its lease."""
        if status not in ("succeeded", "failed", "rejected"):
            raise StoreError(f"a run cannot finish as {status!r}")
        sql = ("UPDATE training_runs SET status = ?, metrics_json = ?, error = ?, version = ?, "
               "finished_utc = ?, lease_expires_utc = NULL WHERE id = ? AND status = 'running'")
        params: list[Any] = [status, json.dumps(metrics) if metrics is not None else None,
                             error, version, utc_now(), run_id]
        if worker is not None:
            sql += " AND worker = ?"
            params.append(worker)
        if self.db.execute(sql, params).rowcount != 1:
            return False
        self._after_run(run_id)
        return True

    def _after_run(self, run_id: int) -> None:
        """What forgetting owes a guild once one of its runs ends (in the caller's
        transaction): a run a forget or an opt-out landed in is followed by a retrain without
        them, and a tainted version still active (``strict_forget`` off) stops serving now."""
        row = self._one("SELECT guild_id, rerun FROM training_runs WHERE id = ?", [run_id])
        if row is None:
            return
        if row["rerun"]:
            self.enqueue_run(row["guild_id"], "forget")
        active = self.active_version(row["guild_id"])
        if active is not None and active.tainted_utc is not None:
            self.rollback(row["guild_id"])

    @_writes
    def recover_stale_runs(self, now: datetime | None = None, max_attempts: int = 2) -> list[int]:
        """Fail runs whose worker stopped renewing its lease; requeue each once. Returns ids."""
        stamp = _utc(now or datetime.now(UTC))
        stale = self._rows("SELECT * FROM training_runs WHERE status = 'running' AND "
                           "lease_expires_utc < ?", [stamp])
        for r in stale:
            self.db.execute(
                "UPDATE training_runs SET status = 'failed', finished_utc = ?, "
                "lease_expires_utc = NULL, error = ? WHERE id = ?",
                [stamp, f"worker {r['worker']} stopped (lease expired {r['lease_expires_utc']})",
                 r["id"]])
            if r["attempt"] < max_attempts:
                self.enqueue_run(r["guild_id"], r["trigger"], r["requested_by"],
                                 bool(r["force"]), attempt=r["attempt"] + 1)
            self._after_run(r["id"])  # a rerun owed is queued whatever the attempts
        return [r["id"] for r in stale]

    def get_run(self, run_id: int) -> Run | None:
        row = self._one("SELECT * FROM training_runs WHERE id = ?", [run_id])
        return Run.from_row(row) if row else None

    def runs(self, guild_id: int, limit: int = 10) -> list[Run]:
        return [Run.from_row(r) for r in self._rows(
            "SELECT * FROM training_runs WHERE guild_id = ? ORDER BY id DESC LIMIT ?",
            [guild_id, limit])]

    def open_run(self, guild_id: int) -> Run | None:
        row = self._one("SELECT * FROM training_runs WHERE guild_id = ? AND status IN "
                        "('queued', 'running')", [guild_id])
        return Run.from_row(row) if row else None
