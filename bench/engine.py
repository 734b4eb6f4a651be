"""Engine benchmark at Qwen2.5-0.5B shape (random weights), LoRA r=16 on all linear layers.

Measures, in one run, each against its baseline:
- activating a new adapter version by hot swap vs. reloading the base model in-process vs.
  restarting a process that loads it (median wall times, ratios);
- throughput with 1, 4, 8 concurrent guilds: micro-batched mixed adapters vs. one at a time;
- event-loop lag (p99, max) while generating and while swapping.

    python bench/engine.py            # full (~5-8 min on 2 CPU cores)
    python bench/engine.py --quick    # 4 layers, fewer repetitions (smoke run)

Prints a table and writes bench/results/engine.json.
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


def write_adapter(root: Path, model: Any, guild: int, version: int) -> Path:
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
    write_meta(path, adapter_meta(guild_id=guild, version=version, base_model=BASE_ID,
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="4 layers, fewer repetitions")
    ap.add_argument("--layers", type=int, default=24, help="decoder layers (Qwen2.5-0.5B: 24)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "engine.json")
    args = ap.parse_args()
    result = asyncio.run(bench(args))
    print(table(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
