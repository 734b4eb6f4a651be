"""LocalEngine: the model in this process, one thread that owns it, micro-batching across guilds.

One dedicated thread owns the model and every operation on it (generation, adapter load, hot
swap, eviction), so the event loop never runs model code and no batch ever sees half a swap.
Which adapter serves which guild is decided by ``AdapterSlots`` (bot/engine/slots.py); this
module holds the peft side of it (``PeftAdapters``).

Batching: requests that arrive within ``batch_wait_ms`` of the first (up to ``max_batch_size``)
run as one ``generate`` call with peft's ``adapter_names`` (one adapter per row, ``__base__`` for a
guild without one). Rows whose generation settings differ are split into groups with identical
settings, run one after another in the same cycle; a request with a ``seed`` always runs alone so
that the seed reproduces its output. In fp32 a row's greedy output equals running it alone.

Streaming: ``generate(req, on_text)`` passes a ``_RowStreamer`` to ``generate`` for a group with
streaming rows; it decodes only those rows (at most every ``stream_interval_s``) and hands the
text to each row's callback on its event loop. Results are the same with and without it.

Hot swap: ``activate`` reads the new version's weights in the thread that validates it
(``PeftAdapters.prepare``); the model thread then only copies them into the resident adapter
(``swap_prepared``), falling back to peft's ``hotswap_adapter`` from the files when they do not
fit.

torch and peft are imported lazily: importing this module stays cheap.

Over 400 lines on purpose: the model-owning thread, its batching and generation share the
thread's state; the adapter decisions already live in ``AdapterSlots``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import queue
import re
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from bot.engine.base import (
    FALLBACK_TEXT,
    AdapterError,
    Engine,
    EngineError,
    GenerationRequest,
    GenerationResult,
    OnText,
)
from bot.engine.slots import AdapterSlots
from guildtune.adapter_dir import ADAPTER_CONFIG, ADAPTER_WEIGHTS, validate_adapter_dir
from guildtune.prompting import (
    prompt_ids_within,
    render_ids,
    serving_budget,
    special_strings,
)

if TYPE_CHECKING:
    from guildtune.config import LoraConfig, ModelConfig
    from guildtune.models import LoadedModel

log = logging.getLogger(__name__)


class PeftAdapters:
    """The model side of the adapter slots: LoRA adapters in one PeftModel around the base.

    The PeftModel is created at the first load and kept (empty) after the last delete, so a
    later load adds to it. Model thread only.
    """

    def __init__(self, loaded: LoadedModel) -> None:
        self._loaded = loaded
        self.model: Any = None  # PeftModel, created at the first adapter load
        # peft upcasts bf16/fp16 adapters to fp32 by default (exact, slower); False keeps them
        # in the model's dtype.
        self.autocast = True
        self._layers: dict[str, list[tuple[str, Any]]] = {}  # name -> its LoRA layers

    def load(self, name: str, path: Path) -> None:
        """Load the adapter at ``path`` as ``name``; a failed load leaves no ``name`` behind."""
        from peft import PeftModel

        self._layers.pop(name, None)
        try:
            if self.model is None:
                # First adapter: wrap the base model once; later adapters are added to it.
                self.model = PeftModel.from_pretrained(
                    self._loaded.model, str(path), adapter_name=name, is_trainable=False,
                    autocast_adapter_dtype=self.autocast)
                self.model.eval()
            else:
                self.model.load_adapter(str(path), adapter_name=name, is_trainable=False,
                                        autocast_adapter_dtype=self.autocast)
                if self.model.active_adapter not in self.model.peft_config:
                    # The previously active adapter was deleted; peft needs one active adapter
                    # even when every row names its own via adapter_names.
                    self.model.set_adapter(name, inference_mode=True)
        except Exception:
            if self.model is not None and name in self.model.peft_config:
                self.delete(name)
            raise

    def hotswap(self, name: str, path: Path) -> None:
        """Replace the weights of ``name`` in place (not atomic: the slots rebuild on failure)."""
        from peft.utils.hotswap import hotswap_adapter

        hotswap_adapter(self.model, str(path), adapter_name=name,
                        torch_device=str(self._loaded.device))

    def prepare(self, path: Path) -> PreparedAdapter | None:
        """Read an adapter version's weights for ``swap_prepared``: any thread (it touches no
        model state). None when the adapter is not a plain LoRA this fast path handles (the
        slots then use ``hotswap``)."""
        import torch
        from safetensors.torch import load_file

        cfg = json.loads((path / ADAPTER_CONFIG).read_text(encoding="utf-8"))
        if cfg.get("use_dora") or cfg.get("lora_bias") or cfg.get("rank_pattern") or \
                cfg.get("alpha_pattern") or cfg.get("modules_to_save"):
            return None
        r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
        scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        # Resident adapter weights are fp32 even on a bf16 base (peft's autocast_adapter_dtype);
        # copy_ converts anyway, this only moves the conversion off the model thread.
        want = torch.float32 if self.autocast and \
            self._loaded.dtype in (torch.bfloat16, torch.float16) else self._loaded.dtype
        weights: dict[tuple[str, str], Any] = {}
        for key, t in load_file(str(path / ADAPTER_WEIGHTS),
                                device=str(self._loaded.device)).items():
            m = _LORA_KEY.fullmatch(key)
            if m is None:
                return None
            weights[(m.group(1), m.group(2))] = t.to(want) if t.is_floating_point() else t
        return PreparedAdapter(weights, scaling, alpha)

    def swap_prepared(self, name: str, prepared: PreparedAdapter) -> bool:
        """Copy prepared weights into the resident adapter ``name`` in place. Checks every key
        and shape first: returns False (nothing changed) when they do not match the resident
        adapter's modules exactly; only a failure inside the copies can leave it half swapped."""
        import torch
        from peft.tuners.lora import LoraLayer

        if name not in self._layers:  # the LoRA layers holding ``name``, found once per load
            self._layers[name] = [(n, m) for n, m in self.model.named_modules()
                                  if isinstance(m, LoraLayer) and name in m.lora_A]
        targets: list[tuple[Any, Any]] = []
        layers: list[Any] = []
        seen: set[tuple[str, str]] = set()
        for mod_name, module in self._layers[name]:
            layers.append(module)
            for part in ("lora_A", "lora_B"):
                src = prepared.weights.get((mod_name, part))
                dst = getattr(module, part)[name].weight
                if src is None or tuple(src.shape) != tuple(dst.shape):
                    return False
                targets.append((dst, src))
                seen.add((mod_name, part))
        if not layers or seen != set(prepared.weights):
            return False
        with torch.no_grad():
            for dst, src in targets:
                dst.copy_(src)
            for module in layers:
                module.scaling[name] = prepared.scaling
                module.lora_alpha[name] = prepared.alpha
        self.model.peft_config[name].lora_alpha = prepared.alpha
        return True

    def delete(self, name: str) -> None:
        self._layers.pop(name, None)
        with warnings.catch_warnings():
            # peft warns when the active adapter goes; we route rows by adapter_names anyway.
            warnings.filterwarnings("ignore", message=".*was active which is now deleted.*")
            self.model.delete_adapter(name)


