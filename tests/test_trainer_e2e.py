"""End to end on the tiny model: two guilds with clearly different styles are imported, trained,
gated and published; each learns its own style; a worse candidate is rejected; forgetting a
contributor taints the version and the retrain excludes them."""

from __future__ import annotations

from guildtune.models import TINY_BASE_ID

import json
import os
from pathlib import Path

import pytest

from guildtune.config import Config
from storage import Store, open_store
from trainer.data import build_dataset
from trainer.pipeline import TrainingError, train_guild
from tests.fakes import STYLE_TRAINER, import_style, make_config
from trainer.worker import train_foreground

# Tests share a small CPU with other work: one thread avoids oversubscription (measured 15x).
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Config, Store]:
    tmp = tmp_path_factory.mktemp("e2e")
    cfg = make_config(tmp, STYLE_TRAINER)
    store = open_store(cfg.db_path)
    import_style(store, 1, "pirate", seed=1)
    import_style(store, 2, "robot", seed=2)
    for g in (1, 2):
        res = train_guild(store, cfg, g)
        assert res.status == "succeeded", res.metrics
    yield cfg, store
    store.close()


def _cross_loss(cfg: Config, store: Store, adapter_guild: int, data_guild: int) -> float:
    from peft import PeftModel

    from guildtune.models import load_model
    from trainer.evaluate import heldout_loss

    lm = load_model("tiny")
    model = PeftModel.from_pretrained(lm.model, store.active_version(adapter_guild).path)
    data = build_dataset(store, data_guild, cfg)
    return heldout_loss(model, lm.tokenizer, data.heldout, max_seq_len=96)[0]


def test_each_guild_learns_its_own_style(trained: tuple[Config, Store]) -> None:
    cfg, store = trained
    for g in (1, 2):
        v = store.active_version(g)
        assert v is not None and v.version == 1
        assert v.metrics["candidate_loss"] < v.metrics["base_loss"] * 0.9, v.metrics
    own_1, other_1 = _cross_loss(cfg, store, 1, 1), _cross_loss(cfg, store, 2, 1)
    own_2, other_2 = _cross_loss(cfg, store, 2, 2), _cross_loss(cfg, store, 1, 2)
    assert own_1 < other_1 and own_2 < other_2, (own_1, other_1, own_2, other_2)


def test_published_version_follows_the_engine_contract(trained: tuple[Config, Store]) -> None:
    cfg, store = trained
    v = store.active_version(1)
    path = Path(v.path)
    assert path == cfg.adapters_dir / "1" / "1"
    assert {"adapter_config.json", "adapter_model.safetensors", "guildtune.json",
            "config_snapshot.json"} <= {p.name for p in path.iterdir()}
    meta = json.loads((path / "guildtune.json").read_text())
    assert meta["guild_id"] == 1 and meta["version"] == 1 and meta["base_model"] == TINY_BASE_ID
    assert meta["lora"] == cfg.lora.shape() == v.lora
    assert meta["data_fingerprint"] == v.data_fingerprint
    peft_cfg = json.loads((path / "adapter_config.json").read_text())
    assert peft_cfg["r"] == 8 and peft_cfg["lora_alpha"] == 16
    assert sorted(peft_cfg["target_modules"]) == sorted(cfg.lora.target_modules)
    assert json.loads((path / "config_snapshot.json").read_text()) == json.loads(
        json.dumps(cfg.snapshot()))
    assert [p.name for p in path.parent.iterdir()] == ["1"]  # no temp dirs left behind
    assert set(store.contributors(1, 1)) == set(build_dataset(store, 1, cfg).contributors)


def test_worse_candidate_is_rejected_and_force_promotes(trained: tuple[Config, Store]) -> None:
    cfg, store = trained
    # A candidate that barely moves from the base cannot beat the trained active version.
    weak = cfg.replace(training={"learning_rate": 1e-6, "max_steps": 1})
    run_id, res = train_foreground(store, weak, 2)
    assert res.status == "rejected" and res.version is None
    assert res.metrics["candidate_loss"] > res.metrics["active_loss"]
    run = store.get_run(run_id)
    assert run.status == "rejected" and run.metrics["active_version"] == 1
    assert "does not beat" in run.error
    assert store.active_version(2).version == 1
    assert [p.name for p in (cfg.adapters_dir / "2").iterdir()] == ["1"]

    _, forced = train_foreground(store, weak, 2, force=True)
    assert forced.status == "succeeded" and store.active_version(2).version == 2
    assert store.rollback(2).version == 1  # the previous version stayed for rollback


def test_forgetting_a_contributor_reaches_the_model(trained: tuple[Config, Store]) -> None:
    cfg, store = trained
    before = build_dataset(store, 1, cfg)
    user = max(before.contributors, key=before.contributors.get)
    report = store.forget_user(user, 1)
    assert (1, 1) in report.tainted
    assert store.get_version(1, 1).tainted_utc is not None
    queued = store.open_run(1)
    assert queued is not None and queued.trigger == "forget"
    after = build_dataset(store, 1, cfg)
    assert user not in after.contributors and after.fingerprint != before.fingerprint
    # The retrain claims the queued 'forget' run; force, since the tainted active version's
    # loss is no bar to clear.
    run_id, res = train_foreground(store, cfg, 1, force=True)
    assert run_id == queued.id and res.status == "succeeded"
    new = store.active_version(1)
    assert new.version == 2 and new.data_fingerprint == after.fingerprint
    assert user not in store.contributors(1, 2)


def test_gates_refuse_before_loading_a_model(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, STYLE_TRAINER)
    store = open_store(cfg.db_path)
    with pytest.raises(TrainingError, match="no training examples"):
        train_guild(store, cfg, 5, force=True)
    with pytest.raises(TrainingError, match=r"training is off for this server \(guild 5\)"):
        train_guild(store, cfg, 5)
    off = make_config(tmp_path, STYLE_TRAINER, training={"enabled": False})
    with pytest.raises(TrainingError, match=r"training.enabled = false"):
        train_guild(store, off, 5, force=True)
