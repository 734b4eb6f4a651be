"""Soak: N guilds chatting and reacting through the real handlers for minutes, with retrains and
hot swaps happening, loopback only (no Discord).

What runs, in one bot process like ``guildtune run``: ``bot.handlers.Core`` on the real
LocalEngine (tiny model; ``--engine fake`` for a model-free run), the store, and the
AdapterWatcher. A training worker runs in its own process (as ``guildtune run`` starts one) and
trains the runs the soak enqueues; each published version is hot-swapped into the engine by the
watcher.

``--storage postgresql`` puts the store on a private PostgreSQL server (bench/pg_server.py:
fsync and synchronous_commit on) and, with ``--bots 2 --workers 2``, runs two bot processes (each
serving half the guilds, as two shard processes would) and two training-worker processes on one
database; the message rate and the retrain rate are split between the bots. ``--storage
both`` runs SQLite (one bot, one worker, as before) and then PostgreSQL in one invocation and
compares them. Double claims (a run handled by two workers, or whose row names a worker that did
not handle it) are counted from each worker's report and the runs table.

Reports messages answered, reply latency (p50/p99; also split by whether a training run was in
progress, the in-run baseline), event-loop lag (p99, max), RSS of the bot and the worker over time
with a linear-fit slope after warm-up, queue depths over time, and checks that every consented
interaction was stored exactly once (counted per request message id) and nothing else was.

    python bench/soak.py --minutes 1.5            # a short soak
    python bench/soak.py                          # 50 guilds, 10 minutes
    python bench/soak.py --engine fake --minutes 1
    python bench/soak.py --storage both --bots 2 --workers 2 --minutes 3

Prints a table and writes bench/results/soak.json (``--storage postgresql``:
soak-postgresql.json; ``both``: soak-storage.json with both runs and the ratios).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import multiprocessing as mp
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")  # the worker process inherits it

from bot.engine import Engine, GenerationRequest, GenerationResult  # noqa: E402
from bot.handlers import AdapterWatcher, Core, Turn  # noqa: E402
from bot.services import Services  # noqa: E402
from guildtune.config import Config, parse_config  # noqa: E402
from storage import Store, utc_now  # noqa: E402

log = logging.getLogger("soak")

USERS_PER_GUILD = 4  # the last one never opts in: nothing of theirs may be stored


def guild_id(i: int) -> int:
    return 1000 + i


def users(g: int) -> list[int]:
    return [g * 10 + k for k in range(1, USERS_PER_GUILD + 1)]


def consented(user: int) -> bool:
    return user % 10 != USERS_PER_GUILD


class SleepEngine(Engine):
    """A model-free engine: a fixed short reply after a small delay (``--engine fake``)."""

    def __init__(self, delay_s: float = 0.005) -> None:
        self.delay = delay_s
        self.versions: dict[int, int] = {}

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def generate(self, req: GenerationRequest, on_text: Any = None) -> GenerationResult:
        await asyncio.sleep(self.delay)
        v = self.versions.get(req.guild_id) if req.guild_id is not None else None
        return GenerationResult("sounds good to me", v, 10, 4, self.delay * 1000)

    async def activate(self, guild_id: int, version: int, path: Any) -> None:
        self.versions[guild_id] = version

    async def deactivate(self, guild_id: int) -> None:
        self.versions.pop(guild_id, None)

    def active_versions(self) -> dict[int, int]:
        return dict(self.versions)


class Channel:
    """A loopback ReplyChannel: message ids from a shared counter, the time of the first part."""

    def __init__(self, ids: Counter[str]) -> None:
        self.ids = ids
        self.first_sent: float | None = None

    @contextlib.asynccontextmanager
    async def _typing(self) -> AsyncIterator[None]:
        yield

    def typing(self) -> Any:
        return self._typing()

    async def send(self, text: str, *, first: bool, last: bool) -> int:
        if self.first_sent is None:
            self.first_sent = time.perf_counter()
        self.ids["next"] += 1
        return 10_000_000 + self.ids["next"]


@dataclass
class Stats:
    sent: int = 0
    answered: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    latency_ms: list[float] = field(default_factory=list)
    latency_training_ms: list[float] = field(default_factory=list)
    latency_quiet_ms: list[float] = field(default_factory=list)
    lag_ms: list[float] = field(default_factory=list)
    ratings: int = 0
    rating_errors: int = 0
    enqueued: int = 0
    swaps: int = 0
    swap_failures: int = 0
    inflight: int = 0
    training_now: bool = False
    # (guild, user) -> request message ids whose chat reported a stored interaction
    logged: dict[tuple[int, int], list[int]] = field(default_factory=dict)
    likes: Counter[int] = field(default_factory=Counter)
    samples: list[dict[str, Any]] = field(default_factory=list)


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def slope_per_min(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, value) in value per minute."""
    if len(points) < 3:
        return None
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return None if den == 0 else 60 * sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def make_config(data_dir: Path, model: str, store_url: str = "") -> Config:
    """The soak's config; ``store_url`` a PostgreSQL URL, or empty for SQLite in data_dir."""
    return parse_config({
        "storage": {"data_dir": str(data_dir), "busy_timeout_ms": 5000, "url": store_url},
        "model": {"name": model, "device": "cpu", "dtype": "float32", "threads": 1,
                  "max_new_tokens": 12, "max_context_tokens": 128, "max_batch_size": 8,
                  "batch_wait_ms": 10, "max_resident_adapters": 8},
        "lora": {"rank": 4, "alpha": 8},
        "discord": {"user_rate_per_minute": 120, "guild_rate_per_minute": 1200},
        "training": {"enabled": True, "epochs": 1.0, "batch_size": 16, "max_seq_len": 64,
                     "learning_rate": 3e-3, "lease_seconds": 30, "poll_seconds": 0.5},
    }, env={})


