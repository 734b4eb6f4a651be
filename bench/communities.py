"""Shared by the community benchmarks (data_curve, style, closed_loop): the six IRC communities
read as training examples exactly as ``guildtune import`` + a training run see them, split by
time, and adapters fitted in-process on one loaded base model (``trainer.fit.fit``, the
trainer's own fit; no gate, no store).

The time split: a community's newest ``TEST_PAIRS`` reply pairs are its future (scored, never
trained on); its training examples are the newest ``k`` pairs before them, as a guild that has
collected ``k`` examples by then.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
IRC = ROOT.parent / "shared" / "data" / "irc"
RESULTS = ROOT / "bench" / "results"
WORK = Path("/tmp/guildtune-bench")
NAMES = ("linux", "mediawiki", "rust", "stripe", "ubuntu-meeting", "ubuntu")
TEST_PAIRS = 48  # each community's newest reply pairs: the future every score is taken on


@dataclass
class Split:
    name: str
    pool: list[Any]  # training candidates, oldest first
    test: list[Any]  # the newest TEST_PAIRS, oldest first
    messages: list[Any]  # every message of the file (ChatMessage), in file order

    def train(self, k: int | None) -> list[Any]:
        """The newest ``k`` examples before the test slice (all of them for None)."""
        return self.pool if k is None or k >= len(self.pool) else self.pool[-k:]


def bench_config(model: str = "smollm2-135m", threads: int = 0, **training: Any) -> Any:
    """The shipped defaults (``load_config`` of no file) with training on and ``training``
    overrides; data in a throwaway directory (the model cache is the machine's)."""
    from guildtune.config import load_config

    cfg = load_config(None)
    return cfg.replace(storage={"data_dir": str(WORK / "data")},
                       model={"name": model, "threads": threads},
                       training={"enabled": True, **training})


def load_split(name: str, cfg: Any, test_pairs: int = TEST_PAIRS) -> Split:
    from guildtune.community import read_community
    from trainer.data import by_time, dedupe, examples_from_messages

    messages = read_community(IRC / f"irc-{name}.jsonl")
    examples = by_time(dedupe(examples_from_messages(messages, cfg.model.system_prompt)))
    return Split(name, examples[:-test_pairs], examples[-test_pairs:], messages)


def fit_adapter(base: Any, lm: Any, train: list[Any], cfg: Any, out: Path | None = None,
                negatives: list[Any] = ()) -> tuple[Any, dict[str, Any]]:
    """Fit one adapter on ``base`` (``lm.model``, or what the last fit's ``unload`` gave back);
    returns (peft model, fit stats). ``unload`` the peft model for the next fit's base."""
    from trainer.fit import fit

    t = time.perf_counter()
    res = fit(base, lm.tokenizer, train, cfg, negatives=list(negatives))
    if out is not None:
        res.model.save_pretrained(str(out))
    return res.model, {"steps": res.steps, "train_loss": round(res.final_loss, 4),
                       "seconds": round(time.perf_counter() - t, 1), "n_train": len(train)}


def loss(model: Any, lm: Any, examples: list[Any], cfg: Any) -> float:
    from trainer.evaluate import heldout_loss

    return heldout_loss(model, lm.tokenizer, examples, max_seq_len=cfg.training.max_seq_len)[0]


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
               platform.processor())
    import os

    import torch
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, python {platform.python_version()}")


def key_of(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


class Results:
    """A results file written after every point, so a long run that is killed resumes."""

    def __init__(self, path: Path, meta: dict[str, Any]) -> None:
        self.path = path
        old = json.loads(path.read_text()) if path.exists() else {}
        self.data: dict[str, Any] = {**old, **meta, "points": old.get("points", {})}

    def has(self, key: str) -> bool:
        return key in self.data["points"]

    def get(self, key: str) -> Any:
        return self.data["points"][key]

    def put(self, key: str, value: Any) -> None:
        self.data["points"][key] = value
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        tmp.replace(self.path)


@contextmanager
def timed(label: str) -> Iterator[None]:
    t = time.perf_counter()
    yield
    print(f"  {label}: {time.perf_counter() - t:.0f} s", flush=True)
