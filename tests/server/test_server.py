"""The OpenAI-compatible server, started on 127.0.0.1 on a free port and spoken to over real
HTTP (httpx, and the ``openai`` client package): completions equal the offline engine's,
streamed or not; 64 concurrent streaming clients with early disconnects; bad bodies get a
400 naming the field and the server goes on; injected failures end only their requests."""

from __future__ import annotations

import asyncio
import json
import random
import time

import pytest

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from pagedkv.models import ModelRunner  # noqa: E402
from pagedkv.scheduler import EngineConfig, LLMEngine, SamplingParams  # noqa: E402
from pagedkv.server.background import BackgroundServer as Server  # noqa: E402
from tests.fakes import FailingRunner  # noqa: E402
from tests.helpers import assert_drained  # noqa: E402

MODEL = "tiny"


@pytest.fixture
def serve(tiny_model):
    servers: list[Server] = []

    def start(runner=None, **kw) -> Server:
        config = EngineConfig(block_size=4, num_blocks=256, max_num_seqs=16)
        servers.append(Server(LLMEngine(runner or ModelRunner(tiny_model), config), MODEL, **kw))
        return servers[-1]

    yield start
    for s in servers:
        s.stop()
        assert not s.async_engine.is_running, "the server's shutdown stopped the engine's task"
        assert s.async_engine.num_in_flight == 0
        assert_drained(s.async_engine.engine)


def offline(tiny_model, prompt: list[int], **params) -> list[list[int]]:
    engine = LLMEngine(ModelRunner(tiny_model), EngineConfig(block_size=4, num_blocks=256))
    [out] = engine.generate([prompt], SamplingParams(**params))
    return [s.output_token_ids for s in out.outputs]


def sse_chunks(response) -> list[dict]:
    chunks = []
    for line in response.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            chunks.append(json.loads(line[6:]))
    return chunks


def test_completions_whole_and_streamed_equal_offline(serve, tiny_model):
    server = serve()
    prompts = [[5, 6, 7], [1] * 20, [9, 2]]
    with httpx.Client(base_url=server.url, timeout=60) as client:
        for prompt in prompts:
            want = offline(tiny_model, prompt, temperature=0.0, max_tokens=12, ignore_eos=True)
            body = {"model": MODEL, "prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
            r = client.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            data = r.json()
            assert data["object"] == "text_completion" and [c["token_ids"] for c in data["choices"]] == want
            assert data["choices"][0]["finish_reason"] == "length"
            usage = {"prompt_tokens": len(prompt), "completion_tokens": 12, "total_tokens": len(prompt) + 12}
            assert data["usage"] == usage
            with client.stream("POST", "/v1/completions", json=body | {"stream": True}) as r:
                assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
                chunks = sse_chunks(r)
            assert [t for c in chunks for ch in c["choices"] for t in ch["token_ids"]] == want[0]
            assert chunks[-1]["choices"][-1]["finish_reason"] == "length"
        # n = 2 with a seed: each sample as offline.
        body = {"model": MODEL, "prompt": [3, 4], "max_tokens": 6, "n": 2, "seed": 11, "ignore_eos": True}
        data = client.post("/v1/completions", json=body).json()
        want = offline(tiny_model, [3, 4], n=2, seed=11, max_tokens=6, ignore_eos=True)
        assert [c["token_ids"] for c in data["choices"]] == want
        # Streamed, with sample 0 stopping early: each sample's finish_reason is sent once.
        stop = want[0][1]
        with client.stream("POST", "/v1/completions", json=body | {"stream": True, "stop_token_ids": [stop]}) as r:
            chunks = sse_chunks(r)
        ends = [(c["index"], c["finish_reason"]) for ch in chunks for c in ch["choices"] if c["finish_reason"]]
        assert sorted(i for i, _ in ends) == [0, 1] and dict(ends)[0] == "stop"
        assert client.get("/health").json() == {"status": "ok"}
        assert client.get("/v1/models").json()["data"][0]["id"] == MODEL
        metrics = client.get("/metrics").text
        for name in ("pagedkv_requests_running 0", "pagedkv_requests_waiting 0", "pagedkv_kv_blocks_used",
                     "pagedkv_preemptions_total", "pagedkv_prefix_cache_hit_rate",
                     'pagedkv_time_to_first_token_seconds_bucket{le="+Inf"}',
                     "pagedkv_inter_token_latency_seconds_count"):
            assert name in metrics


def test_the_openai_client_package_works(serve, tiny_model):
    openai = pytest.importorskip("openai")
    server = serve()
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    want = offline(tiny_model, [5, 6, 7], temperature=0.0, max_tokens=8, ignore_eos=True)[0]
    extra = {"ignore_eos": True}
    done = client.completions.create(model=MODEL, prompt=[5, 6, 7], max_tokens=8, temperature=0, extra_body=extra)
    assert done.choices[0].model_extra["token_ids"] == want
    stream = client.completions.create(model=MODEL, prompt=[5, 6, 7], max_tokens=8, temperature=0, stream=True,
                                       extra_body=extra)
    assert [t for chunk in stream for c in chunk.choices for t in c.model_extra["token_ids"]] == want
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model=MODEL, prompt=[1], temperature=7)
    assert [m.id for m in client.models.list()] == [MODEL]


