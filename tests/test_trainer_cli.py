"""The training subcommands: train (foreground), eval on a file's held-out pairs, rollback."""

from __future__ import annotations

from guildtune.models import TINY_BASE_ID

import argparse
import json
import os
import random
from pathlib import Path

import pytest

from guildtune import cli_train
from guildtune.cli_types import CommandError
from guildtune.community import read_jsonl
from guildtune.config import Config
from storage import open_store
from tests.fakes import make_config
from trainer.data import examples_from_messages, split_heldout

os.environ.setdefault("OMP_NUM_THREADS", "1")
G = 21


def run(argv: list[str], cfg: Config) -> int:
    parser = argparse.ArgumentParser()
    cli_train.add_commands(parser.add_subparsers(dest="cmd", required=True))
    args = parser.parse_args(argv)
    return args.func(args, cfg)


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Config, Path]:
    import torch

    torch.set_num_threads(1)
    r = random.Random(3)
    lines = []
    for i in range(160):
        parent = i - 1 if i % 2 else None
        text = (f"what about {r.choice(['cargo', 'tokio', 'serde'])}?" if parent is None
                else f"use {r.choice(['cargo', 'tokio', 'serde'])} then, easy {i}")
        lines.append(json.dumps({"community": "t", "part": 0, "seq": i, "time": f"2024-03-01T00:00:{i % 60:02d}",
                                 "author_id": 1 + i % 7, "text": text,
                                 "reply_to": [] if parent is None else [parent]}))
    f = tmp_path / "c.jsonl"
    f.write_text("\n".join(lines))
    cfg = make_config(tmp_path, storage={"data_dir": str(tmp_path / "data")},
                      model={"name": "smollm2-135m"},  # --model tiny overrides it
                      lora={"rank": 4, "alpha": 8},
                      training={"enabled": True, "epochs": 2.0, "batch_size": 16,
                                "max_seq_len": 64, "learning_rate": 3e-3,
                                "heldout_fraction": 0.25})  # 20 of 80: the time split
    store = open_store(cfg.db_path)
    store.import_messages(G, [m.as_store_row() for m in read_jsonl(f)])
    store.update_guild_settings(G, learn_from_humans=True)
    store.close()
    return cfg, f


def test_train_eval_rollback(setup: tuple[Config, Path], capsys: pytest.CaptureFixture) -> None:
    cfg, f = setup
    with pytest.raises(CommandError, match="training is off for this server.*--force"):
        run(["train", "--guild", str(G), "--model", "tiny"], cfg)
    assert run(["train", "--guild", str(G), "--force", "--model", "tiny"], cfg) == 0
    out = capsys.readouterr().out
    assert "version 1 active" in out and "held-out loss per token: base" in out

    assert run(["eval", "--guild", str(G), "--data", str(f)], cfg) == 0
    result = json.loads(capsys.readouterr().out)
    held = split_heldout(examples_from_messages(read_jsonl(f), cfg.model.system_prompt),
                         cfg.training.heldout_fraction)[1]
    assert result["pairs"] == len(held) > 0 and result["adapter_version"] == 1
    assert result["model"] == TINY_BASE_ID  # the base the adapter was trained on, not smollm2
    assert result["adapter_loss"] < result["base_loss"]
    store = open_store(cfg.db_path)
    assert store.active_version(G).metrics["n_heldout"] == len(held)  # same split as training
    store.close()

    assert run(["rollback", "--guild", str(G)], cfg) == 0
    assert "v1 -> the base model" in capsys.readouterr().out
