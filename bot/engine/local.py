"""LocalEngine: the model in this process, one thread that owns it, batching across guilds.

One dedicated thread owns the model and every operation on it (generation, adapter load, hot
swap, eviction), so the event loop never runs model code and no row ever sees half a swap.
Which adapter serves which guild is decided by ``AdapterSlots`` (bot/engine/slots.py); this
module holds the peft side of it (``PeftAdapters``).

Batching (default, ``LocalEngine.continuous``): continuous batching in ``StepLoop``, our own
decode loop. A request joins the running batch at the next decode step (prefilled, its KV cache
merged into the batch's) and leaves it at its end-of-sequence or ``max_new_tokens``; one
forward per step over all running rows, with peft's ``adapter_names`` (one adapter per row,
``__base__`` for a guild without one) and each row's own settings (repetition penalty,
temperature, top-k/top-p, its own generator when seeded). Requests that arrive together
within ``batch_wait_ms`` of an idle engine share one prefill; at most ``max_batch_size`` rows
run, later ones wait. In fp32 a row's greedy output equals running it alone, and a seeded
request's output depends on its seed only. Adapter changes run between decode steps, each
once the rows of its guild have finished (``StepLoop`` says exactly when).

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

Over 400 lines on purpose: the model-owning thread, the micro-batch loop and its generation
share the thread's state. The adapter decisions live in ``AdapterSlots`` (slots.py), the peft
side in ``PeftAdapters`` (peft_adapters.py), the step loop in ``StepLoop`` (steploop.py), the
items handed between the event loop and the thread in handoff.py.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Collection
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
    penalized_tokens,
    stopped_by_length,
)
from bot.engine.handoff import STOP, CtlItem, GenItem, call_on_text, resolve
from bot.engine.peft_adapters import PeftAdapters, PreparedAdapter
from bot.engine.slots import AdapterSlots
from bot.engine.steploop import StepLoop
from guildtune.adapter_dir import validate_adapter_dir
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


@dataclass
class _Row:
    item: GenItem
    ids: list[int]
    adapter: str
    version: int | None
    max_new: int
    key: tuple[Any, ...]


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
                    row.item.loop.call_soon_threadsafe(call_on_text, row.item.on_text, text)
            self._rows = live
        except Exception:  # a closed loop, a decode error: streaming stops, generation goes on
            log.exception("streaming failed; the rows still get their results")
            self._rows = []

    def end(self) -> None:
        self._rows = []


def _scoped_penalty(penalty: float, spare: set[int], width: int, scope: str) -> Any:
    """The repetition penalty over ``penalized_tokens`` (the step loop's rule) for the
    micro-batch loop's ``generate``: the first ``width`` ids of each row are its (left-padded)
    prompt."""
    import torch
    from transformers import LogitsProcessor

    class ScopedRepetitionPenalty(LogitsProcessor):
        def __call__(self, input_ids: Any, scores: Any) -> Any:
            for i, row in enumerate(input_ids.tolist()):
                seen = penalized_tokens(row[:width], row[width:], spare, scope)
                if not seen:
                    continue
                idx = torch.tensor(seen, dtype=torch.long, device=scores.device)
                sc = scores[i].gather(0, idx)
                scores[i] = scores[i].scatter(0, idx, torch.where(sc < 0, sc * penalty,
                                                                  sc / penalty))
            return scores

    return ScopedRepetitionPenalty()


class LocalEngine(Engine):
    """In-process engine: a model thread, micro-batching across guilds, resident adapters (LRU)."""

    # Continuous batching (the step loop, ``StepLoop``): requests join and leave the running
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
        # Which tokens the repetition penalty lowers (``base.PENALTY_SCOPES``; the others are
        # for bench/style.py).
        self.penalty_scope = "reply"
        # Streaming: decode a streaming row's text at most this often.
        self.stream_interval_s = 0.1
        self._eos = self._eos_ids()
        self._pad = (self._tok.pad_token_id if self._tok.pad_token_id is not None
                     else self._eos[0])
        # Tokens the "turns" penalty scope spares: end of turn and padding (penalized_tokens).
        self.unpenalized = {*self._eos, self._pad}
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
        """Stop the model thread and join it: the micro-batch loop after its current batch; the
        step loop once its running rows have finished (requests and controls still queued
        fail with EngineError)."""
        if self._thread is None:
            return
        self._closed = True
        self._queue.put(STOP)
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
        self._queue.put(GenItem(req, fut, loop, time.perf_counter(), on_text))
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
        self._queue.put(CtlItem(fn, fut, loop, target))
        return await fut

    # -- model thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        import torch

        log.debug("model thread started (torch threads: %d)", torch.get_num_threads())
        try:
            if self.continuous and StepLoop.fits(self._loaded.model):
                StepLoop(self).run()
            else:
                self._run_batched()
        finally:
            # Fail whatever is still queued so no caller waits forever.
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if isinstance(item, (GenItem, CtlItem)):
                    resolve(item.loop, item.fut, exc=EngineError("engine closed"))
            log.debug("model thread stopped")

    def _run_batched(self) -> None:
        """The micro-batch loop (``continuous = False``): one ``generate`` call per batch; a
        request or control arriving meanwhile waits for the whole batch."""
        stop = False
        while not stop:
            item = self._queue.get()
            if item is STOP:
                break
            if isinstance(item, CtlItem):
                self._run_control(item)
                continue
            batch, deferred = self._collect(item)
            try:
                self._run_batch(batch)
            except Exception as exc:  # a bug or OOM must fail the requests, not the thread
                log.exception("batch of %d failed", len(batch))
                err = EngineError(f"generation failed: {type(exc).__name__}: {exc}")
                for it in batch:
                    resolve(it.loop, it.fut, exc=err)
            for d in deferred:
                if d is STOP:
                    stop = True
                else:
                    self._run_control(d)

    def _collect(self, first: GenItem) -> tuple[list[GenItem], list[Any]]:
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
            if isinstance(nxt, GenItem):
                batch.append(nxt)
            else:
                deferred.append(nxt)
                break
        return batch, deferred

    def _run_control(self, item: CtlItem) -> None:
        t0 = time.perf_counter()
        try:
            value = item.fn()
        except Exception as exc:
            self.last_control_ms = (time.perf_counter() - t0) * 1000
            if not isinstance(exc, (AdapterError, EngineError)):
                log.exception("engine control operation failed")
                exc = EngineError(f"{type(exc).__name__}: {exc}")
            resolve(item.loop, item.fut, exc=exc)
        else:
            self.last_control_ms = (time.perf_counter() - t0) * 1000
            resolve(item.loop, item.fut, value)

    def row_of(self, it: GenItem, protect: Collection[int | None]
               ) -> tuple[tuple[int, float, float, float], list[int], str, int | None] | None:
        """A request's settings, prompt ids, adapter name and version, the adapter loaded if it
        was evicted (never one of ``protect``'s); None after refusing a bad request (its caller
        gets an EngineError). Both loops admit requests through here. Model thread only."""
        try:
            settings = it.req.settings(self._cfg)
            if settings[0] < 1:
                raise ValueError("max_new_tokens must be at least 1")
            ids = self.prompt_ids(it.req.messages, settings[0])
            name, version = self._slots.serving(it.req.guild_id, protect)
        except Exception as exc:
            log.warning("request for guild %s refused: %s", it.req.guild_id, exc)
            resolve(it.loop, it.fut, exc=EngineError(f"bad request: {exc}"))
            return None
        return settings, ids, name, version

    def _run_batch(self, items: list[GenItem]) -> None:
        items = [it for it in items if not it.fut.done()]
        needed = {it.req.guild_id for it in items if self._slots.wants(it.req.guild_id)}
        rows: list[_Row] = []
        for it in items:
            row = self.row_of(it, needed)
            if row is None:
                continue
            (max_new, temp, top_p, rep), ids, name, version = row
            # Same settings share a generate call; a seeded request runs alone to be reproducible.
            key: tuple[Any, ...] = (temp > 0, temp if temp > 0 else 0.0,
                                    top_p if temp > 0 else 1.0, rep,
                                    (it.req.seed, id(it)) if it.req.seed is not None else None)
            rows.append(_Row(it, ids, name, version, max_new, key))
        groups: dict[tuple[Any, ...], list[_Row]] = {}
        for r in rows:
            groups.setdefault(r.key, []).append(r)
        done: list[tuple[GenItem, GenerationResult]] = []
        for group in groups.values():
            done += self._generate(group)
        # Evict over-cap adapters before answering, so callers see a settled state.
        self._slots.trim()
        for it, res in done:
            resolve(it.loop, it.fut, res)

    def _generate(self, rows: list[_Row]) -> list[tuple[GenItem, GenerationResult]]:
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
            "pad_token_id": self._pad, "eos_token_id": self._eos,
        }
        if rep != 1.0:  # HF's own would lower the prompt's tokens too (penalized_tokens)
            kwargs["logits_processor"] = [_scoped_penalty(rep, self.unpenalized, width,
                                                          self.penalty_scope)]
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
            cut = stopped_by_length(toks[:n], r.max_new, self._eos)
            done.append((r.item, GenerationResult(text, r.version, len(r.ids), n,
                                                  (now - r.item.t0) * 1000, cut=cut)))
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