# A saved LoRA weight: "<module path>.lora_A.weight" / "<module path>.lora_B.weight".
_LORA_KEY = re.compile(r"(.+)\.(lora_A|lora_B)\.weight")


@dataclass
class PreparedAdapter:
    """An adapter version's weights read off the model thread: (module path, lora_A|lora_B)
    -> tensor on the model's device in the resident adapters' dtype, and its LoRA scaling."""

    weights: dict[tuple[str, str], Any]
    scaling: float
    alpha: float


@dataclass
class _GenItem:
    req: GenerationRequest
    fut: asyncio.Future[GenerationResult]
    loop: asyncio.AbstractEventLoop
    t0: float
    on_text: OnText | None = None


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


def _call_on_text(fn: OnText, text: str) -> None:
    """Run a streaming callback on the event loop; its exceptions are logged, never raised."""
    try:
        fn(text)
    except Exception:
        log.exception("on_text callback failed (ignored)")


class _RowStreamer:
    """Streams the rows of one ``generate`` call that asked for it (``put``/``end`` as in
    transformers' ``BaseStreamer``; ``_RowStreamer.new`` builds a subclass of it, imported
    lazily).

    ``put`` gets each step's tokens for the whole batch, shape (batch,), after a first call
    with the prompts (skipped). Only rows with a callback keep their tokens; a row stops at its
    first end-of-sequence token or its own ``max_new``. A row's text is decoded at most every
    ``interval`` seconds and handed to its callback on its event loop only when it changed.
    Runs on the model thread and never raises into ``generate``.
    """

    _cls: type | None = None

    @classmethod
    def new(cls, engine: LocalEngine, rows: list[_Row]) -> _RowStreamer:
        if cls._cls is None:
            from transformers.generation.streamers import BaseStreamer

            cls._cls = type("RowStreamer", (cls, BaseStreamer), {})
        return cls._cls(engine, rows)  # type: ignore[no-any-return]

    def __init__(self, engine: LocalEngine, rows: list[_Row]) -> None:
        self._tok = engine._tok
        self._eos = set(engine._eos)
        self._interval = engine.stream_interval_s
        # Per streaming row: index in the batch, row, its tokens, next decode time, last text.
        self._rows = [[i, r, [], 0.0, ""] for i, r in enumerate(rows) if r.item.on_text]
        self._prompt_seen = False

    def put(self, value: Any) -> None:
        if not self._prompt_seen:  # the first call carries the prompts
            self._prompt_seen = True
            return
        if not self._rows:
            return
        try:
            toks = value.tolist()
            now = time.monotonic()
            live = []
            for st in self._rows:
                i, row, got = st[0], st[1], st[2]
                tok = toks[i] if isinstance(toks, list) else toks
                finished = tok in self._eos or len(got) + 1 >= row.max_new
                if tok not in self._eos:
                    got.append(tok)
                if not finished:
                    live.append(st)
                # The final text is the result's; stream only what comes before it.
                if finished or now < st[3] or row.item.fut.done():
                    continue
                st[3] = now + self._interval
                text = self._tok.decode(got, skip_special_tokens=True).rstrip("\ufffd").strip()
                if text and text != st[4]:
                    st[4] = text
                    row.item.loop.call_soon_threadsafe(_call_on_text, row.item.on_text, text)
            self._rows = live
        except Exception:  # a closed loop, a decode error: streaming stops, generation goes on
            log.exception("streaming failed; the rows still get their results")
            self._rows = []

    def end(self) -> None:
        self._rows = []


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
        # Owned by the model thread: the peft side and the slot policy over it.
        self._adapters = PeftAdapters(loaded)
        self._slots = AdapterSlots(self._adapters, model_cfg.max_resident_adapters)
        self.batches_run = 0  # for tests and the bench: how many generate calls
        # How long the last control item (load, swap, deactivate) held the model thread.
        self.last_control_ms = 0.0
        # Read and convert a new version's weights off the model thread (False: the model
        # thread runs peft's hotswap_adapter from the files, as before; for the bench).
        self.prepare_swaps = True
        # Streaming: decode a streaming row's text at most this often.
        self.stream_interval_s = 0.1
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

    async def generate(self, req: GenerationRequest, on_text: OnText | None = None
                       ) -> GenerationResult:
        """Queue the request for the next batch and await its result; ``on_text`` receives the
        text so far on this loop as it grows (at most every ``stream_interval_s``)."""
        if self._thread is None or self._closed:
            raise EngineError("engine is not running (call start() first, or it was closed)")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[GenerationResult] = loop.create_future()
        self._queue.put(_GenItem(req, fut, loop, time.perf_counter(), on_text))
        return await fut

    async def activate(self, guild_id: int, version: int, path: str | Path) -> None:
        """Validate and read the new weights off the loop and off the model thread; the model
        thread then only copies them into a resident slot (or loads the adapter) between
        batches."""
        p, prepared = await asyncio.to_thread(self._validate_and_prepare, guild_id, version, path)
        await self._control(lambda: self._slots.activate(guild_id, version, p, prepared))

    def _validate_and_prepare(self, guild_id: int, version: int, path: str | Path
                              ) -> tuple[Path, PreparedAdapter | None]:
        p = validate_adapter_dir(path, guild_id=guild_id, version=version,
                                 base_id=self._loaded.base_id, lora_shape=self._lora.shape())
        prepared = None
        if self.prepare_swaps:
            try:
                prepared = self._adapters.prepare(p)
            except Exception as exc:  # noqa: BLE001  (validated: the file path reports it)
                log.warning("guild %s v%s: cannot prepare the hot swap (%s: %s)", guild_id,
                            version, type(exc).__name__, exc)
        return p, prepared

    async def deactivate(self, guild_id: int) -> None:
        """Unload the guild's adapter; it is served by the base model from now on."""
        await self._control(lambda: self._slots.deactivate(guild_id))

    def active_versions(self) -> dict[int, int]:
        """Guild id -> the version it serves (snapshot published by the model thread)."""
        return self._slots.versions()

    def resident_guilds(self) -> list[int]:
        """Guilds whose adapter is loaded in the model now, least recently used first."""
        return self._slots.resident()

    @property
    def peft_model(self) -> Any:
        """The PeftModel holding the resident adapters (None before the first load); for
        tests and diagnostics, not to be called into from another thread."""
        return self._adapters.model

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
        t0 = time.perf_counter()
        try:
            value = item.fn()
        except Exception as exc:
            self.last_control_ms = (time.perf_counter() - t0) * 1000
            if not isinstance(exc, (AdapterError, EngineError)):
                log.exception("engine control operation failed")
                exc = EngineError(f"{type(exc).__name__}: {exc}")
            _resolve(item.loop, item.fut, exc=exc)
        else:
            self.last_control_ms = (time.perf_counter() - t0) * 1000
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
        needed = {it.req.guild_id for it in items if self._slots.wants(it.req.guild_id)}
        rows: list[_Row] = []
        for it in items:
            try:
                max_new, temp, top_p, rep = self._settings(it.req)
                ids = self.prompt_ids(it.req.messages, max_new)
                name, version = self._slots.serving(it.req.guild_id, needed)
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
        self._slots.trim()
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
        streamer = _RowStreamer.new(self, rows) if any(r.item.on_text for r in rows) else None
        if streamer is not None:
            kwargs["streamer"] = streamer
        with torch.inference_mode():
            peft = self._adapters.model
            if self._slots.resident() and peft is not None:
                out = peft.generate(**kwargs, adapter_names=[r.adapter for r in rows])
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
        """Rendered prompt within ``serving_budget`` (max_context_tokens - max_new_tokens),
        trimmed by the rule training uses too (``guildtune.prompting.fit_messages``): system
        messages stay, the oldest turns go whole, an overlong newest turn keeps its end."""
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("content"), str) or \
                    m.get("role") not in ("system", "user", "assistant"):
                raise ValueError("each message needs role system/user/assistant and str content")
        budget = serving_budget(self._cfg.max_context_tokens, max_new_tokens)
        return prompt_ids_within(self._tok, messages, budget, specials=self._specials)
