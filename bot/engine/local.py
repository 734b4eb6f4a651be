"""LocalEngine: the model in this process, one thread that owns it, batching across guilds.

One dedicated thread owns the model and every operation on it (generation, adapter load, hot
swap, eviction), so the event loop never runs model code and no row ever sees half a swap.
Which adapter serves which guild is decided by ``AdapterSlots`` (bot/engine/slots.py); this
module holds the peft side of it (``PeftAdapters``).

Batching (default, ``LocalEngine.continuous``): continuous batching in ``_StepLoop``, our own
decode loop. A request joins the running batch at the next decode step (prefilled, its KV cache
merged into the batch's) and leaves it at its end-of-sequence or ``max_new_tokens``; one
forward per step over all running rows, with peft's ``adapter_names`` (one adapter per row,
``__base__`` for a guild without one) and each row's own settings (repetition penalty,
temperature, top-k/top-p, its own generator when seeded). Requests that arrive together
within ``batch_wait_ms`` of an idle engine share one prefill; at most ``max_batch_size`` rows
run, later ones wait. In fp32 a row's greedy output equals running it alone, and a seeded
request's output depends on its seed only. Adapter changes run between decode steps, each
once the rows of its guild have finished (``_StepLoop`` says exactly when).

The micro-batch loop (``continuous = False``, kept for the bench and models the step loop does
not fit): requests that arrive within ``batch_wait_ms`` of the first run as one HF ``generate``
call; rows whose settings differ run in groups one after another, a seeded request alone; a
request or control arriving meanwhile waits for the whole batch.

Streaming: ``generate(req, on_text)`` hands the text so far (decoded at most every
``stream_interval_s``) to the row's callback on its event loop; the step loop does it per row,
the micro-batch loop through a ``_RowStreamer`` passed to ``generate``. Results are the same
with and without it.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from bot.engine.base import (
    BASE_ADAPTER,
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
    # What it changes, for the step loop: ("activate" | "deactivate", guild); None: unknown
    # (waits for every running row).
    target: tuple[str, int] | None = None


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

    # Continuous batching (the step loop, ``_StepLoop``): requests join and leave the running
    # batch between decode steps. False: the micro-batch loop (one HF ``generate`` per batch, a
    # newcomer waits for the whole batch), kept for the bench. Read when the engine starts.
    continuous = True

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
        # For tests and the bench: how many generate calls (step loop: how many prefills, i.e.
        # groups of requests admitted together) and decode steps (step loop only).
        self.batches_run = 0
        self.steps_run = 0
        # Step loop only: called on the model thread after each decode step with steps_run
        # (tests use it to let a request arrive at a known step).
        self.step_hook: Callable[[int], None] | None = None
        self.rows_running = 0  # step loop: rows still running after the last decode step
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
        """Stop the model thread after the current batch (step loop: once what was queued
        before has finished) and join it."""
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
        await self._control(lambda: self._slots.activate(guild_id, version, p, prepared),
                            ("activate", guild_id))

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
        await self._control(lambda: self._slots.deactivate(guild_id), ("deactivate", guild_id))

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

    async def _control(self, fn: Callable[[], Any],
                       target: tuple[str, int] | None = None) -> Any:
        if self._thread is None or self._closed:
            raise EngineError("engine is not running (call start() first, or it was closed)")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._queue.put(_CtlItem(fn, fut, loop, target))
        return await fut

    # -- model thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        import torch

        log.debug("model thread started (torch threads: %d)", torch.get_num_threads())
        try:
            if self.continuous and _StepLoop.fits(self._loaded.model):
                _StepLoop(self).run()
            else:
                self._run_batched()
        finally:
            # Fail whatever is still queued so no caller waits forever.
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if isinstance(item, (_GenItem, _CtlItem)):
                    _resolve(item.loop, item.fut, exc=EngineError("engine closed"))
            log.debug("model thread stopped")

    def _run_batched(self) -> None:
        """The micro-batch loop (``continuous = False``): one ``generate`` call per batch; a
        request or control arriving meanwhile waits for the whole batch."""
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

    def _run_batch(self, items: list[_GenItem]) -> None:
        items = [it for it in items if not it.fut.done()]
        needed = {it.req.guild_id for it in items if self._slots.wants(it.req.guild_id)}
        rows: list[_Row] = []
        for it in items:
            try:
                max_new, temp, top_p, rep = it.req.settings(self._cfg)
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


# -- continuous batching ------------------------------------------------------------------------

@dataclass
class _Live:
    """A request in the step loop: prompt, adapter, settings, and the tokens generated so far."""

    item: _GenItem
    ids: list[int]
    adapter: str
    version: int | None
    max_new: int
    temp: float
    top_p: float
    rep: float
    gen: Any = None  # the torch.Generator of a seeded sampling row (else the global RNG)
    out: list[int] = field(default_factory=list)
    next_stream: float = 0.0
    streamed: str = ""
    done: bool = False

    @property
    def guild(self) -> int | None:
        return self.item.req.guild_id


class _StepLoop:
    """Continuous batching: the model thread's loop when ``LocalEngine.continuous`` (default).

    Between decode steps the loop takes what arrived: requests wait in arrival order, controls
    (activate, deactivate) too. Each step:

    1. controls that may run now run (see below);
    2. waiting requests join while fewer than ``max_batch_size`` rows run: they are prefilled
       together (left padded, their own forward) and their KV cache is merged into the running
       one (the narrower side left padded with zeros, masked out), each gets its first token;
    3. one forward over all running rows (one new token each, ``adapter_names`` one per row,
       explicit ``position_ids`` and attention mask), each row picks its token with its own
       settings (repetition penalty, temperature, top-k/top-p, its own generator when seeded);
    4. rows at end-of-sequence or their ``max_new`` leave (their cache rows are dropped, and
       cache columns no row uses any more), their results are sent.

    In fp32 a row's greedy output equals running it alone (the padding is masked), and a
    seeded sampling row's output depends only on its seed (sampling as HF generate: top-k from
    the model's generation config, 50 when unset). The cache holds at most ``max_batch_size``
    rows and is as wide as the longest running row (prompt and tokens so far) needs.

    Adapter changes between steps: a row finishes on the adapter weights it started with.
    A control for guild g (hot swap, load, deactivate) runs once no row of g runs and no
    request of g that arrived before it waits; requests of g that arrive after it wait for it
    (so a busy guild cannot starve its swap). Rows of other guilds keep decoding meanwhile. A
    control that may evict another guild's adapter (a load when the slots are full) or whose
    target is unknown waits until no row runs at all, and holds every later request meanwhile.
    Requests load evicted adapters on admission with every running guild protected.
    """

    @staticmethod
    def fits(model: Any) -> bool:
        """Whether this loop can drive the model: a decoder taking ``cache``, ``position_ids``
        and ``logits_to_keep`` whose cache is made of plain growing layers (no sliding window
        or linear attention layers); else the engine uses the micro-batch loop."""
        import inspect

        from transformers.cache_utils import DynamicCache, DynamicLayer

        try:
            params = inspect.signature(model.forward).parameters
            cache = DynamicCache(config=model.config)
        except Exception:  # noqa: BLE001
            return False
        ok = {"cache", "position_ids", "attention_mask", "logits_to_keep"} <= set(params) and \
            all(type(layer) is DynamicLayer for layer in cache.layers)
        if not ok:
            log.warning("model %s does not fit the continuous batching loop; micro-batching",
                        type(model).__name__)
        return ok

    def __init__(self, eng: LocalEngine) -> None:
        import torch

        self.torch = torch
        self.eng = eng
        self.dev = eng._loaded.device
        self.rows: list[_Live] = []
        self.cache: Any = None  # DynamicCache of the running rows
        self.mask: Any = None  # (rows, cache width) long: 1 where the row has a real token
        self.waiting: list[tuple[int, _GenItem]] = []  # (arrival number, item), in order
        self.controls: list[tuple[int, _CtlItem]] = []
        self.seq = 0
        self.stopping = False
        self._hooks: tuple[list[str], Any] | None = None  # (adapter names, peft hook context)
        self.eos = set(eng._eos)
        top_k = getattr(eng._loaded.model.generation_config, "top_k", None)
        self.top_k = int(top_k) if top_k is not None else 50  # HF generate's default

    def run(self) -> None:
        try:
            while True:
                busy = bool(self.rows or self.waiting or self.controls)
                if not busy and self.stopping:
                    return
                if not self.rows:
                    self._unhook()  # before the thread blocks: nothing hooked while idle
                self._take(block=not busy)
                try:
                    self._run_controls()
                    self._admit()
                    if self.rows:
                        self._step()
                except Exception as exc:  # a bug or OOM must fail the requests, not the thread
                    log.exception("step over %d rows failed", len(self.rows))
                    self._unhook()
                    self._fail(self.rows, exc)
                    self.rows, self.cache, self.mask = [], None, None
        finally:
            self._unhook()
            # Only after an error that escaped the loop: nobody may wait forever.
            err = EngineError("engine closed")
            for r in self.rows:
                _resolve(r.item.loop, r.item.fut, exc=err)
            for _, item in [*self.waiting, *self.controls]:
                _resolve(item.loop, item.fut, exc=err)

    # -- arrivals and controls ------------------------------------------------------------------

    def _take(self, block: bool) -> None:
        """Move what is queued to ``waiting``/``controls``; when idle, wait for the first item
        and then up to ``batch_wait_ms`` for more requests (they share one prefill). Nothing
        is taken after the stop marker: it fails in ``LocalEngine._run``."""
        if self.stopping:
            return
        q = self.eng._queue
        if block:
            item = q.get()
            if not self._put(item):
                return
            if isinstance(item, _GenItem):
                deadline = time.monotonic() + self.eng._cfg.batch_wait_ms / 1000
                while len(self.waiting) < self.eng._cfg.max_batch_size:
                    timeout = deadline - time.monotonic()
                    try:
                        nxt = q.get(timeout=timeout) if timeout > 0 else q.get_nowait()
                    except queue.Empty:
                        break
                    if not self._put(nxt) or not isinstance(nxt, _GenItem):
                        break
        while not self.stopping:
            try:
                nxt = q.get_nowait()
            except queue.Empty:
                return
            self._put(nxt)

    def _put(self, item: Any) -> bool:
        if item is _STOP:
            self.stopping = True
            return False
        self.seq += 1
        if isinstance(item, _CtlItem):
            self.controls.append((self.seq, item))
        else:
            self.waiting.append((self.seq, item))
        return True

    def _scope(self, ctl: _CtlItem) -> int | None:
        """The guild whose rows a control must not run under; None: every guild's."""
        if ctl.target is None:
            return None
        kind, guild = ctl.target
        if kind == "activate":
            resident = self.eng._slots.resident()
            cap = self.eng._cfg.max_resident_adapters
            # A load into full slots evicts another guild's adapter (so may a failed swap's
            # rebuild when the slots are over their cap).
            full = len(resident) > cap if guild in resident else len(resident) >= cap
            if full:
                return None
        return guild

    def _run_controls(self) -> None:
        running = {r.guild for r in self.rows}
        held_all, held = False, set()
        left = []
        for seq, ctl in self.controls:
            scope = self._scope(ctl)
            if scope is None:
                ok = not held_all and not self.rows and \
                    not any(s < seq for s, _ in self.waiting)
            else:
                ok = not held_all and scope not in held and scope not in running and \
                    not any(s < seq and it.req.guild_id == scope for s, it in self.waiting)
            if ok:
                self._unhook()  # a control may add, swap or delete adapters
                self.eng._run_control(ctl)
                continue
            left.append((seq, ctl))
            if scope is None:
                held_all = True
            else:
                held.add(scope)
        self.controls = left

    def _held(self, seq: int, guild: int | None, scopes: list[tuple[int, int | None]]) -> bool:
        """Whether a request must wait for a control that arrived before it."""
        return any(s < seq and (scope is None or scope == guild) for s, scope in scopes)

    # -- admission ------------------------------------------------------------------------------

    def _admit(self) -> None:
        eng = self.eng
        room = eng._cfg.max_batch_size - len(self.rows)
        if room <= 0 or not self.waiting:
            return
        scopes = [(s, self._scope(c)) for s, c in self.controls]
        take: list[tuple[int, _GenItem]] = []
        keep: list[tuple[int, _GenItem]] = []
        for seq, it in self.waiting:
            if it.fut.done():  # cancelled while waiting
                continue
            if len(take) < room and not self._held(seq, it.req.guild_id, scopes):
                take.append((seq, it))
            else:
                keep.append((seq, it))
        self.waiting = keep
        if not take:
            return
        self._unhook()  # admission may load or evict adapters
        protect = {r.guild for r in self.rows} | {it.req.guild_id for _, it in take}
        new: list[_Live] = []
        for _, it in take:
            try:
                max_new, temp, top_p, rep = it.req.settings(eng._cfg)
                if max_new < 1:
                    raise ValueError("max_new_tokens must be at least 1")
                ids = eng.prompt_ids(it.req.messages, max_new)
                name, version = eng._slots.serving(it.req.guild_id, protect)
            except Exception as exc:
                log.warning("request for guild %s refused: %s", it.req.guild_id, exc)
                _resolve(it.loop, it.fut, exc=EngineError(f"bad request: {exc}"))
                continue
            gen = None
            if temp > 0 and it.req.seed is not None:
                gen = self.torch.Generator(device=self.dev).manual_seed(it.req.seed)
            new.append(_Live(it, ids, name, version, max_new, temp, top_p, rep, gen))
        if not new:
            return
        try:
            cache, mask, logits = self._prefill(new)
        except Exception as exc:
            log.exception("prefill of %d rows failed", len(new))
            self._fail(new, exc)
            return
        eng.batches_run += 1
        try:
            self._merge(new, cache, mask)
        except Exception as exc:
            log.exception("merging %d rows into the batch failed", len(new))
            self._fail(self.rows + new, exc)
            self.rows, self.cache, self.mask = [], None, None
            return
        self._advance(new, self._pick(new, logits))
        self._retire()

    def _prefill(self, rows: list[_Live]) -> tuple[Any, Any, Any]:
        from transformers.cache_utils import DynamicCache

        torch = self.torch
        width = max(len(r.ids) for r in rows)
        ids = torch.full((len(rows), width), self.eng._pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):  # left padding: every row's last prompt token aligned
            ids[i, width - len(r.ids):] = torch.tensor(r.ids, dtype=torch.long)
            mask[i, width - len(r.ids):] = 1
        ids, mask = ids.to(self.dev), mask.to(self.dev)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.eng._loaded.model.config)
        with torch.inference_mode():
            logits = self._forward(rows, ids, mask, pos, cache)
            if not bool(mask.all()):
                # Padding positions hold whatever the model computed there; they are masked,
                # but zeros keep a NaN from ever reaching a real row (0 * NaN is NaN).
                keep = mask.bool()[:, None, :, None]
                for layer in cache.layers:
                    layer.keys = torch.where(keep, layer.keys, 0)
                    layer.values = torch.where(keep, layer.values, 0)
        return cache, mask, logits

    def _merge(self, rows: list[_Live], cache: Any, mask: Any) -> None:
        """Append prefilled rows to the running batch (both sides right aligned)."""
        torch = self.torch
        if not self.rows:
            self.rows, self.cache, self.mask = list(rows), cache, mask
            return
        from torch.nn.functional import pad

        wa, wb = self.mask.shape[1], mask.shape[1]
        w = max(wa, wb)
        with torch.inference_mode():
            for la, lb in zip(self.cache.layers, cache.layers, strict=True):
                la.keys = torch.cat([pad(la.keys, (0, 0, w - wa, 0)),
                                     pad(lb.keys, (0, 0, w - wb, 0))])
                la.values = torch.cat([pad(la.values, (0, 0, w - wa, 0)),
                                       pad(lb.values, (0, 0, w - wb, 0))])
            self.mask = torch.cat([pad(self.mask, (w - wa, 0)), pad(mask, (w - wb, 0))])
        self.rows += rows

    # -- decoding -------------------------------------------------------------------------------

    def _forward(self, rows: list[_Live], ids: Any, mask: Any, pos: Any, cache: Any,
                 keep_hooks: bool = False) -> Any:
        """Logits (rows, vocab) in fp32 of each row's last input position; updates ``cache``.

        peft routes rows to adapters with forward hooks on every LoRA layer, registered per
        call (about 10 ms a step on SmolLM2 on 2 CPU cores). With ``keep_hooks`` (decode steps)
        they stay registered while the rows' adapter names stay the same; ``_unhook`` removes
        them before anything else touches the model (controls, admissions)."""
        eng = self.eng
        kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "position_ids": pos,
                                  "cache": cache, "use_cache": True, "logits_to_keep": 1}
        peft = eng._adapters.model
        if peft is not None and eng._slots.resident():
            names = [r.adapter for r in rows]
            if keep_hooks and hasattr(peft, "_enable_peft_forward_hooks"):
                if self._hooks is None or self._hooks[0] != names:
                    self._unhook()
                    ctx = peft._enable_peft_forward_hooks(adapter_names=names)
                    ctx.__enter__()
                    self._hooks = (names, ctx)
                out = peft.get_base_model()(**kwargs)
            else:
                self._unhook()
                out = peft(**kwargs, adapter_names=names)
        else:
            self._unhook()
            if any(r.adapter != BASE_ADAPTER for r in rows):
                raise EngineError("a row's adapter is not loaded")
            # No adapter resident: the (possibly LoRA-injected, but empty) base model.
            out = eng._loaded.model(**kwargs)
        return out.logits[:, -1, :].float()

    def _unhook(self) -> None:
        """Remove the adapter routing hooks kept by ``_forward``, if any."""
        if self._hooks is not None:
            ctx, self._hooks = self._hooks[1], None
            ctx.__exit__(None, None, None)

    def _step(self) -> None:
        """One new token for every running row."""
        torch = self.torch
        rows = self.rows
        with torch.inference_mode():
            last = torch.tensor([[r.out[-1]] for r in rows], dtype=torch.long, device=self.dev)
            pos = torch.tensor([[len(r.ids) + len(r.out) - 1] for r in rows], dtype=torch.long,
                               device=self.dev)
            self.mask = torch.cat([self.mask, self.mask.new_ones((len(rows), 1))], dim=1)
            logits = self._forward(rows, last, self.mask, pos, self.cache, keep_hooks=True)
        self.eng.steps_run += 1
        self._advance(rows, self._pick(rows, logits))
        self._retire()
        self.eng.rows_running = len(self.rows)
        hook = self.eng.step_hook
        if hook is not None:
            hook(self.eng.steps_run)

    def _pick(self, rows: list[_Live], logits: Any) -> list[int]:
        """Each row's next token with its own settings, in the order of HF generate's logits
        processors: repetition penalty, then (sampling) temperature, top-k, top-p."""
        torch = self.torch
        greedy = logits.argmax(-1).tolist()
        toks = []
        for i, r in enumerate(rows):
            if r.temp <= 0 and r.rep == 1.0:
                toks.append(int(greedy[i]))
                continue
            s = logits[i]
            if r.rep != 1.0:  # as RepetitionPenaltyLogitsProcessor, over the row's own tokens
                seen = torch.tensor(r.ids + r.out, dtype=torch.long, device=s.device)
                sc = s.gather(0, seen)
                s = s.scatter(0, seen, torch.where(sc < 0, sc * r.rep, sc / r.rep))
            if r.temp <= 0:
                toks.append(int(s.argmax()))
                continue
            s = s / r.temp
            if 0 < self.top_k < s.numel():
                kth = torch.topk(s, self.top_k).values[-1]
                s = s.masked_fill(s < kth, float("-inf"))
            if r.top_p < 1.0:
                sorted_s, order = torch.sort(s, descending=False)
                drop = sorted_s.softmax(-1).cumsum(-1) <= (1 - r.top_p)
                drop[-1] = False  # keep at least one token
                s = s.masked_fill(drop.scatter(0, order, drop), float("-inf"))
            toks.append(int(torch.multinomial(s.softmax(-1), 1, generator=r.gen)))
        return toks

    def _advance(self, rows: list[_Live], toks: list[int]) -> None:
        """Append each row's token; mark finished rows; stream the others' text."""
        eng = self.eng
        now = time.monotonic()
        for r, t in zip(rows, toks, strict=True):
            r.out.append(t)
            # Done at end-of-sequence, at max_new, or when its caller cancelled it.
            if t in self.eos or len(r.out) >= r.max_new or r.item.fut.done():
                r.done = True
            elif r.item.on_text is not None and now >= r.next_stream:
                # The final text is the result's; stream only what comes before it.
                r.next_stream = now + eng.stream_interval_s
                try:
                    text = eng._tok.decode(r.out, skip_special_tokens=True)
                    text = text.rstrip("\ufffd").strip()
                    if text and text != r.streamed:
                        r.streamed = text
                        r.item.loop.call_soon_threadsafe(_call_on_text, r.item.on_text, text)
                except Exception:  # a closed loop, a decode error: the row still gets its result
                    log.exception("streaming failed; the row still gets its result")
                    r.item.on_text = None

    def _retire(self) -> None:
        """Send finished rows their results and drop them (and unused columns) from the cache."""
        done = [r for r in self.rows if r.done]
        if not done:
            return
        torch = self.torch
        self._unhook()  # the rows change, and trim below may delete adapters
        keep = [i for i, r in enumerate(self.rows) if not r.done]
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache = self.mask = None
        else:
            with torch.inference_mode():
                idx = torch.tensor(keep, dtype=torch.long, device=self.dev)
                mask = self.mask.index_select(0, idx)
                first = int(mask.any(0).long().argmax())  # columns before it: padding only
                for layer in self.cache.layers:
                    layer.keys = layer.keys.index_select(0, idx)[:, :, first:]
                    layer.values = layer.values.index_select(0, idx)[:, :, first:]
                self.mask = mask[:, first:]
        try:  # evict over-cap adapters before answering, so callers see a settled state
            self.eng._slots.trim({r.guild for r in self.rows})
        except Exception:
            log.exception("evicting adapters failed")
        now = time.perf_counter()
        tok = self.eng._tok
        for r in done:
            text = tok.decode(r.out, skip_special_tokens=True).strip() or FALLBACK_TEXT
            _resolve(r.item.loop, r.item.fut, GenerationResult(
                text, r.version, len(r.ids), len(r.out), (now - r.item.t0) * 1000))

    def _fail(self, rows: list[_Live], exc: BaseException) -> None:
        err = EngineError(f"generation failed: {type(exc).__name__}: {exc}")
        for r in rows:
            _resolve(r.item.loop, r.item.fut, exc=err)
