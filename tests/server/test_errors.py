"""Errors are OpenAI-shaped everywhere (issue 15, point 9): a body that is not valid JSON, empty or
not an object is a 400 with ``param`` null (never FastAPI's character offset); ``param`` names a
field (never a pydantic union member such as ``prompt.str``); unknown paths are 404s and wrong
methods 405s in the same shape; an unexpected failure is a 500 in the same shape; nothing is ever a
422. The OpenAPI schema documents each route's error responses with the error body's model, and
no 422."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from pagedkv.models import ModelRunner  # noqa: E402
from pagedkv.scheduler import EngineConfig, LLMEngine  # noqa: E402
from pagedkv.server.api import ErrorBody, build_app  # noqa: E402
from pagedkv.server.async_engine import AsyncLLMEngine  # noqa: E402
from tests.helpers import CharTokenizer  # noqa: E402

MODEL = "tiny"
ROUTES = ("/v1/completions", "/v1/chat/completions")
JSON = {"content-type": "application/json"}




def make_engine(tiny_model: Any) -> AsyncLLMEngine:
    config = EngineConfig(num_blocks=64, max_model_len=48)
    return AsyncLLMEngine(LLMEngine(ModelRunner(tiny_model), config, tokenizer=CharTokenizer()))


@pytest.fixture
def client(tiny_model: Any) -> Iterator[TestClient]:
    with TestClient(build_app(make_engine(tiny_model), MODEL)) as c:
        yield c


def error_of(r: Any, status: int) -> dict[str, Any]:
    """The error object of a response that must be ``status`` with a body in OpenAI's shape."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json"), r.headers
    body = r.json()
    ErrorBody.model_validate(body, strict=True)  # exactly {"error": {message, type, param, code}}
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"], body
    return dict(body["error"])


def post(client: TestClient, path: str, content: bytes | str, headers: dict[str, str] | None = None) -> Any:
    return client.post(path, content=content, headers=JSON if headers is None else headers)


# 1. Bodies refused as a whole: param null


@pytest.mark.parametrize("path", ROUTES)
@pytest.mark.parametrize("content", [b"{bad", b'{"model": "tiny",', b'{"model": "tiny"} x', b"\x80\x81", b"\xff\xfe",
                                     b"[1,", b"NaN-ish", b"'single'"])
def test_invalid_json_is_a_400_with_no_param(client: TestClient, path: str, content: bytes) -> None:
    error = error_of(post(client, path, content), 400)
    assert error["param"] is None, error  # FastAPI's loc is ("body", <character offset>)
    assert "not valid JSON" in error["message"], error
    assert error["type"] == "invalid_request_error" and error["code"] is None


@pytest.mark.parametrize("path", ROUTES)
@pytest.mark.parametrize(("content", "kind"), [("[]", "an array"), ('[{"model": "tiny"}]', "an array"),
                                               ("3", "a number"), ("1.5", "a number"), ('"text"', "a string"),
                                               ("null", "null"), ("true", "a boolean")])
def test_a_body_that_is_not_an_object_is_a_400_with_no_param(client: TestClient, path: str, content: str,
                                                              kind: str) -> None:
    error = error_of(post(client, path, content), 400)
    assert error["param"] is None and error["message"] == f"the request body must be a JSON object, not {kind}"


@pytest.mark.parametrize("path", ROUTES)
def test_an_empty_body_is_a_400_with_no_param(client: TestClient, path: str) -> None:
    error = error_of(post(client, path, b""), 400)
    assert error["param"] is None and "empty" in error["message"], error


@pytest.mark.parametrize("headers", [{"content-type": "text/plain"}, {}])
def test_a_body_not_sent_as_json_says_so(client: TestClient, headers: dict[str, str]) -> None:
    body = json.dumps({"model": MODEL, "prompt": [1], "max_tokens": 1})
    error = error_of(post(client, "/v1/completions", body, headers), 400)
    assert error["param"] is None and "Content-Type: application/json" in error["message"], error


# 2. param names a field


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/completions", {"model": MODEL, "prompt": 5}, "prompt"),  # pydantic: prompt.str, prompt.list[int]
    ("/v1/completions", {"model": MODEL, "prompt": ["a"]}, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": [1], "stop": [1]}, "stop"),
    ("/v1/completions", {"model": MODEL, "prompt": [1], "logit_bias": {"7": "x"}}, "logit_bias.7"),
    ("/v1/completions", {"prompt": [1]}, "model"),
    ("/v1/completions", {"model": MODEL, "prompt": [1], "max_tokens": "3"}, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": [1], "tools": []}, "tools"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [5]}, "messages.0"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user"}]}, "messages.0.content"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": [{"type": 1}]}]},
     "messages.0.content"),  # pydantic: messages.0.content.str, then ...content.list[ChatContentPart].0.type
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": [{}]}]},
     "messages.0.content"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "bot", "content": "hi"}]}, "messages.0.role"),
])
def test_param_names_a_field_never_a_union_member(client: TestClient, path: str, body: dict[str, Any],
                                                   param: str) -> None:
    error = error_of(client.post(path, json=body), 400)
    assert error["param"] == param, error
    assert ".str" not in error["message"] and "list[" not in error["message"], error


def test_an_empty_field_name_is_named_as_such(client: TestClient) -> None:
    error = error_of(client.post("/v1/completions", json={"model": MODEL, "prompt": [1], "": 1}), 400)
    assert error["param"] is None and error["message"] == "'' (an empty field name): not supported by this server"


def test_a_field_error_message_names_each_field(client: TestClient) -> None:
    error = error_of(client.post("/v1/completions", json={"model": MODEL, "prompt": 5}), 400)
    assert error["message"] == "prompt: Input should be a valid string; prompt: Input should be a valid list"


