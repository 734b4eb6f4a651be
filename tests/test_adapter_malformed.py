"""Malformed adapter directories: each is one guild's AdapterError, never another exception, and
the watcher goes on with every other guild (and backs off the broken one).

The validation cases are real files written byte by byte and checked by the real validator;
the watcher tests use a fake engine that runs that same validator before "loading".
"""

from __future__ import annotations

import json
import logging
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bot.handlers import AdapterWatcher
from guildtune.adapter_dir import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, META_FILE, AdapterError,
                                   adapter_meta, validate_adapter_dir)
from guildtune.models import TINY_BASE_ID
from tests.fakes import FakeEngine, make_services
from tests.helpers_adapters import TINY_LORA

# Guild 1 v1: ``true`` and ``1.0`` both equal 1 in Python, which the type checks must refuse.
G, V = 1, 1
RANK = TINY_LORA.rank
A_KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
B_KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def good_header() -> dict[str, Any]:
    """lora_A (rank, 8) and lora_B (16, rank) in F32: 128 + 256 bytes of data."""
    return {"__metadata__": {"format": "pt"},
            A_KEY: {"dtype": "F32", "shape": [RANK, 8], "data_offsets": [0, 128]},
            B_KEY: {"dtype": "F32", "shape": [16, RANK], "data_offsets": [128, 384]}}


def safetensors_bytes(header: Any = None, data: bytes = bytes(384), *,
                      raw: bytes | None = None, length: int | None = None) -> bytes:
    """A safetensors file: u64 little-endian header length, the JSON header, the data."""
    head = raw if raw is not None else json.dumps(
        good_header() if header is None else header).encode("utf-8")
    return struct.pack("<Q", len(head) if length is None else length) + head + data


def peft_config(**over: Any) -> dict[str, Any]:
    return {"peft_type": "LORA", "r": RANK, "lora_alpha": TINY_LORA.alpha,
            "target_modules": list(TINY_LORA.target_modules), **over}


def guildtune_meta(**over: Any) -> dict[str, Any]:
    return {**adapter_meta(guild_id=G, version=V, base_model=TINY_BASE_ID,
                           lora=TINY_LORA.shape()), **over}


def write_adapter(path: Path, *, weights: bytes | None = None, config: Any = None,
                  meta: Any = None) -> Path:
    """An adapter version dir; each file is given as raw bytes or as a JSON value."""
    path.mkdir(parents=True, exist_ok=True)

    def put(name: str, value: Any, default: Any) -> None:
        value = default if value is None else value
        (path / name).write_bytes(value if isinstance(value, bytes)
                                  else json.dumps(value).encode("utf-8"))

    put(ADAPTER_WEIGHTS, weights, safetensors_bytes())
    put(ADAPTER_CONFIG, config, peft_config())
    put(META_FILE, meta, guildtune_meta())
    return path


def validate(path: Path, guild_id: int = G, version: int = V) -> Path:
    return validate_adapter_dir(path, guild_id=guild_id, version=version, base_id=TINY_BASE_ID,
                                lora_shape=TINY_LORA.shape())


def with_tensor(key: str, **over: Any) -> dict[str, Any]:
    h = good_header()
    h[key] = {**h[key], **over}
    for k, v in list(h[key].items()):
        if v is _DROP:
            del h[key][k]
    return h


_DROP = object()
DEEP = b"[" * 100_000 + b"]" * 100_000  # json.loads answers RecursionError, not ValueError
SCALAR = {"dtype": "F32", "shape": [], "data_offsets": [384, 388]}

