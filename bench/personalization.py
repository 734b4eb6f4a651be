"""Real-community personalization: does each community's adapter fit it best?

For each community in ../shared/data/irc: `guildtune import` it into its own guild, `guildtune
train` an adapter on the reply pairs of its training split, then `guildtune eval` the base model
and every adapter on every community's held-out pairs. The split is the gate's time split: a
community trains on its earlier pairs and is scored on its newest (``trainer.data.heldout_of``, the
slice its own run held out), as a live guild is; no adapter is scored on pairs it trained on.
Goal: on every community's data its own adapter has the lowest loss of all adapters, clearly
below the base model. The random-split matrix of before issue 13 is kept beside it
(results/personalization-random-split.md).

    .venv/bin/python bench/personalization.py [--model smollm2-135m] [--max-examples 300]
        [--max-pairs 60] [--communities rust,linux,...]

Not in CI (tens of minutes on a 2-core CPU). Writes bench/results/personalization.json and .md.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IRC = ROOT.parent / "shared" / "data" / "irc"
RESULTS = ROOT / "bench" / "results"
BASE_GUILD = 999  # a guild with no adapter: eval reports the base model


def gt(cfg: Path, *args: str) -> str:
    """Run one guildtune command, return its stdout; fail loudly with its stderr."""
    proc = subprocess.run([sys.executable, "-m", "guildtune", "--config", str(cfg), *args],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"guildtune {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    return proc.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--max-examples", type=int, default=300,
                    help="training examples per community (newest first)")
    ap.add_argument("--max-pairs", type=int, default=60, help="held-out pairs per evaluation")
    ap.add_argument("--communities", default="linux,mediawiki,rust,stripe,ubuntu-meeting,ubuntu")
    ap.add_argument("--work", default="/tmp/guildtune-personalization")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    for f in ("guildtune.db", "guildtune.db-wal", "guildtune.db-shm"):
        (work / f).unlink(missing_ok=True)
    cfg = work / "config.toml"
    cfg.write_text(
        f'[storage]\ndata_dir = "{work}"\n[model]\nname = "{args.model}"\nthreads = {args.threads}\n'
        f'[training]\nenabled = true\nepochs = 1.0\nlearning_rate = 6e-4\n'
        f'max_examples = {args.max_examples}\neval_margin = 0.0\n[privacy]\nmax_user_share = 1.0\n')
    names = args.communities.split(",")
    guilds = {name: i + 1 for i, name in enumerate(names)}
    timings: dict[str, float] = {}
    gates: dict[str, str] = {}
    for name, g in guilds.items():
        path = IRC / f"irc-{name}.jsonl"
        t = time.perf_counter()
        gt(cfg, "import", "--guild", str(g), "--learn-from-humans", str(path))
        out = gt(cfg, "train", "--guild", str(g), "--force")
        timings[f"train {name}"] = time.perf_counter() - t
        gates[name] = out.strip().splitlines()[-3:]
        print(f"trained {name} in {timings[f'train {name}']:.0f} s: {' | '.join(gates[name])}",
              flush=True)

    matrix: dict[str, dict[str, float]] = {"base": {}}
    t = time.perf_counter()
    for data in names:
        path = str(IRC / f"irc-{data}.jsonl")
        res = json.loads(gt(cfg, "eval", "--guild", str(BASE_GUILD), "--data", path,
                            "--max-pairs", str(args.max_pairs)))
        matrix["base"][data] = res["base_loss"]
        for name, g in guilds.items():
            res = json.loads(gt(cfg, "eval", "--guild", str(g), "--data", path,
                                "--max-pairs", str(args.max_pairs), "--no-base"))
            matrix.setdefault(name, {})[data] = res["adapter_loss"]
        print(f"evaluated on {data}: " + ", ".join(
            f"{k} {v[data]:.3f}" for k, v in matrix.items()), flush=True)
    timings["evaluate"] = time.perf_counter() - t

    diag = {n: matrix[n][n] / matrix["base"][n] - 1 for n in names}
    own_best = {n: min(names, key=lambda a: matrix[a][n]) == n for n in names}
    margin = {n: min(matrix[a][n] for a in names if a != n) / matrix[n][n] - 1 for n in names}
    lines = ["| adapter \\ data | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for row, vals in matrix.items():
        lines.append(f"| {row} | " + " | ".join(
            f"**{vals[c]:.3f}**" if row == c else f"{vals[c]:.3f}" for c in names) + " |")
    lines += ["", "| community | own vs base | own adapter best | next best is worse by |",
              "|---|---|---|---|"]
    lines += [f"| {n} | {diag[n]:+.1%} | {'yes' if own_best[n] else 'NO'} | {margin[n]:+.1%} |"
              for n in names]
    total = sum(timings.values())
    lines += ["", f"Wall time: {total / 60:.1f} min ({', '.join(f'{k} {v:.0f} s' for k, v in timings.items())})."]
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    meta = {"machine": f"{platform.machine()} python {platform.python_version()}",
            "args": vars(args), "matrix": matrix, "own_vs_base": diag, "own_best": own_best,
            "margin_over_next_best": margin, "timings_s": timings, "train_output": gates}
    (RESULTS / "personalization.json").write_text(json.dumps(meta, indent=2))
    (RESULTS / "personalization.md").write_text(
        f"# Personalization on six real communities\n\nModel `{args.model}`, "
        f"{args.max_examples} training examples per community, {args.max_pairs} held-out pairs "
        "per cell. Rows: the base model and each community's adapter; columns: whose held-out "
        f"data. Per-token loss, lower is better.\n\n{table}\n\nReproduce: `.venv/bin/python "
        f"bench/personalization.py --model {args.model} --max-examples {args.max_examples} "
        f"--max-pairs {args.max_pairs}`\n")


if __name__ == "__main__":
    main()
