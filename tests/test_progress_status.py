"""Issue 13, items 5-6: progress everywhere and small data.

A training run's progress is logged without a terminal (a line on each phase change, at most
every ~30 s in between: ``guildtune.progress.ProgressLog``, used by the worker and by
``guildtune train``); /tune status words a running run's progress and the last run's gate in
one line each; a run that fails for lack of data (``trainer.pipeline.NotEnoughData``) records
how many more examples the next run needs, status says it, and it does not use up the admin's
retrain cooldown.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
from pathlib import Path
from typing import Any

import pytest

from bot.core import Core
from guildtune import cli_train
from guildtune.config import Config
from guildtune.progress import (
    ProgressLog,
    duration,
    gate_line,
    needed_line,
    progress_line,
)
from storage import Store, open_store
from tests.fakes import (
    TINY_TRAINER,
    FakeClock,
    import_pairs,
    liked_replies,
    make_config,
    services_on,
)
from trainer.data import MIN_EXAMPLES
from trainer.pipeline import NotEnoughData, TrainingError
from trainer.worker import execute_run, failure, run_worker

os.environ.setdefault("OMP_NUM_THREADS", "1")  # the spawned training children inherit it

G = 1313
STEP = {"step": 120, "total_steps": 400, "loss": 1.23456, "tokens": 52_000,
        "tokens_per_s": 1830.4, "elapsed_s": 28.4, "eta_s": 190.0}
GATE = {"n_train": 180, "n_heldout": 20, "base_loss": 1.5, "candidate_loss": 1.2,
        "active_loss": 1.3, "active_version": 2, "eval": "time split",
        "gate": "candidate beats the base and the active version"}


def lines_of(caplog: pytest.LogCaptureFixture, prefix: str) -> list[str]:
    return [r.getMessage()[len(prefix):] for r in caplog.records
            if r.getMessage().startswith(prefix)]


# -- the words ---------------------------------------------------------------------------------

def test_progress_line_says_phase_step_loss_speed_and_time_left() -> None:
    assert progress_line(STEP) == ("training, step 120/400, loss 1.2346, 1,830 tok/s, "
                                   "about 3 min left")


def test_progress_line_names_the_dataset_while_loading_and_any_phase_as_it_is() -> None:
    loading = {"phase": "loading model", "unique": 240, "n_train": 200, "n_heldout": 30}
    assert progress_line(loading) == "loading model (200 train, 30 held-out examples)"
    assert progress_line({"phase": "k-fold 2/5", **STEP}).startswith("k-fold 2/5, step 120/400")
    assert progress_line({"phase": "evaluating", "step": 400, "total_steps": 400}) == \
        "evaluating, step 400/400"  # no time left to show once the fit is done


def test_duration_in_words() -> None:
    assert [duration(s) for s in (0, 45.4, 89, 190, 3599, 3600, 7380)] == \
        ["0 s", "45 s", "89 s", "3 min", "60 min", "1 h 00 min", "2 h 03 min"]


def test_gate_line_compares_candidate_base_and_active_with_the_reason() -> None:
    assert gate_line(GATE) == (
        "held-out loss: candidate 1.2000 vs base 1.5000 vs active v2 1.3000 "
        "(time split, 20 held out, 180 train); gate: candidate beats the base and the active "
        "version")
    no_active = {**GATE, "active_loss": None, "active_version": None, "eval": None}
    assert gate_line(no_active).startswith("held-out loss: candidate 1.2000 vs base 1.5000 "
                                           "(20 held out, 180 train); gate: ")
    other_base = {**GATE, "active_loss": None}
    assert "(active v2 not comparable)" in gate_line(other_base)
    forced = {"n_train": 3, "n_heldout": 0, "gate": "forced by an admin (no held-out data)"}
    assert gate_line(forced) == "gate: forced by an admin (no held-out data)"
    assert gate_line(None) == gate_line({}) == ""


def test_needed_line() -> None:
    assert needed_line(7) == "needs 7 more liked replies or corrections to train"
    assert needed_line(1) == "needs 1 more liked reply or correction to train"


# -- the progress log --------------------------------------------------------------------------

def test_progress_log_logs_phase_changes_at_once_and_steps_at_most_every_interval(
        caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    follow = ProgressLog("run 5 (guild 9)", interval_s=30.0, clock=clock)
    caplog.set_level(logging.INFO, logger="guildtune.progress")

    def step(n: int, after_s: float) -> dict[str, Any]:
        clock.advance(after_s)
        return follow.update({**STEP, "step": n, "eta_s": 0.0})

    follow.update({"phase": "loading model", "n_train": 200, "n_heldout": 30})
    assert step(1, 5)["phase"] == "training"  # a phase change: logged at once
    for n in range(2, 11):
        step(n, 3)  # 27 s after the last line: none
    step(11, 3)  # 30 s: one
    step(12, 29)
    clock.advance(1)
    follow.update({"phase": "evaluating", "step": 400, "total_steps": 400})  # at once
    assert [re.sub(r", loss .*", "", line) for line in lines_of(caplog, "run 5 (guild 9): ")] \
        == ["loading model (200 train, 30 held-out examples)", "training, step 1/400",
            "training, step 11/400", "evaluating, step 400/400"]


def test_steps_after_an_unknown_phase_belong_to_it(caplog: pytest.LogCaptureFixture) -> None:
    follow = ProgressLog("run 1 (guild 1)", clock=FakeClock())
    caplog.set_level(logging.INFO, logger="guildtune.progress")
    follow.update({"phase": "k-fold 2/5"})
    assert follow.update(STEP)["phase"] == "k-fold 2/5"
    follow.update({"phase": "evaluating"})
    assert follow.update(STEP)["phase"] == "training"
    assert lines_of(caplog, "run 1 (guild 1): ")[-1].startswith("training, step 120/400")


def test_a_quiet_progress_log_only_fills_in_the_phase(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    follow = ProgressLog("quiet", logger=None, clock=FakeClock())
    assert follow.update(STEP)["phase"] == "training"
    assert not lines_of(caplog, "quiet: ")


# -- /tune status ------------------------------------------------------------------------------

async def test_status_words_a_running_runs_progress(tmp_path: Path) -> None:
    s = services_on(make_config(tmp_path, TINY_TRAINER))
    run_id, _ = s.store.enqueue_run(G, "manual")
    core = Core(s)
    assert dict((await core.status(G, chart=False)).fields())["Running"] == f"#{run_id} queued"
    s.store.claim_run("w", 60, guild_id=G)
    s.store.heartbeat(run_id, "w", 60, progress={**STEP, "phase": "training", "pid": 4242})
    running = dict((await core.status(G, chart=False)).fields())["Running"]
    assert running == (f"#{run_id} running: training, step 120/400, loss 1.2346, 1,830 tok/s, "
                       "about 3 min left")
    s.store.close()


async def test_status_shows_the_last_runs_gate_in_one_line(tmp_path: Path) -> None:
    s = services_on(make_config(tmp_path, TINY_TRAINER))
    run_id, _ = s.store.enqueue_run(G, "manual")
    s.store.claim_run("w", 60, guild_id=G)
    reason = "candidate loss 1.3100 does not beat the active version's 1.3000 by 1.0%"
    s.store.finish_run(run_id, "rejected", metrics={**GATE, "candidate_loss": 1.31,
                                                    "gate": reason, "steps": 40}, error=reason)
    last = dict((await Core(s).status(G, chart=False)).fields())["Last run"]
    assert last.startswith(f"#{run_id} rejected (manual, ")
    assert last.endswith("; held-out loss: candidate 1.3100 vs base 1.5000 vs active v2 1.3000 "
                         f"(time split, 20 held out, 180 train); gate: {reason}")
    assert last.count(reason) == 1  # the error is the gate's reason: said once
    s.store.close()


async def test_status_fields_fit_an_embed_field(tmp_path: Path) -> None:
    s = services_on(make_config(tmp_path, TINY_TRAINER))
    run_id, _ = s.store.enqueue_run(G, "manual")
    s.store.claim_run("w", 60, guild_id=G)
    s.store.finish_run(run_id, "failed", metrics={**GATE, "gate": "why " * 400},
                       error="Traceback " * 500)
    s.store.enqueue_run(G, "manual")
    s.store.claim_run("w", 60, guild_id=G)
    s.store.heartbeat(run_id + 1, "w", 60, progress={"phase": "x" * 2000})
    fields = dict((await Core(s).status(G, chart=False)).fields())
    assert fields["Running"].startswith(f"#{run_id + 1} running: xxx")
    assert all(len(v) <= 1024 for v in fields.values()), {k: len(v) for k, v in fields.items()}
    s.store.close()


# -- not enough data ---------------------------------------------------------------------------

def test_failure_carries_needed_for_not_enough_data() -> None:
    assert failure(NotEnoughData("guild 1 has 3 usable examples", needed=7)) == {
        "error": "guild 1 has 3 usable examples", "needed": 7}
    assert failure(TrainingError("no data")) == {"error": "no data"}
    assert failure(MemoryError("boom")) == {"error": "MemoryError: boom"}


async def test_a_run_short_of_data_records_needed_and_status_says_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The worker (in process) stores ``needed`` on the failed run; the pipeline is stubbed:
    it reads the dataset, then finds it too small."""
    s = services_on(make_config(tmp_path, TINY_TRAINER))
    s.store.update_guild_settings(G, training_enabled=True)

    def short(store: Store, cfg: Config, guild_id: int, **kw: Any) -> Any:
        kw["progress"]({"phase": "loading model", "n_train": 2, "n_heldout": 1})
        raise NotEnoughData(f"guild {guild_id} has 3 usable examples; a run needs "
                            f"{MIN_EXAMPLES}", needed=MIN_EXAMPLES - 3)

    monkeypatch.setattr("trainer.pipeline.train_guild", short)
    caplog.set_level(logging.INFO, logger="trainer.worker")
    run_id, _ = s.store.enqueue_run(G, "manual")
    run = s.store.claim_run("w", 60, guild_id=G)
    assert execute_run(s.store, s.config, run, "w", isolate=False) == "failed"
    done = s.store.get_run(run_id)
    assert done.status == "failed" and done.metrics == {"needed": MIN_EXAMPLES - 3}
    assert f"run {run_id} (guild {G}): loading model (2 train, 1 held-out examples)" in \
        caplog.messages
    last = dict((await Core(s).status(G, chart=False)).fields())["Last run"]
    assert f"needs {MIN_EXAMPLES - 3} more liked replies or corrections to train" in last
    assert "3 usable examples" in last
    s.store.close()