# name -> what the files are. The comment after each says what the validator before this change
# did with it: "escaped X" (an X raised out of the check: the watcher's poll died), "accepted"
# (the bad file passed the check and reached the loader), or nothing when it was already an
# AdapterError (kept as a regression case).
CASES: dict[str, dict[str, Any]] = {
    # -- the safetensors header --------------------------------------------------------------
    "file shorter than the length field": {"weights": b"\x10\x00"},
    "header length zero": {"weights": safetensors_bytes(length=0)},
    "header length past the end of the file": {"weights": safetensors_bytes(length=1 << 40)},
    "header length field is 2**64-1": {"weights": b"\xff" * 8 + b"{}"},
    "header not JSON": {"weights": safetensors_bytes(raw=b"{not json at all}")},
    "header not UTF-8": {"weights": safetensors_bytes(raw=b'{"\xff\xfe": 1}')},
    "header nested too deep": {"weights": safetensors_bytes(raw=DEEP)},  # escaped RecursionError
    "header is a JSON list": {"weights": safetensors_bytes([])},  # escaped AttributeError
    "header is a JSON string": {"weights": safetensors_bytes("lora")},  # escaped AttributeError
    "header is JSON null": {"weights": safetensors_bytes(raw=b"null")},  # escaped AttributeError
    "header is a number": {"weights": safetensors_bytes(raw=b"12345")},  # escaped AttributeError
    "__metadata__ not an object": {  # accepted
        "weights": safetensors_bytes({**good_header(), "__metadata__": ["pt"]})},
    "__metadata__ values not strings": {  # accepted
        "weights": safetensors_bytes({**good_header(), "__metadata__": {"format": 1}})},
    "no tensors at all": {"weights": safetensors_bytes({}, b"")},
    # -- one tensor entry ----------------------------------------------------------------------
    "entry is a number": {"weights": safetensors_bytes({**good_header(), A_KEY: 5})},
    "entry is a list": {"weights": safetensors_bytes({**good_header(), A_KEY: [0, 128]})},
    "dtype missing": {"weights": safetensors_bytes(with_tensor(A_KEY, dtype=_DROP))},
    "dtype unknown": {"weights": safetensors_bytes(with_tensor(A_KEY, dtype="F12"))},
    "dtype not a string": {"weights": safetensors_bytes(with_tensor(A_KEY, dtype=["F32"]))},
    "unknown dtype on an empty extra tensor": {  # accepted (0 bytes == 0 * unknown size)
        "weights": safetensors_bytes({**good_header(), "x": {
            "dtype": "F12", "shape": [0], "data_offsets": [384, 384]}})},
    "shape empty on lora_A": {  # escaped IndexError
        "weights": safetensors_bytes({
            A_KEY: {"dtype": "F32", "shape": [], "data_offsets": [0, 4]},
            B_KEY: {"dtype": "F32", "shape": [16, RANK], "data_offsets": [4, 260]}},
            bytes(260))},
    "shape an empty string on lora_A": {  # escaped IndexError
        "weights": safetensors_bytes({
            A_KEY: {"dtype": "F32", "shape": "", "data_offsets": [0, 4]},
            B_KEY: {"dtype": "F32", "shape": [16, RANK], "data_offsets": [4, 260]}},
            bytes(260))},
    "shape a number": {"weights": safetensors_bytes(with_tensor(A_KEY, shape=32))},
    "shape missing": {"weights": safetensors_bytes(with_tensor(A_KEY, shape=_DROP))},
    "shape of floats": {  # accepted (4.0 == 4 and 32.0 * 4 == 128)
        "weights": safetensors_bytes(with_tensor(A_KEY, shape=[4.0, 8]))},
    "shape negative on an extra tensor": {  # accepted (-2 * -2 == 4)
        "weights": safetensors_bytes({**good_header(), "x": {
            "dtype": "U8", "shape": [-2, -2], "data_offsets": [384, 388]}}, bytes(388))},
    "shape of booleans on an extra tensor": {  # accepted (True == 1)
        "weights": safetensors_bytes({**good_header(), "x": {
            "dtype": "U8", "shape": [True], "data_offsets": [384, 385]}}, bytes(385))},
    "lora_A a vector": {  # accepted (a 1-D A is no LoRA factor; its rank "fit")
        "weights": safetensors_bytes({
            A_KEY: {"dtype": "F32", "shape": [RANK], "data_offsets": [0, 16]},
            B_KEY: {"dtype": "F32", "shape": [16, RANK], "data_offsets": [16, 272]}},
            bytes(272))},
    "lora_B of another rank": {  # accepted (only lora_A's rank was checked)
        "weights": safetensors_bytes(with_tensor(B_KEY, shape=[8, 2 * RANK]))},
    "data_offsets missing": {"weights": safetensors_bytes(with_tensor(A_KEY, data_offsets=_DROP))},
    "data_offsets of three": {"weights": safetensors_bytes(with_tensor(A_KEY,
                                                                       data_offsets=[0, 64, 128]))},
    "data_offsets an object": {"weights": safetensors_bytes(with_tensor(
        A_KEY, data_offsets={"start": 0, "end": 128}))},
    "data_offsets strings": {"weights": safetensors_bytes(with_tensor(A_KEY,
                                                                      data_offsets=["0", "128"]))},
    "data_offsets floats": {  # accepted (128.0 - 0.0 == 128)
        "weights": safetensors_bytes(with_tensor(A_KEY, data_offsets=[0.0, 128.0]))},
    "data_offsets negative": {  # accepted (the span still measured 4 bytes)
        "weights": safetensors_bytes({**good_header(), "x": {
            "dtype": "U8", "shape": [4], "data_offsets": [-4, 0]}})},
    "data_offsets end before start": {"weights": safetensors_bytes(with_tensor(
        A_KEY, data_offsets=[128, 0]))},
    "data_offsets out of the file": {"weights": safetensors_bytes(with_tensor(
        A_KEY, shape=[RANK, 1 << 30], data_offsets=[384, 384 + (RANK << 32)]))},
    "size does not match dtype and shape": {"weights": safetensors_bytes(with_tensor(
        A_KEY, data_offsets=[0, 100]))},
    "tensors overlap": {  # accepted
        "weights": safetensors_bytes(with_tensor(B_KEY, data_offsets=[0, 256]))},
    "gap between tensors": {  # accepted
        "weights": safetensors_bytes(with_tensor(B_KEY, data_offsets=[256, 512]), bytes(512))},
    "bytes after the last tensor": {"weights": safetensors_bytes(data=bytes(400))},  # accepted
    "truncated data": {"weights": safetensors_bytes(data=bytes(200))},
    "scalar lora_A": {"weights": safetensors_bytes({  # escaped IndexError
        **good_header(), A_KEY.replace("q_proj", "v_proj"): SCALAR}, bytes(388))},
    # -- adapter_config.json -------------------------------------------------------------------
    "adapter_config not an object": {"config": [1, 2]},
    "adapter_config not JSON": {"config": b"{'r': 4}"},
    "adapter_config nested too deep": {"config": DEEP},  # escaped RecursionError
    "adapter_config target_modules mixed types": {  # escaped TypeError (sorted)
        "config": peft_config(target_modules=[1, "q_proj"])},
    "adapter_config target_modules of objects": {  # escaped TypeError (sorted)
        "config": peft_config(target_modules=[{"a": 1}, {"b": 2}])},
    "adapter_config r a float": {"config": peft_config(r=float(RANK))},  # accepted
    "adapter_config r a string": {"config": peft_config(r=str(RANK))},
    "adapter_config lora_alpha a bool": {"config": peft_config(lora_alpha=True)},
    "adapter_config peft_type a list": {"config": peft_config(peft_type=["LORA"])},
    # -- guildtune.json ------------------------------------------------------------------------
    "guildtune.json not an object": {"meta": "guild 1"},
    "guildtune.json not UTF-8": {"meta": b'{"guild_id": 1, "\xff": 0}'},
    "guildtune.json nested too deep": {"meta": DEEP},  # escaped RecursionError
    "guildtune.json guild_id true": {"meta": guildtune_meta(guild_id=True)},  # accepted
    "guildtune.json version a float": {"meta": guildtune_meta(version=1.0)},  # accepted
    "guildtune.json guild_id a string": {"meta": guildtune_meta(guild_id="1")},
    "guildtune.json lora a list": {"meta": guildtune_meta(lora=[RANK, TINY_LORA.alpha])},
    "guildtune.json lora.rank a float": {  # accepted
        "meta": guildtune_meta(lora={**TINY_LORA.shape(), "rank": float(RANK)})},
    "guildtune.json lora.target_modules with null": {  # escaped TypeError (sorted)
        "meta": guildtune_meta(lora={**TINY_LORA.shape(),
                                     "target_modules": [None, "q_proj"]})},
    "guildtune.json lora.target_modules a number": {
        "meta": guildtune_meta(lora={**TINY_LORA.shape(), "target_modules": 7})},
}