@pytest.mark.parametrize("body, field, says", [
    ({"prompt": [1, 2]}, "model", "Field required"),
    ({"model": MODEL}, "prompt", "Field required"),
    ({"model": MODEL, "prompt": [1], "temperature": "hot"}, "temperature", "valid number"),
    ({"model": MODEL, "prompt": [1], "temperature": 5.0}, "temperature", "less than or equal to 2"),
    ({"model": MODEL, "prompt": [1], "top_p": 0}, "top_p", "greater than 0"),
    ({"model": MODEL, "prompt": [1], "max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
    ({"model": MODEL, "prompt": [1], "n": 0}, "n", "greater than or equal to 1"),
    ({"model": MODEL, "prompt": [1], "n": 2, "seed": 2**63 - 1}, "seed", "seed + n - 1"),
    ({"model": MODEL, "prompt": [1], "stream": "yes"}, "stream", "valid boolean"),
    ({"model": MODEL, "prompt": "text, but the model has no tokenizer"}, "prompt", "tokenizer"),
    ({"model": MODEL, "prompt": [1] * 600}, "prompt", "max_model_len"),
    ({"model": MODEL, "prompt": [10**9]}, "prompt", "vocabulary"),
    ({"model": "gpt-4", "prompt": [1]}, "model", "unknown model"),
    ({"model": MODEL, "prompt": [1], "stop": ["\n"]}, "stop", "stop strings need an engine with a tokenizer"),
])
def test_bad_bodies_get_a_400_that_says_what_is_wrong(serve, tiny_model, body, field, says):
    server = serve()
    with httpx.Client(base_url=server.url, timeout=60) as client:
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == field and says in error["message"], error
        r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": []})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
        ok = client.post("/v1/completions", json={"model": MODEL, "prompt": [1, 2], "max_tokens": 2})
        assert ok.status_code == 200, "the server keeps serving"


def test_64_streaming_clients_with_early_disconnects(serve, tiny_model):
    server = serve()
    rng = random.Random(3)
    jobs = []
    for _ in range(64):
        prompt = [rng.randrange(1, 200) for _ in range(rng.randint(1, 30))]
        jobs.append((prompt, rng.randint(4, 24), rng.random() < 0.3))
    engine = LLMEngine(ModelRunner(tiny_model), EngineConfig(block_size=4, num_blocks=512))
    wants = [o.output_token_ids for o in engine.generate(
        [p for p, _, _ in jobs], [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for _, m, _ in jobs])]

    async def client_job(client, prompt, max_tokens, disconnect):
        body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                "stream": True}
        tokens = []
        async with client.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    tokens += [t for c in json.loads(line[6:])["choices"] for t in c["token_ids"]]
                    if disconnect and len(tokens) >= 2:
                        return None  # leaves the stream: the server must abort the request
        return tokens

    async def main():
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as client:
            return await asyncio.gather(*(client_job(client, *job) for job in jobs))

    results = asyncio.run(main())
    for (_, _, disconnect), got, want in zip(jobs, results, wants, strict=True):
        if not disconnect:
            assert got == want
    deadline = time.monotonic() + 30
    scheduler = server.async_engine.engine.scheduler
    while (scheduler.has_unfinished_requests() or server.async_engine.num_in_flight) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not scheduler.has_unfinished_requests() and server.async_engine.num_in_flight == 0
    assert 0 < server.async_engine.num_cancelled <= sum(d for _, _, d in jobs)


def test_injected_failures_end_only_their_requests(serve, tiny_model):
    nan_prompt = [42] * 5  # this request's logits turn NaN
    server = serve(FailingRunner(ModelRunner(tiny_model), fail_steps={4},
                                 nan_request=lambda r: r.prompt_token_ids == nan_prompt))

    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            async def one(prompt, stream):
                body = {"model": MODEL, "prompt": prompt, "max_tokens": 6, "temperature": 0, "ignore_eos": True,
                        "stream": stream}
                if not stream:
                    r = await client.post("/v1/completions", json=body)
                    return r.status_code, r.json()
                async with client.stream("POST", "/v1/completions", json=body) as r:
                    lines = [json.loads(line[6:]) async for line in r.aiter_lines() if line.startswith("data: {")]
                    return r.status_code, lines
            results = await asyncio.gather(*(one([i + 1] * 5, i % 2 == 0) for i in range(6)))
            return results, await one(nan_prompt, False), await one(nan_prompt, True)

    results, nan_whole, nan_streamed = asyncio.run(main())
    assert nan_whole[0] == 500 and "non-finite logits" in nan_whole[1]["error"]["message"]
    assert nan_streamed[0] == 500, "its first token never came: the error precedes the stream"
    errors = 0
    for i, (status, body) in enumerate(results):
        want = offline(tiny_model, [i + 1] * 5, temperature=0.0, max_tokens=6, ignore_eos=True)[0]
        if i % 2:  # whole
            if status == 500:
                errors += 1
                assert "injected failure" in body["error"]["message"]
            else:
                assert body["choices"][0]["token_ids"] == want
        else:  # streamed: exactly one terminal error event, or the full output
            failed = [c for c in body if "error" in c]
            assert len(failed) <= 1
            errors += len(failed)
            if not failed:
                assert [t for c in body for ch in c["choices"] for t in ch["token_ids"]] == want
    assert errors > 0
    with httpx.Client(base_url=server.url, timeout=60) as client:
        r = client.post("/v1/completions", json={"model": MODEL, "prompt": [1, 2], "max_tokens": 3, "temperature": 0})
        assert r.status_code == 200, "the engine serves new requests"


def test_chat_completions_with_smollm2_equal_offline(smollm2):
    model, tok = smollm2
    engine = LLMEngine(ModelRunner(model), EngineConfig(block_size=16, num_blocks=64), tokenizer=tok)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    [want] = engine.generate([tok.apply_chat_template(messages)], SamplingParams(temperature=0.0, max_tokens=12))
    server = Server(LLMEngine(ModelRunner(model), EngineConfig(block_size=16, num_blocks=64), tokenizer=tok),
                    name="smollm2-135m")
    try:
        with httpx.Client(base_url=server.url, timeout=120) as client:
            body = {"model": "smollm2-135m", "messages": messages, "max_tokens": 12, "temperature": 0}
            data = client.post("/v1/chat/completions", json=body).json()
            assert data["object"] == "chat.completion"
            assert data["choices"][0]["message"] == {"role": "assistant", "content": want.text}
            with client.stream("POST", "/v1/chat/completions", json=body | {"stream": True}) as r:
                chunks = sse_chunks(r)
            assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
            assert "".join(c["delta"]["content"] for ch in chunks for c in ch["choices"]) == want.text
            r = client.post("/v1/completions", json={"model": "smollm2-135m", "prompt": "word " * 9000})
            assert r.status_code == 400 and "max_model_len" in r.json()["error"]["message"]
    finally:
        server.stop()
    assert_drained(server.async_engine.engine)
