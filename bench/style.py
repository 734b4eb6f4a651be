"""What the adapters say, not only their loss: a style judge on generated replies.

For each community, the parents of its newest reply pairs (its future, ``bench/communities.py``)
are answered by the base model, the community's own adapter and another community's adapter,
through the bot's own engine (``LocalEngine``: the chat template, end of turn, the step loop),
one fixed seed per prompt. A *style judge* that no adapter trains on scores them: character
n-gram TF-IDF + logistic regression (scikit-learn) over the six communities, trained on member
messages that are in no adapter's training pairs and in no test pair. Reported per community:
how often the judge attributes the replies to the community, reply lengths against the
community's real replies, and the degeneration rate (``degenerate``). Several decoding settings
are compared on base and own adapter (issue 14, item 5).

    .venv/bin/python bench/style.py [--prompts 32] [--train-examples 200]

Needs scikit-learn (``pip install -e ".[bench]"``; not a dependency of the bot). Not in CI.
Adapters are cached in /tmp/guildtune-bench/adapters; results in bench/results/style.json and
style.md.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import statistics
import sys
from collections import Counter
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
    key_of,
    load_split,
    machine,
)

GUILD = {name: i + 1 for i, name in enumerate(NAMES)}
# (temperature, top_p, repetition_penalty); the bot's default is whatever config says.
# What the repetition penalty lowers (``LocalEngine.penalty_scope``, bot.engine.base
# .penalized_tokens): "eot penalized" = HF's rule, every token of prompt and reply (the engine's
# before issue 14); "eot spared" = the same but the end-of-turn tokens; the others (the
# default): the reply's own tokens only.
DECODING = {"greedy": (0.0, 1.0, 1.0), "t0.7/p0.9": (0.7, 0.9, 1.0),
            "t0.7/p0.9+rep1.15 eot penalized": (0.7, 0.9, 1.15),
            "t0.7/p0.9+rep1.3 eot penalized": (0.7, 0.9, 1.3),
            "t0.7/p0.9+rep1.15 eot spared": (0.7, 0.9, 1.15),
            "t0.7/p0.9+rep1.15": (0.7, 0.9, 1.15), "t0.7/p0.9+rep1.3": (0.7, 0.9, 1.3)}
SCOPE = {"eot penalized": "hf", "eot spared": "turns"}
SHIPPED = "t0.7/p0.9+rep1.15"  # the config's defaults (model.temperature, top_p, ...)
_WORD = re.compile(r"\w+|[^\w\s]")


# -- degeneration ---------------------------------------------------------------------------------

def degenerate(text: str) -> str | None:
    """Why a reply is degenerate, or None: "empty" (nothing, or the engine's fallback), "loop"
    (a word 3-gram three times or more, the same token four times in a row, or one character
    twelve times in a row)."""
    t = text.strip()
    if not t or t == "(no reply)":
        return "empty"
    if re.search(r"(.)\1{11}", t):
        return "loop"
    words = _WORD.findall(t.lower())
    if any(n >= 3 for n in Counter(zip(words, words[1:], words[2:])).values()):
        return "loop"
    if any(len(set(words[i:i + 4])) == 1 for i in range(len(words) - 3)):
        return "loop"
    return None


def words(text: str) -> int:
    return len(text.split())


# -- the judge ------------------------------------------------------------------------------------

def judge_data(splits: dict[str, Any], train_k: int, per_class: int = 1500, seed: int = 0
               ) -> tuple[list[str], list[str], list[str], list[str]]:
    """Member messages of each community that no adapter trains on (not in its newest
    ``train_k`` pairs) and that are not in a test pair: 80% to fit the judge, 20% to score it."""
    rng = random.Random(seed)
    xt, yt, xv, yv = [], [], [], []
    for name, s in splits.items():
        used = {t for ex in [*s.train(train_k), *s.test] for _, t in ex.messages[1:]}
        texts = sorted({m.text.strip() for m in s.messages if len(m.text.split()) >= 2}
                       - used)
        rng.shuffle(texts)
        texts = texts[:per_class]
        cut = int(len(texts) * 0.8)
        xt += texts[:cut]
        yt += [name] * cut
        xv += texts[cut:]
        yv += [name] * (len(texts) - cut)
    return xt, yt, xv, yv


def train_judge(xt: list[str], yt: list[str]) -> Any:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    judge = make_pipeline(
        TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), min_df=2, sublinear_tf=True,
                        lowercase=False, max_features=300_000),
        LogisticRegression(C=4.0, max_iter=3000, class_weight="balanced"))
    judge.fit(xt, yt)
    return judge


# -- adapters and generation ----------------------------------------------------------------------

def community_adapters(lm_cfg: Any, splits: dict[str, Any], k: int) -> dict[str, Path]:
    """Each community's adapter on its newest ``k`` pairs before its test slice (cached by
    the training config and the data)."""
    from guildtune.adapter_dir import adapter_meta, write_meta
    from trainer.pipeline import load_base

    cfg = lm_cfg
    out: dict[str, Path] = {}
    lm = base = None
    for name, s in splits.items():
        train = s.train(k)
        d = WORK / "adapters" / f"{name}-{k}-{key_of(cfg.model.name, cfg.training, cfg.lora, [e.key for e in train])}"
        if not (d / "guildtune.json").exists():
            if lm is None:
                lm = load_base(cfg)
                base = lm.model
            print(f"  training {name} on {len(train)} pairs", flush=True)
            peft_model, _ = fit_adapter(base, lm, train, cfg, d)
            base = peft_model.unload()
            write_meta(d, adapter_meta(guild_id=GUILD[name], version=1, base_model=lm.base_id,
                                       lora=cfg.lora.shape()))
        out[name] = d
    return out


async def generate(cfg: Any, jobs: list[tuple[str, int | None, str, tuple[float, float, float]]],
                   adapters: dict[str, Path], scope: str = "reply") -> list[str]:
    """Replies to ``jobs`` (key, guild or None, prompt, decoding), all at once through one
    LocalEngine with every adapter resident; each request seeded by its prompt."""
    from bot.engine import GenerationRequest, create_engine

    engine = await asyncio.to_thread(create_engine, cfg.model, cfg.lora,
                                     cache_dir=cfg.model_cache)
    engine.penalty_scope = scope
    await engine.start()
    try:
        for name, path in adapters.items():
            await engine.activate(GUILD[name], 1, path)
        sys_prompt = cfg.model.system_prompt

        async def one(guild: int | None, prompt: str, dec: tuple[float, float, float]) -> str:
            t, p, r = dec
            msgs = [{"role": "system", "content": sys_prompt}, {"role": "user", "content": prompt}]
            res = await engine.generate(GenerationRequest(
                guild, msgs, temperature=t, top_p=p, repetition_penalty=r,
                seed=int(key_of(prompt)[:8], 16) if t > 0 else None))
            return res.text

        sem = asyncio.Semaphore(cfg.model.max_batch_size * 2)

        async def bounded(job: Any) -> str:
            async with sem:
                return await one(*job[1:])
        return list(await asyncio.gather(*(bounded(j) for j in jobs)))
    finally:
        await engine.close()


def loss_matrix(cfg: Any, splits: dict[str, Any], adapters: dict[str, Path]) -> dict[str, Any]:
    """Held-out loss of the base model and of every community's adapter on every community's
    test slice (the time split of ``bench/communities.py``): issue 14's item 1, for the adapters
    this benchmark judges."""
    from peft import PeftModel

    from bench.communities import loss
    from trainer.pipeline import load_base

    lm = load_base(cfg)
    out = {"base": {n: loss(lm.model, lm, s.test, cfg) for n, s in splits.items()}}
    model = None
    for name, path in adapters.items():
        if model is None:
            model = PeftModel.from_pretrained(lm.model, str(path), adapter_name=name)
        else:
            model.load_adapter(str(path), adapter_name=name)
        model.set_adapter(name)
        out[name] = {n: loss(model, lm, s.test, cfg) for n, s in splits.items()}
        print(f"  matrix row {name} done", flush=True)
    return out


def summarize(judge: Any, name: str, replies: list[str]) -> dict[str, Any]:
    pred = judge.predict(replies) if replies else []
    lens = [words(r) for r in replies]
    return {"attributed": sum(p == name for p in pred) / max(1, len(replies)),
            "degenerate": sum(degenerate(r) is not None for r in replies) / max(1, len(replies)),
            "median_words": statistics.median(lens) if lens else 0,
            "p90_words": sorted(lens)[int(0.9 * (len(lens) - 1))] if lens else 0,
            "n": len(replies)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--train-examples", type=int, default=200)
    ap.add_argument("--decoding", default=",".join(DECODING),
                    help="the first one is the main table (with another community's adapter)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--matrix", action="store_true",
                    help="also the held-out loss matrix of the same adapters (issue 14 item 1)")
    args = ap.parse_args()

    cfg = bench_config(args.model, threads=args.threads)
    splits = {n: load_split(n, cfg) for n in NAMES}
    stem = "style" if args.model == "smollm2-135m" else f"style-{args.model}"
    res = Results(RESULTS / f"{stem}.json", {"machine": machine(), "args": vars(args)})
    xt, yt, xv, yv = judge_data(splits, args.train_examples)
    judge = train_judge(xt, yt)
    acc = {n: sum(p == n for p, y in zip(judge.predict(xv), yv) if y == n) / yv.count(n)
           for n in NAMES}
    print(f"judge: {len(xt)} messages; accuracy on unseen member messages "
          + ", ".join(f"{n} {a:.0%}" for n, a in acc.items()), flush=True)
    res.put("judge", {"n_train": len(xt), "n_val": len(xv), "accuracy": acc,
                      "chance": 1 / len(NAMES)})
    adapters = community_adapters(cfg, splits, args.train_examples)
    if args.matrix and not res.has("matrix"):
        res.put("matrix", loss_matrix(cfg, splits, adapters))
    other = {n: NAMES[(i + 1) % len(NAMES)] for i, n in enumerate(NAMES)}
    prompts = {n: [ex.messages[1][1] for ex in s.test[-args.prompts:]] for n, s in splits.items()}
    real = {n: [ex.messages[2][1] for ex in s.test[-args.prompts:]] for n, s in splits.items()}
    for n in NAMES:
        res.put(f"{n}/real", summarize(judge, n, real[n]))
    for dec_name in args.decoding.split(","):
        dec = DECODING[dec_name]
        if res.has(f"{NAMES[0]}/{dec_name}/own"):
            continue
        # Another community's adapter only under the first decoding (the main table).
        whos = ("base", "own", "other") if dec_name in (args.decoding.split(",")[0],
                                                       SHIPPED) else ("base", "own")
        guild_of = {"base": lambda n: None, "own": lambda n: GUILD[n],
                    "other": lambda n: GUILD[other[n]]}
        jobs = [(f"{n}/{who}", guild_of[who](n), p, dec) for n in NAMES for p in prompts[n]
                for who in whos]
        print(f"decoding {dec_name}: {len(jobs)} replies", flush=True)
        scope = next((v for k, v in SCOPE.items() if dec_name.endswith(k)), "reply")
        texts = asyncio.run(generate(cfg, jobs, adapters, scope))
        for n in NAMES:
            for who in whos:
                got = [t for (k, *_), t in zip(jobs, texts) if k == f"{n}/{who}"]
                s = summarize(judge, n, got)
                s["samples"] = got[:3]
                res.put(f"{n}/{dec_name}/{who}", s)
            print(f"  {n}: " + ", ".join(
                f"{who} {res.get(f'{n}/{dec_name}/{who}')['attributed']:.0%} "
                f"(degenerate {res.get(f'{n}/{dec_name}/{who}')['degenerate']:.0%})"
                for who in whos), flush=True)
    report(res.data, other, stem)


def report(data: dict[str, Any], other: dict[str, str], stem: str) -> None:
    pts = data["points"]
    decs = [d for d in data["args"]["decoding"].split(",") if f"{NAMES[0]}/{d}/own" in pts]
    j = pts["judge"]
    lines = [f"Machine: {data['machine']}. Judge: {j['n_train']} member messages; accuracy on "
             f"{j['n_val']} unseen ones " + ", ".join(f"{n} {a:.0%}"
                                                     for n, a in j["accuracy"].items())
             + f" (chance {j['chance']:.0%}).", ""]
    for d in decs:
        lines += [f"**Decoding: {d}** (attributed to the community by the judge; degenerate; "
                  "median / p90 words)", "",
                  "| community | real replies | base | own adapter | other adapter | own / base |",
                  "|---|---|---|---|---|---|"]
        for n in NAMES:
            r, b, o, x = (pts[f"{n}/real"], pts[f"{n}/{d}/base"], pts[f"{n}/{d}/own"],
                          pts.get(f"{n}/{d}/other"))

            def cell(v: dict[str, Any] | None) -> str:
                return (f"{v['attributed']:.0%}; {v['degenerate']:.0%}; "
                        f"{v['median_words']:g} / {v['p90_words']:g}") if v else "–"
            ratio = o["attributed"] / b["attributed"] if b["attributed"] else float("inf")
            lines.append(f"| {n} | {r['attributed']:.0%}; {r['median_words']:g} / "
                         f"{r['p90_words']:g} | {cell(b)} | {cell(o)} | {cell(x)} "
                         f"({other[n]}) | {ratio:.1f}x |")
        whos = [w for w in ("base", "own", "other") if f"{NAMES[0]}/{d}/{w}" in pts]
        tot = {w: statistics.mean(pts[f'{n}/{d}/{w}']['attributed'] for n in NAMES)
               for w in whos}
        deg = {w: statistics.mean(pts[f'{n}/{d}/{w}']['degenerate'] for n in NAMES)
               for w in whos}
        lines += ["", "Mean attributed: " + ", ".join(f"{w} {tot[w]:.0%}" for w in whos)
                  + "; degenerate: " + ", ".join(f"{w} {deg[w]:.0%}" for w in whos) + ".", ""]
    if "matrix" in pts:
        m = pts["matrix"]
        lines += ["**Held-out loss on each community's newest 48 pairs** (rows: base and each "
                  "community's adapter, columns: whose data; the same adapters)", "",
                  "| adapter \\ data | " + " | ".join(NAMES) + " |", "|---|" + "---|" * len(NAMES)]
        for row, vals in m.items():
            lines.append(f"| {row} | " + " | ".join(
                f"**{vals[c]:.3f}**" if row == c else f"{vals[c]:.3f}" for c in NAMES) + " |")
        lines += ["", "| community | own vs base | own best | next best is worse by |",
                  "|---|---|---|---|"]
        for n in NAMES:
            best = min(NAMES, key=lambda a: m[a][n]) == n
            nxt = min(m[a][n] for a in NAMES if a != n) / m[n][n] - 1
            lines.append(f"| {n} | {m[n][n] / m['base'][n] - 1:+.1%} | "
                         f"{'yes' if best else 'NO'} | {nxt:+.1%} |")
        lines.append("")
    (RESULTS / f"{stem}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
