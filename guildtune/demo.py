"""``guildtune demo``: the whole loop, offline, in one command.

Two (or more) guilds are replayed through the same handlers as the Discord Cog and the console
(``bot.handlers.Core``): members chat with the bot, some opted in and some not, and rate its
replies by their community's stated preference. A scheduler tick enqueues training, the worker
trains each guild's adapter in its own process, the gate checks it, and the adapter watcher
hot-swaps it into the running engine while the replay keeps chatting. Then it writes a Markdown
report with charts: base vs adapters side by side, the held-out loss matrix, like-rates before
and after, and the time spent in each stage.

This module is a UI: it prints progress on purpose.

Over 400 lines on purpose: one script, its stages in the order they run.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import math
import random
import re
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from storage.times import utc_now

from .community import ChatMessage, read_community, reply_pairs
from .config import Config
from .demo_script import COMMUNITIES, Community, history, prompts

log = logging.getLogger(__name__)

MEMBERS_PER_GUILD = 4  # members 0 and 1 opt in, 2 and 3 do not
CONSENTING = 2
_STOP = frozenset("""the and for that this with you have are was not but what can all any your
from they will just about there would them then than when one like get how out has its also
into some could know does dont it's i'm that's don't yeah well here think more need only
been were which their make want good sure""".split())


@dataclass
class DemoGuild:
    name: str
    guild_id: int
    community: Community
    history: list[ChatMessage]
    prompts: list[str]
    members: list[int] = field(default_factory=list)


@dataclass
class Stage:
    name: str
    seconds: float


class DemoChannel:
    """A ``ReplyChannel`` that keeps what the bot sent (the demo prints and rates it)."""

    def __init__(self) -> None:
        self.ids = itertools.count(900_000_000_000_000_000)
        self.sent: list[tuple[int, str]] = []

    def new_id(self) -> int:
        return next(self.ids)

    @asynccontextmanager
    async def typing(self) -> Any:
        yield

    async def send(self, text: str, *, first: bool, last: bool) -> int:
        mid = self.new_id()
        self.sent.append((mid, text))
        return mid


def _words(text: str) -> list[str]:
    return [w for w in re.findall(r"[a-z][a-z']{3,}", text.lower()) if w not in _STOP]


def community_from_file(path: Path, others: list[list[ChatMessage]]) -> Community:
    """A community read from a file; its members like replies with its most distinctive words
    (frequent here, rare in the other files)."""
    mine = read_community(path)
    counts = Counter(w for m in mine for w in _words(m.text))
    other = Counter(w for msgs in others for m in msgs for w in _words(m.text))
    total_o = max(sum(other.values()), 1)
    total_m = max(sum(counts.values()), 1)
    scored = sorted(((c / total_m) / ((other[w] + 1) / total_o), w)
                    for w, c in counts.items() if c >= 3)
    liked = tuple(w for _, w in scored[-25:]) or tuple(w for w, _ in counts.most_common(25))
    return Community(name=path.stem.replace("irc-", ""), liked_words=liked, reply_templates=(),
                     persona=f"You are a member of the {path.stem} community. Answer like its "
                             "members do.")


def build_guilds(data: list[Path]) -> list[DemoGuild]:
    """The built-in two communities, or one guild per file given with --data."""
    guilds = []
    if not data:
        for i, c in enumerate(COMMUNITIES):
            guilds.append(DemoGuild(c.name, 100_000_000_000_000_001 + i, c, history(c),
                                    prompts(c, 200)))
        return guilds
    loaded = [read_community(p) for p in data]
    for i, (path, msgs) in enumerate(zip(data, loaded)):
        c = community_from_file(path, [m for j, m in enumerate(loaded) if j != i])
        rng = random.Random(i)
        parents = [p.text for p, _ in reply_pairs(msgs) if 8 <= len(p.text) <= 200]
        rng.shuffle(parents)
        guilds.append(DemoGuild(c.name, 100_000_000_000_000_001 + i, c, msgs,
                                parents[:200] or [m.text for m in msgs[:200]]))
    return guilds


class Demo:
    """One demo run: state, stages and the report."""

    def __init__(self, cfg: Config, out: Path, guilds: list[DemoGuild], rounds: int,
                 console: Any) -> None:
        self.cfg = cfg
        self.out = out
        self.guilds = guilds
        self.rounds = rounds
        self.console = console
        self.stages: list[Stage] = []
        self.judgments: dict[str, list[tuple[str, int | None, bool]]] = {}  # phase -> rows
        self.prompt_iter = {g.guild_id: itertools.cycle(g.prompts) for g in guilds}
        self.channel = DemoChannel()
        self.history: dict[int, list[Any]] = {g.guild_id: [] for g in guilds}
        self.side_by_side: list[dict[str, Any]] = []
        self.matrix: dict[str, dict[str, float]] = {}
        self.train_runs: list[Any] = []
        self.privacy: dict[str, Any] = {}
        self.during_pause = 0.5 if cfg.model.name == "tiny" else 5.0

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.console.print(f"[bold]▶ {name}[/bold]")
        t = time.perf_counter()
        yield
        self.stages.append(Stage(name, time.perf_counter() - t))
        self.console.print(f"  done in {self.stages[-1].seconds:.1f} s")

    # -- the replay ------------------------------------------------------------------------------

    async def chat_once(self, core: Any, g: DemoGuild, phase: str, rng: random.Random) -> None:
        from bot.context import Turn

        member = g.members[rng.randrange(len(g.members))]
        text = next(self.prompt_iter[g.guild_id])
        mid = self.channel.new_id()
        turn = Turn("user", member, mid, text, created_utc=utc_now())
        turns = [*self.history[g.guild_id][-4:], turn]
        outcome = await core.chat(self.channel, guild_id=g.guild_id, channel_id=g.guild_id + 1,
                                  user_id=member, request_message_id=mid, turns=turns)
        if outcome.result is None:
            return
        reply = outcome.result.text
        self.history[g.guild_id] += [turn, Turn("assistant", None, outcome.feedback_message_id,
                                                reply, created_utc=utc_now())]
        liked = g.community.likes(reply)
        self.judgments.setdefault(phase, []).append((g.name, outcome.result.adapter_version,
                                                     liked))
        # Every member who saw it rates it; the store keeps only opted-in members' ratings.
        for rater in g.members:
            await core.rate(g.guild_id, outcome.feedback_message_id, rater, 1 if liked else -1)

    async def replay(self, core: Any, phase: str, rounds: int, progress: Any) -> None:
        rng = random.Random(phase)
        task = progress.add_task(f"{phase}: chatting", total=rounds * len(self.guilds))
        for _ in range(rounds):
            for g in self.guilds:
                await self.chat_once(core, g, phase, rng)
                progress.advance(task)

    # -- stages ----------------------------------------------------------------------------------

    async def run(self) -> Path:
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn)

        from bot.core import Core
        from bot.services import open_services
        from bot.watcher import AdapterWatcher
        from guildtune.schedule import enqueue_due
        from trainer.worker import run_worker

        resources = AsyncExitStack()  # one owner: open_services closes what it opened
        with self.stage(f"load {self.cfg.model.name} and open the store"):
            services = await resources.enter_async_context(open_services(self.cfg))
            services.clock = _FastClock()  # the replay is faster than any human rate limit
            store = services.store
        core = Core(services)
        watcher = AdapterWatcher(services, interval=0.5)
        try:
            with self.stage("import each community's history (consent asserted by the "
                            "operator) and set up members"):
                for g in self.guilds:
                    n = await asyncio.to_thread(store.import_messages, g.guild_id,
                                                [m.as_store_row() for m in g.history])
                    await asyncio.to_thread(store.update_guild_settings, g.guild_id,
                                            training_enabled=True, learn_from_humans=True,
                                            persona=g.community.persona)
                    g.members = [g.guild_id * 10 + k for k in range(MEMBERS_PER_GUILD)]
                    for m in g.members[:CONSENTING]:
                        await core.consent(g.guild_id, m, True)
                    self.console.print(f"  {g.name}: {n} messages, "
                                       f"{len(store.reply_pairs(g.guild_id))} reply pairs; "
                                       f"{CONSENTING} of {len(g.members)} chatting members "
                                       "opted in")
            watcher.start()
            # MofN shows "44/?" for the open-ended phase (chatting while training runs).
            cols = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn())
            with Progress(*cols, console=self.console, transient=False) as progress:
                with self.stage("replay before training (base model)"):
                    await self.replay(core, "before", self.rounds, progress)
                with self.stage("scheduler tick, train, gate, hot swap (chat goes on)"):
                    queued = await asyncio.to_thread(enqueue_due, store, self.cfg)
                    self.console.print(f"  scheduler enqueued runs {queued}")
                    # One process, as the demo promises: the worker trains in this process
                    # (the bot's own worker isolates each run in a child process instead).
                    worker = asyncio.create_task(asyncio.to_thread(
                        run_worker, self.cfg, once=True, worker_id="demo-worker",
                        isolate=False))
                    rng = random.Random("during")
                    task = progress.add_task("during training: chatting", total=None)
                    while not worker.done():
                        for g in self.guilds:
                            await self.chat_once(core, g, "during", rng)
                            progress.advance(task)
                        # Chat on, but leave the CPU to training (a reply every few seconds).
                        await asyncio.wait([worker], timeout=self.during_pause)
                    await worker
                    await watcher.sync_once()
                    self.train_runs = [r for g in self.guilds for r in store.runs(g.guild_id, 1)]
                    for r in self.train_runs:
                        m = r.metrics or {}
                        self.console.print(
                            f"  guild {self.name_of(r.guild_id)}: run {r.id} {r.status}"
                            + (f" v{r.version}" if r.version else "")
                            + (f", held-out loss base {m['base_loss']:.3f} → candidate "
                               f"{m['candidate_loss']:.3f}" if 'base_loss' in m else "")
                            + (f" ({r.error})" if r.error else ""))
                    self.console.print(f"  engine now serving {services.engine.active_versions()}")
                with self.stage("replay after the hot swap"):
                    await self.replay(core, "after", self.rounds, progress)
            with self.stage("same prompts: base model vs each guild's adapter"):
                await self.compare(services)
            self.privacy = self.privacy_report(store)
        finally:
            await watcher.stop()
            await resources.aclose()
        with self.stage("held-out loss matrix"):
            await asyncio.to_thread(self.loss_matrix)
        return self.write_report()

    def name_of(self, guild_id: int) -> str:
        return next(g.name for g in self.guilds if g.guild_id == guild_id)

    async def compare(self, services: Any) -> None:
        from bot.engine import GenerationRequest

        serving = services.engine.active_versions()
        for g in self.guilds:
            for text in g.prompts[-3:]:
                msgs = [{"role": "system", "content": g.community.persona},
                        {"role": "user", "content": text}]
                row: dict[str, Any] = {"guild": g.name, "prompt": text}
                base = await services.engine.generate(GenerationRequest(None, msgs,
                                                                        temperature=0.0))
                row["base"] = base.text
                for other in self.guilds:
                    if other.guild_id in serving:
                        res = await services.engine.generate(GenerationRequest(
                            other.guild_id, msgs, temperature=0.0))
                        row[f"{other.name} v{res.adapter_version}"] = res.text
                self.side_by_side.append(row)

    def loss_matrix(self) -> None:
        """Rows: base and each guild's active adapter; columns: each guild's held-out data."""
        from storage import open_store
        from trainer.data import build_dataset
        from trainer.evaluate import heldout_loss
        from trainer.pipeline import load_base

        store = open_store(self.cfg.db_path)
        try:
            heldout = {g.name: build_dataset(store, g.guild_id, self.cfg).heldout
                       for g in self.guilds}
            active = {g.name: store.active_version(g.guild_id) for g in self.guilds}
        finally:
            store.close()
        lm = load_base(self.cfg)
        ml = self.cfg.training.max_seq_len
        self.matrix["base"] = {n: heldout_loss(lm.model, lm.tokenizer, ex, max_seq_len=ml)[0]
                               for n, ex in heldout.items() if ex}
        from peft import PeftModel

        peft_model = None
        for name, version in active.items():
            if version is None:
                continue
            label = f"{name} v{version.version}"
            if peft_model is None:
                peft_model = PeftModel.from_pretrained(lm.model, version.path, adapter_name="a0")
                adapter = "a0"
            else:
                adapter = f"a{len(self.matrix)}"
                peft_model.load_adapter(version.path, adapter_name=adapter)
            peft_model.set_adapter(adapter)
            self.matrix[label] = {n: heldout_loss(peft_model, lm.tokenizer, ex,
                                                  max_seq_len=ml)[0]
                                  for n, ex in heldout.items() if ex}

    def privacy_report(self, store: Any) -> dict[str, Any]:
        out: dict[str, Any] = {"members": []}
        for g in self.guilds:
            for k, m in enumerate(g.members):
                data = store.export_user(m, g.guild_id)
                out["members"].append({
                    "guild": g.name, "member": f"member{k}", "opted_in": k < CONSENTING,
                    "interactions_stored": len(data["interactions"]),
                    "ratings_stored": len(data["feedback"])})
        contexts = [json.dumps(r["context"]) for g in self.guilds
                    for r in store.rated_interactions(g.guild_id)]
        out["contexts"] = len(contexts)
        out["placeholders"] = sum(c.count("has not opted in") for c in contexts)
        out["non_consented_ids_in_contexts"] = sum(
            1 for g in self.guilds for m in g.members[CONSENTING:]
            if any(str(m) in c for c in contexts))
        return out

    # -- the report ------------------------------------------------------------------------------

    def like_rates(self) -> dict[str, dict[str, float]]:
        rates: dict[str, dict[str, float]] = {}
        for phase in ("before", "after"):
            for g in self.guilds:
                rows = [liked for name, _, liked in self.judgments.get(phase, []) if name == g.name]
                if rows:
                    rates.setdefault(g.name, {})[phase] = sum(rows) / len(rows)
        return rates

    def write_report(self) -> Path:
        from .report import like_rate_chart, matrix_chart

        self.out.mkdir(parents=True, exist_ok=True)
        rates = self.like_rates()
        matrix_png = matrix_chart(self.matrix, self.out / "loss_matrix.png")
        likes_png = like_rate_chart(rates, self.out / "like_rate.png")
        cols = [g.name for g in self.guilds]
        lines = ["# guildtune demo report", "",
                 f"Model `{self.cfg.model.name}`, {len(self.guilds)} guilds "
                 f"({', '.join(cols)}), {self.rounds} replayed prompts per guild before and "
                 "after training. Generated by `guildtune demo`.", "",
                 "## Like-rate of the simulated members", "",
                 "Each member rates a reply 👍 when it has their community's preferred words "
                 "(the stated preference), else 👎.", "",
                 "| guild | before (base) | after (own adapter) |", "|---|---|---|"]
        for name, r in rates.items():
            lines.append(f"| {name} | {r.get('before', float('nan')):.0%} | "
                         f"{r.get('after', float('nan')):.0%} |")
        lines += ["", f"![like-rate]({likes_png.name})", "", "## Held-out loss matrix", "",
                  "Per-token loss on each guild's held-out examples (lower is better). Rows: the "
                  "base model and each guild's adapter; columns: whose held-out data.", "",
                  "| model | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
        for label, row in self.matrix.items():
            lines.append(f"| {label} | " + " | ".join(
                f"{row[c]:.3f}" if c in row and not math.isnan(row[c]) else "–"
                for c in cols) + " |")
        lines += ["", f"![loss matrix]({matrix_png.name})", "", "## Training runs", ""]
        for r in self.train_runs:
            m = r.metrics or {}
            lines.append(f"- {self.name_of(r.guild_id)}: run {r.id} **{r.status}**"
                         + (f", version {r.version}" if r.version else "")
                         + (f"; {m.get('n_train')} train / {m.get('n_heldout')} held-out "
                            f"examples ({m.get('eval', 'time split')}), {m.get('steps')} steps, "
                            f"{m.get('tokens_per_s')} tok/s; gate: {m.get('gate')}"
                            if "n_train" in m else "")
                         + (f"; error: {r.error}" if r.error else ""))
        lines += ["", "## Same prompts, base model vs adapters", ""]
        for row in self.side_by_side:
            lines.append(f"**{row['guild']}** — _{_md(row['prompt'])}_")
            lines.append("")
            for k, v in row.items():
                if k not in ("guild", "prompt"):
                    lines.append(f"- {k}: {_md(v)}")
            lines.append("")
        p = self.privacy
        lines += ["## What was stored", "",
                  "Members 0 and 1 of each guild opted in; members 2 and 3 did not.", "",
                  "| guild | member | opted in | interactions stored | ratings stored |",
                  "|---|---|---|---|---|"]
        for m in p.get("members", []):
            lines.append(f"| {m['guild']} | {m['member']} | {'yes' if m['opted_in'] else 'no'} "
                         f"| {m['interactions_stored']} | {m['ratings_stored']} |")
        lines += ["", f"{p.get('contexts', 0)} stored contexts hold {p.get('placeholders', 0)} "
                  "placeholders where a non-consenting member's message was; "
                  f"{p.get('non_consented_ids_in_contexts', 0)} ids of non-consenting members "
                  "appear in them.", "", "## Time per stage", "", "| stage | seconds |",
                  "|---|---|"]
        for s in self.stages:
            lines.append(f"| {s.name} | {s.seconds:.1f} |")
        total = sum(s.seconds for s in self.stages)
        lines += [f"| **total** | **{total:.1f}** |", ""]
        report = self.out / "report.md"
        report.write_text("\n".join(lines), encoding="utf-8")
        (self.out / "report.json").write_text(json.dumps({
            "model": self.cfg.model.name, "like_rates": rates, "matrix": self.matrix,
            "stages": {s.name: s.seconds for s in self.stages}, "privacy": p,
            "runs": [{"guild": self.name_of(r.guild_id), "status": r.status,
                      "version": r.version, "metrics": r.metrics, "error": r.error}
                     for r in self.train_runs]}, indent=2, default=str), encoding="utf-8")
        return report


class _FastClock:
    """A clock that advances a minute per reading, so rate limits never refuse the replay."""

    def __init__(self) -> None:
        self.t = time.time()

    def __call__(self) -> float:
        self.t += 60.0
        return self.t


def _md(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")[:300]


def demo_config(base: Config, out: Path, model: str | None) -> Config:
    """The demo's config: a fresh data dir under ``out`` (the model cache survives runs),
    training enabled (the operator asserts permission for this synthetic or CC-BY data)."""
    data_dir = out / "data"
    for name in ("guildtune.db", "guildtune.db-wal", "guildtune.db-shm"):
        (data_dir / name).unlink(missing_ok=True)
    shutil.rmtree(data_dir / "adapters", ignore_errors=True)
    tiny = (model or base.model.name) == "tiny"
    return base.replace(
        storage={"data_dir": str(data_dir)},
        model={"name": model or base.model.name, "max_new_tokens": 24 if tiny else 32,
               "temperature": 0.3, "batch_wait_ms": 5},
        training={"enabled": True, "min_new_examples": 5, "epochs": 6.0 if tiny else 1.0,
                  "max_steps": 100 if tiny else 0, "learning_rate": 5e-3 if tiny else 6e-4,
                  "poll_seconds": 0.5, "max_examples": 400, "eval_margin": 0.0},
        privacy={"max_user_share": 0.5},
    )


def run_demo(cfg: Config, out: Path, data: list[Path], rounds: int, console: Any) -> Path:
    """Run the demo and return the report's path."""
    guilds = build_guilds(data)
    demo = Demo(cfg, out, guilds, rounds, console)
    return asyncio.run(demo.run())
