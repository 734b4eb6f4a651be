"""How much data pays: held-out loss on a community's future against the number of training
examples it had, for the step policy a fit runs with.

For each community and size k: fit an adapter on the newest k reply pairs before the community's
newest 48 (``bench/communities.py``), score it and the base model on those 48. Two step
policies: ``epochs`` (one pass, ``training.epochs = 1``: what the trainer did before issue 14)
and ``min-steps`` (at least ``training.min_steps`` = 40 steps but at most 6 passes, the default
since; ``trainer.fit.plan_steps``). The "40 steps" column is the floor without the 6-pass cap,
as first measured. A sweep of
learning rate, rank and epochs at one size shows what the rest of the defaults rest on.

    .venv/bin/python bench/data_curve.py [--communities linux,rust,ubuntu]
        [--sizes 25,50,100,200,400,all] [--max-size 400] [--sweep rust:200]

Not in CI (about an hour on a 2-core CPU). Resumes: each point is written to
bench/results/data_curve.json as it is measured; --fresh starts over. Writes data_curve.md and
data_curve.png.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # before bench/ (bench/trainer.py)

from bench.communities import (
    RESULTS,
    TEST_PAIRS,
    Results,
    bench_config,
    fit_adapter,
    load_split,
    loss,
    machine,
)

POLICIES = {"epochs": {"epochs": 1.0, "min_steps": 0}, "min-steps": {}}
# The table's columns: one pass; 40 steps whatever the size (the first min_steps, before the
# 6-pass cap: measured, not re-run); the default (40 steps, at most 6 passes).
COLUMNS = {"epochs": "one pass", "40 steps": "40 steps", "min-steps": "default (>= 40 steps, "
           "<= 6 passes)"}
SWEEP = [("lr 3e-4", {"learning_rate": 3e-4}, {}), ("lr 1.2e-3", {"learning_rate": 1.2e-3}, {}),
         ("rank 8", {}, {"rank": 8, "alpha": 16}), ("rank 32", {}, {"rank": 32, "alpha": 64})]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--communities", default="rust,ubuntu,linux")
    ap.add_argument("--sizes", default="25,50,100,200,400,all")
    ap.add_argument("--max-size", type=int, default=400,
                    help="'all' stops here (ubuntu has 4,000 pairs)")
    ap.add_argument("--sweep", default="rust:200", help="community:size for the sweep, or ''")
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()

    path = RESULTS / "data_curve.json"
    if args.fresh:
        path.unlink(missing_ok=True)
    res = Results(path, {"machine": machine(), "model": args.model, "test_pairs": TEST_PAIRS})
    from trainer.fit import plan_steps
    from trainer.pipeline import load_base

    cfg0 = bench_config(args.model, threads=args.threads)
    lm = load_base(cfg0)
    base = lm.model
    plan = []
    for name in args.communities.split(","):
        split = load_split(name, cfg0)
        key = f"{name}/base"
        if not res.has(key):
            res.put(key, {"loss": loss(base, lm, split.test, cfg0), "pool": len(split.pool)})
        print(f"{name}: {len(split.pool)} training pairs, base {res.get(key)['loss']:.3f}",
              flush=True)
        sizes = sorted({min(len(split.pool), args.max_size) if s == "all" else int(s)
                        for s in args.sizes.split(",")})
        plan.append((name, split, [(p, k, POLICIES[p], {}) for k in sizes
                                    if k <= len(split.pool) for p in POLICIES]))
    if args.sweep:  # after every curve: the curves matter more
        name, k = args.sweep.split(":")
        split = next(s for n, s, _ in plan if n == name)
        plan.append((name, split, [(label, int(k), t, lo) for label, t, lo in SWEEP]))
    for name, split, runs in plan:
        for policy, k, training, lora in runs:
            key = f"{name}/{policy}/{k}"
            if res.has(key):
                continue
            cfg = cfg0.replace(training=training, lora=lora) if (training or lora) else cfg0
            twins = [f"{name}/epochs/{k}", f"{name}/40 steps/{k}"]
            steps = plan_steps(math.ceil(k / cfg.training.batch_size), cfg)
            twin = next((t for t in twins if res.has(t) and res.get(t)["steps"] == steps), None)
            if policy == "min-steps" and twin:
                res.put(key, res.get(twin))  # the same fit: the floor changes nothing here
                continue
            peft_model, stats = fit_adapter(base, lm, split.train(k), cfg)
            stats["loss"] = loss(peft_model, lm, split.test, cfg)
            base = peft_model.unload()
            res.put(key, stats)
            print(f"  {key}: {stats['loss']:.3f} ({stats['steps']} steps, "
                  f"{stats['seconds']:.0f} s)", flush=True)
    report(res.data)


def report(data: dict) -> None:
    pts = data["points"]
    names = sorted({k.split("/")[0] for k in pts})
    lines = [f"Model `{data['model']}`; each community scored on its newest {data['test_pairs']} "
             f"reply pairs; per-token loss (lower is better), and in brackets the change "
             f"against the base model. Machine: {data['machine']}.", ""]
    chart = {}
    for name in names:
        base = pts[f"{name}/base"]["loss"]
        lines += [f"**{name}** (base {base:.3f}, {pts[f'{name}/base']['pool']} pairs before the "
                  "test slice)", "", "| examples | " + " | ".join(COLUMNS.values()) + " |",
                  "|---|" + "---|" * len(COLUMNS)]
        sizes = sorted({int(k.split("/")[2]) for k in pts
                        if k.startswith(name + "/") and k.split("/")[1] in COLUMNS})
        for k in sizes:
            cells = []
            for p in COLUMNS:
                v = pts.get(f"{name}/{p}/{k}")
                if v is None and p == "40 steps":  # the default's fit when it ran 40 steps
                    d = pts.get(f"{name}/min-steps/{k}")
                    v = d if d and d["steps"] == 40 else None
                cells.append(f"{v['loss']:.3f} ({v['loss'] / base - 1:+.1%}, {v['steps']} steps)"
                             if v else "–")
                if v and p != "40 steps":
                    chart.setdefault(f"{name} ({COLUMNS[p]})", []).append(
                        (k, v["loss"] / base - 1))
            lines.append(f"| {k} | " + " | ".join(cells) + " |")
        sweep = {k.split("/")[1]: v for k, v in pts.items()
                 if k.startswith(name + "/") and k.split("/")[1] not in COLUMNS
                 and k.split("/")[1] != "base"}
        if sweep:
            k0 = next(iter(sweep.values()))
            lines += ["", f"Sweep at {k0['n_train']} examples (the default is the last column "
                      "above; lr 6e-4, rank 16):", "",
                      "| variant | loss | vs base | steps |", "|---|---|---|---|"]
            for label, v in sweep.items():
                lines.append(f"| {label} | {v['loss']:.3f} | {v['loss'] / base - 1:+.1%} | "
                             f"{v['steps']} |")
        lines.append("")
    (RESULTS / "data_curve.md").write_text("\n".join(lines))
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for label, xs in chart.items():
            ax.plot([x for x, _ in xs], [100 * y for _, y in xs], marker="o", label=label,
                    linestyle="--" if "pass" in label else "-")
        ax.set_xscale("log")
        ax.set_xlabel("training examples (reply pairs)")
        ax.set_ylabel("held-out loss vs base model (%)")
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.legend(fontsize=7)
        ax.set_title("How much data pays (newest 48 pairs of each community)")
        fig.tight_layout()
        fig.savefig(RESULTS / "data_curve.png", dpi=110)
    except ImportError:
        pass


if __name__ == "__main__":
    main()
