"""The adapter-directory contract: what a published adapter version directory holds.

One home for the rule shared by the trainer (which writes a version directory) and every engine
(which checks one before loading it): the file names, the publisher's metadata, how the files
are made durable, and the validator. A kernel module: it imports neither ``bot`` nor ``trainer``
and nothing heavier than the standard library, so the vLLM client, the trainer and the tests use
it without torch.

A version directory ``<adapters_dir>/<guild_id>/<version>/`` holds:

- ``adapter_config.json`` and ``adapter_model.safetensors``: a peft LoRA adapter as
  ``save_pretrained`` writes it;
- ``guildtune.json``: the publisher's metadata (``adapter_meta``), of which a reader checks
  ``base_model``, ``lora`` (rank, alpha, target modules), ``guild_id`` and ``version``;
- ``config_snapshot.json``: the configuration the version was trained with (for people; no
  reader checks it).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import struct
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

META_FILE = "guildtune.json"
SNAPSHOT_FILE = "config_snapshot.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class AdapterError(Exception):
    """A missing, corrupt or mismatched adapter; the message is one line for the operator."""


# ---------------------------------------------------------------------------------------------
# Writing


def adapter_meta(*, guild_id: int, version: int, base_model: str, lora: dict[str, Any],
                 **extra: Any) -> dict[str, Any]:
    """The publisher's metadata for ``guildtune.json``: the four fields every reader checks
    (``validate_adapter_dir``) plus what the publisher records beside them (metrics, data
    fingerprint, creation time, run id)."""
    return {"guild_id": guild_id, "version": version, "base_model": base_model, "lora": lora,
            **extra}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True), "utf-8")


def write_meta(directory: Path, meta: dict[str, Any]) -> Path:
    """Write ``guildtune.json`` into an adapter directory; returns the file."""
    _write_json(directory / META_FILE, meta)
    return directory / META_FILE


def write_snapshot(directory: Path, snapshot: dict[str, Any]) -> Path:
    """Write ``config_snapshot.json`` (the training configuration) into an adapter directory."""
    _write_json(directory / SNAPSHOT_FILE, snapshot)
    return directory / SNAPSHOT_FILE


# ---------------------------------------------------------------------------------------------
# Validation (no torch needed: every engine, the vLLM client included, checks through it)

_DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2,
                "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def _is_int(value: Any) -> bool:
    """A JSON integer: Python's bool is an int and 2.0 == 2, so both need refusing by type."""
    return isinstance(value, int) and not isinstance(value, bool)


