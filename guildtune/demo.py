"""``guildtune demo``: the whole loop, offline, in one command.

Two (or more) guilds are replayed through the same handlers as the Discord Cog and the console
(``bot.handlers.Core``, driven by ``guildtune.demo_members``): members chat with the bot, some
opted in and some not, and rate its replies by their community's stated preference. A
scheduler tick enqueues training, the worker trains each guild's adapter, the gate checks it,
and the adapter watcher hot-swaps it into the running engine while the replay keeps chatting.
Then the feedback loop alone: new guilds of the same communities, with no imported history,
whose members only rate and correct the bot, a retrain from that, and its own before/after.
``guildtune.demo_report`` writes the report: like-rates with their sample sizes, where each
run's training data came from, hot-swap and latency numbers, the loss curves, the held-out loss
matrix and every rated reply.

This module is a UI: it prints progress on purpose.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import random
import re
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import AsyncExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from storage.times import parse_utc

from .community import ChatMessage, read_community, reply_pairs
from .config import Config
from .demo_members import FastClock, ReplayChannel, member_turn
from .demo_report import DemoResults, Judgment, RunRecord, Stage, Swap, write_report
from .demo_script import COMMUNITIES, Community, better_reply, history, prompts

log = logging.getLogger(__name__)

MEMBERS_PER_GUILD = 4  # members 0 and 1 opt in, 2 and 3 do not (feedback-only guilds: all)
CONSENTING = 2
# Prompts per feedback-only guild before and after its retrain, at least: every one the asker
# dislikes gets a correction, so this many give a first run its MIN_EXAMPLES (10) and a few more.
FEEDBACK_ROUNDS = 12
FEEDBACK_ID_OFFSET = 100  # a feedback-only guild's id: its community's guild id + this
POLL_S = 0.5  # the demo's adapter watcher polls this often
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
    answers: dict[str, str] = field(default_factory=dict)  # prompt -> a member's own answer
    feedback_only: bool = False  # no imported history; the asker corrects what they dislike

    def better(self, prompt: str) -> str | None:
        """What a member would have written instead of a reply they disliked."""
        if self.community.reply_templates:
            return better_reply(self.community, prompt)
        return self.answers.get(prompt)


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
        pairs = [(p.text, r.text) for p, r in reply_pairs(msgs) if 8 <= len(p.text) <= 200]
        answers: dict[str, str] = {}
        for parent, reply in pairs:
            answers.setdefault(parent, reply)  # the community's own answer, for corrections
        parents = [p for p, _ in pairs]
        rng.shuffle(parents)
        guilds.append(DemoGuild(c.name, 100_000_000_000_000_001 + i, c, msgs,
                                parents[:200] or [m.text for m in msgs[:200]], answers=answers))
    return guilds


def feedback_twin(g: DemoGuild) -> DemoGuild:
    """A new guild of ``g``'s community that imports nothing: its model can learn only from
    its members' ratings and corrections. Its prompts are ``g``'s without repeats, so the
    replay after its retrain does not ask what the one before asked (and had corrected)."""
    return DemoGuild(f"{g.name} (feedback only)", g.guild_id + FEEDBACK_ID_OFFSET, g.community,
                     [], list(dict.fromkeys(g.prompts)), answers=g.answers, feedback_only=True)


class Demo:
    """One demo run: state, stages and what the report is written from (``self.res``)."""

    def __init__(self, cfg: Config, out: Path, guilds: list[DemoGuild], rounds: int,
                 console: Any, feedback_rounds: int | None = None) -> None:
        self.cfg = cfg
        self.out = out
        self.guilds = guilds
        self.rounds = rounds
        # None: the default; 0: no feedback-only phase.
        self.feedback_rounds = (max(rounds, FEEDBACK_ROUNDS) if feedback_rounds is None
                                else feedback_rounds)
        self.feedback_guilds = [feedback_twin(g) for g in guilds] if self.feedback_rounds else []
        self.console = console
        self.res = DemoResults(cfg.model.name, [g.name for g in guilds],
                               [g.name for g in self.feedback_guilds], rounds,
                               self.feedback_rounds, cfg.training.preference_loss)
        self.prompt_iter = {g.guild_id: itertools.cycle(g.prompts)
                            for g in (*guilds, *self.feedback_guilds)}
        self.channel = ReplayChannel()
        self.history: dict[int, list[Any]] = {g.guild_id: []
                                               for g in (*guilds, *self.feedback_guilds)}
        self.during_pause = 0.5 if cfg.model.name == "tiny" else 5.0
        self.training = False  # a training run is going on (swaps made now are "during")
        self._sync_lock = asyncio.Lock()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.console.print(f"[bold]▶ {name}[/bold]")
        t = time.perf_counter()
        yield
        self.res.stages.append(Stage(name, time.perf_counter() - t))
        self.console.print(f"  done in {self.res.stages[-1].seconds:.1f} s")

    # -- the replay ------------------------------------------------------------------------------

    async def chat_once(self, core: Any, g: DemoGuild, phase: str, rng: random.Random) -> None:
        """A random member of ``g`` sends the guild's next prompt. Every member rates the reply
        (the store keeps opted-in members' ratings); in a feedback-only guild only the asker
        does, and writes a better reply for one they dislike."""
        text = next(self.prompt_iter[g.guild_id])
        member = g.members[rng.randrange(len(g.members))]
        done = await member_turn(
            core, self.channel, guild_id=g.guild_id, member=member, text=text,
            likes=g.community.likes, raters=[member] if g.feedback_only else g.members,
            context=self.history[g.guild_id][-4:],
            better=(lambda: g.better(text)) if g.feedback_only else None)
        if done.reply is None:
            self.res.unanswered[phase] += 1
            return
        self.history[g.guild_id] += done.turns
        self.res.judgments.append(Judgment(g.name, phase, text, done.reply, done.version,
                                           bool(done.liked), done.corrected, done.seconds))

    async def replay(self, core: Any, phase: str, rounds: int, progress: Any,
                     guilds: list[DemoGuild]) -> None:
        rng = random.Random(phase)
        task = progress.add_task(f"{phase}: chatting", total=rounds * len(guilds))
        for _ in range(rounds):
            for g in guilds:
                await self.chat_once(core, g, phase, rng)
                progress.advance(task)

    async def sync(self, watcher: Any) -> None:
        """One poll of the adapter watcher (what its own loop does every interval), timed;
        records each version it swapped in and how long after the store named it active."""
        async with self._sync_lock:
            engine, store = watcher.s.engine, watcher.s.store
            serving = dict(engine.active_versions())
            t = time.perf_counter()
            await watcher.sync_once()
            seconds, now = time.perf_counter() - t, time.time()
            for gid, version in sorted(engine.active_versions().items()):
                if serving.get(gid) == version:
                    continue
                info = await asyncio.to_thread(store.get_version, gid, version)
                stamp = info and (info.activated_utc or info.created_utc)
                self.res.swaps.append(Swap(self.name_of(gid), version, round(seconds, 3),
                                           round(now - parse_utc(stamp).timestamp(), 3)
                                           if stamp else None, self.training))

    async def train_queued(self, core: Any, progress: Any, watcher: Any,
                           chat: list[DemoGuild]) -> None:
        """Train every queued run in this process (the worker, once) while the guilds in
        ``chat`` go on chatting; then the last swap."""
        from trainer.worker import run_worker

        # One process, as the demo promises: the worker trains in this process (the bot's
        # own worker isolates each run in a child process instead).
        self.training = True
        worker = asyncio.create_task(asyncio.to_thread(
            run_worker, self.cfg, once=True, worker_id="demo-worker", isolate=False))
        rng = random.Random("during")
        task = progress.add_task("during training: chatting", total=None) if chat else None
        try:
            while not worker.done():
                for g in chat:
                    await self.chat_once(core, g, "during", rng)
                    progress.advance(task)
                # Chat on, but leave the CPU to training (a reply every few seconds).
                await asyncio.wait([worker], timeout=self.during_pause)
            await worker
        finally:
            self.training = False
        await self.sync(watcher)

    def record_runs(self, store: Any, guilds: list[DemoGuild], loop: str) -> list[RunRecord]:
        runs = [RunRecord(g.name, loop, r.id, r.status, r.version, r.metrics or {}, r.error)
                for g in guilds for r in store.runs(g.guild_id, 1)]
        for r in runs:
            m = r.metrics
            self.console.print(
                f"  guild {r.guild}: run {r.id} {r.status}"
                + (f" v{r.version}" if r.version else "")
                + (f", held-out loss base {m['base_loss']:.3f} → candidate "
                   f"{m['candidate_loss']:.3f}" if "base_loss" in m else "")
                + (f" ({r.error})" if r.error else ""))
        self.res.runs += runs
        return runs

    # -- stages ----------------------------------------------------------------------------------

    async def run(self) -> Path:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        from bot.core import Core
        from bot.services import open_services
        from bot.watcher import AdapterWatcher, cancel_and_wait, poll_forever
        from guildtune.schedule import enqueue_due

        resources = AsyncExitStack()  # one owner: open_services closes what it opened
        with self.stage(f"load {self.cfg.model.name} and open the store"):
            services = await resources.enter_async_context(open_services(self.cfg))
            services.clock = FastClock()  # the replay is faster than any human rate limit
            store = services.store
        core = Core(services)
        watcher = AdapterWatcher(services, interval=POLL_S)
        poller = None
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
                    self.res.imported_pairs[g.name] = len(store.reply_pairs(g.guild_id))
                    self.console.print(f"  {g.name}: {n} messages, "
                                       f"{self.res.imported_pairs[g.name]} reply pairs; "
                                       f"{CONSENTING} of {len(g.members)} chatting members "
                                       "opted in")
            # The watcher's own loop, each poll timed (``sync``): the swap numbers are real.
            poller = asyncio.create_task(poll_forever(lambda: self.sync(watcher),
                                                      lambda: POLL_S, "demo adapter poll"))
            # MofN shows "44/?" for the open-ended phase (chatting while training runs).
            cols = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn())
            with Progress(*cols, console=self.console, transient=False) as progress:
                with self.stage("replay before training (base model)"):
                    await self.replay(core, "before", self.rounds, progress, self.guilds)
                with self.stage("scheduler tick, train, gate, hot swap (chat goes on)"):
                    queued = await asyncio.to_thread(enqueue_due, store, self.cfg,
                                                     [g.guild_id for g in self.guilds])
                    self.console.print(f"  scheduler enqueued runs {queued}")
                    await self.train_queued(core, progress, watcher, self.guilds)
                    self.record_runs(store, self.guilds, "history")
                    self.console.print(f"  engine now serving {services.engine.active_versions()}")
                with self.stage("replay after the hot swap"):
                    await self.replay(core, "after", self.rounds, progress, self.guilds)
            with self.stage("same prompts: base model vs each guild's adapter"):
                await self.compare(services)
            if self.feedback_guilds:
                await self.feedback_loop(core, store, watcher, cols)
            self.res.privacy = self.privacy_report(store)
            self.res.pairs_at_end = {g.name: len(store.reply_pairs(g.guild_id))
                                     for g in self.guilds}
        finally:
            await cancel_and_wait(poller)
            await resources.aclose()
        with self.stage("held-out loss matrix"):
            await asyncio.to_thread(self.loss_matrix)
        return write_report(self.res, self.out)

    async def feedback_loop(self, core: Any, store: Any, watcher: Any, cols: Any) -> None:
        """New guilds that import nothing: members rate and correct the base model, a
        scheduler tick retrains each from that feedback alone, and the replay goes on with
        fresh prompts."""
        from rich.progress import Progress

        from guildtune.schedule import enqueue_due

        fed = self.feedback_guilds
        with self.stage("feedback only: new guilds, no imported history, all members opted "
                        "in"):
            for g in fed:
                await asyncio.to_thread(store.update_guild_settings, g.guild_id,
                                        training_enabled=True, learn_from_humans=False,
                                        persona=g.community.persona)
                g.members = [g.guild_id * 10 + k for k in range(MEMBERS_PER_GUILD)]
                for m in g.members:
                    await core.consent(g.guild_id, m, True)
        with Progress(*cols, console=self.console, transient=False) as progress:
            with self.stage("feedback only: replay before (base model), members rate and "
                            "correct"):
                await self.replay(core, "feedback before", self.feedback_rounds, progress, fed)
            with self.stage("feedback only: scheduler tick, train on feedback alone, gate, "
                            "hot swap"):
                queued = await asyncio.to_thread(enqueue_due, store, self.cfg,
                                                 [g.guild_id for g in fed])
                self.console.print(f"  scheduler enqueued runs {queued}")
                await self.train_queued(core, progress, watcher, [])
                self.record_runs(store, fed, "feedback")
            with self.stage("feedback only: replay after"):
                await self.replay(core, "feedback after", self.feedback_rounds, progress, fed)
        for g in fed:
            asked = [[j.prompt for j in self.res.judgments
                      if j.guild == g.name and j.phase == phase]
                     for phase in ("feedback before", "feedback after")]
            self.res.repeated_prompts[g.name] = len(set(asked[0]) & set(asked[1]))

    def name_of(self, guild_id: int) -> str:
        return next(g.name for g in (*self.guilds, *self.feedback_guilds)
                    if g.guild_id == guild_id)

    async def compare(self, services: Any) -> None:
        from bot.engine import GenerationRequest

        serving = services.engine.active_versions()
        for g in self.guilds:
            for text in g.prompts[-3:]:
                msgs = [{"role": "system", "content": g.community.persona},
                        {"role": "user", "content": text}]
                replies: dict[str, tuple[str, bool]] = {}
                base = await services.engine.generate(GenerationRequest(None, msgs,
                                                                        temperature=0.0))
                replies["base"] = (base.text, g.community.likes(base.text))
                for other in self.guilds:
                    if other.guild_id in serving:
                        res = await services.engine.generate(GenerationRequest(
                            other.guild_id, msgs, temperature=0.0))
                        replies[f"{other.name} v{res.adapter_version}"] = (
                            res.text, g.community.likes(res.text))
                self.res.side_by_side.append({"guild": g.name, "prompt": text,
                                              "replies": replies})

    def loss_matrix(self) -> None:
        """Rows: base and each guild's active adapter; columns: each guild's held-out data."""
        from storage import open_store
        from trainer.data import build_dataset
        from trainer.evaluate import heldout_loss
        from trainer.pipeline import load_base

        matrix = self.res.matrix
        store = open_store(self.cfg.db_path)
        try:
            heldout = {g.name: build_dataset(store, g.guild_id, self.cfg).heldout
                       for g in self.guilds}
            active = {g.name: store.active_version(g.guild_id) for g in self.guilds}
        finally:
            store.close()
        lm = load_base(self.cfg)
        ml = self.cfg.training.max_seq_len
        matrix["base"] = {n: heldout_loss(lm.model, lm.tokenizer, ex, max_seq_len=ml)[0]
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
                adapter = f"a{len(matrix)}"
                peft_model.load_adapter(version.path, adapter_name=adapter)
            peft_model.set_adapter(adapter)
            matrix[label] = {n: heldout_loss(peft_model, lm.tokenizer, ex, max_seq_len=ml)[0]
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


def run_demo(cfg: Config, out: Path, data: list[Path], rounds: int, console: Any,
             feedback_rounds: int | None = None) -> Path:
    """Run the demo and return the report's path (``feedback_rounds``: prompts per guild
    before and after the feedback-only retrain; None: the default, 0: no such phase)."""
    guilds = build_guilds(data)
    demo = Demo(cfg, out, guilds, rounds, console, feedback_rounds)
    return asyncio.run(demo.run())