def test_many_field_errors_are_told_up_to_ten(client: TestClient) -> None:
    body = {"model": MODEL, "messages": [5] * 30}
    error = error_of(client.post("/v1/chat/completions", json=body), 400)
    assert error["param"] == "messages.0" and error["message"].endswith("; and 20 more"), error


# 3. Unknown paths, wrong methods, unexpected failures


@pytest.mark.parametrize(("method", "path"), [("GET", "/nope"), ("POST", "/v1/nope"), ("GET", "/v1"),
                                              ("POST", "/v1/completions/extra"), ("DELETE", "/v2/models")])
def test_an_unknown_path_is_a_404_in_openai_shape(client: TestClient, method: str, path: str) -> None:
    error = error_of(client.request(method, path), 404)
    assert error["type"] == "not_found_error" and error["param"] is None, error
    assert f"{method} {path}" in error["message"], error


@pytest.mark.parametrize(("method", "path", "allow"), [("GET", "/v1/completions", "POST"),
                                                       ("PUT", "/v1/chat/completions", "POST"),
                                                       ("POST", "/health", "GET"), ("DELETE", "/v1/models", "GET"),
                                                       ("POST", "/metrics", "GET")])
def test_a_wrong_method_is_a_405_in_openai_shape(client: TestClient, method: str, path: str, allow: str) -> None:
    r = client.request(method, path)
    error = error_of(r, 405)
    assert error["type"] == "invalid_request_error" and error["param"] is None, error
    assert r.headers["allow"] == allow and f"use {allow}" in error["message"], error


def test_the_gates_refusals_keep_the_shape(tiny_model: Any) -> None:
    app = build_app(make_engine(tiny_model), MODEL, api_key="k", allowed_hosts={"testserver"}, max_body_bytes=64)
    with TestClient(app) as c:
        assert error_of(c.post("/v1/completions", json={}), 401)["code"] == "invalid_api_key"
        assert error_of(c.get("/health", headers={"host": "evil.example"}), 421)["param"] is None
        auth = {"authorization": "Bearer k"}
        error_of(c.post("/v1/completions", json={"model": MODEL, "prompt": "x" * 100}, headers=auth), 413)
        error_of(c.get("/v1/nope", headers=auth), 404)


def test_an_unexpected_failure_is_a_500_in_openai_shape(tiny_model: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = make_engine(tiny_model)

    async def broken(text: str | Sequence[int]) -> list[int]:
        raise RuntimeError("a bug")

    monkeypatch.setattr(engine, "tokenize", broken)
    with TestClient(build_app(engine, MODEL), raise_server_exceptions=False) as c:
        error = error_of(c.post("/v1/completions", json={"model": MODEL, "prompt": "hi"}), 500)
        assert error["type"] == "server_error" and "a bug" not in error["message"], error
        assert c.post("/v1/completions", json={"model": MODEL, "prompt": [1], "max_tokens": 1}).status_code == 200


@pytest.mark.parametrize("body", [
    {}, {"model": 1}, {"model": MODEL, "prompt": None}, {"model": MODEL, "prompt": {"a": 1}},
    {"model": MODEL, "prompt": [1], "n": "2"}, {"model": MODEL, "prompt": [1], "stream": "yes"},
    {"model": MODEL, "messages": []}, {"model": MODEL, "messages": [{}]}, {"model": MODEL, "messages": None},
])
@pytest.mark.parametrize("path", ROUTES)
def test_nothing_is_a_422(client: TestClient, path: str, body: dict[str, Any]) -> None:
    error_of(client.post(path, json=body), 400)


# 4. The OpenAPI schema


def responses_of(spec: dict[str, Any], path: str, method: str) -> dict[str, Any]:
    return dict(spec["paths"][path][method]["responses"])


def test_openapi_documents_each_routes_errors_with_the_error_model(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    expected = {("/v1/completions", "post"): {"400", "413", "500", "503"},
                ("/v1/chat/completions", "post"): {"400", "413", "500", "503"},
                ("/health", "get"): {"413", "503"}, ("/v1/models", "get"): {"413"}, ("/metrics", "get"): {"413"}}
    for (path, method), codes in expected.items():
        responses = responses_of(spec, path, method)
        assert set(responses) == {"200", "default"} | codes, (path, responses.keys())
        for code in codes | {"default"}:
            schema = responses[code]["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/ErrorBody"}, (path, code, schema)
            assert responses[code]["description"], (path, code)
    schemas = spec["components"]["schemas"]
    assert schemas["ErrorBody"]["required"] == ["error"]
    detail = schemas["ErrorDetail"]
    assert set(detail["properties"]) == {"message", "type", "param", "code"} == set(detail["required"])


def test_openapi_advertises_no_422(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            assert "422" not in operation["responses"], (path, method)
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    assert "ValidationError" not in spec["components"]["schemas"]


def test_openapi_documents_the_gate_as_configured(tiny_model: Any) -> None:
    app = build_app(make_engine(tiny_model), MODEL, api_key="k", allowed_hosts={"testserver"})
    with TestClient(app) as c:
        spec = c.get("/openapi.json").json()
    assert {"401", "421"} <= set(responses_of(spec, "/v1/completions", "post"))
    assert {"401", "421"} <= set(responses_of(spec, "/v1/models", "get"))
    health = responses_of(spec, "/health", "get")
    assert "421" in health and "401" not in health  # /health stays open to probes


def test_the_error_model_describes_real_error_bodies(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    detail = spec["components"]["schemas"]["ErrorDetail"]["properties"]
    r = client.post("/v1/completions", json={"model": "other", "prompt": [1]})
    error = error_of(r, 400)
    assert error["param"] == "model"
    assert {"type": "string"} in detail["param"]["anyOf"] and {"type": "null"} in detail["param"]["anyOf"]