def _worker_main(cfg: Config, stop: Any, worker_id: str, out: str) -> None:
    """A training worker process: claims the soak's runs and trains them in-process; writes
    what it did with each run it claimed to ``out``."""
    import torch

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    from trainer.worker import run_worker

    report = run_worker(cfg, stop=stop, isolate=False, worker_id=worker_id)
    Path(out).write_text(json.dumps([[o.run_id, o.status] for o in report.runs]))


async def chat_one(core: Core, st: Stats, rng: random.Random, g: int, mid: int,
                   ids: Counter[str], rate_delay: float) -> None:
    user = rng.choice(users(g))
    ch = Channel(ids)
    t0 = time.perf_counter()
    training = st.training_now
    st.inflight += 1
    try:
        out = await core.chat(ch, guild_id=g, channel_id=g * 7, user_id=user,
                              request_message_id=mid,
                              turns=[Turn("user", user, mid, f"hey bot, message {mid} here",
                                          created_utc=utc_now())])
    except Exception as exc:  # counted; a soak goes on
        st.errors[type(exc).__name__] += 1
        return
    finally:
        st.inflight -= 1
    if out.limited or ch.first_sent is None:
        st.errors["rate limited" if out.limited else "no reply"] += 1
        return
    ms = (ch.first_sent - t0) * 1000
    st.answered += 1
    st.latency_ms.append(ms)
    (st.latency_training_ms if training else st.latency_quiet_ms).append(ms)
    if out.logged:
        st.logged.setdefault((g, user), []).append(mid)
    # A consented member reacts to about half of the replies, mostly 👍.
    if out.feedback_message_id is not None and rng.random() < 0.5:
        rater = rng.choice([u for u in users(g) if consented(u)])
        rating = 1 if rng.random() < 0.8 else -1
        await asyncio.sleep(rate_delay)
        try:
            if await core.rate(g, out.feedback_message_id, rater, rating):
                st.ratings += 1
                if rating > 0:
                    st.likes[g] += 1
        except Exception:  # noqa: BLE001 - counted
            st.rating_errors += 1


async def lag_monitor(st: Stats, stop: asyncio.Event, every: float = 0.05) -> None:
    while not stop.is_set():
        t = time.perf_counter()
        await asyncio.sleep(every)
        st.lag_ms.append(max(0.0, (time.perf_counter() - t - every) * 1000))