def test_the_hand_written_adapter_is_valid(tmp_path: Path) -> None:
    """The cases below break one thing each of an adapter that passes."""
    p = write_adapter(tmp_path / "good")
    assert validate(p) == p
    # ...and the real safetensors loader reads the same bytes.
    safetensors = pytest.importorskip("safetensors")
    with safetensors.safe_open(str(p / ADAPTER_WEIGHTS), "np") as f:
        assert sorted(f.keys()) == sorted([A_KEY, B_KEY])


@pytest.mark.parametrize("case", list(CASES))
def test_malformed_adapter_is_one_adapter_error(case: str, tmp_path: Path) -> None:
    p = write_adapter(tmp_path / "bad", **CASES[case])
    with pytest.raises(AdapterError) as info:
        validate(p)
    msg = str(info.value)
    assert "\n" not in msg and len(msg) < 500, msg
    assert msg.startswith(f"adapter for guild {G} v{V} at {p}: "), msg


SAFETENSORS_FORMAT_CASES = [c for c in CASES if "weights" in CASES[c] and not any(
    w in c for w in ("lora_", "no tensors", "rank"))]


@pytest.mark.parametrize("case", SAFETENSORS_FORMAT_CASES)
def test_format_refusals_agree_with_the_safetensors_loader(case: str, tmp_path: Path) -> None:
    """What we call a corrupt file the real loader refuses too: the check is not stricter
    than the format (LoRA-specific rules, such as the rank, are ours and not in this list)."""
    safetensors = pytest.importorskip("safetensors")
    p = write_adapter(tmp_path / "bad", **CASES[case])
    with pytest.raises(safetensors.SafetensorError), \
            safetensors.safe_open(str(p / ADAPTER_WEIGHTS), "np") as f:
        for k in f.keys():  # noqa: SIM118 (a safe_open handle is not a dict)
            f.get_tensor(k)


