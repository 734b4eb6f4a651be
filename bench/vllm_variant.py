"""The ``vllm`` variant of ``bench/engine.py --smollm2``: VllmEngine against a real vLLM server,
and the measurement every variant shares (``measure_levels``).

The server is started with the command ``guildtune vllm`` builds (guildtune/vllm_server.py) for
SmolLM2-135M-Instruct, from the Python in $GUILDTUNE_VLLM_PYTHON, and measured on the same
request set, rounds and adapters as the local engine variants. Peak RSS is the server's process
tree (the API server and its engine core, each process's peak, summed) plus this client.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def pct(xs: list[float], q: float) -> float:
    """The ``q`` quantile of ``xs`` (nearest rank)."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


async def measure_levels(eng: Any, requests: Any, levels: tuple[int, ...], rounds: int,
                         label: str) -> tuple[dict[int, Any], dict[int, list[str]]]:
    """Every engine's measurement: at each level n, ``rounds`` times requests 0..n-1 at once;
    tokens/s over the wall time, p50/p99 latency; and the texts of the last round."""
    results: dict[int, Any] = {}
    texts: dict[int, list[str]] = {}
    for n in levels:
        lat, toks, wall = [], 0, 0.0
        for _ in range(rounds):
            t = time.perf_counter()
            res = await asyncio.gather(*(eng.generate(requests(i)) for i in range(n)))
            wall += time.perf_counter() - t
            toks += sum(r.tokens_out for r in res)
            lat += [r.latency_ms for r in res]
            texts[n] = [r.text for r in res]
        results[n] = {"tok_s": toks / wall, "p50_ms": pct(lat, 0.5), "p99_ms": pct(lat, 0.99),
                      "tokens": toks, "requests": len(lat)}
        print(f"{label} n={n}: {results[n]}", file=sys.stderr)
    return results, texts


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def tree_mem_mb(pid: int) -> dict[str, float]:
    """RSS now and the sum of each process's peak RSS, MB, over the tree of ``pid``."""
    rss = peak = 0.0
    for p in _tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss += int(line.split()[1]) / 1024
                elif line.startswith("VmHWM:"):
                    peak += int(line.split()[1]) / 1024
        except OSError:
            continue
    return {"rss_mb": rss, "peak_mb": peak}


async def vllm_variant(adapters: Path, rounds: int, cache: Path, requests: Any,
                       levels: tuple[int, ...], new_tokens: int, lora: Any) -> dict[str, Any]:
    """Start the server, run the request set at each level, swap, measure; stop the server."""
    from bot.engine import GenerationRequest, create_engine
    from guildtune.config import Config, ModelConfig
    from guildtune.vllm_server import find_python, healthy, server_command

    port = _free_port()
    model = ModelConfig(name="smollm2-135m", backend="vllm", vllm_url=f"http://127.0.0.1:{port}",
                        max_new_tokens=new_tokens, temperature=0.0, repetition_penalty=1.0,
                        max_batch_size=8, max_resident_adapters=16)
    cfg = Config(model=model, lora=lora)
    cmd = server_command(cfg, python=find_python(), cache_dir=cache / "models", cuda=False)
    log_path = cache / "vllm-bench-server.log"
    t0 = time.perf_counter()
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(cmd.argv, env={**os.environ, **cmd.env}, stdout=log_file,
                                stderr=subprocess.STDOUT, start_new_session=True)
    out: dict[str, Any] = {"variant": "vllm", "dtype": cmd.argv[cmd.argv.index("--dtype") + 1],
                           "torch_threads": "server: VLLM_CPU_OMP_THREADS_BIND=auto",
                           "command": cmd.shell()}
    try:
        while not healthy(model.vllm_url):
            if proc.poll() is not None:
                raise SystemExit("vLLM exited:\n" + log_path.read_text(errors="replace")[-3000:])
            await asyncio.sleep(1)
        out["startup_s"] = time.perf_counter() - t0
        eng = create_engine(model, lora, cache_dir=cache / "models", data_dir=cache)
        await eng.start()
        try:
            for g in range(1, 5):
                await eng.activate(g, 1, adapters / str(g) / "1")
            await asyncio.gather(*(eng.generate(requests(i)) for i in range(8)))  # warm-up
            out["levels"], out["texts"] = await measure_levels(eng, requests, levels, rounds,
                                                               "vllm")
            # Swaps of guild 1 while guilds 2-4 ask: the load call's time (the server keeps
            # generating meanwhile), then activate -> first complete 8-token reply.
            loads, to_reply = [], []
            short = GenerationRequest(1, requests(0).messages, max_new_tokens=8,
                                      temperature=0.0, repetition_penalty=1.0)
            for k in range(6):
                v = 2 if k % 2 == 0 else 1
                background = [asyncio.ensure_future(eng.generate(requests(i)))
                              for i in (1, 2, 3)]
                await asyncio.sleep(0.05)
                t = time.perf_counter()
                await eng.activate(1, v, adapters / "1" / str(v))
                loads.append((time.perf_counter() - t) * 1000)
                res = await eng.generate(short)
                assert res.adapter_version == v
                to_reply.append((time.perf_counter() - t) * 1000)
                await asyncio.gather(*background)
            out["activate_ms"] = statistics.median(loads)
            # The server keeps generating while it loads: no model-thread pause to report.
            out["activate_idle_ms"] = out["swap_pause_ms"] = None
            out["activate_to_reply_ms"] = statistics.median(to_reply)
        finally:
            await eng.close()
        server = tree_mem_mb(proc.pid)
        own = {}
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                own["peak_mb"] = int(line.split()[1]) / 1024
        out["server_mem_mb"], out["client_peak_mb"] = server, own["peak_mb"]
        out["peak_rss_mb"] = server["peak_mb"] + own["peak_mb"]
    finally:
        t = time.perf_counter()
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        out["stop_s"] = time.perf_counter() - t
    return out