async def sampler(st: Stats, store: Store, engine: Engine, guilds: list[int],
                  worker_pids: list[int], t_start: float, stop: asyncio.Event,
                  every: float) -> None:
    """Queue depth and RSS every ``every`` seconds; ``guilds`` are all the soak's (a run of
    another bot's guild loads the machine as well)."""
    def queue_depth() -> tuple[int, int]:
        queued = running = 0
        for g in guilds:
            r = store.open_run(g)
            if r is not None:
                queued += r.status == "queued"
                running += r.status == "running"
        return queued, running

    while not stop.is_set():
        queued, running = await asyncio.to_thread(queue_depth)
        st.training_now = running > 0
        eq = getattr(engine, "_queue", None)
        workers = [m for m in (rss_mb(pid) for pid in worker_pids) if m is not None]
        st.samples.append({
            "t_s": round(time.perf_counter() - t_start, 1),
            "rss_bot_mb": rss_mb(os.getpid()), "rss_worker_mb": max(workers, default=None),
            "inflight_chats": st.inflight, "engine_queue": eq.qsize() if eq is not None else 0,
            "runs_queued": queued, "runs_running": running, "answered": st.answered,
            "swaps": st.swaps,
        })
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), every)


async def retrainer(st: Stats, store: Store, guilds: list[int], stop: asyncio.Event,
                    every: float) -> None:
    """Every ``every`` seconds, queue a forced run for the next guild with a few likes."""
    turn = 0
    while not stop.is_set():
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), every)
        if stop.is_set():
            break
        ready = [g for g in guilds if st.likes[g] >= 3]
        if not ready:
            continue
        g = ready[turn % len(ready)]
        turn += 1
        _, created = await asyncio.to_thread(store.enqueue_run, g, "soak", None, True)
        st.enqueued += int(created)


def verify_exactly_once(store: Store, st: Stats, guilds: list[int]) -> dict[str, Any]:
    """Every interaction chat reported as stored is in the store exactly once; nothing else is,
    and nothing of the member who never opted in."""
    missing = duplicated = unexpected = non_consented_rows = 0
    checked = 0
    for g in guilds:
        for u in users(g):
            rows = store.export_user(u, g)["interactions"]
            counts = Counter(int(r["request_message_id"]) for r in rows)
            if not consented(u):
                non_consented_rows += len(rows)
                continue
            want = set(st.logged.get((g, u), []))
            checked += len(want)
            missing += sum(1 for m in want if counts[m] == 0)
            duplicated += sum(1 for m, c in counts.items() if c > 1)
            unexpected += sum(1 for m in counts if m not in want)
    return {"consented_interactions_checked": checked, "missing": missing,
            "duplicated": duplicated, "unexpected": unexpected,
            "rows_of_non_consented_member": non_consented_rows,
            "ok": missing == duplicated == unexpected == non_consented_rows == 0}


@dataclass(frozen=True)
class BotPlan:
    """What one bot process serves: its guilds (``index`` of ``count``, as a shard process
    would), its share of the message rate, and every guild of the soak (for queue depth)."""

    index: int
    count: int
    guilds: list[int]
    all_guilds: list[int]
    worker_pids: list[int]