def _short(value: Any, limit: int = 60) -> str:
    """A one-line, bounded repr of a value taken from an untrusted file."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _read_json(path: Path, what: str, prefix: str) -> dict[str, Any]:
    if not path.is_file():
        raise AdapterError(f"{prefix}: {what} {path.name} is missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        # ValueError covers bad UTF-8 too; RecursionError is json's answer to deep nesting.
        raise AdapterError(f"{prefix}: {path.name} is not valid JSON ({_one_line(exc)})") from None
    if not isinstance(data, dict):
        raise AdapterError(f"{prefix}: {path.name} is not a JSON object")
    return data


_MAX_HEADER = 100_000_000  # the safetensors loader's own limit


class _RankMismatch(ValueError):
    """A well-formed file for another LoRA rank (its own message, not 'corrupt')."""


def _tensor_entry(key: str, info: Any, rank: int) -> tuple[int, int, bool]:
    """Type-check one header entry; return (start, stop, is_lora_A). Raises ValueError(why)."""
    if not isinstance(info, dict):
        raise ValueError(f"tensor {_short(key)} is {type(info).__name__}, not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in _DTYPE_SIZES:
        raise ValueError(f"tensor {_short(key)} has unknown dtype {_short(dtype)}")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise ValueError(f"tensor {_short(key)} has shape {_short(shape)}, "
                         "not a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(_is_int(o) and o >= 0 for o in offsets)):
        raise ValueError(f"tensor {_short(key)} has data_offsets {_short(offsets)}, "
                         "not two non-negative integers")
    start, stop = offsets
    if stop < start:
        raise ValueError(f"tensor {_short(key)} ends (byte {stop}) before it starts ({start})")
    if stop - start != math.prod(shape) * _DTYPE_SIZES[dtype]:
        raise ValueError(f"tensor {_short(key)} holds {stop - start} bytes, its dtype and shape "
                         f"need {math.prod(shape) * _DTYPE_SIZES[dtype]}")
    is_a, is_b = "lora_A" in key, "lora_B" in key
    if (is_a or is_b) and not key.endswith(".bias"):
        # A LoRA factor is a matrix (or a conv kernel): A is (rank, in), B is (out, rank).
        if len(shape) < 2:
            raise ValueError(f"LoRA tensor {_short(key)} has shape {shape}, not a matrix")
        got = shape[0] if is_a else shape[1]
        if got != rank:
            raise _RankMismatch(f"{_short(key)} has rank {got}, this engine's LoRA rank is {rank}")
    return start, stop, is_a


def _check_safetensors(path: Path, rank: int, prefix: str) -> None:
    """Check the file as the safetensors loader would, without loading it.

    The header is a JSON object of tensor entries (plus an optional ``__metadata__`` object of
    strings); each entry has a known dtype, a shape of non-negative ints and two ordered
    data_offsets whose span is dtype * shape bytes; the tensors tile the data section with no gap
    or overlap up to the end of the file (catches truncation); the LoRA rank fits. Anything else
    is an AdapterError naming what is wrong.
    """
    if not path.is_file():
        raise AdapterError(f"{prefix}: {path.name} is missing")

    def corrupt(why: str) -> AdapterError:
        return AdapterError(f"{prefix}: {path.name} is corrupt ({why})")

    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise corrupt(f"{size} bytes, too short for a header")
            (n,) = struct.unpack("<Q", head)
            if n == 0 or 8 + n > size or n > _MAX_HEADER:
                raise corrupt(f"header length {n} does not fit the {size}-byte file")
            raw = fh.read(n)
    except OSError as exc:
        raise AdapterError(f"{prefix}: cannot read {path.name} ({_one_line(exc)})") from None
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise corrupt(f"header is not JSON: {_one_line(exc)}") from None
    if not isinstance(header, dict):
        raise corrupt(f"header is a JSON {type(header).__name__}, not an object")
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise corrupt("__metadata__ is not an object of strings")
    spans: list[tuple[int, int, str]] = []
    lora_keys = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            start, stop, is_a = _tensor_entry(key, info, rank)
        except _RankMismatch as exc:
            raise AdapterError(f"{prefix}: {exc}") from None
        except ValueError as exc:
            raise corrupt(str(exc)) from None
        spans.append((start, stop, key))
        lora_keys += is_a
    spans.sort()
    end = 0
    for start, stop, key in spans:
        if start != end:
            raise corrupt(f"tensor {_short(key)} starts at byte {start} of the data, expected "
                          f"{end} (tensors overlap or leave a gap)")
        end = stop
    data = size - 8 - n
    if end > data:
        raise AdapterError(f"{prefix}: {path.name} is truncated "
                           f"({size} bytes, tensors need {8 + n + end})")
    if end < data:
        raise corrupt(f"{data - end} bytes after the last tensor")
    if lora_keys == 0:
        raise AdapterError(f"{prefix}: {path.name} holds no LoRA weights")


def _norm_shape(shape: Any) -> Any:
    """Sort the target modules of a LoRA shape (order is not meaningful); anything that is not
    a list of strings is left as it is, to fail the comparison rather than the sort."""
    if isinstance(shape, dict) and isinstance(shape.get("target_modules"), (list, tuple)) and \
            all(isinstance(t, str) for t in shape["target_modules"]):
        return {**shape, "target_modules": sorted(shape["target_modules"])}
    return shape


def _check_types(fields: dict[str, Any], file: str, prefix: str) -> None:
    """Refuse a wrong-typed field by type: ``true`` equals 1 and ``4.0`` equals 4 in Python."""
    for name, (value, ok, want) in fields.items():
        if not ok(value):
            raise AdapterError(f"{prefix}: {file} field {name} is {_short(value)}, "
                               f"expected {want}")


def _str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(t, str) for t in value)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def validate_adapter_dir(path: str | Path, *, guild_id: int, version: int, base_id: str | None,
                         lora_shape: dict[str, Any]) -> Path:
    """Check an adapter version directory before anything loads it; return it as a Path.

    Requires ``adapter_config.json`` and ``adapter_model.safetensors`` (complete, with the
    configured rank/alpha/targets) and the publisher's ``guildtune.json`` naming this base model
    (skipped when ``base_id`` is None), this LoRA shape, this guild and this version. Every
    refusal, malformed files included, is an AdapterError with a one-line message; nothing else
    escapes for a bad directory.
    """
    p = Path(path).expanduser()
    prefix = f"adapter for guild {guild_id} v{version} at {p}"
    if not p.is_dir():
        raise AdapterError(f"{prefix}: not a directory (missing or unpublished)")
    shape = _norm_shape(dict(lora_shape))
    meta = _read_json(p / META_FILE, "publisher metadata", prefix)
    lora = meta.get("lora")
    _check_types({
        "guild_id": (meta.get("guild_id"), _is_int, "an integer"),
        "version": (meta.get("version"), _is_int, "an integer"),
        "lora": (lora, lambda v: isinstance(v, dict), "an object"),
        "lora.rank": (lora.get("rank") if isinstance(lora, dict) else None, _is_int,
                      "an integer"),
        "lora.alpha": (lora.get("alpha") if isinstance(lora, dict) else None, _number,
                       "a number"),
        "lora.target_modules": (lora.get("target_modules") if isinstance(lora, dict) else None,
                                _str_list, "a list of strings"),
    }, META_FILE, prefix)
    if base_id is not None and meta.get("base_model") != base_id:
        raise AdapterError(f"{prefix}: trained on base model {_short(meta.get('base_model'))}, "
                           f"this engine serves {base_id!r}")
    if _norm_shape(lora) != shape:
        raise AdapterError(f"{prefix}: LoRA shape {_short(lora, 200)} differs from the "
                           f"configured {shape!r}")
    if meta.get("guild_id") != guild_id or meta.get("version") != version:
        raise AdapterError(f"{prefix}: metadata says guild {meta.get('guild_id')} "
                           f"v{meta.get('version')}")
    cfg = _read_json(p / ADAPTER_CONFIG, "peft config", prefix)
    _check_types({
        "peft_type": (cfg.get("peft_type", "LORA"), lambda v: isinstance(v, str), "a string"),
        "r": (cfg.get("r"), _is_int, "an integer"),
        "lora_alpha": (cfg.get("lora_alpha"), _number, "a number"),
        # peft also accepts one regex string; a publisher of ours always writes the list.
        "target_modules": (cfg.get("target_modules"), _str_list, "a list of strings"),
    }, ADAPTER_CONFIG, prefix)
    got = {"rank": cfg["r"], "alpha": cfg["lora_alpha"],
           "target_modules": sorted(cfg["target_modules"])}
    if cfg.get("peft_type", "LORA") != "LORA" or got != shape:
        raise AdapterError(f"{prefix}: adapter_config.json has shape {got!r}, "
                           f"the configured shape is {shape!r}")
    _check_safetensors(p / ADAPTER_WEIGHTS, int(shape["rank"]), prefix)
    return p


def prune_withdrawn(store: Any, cfg: Any) -> list[tuple[int, int]]:
    """Delete the files of every tainted version that no longer serves: weights that learned
    from a member who was forgotten or opted out are not kept on disk. The registry row stays
    (it records that the version existed and why it was withdrawn). Returns (guild, version)."""
    root = cfg.adapters_dir.resolve()
    removed = []
    for g in store.guild_ids():
        for v in store.versions(g):
            if v.tainted_utc is None or v.status == "active":
                continue
            path = Path(v.path)
            # Only inside our adapter directory: a registry row must not delete anything else.
            if path.is_dir() and root in path.resolve().parents:
                shutil.rmtree(path, ignore_errors=True)
                removed.append((g, v.version))
    if removed:
        log.info("deleted the files of withdrawn adapter versions %s", removed)
    return removed