# -- the watcher ------------------------------------------------------------------------------

class ValidatingEngine(FakeEngine):
    """A fake engine whose activate runs the real validator first, as both real engines do,
    and can be told to fail a guild with an unexpected exception (a bug, not a bad file)."""

    def __init__(self) -> None:
        super().__init__()
        self.attempts: list[tuple[int, int]] = []
        self.explode: set[int] = set()

    async def activate(self, guild_id: int, version: int, path: Any) -> None:
        self.attempts.append((guild_id, version))
        if guild_id in self.explode:
            raise RuntimeError("engine bug")
        validate_adapter_dir(path, guild_id=guild_id, version=version, base_id=TINY_BASE_ID,
                             lora_shape=TINY_LORA.shape())
        await super().activate(guild_id, version, path)


A, B = 101, 202


def publish(s: Any, root: Path, guild: int, version: int, *,
            breaker: Callable[[], dict[str, Any]] | None = None) -> None:
    """Write the guild's version dir (malformed when ``breaker`` says how) and activate it."""
    files = breaker() if breaker else {}
    p = write_adapter(root / f"{guild}/{version}",
                      meta=files.pop("meta", guildtune_meta(guild_id=guild, version=version)),
                      **files)
    s.store.register_version(guild, version, str(p), base_model=TINY_BASE_ID,
                             lora=TINY_LORA.shape(), activate=True)


def header_is_a_list() -> dict[str, Any]:  # raised AttributeError out of the old check
    return {"weights": safetensors_bytes([])}


