"""The model engine: one base model, a LoRA adapter per guild, hot swap, mixed-adapter batching.

``Engine`` is the interface the Cog and the console code against. ``LocalEngine`` runs the model
in-process: one dedicated thread owns the model and every operation on it (generation, adapter
load, hot swap, eviction), so the event loop never runs model code and no batch ever sees half a
swap. ``VllmEngine`` (bot/vllm_engine.py) speaks to a vLLM server instead.

Batching: requests that arrive within ``batch_wait_ms`` of the first (up to ``max_batch_size``)
run as one ``generate`` call with peft's ``adapter_names`` (one adapter per row, ``__base__`` for a
guild without one). Rows whose generation settings differ are split into groups with identical
settings, run one after another in the same cycle; a request with a ``seed`` always runs alone so
that the seed reproduces its output. In fp32 a row's greedy output equals running it alone.

This module imports torch/peft lazily: importing it (e.g. for ``VllmEngine`` or the fake engine
in tests) stays cheap.
"""

from __future__ import annotations

import abc
import asyncio
import json
import logging
import math
import queue
import struct
import threading
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from guildtune.prompting import render_ids, special_strings

if TYPE_CHECKING:
    from guildtune.config import LoraConfig, ModelConfig
    from guildtune.models import LoadedModel

log = logging.getLogger(__name__)

BASE_ADAPTER = "__base__"  # peft's name for "no adapter" in a mixed batch
FALLBACK_TEXT = "(no reply)"
GUILDTUNE_META = "guildtune.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass(frozen=True)
class GenerationRequest:
    """One reply to generate. ``None`` settings take the config defaults; temperature 0 = greedy."""

    guild_id: int | None  # None = DM / base model
    messages: list[dict[str, str]]  # system (persona) + context turns: system/user/assistant
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None


@dataclass(frozen=True)
class GenerationResult:
    text: str
    adapter_version: int | None  # the version that produced it; None = base model
    tokens_in: int
    tokens_out: int
    latency_ms: float


class AdapterError(Exception):
    """A missing, corrupt or mismatched adapter; the message is one line for the operator."""


class EngineError(RuntimeError):
    """Generation failed or the engine is not running; the message is one line."""


def adapter_name(guild_id: int) -> str:
    """The peft adapter name of a guild's slot."""
    return f"g{guild_id}"


class Engine(abc.ABC):
    """Generates replies with a per-guild adapter on one base model."""

    @abc.abstractmethod
    async def start(self) -> None:
        """Start serving (threads, sessions). Call once before ``generate``."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop serving; pending requests fail with EngineError; nothing is left running."""

    @abc.abstractmethod
    async def generate(self, req: GenerationRequest) -> GenerationResult:
        """Generate one reply with the guild's active adapter (base model when none)."""

    @abc.abstractmethod
    async def activate(self, guild_id: int, version: int, path: str | Path) -> None:
        """Serve ``version`` (adapter dir ``path``) for the guild from now on.

        Raises AdapterError when the adapter is missing, corrupt or does not fit; the guild then
        keeps serving its previous version.
        """

    @abc.abstractmethod
    async def deactivate(self, guild_id: int) -> None:
        """The guild falls back to the base model."""

    @abc.abstractmethod
    def active_versions(self) -> dict[int, int]:
        """Guild id -> adapter version it is served with (resident or not)."""


# ---------------------------------------------------------------------------------------------
# Adapter directory validation (no torch needed: the vLLM backend uses it too)

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
    meta = _read_json(p / GUILDTUNE_META, "publisher metadata", prefix)
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
    }, GUILDTUNE_META, prefix)
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


# ---------------------------------------------------------------------------------------------
# LocalEngine


@dataclass
class _GenItem:
    req: GenerationRequest
    fut: asyncio.Future[GenerationResult]
    loop: asyncio.AbstractEventLoop
    t0: float


@dataclass
class _CtlItem:
    fn: Callable[[], Any]
    fut: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop


_STOP = object()


def _resolve(loop: asyncio.AbstractEventLoop, fut: asyncio.Future[Any], value: Any = None,
             exc: BaseException | None = None) -> None:
    """Complete an asyncio future from the model thread (the loop may already be gone)."""
    def _set() -> None:
        if fut.done():  # cancelled by the caller meanwhile
            return
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(value)
    try:
        loop.call_soon_threadsafe(_set)
    except RuntimeError:  # loop closed: nobody is waiting any more
        pass


