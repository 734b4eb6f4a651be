"""Trainer benchmark: our fit against transformers' Trainer + peft, and against itself before.

Same model, same data (reply pairs of one IRC community, the time split's training part), same
LoRA shape, steps, batch size and learning rate; each variant in its own process, so its peak
RSS is its own:

- ``before``: the fit as it was (fp32 weights and compute, whole batches however long, the
  vocab logits of every labelled position kept for the backward, SDPA attention, no padding
  to 32, LoRA dropout 0.05);
- ``ours``: the fit as configured by default (``training.precision`` auto: bf16 where the machine
  multiplies it natively, batches cut to ``training.max_batch_tokens``, the fused output layer);
- ``trainer``: ``Trainer`` + peft the default way (DataCollatorForSeq2Seq padding to the longest,
  the model's own forward with full logits), fp32;
- ``trainer-bf16``: the same with ``bf16=True`` (its autocast), its best on this machine.

The run also measures the machine's matmul peak (GFLOP/s, fp32 and bf16, same threads) so the
fit's utilisation is a number: model FLOPs per step (forward + the backward a frozen base needs)
x steps/s / peak. With ``--cli`` it also times ``guildtune train`` end to end (dataset, fit,
time-split gate, publish) and reads its peak RSS.

    python bench/trainer.py --model smollm2-135m --steps 30 --threads 2
    python bench/trainer.py --model smollm2-135m --cli-only   # guildtune train, whole run
    python bench/trainer.py --device cuda --shape qwen2.5-0.5b --tokenizer DIR --steps 40
        (a GPU: random-init weights of that shape, since the device cannot fetch checkpoints)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DATA = Path(os.environ.get("GUILDTUNE_BENCH_DATA", "/work/shared/data/irc"))
CACHE = Path(os.environ.get("GUILDTUNE_BENCH_CACHE", "/tmp/guildtune-bench"))
MODELS = CACHE / "models"
VARIANTS = ("before", "ours", "trainer", "trainer-bf16")
# Shapes for random-init runs (a device machine reaches no hub): Llama-style configs.
SHAPES = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                         tie_word_embeddings=True),
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                         tie_word_embeddings=True),
}


def _cfg(args: argparse.Namespace, variant: str) -> object:
    from guildtune.config import parse_config

    training = {"enabled": True, "epochs": 100.0, "max_steps": args.steps,
                "batch_size": args.batch_size, "max_seq_len": args.max_seq_len,
                "learning_rate": args.lr, "time_budget_minutes": 60.0}
    lora: dict = {}
    if variant == "before":
        training.update(precision="fp32", max_batch_tokens=1 << 20)
        lora["dropout"] = 0.05
    return parse_config({"storage": {"data_dir": str(CACHE)},
                         "model": {"name": args.model, "cache_dir": str(MODELS),
                                   "device": args.device},
                         "lora": lora, "training": training})


def _examples(community: str, cfg: object) -> tuple[list, list]:
    from guildtune.community import read_jsonl
    from trainer.data import examples_from_messages, split_heldout

    ex = examples_from_messages(read_jsonl(DATA / f"irc-{community}.jsonl"),
                                cfg.model.system_prompt)
    return split_heldout(ex, cfg.training.heldout_fraction)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _load(args: argparse.Namespace, cfg: object, dtype: str) -> object:
    """The model: the configured checkpoint, or random weights of ``--shape``."""
    import torch

    from guildtune.models import LoadedModel, load_model, resolve_device

    if not args.shape:
        return load_model(args.model, device=args.device, dtype=dtype, cache_dir=MODELS)
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from guildtune.models import CHAT_TEMPLATE

    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if tok.chat_template is None:
        tok.chat_template = CHAT_TEMPLATE
    dev, dt = resolve_device(args.device, dtype)
    torch.manual_seed(0)
    conf = LlamaConfig(**SHAPES[args.shape], max_position_embeddings=4096,
                       pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    with torch.device(dev):
        model = LlamaForCausalLM(conf).to(dt)
    model.eval()
    return LoadedModel(model, tok, args.shape, f"{args.shape}@random", dev, dt)


def _count_params(model: object) -> tuple[int, int]:
    """(parameters outside the embeddings and output layer, hidden size x vocab)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    emb = base.get_input_embeddings().weight
    total = sum(p.numel() for n, p in base.named_parameters() if "lora_" not in n)
    head = base.get_output_embeddings().weight
    tied = head.data_ptr() == emb.data_ptr()
    body = total - emb.numel() - (0 if tied else head.numel())
    return body, emb.numel()


def matmul_peak(device: str, threads: int) -> dict:
    """GFLOP/s of a large square matmul at fp32 and bf16 on this device (same threads)."""
    import torch

    torch.set_num_threads(threads)
    dev = torch.device(device)
    n = 8192 if dev.type == "cuda" else 2048
    out = {}
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a = torch.randn(n, n, device=dev, dtype=dt)
        b = torch.randn(n, n, device=dev, dtype=dt)
        reps = 20 if dev.type == "cuda" else 5
        for _ in range(2):
            a @ b
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        if dev.type == "cuda":
            torch.cuda.synchronize()
        out[name] = round(2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e9, 1)
    return out