async def serve(args: argparse.Namespace, cfg: Config, plan: BotPlan,
                started: Any = None) -> tuple[Stats, dict[str, float]]:
    """One bot: the engine, ``Core`` and the watcher on ``plan.guilds`` for ``args.minutes``,
    then drained. ``started`` (a barrier) is passed once the model is loaded, so that every
    bot's minutes are the same minutes."""
    import torch

    torch.set_num_threads(1)
    store = await asyncio.to_thread(cfg.open_store)
    if args.engine == "local":
        from bot.engine import LocalEngine
        from guildtune.models import load_model

        loaded = await asyncio.to_thread(load_model, "tiny", device="cpu", dtype="float32",
                                         threads=1)
        engine: Engine = LocalEngine(loaded, cfg.model, cfg.lora)
    else:
        engine = SleepEngine()
    await engine.start()
    services = Services(config=cfg, store=store, engine=engine)
    core = Core(services)
    st = Stats()

    async def on_change(guild: int, line: str) -> None:
        if line.startswith("Now serving"):
            st.swaps += 1
        elif "could not be loaded" in line:
            st.swap_failures += 1

    watcher = AdapterWatcher(services, interval=args.watch_every, notify=on_change)
    watcher.start()
    if started is not None:
        await asyncio.to_thread(started.wait)

    stop = asyncio.Event()
    t_start = time.perf_counter()
    bg = [asyncio.create_task(lag_monitor(st, stop)),
          asyncio.create_task(sampler(st, store, engine, plan.all_guilds, plan.worker_pids,
                                      t_start, stop, args.sample_every)),
          # The bots share the retrain rate too: the same training load as one bot.
          asyncio.create_task(retrainer(st, store, plan.guilds, stop,
                                        args.retrain_every * plan.count))]
    rng = random.Random(args.seed * 1000 + plan.index)
    ids: Counter[str] = Counter()
    ids["next"] = plan.index * 10**8  # reply ids of two bots never meet
    chats: set[asyncio.Task[None]] = set()
    duration = args.minutes * 60
    interval = plan.count / args.rate  # the bots share the rate
    next_at = time.perf_counter()
    k = 0
    while time.perf_counter() - t_start < duration:
        k += 1
        mid = k * plan.count + plan.index  # request ids unique across bots
        g = (plan.guilds[k % len(plan.guilds)] if args.round_robin
             else rng.choice(plan.guilds))
        task = asyncio.create_task(chat_one(core, st, rng, g, mid, ids, rng.uniform(0.1, 2.0)))
        chats.add(task)
        task.add_done_callback(chats.discard)
        st.sent += 1
        next_at += interval  # a steady rate: lateness is made up, not accumulated
        await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
    load_s = time.perf_counter() - t_start
    if chats:
        await asyncio.wait(chats, timeout=60)
    drained_s = time.perf_counter() - t_start - load_s
    stop.set()
    await asyncio.gather(*bg)
    await watcher.stop()
    await engine.close()
    store.close()
    return st, {"load_seconds": load_s, "drain_seconds": drained_s}


def stats_json(st: Stats, timing: dict[str, float]) -> dict[str, Any]:
    """A bot's Stats for its parent (lists and counters; ``logged`` as [guild, user, ids])."""
    out = {k: v for k, v in vars(st).items() if k not in ("logged", "likes", "errors")}
    out.update(errors=dict(st.errors), likes=dict(st.likes),
               logged=[[g, u, ids] for (g, u), ids in st.logged.items()], timing=timing)
    return out


def merge_stats(parts: list[dict[str, Any]]) -> Stats:
    """The bots' Stats as one (sums, concatenated lists; samples tagged with their bot)."""
    st = Stats()
    for b, p in enumerate(parts):
        for name in ("sent", "answered", "ratings", "rating_errors", "enqueued", "swaps",
                     "swap_failures"):
            setattr(st, name, getattr(st, name) + p[name])
        for name in ("latency_ms", "latency_training_ms", "latency_quiet_ms", "lag_ms"):
            getattr(st, name).extend(p[name])
        st.errors.update(p["errors"])
        st.likes.update({int(g): n for g, n in p["likes"].items()})
        for g, u, mids in p["logged"]:
            st.logged.setdefault((g, u), []).extend(mids)
        st.samples.extend(dict(s, bot=b) for s in p["samples"])
    return st


