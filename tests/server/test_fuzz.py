"""A schema-driven fuzz of the server (issue 15): request bodies generated from the app's own
``/openapi.json`` (:func:`from_schema`, hypothesis strategies for the JSON Schema subset pydantic
publishes, over the request schemas as published and nudged towards requests the engine runs),
near-valid bodies with one field replaced by any JSON value or
an undeclared field added, arbitrary JSON values, raw bytes, and unknown paths and methods. No
response may be a 5xx or a 422, every error body is in OpenAI's shape with ``param`` naming a
field (or null), no stream carries an error event, and the engine's pool is whole at the end.

Bounded for CI: ``FUZZ_EXAMPLES`` examples (a few seconds on two cores), derandomized so that
a run is reproducible; set ``PAGEDKV_FUZZ_RANDOM=1`` to explore new examples, and
``PAGEDKV_FUZZ_EXAMPLES`` to run more."""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from pagedkv.models import ModelRunner  # noqa: E402
from pagedkv.scheduler import EngineConfig, LLMEngine  # noqa: E402
from pagedkv.server.api import ErrorBody, build_app  # noqa: E402
from pagedkv.server.async_engine import AsyncLLMEngine  # noqa: E402
from tests.helpers import CharTokenizer, assert_drained  # noqa: E402

MODEL = "tiny"
MAX_MODEL_LEN = 48
FUZZ_EXAMPLES = int(os.environ.get("PAGEDKV_FUZZ_EXAMPLES", "300"))
ROUTES = {"/v1/completions": "CompletionRequest", "/v1/chat/completions": "ChatCompletionRequest"}
ERROR_TYPES = {"invalid_request_error", "not_found_error", "server_error"}


class LetterTokenizer(CharTokenizer):
    """Tokens read as letters, so that generated text varies and stop strings can match."""

    def step(self, token_id: int) -> str:
        return chr(ord("a") + token_id % 26)


@pytest.fixture
def served(tiny_model: Any) -> Iterator[tuple[TestClient, LLMEngine]]:
    engine = LLMEngine(ModelRunner(tiny_model), EngineConfig(num_blocks=64, max_model_len=MAX_MODEL_LEN),
                       tokenizer=LetterTokenizer())
    with TestClient(build_app(AsyncLLMEngine(engine), MODEL)) as client:
        yield client, engine
    assert_drained(engine)  # after shutdown too


def resolved(schema: Any, components: dict[str, Any]) -> Any:
    """``schema`` with every ``#/components/schemas/...`` reference replaced by its target (the
    request models are not recursive)."""
    if isinstance(schema, dict):
        if "$ref" in schema:
            return resolved(components[schema["$ref"].rsplit("/", 1)[1]], components)
        return {k: resolved(v, components) for k, v in schema.items()}
    if isinstance(schema, list):
        return [resolved(v, components) for v in schema]
    return schema


