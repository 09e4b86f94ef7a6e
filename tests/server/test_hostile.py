"""The server against clients that abuse it (issue 15): priorities only when allowed, an API
key on /v1/*, a Host allow-list on loopback, no file path in the model id, bodies bounded (413
before the body is read), text prompts bounded by length and tokenized off the event loop, and
uvicorn's connection limits (idle keep-alive connections closed)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from typing import Any

import pytest

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from fastapi import FastAPI  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from pagedkv.cli import build_parser  # noqa: E402
from pagedkv.cli.serve import is_loopback, served_model_name, server_config  # noqa: E402
from pagedkv.models import ModelRunner  # noqa: E402
from pagedkv.scheduler import EngineConfig, LLMEngine, SamplingParams  # noqa: E402
from pagedkv.server.async_engine import AsyncLLMEngine  # noqa: E402
from pagedkv.server.background import BackgroundServer as Server  # noqa: E402
from tests.helpers import assert_drained  # noqa: E402

MODEL = "tiny"


class _Detok:
    def step(self, token_id: int) -> str:
        return "x"


class RecordingTokenizer:
    """A character tokenizer that records the threads it runs in."""

    chat_template = "any"

    def __init__(self) -> None:
        self.encode_threads: list[int] = []
        self.render_threads: list[int] = []

    def encode(self, text: str) -> list[int]:
        self.encode_threads.append(threading.get_ident())
        return [ord(c) % 200 + 1 for c in text]

    def detokenizer(self) -> _Detok:
        return _Detok()

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str:
        self.render_threads.append(threading.get_ident())
        return "".join(m["content"] for m in messages)


@pytest.fixture
def serve(tiny_model):
    servers: list[Server] = []

    def start(tokenizer=None, **kw) -> Server:
        config = EngineConfig(block_size=4, num_blocks=256, max_num_seqs=16)
        engine = LLMEngine(ModelRunner(tiny_model), config, tokenizer=tokenizer)
        servers.append(Server(engine, MODEL, **kw))
        return servers[-1]

    yield start
    for s in servers:
        s.stop()
        assert s.async_engine.num_in_flight == 0
        assert_drained(s.async_engine.engine)


def assert_openai_error(r, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    assert error["param"] == param, error
    return error


BODY = {"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 2}


# 4. Priority as a weapon


def test_priority_is_refused_unless_the_server_allows_it(serve, make_engine):
    strict, lenient = serve(), serve(allow_priority=True)
    with httpx.Client(base_url=strict.url, timeout=60) as client:
        for priority in (-5, 3):
            assert_openai_error(client.post("/v1/completions", json=BODY | {"priority": priority}), 400, "priority")
        assert client.post("/v1/completions", json=BODY | {"priority": 0}).status_code == 200
    with httpx.Client(base_url=lenient.url, timeout=60) as client:
        assert client.post("/v1/completions", json=BODY | {"priority": -5}).status_code == 200
    engine = make_engine(block_size=4, num_blocks=64)  # the Python API keeps priorities
    engine.add_request("r", [1, 2], SamplingParams(max_tokens=1), priority=-7)
    assert engine.scheduler.waiting[0].priority == -7
    while engine.has_unfinished_requests():
        engine.step()


# 12. Security defaults


def test_api_key_guards_v1_routes_only(serve):
    server = serve(api_key="s3cret")
    with httpx.Client(base_url=server.url, timeout=60) as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
            error = assert_openai_error(client.get("/v1/models", headers=headers), 401)
            assert error["code"] == "invalid_api_key"
            assert_openai_error(client.post("/v1/completions", json=BODY, headers=headers), 401)
        auth = {"Authorization": "Bearer s3cret"}
        assert client.get("/v1/models", headers=auth).status_code == 200
        assert client.post("/v1/completions", json=BODY, headers=auth).status_code == 200
        assert client.get("/health").status_code == 200 and client.get("/metrics").status_code == 200
    openai = pytest.importorskip("openai")
    assert [m.id for m in openai.OpenAI(base_url=f"{server.url}/v1", api_key="s3cret").models.list()] == [MODEL]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope").models.list()


def test_loopback_server_answers_only_loopback_host_names(serve):
    server = serve()
    with httpx.Client(base_url=server.url, timeout=60) as client:
        for host in ("localhost", f"localhost:{server.port}", "127.0.0.1:1", "[::1]", "[::1]:8000", "LOCALHOST"):
            assert client.get("/health", headers={"Host": host}).status_code == 200, host
        for host in ("attacker.example", "attacker.example:8000", "localhost.attacker.example", "127.0.0.2"):
            assert_openai_error(client.get("/health", headers={"Host": host}), 421)
            assert_openai_error(client.post("/v1/completions", json=BODY, headers={"Host": host}), 421)


def test_served_model_id_never_shows_a_path():
    assert served_model_name("/home/me/models/Llama-3.2-1B.Q4_K_M.gguf") == "Llama-3.2-1B.Q4_K_M"
    assert served_model_name("models/x.gguf") == "x"
    assert served_model_name("smollm2-135m") == "smollm2-135m"
    assert served_model_name("/abs/x.gguf", "prod-model") == "prod-model"
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and is_loopback("127.8.0.1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4") and not is_loopback("example.com")


def serve_args(*flags: str):
    return build_parser().parse_args(["serve", *flags])


def app_of(config: Any) -> FastAPI:
    assert isinstance(config.app, FastAPI)
    return config.app


def test_pagedkv_serve_builds_the_guarded_app_and_uvicorn_limits(tiny_model, monkeypatch):
    engine = AsyncLLMEngine(LLMEngine(ModelRunner(tiny_model), EngineConfig(block_size=4, num_blocks=64)))
    monkeypatch.delenv("PAGEDKV_API_KEY", raising=False)
    config = server_config(serve_args("--model", "/srv/weights/my-model.gguf"), engine)
    assert (config.timeout_keep_alive, config.limit_concurrency, config.access_log) == (5, 512, False)
    assert config.log_level == "warning" and config.h11_max_incomplete_event_size == 16 * 1024
    assert config.timeout_graceful_shutdown == 5, "a stalled client cannot hold shutdown up"
    client = TestClient(app_of(config), base_url="http://127.0.0.1:8000")  # no lifespan: the engine stays idle
    assert client.get("/v1/models").json()["data"][0]["id"] == "my-model"
    assert TestClient(app_of(config)).get("/health").status_code == 421  # Host "testserver": not loopback
    assert_openai_error(client.post("/v1/completions", json={"model": "my-model", "prompt": [1], "priority": 1}),
                        400, "priority")
    long_ids = client.post("/v1/completions", json={"model": "my-model", "prompt": [1] * 600})  # max_model_len 512
    assert_openai_error(long_ids, 400, "prompt")

    monkeypatch.setenv("PAGEDKV_API_KEY", "k")
    config = server_config(serve_args("--host", "0.0.0.0", "--served-model-name", "m", "--allow-priority",
                                      "--max-connections", "7", "--timeout-keep-alive", "2", "--access-log",
                                      "--max-body-bytes", "100"), engine)
    assert (config.timeout_keep_alive, config.limit_concurrency, config.access_log) == (2, 7, True)
    client = TestClient(app_of(config))  # any Host: bound to all interfaces
    assert client.get("/health").status_code == 200
    assert_openai_error(client.get("/v1/models"), 401)
    assert client.get("/v1/models", headers={"Authorization": "Bearer k"}).json()["data"][0]["id"] == "m"
    too_large = client.post("/v1/completions", content=b"x" * 101, headers={"Authorization": "Bearer k"})
    assert_openai_error(too_large, 413)



# 1. One big request must not block the event loop


def test_a_body_over_the_limit_gets_a_413_while_a_stream_goes_on(serve):
    server = serve(max_body_bytes=4096)
    big = BODY | {"prompt": [1] * 3000}  # ~9 KB of JSON

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            async def stream() -> list[int]:
                body = BODY | {"max_tokens": 40, "ignore_eos": True, "temperature": 0, "stream": True}
                tokens: list[int] = []
                async with client.stream("POST", "/v1/completions", json=body) as r:
                    assert r.status_code == 200
                    async for line in r.aiter_lines():
                        if line.startswith("data: {"):
                            tokens += [t for c in json.loads(line[6:])["choices"] for t in c["token_ids"]]
                return tokens

            async def chunks():  # no Content-Length: the bytes are counted as they come
                for _ in range(10):
                    yield b"x" * 1000

            task = asyncio.create_task(stream())
            sized = await client.post("/v1/completions", json=big)
            chunked = await client.post("/v1/completions", content=chunks(),
                                        headers={"content-type": "application/json"})
            return await task, sized, chunked

    tokens, sized, chunked = asyncio.run(main())
    assert len(tokens) == 40
    assert "4096" in assert_openai_error(sized, 413)["message"]
    assert_openai_error(chunked, 413)
    with httpx.Client(base_url=server.url, timeout=60) as client:
        assert client.post("/v1/completions", json=BODY).status_code == 200, "the server goes on"


def test_the_default_limit_answers_before_the_body_is_sent(serve):
    server = serve()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000000000\r\n\r\n{")  # a gigabyte announced, one byte sent
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            data = s.recv(65536)
            if not data:
                break
            reply += data
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), reply
    assert json.loads(body)["error"]["type"] == "invalid_request_error"


def test_text_prompts_are_bounded_and_tokenized_off_the_event_loop(serve):
    tok = RecordingTokenizer()
    server = serve(tokenizer=tok)
    limit = server.async_engine.engine.scheduler.max_model_len * 32
    with httpx.Client(base_url=server.url, timeout=60) as client:
        error = assert_openai_error(client.post("/v1/completions", json=BODY | {"prompt": "a" * (limit + 1)}),
                                    400, "prompt")
        assert "max_model_len" in error["message"]
        chat: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "a" * (limit + 1)}]}
        assert_openai_error(client.post("/v1/chat/completions", json=chat), 400, "messages")
        assert tok.encode_threads == [] and tok.render_threads == [], "refused without tokenizing"
        assert client.post("/v1/completions", json=BODY | {"prompt": "hello"}).status_code == 200
        chat["messages"][0]["content"] = "hi"
        assert client.post("/v1/chat/completions", json=chat | {"max_tokens": 2}).status_code == 200
    assert len(tok.encode_threads) == 2 and len(tok.render_threads) == 1
    assert server.thread.ident not in tok.encode_threads + tok.render_threads, "not on the event loop's thread"


# 3. Idle and half-sent connections


def test_background_server_limits_connections_and_closes_idle_ones(serve):
    server = serve(timeout_keep_alive=1, max_connections=64)
    config = server.config
    assert (config.timeout_keep_alive, config.limit_concurrency, config.access_log) == (1, 64, False)
    assert config.h11_max_incomplete_event_size == 16 * 1024 and config.log_level == "warning"
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")  # keep-alive by default
        reply = b""
        while not reply.endswith(b"}"):
            reply += s.recv(65536)
        assert reply.startswith(b"HTTP/1.1 200")
        assert s.recv(65536) == b"", "the server closed the idle connection (a 30 s socket timeout would raise)"
    for idle in (b"", b"GET /hea", b"GET /health HTTP/1.1\r\nHost: localhost\r\n"):  # nothing, or half a head
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
            s.sendall(idle)
            assert s.recv(65536) == b"", f"the server closed a connection that sent only {idle!r}"
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:  # a header without end: refused
        s.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Junk: " + b"j" * 40000)
        assert s.recv(65536).startswith(b"HTTP/1.1 4")


def test_a_stream_cut_by_a_dead_engine_ends_with_one_error_event_and_done(tiny_model):
    """The engine stopping mid-stream: the client gets one OpenAI-shaped error event (no
    internal exception text), then [DONE], instead of a connection cut off."""
    from pagedkv.errors import EngineDeadError
    from pagedkv.server.responses import ENGINE_STOPPED, events as sse_events

    engine = LLMEngine(ModelRunner(tiny_model), EngineConfig(num_blocks=32))
    engine.add_request("r", [1, 2, 3], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    [first] = engine.step()
    engine.abort("r")
    engine.step()

    async def dying() -> Any:
        raise EngineDeadError("the engine has stopped: ZeroDivisionError('internal detail')")
        yield  # an async generator

    async def collect() -> list[str]:
        return [e async for e in sse_events(first, dying(), "cmpl-1", "text_completion", MODEL, chat=False)]

    events = asyncio.run(collect())
    assert events[-1] == "data: [DONE]\n\n"
    error = json.loads(events[-2].removeprefix("data: "))["error"]
    assert error["message"] == ENGINE_STOPPED and error["type"] == "server_error"
    assert all("internal detail" not in e for e in events)


def test_after_shutdown_requests_get_a_503_without_internal_text(tiny_model):
    from pagedkv.server.api import build_app

    engine = AsyncLLMEngine(LLMEngine(ModelRunner(tiny_model), EngineConfig(num_blocks=32)))
    with TestClient(build_app(engine, MODEL)) as client:
        before = int(time.time())
        ok = client.post("/v1/completions", json={"model": MODEL, "prompt": [1, 2], "max_tokens": 2})
        assert ok.status_code == 200 and ok.json()["created"] >= before  # the request's time
        assert client.portal is not None
        client.portal.call(engine.shutdown)
        r = client.post("/v1/completions", json={"model": MODEL, "prompt": [1, 2], "max_tokens": 2})
        assert r.status_code == 503 and r.json()["error"]["message"] == "the engine has stopped"
        assert client.get("/health").status_code == 503
