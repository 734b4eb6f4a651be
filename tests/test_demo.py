"""``guildtune demo --model tiny`` end to end: the report holds the matrix and its charts, the
adapters personalize, only the consenting members' data was stored, and each claim the report
makes (where the training data came from, the feedback-only retrain, the hot swap, the loss
curve, every rated reply) is read from what the run recorded. Below it, the pieces: the
simulated member, the source counts, the statistics and the like-rate chart."""

from __future__ import annotations

import asyncio
import json
import re
from collections import Counter
from pathlib import Path

import pytest

from guildtune.cli import main


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One tiny demo (3 prompts per guild before and after, 12 in the feedback-only phase):
    its report directory and what it printed."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("demo") / "demo"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["demo", "--model", "tiny", "--rounds", "3", "--out", str(out)]) == 0
    return out, printed.getvalue()


def _report(run: tuple[Path, str]) -> tuple[str, dict]:
    out, _ = run
    return ((out / "report.md").read_text(encoding="utf-8"),
            json.loads((out / "report.json").read_text(encoding="utf-8")))


def _section(report: str, heading: str) -> str:
    start = report.index(f"## {heading}")
    end = report.find("\n## ", start + 1)
    return report[start:end if end >= 0 else None]


@pytest.mark.slow
def test_demo_runs_end_to_end_with_the_tiny_model(tmp_path: Path, demo_run: tuple[Path, str],
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", str(tmp_path / "none.toml"), "demo"]) == 1  # missing config file
    capsys.readouterr()
    out, printed = demo_run
    report, data = _report(demo_run)
    # The report is printed as written: image links whole, table rows unbroken, no "/None".
    assert "![like-rate](like_rate.png)" in printed and "/None" not in printed
    assert all(line in printed.splitlines() for line in report.splitlines() if line.startswith("|"))
    assert "## Held-out loss matrix" in report and "| base |" in report
    for png in ("loss_matrix.png", "like_rate.png", "feedback_like_rate.png",
                "training_loss.png"):
        assert (out / png).stat().st_size > 1000
    history = [r for r in data["runs"] if r["loop"] == "history"]
    assert [r["status"] for r in history] == ["succeeded", "succeeded"]
    matrix = data["matrix"]
    for guild in ("harbor", "lab"):
        own = next(v for k, v in matrix.items() if k.startswith(f"{guild} v"))
        assert own[guild] < matrix["base"][guild]  # its adapter beats the base on its data
        others = [v[guild] for k, v in matrix.items() if k != "base" and not
                  k.startswith(f"{guild} v")]
        assert all(own[guild] < o for o in others)  # and beats the other guild's adapter
    for m in data["privacy"]["members"]:
        if not m["opted_in"]:
            assert m["interactions_stored"] == 0 and m["ratings_stored"] == 0
        else:
            assert m["interactions_stored"] > 0
    assert data["privacy"]["non_consented_ids_in_contexts"] == 0
    assert data["privacy"]["placeholders"] > 0  # their messages were seen, stored as placeholders


@pytest.mark.slow
def test_demo_reports_where_each_runs_training_data_came_from(demo_run: tuple[Path, str]
                                                              ) -> None:
    """The breakdown is the trainer's own count of the examples each run used: it adds up to
    the run's train and held-out sizes, the first adapters learned mostly from the imported
    history, and the report's table shows those numbers."""
    report, data = _report(demo_run)
    table = _section(report, "Where the training data came from")
    assert len(data["runs"]) == 4
    for r in data["runs"]:
        m, src = r["metrics"], r["metrics"]["sources"]
        assert sum(src["train"].values()) == m["n_train"]
        assert sum(src["heldout"].values()) == m["n_heldout"]
        n = {k: src["train"][k] + src["heldout"][k] for k in ("human", "liked", "correction")}
        assert (f"| {r['guild']} | {r['id']} ({r['status']}) | {r['version'] or '–'} | "
                f"{n['human']} | {n['liked']} | {n['correction']} | {sum(n.values())} |") in table
        if r["loop"] == "history":
            assert n["human"] > n["liked"] + n["correction"]
            assert n["human"] <= data["imported_pairs"][r["guild"]]
    assert data["pairs_at_end"] == data["imported_pairs"]  # the members talked only to the bot
    assert "are the imported history" in _section(report, "Like-rate of the simulated members")


@pytest.mark.slow
def test_demo_feedback_phase_retrains_on_feedback_alone(demo_run: tuple[Path, str]) -> None:
    """Each feedback-only guild's retrain used zero imported examples: exactly the replies
    its askers liked and the corrections they wrote before it; the report gives its own
    before/after with sample sizes and says whether the change is more than noise."""
    report, data = _report(demo_run)
    section = _section(report, "Feedback only")
    feedback = [r for r in data["runs"] if r["loop"] == "feedback"]
    assert [r["guild"] for r in feedback] == ["harbor (feedback only)", "lab (feedback only)"]
    for r in feedback:
        rows = [j for j in data["judgments"]
                if j["guild"] == r["guild"] and j["phase"] == "feedback before"]
        assert len(rows) == 12
        src = r["metrics"]["sources"]
        n = {k: src["train"][k] + src["heldout"][k] for k in ("human", "liked", "correction")}
        assert n == {"human": 0, "liked": sum(j["liked"] for j in rows),
                     "correction": sum(j["corrected"] for j in rows)}
        assert all(j["corrected"] != j["liked"] for j in rows)  # each disliked one corrected
        after = [j for j in data["judgments"]
                 if j["guild"] == r["guild"] and j["phase"] == "feedback after"]
        assert len(after) == 12
        assert not {j["prompt"] for j in after} & {j["prompt"] for j in rows}  # fresh prompts
        if r["status"] == "succeeded":  # the replay after is served by the retrained adapter
            assert {j["version"] for j in after} == {r["version"]}
        counts = data["like_counts"][r["guild"]]
        line = next(x for x in section.splitlines() if x.startswith(f"| {r['guild']} |"))
        for phase in ("feedback before", "feedback after"):
            liked, rated = counts[phase]
            assert f"({liked}/{rated};" in line
        assert ("more than noise" in line) != ("within noise for n = 12 and 12" in line)
        assert f"{n['liked']} liked, {n['correction']} corrections, 0 imported" in line


@pytest.mark.slow
def test_demo_reports_the_hot_swap_and_latency_while_training_ran(demo_run: tuple[Path, str]
                                                                  ) -> None:
    """Every published version was swapped into the running engine (no restart), with its
    numbers; every message sent while training ran was answered (none lost)."""
    report, data = _report(demo_run)
    section = _section(report, "Hot swap and latency while training ran")
    published = {(r["guild"], r["version"]) for r in data["runs"] if r["version"]}
    assert {(s["guild"], s["version"]) for s in data["swaps"]} == published
    assert len(data["swaps"]) == len(published)  # each swapped in once
    for s in data["swaps"]:
        assert s["poll_s"] >= 0 and s["after_publish_s"] is not None
        assert f"| {s['guild']} | v{s['version']} |" in section
    during = [j for j in data["judgments"] if j["phase"] == "during"]
    assert len(during) >= 2 and data["unanswered"].get("during", 0) == 0
    assert f"{len(during)} messages, {len(during)} answered, 0 without a reply" in section
    for phase in ("before", "during", "after"):
        assert data["latency"][phase]["replies"] == sum(j["phase"] == phase
                                                        for j in data["judgments"])
        assert f"| {phase} | {data['latency'][phase]['replies']} | 0 |" in section


@pytest.mark.slow
def test_demo_reports_each_runs_training_loss_per_step(demo_run: tuple[Path, str]) -> None:
    report, data = _report(demo_run)
    section = _section(report, "Training loss")
    for r in data["runs"]:
        m = r["metrics"]
        if r["status"] != "succeeded":
            continue
        assert m["loss_curve_every"] == 1 and len(m["loss_curve"]) == m["steps"]
        assert f"{m['steps']} steps, loss {m['loss_curve'][0]:.3f} at the first step" in section


@pytest.mark.slow
def test_demo_shows_every_rated_reply(demo_run: tuple[Path, str]) -> None:
    """Every replayed prompt of the compared phases is in the report with its rating, not a
    sample."""
    report, data = _report(demo_run)
    section = _section(report, "Every rated reply")
    rows = [x for x in section.splitlines() if re.match(r"\| \d+ \|", x)]
    shown = [j for j in data["judgments"] if j["phase"] != "during"]
    assert len(rows) == len(shown) == 2 * 3 * 2 + 2 * 12 * 2
    ratings = Counter(x.rstrip(" |✎").rsplit("| ", 1)[1].strip() for x in rows)
    assert ratings["👍"] == sum(j["liked"] for j in shown)
    assert ratings["👎"] == len(shown) - ratings["👍"]
    like_rates = _section(report, "Like-rate of the simulated members")
    for guild, phases in data["like_counts"].items():
        for phase in ("before", "after"):
            if phase in phases:
                liked, rated = phases[phase]
                assert rated == 3 and f"({liked}/{rated};" in like_rates


def test_demo_guilds_from_community_files(tmp_path: Path) -> None:
    """--data: one guild per file (community JSONL or DiscordChatExporter JSON); each guild's
    members like the words that set its community apart."""
    from guildtune.demo import build_guilds

    jsonl = tmp_path / "irc-cargo.jsonl"
    rows = []
    for i in range(20):
        rows.append({"part": 0, "seq": 2 * i, "author_id": 1, "text": f"how do I build crate {i}?",
                     "reply_to": []})
        rows.append({"part": 0, "seq": 2 * i + 1, "author_id": 2, "reply_to": [2 * i],
                     "text": "use cargo build with the release profile, cargo handles it"})
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    export = tmp_path / "bakers.json"
    msgs = []
    for i in range(20):
        msgs.append({"id": str(1000 + 2 * i), "type": "Default", "timestamp": "",
                     "content": f"what flour for loaf {i}?", "author": {"id": "7", "name": "a"}})
        msgs.append({"id": str(1001 + 2 * i), "type": "Reply", "timestamp": "",
                     "content": "sourdough starter and rye flour, knead gently",
                     "author": {"id": "8", "name": "b"},
                     "reference": {"messageId": str(1000 + 2 * i)}})
    export.write_text(json.dumps({"channel": {"name": "bread"}, "messages": msgs}))
    cargo, bakers = build_guilds([jsonl, export])
    assert (cargo.name, bakers.name) == ("cargo", "bakers")
    assert cargo.guild_id != bakers.guild_id and len(cargo.history) == 40
    assert "cargo" in cargo.community.liked_words and "cargo" not in bakers.community.liked_words
    assert bakers.community.likes("try a sourdough starter")
    assert cargo.prompts and all("crate" in p for p in cargo.prompts)


# -- the pieces ---------------------------------------------------------------------------------

G = 42


def test_a_simulated_member_rates_and_corrects_through_the_bots_handlers(tmp_path: Path
                                                                         ) -> None:
    """``member_turn`` (the demo's and bench/closed_loop.py's one member): every rater's 👍/👎
    is stored for an opted-in rater, a disliked reply gets the asker's better reply, a liked
    one none, and an asker who has not opted in stores nothing."""
    from bot.core import Core
    from guildtune.demo_members import FastClock, ReplayChannel, member_turn
    from tests.fakes import make_services

    services = make_services(tmp_path)
    services.clock = FastClock()
    services.engine.replies.extend(["arr matey", "hello", "hello"])
    core, channel = Core(services), ReplayChannel()
    asked: list[str] = []

    def better() -> str:
        asked.append("better")
        return "arr, a better reply"

    async def go() -> list:
        for m in (1, 2):
            await core.consent(G, m, True)
        kw = {"guild_id": G, "likes": lambda r: "arr" in r, "raters": [1, 2, 3],
              "better": better}
        return [await member_turn(core, channel, member=1, text="ahoy?", **kw),
                await member_turn(core, channel, member=1, text="ahoy again?", **kw),
                await member_turn(core, channel, member=3, text="and me?", **kw)]

    liked, disliked, outsider = asyncio.run(go())
    assert (liked.liked, liked.corrected) == (True, False)
    assert (disliked.liked, disliked.corrected) == (False, True)
    assert (outsider.liked, outsider.corrected) == (False, False)
    assert asked == ["better", "better"]  # asked only for the disliked replies
    rows = sorted(services.store.rated_interactions(G), key=lambda r: r["created_utc"])
    assert [r["score"] for r in rows] == [2, -2]  # members 1 and 2; 3 has not opted in
    assert [c["text"] for c in rows[1]["corrections"]] == ["arr, a better reply"]
    assert not rows[0]["corrections"]
    services.store.close()


def test_dataset_sources_are_the_examples_a_run_trains_and_judges_on(tmp_path: Path) -> None:
    """``build_dataset`` counts its train and held-out examples by source, and a training run
    records exactly those counts, with its loss per step, in its metrics."""
    from guildtune.config import Config
    from storage import open_store
    from tests.fakes import TINY, import_pairs, liked_replies, make_config
    from trainer.data import build_dataset, source_counts
    from trainer.pipeline import train_guild

    cfg: Config = make_config(tmp_path, TINY, training={"enabled": True, "max_steps": 3},
                              privacy={"max_user_share": 0.5})
    store = open_store(cfg.db_path)
    import_pairs(store, G, 12)
    liked_replies(store, G, 3)
    rows = store.rated_interactions(G)
    store.add_correction(G, rows[0]["id"], int(rows[0]["user_id"]), "cargo test, always")
    data = build_dataset(store, G, cfg)
    kinds = Counter(e.kind for e in (*data.train, *data.heldout))
    assert dict(kinds) == {"human": 12, "liked": 3, "correction": 1}
    assert data.stats["sources"] == {"train": source_counts(data.train),
                                     "heldout": source_counts(data.heldout)}
    res = train_guild(store, cfg, G)
    assert res.metrics["sources"] == data.stats["sources"]
    assert len(res.metrics["loss_curve"]) == res.metrics["steps"] == 3
    store.close()


def test_a_long_fits_loss_curve_is_kept_as_means() -> None:
    from trainer.pipeline import loss_curve

    assert loss_curve([1.0, 2.0, 3.0]) == ([1.0, 2.0, 3.0], 1)
    curve, every = loss_curve([float(i) for i in range(1200)])
    assert every == 3 and len(curve) == 400 and curve[0] == 1.0 and curve[-1] == 1198.0


def test_like_rate_changes_say_when_they_are_within_noise() -> None:
    from guildtune.demo_report import change_cell, fisher_p, rate_cell, wilson

    assert fisher_p(0, 12, 10, 12) == pytest.approx(6.7e-05, rel=0.02)
    assert fisher_p(3, 12, 5, 12) == pytest.approx(0.667, abs=0.01)
    assert fisher_p(4, 4, 0, 4) == pytest.approx(0.0286, abs=0.001)
    lo, hi = wilson(3, 12)
    assert lo == pytest.approx(0.089, abs=0.002) and hi == pytest.approx(0.532, abs=0.002)
    assert rate_cell((3, 12)) == "25% (3/12; 95% CI 9%–53%)"
    assert change_cell((3, 12), (5, 12)) == ("+17 points, p = 0.67: within noise for n = 12 "
                                             "and 12")
    assert change_cell((0, 12), (10, 12)).endswith("more than noise")


def test_like_rate_chart_shows_each_bars_sample_and_ends_at_100_percent() -> None:
    from guildtune.report import like_rate_figure

    fig = like_rate_figure({"harbor": {"before": (3, 12), "after": (12, 12)},
                            "lab": {"before": (2, 12), "after": (9, 12)}})
    ax = fig.axes[0]
    assert ax.get_ylim() == (0.0, 100.0)
    labels = [t.get_text() for t in ax.texts]
    assert labels == ["25%\n3/12", "17%\n2/12", "100%\n12/12", "75%\n9/12"]


def test_a_change_without_a_new_adapter_is_not_credited_to_a_retrain(tmp_path: Path) -> None:
    """A feedback-only run the gate rejected leaves the base model serving: the report says
    that both replays were the base model, whatever the like-rates did."""
    from guildtune.demo_report import DemoResults, Judgment, RunRecord, write_report

    res = DemoResults("tiny", [], ["harbor (feedback only)"], 3, 12, False)
    for phase, liked in (("feedback before", 12), ("feedback after", 3)):
        res.judgments += [Judgment("harbor (feedback only)", phase, f"q{i}", "arr", None,
                                   i < liked, False, 0.1) for i in range(12)]
    res.runs.append(RunRecord("harbor (feedback only)", "feedback", 3, "rejected", None, {
        "sources": {"train": {"human": 0, "liked": 12, "correction": 0},
                    "heldout": {"human": 0, "liked": 0, "correction": 0}},
        "loss_curve": [0.5, 0.1], "loss_curve_every": 1}, "candidate loses"))
    report = write_report(res, tmp_path).read_text(encoding="utf-8")
    line = next(x for x in report.splitlines() if x.startswith("| harbor (feedback only) | 100%"))
    assert "-75 points" in line and "the base model both times" in line
    assert "12 liked, 0 corrections, 0 imported; run rejected: candidate loses" in line