def request_schemas(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each fuzzed route's request-body schema, read from the OpenAPI document, refs resolved."""
    components = spec["components"]["schemas"]
    schemas = {}
    for path, name in ROUTES.items():
        ref = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert ref == {"$ref": f"#/components/schemas/{name}"}, ref
        schemas[path] = resolved(ref, components)
    return schemas


def runnable(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema narrowed towards requests the engine accepts and runs quickly: our model (mostly),
    small budgets and n, values in range, the neutral value of the fields we accept only so, text
    content parts. Fields not named here keep the published schema."""
    schema = copy.deepcopy(schema)
    props = schema["properties"]

    def nullable(sub: dict[str, Any]) -> dict[str, Any]:
        return {"anyOf": [sub, {"type": "null"}]}

    narrowed = {
        "model": {"enum": [MODEL, MODEL, MODEL, "other"]},
        "priority": {"enum": [0, 0, 0, 1]},
        "max_tokens": nullable({"type": "integer", "minimum": -1, "maximum": 6}),
        "max_completion_tokens": nullable({"type": "integer", "minimum": 0, "maximum": 6}),
        "n": nullable({"type": "integer", "minimum": 0, "maximum": 3}),
        "top_k": nullable({"type": "integer", "minimum": -1, "maximum": 300}),
        "temperature": nullable({"type": "number", "minimum": 0, "maximum": 2.5}),
        "top_p": nullable({"type": "number", "minimum": 0, "maximum": 1}),
        "seed": nullable({"type": "integer", "minimum": -1, "maximum": 1000}),
        "stop": nullable({"anyOf": [{"type": "string", "maxLength": 3},
                                    {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 2}]}),
        "stop_token_ids": nullable({"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 260},
                                    "maxItems": 3}),
        # accepted only with their neutral value: mostly that, sometimes another
        "presence_penalty": {"enum": [None, 0, 0.0, None, 0, 0.5]},
        "frequency_penalty": {"enum": [None, 0, 0.0, None, 0, -0.5]},
        "logit_bias": {"enum": [None, {}, None, {}, None, {"1": 1.0}]},
        "best_of": {"enum": [None, 1, None, 1, None, 2]},
        "echo": {"enum": [None, False, None, False, None, True]},
        "suffix": {"enum": [None, "", None, "", None, "s"]},
        # completions: that many top alternatives (0..20); chat: a boolean, with top_logprobs 0..20
        "logprobs": nullable({"type": "integer", "minimum": -1, "maximum": 21} if "prompt" in props
                             else {"type": "boolean"}),
        "top_logprobs": nullable({"type": "integer", "minimum": -1, "maximum": 21}),
        "prompt": {"anyOf": [{"type": "string", "maxLength": 12},
                             {"type": "array", "items": {"type": "integer", "minimum": -1, "maximum": 260},
                              "minItems": 1, "maxItems": 12}]},
    }
    props.update({name: sub for name, sub in narrowed.items() if name in props})
    if "messages" in props:
        message = copy.deepcopy(props["messages"]["items"])
        part = {"type": "object", "required": ["type", "text"],
                "properties": {"type": {"enum": ["text", "text", "image_url"]},
                               "text": {"type": "string", "maxLength": 8}}}
        message["properties"]["content"] = {"anyOf": [{"type": "string", "maxLength": 12},
                                                      {"type": "array", "items": part, "maxItems": 2}]}
        props["messages"] = {"type": "array", "items": message, "minItems": 1, "maxItems": 3}
    return schema


def from_schema(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Values valid for ``schema``, in the subset of JSON Schema that pydantic's models publish
    (type, anyOf, enum, properties/required/additionalProperties, items, the length and range
    bounds), refs resolved. (hypothesis-jsonschema does not work with current hypothesis.)"""
    if "anyOf" in schema:
        return st.one_of([from_schema(s) for s in schema["anyOf"]])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    if "const" in schema:
        return st.just(schema["const"])
    kind = schema.get("type")
    if kind == "object":
        props, required = schema.get("properties", {}), set(schema.get("required", ()))
        extra = schema.get("additionalProperties", True)
        if not props:  # a map: additionalProperties is the values' schema
            values = from_schema(extra) if isinstance(extra, dict) else json_values()
            return st.dictionaries(st.text(max_size=8), values, max_size=3)
        fields = {name: from_schema(sub) for name, sub in props.items()}
        return st.fixed_dictionaries({k: v for k, v in fields.items() if k in required},
                                     optional={k: v for k, v in fields.items() if k not in required})
    if kind == "array":
        return st.lists(from_schema(schema.get("items", {})), min_size=schema.get("minItems", 0),
                        max_size=schema.get("maxItems", 4))
    if kind == "string":
        return st.text(min_size=schema.get("minLength", 0), max_size=schema.get("maxLength", 16))
    if kind == "integer":
        low, high = schema.get("minimum"), schema.get("maximum")
        return st.integers(None if low is None else int(low), None if high is None else int(high))
    if kind == "number":
        return st.floats(schema.get("minimum"), schema.get("maximum"), allow_nan=False, allow_infinity=False)
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    return json_values()  # {}: any value


def json_values() -> st.SearchStrategy[Any]:
    scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=12)


def near_valid(valid: st.SearchStrategy[dict[str, Any]], fields: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    """A runnable body with one field replaced by any JSON value, removed, or an undeclared one added."""
    replaced = st.tuples(valid, st.sampled_from(fields), json_values()).map(lambda t: t[0] | {t[1]: t[2]})
    removed = st.tuples(valid, st.sampled_from(fields)).map(lambda t: {k: v for k, v in t[0].items() if k != t[1]})
    added = st.tuples(valid, st.text(max_size=12), json_values()).map(lambda t: t[0] | {t[1]: t[2]})
    return replaced | removed | added


def cases(spec: dict[str, Any]) -> st.SearchStrategy[tuple[str, str, bytes, dict[str, str]]]:
    """``(method, path, body, headers)`` to send."""
    json_header = {"content-type": "application/json"}
    per_route = []
    for path, schema in request_schemas(spec).items():
        valid = from_schema(runnable(schema))
        published = from_schema(schema)
        fields = sorted(schema["properties"])
        bodies = st.one_of(valid, valid, valid, valid, published, near_valid(valid, fields), json_values())
        encoded = bodies.map(lambda b: json.dumps(b).encode())
        raw = st.binary(max_size=64) | st.text(max_size=64).map(str.encode)
        per_route.append(st.tuples(st.just("POST"), st.just(path), encoded | raw, st.just(json_header)))
    # A path may not start with "//": a client reads that as a host (httpx refuses to send it).
    unknown_paths = st.from_regex(r"/([a-z0-9_.-][a-z0-9/_.-]{0,15})?", fullmatch=True)
    stray = st.tuples(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"]),
                      st.sampled_from(["/health", "/v1/models", *ROUTES]) | unknown_paths,
                      st.binary(max_size=16), st.just(json_header))
    return st.one_of(*per_route, *per_route, *per_route, stray)


def check_error(r: Any, sent: Any, declared: set[str]) -> None:
    body = r.json()
    ErrorBody.model_validate(body, strict=True)
    error = body["error"]
    assert set(body) == {"error"} and set(error) == {"message", "type", "param", "code"}, body
    assert error["message"] and error["type"] in ERROR_TYPES, body
    param = error["param"]
    if param is not None:  # a field: one we declare, or a key the client sent; never a character offset
        keys = set(sent) if isinstance(sent, dict) else set()
        assert param in keys or param.split(".")[0] in declared | keys, (param, sent)


def check_stream(text: str) -> None:
    events = [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]
    assert events and events[-1] == "[DONE]", text[-200:]
    for event in events[:-1]:
        assert "error" not in json.loads(event), event


def test_fuzz_the_server_from_its_own_openapi_schema(served: tuple[TestClient, LLMEngine]) -> None:
    client, engine = served
    spec = client.get("/openapi.json").json()
    declared = {name for schema in request_schemas(spec).values() for name in schema["properties"]}
    declared |= set(spec["components"]["schemas"]["ChatMessage"]["properties"])
    seen: dict[int, int] = {}

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None,
              derandomize=not os.environ.get("PAGEDKV_FUZZ_RANDOM"),
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
    @given(cases(spec))
    def fuzz(case: tuple[str, str, bytes, dict[str, str]]) -> None:
        method, path, content, headers = case
        r = client.request(method, path, content=content, headers=headers)
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        assert r.status_code < 500 and r.status_code != 422, (r.status_code, method, path, content, r.text)
        if r.status_code >= 400:
            try:
                sent = json.loads(content)
            except ValueError:
                sent = None
            check_error(r, sent, declared)
        elif r.headers["content-type"].startswith("text/event-stream"):
            check_stream(r.text)

    start = time.monotonic()
    fuzz()
    took = time.monotonic() - start
    assert seen.get(200, 0) >= FUZZ_EXAMPLES // 20, seen  # the fuzz reaches the engine, not only the validation
    deadline = time.monotonic() + 10
    while engine.has_unfinished_requests() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert_drained(engine)  # nothing in flight: every block is free, and kv_manager.check() passes
    print(f"fuzz: {sum(seen.values())} requests in {took:.1f}s, statuses {dict(sorted(seen.items()))}")
