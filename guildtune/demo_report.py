"""The demo's report: what ``guildtune demo`` measured, as Markdown (printed as written) and as
JSON, with its charts.

Every number comes from what the run recorded: the replies and their ratings as the members
gave them, the training runs' metrics as the trainer stored them (where each example came
from, the loss per step), the hot swaps as the watcher's polls made them. A like-rate is shown
with its sample size and a 95% interval, and a change between two of them says whether it is
more than the noise of that many replies (Fisher's exact test).

This module is a UI: it writes files on purpose.
"""

from __future__ import annotations

import json
import math
import unicodedata
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# The replay's phases: (key, words). The "during" replies are timed, not compared.
HISTORY_PHASES = (("before", "before (base)"), ("after", "after (own adapter)"))
FEEDBACK_PHASES = (("feedback before", "before (base)"),
                   ("feedback after", "after (feedback-only adapter)"))
SOURCE_WORDS = {"human": "imported history", "liked": "liked replies",
                "correction": "corrections"}
NOISE_P = 0.05  # a change with a larger p-value is called "within noise"


@dataclass
class Stage:
    name: str
    seconds: float


@dataclass
class Judgment:
    """One replayed reply as its asker rated it."""

    guild: str
    phase: str
    prompt: str
    reply: str
    version: int | None  # the adapter that answered (None: the base model)
    liked: bool
    corrected: bool  # the asker wrote a better reply for it
    seconds: float  # Core.chat, the message to the reply


@dataclass
class Swap:
    """A version the watcher's poll swapped into the running engine."""

    guild: str
    version: int
    poll_s: float  # the poll that swapped it in (store read, validation, load, switch)
    after_publish_s: float | None  # from the store naming it active to the engine serving it
    during_training: bool  # another guild's training was still running


@dataclass
class RunRecord:
    guild: str
    loop: str  # "history" (imported history + feedback) | "feedback" (feedback only)
    id: int
    status: str
    version: int | None
    metrics: dict[str, Any]
    error: str | None


@dataclass
class DemoResults:
    model: str
    guilds: list[str]
    feedback_guilds: list[str]
    rounds: int
    feedback_rounds: int
    preference_loss: bool
    judgments: list[Judgment] = field(default_factory=list)
    unanswered: Counter[str] = field(default_factory=Counter)  # phase -> messages, no reply
    swaps: list[Swap] = field(default_factory=list)
    runs: list[RunRecord] = field(default_factory=list)
    matrix: dict[str, dict[str, float]] = field(default_factory=dict)
    side_by_side: list[dict[str, Any]] = field(default_factory=list)
    privacy: dict[str, Any] = field(default_factory=dict)
    stages: list[Stage] = field(default_factory=list)
    imported_pairs: dict[str, int] = field(default_factory=dict)  # at import
    pairs_at_end: dict[str, int] = field(default_factory=dict)  # store.reply_pairs at the end
    repeated_prompts: dict[str, int] = field(default_factory=dict)  # feedback after vs before


# -- statistics -------------------------------------------------------------------------------

def like_counts(judgments: list[Judgment]) -> dict[str, dict[str, tuple[int, int]]]:
    """guild -> phase -> (liked, rated)."""
    out: dict[str, dict[str, list[int]]] = {}
    for j in judgments:
        cell = out.setdefault(j.guild, {}).setdefault(j.phase, [0, 0])
        cell[0] += j.liked
        cell[1] += 1
    return {g: {p: (c[0], c[1]) for p, c in phases.items()} for g, phases in out.items()}