async def test_a_manual_run_that_fails_for_lack_of_data_does_not_use_up_the_cooldown(
        tmp_path: Path) -> None:
    """Through the real path: /tune retrain queues a run, a worker trains it in a child
    process with the real pipeline, it fails (the guild has no examples yet), and /tune
    retrain is accepted again at once."""
    s = services_on(make_config(tmp_path, TINY_TRAINER))
    s.store.update_guild_settings(G, training_enabled=True)
    core = Core(s)
    assert "queued as run" in await core.retrain(G, 1)
    report = run_worker(s.config, once=True, worker_id="w-small", store=s.store)
    assert [r.status for r in report.runs] == ["failed"]
    assert "examples" in (report.runs[0].error or "")  # it failed for lack of data
    assert "queued as run" in await core.retrain(G, 1)  # not refused by the cooldown
    s.store.close()


async def test_a_guild_with_three_liked_replies_is_told_how_many_more_it_needs(
        tmp_path: Path) -> None:
    """The real pipeline in the worker's training child: ``NotEnoughData.needed`` crosses the
    process boundary onto the run, and status says it.

    Expects the pipeline's small-data change (issue 13: fewer than ``MIN_EXAMPLES`` usable
    examples raise ``NotEnoughData``); until it lands, the pipeline trains on the three (two
    train, one held out) and this test fails on the run's status."""
    s = services_on(make_config(tmp_path, TINY_TRAINER))
    liked_replies(s.store, G, 3)
    run_id, _ = s.store.enqueue_run(G, "manual")
    run_worker(s.config, once=True, worker_id="w-small", store=s.store)
    done = s.store.get_run(run_id)
    assert done.status == "failed", done
    needed = (done.metrics or {}).get("needed")
    assert isinstance(needed, int) and MIN_EXAMPLES - 3 <= needed <= MIN_EXAMPLES, done
    last = dict((await Core(s).status(G, chart=False)).fields())["Last run"]
    assert needed_line(needed) in last
    s.store.close()


