"""Append-only schema migrations. Never edit one that has shipped: add the next.

Conventions (from simonw/llm): ``_utc`` columns hold ISO-8601 UTC text with milliseconds,
``_json`` columns hold JSON, ``_ms`` columns milliseconds. Every table with community data has
``guild_id``; no query in this package crosses guilds unless it is a per-user verb the user asked
for (export or forget across all guilds).
"""

from __future__ import annotations

from sqlite_utils import Database, Migrations

migrations = Migrations("guildtune")


def _run_script(db: Database, script: str) -> None:
    """Run DDL statement by statement: ``executescript`` would COMMIT the migration's transaction."""
    lines = [line.split("--", 1)[0] for line in script.splitlines()]
    for statement in "\n".join(lines).split(";"):
        if statement.strip():
            db.execute(statement)


@migrations()
def m001_initial(db: Database) -> None:
    """The consent-gated store: settings, consents, what was said, feedback, the run queue and
    the adapter registry."""
    _run_script(
        db,
        """
        -- Per-guild switches set by the guild's admins. Training stays off until an admin turns
        -- it on (and the operator has enabled training in config).
        CREATE TABLE guild_settings (
            guild_id INTEGER PRIMARY KEY,
            training_enabled INTEGER NOT NULL DEFAULT 0,
            logging_enabled INTEGER NOT NULL DEFAULT 1,
            learn_from_humans INTEGER NOT NULL DEFAULT 0,
            schedule TEXT,
            persona TEXT,
            channels_json TEXT NOT NULL DEFAULT '[]',
            updated_utc TEXT NOT NULL
        );

        -- A member's opt-in. Revoking deletes the row; nothing of a user without a row is stored.
        CREATE TABLE consents (
            guild_id INTEGER NOT NULL,
            user_id INTEGER NOT NULL,
            scope TEXT NOT NULL DEFAULT 'train' CHECK (scope IN ('train', 'import')),
            granted_utc TEXT NOT NULL,
            PRIMARY KEY (guild_id, user_id)
        );

        -- Human messages of consented members (imported history, or live chat when the guild
        -- learns from how members answer each other). reply_to links a reply to its parent.
        CREATE TABLE messages (
            guild_id INTEGER NOT NULL,
            message_id INTEGER NOT NULL,
            channel_id INTEGER NOT NULL DEFAULT 0,
            user_id INTEGER NOT NULL,
            text TEXT NOT NULL,
            reply_to_message_id INTEGER,
            source TEXT NOT NULL DEFAULT 'discord',
            created_utc TEXT NOT NULL,
            PRIMARY KEY (guild_id, message_id)
        );
        CREATE INDEX messages_user ON messages (guild_id, user_id);
        CREATE INDEX messages_reply_to ON messages (guild_id, reply_to_message_id);

        -- One bot exchange with a consented member: the context the model saw (non-consented
        -- authors already replaced by a placeholder) and the reply it gave.
        CREATE TABLE interactions (
            id TEXT PRIMARY KEY,
            guild_id INTEGER NOT NULL,
            channel_id INTEGER NOT NULL,
            user_id INTEGER NOT NULL,
            request_message_id INTEGER,
            reply_message_id INTEGER,
            context_json TEXT NOT NULL,
            reply TEXT NOT NULL,
            adapter_version INTEGER,
            tokens_in INTEGER NOT NULL DEFAULT 0,
            tokens_out INTEGER NOT NULL DEFAULT 0,
            latency_ms REAL NOT NULL DEFAULT 0,
            created_utc TEXT NOT NULL,
            updated_utc TEXT NOT NULL
        );
        CREATE INDEX interactions_guild_time ON interactions (guild_id, created_utc);
        CREATE INDEX interactions_user ON interactions (guild_id, user_id);
        CREATE INDEX interactions_request ON interactions (guild_id, request_message_id);
        CREATE INDEX interactions_reply ON interactions (guild_id, reply_message_id);

        -- A rating of a bot reply; one per member and interaction (a new one replaces it).
        CREATE TABLE feedback (
            interaction_id TEXT NOT NULL REFERENCES interactions (id) ON DELETE CASCADE,
            guild_id INTEGER NOT NULL,
            user_id INTEGER NOT NULL,
            rating INTEGER NOT NULL CHECK (rating IN (-1, 1)),
            created_utc TEXT NOT NULL,
            PRIMARY KEY (interaction_id, user_id)
        );
        CREATE INDEX feedback_user ON feedback (guild_id, user_id);

        -- A better reply written by a member for an interaction: a weighted training target.
        CREATE TABLE corrections (
            id TEXT PRIMARY KEY,
            interaction_id TEXT NOT NULL REFERENCES interactions (id) ON DELETE CASCADE,
            guild_id INTEGER NOT NULL,
            user_id INTEGER NOT NULL,
            text TEXT NOT NULL,
            created_utc TEXT NOT NULL
        );
        CREATE INDEX corrections_interaction ON corrections (interaction_id);
        CREATE INDEX corrections_user ON corrections (guild_id, user_id);

        -- The training queue. The row is the truth: a worker holds a lease it renews with
        -- heartbeats; a run whose lease expired is recovered as failed (and retried once).
        CREATE TABLE training_runs (
            id INTEGER PRIMARY KEY,
            guild_id INTEGER NOT NULL,
            trigger TEXT NOT NULL,
            requested_by INTEGER,
            force INTEGER NOT NULL DEFAULT 0,
            attempt INTEGER NOT NULL DEFAULT 1,
            status TEXT NOT NULL DEFAULT 'queued'
                CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'rejected')),
            worker TEXT,
            lease_expires_utc TEXT,
            heartbeat_utc TEXT,
            progress_json TEXT,
            metrics_json TEXT,
            error TEXT,
            version INTEGER,
            created_utc TEXT NOT NULL,
            started_utc TEXT,
            finished_utc TEXT
        );
        -- At most one queued or running run per guild: deduplication held by the database.
        CREATE UNIQUE INDEX training_runs_one_open ON training_runs (guild_id)
            WHERE status IN ('queued', 'running');
        CREATE INDEX training_runs_guild ON training_runs (guild_id, id);

        -- Published adapter versions of a guild. tainted_utc marks a version trained on data of
        -- a member who has since asked to be forgotten; it is never rolled back to.
        CREATE TABLE adapter_versions (
            guild_id INTEGER NOT NULL,
            version INTEGER NOT NULL,
            path TEXT NOT NULL,
            status TEXT NOT NULL DEFAULT 'candidate'
                CHECK (status IN ('candidate', 'active', 'retired', 'rejected', 'tainted')),
            base_model TEXT NOT NULL,
            lora_json TEXT NOT NULL,
            metrics_json TEXT NOT NULL DEFAULT '{}',
            config_json TEXT NOT NULL DEFAULT '{}',
            data_fingerprint TEXT NOT NULL DEFAULT '',
            n_examples INTEGER NOT NULL DEFAULT 0,
            run_id INTEGER,
            created_utc TEXT NOT NULL,
            activated_utc TEXT,
            tainted_utc TEXT,
            PRIMARY KEY (guild_id, version)
        );
        CREATE UNIQUE INDEX adapter_versions_one_active ON adapter_versions (guild_id)
            WHERE status = 'active';

        -- Whose data each version was trained on, so that forgetting reaches the model.
        CREATE TABLE adapter_contributors (
            guild_id INTEGER NOT NULL,
            version INTEGER NOT NULL,
            user_id INTEGER NOT NULL,
            n_examples INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (guild_id, version, user_id),
            FOREIGN KEY (guild_id, version) REFERENCES adapter_versions (guild_id, version)
                ON DELETE CASCADE
        );
        CREATE INDEX adapter_contributors_user ON adapter_contributors (user_id);
        """
    )