def variant(args: argparse.Namespace) -> dict:
    """One variant in this process; returns its numbers."""
    import torch

    from trainer import fit as fit_mod
    from trainer.evaluate import heldout_loss

    torch.set_num_threads(args.threads)
    v = args.variant
    cfg = _cfg(args, v)
    train, held = _examples(args.community, cfg)
    held = held[:args.max_heldout]
    if v == "before":
        dtype = "auto" if args.device == "cpu" else "bfloat16"

        def plain(head, hidden, targets):  # type: ignore[no-untyped-def]
            return torch.nn.functional.cross_entropy(head(hidden).float(), targets,
                                                     reduction="none")
        fit_mod.head_nll = plain  # the output layer as it was: logits kept for the backward
        fit_mod.training_attention = lambda model, device: contextlib.nullcontext()  # SDPA
        fit_mod.PAD_MULTIPLE = 1  # widths as long as the longest row
    elif v == "ours":
        dtype = fit_mod.weights_dtype(cfg)
    else:
        dtype = "auto" if args.device == "cpu" else "bfloat16"
    lm = _load(args, cfg, dtype)
    rss_loaded = _rss_mb()
    is_cuda = lm.device.type == "cuda"
    if is_cuda:
        torch.cuda.reset_peak_memory_stats()
    out: dict = {}
    if v in ("before", "ours"):
        res = fit_mod.fit(lm.model, lm.tokenizer, train, cfg)
        model, seconds, tokens = res.model, res.seconds, res.tokens
        train_loss, padded, seq_tokens = res.final_loss, res.padded_tokens, res.seq_tokens
        precision = "bf16" if fit_mod.compute_dtype(lm.device, cfg.training.precision) else "fp32"
    else:
        from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

        items = fit_mod.encode_all(lm.tokenizer, train, cfg.training.max_seq_len)
        rows = [{"input_ids": e.ids, "attention_mask": [1] * len(e.ids), "labels": e.labels}
                for e in items]
        base = DataCollatorForSeq2Seq(lm.tokenizer, padding="longest", label_pad_token_id=-100)
        count = {"tokens": 0, "padded": 0, "seq": 0}

        model = fit_mod.wrap_lora(lm.model, cfg)

        def counted(_module, _args, kwargs):  # type: ignore[no-untyped-def]
            # Count what is forwarded (Trainer may fetch batches ahead of the steps it takes).
            if torch.is_grad_enabled() and kwargs.get("labels") is not None:
                count["tokens"] += int((kwargs["labels"][:, 1:] != -100).sum())
                count["padded"] += kwargs["input_ids"].numel()
                count["seq"] += int(kwargs["attention_mask"].sum())
        model.register_forward_pre_hook(counted, with_kwargs=True)
        bf16 = v == "trainer-bf16" or is_cuda
        precision = "bf16 autocast" if bf16 else "fp32"
        targs = TrainingArguments(
            output_dir=str(Path(tempfile.gettempdir()) / "gt-trainer-out"),
            per_device_train_batch_size=args.batch_size, max_steps=args.steps,
            learning_rate=args.lr, lr_scheduler_type="cosine",
            warmup_steps=max(1, min(20, args.steps // 10)), logging_steps=1,
            save_strategy="no", report_to=[], seed=0, use_cpu=not is_cuda, bf16=bf16,
            dataloader_num_workers=0, remove_unused_columns=False, disable_tqdm=True)
        trainer = Trainer(model=model, args=targs, train_dataset=rows, data_collator=base)
        t0 = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t0
        tokens, padded, seq_tokens = count["tokens"], count["padded"], count["seq"]
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        tail = losses[-max(1, len(losses) // 10):]
        train_loss = sum(tail) / len(tail)
    body, emb = _count_params(model)
    # Forward 2 FLOPs per weight per token; a frozen base's backward needs the activations'
    # gradients only (another 2); the output layer runs at the labelled positions (ours) or at
    # every position (Trainer): counted as useful at the labelled ones only.
    flops = 4 * body * seq_tokens + 4 * emb * tokens
    gpu_peak = round(torch.cuda.max_memory_allocated() / 2**20, 1) if is_cuda else None
    model.eval()
    ml = cfg.training.max_seq_len
    with fit_mod.autocast(lm.device, "auto" if is_cuda else "fp32"):
        loss, _ = heldout_loss(model, lm.tokenizer, held, max_seq_len=ml)
        with model.disable_adapter():
            base_loss, _ = heldout_loss(model, lm.tokenizer, held, max_seq_len=ml)
    out.update({"variant": v, "model": lm.base_id, "device": str(lm.device),
                "precision": precision, "steps": args.steps, "train_examples": len(train),
                "heldout_pairs": len(held), "supervised_tokens": tokens,
                "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1),
                "model_tflop": round(flops / 1e12, 3),
                "achieved_gflops": round(flops / seconds / 1e9, 1),
                "padding_fraction": round(1 - seq_tokens / padded, 3),
                "train_loss_last10pct": round(train_loss, 4), "heldout_loss": round(loss, 4),
                "base_heldout_loss": round(base_loss, 4), "peak_rss_mb": round(_rss_mb(), 1),
                "rss_after_load_mb": round(rss_loaded, 1), "gpu_peak_mb": gpu_peak})
    return out


def cli_run(args: argparse.Namespace) -> dict:
    """``guildtune train`` on a fresh data dir holding the community, in a child process: wall
    time and that process's peak RSS (the whole run: dataset, fit, gate, publish)."""
    tmp = Path(tempfile.mkdtemp(prefix="gt-cli-"))
    cfg_file = tmp / "config.toml"
    cfg_file.write_text(
        f'[storage]\ndata_dir = "{tmp / "data"}"\n[model]\nname = "{args.model}"\n'
        f'cache_dir = "{MODELS}"\nthreads = {args.threads}\n[training]\nenabled = true\n',
        encoding="utf-8")
    code = (
        "import json, resource, sys, time\n"
        "from guildtune.cli import main\n"
        f"cfg = {str(cfg_file)!r}\n"
        f"assert main(['--config', cfg, 'import', '--guild', '1', '--learn-from-humans', "
        f"{str(DATA / f'irc-{args.community}.jsonl')!r}]) == 0\n"
        "t0 = time.perf_counter()\n"
        "rc = main(['--config', cfg, 'train', '--guild', '1', '--force'])\n"
        "print(json.dumps({'rc': rc, 'wall_s': round(time.perf_counter() - t0, 1),"
        " 'peak_rss_mb': round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))\n")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=ROOT)
    if proc.returncode != 0:
        sys.exit(f"guildtune train failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--shape", choices=sorted(SHAPES), help="random-init weights of this shape")
    ap.add_argument("--tokenizer", help="tokenizer dir for --shape")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-seq-len", type=int, default=256)
    ap.add_argument("--max-heldout", type=int, default=120)
    ap.add_argument("--lr", type=float, default=6e-4)
    ap.add_argument("--community", default="rust")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--cli", action="store_true", help="also time guildtune train end to end")
    ap.add_argument("--cli-only", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "trainer.json"))
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(variant(args)))
        return
    key = f"{args.shape or args.model}@{args.device}"
    results: dict = {"args": {k: v for k, v in vars(args).items() if k != "variant"}}
    if not args.cli_only:
        results["matmul_peak_gflops"] = matmul_peak(args.device, args.threads)
        if not args.shape and args.model != "tiny":  # convert once, outside the timed runs
            from guildtune.models import resolve_checkpoint
            resolve_checkpoint(args.model, MODELS)
        for v in args.variants.split(","):
            cmd = [sys.executable, __file__, "--variant", v]
            for k in ("model", "shape", "tokenizer", "device", "steps", "batch_size",
                      "max_seq_len", "max_heldout", "lr", "community", "threads"):
                val = getattr(args, k)
                if val is not None:
                    cmd += [f"--{k.replace('_', '-')}", str(val)]
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                sys.exit(f"{v} failed:\n{proc.stderr[-3000:]}")
            results[v] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(v, json.dumps(results[v]), flush=True)
        peak = results["matmul_peak_gflops"]
        print(f"matmul peak GFLOP/s: {peak}")
        print(f"{'':13} {'prec':>13} {'tok/s':>8} {'GFLOP/s':>8} {'%bf16pk':>7} {'pad':>6} "
              f"{'train loss':>10} {'held-out':>9} {'peak RSS MB':>11}")
        for name in args.variants.split(","):
            r = results[name]
            r["util_of_bf16_peak"] = round(r["achieved_gflops"] / peak["bf16"], 3)
            r["util_of_fp32_peak"] = round(r["achieved_gflops"] / peak["fp32"], 3)
            print(f"{name:13} {r['precision']:>13} {r['tokens_per_s']:8.1f} "
                  f"{r['achieved_gflops']:8.1f} {r['util_of_bf16_peak']:7.1%} "
                  f"{r['padding_fraction']:6.1%} {r['train_loss_last10pct']:10.4f} "
                  f"{r['heldout_loss']:9.4f} {r['peak_rss_mb']:11.1f}")
        names = args.variants.split(",")
        if "ours" in names:
            for other in ("before", "trainer", "trainer-bf16"):
                if other in names:
                    results[f"speedup_vs_{other}"] = round(
                        results["ours"]["tokens_per_s"] / results[other]["tokens_per_s"], 2)
                    results[f"peak_rss_ratio_vs_{other}"] = round(
                        results["ours"]["peak_rss_mb"] / results[other]["peak_rss_mb"], 2)
            print({k: v for k, v in results.items() if k.startswith(("speedup", "peak_rss"))})
    if args.cli or args.cli_only:
        results["guildtune_train"] = cli_run(args)
        print(f"guildtune train ({args.model}, irc-{args.community}, default config): "
              f"{results['guildtune_train']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    prev = json.loads(out.read_text()) if out.is_file() else {}
    prev[key] = results
    out.write_text(json.dumps(prev, indent=2))


if __name__ == "__main__":
    main()