async def test_one_broken_guild_does_not_block_another_guilds_swap(tmp_path: Path,
                                                                   caplog) -> None:
    engine = ValidatingEngine()
    s = make_services(tmp_path, engine=engine)
    w = AdapterWatcher(s)
    root = tmp_path / "adapters"
    publish(s, root, A, 1)
    assert await w.sync_once() == ["Now serving model v1."]
    publish(s, root, A, 2, breaker=header_is_a_list)
    publish(s, root, B, 1)
    with caplog.at_level(logging.ERROR):
        lines = await w.sync_once()
    assert engine.active_versions() == {A: 1, B: 1}  # B applied, A kept its old version
    assert len(lines) == 2 and "could not be loaded" in lines[0] and "corrupt" in lines[0]
    assert lines[1] == "Now serving model v1."
    [err] = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert f"guild {A}" in err.getMessage() and err.exc_info is None  # expected: no traceback
    # Backoff: the same (guild, version) is not tried again on the next polls...
    tried = len(engine.attempts)
    assert await w.sync_once() == [] and await w.sync_once() == []
    assert len(engine.attempts) == tried
    # ...until the store names another version for that guild.
    publish(s, root, A, 3)
    assert await w.sync_once() == ["Now serving model v3."]
    assert engine.active_versions() == {A: 3, B: 1}
    s.store.close()


async def test_broken_guild_and_another_guilds_deactivation_in_one_poll(tmp_path: Path) -> None:
    engine = ValidatingEngine()
    s = make_services(tmp_path, engine=engine)
    w = AdapterWatcher(s)
    root = tmp_path / "adapters"
    publish(s, root, B, 1)
    assert await w.sync_once() == ["Now serving model v1."]
    # A's first version lost its header in transit; B's admin rolls back to the base model.
    publish(s, root, A, 1, breaker=lambda: {"weights": safetensors_bytes(raw=DEEP)})
    assert s.store.rollback(B) is None
    lines = await w.sync_once()
    assert engine.active_versions() == {}
    assert "could not be loaded" in lines[0] and lines[1] == "Back on the base model."
    assert await w.sync_once() == []  # A is not retried
    assert engine.attempts.count((A, 1)) == 1
    s.store.close()


async def test_an_unexpected_exception_is_contained_logged_and_backed_off(tmp_path: Path,
                                                                          caplog) -> None:
    engine = ValidatingEngine()
    engine.explode.add(A)
    s = make_services(tmp_path, engine=engine)
    w = AdapterWatcher(s)
    root = tmp_path / "adapters"
    publish(s, root, A, 1)
    publish(s, root, B, 1)
    with caplog.at_level(logging.ERROR):
        lines = await w.sync_once()
    assert engine.active_versions() == {B: 1}
    assert lines[0].startswith("⚠️ v1 could not be loaded (internal error: RuntimeError)")
    [err] = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert f"guild {A}" in err.getMessage() and err.exc_info is not None  # with a traceback
    assert await w.sync_once() == [] and engine.attempts.count((A, 1)) == 1
    # Rolled back and re-published under the same number later: storage moved on in between,
    # so the version is tried again.
    assert s.store.rollback(A) is None
    assert await w.sync_once() == []
    engine.explode.clear()
    s.store.activate_version(A, 1)
    assert await w.sync_once() == ["Now serving model v1."]
    s.store.close()


async def test_a_tainted_version_is_not_kept_when_the_clean_fallback_fails_to_load(
        tmp_path: Path) -> None:
    """strict forget rolls back to v1; v1's files are gone: the base model serves, never v2."""
    import shutil

    engine = ValidatingEngine()
    s = make_services(tmp_path, engine=engine)
    w = AdapterWatcher(s)
    root = tmp_path / "adapters"
    s.store.grant_consent(A, 7)
    publish(s, root, A, 1)
    s.store.register_version(A, 2, str(write_adapter(root / f"{A}/2",
                                                     meta=guildtune_meta(guild_id=A, version=2))),
                             base_model=TINY_BASE_ID, lora=TINY_LORA.shape(),
                             contributors={7: 1}, activate=True)
    assert await w.sync_once() == ["Now serving model v2."]
    shutil.rmtree(root / f"{A}/1")
    report = s.store.forget_user(7, A)  # default strict: the store rolls back to v1
    assert report.deactivated == [A] and s.store.active_version(A).version == 1
    lines = await w.sync_once()
    assert engine.active_versions() == {}, lines  # not v2, which learned from member 7
    assert "serving the base model" in lines[0]
    s.store.close()