# 40 examples with 18 held out: judged by the time split (k-fold below 16 held out).
TIME_SPLIT = {**TINY_TRAINER["training"], "heldout_fraction": 0.45}


# -- progress in the logs ----------------------------------------------------------------------

def test_the_worker_logs_its_childs_progress(tmp_path: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    """A real run in a training child: the worker (parent) logs each phase as it starts."""
    cfg = make_config(tmp_path, TINY_TRAINER, training=TIME_SPLIT)
    store = open_store(cfg.db_path)
    import_pairs(store, G, 40)
    caplog.set_level(logging.INFO, logger="trainer.worker")
    run_id, _ = store.enqueue_run(G, "manual", force=True)
    run_worker(cfg, once=True, worker_id="w-log", store=store)
    done = store.get_run(run_id)
    assert done.status in ("succeeded", "rejected"), done.error
    lines = [line for line in lines_of(caplog, f"run {run_id} (guild {G}): ")
             if not line.startswith(("training in child pid", done.status))]
    assert lines[0].startswith("loading model (") and "examples)" in lines[0]
    assert re.match(r"training, step 1/\d+, loss \d+\.\d{4}, [\d,]+ tok/s, about .+ left",
                    lines[1]), lines
    assert any(line.startswith("evaluating") for line in lines), lines
    assert done.progress["phase"] == "evaluating" and done.progress["pid"]
    store.close()


def test_guildtune_train_without_a_terminal_logs_progress_lines(
        tmp_path: Path, caplog: pytest.LogCaptureFixture,
        capsys: pytest.CaptureFixture[str]) -> None:
    cfg = make_config(tmp_path, TINY_TRAINER, training=TIME_SPLIT)
    store = open_store(cfg.db_path)
    import_pairs(store, G, 40)
    store.close()
    caplog.set_level(logging.INFO, logger="trainer.worker")
    parser = argparse.ArgumentParser()
    cli_train.add_commands(parser.add_subparsers(dest="cmd", required=True))
    args = parser.parse_args(["train", "--guild", str(G), "--force"])
    assert args.func(args, cfg) == 0
    assert "version 1 active" in capsys.readouterr().out
    lines = lines_of(caplog, f"run 1 (guild {G}): ")
    assert [line.split(" ")[0].rstrip(",") for line in lines][:2] == ["loading", "training"]
    assert lines[-1].startswith("evaluating")