def _bot_main(args: argparse.Namespace, cfg: Config, plan: BotPlan, started: Any,
              out: str) -> None:
    """A bot process (``--bots``): ``serve`` its guilds, write its Stats to ``out``."""
    logging.basicConfig(level=logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    st, timing = asyncio.run(serve(args, cfg, plan, started))
    Path(out).write_text(json.dumps(stats_json(st, timing)))


def check_claims(store: Store, reports: dict[str, list[list[Any]]]) -> dict[str, Any]:
    """Runs handled by two workers (neither merely giving it back at stop, nor having lost its
    lease), and finished runs whose row names a worker other than the one that finished it."""
    handled: dict[int, list[str]] = {}
    lost = 0
    for worker, runs in reports.items():
        for run_id, status in runs:
            lost += status == "lost"
            if status not in ("released", "lost"):
                handled.setdefault(run_id, []).append(worker)
    double = sum(1 for ws in handled.values() if len(ws) > 1)
    wrong = 0
    for run_id, ws in handled.items():
        run = store.get_run(run_id)
        wrong += run is None or run.worker not in ws
    return {"claimed_per_worker": {w: len(r) for w, r in reports.items()},
            "runs_handled": len(handled), "double_claims": double, "row_names_other_worker":
            wrong, "leases_lost": lost, "ok": double == wrong == 0}


async def soak(args: argparse.Namespace, storage: str = "sqlite", bots: int = 1,
               workers: int = 1) -> dict[str, Any]:
    import torch

    data_dir = Path(tempfile.mkdtemp(prefix="guildtune-soak-"))
    with contextlib.ExitStack() as stack:
        url = ""
        pg_settings: dict[str, Any] | None = None
        if storage == "postgresql":
            from bench import pg_server

            server = stack.enter_context(pg_server.durable_postgres())
            url = pg_server.new_database(server, "soak", args.pg_sync)
            pg_settings = pg_server.settings_of(url)
        cfg = make_config(data_dir, "tiny", url)
        result = await _soak(args, cfg, bots, workers, data_dir)
    result["config"].update(storage=storage, bots=bots, workers=workers)
    if pg_settings is not None:
        result["postgresql"] = pg_settings
    result["machine"]["torch"] = torch.__version__
    return result


async def _soak(args: argparse.Namespace, cfg: Config, bots: int, workers: int,
                data_dir: Path) -> dict[str, Any]:
    store = await asyncio.to_thread(cfg.open_store)
    guilds = [guild_id(i) for i in range(args.guilds)]
    for g in guilds:
        store.update_guild_settings(g, training_enabled=True)
        for u in users(g):
            if consented(u):
                store.grant_consent(g, u)

    ctx = mp.get_context("spawn")
    worker_stop = ctx.Event()
    names = [f"soak-worker-{k}" if workers > 1 else "soak-worker" for k in range(workers)]
    worker_out = {n: data_dir / f"{n}.json" for n in names}
    procs = [ctx.Process(target=_worker_main, args=(cfg, worker_stop, n, str(worker_out[n])),
                         name=n) for n in names]
    for p in procs:
        p.start()
    started = ctx.Barrier(bots + 1)
    plans = [BotPlan(b, bots, guilds[b::bots], guilds, [p.pid or 0 for p in procs])
             for b in range(bots)]
    bot_out = [data_dir / f"bot-{b}.json" for b in range(bots)]
    bot_procs = [ctx.Process(target=_bot_main, args=(args, cfg, plan, started, str(out)),
                             name=f"soak-bot-{plan.index}")
                 for plan, out in zip(plans, bot_out)]
    for p in bot_procs:
        p.start()
    await asyncio.to_thread(started.wait, 600)
    for p in bot_procs:
        await asyncio.to_thread(p.join, args.minutes * 60 + 300)
        if p.is_alive():
            p.kill()
    worker_stop.set()
    for p in procs:
        await asyncio.to_thread(p.join, 60)
        if p.is_alive():
            p.kill()
    if any(p.exitcode != 0 for p in bot_procs):
        raise RuntimeError(f"a bot process failed: exit codes {[p.exitcode for p in bot_procs]}")
    parts = [json.loads(out.read_text()) for out in bot_out]
    st = merge_stats(parts)
    load_s = max(p["timing"]["load_seconds"] for p in parts)
    drained_s = max(p["timing"]["drain_seconds"] for p in parts)
    duration = args.minutes * 60

    runs = Counter()
    for g in guilds:
        for r in store.runs(g, limit=1000):
            runs[r.status] += 1
    exactly_once = await asyncio.to_thread(verify_exactly_once, store, st, guilds)
    reports = {n: json.loads(worker_out[n].read_text()) for n in names
               if worker_out[n].exists()}
    claims = check_claims(store, reports)
    claims["workers_without_report"] = [n for n in names if n not in reports]
    integrity = ("n/a (PostgreSQL)" if store.backend == "postgresql" else
                 store.db.execute("PRAGMA integrity_check").fetchone()[0])
    store.close()

    def rss(samples: list[dict[str, Any]]) -> dict[str, Any]:
        warm = [s for s in samples if s["t_s"] >= min(30.0, duration * 0.25)]
        bot = [(s["t_s"], s["rss_bot_mb"]) for s in warm if s["rss_bot_mb"] is not None]
        # The second half alone: after the first adapters are loaded (a one-off step up),
        # growth here would be a leak rather than warm-up.
        late = [(s["t_s"], s["rss_bot_mb"]) for s in samples
                if s["t_s"] >= duration / 2 and s["rss_bot_mb"] is not None]
        return {"start": r2(samples[0]["rss_bot_mb"]) if samples else None,
                "end": r2(samples[-1]["rss_bot_mb"]) if samples else None,
                "slope_mb_per_min_after_warmup": r2(slope_per_min(bot)),
                "slope_mb_per_min_second_half": r2(slope_per_min(late))}

    by_bot = [[s for s in st.samples if s["bot"] == b] for b in range(bots)]
    warm = [s for s in st.samples if s["t_s"] >= min(30.0, duration * 0.25)]
    rss_worker = [(s["t_s"], s["rss_worker_mb"]) for s in by_bot[0]
                  if s["t_s"] >= min(30.0, duration * 0.25) and s["rss_worker_mb"] is not None]
    return {
        "config": {"guilds": args.guilds, "minutes": args.minutes, "rate_per_s": args.rate,
                   "engine": args.engine, "retrain_every_s": args.retrain_every,
                   "watch_every_s": args.watch_every, "seed": args.seed},
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                    "torch_threads": 1, "load_average_at_end": os.getloadavg()},
        "load_seconds": round(load_s, 1), "drain_seconds": round(drained_s, 1),
        "messages_sent": st.sent, "messages_answered": st.answered,
        "answered_per_s": round(st.answered / load_s, 2),
        "errors": dict(st.errors), "ratings_stored": st.ratings,
        "rating_errors": st.rating_errors,
        "latency_ms": {"p50": r2(pct(st.latency_ms, 0.5)), "p99": r2(pct(st.latency_ms, 0.99)),
                       "max": r2(max(st.latency_ms, default=None))},
        "latency_quiet_ms": {"n": len(st.latency_quiet_ms),
                             "p50": r2(pct(st.latency_quiet_ms, 0.5)),
                             "p99": r2(pct(st.latency_quiet_ms, 0.99))},
        "latency_while_training_ms": {"n": len(st.latency_training_ms),
                                      "p50": r2(pct(st.latency_training_ms, 0.5)),
                                      "p99": r2(pct(st.latency_training_ms, 0.99))},
        "loop_lag_ms": {"p50": r2(pct(st.lag_ms, 0.5)), "p99": r2(pct(st.lag_ms, 0.99)),
                        "max": r2(max(st.lag_ms, default=None))},
        "runs_enqueued": st.enqueued, "runs": dict(runs), "hot_swaps": st.swaps,
        "swap_failures": st.swap_failures,
        "rss_bot_mb": rss(by_bot[0]),
        **({"rss_other_bots_mb": [rss(b) for b in by_bot[1:]]} if bots > 1 else {}),
        "rss_worker_mb": {"max": r2(max((s["rss_worker_mb"] or 0 for s in warm), default=None)),
                          "slope_mb_per_min_after_warmup": r2(slope_per_min(rss_worker))},
        "queue_depth_max": {k: max((s[k] for s in st.samples), default=0)
                            for k in ("inflight_chats", "engine_queue", "runs_queued")},
        "exactly_once": exactly_once, "claims": claims, "integrity_check": integrity,
        "samples": st.samples,
    }


