"""Continuous batching for ``LocalEngine``: ``StepLoop``, the model thread's decode loop.

See ``StepLoop``'s docstring for the rules (joining between decode steps, leaving at the end,
adapter changes between steps). It drives the engine's model, adapter slots and queue; the engine
(bot/engine/local.py) starts it on its model thread and keeps the micro-batch loop for models
it does not fit. Over 400 lines on purpose: admission, the cache merge, the forward and the
sampling share the loop's state.
"""

from __future__ import annotations

import logging
import queue
import time
from dataclasses import dataclass, field
from typing import Any

from bot.engine.base import (
    BASE_ADAPTER,
    FALLBACK_TEXT,
    EngineError,
    GenerationResult,
    penalized_tokens,
    stopped_by_length,
)
from bot.engine.handoff import STOP, CtlItem, GenItem, call_on_text, resolve

log = logging.getLogger(__name__)


@dataclass
class _Live:
    """A request in the step loop: prompt, adapter, settings, and the tokens generated so far."""

    item: GenItem
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
    err: EngineError | None = None  # why the row failed (it leaves with this error)

    @property
    def guild(self) -> int | None:
        return self.item.req.guild_id


class StepLoop:
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
    load into full slots evicts only adapters no running row uses (``AdapterSlots.pinned``);
    when every other resident adapter serves a running row, or the target is unknown, the
    control waits until no row runs at all and holds every later request meanwhile. Requests
    load evicted adapters on admission with every running guild protected. Requests and
    controls whose caller gave up are dropped between steps (they hold nothing).

    Failures: a row whose logits are NaN or whose sampling or final decode fails gets an
    EngineError alone; a forward or cache error fails every running row. On close (the stop
    marker) requests and controls not yet started fail with EngineError("engine closed"); the
    running rows finish.
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

    def __init__(self, eng: Any) -> None:  # the LocalEngine that owns the thread
        import torch

        self.torch = torch
        self.eng = eng
        self.dev = eng._loaded.device
        self.rows: list[_Live] = []
        self.cache: Any = None  # DynamicCache of the running rows
        self.mask: Any = None  # (rows, cache width) long: 1 where the row has a real token
        self.waiting: list[tuple[int, GenItem]] = []  # (arrival number, item), in order
        self.controls: list[tuple[int, CtlItem]] = []
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
                self._prune()
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
                    self.eng.rows_running = 0
        finally:
            self._unhook()
            # Only after an error that escaped the loop: nobody may wait forever.
            err = EngineError("engine closed")
            for r in self.rows:
                resolve(r.item.loop, r.item.fut, exc=err)
            for _, item in [*self.waiting, *self.controls]:
                resolve(item.loop, item.fut, exc=err)

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
            if isinstance(item, GenItem):
                deadline = time.monotonic() + self.eng._cfg.batch_wait_ms / 1000
                while len(self.waiting) < self.eng._cfg.max_batch_size:
                    timeout = deadline - time.monotonic()
                    try:
                        nxt = q.get(timeout=timeout) if timeout > 0 else q.get_nowait()
                    except queue.Empty:
                        break
                    if not self._put(nxt) or not isinstance(nxt, GenItem):
                        break
        while not self.stopping:
            try:
                nxt = q.get_nowait()
            except queue.Empty:
                return
            self._put(nxt)

    def _prune(self) -> None:
        """Drop requests and controls whose caller gave up (they hold nothing any more); once
        stopping, fail what has not started (the running rows finish)."""
        self.waiting = [(s, it) for s, it in self.waiting if not it.fut.done()]
        self.controls = [(s, c) for s, c in self.controls if not c.fut.done()]
        if self.stopping and (self.waiting or self.controls):
            err = EngineError("engine closed")
            for _, item in [*self.waiting, *self.controls]:
                resolve(item.loop, item.fut, exc=err)
            self.waiting, self.controls = [], []

    def _put(self, item: Any) -> bool:
        if item is STOP:
            self.stopping = True
            return False
        self.seq += 1
        if isinstance(item, CtlItem):
            self.controls.append((self.seq, item))
        else:
            self.waiting.append((self.seq, item))
        return True

    def _scope(self, ctl: CtlItem) -> int | None:
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
            # It may evict only adapters no running row uses (see _run_controls): it waits for
            # every row only when each other resident adapter serves a running row.
            running = {r.guild for r in self.rows}
            if full and all(g in running for g in resident if g != guild):
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
                slots = self.eng._slots
                slots.pinned = frozenset(running)  # it must not evict a running row's adapter
                try:
                    self.eng._run_control(ctl)
                finally:
                    slots.pinned = frozenset()
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
        take: list[tuple[int, GenItem]] = []
        keep: list[tuple[int, GenItem]] = []
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
            row = eng.row_of(it, protect)
            if row is None:
                continue
            (max_new, temp, top_p, rep), ids, name, version = row
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
            self.eng.rows_running = 0
            return
        self.eng.rows_running = len(self.rows)
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

    def _pick(self, rows: list[_Live], logits: Any) -> list[int | None]:
        """Each row's next token with its own settings, in the order of HF generate's logits
        processors: repetition penalty, then (sampling) temperature, top-k, top-p. A row whose
        logits are NaN (a diverged adapter) or whose sampling fails gets None and ``err``:
        only that row fails."""
        torch = self.torch
        greedy = logits.argmax(-1).tolist()
        nan = torch.isnan(logits).any(-1).tolist()
        toks: list[int | None] = []
        for i, r in enumerate(rows):
            if nan[i]:
                log.warning("guild %s: NaN logits (adapter %s); failing the row", r.guild,
                            r.adapter)
                r.err = EngineError("generation failed: the model's logits are NaN")
                toks.append(None)
            elif r.temp <= 0 and r.rep == 1.0:
                toks.append(int(greedy[i]))
            else:
                try:
                    toks.append(self._sample(r, logits[i]))
                except Exception as exc:
                    log.exception("guild %s: picking a token failed; failing the row", r.guild)
                    r.err = _error(exc)
                    toks.append(None)
        return toks

    def _sample(self, r: _Live, s: Any) -> int:
        """One row's token from its logits ``s`` (vocab,): top-p runs over the top-k survivors
        only (no sort of the whole vocabulary). A seeded row draws over the whole vocabulary
        with HF generate's probabilities (its generator then yields HF's token); an unseeded
        row draws among the survivors (same distribution, no 49k random numbers a row)."""
        torch = self.torch
        if r.rep != 1.0:  # as RepetitionPenaltyLogitsProcessor, over the row's own tokens
            seen = torch.tensor(penalized_tokens(r.ids, r.out, self.eng.unpenalized,
                                                 self.eng.penalty_scope),
                                dtype=torch.long, device=s.device)
            sc = s.gather(0, seen)
            s = s.scatter(0, seen, torch.where(sc < 0, sc * r.rep, sc / r.rep))
        if r.temp <= 0:
            return int(s.argmax())
        s = s / r.temp
        idx = None  # the survivors' token ids; None: the whole vocabulary
        vals = s
        if 0 < self.top_k < s.numel():
            vals, idx = torch.topk(s, self.top_k)
            keep = s >= vals[-1]
            if int(keep.sum()) > self.top_k:  # ties with the k-th: HF keeps them all
                idx = keep.nonzero().squeeze(-1)
                vals = s[idx]
        if r.top_p < 1.0:
            sorted_v, order = torch.sort(vals, descending=False)
            drop = sorted_v.softmax(-1).cumsum(-1) <= (1 - r.top_p)
            drop[-1] = False  # keep at least one token
            vals = vals.masked_fill(drop.scatter(0, order, drop), float("-inf"))
        if idx is not None:
            if r.gen is None:  # the global RNG, never reproducible: draw among the survivors
                return int(idx[torch.multinomial(vals.softmax(-1), 1)])
            # A seeded row draws over the whole vocabulary, as HF generate: the same token.
            vals = torch.full_like(s, float("-inf")).scatter(0, idx, vals)
        return int(torch.multinomial(vals.softmax(-1), 1, generator=r.gen))

    def _advance(self, rows: list[_Live], toks: list[int | None]) -> None:
        """Append each row's token; mark finished (and failed) rows; stream the others' text."""
        eng = self.eng
        now = time.monotonic()
        for r, t in zip(rows, toks, strict=True):
            if t is None:  # failed in _pick
                r.done = True
                continue
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
                        r.item.loop.call_soon_threadsafe(call_on_text, r.item.on_text, text)
                except Exception:  # a closed loop, a decode error: the row still gets its result
                    log.exception("streaming failed; the row still gets its result")
                    r.item.on_text = None

    def _retire(self) -> None:
        """Send finished rows their results (failed rows their error) and drop them (and unused
        columns) from the cache. Each finished row is answered even when the cache trim
        fails (run() then fails the rows still running)."""
        done = [r for r in self.rows if r.done]
        if not done:
            return
        torch = self.torch
        self._unhook()  # the rows change, and trim below may delete adapters
        keep = [i for i, r in enumerate(self.rows) if not r.done]
        self.rows = [self.rows[i] for i in keep]
        self.eng.rows_running = len(self.rows)
        try:
            if not keep:
                self.cache = self.mask = None
            else:
                with torch.inference_mode():
                    idx = torch.tensor(keep, dtype=torch.long, device=self.dev)
                    mask = self.mask.index_select(0, idx)
                    first = int(mask.any(0).long().argmax())  # columns before: padding only
                    for layer in self.cache.layers:
                        layer.keys = layer.keys.index_select(0, idx)[:, :, first:]
                        layer.values = layer.values.index_select(0, idx)[:, :, first:]
                    self.mask = mask[:, first:]
            try:  # evict over-cap adapters before answering, so callers see a settled state
                self.eng._slots.trim({r.guild for r in self.rows})
            except Exception:
                log.exception("evicting adapters failed")
        finally:
            now = time.perf_counter()
            for r in done:
                self._send(r, now)

    def _send(self, r: _Live, now: float) -> None:
        """Answer a finished row: its result, or its error (its own, or its text's decode's)."""
        if r.err is not None:
            resolve(r.item.loop, r.item.fut, exc=r.err)
            return
        try:
            text = self.eng._tok.decode(r.out, skip_special_tokens=True).strip()
        except Exception as exc:
            log.exception("decoding a finished row failed")
            resolve(r.item.loop, r.item.fut, exc=_error(exc))
            return
        cut = stopped_by_length(r.out, r.max_new, self.eos)
        resolve(r.item.loop, r.item.fut, GenerationResult(
            text or FALLBACK_TEXT, r.version, len(r.ids), len(r.out), (now - r.item.t0) * 1000,
            cut=cut))

    def _fail(self, rows: list[_Live], exc: BaseException) -> None:
        err = _error(exc)
        for r in rows:
            resolve(r.item.loop, r.item.fut, exc=err)


def _error(exc: BaseException) -> EngineError:
    """The one-line EngineError a caller gets for a failed generation."""
    msg = " ".join(str(exc).split())
    return EngineError(f"generation failed: {type(exc).__name__}: {msg}")
