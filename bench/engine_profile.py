"""Where the local engine's decode time goes on a GPU: HF generate vs the engine (continuous and
micro-batch, with and without an adapter), and one generate under torch.profiler. A device check
(bench/device_check.sh); DEV=cpu runs it here."""
import asyncio, sys, tempfile, time
from pathlib import Path
sys.path.insert(0, ".")
import torch
from bench.engine import LORA, BASE_ID, build_base, write_adapter, req
from bot.engine import LocalEngine
from guildtune.config import ModelConfig
from guildtune.models import LoadedModel, build_tiny_tokenizer

async def main():
    import os; dev = os.environ.get("DEV", "cuda"); dt = torch.bfloat16 if dev == "cuda" else torch.float32
    model = build_base(24, dt, dev)
    tmp = Path(tempfile.mkdtemp())
    a1 = write_adapter(tmp / "ad", model, 1, 1)
    tok = build_tiny_tokenizer()
    ids = tok("hello from guild 1, what is new today?", return_tensors="pt").input_ids.to(dev)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=4, do_sample=False)
        torch.cuda.synchronize(); t = time.perf_counter()
        out = model.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False)
        torch.cuda.synchronize()
    print(f"HF generate, no adapter: {32 / (time.perf_counter() - t):.1f} tok/s")
    loaded = LoadedModel(model, tok, BASE_ID, BASE_ID, torch.device(dev), dt)
    for continuous in (True, False):
        cfg = ModelConfig(name=BASE_ID, device=dev, max_new_tokens=32, temperature=0.0,
                          repetition_penalty=1.0, max_batch_size=8, batch_wait_ms=15,
                          max_resident_adapters=16)
        eng = LocalEngine(loaded, cfg, LORA)
        eng.continuous = continuous
        await eng.start()
        await eng.activate(1, 1, a1)
        await eng.generate(req(1, 4)); await eng.generate(req(2, 4))
        for g in (1, 2):
            t = time.perf_counter(); r = await eng.generate(req(g, 32))
            print(f"engine continuous={continuous} guild {g} ({'adapter' if g == 1 else 'base'}):"
                  f" {r.tokens_out / (time.perf_counter() - t):.1f} tok/s ({r.tokens_out} tokens)")
        if continuous:
            from torch.profiler import profile, ProfilerActivity
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                await eng.generate(req(1, 16))
            ka = prof.key_averages()
            print(ka.table(sort_by="cpu_time_total", row_limit=18, max_name_column_width=60))
            print("cuda kernels launched:", sum(e.count for e in ka if e.device_type.name == "CUDA"))
        await eng.close()

asyncio.run(main())
