"""The OpenAI request fields the server honours, and those it refuses (issue 15, point 8):
``max_completion_tokens`` is ``max_tokens``; a chat reply without a budget may use the rest of
the context; message content may be a list of text parts; ``developer`` is ``system``; every
OpenAI field we cannot honour is a 400 naming it, never a 200 that ignored it."""

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
MAX_MODEL_LEN = 48


class _Detok:
    def step(self, token_id: int) -> str:
        return "x"


class TemplateTokenizer:
    """One token per character, and a chat template that records the messages it renders."""

    chat_template: str | None = "role: content lines"

    def __init__(self) -> None:
        self.rendered: list[list[dict[str, str]]] = []

    def encode(self, text: str) -> list[int]:
        return [ord(c) % 200 + 1 for c in text]

    def detokenizer(self) -> _Detok:
        return _Detok()

    def apply_chat_template(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> str:
        self.rendered.append([dict(m) for m in messages])
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages)


@pytest.fixture
def tokenizer() -> TemplateTokenizer:
    return TemplateTokenizer()


@pytest.fixture
def client(tiny_model: Any, tokenizer: TemplateTokenizer) -> Iterator[TestClient]:
    config = EngineConfig(num_blocks=64, max_model_len=MAX_MODEL_LEN)
    engine = AsyncLLMEngine(LLMEngine(ModelRunner(tiny_model), config, tokenizer=tokenizer))
    with TestClient(build_app(engine, MODEL)) as c:
        yield c


CHAT: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "ignore_eos": True}
COMPLETION: dict[str, Any] = {"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 2}


def refused(r: Any, param: str, says: str) -> None:
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and says in error["message"], error
    assert error["type"] == "invalid_request_error"


def completion_tokens(r: Any) -> int:
    assert r.status_code == 200, r.text
    return int(r.json()["usage"]["completion_tokens"])


# a. max_completion_tokens


def test_max_completion_tokens_is_max_tokens(client: TestClient) -> None:
    assert completion_tokens(client.post("/v1/chat/completions", json=CHAT | {"max_completion_tokens": 3})) == 3
    same = CHAT | {"max_completion_tokens": 3, "max_tokens": 3}
    assert completion_tokens(client.post("/v1/chat/completions", json=same)) == 3
    differ = client.post("/v1/chat/completions", json=CHAT | {"max_completion_tokens": 3, "max_tokens": 4})
    refused(differ, "max_completion_tokens", "disagree")
    refused(client.post("/v1/chat/completions", json=CHAT | {"max_completion_tokens": 0}),
            "max_completion_tokens", "greater than or equal to 1")
    streamed = client.post("/v1/chat/completions", json=CHAT | {"max_completion_tokens": 2, "stream": True})
    assert streamed.status_code == 200 and '"completion_tokens": 2' in streamed.text


def test_the_openai_client_sends_max_completion_tokens(client: TestClient) -> None:
    openai = pytest.importorskip("openai")
    api = openai.OpenAI(base_url="http://testserver/v1", api_key="-", http_client=client)
    reply = api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                        max_completion_tokens=3, extra_body={"ignore_eos": True})
    assert reply.usage is not None and reply.usage.completion_tokens == 3
    assert reply.choices[0].finish_reason == "length"


# b. default budgets


def test_chat_without_a_budget_may_use_the_rest_of_the_context(client: TestClient) -> None:
    r = client.post("/v1/chat/completions", json=CHAT)
    usage = r.json()["usage"]
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length", r.text
    assert usage["prompt_tokens"] == len("user: hi\n")
    assert usage["total_tokens"] == MAX_MODEL_LEN, "max_model_len minus the prompt, not 16"


def test_chat_that_fills_the_context_is_refused_for_its_length(client: TestClient) -> None:
    long = CHAT | {"messages": [{"role": "user", "content": "a" * MAX_MODEL_LEN}]}
    refused(client.post("/v1/chat/completions", json=long), "prompt", "max_model_len")


def test_completions_keep_openais_default_of_16(client: TestClient) -> None:
    body = {"model": MODEL, "prompt": [1, 2, 3], "ignore_eos": True}
    assert completion_tokens(client.post("/v1/completions", json=body)) == 16


# c. content parts and the developer role


def test_content_may_be_a_list_of_text_parts(client: TestClient, tokenizer: TemplateTokenizer) -> None:
    parts = [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]
    body = CHAT | {"messages": [{"role": "developer", "content": "be brief"}, {"role": "user", "content": parts}],
                   "max_tokens": 1}
    assert completion_tokens(client.post("/v1/chat/completions", json=body)) == 1
    assert tokenizer.rendered == [[{"role": "system", "content": "be brief"}, {"role": "user", "content": "one\ntwo"}]]