@dataclass
class _Row:
    item: _GenItem
    ids: list[int]
    adapter: str
    version: int | None
    max_new: int
    key: tuple[Any, ...]


class LocalEngine(Engine):
    """In-process engine: a model thread, micro-batching across guilds, resident adapters (LRU)."""

    def __init__(self, loaded: LoadedModel, model_cfg: ModelConfig, lora_cfg: LoraConfig) -> None:
        self._loaded = loaded
        self._cfg = model_cfg
        self._lora = lora_cfg
        self._tok = loaded.tokenizer
        self._queue: queue.Queue[Any] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._peft: Any = None  # PeftModel, created at the first adapter load
        # Owned by the model thread: the version each guild should serve (with its dir, so an
        # evicted adapter can reload) and the adapters loaded in the model, in LRU order.
        self._wanted: dict[int, tuple[int, Path]] = {}
        self._resident: OrderedDict[int, int] = OrderedDict()
        self._versions: dict[int, int] = {}  # published copy for active_versions()
        self.batches_run = 0  # for tests and the bench: how many generate calls
        self._eos = self._eos_ids()
        self._pad = (self._tok.pad_token_id if self._tok.pad_token_id is not None
                     else self._eos[0])
        self._specials = special_strings(self._tok)

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the model thread."""
        if self._thread is not None:
            return
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="guildtune-model", daemon=True)
        self._thread.start()

    async def close(self) -> None:
        """Stop the model thread after the current batch and join it."""
        if self._thread is None:
            return
        self._closed = True
        self._queue.put(_STOP)
        thread, self._thread = self._thread, None
        await asyncio.to_thread(thread.join)

    # -- public API -----------------------------------------------------------------------------

    async def generate(self, req: GenerationRequest) -> GenerationResult:
        """Queue the request for the next batch and await its result."""
        if self._thread is None or self._closed:
            raise EngineError("engine is not running (call start() first, or it was closed)")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[GenerationResult] = loop.create_future()
        self._queue.put(_GenItem(req, fut, loop, time.perf_counter()))
        return await fut

    async def activate(self, guild_id: int, version: int, path: str | Path) -> None:
        """Validate off the loop, then load or hot-swap in the model thread between batches."""
        p = await asyncio.to_thread(
            validate_adapter_dir, path, guild_id=guild_id, version=version,
            base_id=self._loaded.base_id, lora_shape=self._lora.shape())
        await self._control(lambda: self._do_activate(guild_id, version, p))

    async def deactivate(self, guild_id: int) -> None:
        """Unload the guild's adapter; it is served by the base model from now on."""
        await self._control(lambda: self._do_deactivate(guild_id))

    def active_versions(self) -> dict[int, int]:
        """Guild id -> the version it serves (snapshot published by the model thread)."""
        return dict(self._versions)

    def resident_guilds(self) -> list[int]:
        """Guilds whose adapter is loaded in the model now, least recently used first."""
        return list(self._resident)

    async def _control(self, fn: Callable[[], Any]) -> Any:
        if self._thread is None or self._closed:
            raise EngineError("engine is not running (call start() first, or it was closed)")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._queue.put(_CtlItem(fn, fut, loop))
        return await fut

    # -- model thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        import torch

        log.debug("model thread started (torch threads: %d)", torch.get_num_threads())
        stop = False
        while not stop:
            item = self._queue.get()
            if item is _STOP:
                break
            if isinstance(item, _CtlItem):
                self._run_control(item)
                continue
            batch, deferred = self._collect(item)
            try:
                self._run_batch(batch)
            except Exception as exc:  # a bug or OOM must fail the requests, not the thread
                log.exception("batch of %d failed", len(batch))
                err = EngineError(f"generation failed: {type(exc).__name__}: {exc}")
                for it in batch:
                    _resolve(it.loop, it.fut, exc=err)
            for d in deferred:
                if d is _STOP:
                    stop = True
                else:
                    self._run_control(d)
        # Fail whatever is still queued so no caller waits forever.
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, (_GenItem, _CtlItem)):
                _resolve(item.loop, item.fut, exc=EngineError("engine closed"))
        log.debug("model thread stopped")

    def _collect(self, first: _GenItem) -> tuple[list[_GenItem], list[Any]]:
        """Gather requests arriving within batch_wait_ms; a control item or stop ends the batch
        (it runs right after, so a swap never lands inside a batch)."""
        batch, deferred = [first], []
        deadline = time.monotonic() + self._cfg.batch_wait_ms / 1000
        while len(batch) < self._cfg.max_batch_size:
            timeout = deadline - time.monotonic()
            try:
                nxt = (self._queue.get(timeout=timeout) if timeout > 0
                       else self._queue.get_nowait())
            except queue.Empty:
                break
            if isinstance(nxt, _GenItem):
                batch.append(nxt)
            else:
                deferred.append(nxt)
                break
        return batch, deferred

    def _run_control(self, item: _CtlItem) -> None:
        try:
            value = item.fn()
        except Exception as exc:
            if not isinstance(exc, (AdapterError, EngineError)):
                log.exception("engine control operation failed")
                exc = EngineError(f"{type(exc).__name__}: {exc}")
            _resolve(item.loop, item.fut, exc=exc)
        else:
            _resolve(item.loop, item.fut, value)

    def _settings(self, req: GenerationRequest) -> tuple[int, float, float, float]:
        c = self._cfg
        return (req.max_new_tokens if req.max_new_tokens is not None else c.max_new_tokens,
                req.temperature if req.temperature is not None else c.temperature,
                req.top_p if req.top_p is not None else c.top_p,
                req.repetition_penalty if req.repetition_penalty is not None
                else c.repetition_penalty)

    def _run_batch(self, items: list[_GenItem]) -> None:
        items = [it for it in items if not it.fut.done()]
        needed = {it.req.guild_id for it in items if it.req.guild_id in self._wanted}
        rows: list[_Row] = []
        for it in items:
            try:
                max_new, temp, top_p, rep = self._settings(it.req)
                ids = self.prompt_ids(it.req.messages, max_new)
                name, version = self._adapter_for(it.req.guild_id, needed)
            except Exception as exc:
                log.warning("request for guild %s refused: %s", it.req.guild_id, exc)
                _resolve(it.loop, it.fut, exc=EngineError(f"bad request: {exc}"))
                continue
            # Same settings share a generate call; a seeded request runs alone to be reproducible.
            key: tuple[Any, ...] = (temp > 0, temp if temp > 0 else 0.0,
                                    top_p if temp > 0 else 1.0, rep,
                                    (it.req.seed, id(it)) if it.req.seed is not None else None)
            rows.append(_Row(it, ids, name, version, max_new, key))
        groups: dict[tuple[Any, ...], list[_Row]] = {}
        for r in rows:
            groups.setdefault(r.key, []).append(r)
        done: list[tuple[_GenItem, GenerationResult]] = []
        for group in groups.values():
            done += self._generate(group)
        # Evict over-cap adapters before answering, so callers see a settled state.
        self._trim_resident(set())
        for it, res in done:
            _resolve(it.loop, it.fut, res)

    def _generate(self, rows: list[_Row]) -> list[tuple[_GenItem, GenerationResult]]:
        """One generate call for rows sharing settings; returns (item, result) pairs."""
        import torch

        do_sample, temp, top_p, rep, seed = rows[0].key
        width = max(len(r.ids) for r in rows)
        input_ids = torch.full((len(rows), width), self._pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):  # left padding: every row's last prompt token aligned
            input_ids[i, width - len(r.ids):] = torch.tensor(r.ids, dtype=torch.long)
            mask[i, width - len(r.ids):] = 1
        dev = self._loaded.device
        kwargs: dict[str, Any] = {
            "input_ids": input_ids.to(dev), "attention_mask": mask.to(dev),
            "max_new_tokens": max(r.max_new for r in rows), "do_sample": do_sample,
            "repetition_penalty": rep, "pad_token_id": self._pad, "eos_token_id": self._eos,
        }
        if do_sample:
            kwargs.update(temperature=temp, top_p=top_p)
            if seed is not None:
                torch.manual_seed(seed[0])
        else:
            # Unset sampling knobs a checkpoint's generation_config may carry (avoids warnings).
            kwargs.update(temperature=None, top_p=None, top_k=None)
        with torch.inference_mode():
            if self._resident and self._peft is not None:
                out = self._peft.generate(**kwargs, adapter_names=[r.adapter for r in rows])
            else:
                # No adapter resident: the (possibly LoRA-injected, but empty) base model.
                out = self._loaded.model.generate(**kwargs)
        self.batches_run += 1
        new = out[:, width:].tolist()
        now = time.perf_counter()
        done = []
        for r, toks in zip(rows, new):
            toks = toks[:r.max_new]
            n = len(toks)
            for j, t in enumerate(toks):
                if t in self._eos:
                    n = j + 1
                    break
            text = self._tok.decode(toks[:n], skip_special_tokens=True).strip() or FALLBACK_TEXT
            done.append((r.item, GenerationResult(text, r.version, len(r.ids), n,
                                                  (now - r.item.t0) * 1000)))
        return done

    def _eos_ids(self) -> list[int]:
        ids: set[int] = set()
        gc_eos = getattr(self._loaded.model.generation_config, "eos_token_id", None)
        if isinstance(gc_eos, int):
            ids.add(gc_eos)
        elif isinstance(gc_eos, (list, tuple)):
            ids.update(int(x) for x in gc_eos)
        if self._tok.eos_token_id is not None:
            ids.add(int(self._tok.eos_token_id))
        if not ids:
            raise EngineError("the model has no end-of-sequence token; cannot stop generation")
        return sorted(ids)

    # -- prompts --------------------------------------------------------------------------------

    def render_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of the chat with a generation prompt; template-token text inside message
        content stays plain text (only the template adds special tokens)."""
        return render_ids(self._tok, messages, add_generation_prompt=True,
                          specials=self._specials)

    def prompt_ids(self, messages: list[dict[str, str]], max_new_tokens: int) -> list[int]:
        """Rendered prompt trimmed to max_context_tokens - max_new_tokens: leading system
        messages stay, the oldest turns go first; an overlong newest turn keeps its end."""
        budget = max(self._cfg.max_context_tokens - max_new_tokens,
                     self._cfg.max_context_tokens // 4)
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("content"), str) or \
                    m.get("role") not in ("system", "user", "assistant"):
                raise ValueError("each message needs role system/user/assistant and str content")
        n_sys = 0
        while n_sys < len(messages) and messages[n_sys]["role"] == "system":
            n_sys += 1
        system, turns = list(messages[:n_sys]), list(messages[n_sys:])
        for start in range(len(turns) + 1):
            ids = self.render_ids(system + turns[start:])
            if len(ids) <= budget:
                if start:
                    log.debug("context trimmed: dropped %d oldest turns", start)
                return ids
            if start == len(turns) - 1:
                break  # only the newest turn left: shorten it instead of dropping it
        msgs = system + turns[-1:]
        for _ in range(4):  # shorten the longest-to-blame message until it fits
            ids = self.render_ids(msgs)
            over = len(ids) - budget
            if over <= 0:
                return ids
            idx = len(msgs) - 1 if turns else 0
            content_ids = self._tok(msgs[idx]["content"], add_special_tokens=False,
                                    split_special_tokens=True)["input_ids"]
            keep = max(len(content_ids) - over - 8, 0)
            if keep == 0 and idx > 0:  # the system prompt itself is too long: cut its end
                idx = 0
                content_ids = self._tok(msgs[0]["content"], add_special_tokens=False,
                                        split_special_tokens=True)["input_ids"]
                keep = max(len(content_ids) - over - 8, 0)
                msgs[0] = {**msgs[0], "content": self._tok.decode(content_ids[:keep])}
                continue
            msgs[idx] = {**msgs[idx], "content": self._tok.decode(content_ids[-keep:] if keep
                                                                   else [])}
        return self.render_ids(msgs)[-budget:]

    # -- adapters (model thread only) -----------------------------------------------------------

    def _adapter_for(self, guild_id: int | None, needed: set[Any]) -> tuple[str, int | None]:
        """The peft name and version serving a guild, reloading an evicted adapter on demand."""
        if guild_id is None or guild_id not in self._wanted:
            return BASE_ADAPTER, None
        version, path = self._wanted[guild_id]
        if self._resident.get(guild_id) != version:
            try:
                self._load(guild_id, version, path, protect=needed)
            except Exception as exc:
                # Files vanished since activation: answer from the base model rather than fail,
                # and stop wanting that version. Otherwise every request of the guild retries
                # the load, logs again and evicts another guild's adapter to make room; now
                # active_versions() tells the truth and the AdapterWatcher re-activates (or
                # reports the broken version) once.
                log.error("guild %s: cannot reload adapter v%s (%s); serving base model",
                          guild_id, version, exc)
                self._wanted.pop(guild_id, None)
                self._versions = {g: v for g, (v, _) in self._wanted.items()}
                return BASE_ADAPTER, None
        self._resident.move_to_end(guild_id)
        return adapter_name(guild_id), version

    def _load(self, guild_id: int, version: int, path: Path, protect: set[Any]) -> None:
        from peft import PeftModel

        name = adapter_name(guild_id)
        self._trim_resident(protect, room=1)
        t0 = time.perf_counter()
        try:
            if self._peft is None:
                # First adapter: wrap the base model once; later adapters are added to it.
                self._peft = PeftModel.from_pretrained(self._loaded.model, str(path),
                                                       adapter_name=name, is_trainable=False)
                self._peft.eval()
            else:
                self._peft.load_adapter(str(path), adapter_name=name, is_trainable=False)
                if self._peft.active_adapter not in self._peft.peft_config:
                    # The previously active adapter was deleted; peft needs one active adapter
                    # even when every row names its own via adapter_names.
                    self._peft.set_adapter(name, inference_mode=True)
        except Exception as exc:
            if self._peft is not None and name in self._peft.peft_config:
                self._delete(name)
            raise AdapterError(f"adapter for guild {guild_id} v{version} at {path}: "
                               f"load failed ({type(exc).__name__}: {exc})") from None
        self._resident[guild_id] = version
        self._resident.move_to_end(guild_id)
        log.info("guild %s: loaded adapter v%s in %.0f ms", guild_id, version,
                 (time.perf_counter() - t0) * 1000)

    def _delete(self, name: str) -> None:
        with warnings.catch_warnings():
            # peft warns when the active adapter goes; we route rows by adapter_names anyway.
            warnings.filterwarnings("ignore", message=".*was active which is now deleted.*")
            self._peft.delete_adapter(name)

    def _trim_resident(self, protect: set[Any], room: int = 0) -> None:
        """Evict least recently used adapters (not needed by the current batch) over the cap."""
        cap = self._cfg.max_resident_adapters - room
        for gid in list(self._resident):
            if len(self._resident) <= cap:
                break
            if gid in protect:
                continue
            self._delete(adapter_name(gid))
            del self._resident[gid]
            log.debug("guild %s: adapter evicted (LRU)", gid)

    def _do_activate(self, guild_id: int, version: int, path: Path) -> None:
        from peft.utils.hotswap import hotswap_adapter

        if self._wanted.get(guild_id) == (version, path) and \
                self._resident.get(guild_id) == version:
            # Already serving exactly this version (two pollers raced): versions are immutable,
            # so there is nothing to swap.
            return
        if guild_id in self._resident:
            t0 = time.perf_counter()
            try:
                hotswap_adapter(self._peft, str(path), adapter_name=adapter_name(guild_id),
                                torch_device=str(self._loaded.device))
            except Exception as exc:
                # hotswap is not atomic: rebuild the slot from the previous version.
                self._delete(adapter_name(guild_id))
                del self._resident[guild_id]
                old = self._wanted.get(guild_id)
                if old is not None:
                    try:
                        self._load(guild_id, old[0], old[1], protect={guild_id})
                    except AdapterError:
                        log.error("guild %s: previous adapter v%s failed to reload too",
                                  guild_id, old[0])
                raise AdapterError(f"adapter for guild {guild_id} v{version} at {path}: hot "
                                   f"swap failed ({type(exc).__name__}: {exc})") from None
            self._resident[guild_id] = version
            self._resident.move_to_end(guild_id)
            log.info("guild %s: hot-swapped to v%s in %.0f ms", guild_id, version,
                     (time.perf_counter() - t0) * 1000)
        else:
            self._load(guild_id, version, path, protect={guild_id})
        self._wanted[guild_id] = (version, path)
        self._versions = {g: v for g, (v, _) in self._wanted.items()}

    def _do_deactivate(self, guild_id: int) -> None:
        if guild_id in self._resident:
            self._delete(adapter_name(guild_id))
            del self._resident[guild_id]
        self._wanted.pop(guild_id, None)
        self._versions = {g: v for g, (v, _) in self._wanted.items()}
        log.info("guild %s: adapter deactivated, serving base model", guild_id)


def create_engine(model_cfg: ModelConfig, lora_cfg: LoraConfig, *,
                  cache_dir: Path | None = None) -> Engine:
    """The configured backend: a LocalEngine on the loaded model, or a VllmEngine client.

    Loading a local model takes seconds: call this off the event loop (e.g. asyncio.to_thread).
    """
    if model_cfg.backend == "vllm":
        from bot.vllm_engine import VllmEngine

        return VllmEngine(model_cfg, lora_cfg)
    from guildtune.models import load_model

    loaded = load_model(model_cfg.name, device=model_cfg.device, dtype=model_cfg.dtype,
                        cache_dir=cache_dir, threads=model_cfg.threads)
    return LocalEngine(loaded, model_cfg, lora_cfg)