def wilson(liked: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of a rate of ``liked`` in ``n``."""
    if n == 0:
        return 0.0, 1.0
    p = liked / n
    d = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / d
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, centre - half), min(1.0, centre + half)


def fisher_p(k1: int, n1: int, k2: int, n2: int) -> float:
    """Two-sided p-value of Fisher's exact test: ``k1`` liked of ``n1`` against ``k2`` of
    ``n2`` (the tables at most as likely as the observed one, margins fixed)."""
    total, liked = n1 + n2, k1 + k2
    if total == 0:
        return 1.0

    def prob(x: int) -> float:
        return math.comb(n1, x) * math.comb(n2, liked - x) / math.comb(total, liked)

    seen = prob(k1)
    return min(1.0, sum(q for x in range(max(0, liked - n2), min(n1, liked) + 1)
                        if (q := prob(x)) <= seen * (1 + 1e-9)))


def rate_cell(cell: tuple[int, int] | None) -> str:
    if not cell or not cell[1]:
        return "–"
    lo, hi = wilson(*cell)
    return f"{cell[0] / cell[1]:.0%} ({cell[0]}/{cell[1]}; 95% CI {lo:.0%}–{hi:.0%})"


def change_cell(before: tuple[int, int] | None, after: tuple[int, int] | None) -> str:
    """The change in points, and whether it is more than the noise of these sample sizes."""
    if not before or not after or not before[1] or not after[1]:
        return "–"
    points = 100 * (after[0] / after[1] - before[0] / before[1])
    p = fisher_p(before[0], before[1], after[0], after[1])
    verdict = ("more than noise" if p < NOISE_P else
               f"within noise for n = {before[1]} and {after[1]}")
    return f"{points:+.0f} points, p = {p:.2g}: {verdict}"


def served_by_base(judgments: list[Judgment], guild: str, phase: str) -> bool:
    """Whether every reply of ``guild`` in ``phase`` came from the base model: a change from
    the replay before is then the base model's own variation, not an adapter's doing."""
    versions = {j.version for j in judgments if j.guild == guild and j.phase == phase}
    return versions == {None}


BASE_AGAIN = ("; no adapter served this replay either (the base model both times), so this "
              "difference is not a retrain's doing")


def percentile(xs: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..1) of a non-empty list."""
    s = sorted(xs)
    return s[max(0, math.ceil(q * len(s)) - 1)]


def _md(text: Any) -> str:
    """One table-safe line: whitespace collapsed, pipes escaped, control characters (which a
    terminal would act on, and a random model writes) dropped."""
    flat = " ".join(str(text).split()).replace("|", "\\|")
    return "".join(c for c in flat if not unicodedata.category(c).startswith("C"))[:300]


def _thumb(liked: bool) -> str:
    return "👍" if liked else "👎"


# -- the report -------------------------------------------------------------------------------

def write_report(res: DemoResults, out: Path) -> Path:
    """Write report.md, report.json and the charts into ``out``; returns report.md."""
    from .report import like_rate_chart, loss_curve_chart, matrix_chart

    out.mkdir(parents=True, exist_ok=True)
    counts = like_counts(res.judgments)
    main = {g: counts.get(g, {}) for g in res.guilds}
    fed = {g: counts.get(g, {}) for g in res.feedback_guilds}
    likes_png = like_rate_chart(main, out / "like_rate.png", HISTORY_PHASES)
    fed_png = (like_rate_chart(fed, out / "feedback_like_rate.png", FEEDBACK_PHASES,
                               "feedback only: like-rate") if fed else None)
    curves = {f"{r.guild} v{r.version}" if r.version else f"{r.guild} run {r.id} ({r.status})":
              (r.metrics["loss_curve"], int(r.metrics.get("loss_curve_every", 1)))
              for r in res.runs if r.metrics.get("loss_curve")}
    loss_png = loss_curve_chart(curves, out / "training_loss.png")
    matrix_png = matrix_chart(res.matrix, out / "loss_matrix.png") if res.matrix else None

    lines = ["# guildtune demo report", "",
             f"Model `{res.model}`, {len(res.guilds)} guilds ({', '.join(res.guilds)}), "
             f"{res.rounds} replayed prompts per guild before and after training"
             + (f"; then {len(res.feedback_guilds)} guilds with no imported history, "
                f"{res.feedback_rounds} prompts per guild before and after a retrain on "
                "feedback alone" if res.feedback_guilds else "")
             + ". Generated by `guildtune demo`.", ""]
    lines += _like_rates(res, main, likes_png.name)
    lines += _sources(res)
    if res.feedback_guilds:
        lines += _feedback(res, fed, fed_png.name if fed_png else "")
    lines += _swaps_and_latency(res)
    lines += ["## Training loss", "",
              "The loss per step of each run's final fit, as the trainer recorded it (weighted "
              "cross entropy on the reply tokens of a batch).", ""]
    for label, (curve, every) in curves.items():
        lines.append(f"- {label}: {len(curve) * every} steps, loss {curve[0]:.3f} at the "
                     f"first{' ' + str(every) if every > 1 else ''} step{'s' if every > 1 else ''}"
                     f", {curve[-1]:.3f} at the last")
    lines += ["", f"![training loss]({loss_png.name})", ""]
    if matrix_png is not None:
        lines += _matrix(res, matrix_png.name)
    lines += _runs(res)
    lines += _side_by_side(res)
    lines += _every_reply(res)
    lines += _privacy(res)
    lines += ["## Time per stage", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {s.name} | {s.seconds:.1f} |" for s in res.stages]
    lines += [f"| **total** | **{sum(s.seconds for s in res.stages):.1f}** |", ""]
    report = out / "report.md"
    report.write_text("\n".join(lines), encoding="utf-8")
    (out / "report.json").write_text(json.dumps({
        "model": res.model,
        "like_rates": {g: {p: c[0] / c[1] for p, c in ph.items() if c[1]}
                       for g, ph in counts.items()},
        "like_counts": counts, "matrix": res.matrix,
        "stages": {s.name: s.seconds for s in res.stages}, "privacy": res.privacy,
        "runs": [asdict(r) for r in res.runs], "swaps": [asdict(s) for s in res.swaps],
        "latency": _latency(res), "unanswered": dict(res.unanswered),
        "imported_pairs": res.imported_pairs, "pairs_at_end": res.pairs_at_end,
        "judgments": [asdict(j) for j in res.judgments]}, indent=2, default=str),
        encoding="utf-8")
    return report


def _trained_on(r: RunRecord) -> dict[str, int]:
    """The run's examples per source: train and held out together (0 when not recorded)."""
    src = r.metrics.get("sources") or {}
    return {k: int(src.get("train", {}).get(k, 0)) + int(src.get("heldout", {}).get(k, 0))
            for k in SOURCE_WORDS}


def _like_rates(res: DemoResults, main: dict[str, dict[str, tuple[int, int]]],
                png: str) -> list[str]:
    lines = ["## Like-rate of the simulated members", "",
             "Each member rates a reply 👍 when it has their community's preferred words (the "
             "stated preference), else 👎. A rate is shown with its count and 95% interval; a "
             f"change with p ≥ {NOISE_P} (Fisher's exact test) is within noise.", "",
             "| guild | before (base) | after (own adapter) | change |", "|---|---|---|---|"]
    for g, ph in main.items():
        again = BASE_AGAIN if served_by_base(res.judgments, g, "after") else ""
        lines.append(f"| {g} | {rate_cell(ph.get('before'))} | {rate_cell(ph.get('after'))} "
                     f"| {change_cell(ph.get('before'), ph.get('after'))}{again} |")
    lines += ["", f"![like-rate]({png})", ""]
    used = Counter[str]()
    for r in res.runs:
        if r.loop == "history" and r.status == "succeeded":
            used.update(_trained_on(r))
    total = sum(used.values())
    if total:
        mostly = ("so the change is mostly the imported history's doing, not the members' 👍"
                  if used["human"] > total / 2 else "so most of it is the members' feedback")
        alone = (" What feedback does alone is measured in \"Feedback only\" below."
                 if res.feedback_guilds else "")
        lines += [f"What these adapters learned from: {used['human']} of {total} examples "
                  f"({used['human'] / total:.0%}) are the imported history, {used['liked']} "
                  f"liked replies and {used['correction']} corrections (next section), "
                  f"{mostly}.{alone}", ""]
    return lines


def _sources(res: DemoResults) -> list[str]:
    lines = ["## Where the training data came from", "",
             "Counted by the trainer as it built each run's dataset (the run's recorded "
             "metrics), after consent, scrubbing, deduplication and the per-member cap. "
             "\"Imported history\" is members' replies to each other (`learn_from_humans`): in "
             "this demo all of them come from the import, since its members talk only to the "
             "bot.", "",
             "| guild | run | version | imported history | liked replies | corrections | "
             "total | of which held out for the gate | disliked (negatives) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in res.runs:
        if "sources" not in r.metrics:
            lines.append(f"| {r.guild} | {r.id} | – | – | – | – | – | – | – |")
            continue
        n = _trained_on(r)
        held = sum((r.metrics["sources"].get("heldout") or {}).values())
        lines.append(f"| {r.guild} | {r.id} ({r.status}) | {r.version or '–'} | {n['human']} | "
                     f"{n['liked']} | {n['correction']} | {sum(n.values())} | {held} | "
                     f"{r.metrics.get('n_negatives', 0)} |")
    pref = ("used by the preference term" if res.preference_loss else
            "not trained on: the preference term (`training.preference_loss`) is off")
    lines += ["", f"Disliked replies are never a target; here they are {pref}. Reply pairs "
              "imported: " + ", ".join(f"{g} {n}" for g, n in res.imported_pairs.items())
              + "; stored at the end: " + ", ".join(f"{g} {n}"
                                                    for g, n in res.pairs_at_end.items())
              + ".", ""]
    return lines


def _feedback(res: DemoResults, fed: dict[str, dict[str, tuple[int, int]]],
              png: str) -> list[str]:
    lines = ["## Feedback only: a retrain from 👍/👎 and corrections alone", "",
             "Two new guilds of the same communities, with no imported history and "
             "`learn_from_humans` off, so the retrain can learn only from the bot's replies "
             "members liked and the better replies they wrote. All four members opted in; "
             "the asker rates the reply to their message and, disliking it, writes the reply "
             "they wanted (a correction). The replay after the retrain uses prompts "
             "it did not use before.", "",
             "| guild | before (base) | after (feedback-only adapter) | change | retrain "
             "learned from |", "|---|---|---|---|---|"]
    runs = {r.guild: r for r in res.runs if r.loop == "feedback"}
    for g, ph in fed.items():
        r = runs.get(g)
        if r is None:
            learned = "no run"
        else:
            n = _trained_on(r)
            learned = (f"{n['liked']} liked, {n['correction']} corrections, {n['human']} "
                       f"imported; run {r.status}" + (f" (v{r.version})" if r.version else "")
                       + (f": {_md(r.error)}" if r.error else ""))
        again = BASE_AGAIN if served_by_base(res.judgments, g, "feedback after") else ""
        lines.append(f"| {g} | {rate_cell(ph.get('feedback before'))} | "
                     f"{rate_cell(ph.get('feedback after'))} | "
                     f"{change_cell(ph.get('feedback before'), ph.get('feedback after'))}"
                     f"{again} | {learned} |")
    repeated = {g: k for g, k in res.repeated_prompts.items() if k}
    if repeated:
        lines += ["", "Prompts the replay after shares with the one before (too few distinct "
                  "prompts): " + ", ".join(f"{g} {k}" for g, k in repeated.items()) + "."]
    lines += ["", f"![feedback like-rate]({png})", ""]
    return lines


def _latency(res: DemoResults) -> dict[str, dict[str, float]]:
    out = {}
    for phase in dict.fromkeys(j.phase for j in res.judgments):
        xs = [j.seconds for j in res.judgments if j.phase == phase]
        out[phase] = {"replies": len(xs), "unanswered": res.unanswered.get(phase, 0),
                      "median_s": percentile(xs, 0.5), "p90_s": percentile(xs, 0.9),
                      "max_s": max(xs)}
    return out


def _swaps_and_latency(res: DemoResults) -> list[str]:
    during = [j for j in res.judgments if j.phase == "during"]
    swapped = sum(j.version is not None for j in during)
    lines = ["## Hot swap and latency while training ran", "",
             "The engine was loaded once, at the start, and served throughout: each new "
             "version was swapped in by the adapter watcher's poll (every 0.5 s here) while "
             "members kept chatting.", "",
             f"While the first training ran: {len(during) + res.unanswered.get('during', 0)} "
             f"messages, {len(during)} answered, {res.unanswered.get('during', 0)} without a "
             f"reply; {swapped} of the answers came from an adapter swapped in meanwhile.", "",
             "| guild | version | swapped in while training ran | store → serving (s) | "
             "the swapping poll (s) |", "|---|---|---|---|---|"]
    for s in res.swaps:
        lines.append(f"| {s.guild} | v{s.version} | {'yes' if s.during_training else 'no'} | "
                     + (f"{s.after_publish_s:.2f}" if s.after_publish_s is not None else "–")
                     + f" | {s.poll_s:.2f} |")
    lines += ["", "Reply latency (`Core.chat`, message to reply, seconds), by phase:", "",
              "| phase | replies | without a reply | median | p90 | max |",
              "|---|---|---|---|---|---|"]
    for phase, m in _latency(res).items():
        lines.append(f"| {phase} | {m['replies']} | {m['unanswered']} | {m['median_s']:.2f} | "
                     f"{m['p90_s']:.2f} | {m['max_s']:.2f} |")
    lines.append("")
    return lines


def _matrix(res: DemoResults, png: str) -> list[str]:
    cols = res.guilds
    lines = ["## Held-out loss matrix", "",
             "Per-token loss on each guild's held-out examples (lower is better). Rows: the "
             "base model and each guild's adapter; columns: whose held-out data.", "",
             "| model | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for label, row in res.matrix.items():
        lines.append(f"| {label} | " + " | ".join(
            f"{row[c]:.3f}" if c in row and not math.isnan(row[c]) else "–"
            for c in cols) + " |")
    return [*lines, "", f"![loss matrix]({png})", ""]


def _runs(res: DemoResults) -> list[str]:
    lines = ["## Training runs", ""]
    for r in res.runs:
        m = r.metrics
        lines.append(f"- {r.guild}: run {r.id} **{r.status}**"
                     + (f", version {r.version}" if r.version else "")
                     + (f"; {m.get('n_train')} train / {m.get('n_heldout')} held-out "
                        f"examples ({m.get('eval', 'time split')}), {m.get('steps')} steps, "
                        f"{m.get('tokens_per_s')} tok/s; gate: {m.get('gate')}"
                        if "n_train" in m else "")
                     + (f"; error: {r.error}" if r.error else ""))
    return [*lines, ""]


def _side_by_side(res: DemoResults) -> list[str]:
    lines = ["## Same prompts, base model vs adapters", "",
             "Greedy replies to the last prompts of each guild, rated by that guild's "
             "members' preference.", ""]
    for row in res.side_by_side:
        lines += [f"**{row['guild']}** — _{_md(row['prompt'])}_", ""]
        for label, (text, liked) in row["replies"].items():
            lines.append(f"- {label} {_thumb(liked)}: {_md(text) or '(no reply)'}")
        lines.append("")
    return lines


def _every_reply(res: DemoResults) -> list[str]:
    lines = ["## Every rated reply", "",
             "Each replayed prompt, the reply its asker got and their rating (✎: they wrote "
             "a better reply).", ""]
    for phase, words in (*HISTORY_PHASES, *((p, f"feedback only, {w}")
                                           for p, w in FEEDBACK_PHASES)):
        for g in (*res.guilds, *res.feedback_guilds):
            rows = [j for j in res.judgments if j.guild == g and j.phase == phase]
            if not rows:
                continue
            liked = sum(j.liked for j in rows)
            lines += [f"**{g}, {words}**: {liked} of {len(rows)} liked", "",
                      "| # | prompt | reply | model | rating |", "|---|---|---|---|---|"]
            for k, j in enumerate(rows, 1):
                lines.append(f"| {k} | {_md(j.prompt)} | {_md(j.reply) or '(no reply)'} | "
                             f"{'v' + str(j.version) if j.version else 'base'} | "
                             f"{_thumb(j.liked)}{' ✎' if j.corrected else ''} |")
            lines.append("")
    return lines


def _privacy(res: DemoResults) -> list[str]:
    p = res.privacy
    lines = ["## What was stored", "",
             f"In {', '.join(res.guilds)}, members 0 and 1 opted in; members 2 and 3 did not.",
             "", "| guild | member | opted in | interactions stored | ratings stored |",
             "|---|---|---|---|---|"]
    for m in p.get("members", []):
        lines.append(f"| {m['guild']} | {m['member']} | {'yes' if m['opted_in'] else 'no'} "
                     f"| {m['interactions_stored']} | {m['ratings_stored']} |")
    return [*lines, "", f"{p.get('contexts', 0)} stored contexts hold "
            f"{p.get('placeholders', 0)} placeholders where a non-consenting member's message "
            f"was; {p.get('non_consented_ids_in_contexts', 0)} ids of non-consenting members "
            "appear in them.", ""]
