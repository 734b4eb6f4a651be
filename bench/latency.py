"""Reply latency under Poisson arrivals: micro-batching vs continuous batching (issue 12 item 5).

Requests from 8 guilds (guilds 1-4 with their own random LoRA r16 all-linear adapter, guilds 5-8
on the base model) arrive as a Poisson process (fixed seed, the same schedule for every engine)
and ask for greedy replies of a fixed length. Each engine is ``LocalEngine`` on its own copy of
SmolLM2-135M-Instruct (fp32, CPU):

- ``batched``: ``continuous = False``, the micro-batch loop: one HF ``generate`` per batch; a
  request arriving meanwhile waits for the whole batch;
- ``continuous``: the step loop: a request joins the running batch at the next decode step.

Latency is measured by the client, from the request's arrival to its reply. Also reported:
throughput (generated tokens / time from first arrival to last reply), how many requests got
the same text from both engines, and the machine's load average around each run (the bench
machine is shared: high load makes every number slower).

    python bench/latency.py                    # 40 requests at 0.5/s, 48 tokens (~4 min, 2 cores)
    python bench/latency.py --rate 0.3         # less load
    python bench/latency.py --rounds 2         # each engine twice, ABBA order (~8 min)
    python bench/latency.py --quick            # the tiny model, a smoke run (seconds)

Prints a table and writes bench/results/latency.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.engine import LORA, SMOL_MODELS, SMOL_PROMPTS, write_adapter  # noqa: E402
from bot.engine import GenerationRequest, LocalEngine  # noqa: E402
from guildtune.config import ModelConfig  # noqa: E402

ADAPTER_GUILDS = (1, 2, 3, 4)
GUILDS = tuple(range(1, 9))  # 5-8: no adapter, the base model
MODES = {"batched": "micro-batch (HF generate)", "continuous": "continuous (step loop)"}


def schedule(n: int, rate: float, seed: int,
             new_tokens: int) -> list[tuple[float, GenerationRequest]]:
    """n (arrival time s, request) pairs: exponential gaps of mean 1/rate, a random guild of 8
    and a random prompt each; greedy, no repetition penalty."""
    rnd = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        t += rnd.expovariate(rate)
        guild = rnd.choice(GUILDS)
        prompt = rnd.choice(SMOL_PROMPTS)
        out.append((t, GenerationRequest(guild, [
            {"role": "system", "content": "You are a friendly community bot. Answer briefly."},
            {"role": "user", "content": prompt}],
            max_new_tokens=new_tokens, temperature=0.0, repetition_penalty=1.0)))
    return out


def pct(xs: list[float], q: float) -> float:
    """Nearest-rank percentile (with 40 samples, p99 is the largest)."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def load(quick: bool) -> Any:
    from guildtune.models import SMOLLM2, load_model

    if quick:
        return load_model("tiny", device="cpu", dtype="float32")
    loaded = load_model(SMOLLM2, device="cpu", dtype="float32", cache_dir=SMOL_MODELS)
    sum(float(p.data.sum()) for p in loaded.model.parameters())  # lazily mapped: read it all
    return loaded


async def run_mode(mode: str, args: argparse.Namespace, adapters: Path,
                   plan: list[tuple[float, GenerationRequest]]) -> dict[str, Any]:
    loaded = load(args.quick)
    cfg = ModelConfig(name=loaded.name, device="cpu", dtype="float32",
                      max_new_tokens=args.new_tokens, temperature=0.0, repetition_penalty=1.0,
                      max_batch_size=8, batch_wait_ms=15, max_resident_adapters=16)
    eng = LocalEngine(loaded, cfg, LORA)
    eng.continuous = mode == "continuous"
    eng.stream_interval_s = 0.0  # streaming rows are decoded every step (first text exact)
    await eng.start()
    try:
        for g in ADAPTER_GUILDS:
            await eng.activate(g, 1, adapters / str(g) / "1")
        # Warm-up: one request per adapter and the base, together.
        await asyncio.gather(*(eng.generate(GenerationRequest(g, plan[0][1].messages,
                                                              max_new_tokens=8))
                               for g in (*ADAPTER_GUILDS, 5)))
        batches0, steps0 = eng.batches_run, eng.steps_run
        load0 = os.getloadavg()
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        start = time.perf_counter()

        async def one(at: float, req: GenerationRequest) -> tuple[float, float, float, Any]:
            await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
            t = time.perf_counter()
            first: list[float] = []

            def on_text(_text: str) -> None:  # streaming, as the bot replies: first text seen
                if not first:
                    first.append(time.perf_counter())

            res = await eng.generate(req, on_text=on_text)
            end = time.perf_counter()
            return t - start, (end - t) * 1000, ((first[0] if first else end) - t) * 1000, res

        done = await asyncio.gather(*(one(at, r) for at, r in plan))
        wall = time.perf_counter() - start - done[0][0]  # first arrival to last reply
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        load1 = os.getloadavg()
    finally:
        await eng.close()
    lat = [ms for _, ms, _, _ in done]
    first = [ms for _, _, ms, _ in done]
    toks = sum(r.tokens_out for *_, r in done)
    cpu_s = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
    out = {"mode": mode, "label": MODES[mode], "requests": len(done),
           "p50_ms": pct(lat, 0.5), "p90_ms": pct(lat, 0.9), "p99_ms": pct(lat, 0.99),
           "mean_ms": statistics.fmean(lat), "max_ms": max(lat),
           "first_text_p50_ms": pct(first, 0.5), "first_text_p99_ms": pct(first, 0.99),
           "tokens": toks,
           "tok_s": toks / wall, "wall_s": wall, "batches": eng.batches_run - batches0,
           "decode_steps": eng.steps_run - steps0, "cpu_s": cpu_s,
           "loadavg_before": load0, "loadavg_after": load1,
           "latency_ms": lat, "first_text_ms": first, "texts": [r.text for *_, r in done],
           "versions": [r.adapter_version for *_, r in done]}
    print(f"{mode}: p50 {out['p50_ms']:.0f} ms, p99 {out['p99_ms']:.0f} ms, "
          f"{out['tok_s']:.1f} tok/s, load {load0[0]:.2f}->{load1[0]:.2f}", file=sys.stderr)
    return out


