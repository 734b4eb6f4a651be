"""A training run in words: what it is doing now, and how the last one was judged.

One home for the words, so the log and /tune status say the same thing:

- ``progress_line``: a running run's progress dict (what ``trainer.fit.fit`` and
  ``trainer.pipeline.train_guild`` report) as one line: phase, step/total, loss, tok/s, time
  left.
- ``ProgressLog``: follows one run's progress dicts, fills in the phase a step belongs to (what
  the worker stores on the run row) and logs a line when the phase changes and at most every
  ``interval_s`` in between: the worker's log and ``guildtune train`` without a terminal.
- ``gate_line``: a finished run's held-out losses and the gate's reason, in one line.
- ``needed_line``: what a run that failed for lack of data needs before the next one can train.

Kernel module: imports nothing of bot/ or trainer/ (both use it).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

log = logging.getLogger(__name__)

LOG_EVERY_S = 30.0  # a progress line at most this often (phase changes are logged at once)
TRAINING = "training"
# Phases the pipeline announces before or after the fit, not during it: the steps that follow
# them are the fit's ("training"). Any other phase (e.g. "k-fold 2/5") names the steps after it.
NOT_FITTING = ("loading model", "evaluating")


def duration(seconds: float) -> str:
    """Seconds in readable words: '45 s', '12 min', '1 h 05 min'."""
    s = max(0, round(seconds))
    if s < 90:
        return f"{s} s"
    if s < 3600:
        return f"{round(s / 60)} min"
    h, m = divmod(round(s / 60), 60)
    return f"{h} h {m:02d} min"


def _num(p: Mapping[str, Any], key: str) -> float | None:
    v = p.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
        return None
    return v


def phase_of(p: Mapping[str, Any], before: str | None = None) -> str:
    """The phase a progress dict belongs to: its own ``phase``, else (a fit step) the phase
    announced ``before`` it, or "training" when that was none or not a fitting phase."""
    phase = p.get("phase")
    if isinstance(phase, str) and phase:
        return phase
    if "step" not in p:
        return before or "starting"
    return before if before and before not in NOT_FITTING else TRAINING


def progress_line(p: Mapping[str, Any]) -> str:
    """One line for a progress dict, e.g. 'training, step 120/400, loss 1.2345, 1,830 tok/s,
    about 3 min left'. Unknown keys are ignored; unknown phases are shown as they are."""
    phase = phase_of(p)
    n_train, n_heldout = _num(p, "n_train"), _num(p, "n_heldout")
    if n_train is not None and "step" not in p:
        phase += f" ({int(n_train)} train" + (
            f", {int(n_heldout)} held-out examples)" if n_heldout is not None else " examples)")
    bits = [phase]
    step, total = _num(p, "step"), _num(p, "total_steps")
    if step is not None:
        bits.append(f"step {int(step)}/{int(total)}" if total else f"step {int(step)}")
    loss = _num(p, "loss")
    if loss is not None:
        bits.append(f"loss {loss:.4f}")
    tps = _num(p, "tokens_per_s")
    if tps is not None:
        bits.append(f"{tps:,.0f} tok/s")
    eta = _num(p, "eta_s")
    if eta is not None and (step is None or total is None or step < total):
        bits.append(f"about {duration(eta)} left")
    return ", ".join(bits)


class ProgressLog:
    """Follows one run's progress: ``update(p)`` returns the dict with its phase filled in
    (``phase_of``) and logs ``"<label>: <progress_line>"`` when the phase changed or
    ``interval_s`` passed since the last line (to ``logger``; None: no lines, only the phase).
    ``clock`` (seconds, monotonic) is injectable so tests never wait on real time."""

    def __init__(self, label: str, *, interval_s: float = LOG_EVERY_S,
                 clock: Callable[[], float] = time.monotonic,
                 logger: logging.Logger | None = log) -> None:
        self.label, self.interval_s, self.clock = label, interval_s, clock
        self.logger = logger
        self.phase: str | None = None
        self._last: float | None = None

    def update(self, p: Mapping[str, Any]) -> dict[str, Any]:
        record = {**p, "phase": phase_of(p, self.phase)}
        now = self.clock()
        if self.logger is not None and (record["phase"] != self.phase or self._last is None
                                        or now - self._last >= self.interval_s):
            self.logger.info("%s: %s", self.label, progress_line(record))
            self._last = now
        self.phase = record["phase"]
        return record



def _loss(x: Any) -> str:
    return "-" if not isinstance(x, (int, float)) else f"{x:.4f}"


def gate_line(metrics: Mapping[str, Any] | None) -> str:
    """A finished run's judgement in one line: held-out loss of the candidate vs the base vs
    the active version (with how the held-out set was made and its size), then the gate's
    reason. Empty when the run has no gate metrics."""
    if not metrics:
        return ""
    out = ""
    if metrics.get("candidate_loss") is not None or metrics.get("base_loss") is not None:
        out = (f"held-out loss: candidate {_loss(metrics.get('candidate_loss'))} vs base "
               f"{_loss(metrics.get('base_loss'))}")
        version = metrics.get("active_version")
        if version is not None:
            active = metrics.get("active_loss")
            mine = metrics.get("candidate_vs_active_loss")
            n = metrics.get("n_judged_vs_active")
            if active is None:
                out += f" (active v{version} not comparable)"
            elif mine is not None and n is not None:
                # The active version is judged on what it never saw (trainer.pipeline.unseen_by)
                # and the candidate on the same examples.
                out += (f"; against v{version} on {n} examples: candidate {_loss(mine)} vs "
                        f"v{version} {_loss(active)}")
            else:
                out += f" vs active v{version} {_loss(active)}"
        how = [str(metrics["eval"])] if metrics.get("eval") else []
        if metrics.get("n_heldout") is not None:
            how.append(f"{metrics['n_heldout']} held out")
        if metrics.get("n_train") is not None:
            how.append(f"{metrics['n_train']} train")
        if how:
            out += f" ({', '.join(how)})"
    if metrics.get("gate"):
        out += ("; " if out else "") + f"gate: {metrics['gate']}"
    return out


def needed_line(needed: int) -> str:
    """What a run that failed for lack of data says the next one needs."""
    return (f"needs {needed} more liked {'reply' if needed == 1 else 'replies'} or "
            f"{'correction' if needed == 1 else 'corrections'} to train")