@pytest.mark.parametrize("part, says", [
    ({"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}, "not supported"),
    ({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}, "not supported"),
    ({"type": "text"}, "a text part needs its 'text'"),
])
def test_parts_other_than_text_are_refused(client: TestClient, tokenizer: TemplateTokenizer,
                                           part: dict[str, Any], says: str) -> None:
    content = [{"type": "text", "text": "what is this?"}, part]
    r = client.post("/v1/chat/completions", json=CHAT | {"messages": [{"role": "user", "content": content}]})
    refused(r, "messages", says)
    assert "content[1]" in r.json()["error"]["message"]
    assert tokenizer.rendered == [], "refused before rendering"


def test_tool_messages_and_message_fields_are_refused(client: TestClient) -> None:
    tool = {"role": "tool", "content": "42", "tool_call_id": "c1"}
    r = client.post("/v1/chat/completions", json=CHAT | {"messages": [tool]})
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("messages.0"), r.text
    named = {"role": "user", "content": "hi", "name": "alice"}
    refused(client.post("/v1/chat/completions", json=CHAT | {"messages": [named]}),
            "messages.0.name", "not supported")


# d. what we cannot honour is refused, naming the field


@pytest.mark.parametrize("field, value", [
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
    ("tool_choice", "auto"),
    ("functions", [{"name": "f", "parameters": {}}]),
    ("function_call", "auto"),
    ("response_format", {"type": "json_object"}),
    ("parallel_tool_calls", True),
    ("stream_options", {"include_usage": True}),
    ("logit_bias", {"5": 10}),
    ("presence_penalty", 0.5),
    ("frequency_penalty", -1),
    ("no_such_field", 1),
])
def test_chat_refuses_what_it_cannot_honour(client: TestClient, field: str, value: Any) -> None:
    refused(client.post("/v1/chat/completions", json=CHAT | {"max_tokens": 1, field: value}), field, "not supported")


@pytest.mark.parametrize("field, value", [
    ("best_of", 2),
    ("suffix", "and then"),
    ("echo", True),
    ("logit_bias", {"5": 10}),
    ("presence_penalty", 1),
    ("frequency_penalty", 0.1),
    ("stream_options", {"include_usage": True}),
    ("tools", []),
    ("max_completion_tokens", 2),  # a chat field
])
def test_completions_refuse_what_they_cannot_honour(client: TestClient, field: str, value: Any) -> None:
    refused(client.post("/v1/completions", json=COMPLETION | {field: value}), field, "not supported")


def test_best_of_below_1_is_a_bad_value(client: TestClient) -> None:
    refused(client.post("/v1/completions", json=COMPLETION | {"best_of": 0}), "best_of", "greater than or equal to 1")


def test_neutral_values_and_user_are_accepted(client: TestClient) -> None:
    neutral = {"presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {}, "user": "u-1", "tools": None,
               "response_format": None, "stream_options": None}
    assert completion_tokens(client.post("/v1/chat/completions", json=CHAT | neutral | {
        "max_tokens": 2, "logprobs": False, "top_logprobs": 0})) == 2
    assert completion_tokens(client.post("/v1/completions", json=COMPLETION | neutral | {
        "best_of": 1, "echo": False, "suffix": "", "logprobs": None})) == 2


def test_an_unsupported_field_is_named_before_other_errors(client: TestClient) -> None:
    r = client.post("/v1/completions", json={"model": MODEL, "temperature": "hot", "tools": [1]})
    refused(r, "tools", "tools: not supported by this server")
    assert "prompt" in r.json()["error"]["message"] and "temperature" in r.json()["error"]["message"]


def test_stop_strings_end_the_answer_before_them(client: TestClient) -> None:
    """Each token reads "x" here: a stop string of three x's stops at the third token, and the
    answer ends before it (so it is empty), whole or streamed."""
    body = CHAT | {"stop": ["yy", "xxx"], "max_tokens": 10}
    whole = client.post("/v1/chat/completions", json=body).json()
    assert whole["choices"][0]["finish_reason"] == "stop" and whole["choices"][0]["message"]["content"] == ""
    assert whole["usage"]["completion_tokens"] == 3
    with client.stream("POST", "/v1/chat/completions", json=body | {"stream": True}) as r:
        events = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    chunks = [json.loads(e) for e in events[:-1]]
    assert events[-1] == "[DONE]" and chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == ""
    refused(client.post("/v1/chat/completions", json=CHAT | {"stop": [""]}), "stop", "stop")


def test_a_lone_surrogate_in_chat_content_is_a_400_naming_messages(client: TestClient) -> None:
    body = json.dumps(CHAT | {"messages": [{"role": "user", "content": "a\ud800b"}]})  # \ud800 in the JSON
    r = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    refused(r, "messages", "lone surrogate")


def test_the_chat_default_budget_fits_a_pool_smaller_than_the_context(tiny_model: Any,
                                                                      tokenizer: TemplateTokenizer) -> None:
    """A pool of 8 blocks of 4 tokens holds 33 tokens of one request, less than max_model_len
    (48): the default budget is what the pool holds, not a 400 about a max_tokens never sent."""
    engine = LLMEngine(ModelRunner(tiny_model), EngineConfig(block_size=4, num_blocks=8, max_model_len=MAX_MODEL_LEN),
                       tokenizer=tokenizer)
    with TestClient(build_app(AsyncLLMEngine(engine), MODEL)) as c:
        r = c.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["total_tokens"] == 33