def table(r: dict[str, Any]) -> str:
    lines = [(f"reply latency: {r['model']}, {r['requests']} requests, Poisson {r['rate']}/s "
              f"from 8 guilds (4 adapters, LoRA r16 all-linear), {r['new_tokens']} new tokens "
              f"greedy, {r['cpu']}, {r['torch_threads']} torch threads"), "",
             ("reply: arrival to the whole reply; first text: arrival to the first streamed "
              "text (on_text)"), "",
             (f"{'engine':<28}{'run':>4}{'reply p50':>10}{'p90':>7}{'p99':>7}{'mean':>7}"
              f"{'first text p50':>15}{'p99':>7}{'tok/s':>7}{'prefills':>9}{'steps':>6}"
              f"{'load 1m':>12}")]
    for m in r["modes"]:
        steps = m["decode_steps"] if m["mode"] == "continuous" else "-"
        lines.append(f"{m['label']:<28}{m['round']:>4}{m['p50_ms']:>10.0f}{m['p90_ms']:>7.0f}"
                     f"{m['p99_ms']:>7.0f}{m['mean_ms']:>7.0f}{m['first_text_p50_ms']:>15.0f}"
                     f"{m['first_text_p99_ms']:>7.0f}{m['tok_s']:>7.1f}{m['batches']:>9}"
                     f"{steps:>6}{m['loadavg_before'][0]:>6.2f}-{m['loadavg_after'][0]:<5.2f}")
    lines.append("(times in ms; load 1m: the machine's 1-minute load average before-after)")
    if "same_text" in r:
        lines += ["", f"same reply text from both engines: {r['same_text']}/{r['requests']}"]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--rate", type=float, default=0.5, help="mean arrivals per second")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--seed", type=int, default=12)
    ap.add_argument("--modes", default="batched,continuous")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run the engines this many times each, in ABBA order")
    ap.add_argument("--quick", action="store_true", help="the tiny model, 12 requests at 4/s")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "latency.json")
    args = ap.parse_args()
    import tempfile

    if args.quick:
        args.requests, args.rate = 12, 4.0
        if args.out == ap.get_default("out"):  # a smoke run does not overwrite the results
            args.out = Path(tempfile.gettempdir()) / "guildtune-latency-quick.json"
    from transformers import AutoModelForCausalLM

    loaded = load(args.quick)
    adapters = Path(tempfile.mkdtemp(prefix="guildtune-latency-"))
    with torch.device("meta"):
        shape = AutoModelForCausalLM.from_config(loaded.model.config)
    for g in ADAPTER_GUILDS:
        write_adapter(adapters, shape, g, 1, base_id=loaded.base_id)
    model = "tiny" if args.quick else "SmolLM2-135M-Instruct"
    del loaded
    plan = schedule(args.requests, args.rate, args.seed, args.new_tokens)
    order = args.modes.split(",")
    modes = []
    for k in range(args.rounds):  # ABBA...: machine load drifting over time hits both alike
        for m in order if k % 2 == 0 else order[::-1]:
            modes.append(asyncio.run(run_mode(m, args, adapters, plan)))
            modes[-1]["round"] = k + 1
    cpu = platform.processor() or platform.machine()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    result: dict[str, Any] = {
        "model": model, "cpu": f"{cpu}, {os.cpu_count()} cores",
        "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
        "requests": args.requests, "rate": args.rate, "new_tokens": args.new_tokens,
        "seed": args.seed, "rounds": args.rounds, "lora": LORA.shape(),
        "arrivals_s": [round(t, 3) for t, _ in plan],
        "guilds": [r.guild_id for _, r in plan], "modes": modes}
    texts = {m["mode"]: m["texts"] for m in modes[::-1]}  # each engine's first run
    if len(texts) == 2:
        a, b = texts.values()
        result["same_text"] = sum(x == y for x, y in zip(a, b, strict=True))
    print(table(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
