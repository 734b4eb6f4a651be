"""Feedback alone moves it: a closed loop on real chat, with no imported history.

Simulated members of a community ask its real questions (the parent messages of its newest
reply pairs before the test slice, a fresh slice each round) through the bot's own handlers
(``bot.core.Core.chat`` on the real store and the local engine). Each member rates the reply to
their question 👍 when the style judge (``bench/style.py``, trained on other messages of the six
communities) attributes it to their community, else 👎 (``Core.rate``); in the variants with
corrections, a member who dislikes a reply writes the community's real reply as a better one
half of the time (``Core.suggest``). Between rounds each guild's adapter is fitted on what the
product's own data path gives for it (``trainer.data.build_dataset``: liked replies,
corrections, and the disliked as negatives when the preference term is on) and hot-swapped into
the engine. The gate is not run (it would hold back a first adapter of 20 examples as often as
not; the point here is what the feedback teaches). Four guilds per community, one per variant,
chat at once.

    .venv/bin/python bench/closed_loop.py [--communities rust,stripe] [--questions 32]

Not in CI. Results: bench/results/closed_loop.json and .md (needs scikit-learn).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # before bench/ (bench/trainer.py)

from bench.communities import (
    NAMES,
    RESULTS,
    WORK,
    Results,
    bench_config,
    fit_adapter,
    load_split,
    machine,
)
from bench.style import degenerate, judge_data, train_judge

VARIANTS = {"likes only": (False, False), "likes + preference": (False, True),
            "likes + corrections": (True, False), "likes + corrections + preference": (True, True)}
MEMBERS = 4
ROUNDS = 3
CORRECT_P = 0.5


async def run_community(name: str, split: Any, judge: Any, cfg: Any, n: int,
                        res: Results) -> None:
    from bot.core import Core
    from bot.services import open_services
    from guildtune.adapter_dir import adapter_meta, write_meta
    from guildtune.demo_members import FastClock, ReplayChannel, member_turn
    from trainer.data import MIN_EXAMPLES, build_dataset
    from trainer.pipeline import load_base

    pairs = split.pool[-ROUNDS * n:]
    rounds = [pairs[r * n:(r + 1) * n] for r in range(ROUNDS)]
    work = WORK / "closed-loop" / name
    for f in ("guildtune.db", "guildtune.db-wal", "guildtune.db-shm"):
        (work / f).unlink(missing_ok=True)
    cfg = cfg.replace(storage={"data_dir": str(work)})
    guilds = {v: 7000 + i for i, v in enumerate(VARIANTS)}
    channel = ReplayChannel()
    rng = random.Random(name)
    lm = base = None
    async with open_services(cfg) as services:
        services.clock = FastClock()
        core = Core(services)
        for v, g in guilds.items():
            services.store.update_guild_settings(g, training_enabled=True)
            for m in range(MEMBERS):
                await core.consent(g, g * 100 + m, True)

        async def ask(v: str, g: int, i: int, ex: Any) -> tuple[str, bool]:
            member = g * 100 + i % MEMBERS
            # The asker rates; disliking, they write the community's real reply half the time
            # (in the variants with corrections).
            done = await member_turn(
                core, channel, guild_id=g, member=member, text=ex.messages[1][1],
                likes=lambda reply: judge.predict([reply])[0] == name, raters=[member],
                better=lambda: ex.messages[2][1] if VARIANTS[v][0] and rng.random() < CORRECT_P
                else None)
            return done.reply or "", bool(done.liked)

        for r, questions in enumerate(rounds):
            key = f"{name}/round {r}"
            got = await asyncio.gather(*(ask(v, g, i, ex) for v, g in guilds.items()
                                         for i, ex in enumerate(questions)))
            per = {}
            for j, v in enumerate(guilds):
                rows = got[j * len(questions):(j + 1) * len(questions)]
                per[v] = {"like_rate": sum(lk for _, lk in rows) / len(rows),
                          "degenerate": sum(degenerate(t) is not None for t, _ in rows)
                          / len(rows), "n": len(rows), "samples": [t for t, _ in rows[:2]]}
            print(f"{key}: " + ", ".join(f"{v} {p['like_rate']:.0%}" for v, p in per.items()),
                  flush=True)
            if r == ROUNDS - 1:
                res.put(key, per)
                break
            for v, g in guilds.items():  # retrain each guild from its feedback so far
                vcfg = cfg.replace(training={"preference_loss": VARIANTS[v][1]})
                data = build_dataset(services.store, g, vcfg)
                train = data.train + data.heldout
                src = data.stats["sources"]  # the trainer's own count, train and held out
                kinds = {k: src["train"][k] + src["heldout"][k] for k in ("liked", "correction")}
                per[v]["trained_on"] = {**kinds, "negatives": len(data.negatives)
                                        if VARIANTS[v][1] else 0}
                if len(train) < MIN_EXAMPLES:
                    per[v]["retrain"] = f"too few examples ({len(train)} < {MIN_EXAMPLES})"
                    continue
                if lm is None:
                    lm = await asyncio.to_thread(load_base, cfg)
                    base = lm.model
                d = work / "adapters" / f"{g}-v{r + 1}"
                peft_model, stats = await asyncio.to_thread(
                    fit_adapter, base, lm, train, vcfg, d,
                    data.negatives if VARIANTS[v][1] else [])
                base = peft_model.unload()
                write_meta(d, adapter_meta(guild_id=g, version=r + 1, base_model=lm.base_id,
                                           lora=cfg.lora.shape()))
                await services.engine.activate(g, r + 1, d)
                per[v]["retrain"] = f"v{r + 1}: {stats['steps']} steps, {stats['seconds']:.0f} s"
            res.put(key, per)
            print("  retrained: " + "; ".join(f"{v}: {p.get('retrain')} {p.get('trained_on')}"
                                              for v, p in per.items()), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--communities", default="rust,stripe")
    ap.add_argument("--questions", type=int, default=32, help="per round and guild")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    cfg = bench_config(args.model, threads=args.threads)
    splits = {n: load_split(n, cfg) for n in NAMES}
    judge = train_judge(*judge_data(splits, max(200, ROUNDS * args.questions))[:2])
    stem = "closed_loop" if args.model == "smollm2-135m" else f"closed_loop-{args.model}"
    res = Results(RESULTS / f"{stem}.json", {"machine": machine(), "args": vars(args)})
    for name in args.communities.split(","):
        if not res.has(f"{name}/round {ROUNDS - 1}"):
            asyncio.run(run_community(name, splits[name], judge, cfg, args.questions, res))
    report(res.data, stem)


def report(data: dict[str, Any], stem: str) -> None:
    pts = data["points"]
    names = sorted({k.split("/")[0] for k in pts})
    lines = [f"Machine: {data['machine']}. {data['args']['questions']} questions per round and "
             "guild; like-rate = share of replies the style judge attributes to the community; "
             "a new adapter between rounds, fitted on that guild's feedback only.", ""]
    for name in names:
        lines += [f"**{name}**", "", "| variant | " + " | ".join(
            f"round {r}" for r in range(ROUNDS)) + " | round 1 - round 0 | trained on (after "
            "round 0) |", "|---|" + "---|" * (ROUNDS + 2)]
        for v in VARIANTS:
            rates = [pts[f"{name}/round {r}"][v]["like_rate"] for r in range(ROUNDS)]
            first = pts[f"{name}/round 0"][v]
            lines.append(f"| {v} | " + " | ".join(f"{x:.0%}" for x in rates)
                         + f" | {100 * (rates[1] - rates[0]):+.0f} points | "
                         f"{first.get('trained_on')}; {first.get('retrain')} |")
        lines.append("")
    (RESULTS / f"{stem}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
