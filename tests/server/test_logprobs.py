"""Token logprobs over HTTP (issue 15, point 8), in OpenAI's shapes: completions' legacy
``logprobs: N`` gives ``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}``; chat's
``logprobs: true`` (with ``top_logprobs: N``) gives ``{"content": [{"token", "logprob",
"bytes", "top_logprobs"}]}``; whole and streamed (each chunk carries its new tokens' entries,
which add up to the whole answer's); bad values are 400s naming the field."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from pagedkv.models import ModelRunner  # noqa: E402
from pagedkv.scheduler import EngineConfig, LLMEngine  # noqa: E402
from pagedkv.server.api import build_app  # noqa: E402
from pagedkv.server.async_engine import AsyncLLMEngine  # noqa: E402

MODEL = "tiny"


def piece(token_id: int) -> str:
    return "é" if token_id % 7 == 0 else f"<{token_id}>"  # some pieces are not ASCII


class _Detok:
    def step(self, token_id: int) -> str:
        return piece(token_id)


class DecodingTokenizer:
    """Token ``t`` reads as ``piece(t)``; it has ``decode`` (as ``models.TextTokenizer`` does)."""

    chat_template: str | None = "role: content lines"

    def encode(self, text: str) -> list[int]:
        return [ord(c) % 200 + 1 for c in text]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return "".join(piece(t) for t in ids)

    def detokenizer(self) -> _Detok:
        return _Detok()

    def apply_chat_template(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages)


def make_client(tiny_model: Any, tokenizer: Any) -> TestClient:
    engine = AsyncLLMEngine(LLMEngine(ModelRunner(tiny_model), EngineConfig(num_blocks=64, max_model_len=48),
                                      tokenizer=tokenizer))
    return TestClient(build_app(engine, MODEL))


@pytest.fixture
def client(tiny_model: Any) -> Iterator[TestClient]:
    with make_client(tiny_model, DecodingTokenizer()) as c:
        yield c


CHAT: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "ignore_eos": True,
                        "max_tokens": 5, "temperature": 0}
COMPLETION: dict[str, Any] = {"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 5, "ignore_eos": True,
                              "temperature": 0}


def ok(r: Any) -> dict[str, Any]:
    assert r.status_code == 200, r.text
    return dict(r.json())


def events(r: Any) -> list[dict[str, Any]]:
    assert r.status_code == 200, r.text
    lines = [line[len("data: "):] for line in r.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def refused(r: Any, param: str) -> None:
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()


def check_completion_logprobs(lp: dict[str, Any], token_ids: list[int], n: int) -> None:
    assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert lp["tokens"] == [piece(t) for t in token_ids]
    assert len(lp["token_logprobs"]) == len(token_ids) == len(lp["top_logprobs"])
    offsets = [sum(len(piece(t)) for t in token_ids[:i]) for i in range(len(token_ids))]
    assert lp["text_offset"] == offsets
    for value, top in zip(lp["token_logprobs"], lp["top_logprobs"], strict=True):
        assert value <= 0 and len(top) <= n  # distinct ids may read alike
        values = list(top.values())
        assert values == sorted(values, reverse=True)
        assert value == pytest.approx(values[0])  # greedy: the sampled token is the top-1


def check_chat_logprobs(lp: dict[str, Any], token_ids: list[int], n: int) -> None:
    assert set(lp) == {"content"} and len(lp["content"]) == len(token_ids)
    for entry, t in zip(lp["content"], token_ids, strict=True):
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
        assert entry["token"] == piece(t) and entry["bytes"] == list(piece(t).encode())
        assert len(entry["top_logprobs"]) == n
        for alt in entry["top_logprobs"]:
            assert set(alt) == {"token", "logprob", "bytes"} and alt["bytes"] == list(alt["token"].encode())
        values = [alt["logprob"] for alt in entry["top_logprobs"]]
        assert values == sorted(values, reverse=True)
        if n:
            assert entry["logprob"] == pytest.approx(values[0]) and entry["token"] == entry["top_logprobs"][0]["token"]


def test_completions_whole_and_streamed(client: TestClient) -> None:
    plain = ok(client.post("/v1/completions", json=COMPLETION))["choices"][0]
    assert plain["logprobs"] is None
    choice = ok(client.post("/v1/completions", json=COMPLETION | {"logprobs": 3}))["choices"][0]
    assert choice["token_ids"] == plain["token_ids"]  # asking for logprobs changes no token
    check_completion_logprobs(choice["logprobs"], choice["token_ids"], 3)
    chunks = [c["choices"][0] for c in events(client.post("/v1/completions",
                                                         json=COMPLETION | {"logprobs": 3, "stream": True}))
              if c["choices"]]
    merged: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for c in chunks:
        assert c["logprobs"] is not None and len(c["logprobs"]["tokens"]) == len(c["token_ids"])
        for key in merged:
            merged[key] += c["logprobs"][key]
    assert merged == choice["logprobs"]


def test_completions_logprobs_zero_and_n_2(client: TestClient) -> None:
    choice = ok(client.post("/v1/completions", json=COMPLETION | {"logprobs": 0}))["choices"][0]
    assert choice["logprobs"]["top_logprobs"] == [{}] * 5 and len(choice["logprobs"]["token_logprobs"]) == 5
    body = COMPLETION | {"logprobs": 2, "n": 2, "temperature": 1.0, "seed": 4}
    for c in ok(client.post("/v1/completions", json=body))["choices"]:
        lp = c["logprobs"]
        assert lp["tokens"] == [piece(t) for t in c["token_ids"]] and len(lp["token_logprobs"]) == 5


def same_entries(got: list[dict[str, Any]], want: list[dict[str, Any]]) -> bool:
    """Chat logprob entries equal token for token and byte for byte, logprobs to float32's
    precision: two runs of one request may take different thread counts (the CPU runner
    follows the machine's load), and a matmul split another way rounds in the last bits."""
    def key(e: dict[str, Any]) -> tuple:
        top = tuple((t["token"], tuple(t["bytes"] or ())) for t in e["top_logprobs"])
        return e["token"], tuple(e["bytes"] or ()), top

    def values(e: dict[str, Any]) -> list[float]:
        return [e["logprob"], *(t["logprob"] for t in e["top_logprobs"])]

    return [key(e) for e in got] == [key(e) for e in want] and all(
        values(a) == pytest.approx(values(b), rel=1e-5, abs=1e-6) for a, b in zip(got, want, strict=True))


def test_chat_whole_and_streamed(client: TestClient) -> None:
    plain = ok(client.post("/v1/chat/completions", json=CHAT))["choices"][0]
    assert plain["logprobs"] is None
    choice = ok(client.post("/v1/chat/completions", json=CHAT | {"logprobs": True, "top_logprobs": 2}))["choices"][0]
    assert choice["token_ids"] == plain["token_ids"]
    check_chat_logprobs(choice["logprobs"], choice["token_ids"], 2)
    only = ok(client.post("/v1/chat/completions", json=CHAT | {"logprobs": True}))["choices"][0]
    check_chat_logprobs(only["logprobs"], only["token_ids"], 0)
    content: list[dict[str, Any]] = []
    for chunk in events(client.post("/v1/chat/completions",
                                    json=CHAT | {"logprobs": True, "top_logprobs": 2, "stream": True})):
        for c in chunk["choices"]:
            assert len(c["logprobs"]["content"]) == len(c["token_ids"])
            content += c["logprobs"]["content"]
    assert same_entries(content, choice["logprobs"]["content"])
    for chunk in events(client.post("/v1/chat/completions", json=CHAT | {"stream": True})):
        assert all(c["logprobs"] is None for c in chunk["choices"])


def test_without_a_tokenizer_tokens_read_as_their_ids(tiny_model: Any) -> None:
    with make_client(tiny_model, None) as c:
        choice = ok(c.post("/v1/completions", json=COMPLETION | {"logprobs": 1}))["choices"][0]
    lp = choice["logprobs"]
    assert lp["tokens"] == [f"token_id:{t}" for t in choice["token_ids"]]
    assert all(len(top) == 1 for top in lp["top_logprobs"])


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", COMPLETION | {"logprobs": 21}, "logprobs"),
    ("/v1/completions", COMPLETION | {"logprobs": -1}, "logprobs"),
    ("/v1/completions", COMPLETION | {"logprobs": True}, "logprobs"),
    ("/v1/chat/completions", CHAT | {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/v1/chat/completions", CHAT | {"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    ("/v1/chat/completions", CHAT | {"top_logprobs": 2}, "top_logprobs"),  # needs logprobs: true
    ("/v1/chat/completions", CHAT | {"logprobs": 3}, "logprobs"),
])
def test_bad_values_are_refused(client: TestClient, path: str, body: dict[str, Any], param: str) -> None:
    refused(client.post(path, json=body), param)


def test_a_stalled_consumer_reads_the_merged_logprobs(tiny_model: Any) -> None:
    """Outputs merged for a consumer that fell behind carry their new logprobs concatenated,
    as their new tokens are: the streamed news still adds up to the whole."""
    import asyncio

    from pagedkv.scheduler import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, logprobs=2)

    async def main() -> tuple[list[Any], list[Any]]:
        engine = AsyncLLMEngine(LLMEngine(ModelRunner(tiny_model), EngineConfig(block_size=4, num_blocks=64)))
        reference = [out async for out in engine.generate([1, 2, 3], params)]
        stream = engine.generate([1, 2, 3], params, request_id="slow")
        first = await anext(stream)
        while "slow" in engine._streams:  # the request runs to its end; its consumer reads nothing
            await asyncio.sleep(0.001)
        rest = [out async for out in stream]
        await engine.shutdown()
        return reference, [first, *rest]

    reference, stalled = asyncio.run(main())
    assert len(stalled) == 2
    whole = reference[-1].sole.logprobs
    assert whole is not None and len(whole) == 30
    assert [lp for o in stalled for lp in o.sole.new_logprobs or []] == whole
    assert [lp for o in reference for lp in o.sole.new_logprobs or []] == whole
    assert all(len(o.sole.new_logprobs or []) == len(o.sole.new_token_ids) for o in stalled)
