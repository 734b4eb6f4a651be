"""How long a forgotten member's data keeps answering, on the tiny model, through the real path.

A guild is trained (v1) and served by a real ``LocalEngine`` that the bot's ``AdapterWatcher``
keeps in step with the store. A second run starts; while it fits, a contributor of v1 runs
/forget (``Core.forget``, ``strict_forget`` on, the default). Measured from the forget:

- (a) until the engine no longer serves v1 (the store rolls back in the forget's transaction;
  the engine follows at the watcher's next poll: the bot polls every ``watch_interval`` s,
  5 by default, so add up to that in a bot; here the watcher is polled in a tight loop);
- (b) until a clean retrained version serves: the in-flight run ends without publishing, the
  retrain queued after it trains and is activated, and the engine swaps it in.

Baseline in the same run: an ordinary retrain of the same guild, from queueing to serving. The
ratio (b) / baseline says what a forget costs over a retrain that was going to happen anyway.

    python bench/forget_latency.py        # ~1-2 min on 2 CPU cores
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import random
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")

from bot.engine import LocalEngine  # noqa: E402
from bot.handlers import AdapterWatcher, Core  # noqa: E402
from bot.services import Services  # noqa: E402
from guildtune.config import parse_config  # noqa: E402
from guildtune.models import load_model  # noqa: E402
from storage import open_store  # noqa: E402
from storage.times import format_utc  # noqa: E402
from trainer.worker import run_worker, train_foreground  # noqa: E402

G = 1
WORDS = "rust linux code build test cargo kernel patch module error crate driver".split()


def seed_guild(store: Any, n: int = 120) -> None:
    """(question, pirate answer) pairs among 12 members, imported as consented history."""
    from datetime import UTC, datetime, timedelta

    r = random.Random(1)
    t0 = datetime.now(UTC) - timedelta(days=3)
    rows = []
    for i in range(n):
        w = r.choice(WORDS)
        asker, answerer = r.sample(range(100, 112), 2)
        t = format_utc(t0 + timedelta(minutes=i))
        rows.append({"message_id": 2 * i + 1, "user_id": asker, "created_utc": t,
                     "text": f"how do I fix the {w}?"})
        rows.append({"message_id": 2 * i + 2, "user_id": answerer, "created_utc": t,
                     "text": f"arr matey, the {w} be fine, yo ho ho {r.choice(WORDS)}",
                     "reply_to_message_id": 2 * i + 1})
    store.import_messages(G, rows)
    store.update_guild_settings(G, learn_from_humans=True, training_enabled=True)


async def serving(watcher: AdapterWatcher, engine: LocalEngine, want: Any) -> float:
    """Poll the watcher until the engine serves ``want`` (a version or None); monotonic time."""
    while True:
        await watcher.sync_once()
        if engine.active_versions().get(G) == want:
            return time.monotonic()
        await asyncio.sleep(0.01)


async def main() -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="gt-forget-"))
    cfg = parse_config({
        "storage": {"data_dir": str(tmp)}, "model": {"name": "tiny"},
        "lora": {"rank": 8, "alpha": 16},
        "training": {"enabled": True, "epochs": 2.0, "batch_size": 16, "max_seq_len": 96,
                     "learning_rate": 3e-3, "heldout_fraction": 0.2, "lease_seconds": 60,
                     # 0: the in-flight run (same data as v1) passes the gate and reaches
                     # publish, where the consent check refuses it.
                     "eval_margin": 0.0},
    })
    assert cfg.training.strict_forget
    store = open_store(cfg.db_path)
    seed_guild(store)
    engine = LocalEngine(load_model("tiny", device="cpu", dtype="float32"), cfg.model, cfg.lora)
    await engine.start()
    services = Services(config=cfg, store=store, engine=engine)
    core, watcher = Core(services), AdapterWatcher(services, interval=0.05)

    # Baseline: an ordinary retrain, queued to serving.
    t = time.monotonic()
    _, res = await asyncio.to_thread(train_foreground, store, cfg, G)
    assert res.status == "succeeded", res.metrics
    baseline = await serving(watcher, engine, res.version) - t
    v1 = res.version
    member = max(store.contributors(G, v1).items(), key=lambda kv: kv[1])[0]

    # A second run starts; the member forgets while it fits.
    fitting = threading.Event()

    def progress(p: dict[str, Any]) -> None:
        if "step" in p:
            fitting.set()

    holder: dict[str, Any] = {}
    runner = threading.Thread(target=lambda: holder.update(
        r=train_foreground(store, cfg, G, force=False, progress=progress)))
    runner.start()
    await asyncio.to_thread(fitting.wait, 300)
    t_forget = time.monotonic()
    said = await core.forget(G, member)
    t_a = await serving(watcher, engine, None) - t_forget
    await asyncio.to_thread(runner.join)
    in_flight = holder["r"][1]
    # The retrain queued after the in-flight run: what a worker would pick up next.
    handled = await asyncio.to_thread(run_worker, cfg, once=True, store=store, isolate=False)
    new = store.active_version(G)
    assert new is not None and new.tainted_utc is None and member not in store.contributors(
        G, new.version)
    t_b = await serving(watcher, engine, new.version) - t_forget
    await engine.close()
    store.close()
    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus, torch threads 1",
        "model": "tiny (2 layers, hidden 128), LoRA r=8, 120 reply pairs, 2 epochs",
        "forget_reply": said,
        "in_flight_run": {"status": in_flight.status, "reason": in_flight.reason},
        "worker_handled": handled if isinstance(handled, int) else str(handled),
        "baseline_retrain_to_serving_s": round(baseline, 3),
        "a_forget_to_tainted_out_of_service_s": round(t_a, 4),
        "b_forget_to_clean_version_serving_s": round(t_b, 3),
        "b_over_baseline": round(t_b / baseline, 2),
    }


if __name__ == "__main__":
    out = asyncio.run(main())
    print(json.dumps(out, indent=2, ensure_ascii=False))
    dest = ROOT / "bench" / "results" / "forget_latency.json"
    dest.write_text(json.dumps(out, indent=2, ensure_ascii=False) + "\n", "utf-8")
    print(f"wrote {dest.relative_to(ROOT)}")