@migrations()
def m002_rerun_after_forget(db: Database) -> None:
    """A forget (or an opt-out) that lands while a run of the guild is in flight flags it: the
    run's result is not served, and a retrain without the member is queued when it ends."""
    _run_script(
        db,
        """
        ALTER TABLE training_runs ADD COLUMN rerun INTEGER NOT NULL DEFAULT 0;
        """
    )


@migrations()
def m003_stamp_undated_times(db: Database) -> None:
    """Imports stored a community file's ``time`` verbatim, often a time of day such as
    ``"01:00"``; the retention job compared it as a string and deleted the whole history a minute
    after the next start. Every ``created_utc`` of messages and interactions (the tables the
    retention period applies to) that is not in the stored form is repaired: a date-time is
    rewritten in the stored form (the same instant), anything else (a time of day, empty text)
    is set to this migration's time, so the retention clock of that row starts now instead of
    deleting it."""
    from .times import parse_utc, to_utc, utc_now

    now = utc_now()
    stored_form = ("[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:"
                   "[0-9][0-9].[0-9][0-9][0-9]Z")
    for table in ("messages", "interactions"):
        rows = db.execute(f"SELECT rowid, created_utc FROM {table} WHERE created_utc NOT GLOB ?",
                          [stored_form]).fetchall()
        fixed = []
        for rowid, value in rows:
            try:
                parse_utc(value)
                fixed.append((to_utc(value), rowid))
            except (TypeError, ValueError):
                fixed.append((now, rowid))
        if fixed:
            db.conn.executemany(f"UPDATE {table} SET created_utc = ? WHERE rowid = ?", fixed)


@migrations()
def m004_imports(db: Database) -> None:
    """Which community files each guild imported (a hash of the file's bytes): importing the
    same file again stores nothing and says so. No member data: file name and counts only."""
    _run_script(
        db,
        """
        CREATE TABLE imports (
            guild_id INTEGER NOT NULL,
            source_sha256 TEXT NOT NULL,
            file_name TEXT NOT NULL,
            messages INTEGER NOT NULL,
            stored INTEGER NOT NULL,
            imported_utc TEXT NOT NULL,
            PRIMARY KEY (guild_id, source_sha256)
        );
        """
    )


@migrations()
def m005_withdrawn(db: Database) -> None:
    """Who asked to be forgotten or opted out, as a one-way key, so that an import of old
    history cannot bring them back. ``user_key`` is sha256 of ``"<guild_id>:<user_id>"``
    (guild_id 0: a forget in every guild); no text. The member's own new opt-in in a guild
    lifts that guild's key (a forget everywhere still keeps imports out of other guilds);
    ``withdrawn_utc`` stays the line before which nothing of theirs trains again."""
    _run_script(
        db,
        """
        CREATE TABLE withdrawn (
            guild_id INTEGER NOT NULL,
            user_key TEXT NOT NULL,
            reason TEXT NOT NULL CHECK (reason IN ('forget', 'opt-out')),
            withdrawn_utc TEXT NOT NULL,
            lifted_utc TEXT,
            PRIMARY KEY (guild_id, user_key)
        );
        """
    )
