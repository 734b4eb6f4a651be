"""What /tune status says: ``StatusReport``, built from the store's rows and rendered as fields.

The Cog turns the fields into an embed, the console and ``guildtune status`` into lines, so each
surface says the same. ``StatusReport.build`` turns what ``Core.status`` read (settings, stats,
runs, the active version) into the report; ``StatusReport.taint`` words a tainted active
version; ``like_rate_chart`` draws the like-rate chart (off the loop; a failure only drops it).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from guildtune.policy import operator_block, training_block
from guildtune.progress import gate_line, needed_line, progress_line

log = logging.getLogger(__name__)

FINISHED = ("succeeded", "failed", "rejected")  # a run's statuses once it has ended
ERROR_CHARS = 300  # of a failed run's error in "Last run" (the share cap's reason fits whole)
FIELD_CHARS = 1024  # what a Discord embed field holds
WORD_CHARS = 40  # a clip keeps whole words up to this long (a config key, a path)


@dataclass
class StatusReport:
    """/tune status, rendered as an embed (Discord) or lines (console)."""

    guild_id: int
    operator_training: bool
    guild_training: bool
    active_version: int | None
    active_since: str | None
    engine_version: int | None
    examples_since: int
    likes: int
    dislikes: int
    consented_users: int
    last_run: str
    running: str | None
    next_run: str
    schedule: str
    chart_png: bytes | None = None
    # Set when the active version is tainted: ``StatusReport.taint(...)``.
    tainted: dict[str, Any] | None = None

    TAINT_REASON = "trained on data of a member who was forgotten or opted out"

    @staticmethod
    def taint(active: Any, versions: Sequence[Any], open_run: Any, *, cfg: Any,
              settings: Any) -> dict[str, Any] | None:
        """What every status surface (/tune status, the console, ``guildtune status``) says of
        a tainted active version, as JSON-able facts and one ``replacement`` sentence: which
        run will replace it and whether it can (``guildtune.policy.training_block`` for the
        guild's ``settings``), else that the guild stays on it, and the newest clean version a
        rollback returns to. None when the active version is clean."""
        if active is None or active.tainted_utc is None:
            return None
        v = active.version
        fallback = max((x.version for x in versions
                        if x.version < v and x.tainted_utc is None and x.status == "retired"
                        and x.activated_utc), default=None)
        if open_run is None:
            text = (f"no retrain queued: the guild stays on v{v} until a retrain succeeds or "
                    "an admin rolls back")
        elif open_run.status == "running":
            text = (f"retrain run #{open_run.id} is running: v{v} stays active until it "
                    "publishes a clean version")
        else:
            off = training_block(cfg, settings, open_run.force)
            if off is not None:
                text = (f"retrain run #{open_run.id} is queued, but {off}, so it will fail: "
                        f"the guild stays on v{v} until a retrain succeeds or an admin rolls "
                        "back")
            else:
                text = (f"retrain run #{open_run.id} is queued: v{v} stays active until a "
                        "worker trains it and publishes a clean version")
        text += (f"; newest clean version: v{fallback} (a rollback returns to it)"
                 if fallback is not None else "; no clean version: a rollback returns to the "
                 "base model")
        return {"version": v, "tainted_utc": active.tainted_utc,
                "reason": StatusReport.TAINT_REASON,
                "retrain_run": None if open_run is None else
                {"id": open_run.id, "status": open_run.status},
                "newest_clean_version": fallback, "replacement": text}

    def fields(self) -> list[tuple[str, str]]:
        """(name, value) pairs, in display order."""
        training = ("on" if self.guild_training and self.operator_training else
                    "off (operator)" if not self.operator_training else "off")
        active = "base model" if self.active_version is None else f"v{self.active_version}"
        if self.tainted:
            active += f" (tainted: {self.TAINT_REASON})"
        if self.active_since:
            active += f" since {self.active_since[:16].replace('T', ' ')} UTC"
        if self.engine_version != self.active_version:
            serving = "base" if self.engine_version is None else f"v{self.engine_version}"
            active += f" (serving {serving}, swap pending)"
        out = [("Active version", active), ("Training", training),
               ("Examples since it", str(self.examples_since)),
               ("Ratings", f"👍 {self.likes} · 👎 {self.dislikes} · "
                           f"{self.consented_users} members opted in"),
               ("Last run", self.last_run), ("Next scheduled run", self.next_run)]
        if self.tainted:
            out.insert(1, ("Replacement", self.tainted["replacement"]))
        if self.running:
            out.insert(len(out) - 1, ("Running", self.running))
        return out

    def lines(self) -> list[str]:
        return [f"{k}: {v}" for k, v in self.fields()]

    @classmethod
    def build(cls, guild_id: int, *, cfg: Any, settings: Any, stats: dict[str, Any],
              active: Any, runs: Sequence[Any], engine_version: int | None, schedule: str,
              next_run: str, tainted: dict[str, Any] | None = None,
              chart_png: bytes | None = None) -> StatusReport:
        """The report from what ``Core.status`` read: the guild's ``settings``, the store's
        ``stats``, its ``active`` version and newest ``runs``, the version the engine serves;
        ``next_run`` and ``tainted`` as worded by the caller (``StatusReport.taint``)."""
        last = next((r for r in runs if r.status in FINISHED), None)
        last_text = "none yet" if last is None else run_summary(
            last, int(stats.get("examples_since_last_run") or 0))
        running = None
        open_run = stats.get("open_run")
        if open_run:
            prog = open_run.get("progress")
            running = f"#{open_run['id']} {open_run['status']}" + (
                f": {progress_line(prog)}" if prog else "")
        return cls(
            guild_id=guild_id, operator_training=operator_block(cfg) is None,
            guild_training=settings.training_enabled,
            active_version=active.version if active else None,
            active_since=active.activated_utc if active else None,
            engine_version=engine_version,
            examples_since=int(stats.get("examples_since_active") or 0),
            likes=int(stats.get("likes") or 0), dislikes=int(stats.get("dislikes") or 0),
            consented_users=int(stats.get("consented_users") or 0),
            last_run=clip(last_text), running=None if running is None else clip(running),
            next_run=next_run, schedule=schedule, chart_png=chart_png, tainted=tainted)


def run_summary(run: Any, arrived: int = 0) -> str:
    """A finished run in one line, as "Last run" says it (and the console when one ends):
    ``#3 rejected (manual, 2025-01-02 03:04 UTC) → v2: <the gate's numbers>; <error>``;
    ``arrived``: examples stored since it read its data (``_outcome``)."""
    text = f"#{run.id} {run.status} ({run.trigger}"
    text += f", {run.finished_utc[:16].replace('T', ' ')} UTC)" if run.finished_utc else ")"
    if run.version is not None:
        text += f" → v{run.version}"
    return text + _outcome(run.metrics, run.error, arrived)


def clip(text: str, limit: int = FIELD_CHARS) -> str:
    """``text`` in at most ``limit`` characters, ending in "…": cut at a word's end, never
    inside a word (a config key cut in half, ``privacy.max_``, reads as another key), unless
    the "word" is longer than ``WORD_CHARS`` (a blob)."""
    if len(text) <= limit:
        return text
    kept = text[:limit - 1]
    if not text[limit - 1].isspace():  # the cut falls inside a word: leave the word out
        space = max(kept.rfind(" "), kept.rfind("\n"))
        if space > 0 and len(kept) - space <= WORD_CHARS:  # longer: a blob, cut it anywhere
            kept = kept[:space]
    return kept.rstrip(" ,;:(\n") + "…"


def _outcome(metrics: dict[str, Any] | None, error: str | None, arrived: int = 0) -> str:
    """How a finished run ended, after its id: the gate in one line (``gate_line``), or for a
    run that failed for lack of data how many more examples the next one needs (less the
    ``arrived`` since it ran), then the error when it says more than the gate's reason."""
    metrics = metrics or {}
    out = ""
    needed = metrics.get("needed")
    if isinstance(needed, int) and not isinstance(needed, bool):
        left = needed - arrived
        out += (f": {needed_line(left)}" if left > 0 else
                f": enough new examples have arrived for the next run (it needed {needed})")
    gate = gate_line(metrics)
    if gate:
        out += f"; {gate}"
    if error and error != metrics.get("gate"):
        out += f"; {clip(error, ERROR_CHARS)}"
    return out


def like_rate_chart(rows: list[dict[str, Any]]) -> bytes | None:
    """The like-rate chart as PNG bytes, or None when drawing it fails (blocking: run it in a
    thread)."""
    from bot.charts import like_rate_png

    try:
        return like_rate_png(rows)
    except Exception:  # a chart is a nicety: status must still answer without it
        log.exception("like-rate chart failed")
        return None
