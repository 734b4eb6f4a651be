"""VllmEngine against a small in-test server that follows vLLM's documented OpenAI-compatible API
(/v1/models, /v1/chat/completions, /v1/load_lora_adapter, /v1/unload_lora_adapter)."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from bot.engine import (
    FALLBACK_TEXT,
    AdapterError,
    EngineError,
    GenerationRequest,
    create_engine,
)
from bot.engine.vllm import VllmEngine
from guildtune.adapter_dir import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from guildtune.config import ModelConfig
from tests.helpers_adapters import TINY_LORA, write_meta

BASE = "org/base-model"


class FakeVllm:
    """Enough of `vllm serve --enable-lora` with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True."""

    def __init__(self) -> None:
        self.loras: dict[str, str] = {}
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.fail_chat = 0  # next N chat requests answer HTTP 500
        self.chat_delay = 0.0
        app = web.Application()
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/load_lora_adapter", self.load)
        app.router.add_post("/v1/unload_lora_adapter", self.unload)
        app.router.add_post("/v1/chat/completions", self.chat)
        self.runner = web.AppRunner(app)
        self.url = ""

    async def start(self) -> None:
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        host, port = self.runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"

    @staticmethod
    def error(status: int, message: str) -> web.Response:
        return web.json_response({"object": "error", "message": message,
                                  "type": "BadRequestError", "param": None, "code": status},
                                 status=status)

    async def models(self, request: web.Request) -> web.Response:
        data = [{"id": BASE, "object": "model", "root": BASE, "parent": None}]
        data += [{"id": n, "object": "model", "root": p, "parent": BASE}
                 for n, p in self.loras.items()]
        return web.json_response({"object": "list", "data": data})

    async def load(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.calls.append(("load", body))
        name, path = body.get("lora_name"), body.get("lora_path")
        if name in self.loras:
            return self.error(400, f"The lora adapter '{name}' has already been loaded.")
        if not Path(path).is_dir() or "broken" in path:
            return self.error(400, f"Loading lora {name} failed: No adapter found for {path}")
        self.loras[name] = path
        return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")

    async def unload(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.calls.append(("unload", body))
        if self.loras.pop(body.get("lora_name"), None) is None:
            return self.error(404, f"The lora adapter '{body.get('lora_name')}' cannot be found.")
        return web.Response(text=f"Success: LoRA adapter '{body['lora_name']}' removed "
                                 "successfully.")

    async def chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.calls.append(("chat", body))
        if self.fail_chat:
            self.fail_chat -= 1
            return web.json_response({"error": {"message": "CUDA out of memory\nstack...",
                                                "type": "InternalServerError", "code": 500}},
                                     status=500)
        model = body["model"]
        if model != BASE and model not in self.loras:
            return web.json_response({"error": {"message": f"The model `{model}` does not "
                                                "exist.", "type": "NotFoundError",
                                                "code": 404}}, status=404)
        await asyncio.sleep(self.chat_delay)
        if model != BASE and model not in self.loras:  # unloaded while generating
            return self.error(500, f"adapter {model} vanished mid-request")
        text = f"[{model}] {body['messages'][-1]['content']}"
        return web.json_response({
            "id": "chatcmpl-1", "object": "chat.completion", "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}})


def fake_adapter(root: Path, guild: int, version: int, rank: int = TINY_LORA.rank) -> Path:
    """An adapter dir that passes validation, written without torch."""
    p = root / str(guild) / str(version)
    p.mkdir(parents=True)
    (p / ADAPTER_CONFIG).write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": TINY_LORA.alpha,
        "target_modules": list(TINY_LORA.target_modules)}))
    header = json.dumps({"base_model.model.layers.0.q_proj.lora_A.weight":
                         {"dtype": "F32", "shape": [rank, 2], "data_offsets": [0, rank * 8]}})
    raw = header.encode()
    raw += b" " * (-len(raw) % 8)
    (p / ADAPTER_WEIGHTS).write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * rank * 8)
    write_meta(p, guild_id=guild, version=version, base_model=BASE)
    return p


@pytest.fixture
async def server():
    srv = FakeVllm()
    await srv.start()
    yield srv
    await srv.runner.cleanup()


@pytest.fixture
async def engine(server: FakeVllm):
    cfg = ModelConfig(name=BASE, backend="vllm", vllm_url=server.url, max_new_tokens=16)
    eng = create_engine(cfg, TINY_LORA)
    assert isinstance(eng, VllmEngine)
    await eng.start()
    yield eng
    await eng.close()


def req(guild: int | None, text: str = "hi") -> GenerationRequest:
    return GenerationRequest(guild, [{"role": "system", "content": "be nice"},
                                     {"role": "user", "content": text}])


async def test_versions_load_under_new_names_and_route(engine: VllmEngine, server: FakeVllm,
                                                       tmp_path: Path) -> None:
    res = await engine.generate(req(1))
    assert (res.text, res.adapter_version, res.tokens_in, res.tokens_out) == \
        (f"[{BASE}] hi", None, 11, 3)
    chat = server.calls[-1][1]
    assert chat["max_tokens"] == 16 and chat["repetition_penalty"] == 1.15

    await engine.activate(1, 1, fake_adapter(tmp_path, 1, 1))
    await engine.activate(2, 1, fake_adapter(tmp_path, 2, 1))
    assert set(server.loras) == {"g1-v1", "g2-v1"}
    r1, r2, r3 = await asyncio.gather(engine.generate(req(1)), engine.generate(req(2)),
                                      engine.generate(req(3)))
    assert (r1.text, r1.adapter_version) == ("[g1-v1] hi", 1)
    assert (r2.text, r3.text) == ("[g2-v1] hi", f"[{BASE}] hi")

    await engine.activate(1, 2, fake_adapter(tmp_path, 1, 2))
    assert set(server.loras) == {"g1-v2", "g2-v1"}  # old name unloaded after the switch
    assert (await engine.generate(req(1))).text == "[g1-v2] hi"
    assert engine.active_versions() == {1: 2, 2: 1}

    await engine.deactivate(2)
    assert set(server.loras) == {"g1-v2"}
    assert (await engine.generate(req(2))).text == f"[{BASE}] hi"


async def test_server_refusal_is_adapter_error_and_old_version_serves(
        engine: VllmEngine, server: FakeVllm, tmp_path: Path) -> None:
    await engine.activate(1, 1, fake_adapter(tmp_path, 1, 1))
    broken = fake_adapter(tmp_path / "broken", 1, 2)
    with pytest.raises(AdapterError, match=r"HTTP 400: Loading lora g1-v2 failed") as info:
        await engine.activate(1, 2, broken)
    assert "\n" not in str(info.value)
    assert (await engine.generate(req(1))).text == "[g1-v1] hi"
    assert engine.active_versions() == {1: 1}


async def test_local_validation_refuses_before_the_server(engine: VllmEngine, server: FakeVllm,
                                                          tmp_path: Path) -> None:
    wrong_rank = fake_adapter(tmp_path, 1, 1, rank=8)
    with pytest.raises(AdapterError, match="shape"):
        await engine.activate(1, 1, wrong_rank)
    assert not [c for c in server.calls if c[0] == "load"]


async def test_generation_errors_are_clear(engine: VllmEngine, server: FakeVllm) -> None:
    server.fail_chat = 1
    with pytest.raises(EngineError, match=r"HTTP 500: CUDA out of memory stack") as info:
        await engine.generate(req(None))
    assert "\n" not in str(info.value)
    again = await engine.generate(req(None))  # recovers on the next request
    assert again.text.startswith("[") and again.text != FALLBACK_TEXT  # the server's answer


async def test_unreachable_server_and_timeout(server: FakeVllm, tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    eng = VllmEngine(ModelConfig(name=BASE, backend="vllm", vllm_url=dead), TINY_LORA)
    with pytest.raises(EngineError, match="list models failed"):
        await eng.start()
    await eng.close()

    slow = VllmEngine(ModelConfig(name=BASE, backend="vllm", vllm_url=server.url), TINY_LORA,
                      timeout_s=0.2)
    await slow.start()
    server.chat_delay = 1.0
    try:
        with pytest.raises(EngineError, match="timed out"):
            await slow.generate(req(None))
    finally:
        await slow.close()


async def test_swap_waits_for_requests_using_the_old_name(engine: VllmEngine, server: FakeVllm,
                                                          tmp_path: Path) -> None:
    await engine.activate(1, 1, fake_adapter(tmp_path, 1, 1))
    server.chat_delay = 0.3
    pending = asyncio.ensure_future(engine.generate(req(1)))
    await asyncio.sleep(0.05)
    await engine.activate(1, 2, fake_adapter(tmp_path, 1, 2))
    res = await pending
    assert (res.text, res.adapter_version) == ("[g1-v1] hi", 1)
    assert set(server.loras) == {"g1-v2"}


async def test_not_started_is_clear() -> None:
    eng = VllmEngine(ModelConfig(name=BASE, backend="vllm"), TINY_LORA)
    with pytest.raises(EngineError, match="not running"):
        await eng.generate(req(None))