def r2(v: float | None) -> float | None:
    return None if v is None else round(v, 2)


def print_table(r: dict[str, Any]) -> None:
    lat, q, t, lag = (r["latency_ms"], r["latency_quiet_ms"], r["latency_while_training_ms"],
                      r["loop_lag_ms"])
    c = r["config"]
    rows = [
        ("storage / bot processes / workers", f"{c.get('storage', 'sqlite')} / "
                                              f"{c.get('bots', 1)} / {c.get('workers', 1)}"),
        ("guilds / minutes / rate", f"{c['guilds']} / {c['minutes']} / "
                                    f"{c['rate_per_s']} msg/s ({c['engine']})"),
        ("messages answered / sent", f"{r['messages_answered']} / {r['messages_sent']} "
                                     f"({r['answered_per_s']}/s); errors {r['errors'] or 0}"),
        ("reply latency p50 / p99 / max", f"{lat['p50']} / {lat['p99']} / {lat['max']} ms"),
        ("  no run in progress p50 / p99", f"{q['p50']} / {q['p99']} ms (n={q['n']})"),
        ("  while training p50 / p99", f"{t['p50']} / {t['p99']} ms (n={t['n']})"),
        ("event-loop lag p50 / p99 / max", f"{lag['p50']} / {lag['p99']} / {lag['max']} ms"),
        ("ratings stored", str(r["ratings_stored"])),
        ("runs enqueued / by status", f"{r['runs_enqueued']} / {r['runs']}"),
        ("hot swaps (failed)", f"{r['hot_swaps']} ({r['swap_failures']})"),
        ("bot RSS start -> end, slope", f"{r['rss_bot_mb']['start']} -> {r['rss_bot_mb']['end']} "
                                        f"MB, {r['rss_bot_mb']['slope_mb_per_min_after_warmup']} "
                                        "MB/min after warm-up, "
                                        f"{r['rss_bot_mb']['slope_mb_per_min_second_half']} "
                                        "MB/min in the second half"),
        ("worker RSS max, slope", f"{r['rss_worker_mb']['max']} MB, "
                                  f"{r['rss_worker_mb']['slope_mb_per_min_after_warmup']} MB/min"),
        ("max queue depth", ", ".join(f"{k} {v}" for k, v in r["queue_depth_max"].items())),
        ("stored exactly once", f"{r['exactly_once']['ok']} "
                                f"({r['exactly_once']['consented_interactions_checked']} checked, "
                                f"missing {r['exactly_once']['missing']}, duplicated "
                                f"{r['exactly_once']['duplicated']}, unexpected "
                                f"{r['exactly_once']['unexpected']}, non-consented rows "
                                f"{r['exactly_once']['rows_of_non_consented_member']})"),
        ("runs claimed by two workers", f"{r['claims']['double_claims']} (of "
                                        f"{r['claims']['runs_handled']} handled, per worker "
                                        f"{r['claims']['claimed_per_worker']}; row names another "
                                        f"worker {r['claims']['row_names_other_worker']}, leases "
                                        f"lost {r['claims']['leases_lost']})"),
        ("PRAGMA integrity_check", r["integrity_check"]),
    ]
    for b, other in enumerate(r.get("rss_other_bots_mb", []), start=1):
        rows.insert(-5, (f"bot {b} RSS start -> end, slope",
                         f"{other['start']} -> {other['end']} MB, "
                         f"{other['slope_mb_per_min_second_half']} MB/min in the second half"))
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k.ljust(w)}  {v}")
    print("\nqueue depth / RSS over time:")
    print(f"{'t_s':>6} {'answered':>8} {'inflight':>8} {'engineQ':>7} {'runsQ':>5} "
          f"{'running':>7} {'swaps':>5} {'botMB':>7} {'workerMB':>8}")
    samples = [s for s in r["samples"] if s.get("bot", 0) == 0]  # bot 0's view
    step = max(1, len(samples) // 12)
    for s in samples[::step]:
        print(f"{s['t_s']:>6} {s['answered']:>8} {s['inflight_chats']:>8} {s['engine_queue']:>7} "
              f"{s['runs_queued']:>5} {s['runs_running']:>7} {s['swaps']:>5} "
              f"{s['rss_bot_mb'] or 0:>7.1f} {s['rss_worker_mb'] or 0:>8.1f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--guilds", type=int, default=50)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--rate", type=float, default=5.0, help="messages per second, all guilds")
    ap.add_argument("--engine", choices=("local", "fake"), default="local")
    ap.add_argument("--retrain-every", type=float, default=10.0,
                    help="seconds between retrains (all bots together)")
    ap.add_argument("--watch-every", type=float, default=2.0, help="hot-swap poll seconds")
    ap.add_argument("--sample-every", type=float, default=5.0)
    ap.add_argument("--round-robin", action="store_true", help="guilds in turn, not at random")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--storage", choices=("sqlite", "postgresql", "both"), default="sqlite",
                    help="both: SQLite (1 bot, 1 worker) then PostgreSQL (--bots, --workers)")
    ap.add_argument("--bots", type=int, default=1, help="bot processes (PostgreSQL run)")
    ap.add_argument("--workers", type=int, default=1, help="worker processes (PostgreSQL run)")
    ap.add_argument("--pg-sync", choices=("on", "off"), default="on",
                    help="PostgreSQL synchronous_commit (the server has fsync on)")
    ap.add_argument("--out", type=Path, default=None,
                    help="default bench/results/soak.json, soak-postgresql.json (postgresql) "
                         "or soak-storage.json (both)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    runs = {"sqlite": (1, 1) if args.storage == "both" else (args.bots, args.workers),
            "postgresql": (args.bots, args.workers)}
    kinds = ["sqlite", "postgresql"] if args.storage == "both" else [args.storage]
    results = {}
    for kind in kinds:
        results[kind] = asyncio.run(soak(args, kind, *runs[kind]))
        print(f"\n== {kind} ==")
        print_table(results[kind])
    out = args.out or ROOT / "bench" / "results" / {
        "sqlite": "soak.json", "postgresql": "soak-postgresql.json",
        "both": "soak-storage.json"}[args.storage]
    if args.storage == "both":
        written: dict[str, Any] = dict(results, comparison=compare(results))
        print_comparison(written["comparison"])
    else:
        written = results[args.storage]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(written, indent=2), encoding="utf-8")
    print(f"\nwrote {out}")
    ok = all(r["exactly_once"]["ok"] and r["claims"]["ok"] and
             r["integrity_check"] in ("ok", "n/a (PostgreSQL)") for r in results.values())
    return 0 if ok else 1


