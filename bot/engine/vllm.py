"""VllmEngine: the engine as a client of a vLLM OpenAI-compatible server with multi-LoRA.

For deployments that outgrow one machine: vLLM batches and schedules, this client only routes.
Start the server with runtime adapter loading enabled, e.g.::

    VLLM_ALLOW_RUNTIME_LORA_UPDATING=True vllm serve HuggingFaceTB/SmolLM2-135M-Instruct \\
        --enable-lora --max-loras 16 --max-lora-rank 16 --port 8000

and set ``model.backend = "vllm"``, ``model.vllm_url = "http://host:8000"``, ``model.name`` to
the served model. Adapter directories must be readable by the server at the same path.

Each adapter version gets its own name (``g<guild>-v<version>``): ``activate`` loads the new name
(``POST /v1/load_lora_adapter``), routes new requests to it, and unloads the old name
(``POST /v1/unload_lora_adapter``) once the requests already sent with it have finished. A chat
request names the adapter (or the base model) in its ``model`` field.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import defaultdict
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
)
from guildtune.adapter_dir import validate_adapter_dir

if TYPE_CHECKING:
    from guildtune.config import LoraConfig, ModelConfig

log = logging.getLogger(__name__)


def lora_name(guild_id: int, version: int) -> str:
    """The server-side adapter name of one version (new name per version: no cache confusion)."""
    return f"g{guild_id}-v{version}"


def _server_message(body: str) -> str:
    """One line from a vLLM/OpenAI error body ({"message": ...} or {"error": {"message": ...}})."""
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    msg: Any = body
    if isinstance(data, dict):
        err = data.get("error")
        msg = (err.get("message") if isinstance(err, dict) else err) or data.get("message") or body
    return " ".join(str(msg).split())[:300] or "(empty body)"


class VllmEngine(Engine):
    """HTTP client of a vLLM server; same contract as LocalEngine."""

    def __init__(self, model_cfg: ModelConfig, lora_cfg: LoraConfig, *,
                 timeout_s: float = 120.0, base_id: str | None = None) -> None:
        self._cfg = model_cfg
        self._lora = lora_cfg
        self._url = model_cfg.vllm_url.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._base_name = model_cfg.name  # replaced by the served name found at start()
        # Adapters are checked against this base id when their dir is readable here.
        self._base_id = base_id
        self._session: aiohttp.ClientSession | None = None
        self._current: dict[int, tuple[int, str]] = {}  # guild -> (version, lora name)
        self._inflight: dict[str, int] = defaultdict(int)
        self._idle = asyncio.Condition()
        self._locks: dict[int, asyncio.Lock] = defaultdict(asyncio.Lock)

    async def start(self) -> None:
        """Open the HTTP session and find the served base model via GET /v1/models."""
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        status, body = await self._request("GET", "/v1/models", None, EngineError, "list models")
        try:
            models = json.loads(body)["data"]
            bases = [m["id"] for m in models if not m.get("parent")]
        except (ValueError, KeyError, TypeError):
            raise EngineError(f"vLLM at {self._url}: /v1/models answered an unexpected body") \
                from None
        if self._cfg.name in bases or not bases:
            self._base_name = self._cfg.name
        else:
            self._base_name = bases[0]
            log.warning("vLLM serves %r, not the configured model.name %r: using %r",
                        bases[0], self._cfg.name, bases[0])

    async def close(self) -> None:
        """Close the HTTP session (server-side adapters stay loaded for the next start)."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _request(self, method: str, route: str, payload: dict[str, Any] | None,
                       error: type[Exception], what: str) -> tuple[int, str]:
        if self._session is None:
            raise EngineError("engine is not running (call start() first, or it was closed)")
        try:
            async with self._session.request(method, self._url + route, json=payload) as resp:
                body = await resp.text()
                if resp.status >= 400:
                    raise error(f"vLLM at {self._url}: {what} failed with HTTP {resp.status}: "
                                f"{_server_message(body)}")
                return resp.status, body
        except asyncio.TimeoutError:
            raise error(f"vLLM at {self._url}: {what} timed out after "
                        f"{self._timeout.total:.0f} s") from None
        except aiohttp.ClientError as exc:
            raise error(f"vLLM at {self._url}: {what} failed: "
                        f"{' '.join(str(exc).split()) or type(exc).__name__}") from None

    async def generate(self, req: GenerationRequest) -> GenerationResult:
        """POST /v1/chat/completions with the guild's current adapter name as the model."""
        t0 = time.perf_counter()
        cur = self._current.get(req.guild_id) if req.guild_id is not None else None
        model, version = (cur[1], cur[0]) if cur else (self._base_name, None)
        c = self._cfg
        payload: dict[str, Any] = {
            "model": model, "messages": req.messages,
            "max_tokens": req.max_new_tokens if req.max_new_tokens is not None
            else c.max_new_tokens,
            "temperature": req.temperature if req.temperature is not None else c.temperature,
            "top_p": req.top_p if req.top_p is not None else c.top_p,
            # vLLM extension of the OpenAI schema
            "repetition_penalty": req.repetition_penalty if req.repetition_penalty is not None
            else c.repetition_penalty,
        }
        if req.seed is not None:
            payload["seed"] = req.seed
        self._inflight[model] += 1
        try:
            _, body = await self._request("POST", "/v1/chat/completions", payload, EngineError,
                                          f"chat completion with {model!r}")
        finally:
            self._inflight[model] -= 1
            async with self._idle:
                self._idle.notify_all()
        try:
            data = json.loads(body)
            text = data["choices"][0]["message"].get("content") or ""
            usage = data.get("usage") or {}
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise EngineError(f"vLLM at {self._url}: unexpected chat completion body "
                              f"{body[:120]!r}") from None
        return GenerationResult(text.strip() or FALLBACK_TEXT, version,
                                int(usage.get("prompt_tokens", 0)),
                                int(usage.get("completion_tokens", 0)),
                                (time.perf_counter() - t0) * 1000)

    async def activate(self, guild_id: int, version: int, path: str | Path) -> None:
        """Load the version under a new name, route to it, then unload the old name."""
        p = Path(path).expanduser()
        if p.exists():  # the server may see paths this host does not; check what we can
            await asyncio.to_thread(validate_adapter_dir, p, guild_id=guild_id, version=version,
                                    base_id=self._base_id, lora_shape=self._lora.shape())
        name = lora_name(guild_id, version)
        async with self._locks[guild_id]:
            old = self._current.get(guild_id)
            if old and old[1] == name:
                return
            await self._request("POST", "/v1/load_lora_adapter",
                                {"lora_name": name, "lora_path": str(p)}, AdapterError,
                                f"loading adapter {name} from {p}")
            self._current[guild_id] = (version, name)
            log.info("guild %s: vLLM serves %s", guild_id, name)
            if old:
                await self._unload_when_idle(old[1])

    async def _unload_when_idle(self, name: str) -> None:
        async with self._idle:
            # Requests already sent with the old name must finish before it disappears.
            await self._idle.wait_for(lambda: self._inflight.get(name, 0) == 0)
        self._inflight.pop(name, None)
        try:
            await self._request("POST", "/v1/unload_lora_adapter", {"lora_name": name},
                                AdapterError, f"unloading adapter {name}")
        except AdapterError as exc:
            # The new version already serves; a leftover old adapter only costs server memory.
            log.warning("%s", exc)

    async def deactivate(self, guild_id: int) -> None:
        """Route the guild to the base model and unload its adapter."""
        async with self._locks[guild_id]:
            old = self._current.pop(guild_id, None)
            if old:
                await self._unload_when_idle(old[1])

    def active_versions(self) -> dict[int, int]:
        """Guild id -> version routed to."""
        return {g: v for g, (v, _) in self._current.items()}
