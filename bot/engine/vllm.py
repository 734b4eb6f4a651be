"""VllmEngine: the engine as a client of a vLLM OpenAI-compatible server with multi-LoRA.

For deployments that outgrow one machine: vLLM batches and schedules, this client only routes.
Start the server with ``guildtune vllm`` (guildtune/vllm_server.py builds its flags from the
config), set ``model.backend = "vllm"`` and ``model.vllm_url``. Adapter directories must be
readable by the server at the same absolute path (a shared mount of the data dir).

Prompts: the bot renders the chat to token ids itself, with the same template, escaping and
budget rule as the local engine and the trainer (``guildtune.prompting.prompt_ids_within``), and
sends the ids to ``/v1/completions``; so a member's typed ``<|im_start|>`` stays text, the
prompt never exceeds the server's ``max_model_len``, and served prompts are the trained ones.

Adapters: each version gets its own name, ``<instance>-g<guild>-v<version>``, where the instance
names the data directory the adapters come from (``instance_id``): bots with their own data never
touch each other's adapters on a shared server, bots sharing one data dir (shards) share names.
``activate`` loads the new name (``POST /v1/load_lora_adapter``; a name the server already holds,
from an earlier run, is reloaded in place from our path), routes new requests to it, and unloads
the guild's other names once the requests already sent with them have finished. At start the
client lists the server's adapters (``GET /v1/models``); what an earlier run left for guilds
that no longer have a version goes at the watcher's first sync (``release_others``). A request
whose adapter the server no longer knows (the server restarted) reloads it, once for all the
requests that found it missing, and retries; if it cannot be reloaded, the base model answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp

from bot.engine.base import (
    FALLBACK_TEXT,
    AdapterError,
    Engine,
    EngineError,
    GenerationRequest,
    GenerationResult,
    OnText,
)
from guildtune.adapter_dir import validate_adapter_dir
from guildtune.prompting import prompt_ids_within, serving_budget, special_strings

if TYPE_CHECKING:
    from guildtune.config import LoraConfig, ModelConfig

log = logging.getLogger(__name__)

def instance_id(data_dir: Path | str) -> str:
    """A short, stable name for the data directory adapters are served from."""
    return hashlib.sha256(str(Path(data_dir).expanduser().absolute()).encode()).hexdigest()[:8]


def lora_name(instance: str, guild_id: int, version: int) -> str:
    """The server-side adapter name of one version (new name per version: no cache confusion)."""
    return f"{instance}-g{guild_id}-v{version}"


def _server_message(body: str) -> str:
    """One line from a vLLM/OpenAI error body ({"error": {"message": ...}} or {"message": ...})."""
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    msg: Any = body
    if isinstance(data, dict):
        err = data.get("error")
        msg = (err.get("message") if isinstance(err, dict) else err) or data.get("message") or body
    return " ".join(str(msg).split())[:300] or "(empty body)"


class _HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class VllmEngine(Engine):
    """HTTP client of a vLLM server; same contract as LocalEngine."""

    def __init__(self, model_cfg: ModelConfig, lora_cfg: LoraConfig, tokenizer: Any, *,
                 instance: str, timeout_s: float = 120.0, base_id: str | None = None) -> None:
        self._cfg = model_cfg
        self._lora = lora_cfg
        self._tok = tokenizer
        self._specials = special_strings(tokenizer)
        self._eos = sorted({int(tokenizer.eos_token_id)} if tokenizer.eos_token_id is not None
                           else set())
        self._url = model_cfg.vllm_url.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._base_name = model_cfg.name  # replaced by the served name found at start()
        self._max_len = model_cfg.max_context_tokens  # lowered to the server's at start()
        # Adapters are checked against this base id when their dir is readable here.
        self._base_id = base_id
        self._instance = instance
        self._name_re = re.compile(rf"^{re.escape(instance)}-g(\d+)-v(\d+)$")
        self._session: aiohttp.ClientSession | None = None
        self._reloads: dict[str, asyncio.Future[None]] = {}  # name -> its reload in progress
        self._current: dict[int, tuple[int, str, Path]] = {}  # guild -> (version, name, dir)
        self._loaded: set[str] = set()  # our adapter names the server holds (as far as we know)
        self._inflight: dict[str, int] = defaultdict(int)
        self._idle = asyncio.Condition()
        self._locks: dict[int, asyncio.Lock] = defaultdict(asyncio.Lock)

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the HTTP session; find the served base model, its context length and the
        adapters a previous run left on the server (GET /v1/models)."""
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        body = await self._call("GET", "/v1/models", None, EngineError, "list models")
        try:
            models = json.loads(body)["data"]
            bases = [m for m in models if not m.get("parent")]
            names = {m["id"]: m.get("parent") for m in models if m.get("parent")}
        except (ValueError, KeyError, TypeError, AttributeError):
            raise EngineError(f"vLLM at {self._url}: /v1/models answered an unexpected body") \
                from None
        base = next((m for m in bases if m.get("id") == self._cfg.name), bases[0] if bases
                    else None)
        if base is not None and base.get("id") != self._cfg.name:
            log.warning("vLLM serves %r, not the configured model.name %r: using %r (start the "
                        "server with `guildtune vllm` to match)", base.get("id"),
                        self._cfg.name, base.get("id"))
        if base is not None:
            self._base_name = str(base["id"])
            server_len = base.get("max_model_len")
            if isinstance(server_len, int) and server_len > 0:
                if server_len < self._cfg.max_context_tokens:
                    log.warning("vLLM's max_model_len %d is under model.max_context_tokens %d: "
                                "prompts are cut to fit it", server_len,
                                self._cfg.max_context_tokens)
                self._max_len = min(server_len, self._cfg.max_context_tokens)
        self._loaded = {n for n, parent in names.items()
                        if parent == self._base_name and self._name_re.match(n)}
        if self._loaded:
            log.info("vLLM already holds %d guildtune adapters; they are reused or unloaded as "
                     "guilds activate", len(self._loaded))

    async def close(self) -> None:
        """Close the HTTP session (server-side adapters stay loaded for the next start)."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- HTTP -----------------------------------------------------------------------------------

    def _where(self, what: str) -> str:
        return f"vLLM at {self._url}: {what}"

    async def _call(self, method: str, route: str, payload: dict[str, Any] | None,
                    error: type[Exception], what: str) -> str:
        try:
            return await self._raw(method, route, payload, what)
        except _HttpError as exc:
            raise error(str(exc)) from None

    @contextlib.asynccontextmanager
    async def _response(self, method: str, route: str, payload: dict[str, Any] | None,
                        what: str) -> AsyncIterator[aiohttp.ClientResponse]:
        """A successful response, open; _HttpError (status, one line) for an error answer;
        EngineError when the server cannot be reached or is too slow, also mid-body."""
        if self._session is None:
            raise EngineError("engine is not running (call start() first, or it was closed)")
        try:
            async with self._session.request(method, self._url + route, json=payload) as resp:
                if resp.status >= 400:
                    raise _HttpError(resp.status, self._where(
                        f"{what} failed with HTTP {resp.status}: "
                        f"{_server_message(await resp.text())}"))
                yield resp
        except TimeoutError:
            raise EngineError(self._where(f"{what} timed out after "
                                          f"{self._timeout.total:.0f} s")) from None
        except aiohttp.ClientError as exc:
            raise EngineError(self._where(f"{what} failed: "
                                          f"{' '.join(str(exc).split()) or type(exc).__name__}")
                              ) from None

    async def _raw(self, method: str, route: str, payload: dict[str, Any] | None,
                   what: str) -> str:
        """The body of a successful response (errors as ``_response``)."""
        async with self._response(method, route, payload, what) as resp:
            return await resp.text()

    async def _stream(self, payload: dict[str, Any], what: str, on_text: OnText
                      ) -> tuple[str, dict[str, Any]]:
        """POST a streamed completion; returns (text, usage), calling ``on_text`` as it grows.
        ``usage`` carries the choice's ``finish_reason`` too ("length": cut at max_tokens)."""
        text, usage, done, finish = "", {}, False, None
        async with self._response("POST", "/v1/completions", payload, what) as resp:
            async for raw in resp.content:  # server-sent events, one "data: ..." per line
                line = raw.decode("utf-8", "replace").strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                try:
                    chunk = json.loads(data)
                except ValueError:
                    chunk = None
                if not isinstance(chunk, dict):
                    raise EngineError(self._where(f"{what}: unreadable stream event "
                                                  f"{data[:80]!r}"))
                if "error" in chunk:  # the server failed mid-generation
                    raise EngineError(self._where(f"{what} failed while streaming: "
                                                  f"{_server_message(data)}"))
                if isinstance(chunk.get("usage"), dict):
                    usage = chunk["usage"]
                choices = chunk.get("choices") or []
                finish = next((c["finish_reason"] for c in choices
                               if c.get("finish_reason")), finish)
                delta = "".join(str(c.get("text") or "") for c in choices)
                if delta:
                    text += delta
                    try:
                        on_text(text)
                    except Exception:
                        log.exception("on_text callback failed")
        if not done:  # cut off: a partial reply must not pass for a whole one
            raise EngineError(self._where(f"{what}: the stream ended before [DONE]"))
        return text, {**usage, "finish_reason": finish}

    # -- generation -----------------------------------------------------------------------------


    def prompt_ids(self, messages: list[dict[str, str]], max_new_tokens: int) -> list[int]:
        """The prompt's token ids within the budget, by the local engine's rule."""
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("content"), str) or \
                    m.get("role") not in ("system", "user", "assistant"):
                raise EngineError("bad request: each message needs role system/user/assistant "
                                  "and str content")
        budget = serving_budget(self._max_len, max_new_tokens)
        return prompt_ids_within(self._tok, messages, budget, specials=self._specials)

    async def generate(self, req: GenerationRequest, on_text: OnText | None = None
                       ) -> GenerationResult:
        """POST /v1/completions (the rendered prompt ids) with the guild's adapter name."""
        t0 = time.perf_counter()
        max_new, temp, top_p, rep = req.settings(self._cfg)
        ids = await asyncio.to_thread(self.prompt_ids, req.messages, max_new)
        cur = self._current.get(req.guild_id) if req.guild_id is not None else None
        payload: dict[str, Any] = {
            "prompt": ids,
            # The prompt fits the budget; the reply gets what is left of the context.
            "max_tokens": max(1, min(max_new, self._max_len - len(ids))),
            "temperature": temp, "top_p": top_p if temp > 0 else 1.0,
            "repetition_penalty": rep,  # vLLM's extensions of the OpenAI schema
            "stop_token_ids": self._eos, "skip_special_tokens": True,
        }
        if req.seed is not None:
            payload["seed"] = req.seed
        if on_text is not None:
            payload.update(stream=True, stream_options={"include_usage": True})
        try:
            text, usage = await self._complete(payload, req.guild_id, cur, on_text)
        except _HttpError as exc:
            raise EngineError(str(exc)) from None
        served = self._name_re.match(payload["model"])  # the name that answered in the end
        version = int(served.group(2)) if served else None
        return GenerationResult(text.strip() or FALLBACK_TEXT, version,
                                int(usage.get("prompt_tokens", len(ids))),
                                int(usage.get("completion_tokens", 0)),
                                (time.perf_counter() - t0) * 1000,
                                cut=usage.get("finish_reason") == "length")

    async def _complete(self, payload: dict[str, Any], guild_id: int | None,
                        cur: tuple[int, str, Path] | None, on_text: OnText | None
                        ) -> tuple[str, dict[str, Any]]:
        payload["model"] = cur[1] if cur else self._base_name
        try:
            return await self._send(payload, on_text)
        except _HttpError as exc:
            if cur is None or exc.status != 404:
                raise
        # The server does not know the adapter (it restarted, or someone unloaded it): load it
        # again from its directory and retry once; if that fails, answer from the base model.
        payload["model"] = await self._recover(guild_id, cur)
        return await self._send(payload, on_text)

    async def _recover(self, guild_id: int, lost: tuple[int, str, Path]) -> str:
        """The model name to retry with after the server lost ``lost``: the guild's current
        adapter, reloaded (one reload shared by every request that found it missing), or the
        base model."""
        async with self._locks[guild_id]:
            cur = self._current.get(guild_id)
            if cur is None:
                return self._base_name
            if cur[1] != lost[1]:
                return cur[1]  # the guild moved on to another version meanwhile
            pending = self._reloads.get(cur[1])
            if pending is None:
                pending = asyncio.ensure_future(self._load(cur[1], cur[2]))
                self._reloads[cur[1]] = pending
                pending.add_done_callback(lambda _f, n=cur[1]: self._reloads.pop(n, None))
        try:
            await asyncio.shield(pending)
        except AdapterError as exc:
            log.error("adapter %s vanished from the server and cannot be reloaded (%s); "
                      "answering from the base model", cur[1], exc)
            return self._base_name
        return cur[1]

    async def _send(self, payload: dict[str, Any], on_text: OnText | None
                    ) -> tuple[str, dict[str, Any]]:
        model = payload["model"]
        what = f"completion with {model!r}"
        self._inflight[model] += 1
        try:
            if on_text is not None:
                return await self._stream(payload, what, on_text)
            body = await self._raw("POST", "/v1/completions", payload, what)
        finally:
            self._inflight[model] -= 1
            async with self._idle:
                self._idle.notify_all()
        try:
            data = json.loads(body)
            text = data["choices"][0].get("text") or ""
            usage = {**(data.get("usage") or {}),
                     "finish_reason": data["choices"][0].get("finish_reason")}
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise EngineError(self._where(f"unexpected completion body {body[:120]!r}")) \
                from None
        return str(text), usage

    # -- adapters -------------------------------------------------------------------------------

    async def _load(self, name: str, path: Path) -> None:
        """Load ``path`` under ``name``; a name the server already holds is reloaded in place
        (our path wins: the server may hold an older run's or another bot's files)."""
        what = f"loading adapter {name} from {path}"
        body = {"lora_name": name, "lora_path": str(path)}
        try:
            await self._raw("POST", "/v1/load_lora_adapter", body, what)
        except _HttpError as exc:
            if exc.status != 400 or "already been loaded" not in str(exc):
                raise AdapterError(self._adapter_message(exc, path)) from None
            try:
                await self._raw("POST", "/v1/load_lora_adapter", {**body, "load_inplace": True},
                                what)
            except _HttpError as again:
                raise AdapterError(self._adapter_message(again, path)) from None
        self._loaded.add(name)

    @staticmethod
    def _adapter_message(exc: _HttpError, path: Path) -> str:
        if exc.status == 404:
            return (f"{exc} (the server cannot read {path}: it must see the data dir at the "
                    "same absolute path)")
        return str(exc)

    async def activate(self, guild_id: int, version: int, path: str | Path) -> None:
        """Load the version under a new name, route to it, then unload the guild's old names."""
        p = Path(path).expanduser().absolute()  # the server resolves relative paths elsewhere
        if p.exists():  # the server may see paths this host does not; check what we can
            await asyncio.to_thread(validate_adapter_dir, p, guild_id=guild_id, version=version,
                                    base_id=self._base_id, lora_shape=self._lora.shape())
        name = lora_name(self._instance, guild_id, version)
        async with self._locks[guild_id]:
            old = self._current.get(guild_id)
            if old and old[1] == name and old[2] == p:
                return
            await self._load(name, p)
            self._current[guild_id] = (version, name, p)
            log.info("guild %s: vLLM serves %s", guild_id, name)
            await self._unload_others(guild_id, keep=name)

    async def deactivate(self, guild_id: int) -> None:
        """Route the guild to the base model and unload its adapters."""
        async with self._locks[guild_id]:
            self._current.pop(guild_id, None)
            await self._unload_others(guild_id, keep=None)

    async def _unload_others(self, guild_id: int, keep: str | None) -> None:
        for name in sorted(self._loaded):
            m = self._name_re.match(name)
            if m and int(m.group(1)) == guild_id and name != keep:
                await self._unload_when_idle(name)

    async def release_others(self, keep: Collection[int]) -> None:
        """Unload our adapters of guilds neither in ``keep`` nor served (an earlier run's)."""
        for name in sorted(self._loaded):
            m = self._name_re.match(name)
            if m is None:
                continue
            guild_id = int(m.group(1))
            if guild_id in keep or guild_id in self._current:
                continue
            async with self._locks[guild_id]:
                if guild_id not in self._current:
                    await self._unload_when_idle(name)

    async def _unload_when_idle(self, name: str) -> None:
        async with self._idle:
            # Requests already sent with the old name must finish before it disappears.
            await self._idle.wait_for(lambda: self._inflight.get(name, 0) == 0)
        self._inflight.pop(name, None)
        try:
            await self._raw("POST", "/v1/unload_lora_adapter", {"lora_name": name},
                            f"unloading adapter {name}")
        except _HttpError as exc:
            if exc.status != 404:  # 404: already gone, which is what we wanted
                # The new version already serves; a leftover adapter only costs server memory.
                log.warning("%s", exc)
                return
        except EngineError as exc:
            log.warning("%s", exc)
            return
        self._loaded.discard(name)

    def active_versions(self) -> dict[int, int]:
        """Guild id -> version routed to."""
        return {g: v for g, (v, _, _) in self._current.items()}
