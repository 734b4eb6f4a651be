"""VllmEngine against a small in-test server that answers like vLLM 0.32's OpenAI-compatible API
(/v1/models, /v1/completions with token-id prompts and server-sent events, /v1/load_lora_adapter,
/v1/unload_lora_adapter; errors nested as {"error": {...}} with the real statuses). The same
paths against a real vLLM are in tests/test_vllm_real.py; this file covers what a real server
does not do on demand: failures, hangs and odd bodies.
"""

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
from bot.engine.vllm import VllmEngine, instance_id, lora_name
from guildtune.adapter_dir import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from guildtune.config import ModelConfig
from guildtune.models import TINY_BASE_ID, build_tiny_tokenizer
from tests.helpers_adapters import TINY_LORA, write_meta

BASE = "tiny"


class FakeVllm:
    """Enough of `vllm serve --enable-lora` with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True."""

    def __init__(self) -> None:
        self.loras: dict[str, str] = {}
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.fail_chat = 0  # next N completion requests answer HTTP 500
        self.gate: asyncio.Event | None = None  # when set: completions wait for it
        self.entered = asyncio.Event()  # a completion request arrived
        self.bad_stream = False
        self.stream_lines: list[bytes] | None = None  # when set: the raw stream to send
        app = web.Application()
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/load_lora_adapter", self.load)
        app.router.add_post("/v1/unload_lora_adapter", self.unload)
        app.router.add_post("/v1/completions", self.complete)
        self.runner = web.AppRunner(app)
        self.url = ""

    async def start(self) -> None:
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        host, port = self.runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"

    @staticmethod
    def error(status: int, message: str, kind: str = "BadRequestError") -> web.Response:
        return web.json_response({"error": {"message": message, "type": kind, "param": None,
                                            "code": status}}, status=status)

    async def models(self, request: web.Request) -> web.Response:
        data = [{"id": BASE, "object": "model", "root": "/ckpt", "parent": None,
                 "max_model_len": 256}]
        data += [{"id": n, "object": "model", "root": p, "parent": BASE}
                 for n, p in self.loras.items()]
        return web.json_response({"object": "list", "data": data})

    async def load(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.calls.append(("load", body))
        name, path = body.get("lora_name"), body.get("lora_path")
        if name in self.loras and not body.get("load_inplace"):
            return self.error(400, f"The lora adapter '{name}' has already been loaded. If you "
                                   "want to load the adapter in place, set 'load_inplace' to "
                                   "True.", "InvalidUserInput")
        if not Path(path).is_dir():
            return self.error(404, f"Loading lora {name} failed: No adapter found for <path>",
                              "NotFoundError")
        if "broken" in path:
            return self.error(500, "Loading lora failed: rank 64 is greater than max_lora_rank\n"
                                   "Traceback ...", "InternalServerError")
        self.loras[name] = path
        return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")

    async def unload(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.calls.append(("unload", body))
        if self.loras.pop(body.get("lora_name"), None) is None:
            return self.error(404, f"The lora adapter '{body.get('lora_name')}' cannot be "
                                   "found.", "NotFoundError")
        return web.Response(text=f"Success: LoRA adapter '{body['lora_name']}' removed "
                                 "successfully.")

    async def complete(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.calls.append(("complete", body))
        self.entered.set()
        if self.fail_chat:
            self.fail_chat -= 1
            return self.error(500, "CPU out of memory\nstack...", "InternalServerError")
        model = body["model"]
        if model != BASE and model not in self.loras:
            return self.error(404, f"The model `{model}` does not exist.", "NotFoundError")
        if self.gate is not None:
            await self.gate.wait()
        text = f"[{model}] n={len(body['prompt'])}"
        usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": 3,
                 "total_tokens": len(body["prompt"]) + 3}
        if not body.get("stream"):
            return web.json_response({
                "id": "cmpl-1", "object": "text_completion", "model": model,
                "choices": [{"index": 0, "text": text, "finish_reason": "stop"}],
                "usage": usage})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        if self.stream_lines is not None:
            for line in self.stream_lines:
                await resp.write(line + b"\n\n")
            return resp
        pieces = [text[:3], text[3:7], text[7:]] if not self.bad_stream else ["x"]
        for piece in pieces:
            await resp.write(b"data: " + json.dumps(
                {"choices": [{"index": 0, "text": piece}]}).encode() + b"\n\n")
        if self.bad_stream:
            await resp.write(b"data: {not json\n\n")
        await resp.write(b"data: " + json.dumps({"choices": [], "usage": usage}).encode()
                         + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        return resp


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
    write_meta(p, guild_id=guild, version=version, base_model=TINY_BASE_ID)
    return p


@pytest.fixture
async def server():
    srv = FakeVllm()
    await srv.start()
    yield srv
    if srv.gate is not None:
        srv.gate.set()
    await srv.runner.cleanup()


def nm(data_dir: Path, guild: int, version: int) -> str:
    """The server-side name of an adapter of the bot whose data dir is ``data_dir``."""
    return lora_name(instance_id(data_dir), guild, version)


def model_cfg(url: str, **kw: Any) -> ModelConfig:
    return ModelConfig(**{"name": BASE, "backend": "vllm", "vllm_url": url,
                          "max_new_tokens": 16, **kw})


@pytest.fixture
async def engine(server: FakeVllm, tmp_path: Path):
    eng = create_engine(model_cfg(server.url), TINY_LORA, cache_dir=tmp_path)
    assert isinstance(eng, VllmEngine)
    await eng.start()
    yield eng
    await eng.close()


def req(guild: int | None, text: str = "hi", **kw: Any) -> GenerationRequest:
    return GenerationRequest(guild, [{"role": "system", "content": "be nice"},
                                     {"role": "user", "content": text}], **kw)


async def test_versions_load_under_new_names_and_route(engine: VllmEngine, server: FakeVllm,
                                                       tmp_path: Path) -> None:
    res = await engine.generate(req(1))
    n = len(engine.prompt_ids(req(1).messages, 16))
    assert (res.text, res.adapter_version, res.tokens_in, res.tokens_out) == \
        (f"[{BASE}] n={n}", None, n, 3)
    sent = server.calls[-1][1]
    assert sent["max_tokens"] == 16 and sent["repetition_penalty"] == 1.15
    assert sent["prompt"] == engine.prompt_ids(req(1).messages, 16)

    await engine.activate(1, 1, fake_adapter(tmp_path, 1, 1))
    await engine.activate(2, 1, fake_adapter(tmp_path, 2, 1))
    assert set(server.loras) == {nm(tmp_path, 1, 1), nm(tmp_path, 2, 1)}
    r1, r2, r3 = await asyncio.gather(engine.generate(req(1)), engine.generate(req(2)),
                                      engine.generate(req(3)))
    assert (r1.text, r1.adapter_version) == (f"[{nm(tmp_path, 1, 1)}] n={n}", 1)
    assert (r2.text, r3.text) == (f"[{nm(tmp_path, 2, 1)}] n={n}", f"[{BASE}] n={n}")

    await engine.activate(1, 2, fake_adapter(tmp_path, 1, 2))
    assert set(server.loras) == {nm(tmp_path, 1, 2), nm(tmp_path, 2, 1)}  # old name unloaded after the switch
    assert (await engine.generate(req(1))).text == f"[{nm(tmp_path, 1, 2)}] n={n}"
    assert engine.active_versions() == {1: 2, 2: 1}

    await engine.deactivate(2)
    assert set(server.loras) == {nm(tmp_path, 1, 2)}
    assert (await engine.generate(req(2))).text == f"[{BASE}] n={n}"


async def test_server_refusals_are_one_line_and_the_old_version_serves(
        engine: VllmEngine, server: FakeVllm, tmp_path: Path) -> None:
    await engine.activate(1, 1, fake_adapter(tmp_path, 1, 1))
    broken = fake_adapter(tmp_path / "broken", 1, 2)
    with pytest.raises(AdapterError, match=r"HTTP 500: Loading lora failed: rank 64") as info:
        await engine.activate(1, 2, broken)
    assert "\n" not in str(info.value)
    with pytest.raises(AdapterError, match=r"HTTP 404: .*same absolute path"):
        await engine.activate(1, 3, tmp_path / "elsewhere" / "1" / "3")
    assert (await engine.generate(req(1))).adapter_version == 1
    assert engine.active_versions() == {1: 1}


async def test_local_validation_refuses_before_the_server(engine: VllmEngine, server: FakeVllm,
                                                          tmp_path: Path) -> None:
    wrong_rank = fake_adapter(tmp_path, 1, 1, rank=8)
    with pytest.raises(AdapterError, match="shape"):
        await engine.activate(1, 1, wrong_rank)
    assert not [c for c in server.calls if c[0] == "load"]


async def test_generation_errors_are_clear(engine: VllmEngine, server: FakeVllm) -> None:
    server.fail_chat = 1
    with pytest.raises(EngineError, match=r"HTTP 500: CPU out of memory stack") as info:
        await engine.generate(req(None))
    assert "\n" not in str(info.value)
    again = await engine.generate(req(None))  # recovers on the next request
    assert again.text.startswith("[") and again.text != FALLBACK_TEXT  # the server's answer
    server.bad_stream = True
    with pytest.raises(EngineError, match="unreadable stream event"):
        await engine.generate(req(None), on_text=lambda _t: None)


async def test_budgets_follow_the_servers_context(engine: VllmEngine, server: FakeVllm) -> None:
    # The server says max_model_len 256: the prompt fits under it with the reply's room, and
    # the reply never asks past it.
    await engine.generate(req(None, "word " * 5000, max_new_tokens=4000))
    sent = server.calls[-1][1]
    assert len(sent["prompt"]) + sent["max_tokens"] <= 256 and sent["max_tokens"] >= 1


async def test_streaming_reports_growing_text(engine: VllmEngine, server: FakeVllm) -> None:
    seen: list[str] = []
    res = await engine.generate(req(None), on_text=seen.append)
    plain = await engine.generate(req(None))
    assert res == plain.__class__(plain.text, None, plain.tokens_in, plain.tokens_out,
                                  res.latency_ms)
    assert seen == [res.text[:3], res.text[:7], res.text]

    def explode(_text: str) -> None:
        raise RuntimeError("a front end bug")

    assert (await engine.generate(req(None), on_text=explode)).text == plain.text


async def test_unreachable_server_and_timeout(server: FakeVllm, tmp_path: Path) -> None:
    tok = build_tiny_tokenizer()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    eng = VllmEngine(model_cfg(dead), TINY_LORA, tok, instance="t")
    with pytest.raises(EngineError, match="list models failed"):
        await eng.start()
    await eng.close()

    slow = VllmEngine(model_cfg(server.url), TINY_LORA, tok, instance="t", timeout_s=0.2)
    await slow.start()
    server.gate = asyncio.Event()  # never set while the request waits: it must time out
    try:
        with pytest.raises(EngineError, match="timed out"):
            await slow.generate(req(None))
    finally:
        await slow.close()


async def test_swap_waits_for_requests_using_the_old_name(engine: VllmEngine, server: FakeVllm,
                                                          tmp_path: Path) -> None:
    await engine.activate(1, 1, fake_adapter(tmp_path, 1, 1))
    server.gate = asyncio.Event()
    server.entered.clear()
    pending = asyncio.ensure_future(engine.generate(req(1)))
    await server.entered.wait()  # the request is at the server, holding g1-v1
    swap = asyncio.ensure_future(engine.activate(1, 2, fake_adapter(tmp_path, 1, 2)))
    while nm(tmp_path, 1, 2) not in server.loras:
        await asyncio.sleep(0)
    assert set(server.loras) == {nm(tmp_path, 1, 1), nm(tmp_path, 1, 2)}  # the old name waits for its request
    assert not swap.done()
    server.gate.set()
    res, _ = await asyncio.gather(pending, swap)
    assert res.adapter_version == 1 and res.text.startswith(f"[{nm(tmp_path, 1, 1)}]")
    assert set(server.loras) == {nm(tmp_path, 1, 2)}


async def test_a_restarted_bot_adopts_what_the_server_holds(server: FakeVllm,
                                                            tmp_path: Path) -> None:
    other_bot = lora_name(instance_id(tmp_path / "other-bot"), 1, 1)
    server.loras = {nm(tmp_path, 1, 1): str(fake_adapter(tmp_path, 1, 1)),
                    nm(tmp_path, 1, 0): "/gone", nm(tmp_path, 9, 1): "/guild-without-version",
                    other_bot: "/other-bot/1/1"}
    eng = create_engine(model_cfg(server.url), TINY_LORA, cache_dir=tmp_path)
    await eng.start()
    try:
        await eng.activate(1, 1, tmp_path / "1" / "1")  # already held: reloaded in place
        assert [c[1].get("load_inplace") for c in server.calls if c[0] == "load"] == \
            [None, True]
        # This guild's leftover is gone; another bot's adapter of the same guild is not ours.
        assert set(server.loras) == {nm(tmp_path, 1, 1), nm(tmp_path, 9, 1), other_bot}
        # The watcher's sync: guild 9 has no version any more, its leftover goes too.
        await eng.release_others({1})
        assert set(server.loras) == {nm(tmp_path, 1, 1), other_bot}
        assert server.loras[other_bot] == "/other-bot/1/1"  # never reloaded with our files
    finally:
        await eng.close()


async def test_a_server_that_lost_the_adapter(server: FakeVllm, tmp_path: Path) -> None:
    eng = create_engine(model_cfg(server.url), TINY_LORA, cache_dir=tmp_path)
    await eng.start()
    try:
        await eng.activate(1, 1, fake_adapter(tmp_path, 1, 1))
        # The server restarted: five requests in flight find the adapter missing; one reload
        # serves them all.
        server.loras.clear()
        server.calls.clear()
        res = await asyncio.gather(*(eng.generate(req(1)) for _ in range(5)))
        assert {r.adapter_version for r in res} == {1}
        assert len([c for c in server.calls if c[0] == "load"]) == 1
        # Lost again and its files are gone too: the base model answers.
        server.loras.clear()
        import shutil

        shutil.rmtree(tmp_path / "1" / "1")
        res1 = await eng.generate(req(1))
        assert res1.adapter_version is None and res1.text.startswith(f"[{BASE}]")
    finally:
        await eng.close()


async def test_a_lost_adapter_while_the_guild_moves_on(server: FakeVllm, tmp_path: Path) -> None:
    eng = create_engine(model_cfg(server.url), TINY_LORA, cache_dir=tmp_path)
    await eng.start()
    try:
        await eng.activate(1, 1, fake_adapter(tmp_path, 1, 1))
        server.loras.clear()  # v1 is lost ...
        server.gate = asyncio.Event()
        server.entered.clear()
        # ... a request finds it missing (404 at once, the gate only holds answers) while the
        # guild switches to v2: the retry goes to v2, v1 is not loaded back.
        v2 = fake_adapter(tmp_path, 1, 2)
        async with eng._locks[1]:  # the activation holds the guild while the 404 comes back
            pending = asyncio.ensure_future(eng.generate(req(1)))
            await server.entered.wait()
            await eng._load(nm(tmp_path, 1, 2), v2)
            eng._current[1] = (2, nm(tmp_path, 1, 2), v2)
        server.gate.set()
        res = await pending
        assert res.adapter_version == 2 and res.text.startswith(f"[{nm(tmp_path, 1, 2)}]")
        assert set(server.loras) == {nm(tmp_path, 1, 2)}
    finally:
        await eng.close()


async def test_a_reply_stopped_at_max_tokens_is_marked_cut(engine: VllmEngine,
                                                           server: FakeVllm) -> None:
    assert not (await engine.generate(req(None))).cut  # finish_reason "stop": it ended
    server.stream_lines = [b'data: {"choices": [{"text": "Half a", "finish_reason": null}]}',
                           b'data: {"choices": [{"text": " rep", "finish_reason": "length"}]}',
                           b"data: [DONE]"]
    res = await engine.generate(req(None), on_text=lambda _t: None)
    assert res.text == "Half a rep" and res.cut


async def test_stream_failures_are_errors_not_replies(server: FakeVllm, tmp_path: Path) -> None:
    eng = create_engine(model_cfg(server.url), TINY_LORA, cache_dir=tmp_path)
    await eng.start()
    try:
        for bad, why in (([b'data: {"choices": [{"text": "Half a rep"}]}',
                           b'data: {"error": {"message": "engine died", "code": 500}}',
                           b"data: [DONE]"], "failed while streaming: engine died"),
                         ([b'data: {"choices": [{"text": "Half a rep"}]}'],
                          "ended before \\[DONE\\]"),
                         ([b'data: "oops"', b"data: [DONE]"], "unreadable stream event")):
            server.stream_lines = bad
            with pytest.raises(EngineError, match=why):
                await eng.generate(req(None), on_text=lambda _t: None)
    finally:
        await eng.close()


async def test_relative_adapter_paths_are_sent_absolute(server: FakeVllm, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        engine: VllmEngine) -> None:
    fake_adapter(tmp_path, 1, 1)
    monkeypatch.chdir(tmp_path)
    await engine.activate(1, 1, Path("1") / "1")
    assert server.loras[nm(tmp_path, 1, 1)] == str(tmp_path / "1" / "1")


async def test_not_started_is_clear() -> None:
    eng = VllmEngine(model_cfg("http://127.0.0.1:9"), TINY_LORA, build_tiny_tokenizer(),
                     instance="t")
    with pytest.raises(EngineError, match="not running"):
        await eng.generate(req(None))