COMPARED = [  # (label, path in a result)
    ("answered / sent", None),
    ("reply latency p50 ms", ("latency_ms", "p50")),
    ("reply latency p99 ms", ("latency_ms", "p99")),
    ("  no run in progress p99 ms", ("latency_quiet_ms", "p99")),
    ("  while training p99 ms", ("latency_while_training_ms", "p99")),
    ("event-loop lag p99 ms", ("loop_lag_ms", "p99")),
    ("ratings stored", ("ratings_stored",)),
    ("hot swaps", ("hot_swaps",)),
]


def _at(r: dict[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        r = r[key]
    return r


def compare(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The PostgreSQL run beside the SQLite run: each value, and PostgreSQL / SQLite."""
    sq, pg = results["sqlite"], results["postgresql"]
    rows: dict[str, Any] = {}
    for label, path in COMPARED:
        if path is None:
            rows[label] = {k: f"{r['messages_answered']} / {r['messages_sent']}"
                           for k, r in results.items()}
            continue
        a, b = _at(sq, path), _at(pg, path)
        rows[label] = {"sqlite": a, "postgresql": b,
                       "ratio": None if not a or b is None else round(b / a, 2)}
    for k, r in results.items():
        rows.setdefault("stored exactly once", {})[k] = r["exactly_once"]["ok"]
        rows.setdefault("double claims", {})[k] = r["claims"]["double_claims"]
        rows.setdefault("processes (bots + workers)", {})[k] = (
            f"{r['config']['bots']} + {r['config']['workers']}")
    return rows


def print_comparison(rows: dict[str, Any]) -> None:
    print("\n== PostgreSQL vs SQLite ==")
    print(f"{'measure':<30}{'sqlite':>16}{'postgresql':>16}{'pg / sqlite':>12}")
    for label, v in rows.items():
        ratio = v.get("ratio")
        print(f"{label:<30}{v['sqlite']!s:>16}{v['postgresql']!s:>16}"
              f"{'' if ratio is None else f'{ratio:.2f}x':>12}")


if __name__ == "__main__":
    sys.exit(main())
