"""The OpenAI-compatible HTTP server: ``/v1/completions`` and ``/v1/chat/completions``
(streamed as server-sent events, or whole), ``/v1/models``, ``/health`` and ``/metrics``.

Every error is a JSON body in OpenAI's shape, ``{"error": {"message", "type", "param",
"code"}}``: 400 for a bad body (naming the field), a field or value the server does not support
(never silently ignored), an unknown model or a prompt too long; 503 when too many requests
wait; 500 when the engine failed the request. Each choice also carries its ``token_ids`` (an
extension, like vLLM's), so that clients of models without a tokenizer get their output too.

Hostile clients are expected: every request passes :class:`_Gate` (Host allow-list against DNS
rebinding, API key on ``/v1/*``, body size limit: 401/413/421 before the body is read), a
nonzero ``priority`` is refused unless the app allows it, and prompts are bounded by length and
tokenized in a worker thread, so that one large request cannot stall the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Collection, Sequence
from contextlib import asynccontextmanager
from typing import Any, Literal, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pagedkv.errors import EngineBusyError, EngineDeadError, InvalidRequestError, RequestFailedError
from pagedkv.scheduler import RequestOutput, SamplingParams, SequenceOutput, TokenLogprobs
from pagedkv.scheduler.engine import Tokenizer
from pagedkv.scheduler.params import MAX_LOGPROBS
from pagedkv.server.async_engine import AsyncLLMEngine
from pagedkv.server.metrics import MetricsPage

_T = TypeVar("_T")

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
"""The largest request body accepted (413 beyond): generous for any prompt max_model_len allows."""
ENGINE_STOPPED = "the engine has stopped"
"""What clients are told when the engine is gone; its internal error stays in the server's log."""
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "[::1]"})
"""The Host names a server bound to loopback answers to: a DNS-rebinding page sends its own."""
MAX_PROMPT_CHARS_PER_TOKEN = 32
"""A text longer than ``max_model_len`` times this is refused without tokenizing: no tokenizer
makes a token of more than a few dozen characters, so such a prompt is certainly too long."""


class _OpenAIBody(BaseModel):
    """A request body part: strictly typed, and every field not declared is refused (a 400
    naming it, "not supported by this server") rather than ignored, so that a client never
    gets a 200 that silently dropped what it asked for (tools, a response format...).
    A field given as ``null`` asks for nothing, so an undeclared one that is null counts as
    absent: clients that serialize every option, set or not, still work."""

    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_absent(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None or k in cls.model_fields}
        return data


class _Generation(_OpenAIBody):
    """The fields both endpoints share. Sampling fields left out (or null) take
    :class:`SamplingParams`' defaults; it also checks their ranges. OpenAI fields we cannot
    honour are declared only so that their neutral value (what clients often send
    explicitly) is accepted; any other value is refused by :meth:`unsupported`."""

    model: str
    stream: bool = False
    stop: str | list[str] | None = None  # OpenAI's stop strings: SamplingParams.stop
    priority: int = 0
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    n: int | None = None
    seed: int | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    user: str | None = None  # only an end-user id for the provider's abuse monitoring: accepted, ignored
    presence_penalty: float | None = None  # 0 (no penalty) only
    frequency_penalty: float | None = None  # 0 (no penalty) only
    logit_bias: dict[str, float] | None = None  # empty only

    def unsupported(self) -> tuple[str, str] | None:
        """The first field given a value this server cannot honour, as ``(param, message)``;
        None if every value can be honoured."""
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                return name, f"{name} is not supported by this server (only 0)"
        if self.logit_bias:
            return "logit_bias", "logit_bias is not supported by this server"
        return None

    def requested_max_tokens(self) -> int | None:
        """The output budget the client asked for, if any."""
        return self.max_tokens

    def requested_logprobs(self) -> int | None:
        """``SamplingParams.logprobs``: how many top alternatives per token, None for no logprobs."""
        return None

    def sampling_params(self, default_max_tokens: int | None = None) -> SamplingParams:
        """The engine's parameters for this body; ``default_max_tokens`` is the budget when the
        client gave none (None: :class:`SamplingParams`' default)."""
        given = self.model_dump(include=set(SamplingParams.model_fields))
        given["max_tokens"] = self.requested_max_tokens()
        if given["max_tokens"] is None:
            given["max_tokens"] = default_max_tokens
        given["logprobs"] = self.requested_logprobs()
        return SamplingParams(**{k: v for k, v in given.items() if v is not None})  # null: the default


class CompletionRequest(_Generation):
    """``/v1/completions``: a text or token-id prompt; ``max_tokens`` defaults to 16 (OpenAI's default)."""

    prompt: str | list[int]
    best_of: int | None = Field(None, ge=1)  # 1 only: we do not sample extra candidates to rank them
    echo: bool | None = None  # false only
    suffix: str | None = None  # empty only: no insertion (fill-in-the-middle) prompts
    logprobs: int | None = None  # OpenAI's legacy logprobs: that many top alternatives per token (0..20)

    def unsupported(self) -> tuple[str, str] | None:
        if self.best_of is not None and self.best_of > 1:
            return "best_of", "best_of > 1 is not supported by this server; use n"
        if self.echo:
            return "echo", "echo is not supported by this server"
        if self.suffix:
            return "suffix", "suffix (insertion prompts) is not supported by this server"
        return super().unsupported()

    def requested_logprobs(self) -> int | None:
        return self.logprobs  # SamplingParams checks the range (param logprobs)


class ChatContentPart(BaseModel):
    """One part of a message's ``content`` list. Only ``{"type": "text", "text": ...}`` can be
    rendered; other types (``image_url``, ``input_audio``, ``file``...) keep their own fields
    (hence ``extra="allow"``) so that :meth:`ChatMessage.text` can refuse them by name."""

    model_config = ConfigDict(extra="allow", strict=True)

    type: str
    text: str | None = None


class ChatMessage(_OpenAIBody):
    """One message. ``developer`` is OpenAI's newer name for ``system`` (rendered as such, as
    chat templates know only ``system``); tool and function messages are refused."""

    role: Literal["developer", "system", "user", "assistant"]
    content: str | list[ChatContentPart]

    def text(self, index: int) -> str:
        """The content as one string: text parts joined by newlines (as vLLM does). Raises
        :class:`InvalidRequestError` naming ``messages`` for a part that is not text."""
        if isinstance(self.content, str):
            return self.content
        texts = []
        for i, part in enumerate(self.content):
            if part.type != "text":
                raise InvalidRequestError(
                    f"messages[{index}].content[{i}]: content parts of type {part.type!r} are not supported "
                    "by this server; only {'type': 'text', 'text': ...}", "messages")
            if part.text is None:
                raise InvalidRequestError(f"messages[{index}].content[{i}]: a text part needs its 'text'", "messages")
            texts.append(part.text)
        return "\n".join(texts)

    def for_template(self, index: int) -> dict[str, str]:
        """The message as a chat template takes it: ``{"role", "content"}``, both strings."""
        return {"role": "system" if self.role == "developer" else self.role, "content": self.text(index)}


class ChatCompletionRequest(_Generation):
    """``/v1/chat/completions``. Without ``max_tokens`` or ``max_completion_tokens`` the
    reply may use what is left of the context (see ``serve``), as OpenAI-compatible servers do.
    Tools, function calling and response formats are not declared, so they are refused."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # what current OpenAI clients send
    logprobs: bool | None = None  # true: each token's logprob, and top_logprobs alternatives
    top_logprobs: int | None = None  # 0..MAX_LOGPROBS, with logprobs true only

    def unsupported(self) -> tuple[str, str] | None:
        if (self.max_completion_tokens is not None and self.max_tokens is not None
                and self.max_completion_tokens != self.max_tokens):
            return "max_completion_tokens", (
                f"max_completion_tokens ({self.max_completion_tokens}) and max_tokens ({self.max_tokens}) "
                "disagree; give one of them")
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= MAX_LOGPROBS:
            return "top_logprobs", f"top_logprobs must be between 0 and {MAX_LOGPROBS}, got {self.top_logprobs}"
        if self.top_logprobs and not self.logprobs:
            return "top_logprobs", "top_logprobs needs logprobs set to true"
        return super().unsupported()

    def requested_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens if self.max_tokens is not None else self.max_completion_tokens


def _error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
           code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status)


class _BodyTooLarge(Exception):
    """Raised from the receive channel of a request whose body outgrows the limit."""


def _host_name(host: str) -> str:
    """The name part of a Host header, lowercased: ``[::1]:8000`` -> ``[::1]``, ``localhost:80`` -> ``localhost``."""
    host = host.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        return host[: end + 1] if end != -1 else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class _Gate:
    """Pure ASGI middleware that refuses a request before the app reads its body (so before
    FastAPI buffers and parses it): a Host not in ``allowed_hosts`` (421), a missing or wrong
    API key on ``/v1/*`` (401; ``/health`` and ``/metrics`` stay open for probes), a body over
    ``max_body_bytes`` (413, from Content-Length, or counted as a chunked body streams in)."""

    def __init__(self, app: ASGIApp, *, api_key: str | None, allowed_hosts: Collection[str] | None,
                 max_body_bytes: int) -> None:
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.allowed_hosts = None if allowed_hosts is None else {h.lower() for h in allowed_hosts}
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        refusal = self._refusal(scope["path"], headers)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        limit, received, too_large, started = self.max_body_bytes, 0, False, False

        async def counted_receive() -> Message:
            nonlocal received, too_large
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    too_large = True
                    raise _BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if too_large:
                return  # whatever the app made of the aborted read is replaced by the 413
            started = True
            await send(message)

        with contextlib.suppress(_BodyTooLarge):
            await self.app(scope, counted_receive, guarded_send)
        if too_large and not started:
            await self._too_large()(scope, receive, send)

    def _refusal(self, path: str, headers: Headers) -> JSONResponse | None:
        if self.allowed_hosts is not None and _host_name(headers.get("host", "")) not in self.allowed_hosts:
            return _error(421, f"this server does not answer to Host {headers.get('host', '')!r}")
        if self.api_key is not None and (path == "/v1" or path.startswith("/v1/")):
            scheme, _, key = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), self.api_key):
                return _error(401, "a valid API key is needed: send the header 'Authorization: Bearer <key>'",
                              code="invalid_api_key")
        length = headers.get("content-length")
        if length is not None and (not length.strip().isdigit() or int(length) > self.max_body_bytes):
            return self._too_large()
        return None

    def _too_large(self) -> JSONResponse:
        response = _error(413, f"the request body is larger than this server's limit of {self.max_body_bytes} bytes")
        response.headers["connection"] = "close"  # else uvicorn reads and discards the rest of the body
        return response


class ErrorDetail(BaseModel):
    """OpenAI's error object."""

    message: str
    type: str = Field(description="invalid_request_error, not_found_error or server_error")
    param: str | None = Field(description="the request field at fault (messages.0.role), or null")
    code: str | None


class ErrorBody(BaseModel):
    """The body of every error response, in OpenAI's shape: ``{"error": {...}}``."""

    error: ErrorDetail


_ERROR_WHEN = {
    400: "An invalid request: a body that is not valid JSON or not an object, a bad value or a field this server "
         "does not support (named by param), an unknown model, or a prompt too long",
    401: "No valid API key (only on a server started with one)",
    413: "A request body larger than the server's limit",
    421: "A Host header this server does not answer to (only on a server with a Host allow-list)",
    500: "The engine failed the request",
    503: "Too many requests wait, or the engine has stopped",
}


def _responses(*statuses: int, v1: bool, api_key: str | None,
               allowed_hosts: Collection[str] | None) -> dict[int | str, dict[str, Any]]:
    """A route's error responses for the OpenAPI schema (``responses=``), each with :class:`ErrorBody`:
    ``statuses``, those of :class:`_Gate` that apply (413; 401 on ``/v1/*`` with an API key; 421 with a
    Host allow-list), and ``default`` for any other. A ``default`` also keeps FastAPI from advertising its
    422, which this server never returns (:func:`_validation_error` makes them 400s)."""
    codes = {*statuses, 413}
    if v1 and api_key:
        codes.add(401)
    if allowed_hosts is not None:
        codes.add(421)
    responses: dict[int | str, dict[str, Any]] = {
        code: {"model": ErrorBody, "description": _ERROR_WHEN[code]} for code in sorted(codes)}
    responses["default"] = {"model": ErrorBody, "description": "Any other error, in the same shape"}
    return responses


_JSON_KINDS = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number",
               bool: "a boolean", type(None): "null"}
_MAX_ERRORS_TOLD = 10


def _param(loc: Sequence[Any], body: Any, missing: bool) -> str | None:
    """The dotted path of the field an error is about (``messages.0.role``), or None for the body
    itself: ``loc`` without its leading ``"body"`` and without the names pydantic gives the members
    of a union (``prompt.str``, ``prompt.list[int]``) or to dict keys (``[key]``), which are told
    apart from the client's own keys by walking the body: it has no such key there. The last part of
    a ``missing`` error is the required field not given."""
    parts: list[str] = []
    value = body
    for i, part in enumerate(loc[1:], start=1):
        if isinstance(value, dict) and isinstance(part, str) and part in value:
            value = value[part]
        elif isinstance(value, list) and isinstance(part, int) and 0 <= part < len(value):
            value = value[part]
        elif not (missing and i == len(loc) - 1):
            continue
        parts.append(str(part))
    return ".".join(parts) or None


def _whole_body_problem(kind: str, body: Any) -> str:
    """What is wrong with a body refused as a whole (empty, or not a JSON object)."""
    if kind == "missing":
        return "the request body is empty; it must be a JSON object"
    if isinstance(body, bytes | bytearray):  # FastAPI parses JSON only when the Content-Type says so
        return "the request body must be a JSON object, sent with Content-Type: application/json"
    return f"the request body must be a JSON object, not {_JSON_KINDS.get(type(body), 'that')}"


def _validation_error(e: RequestValidationError) -> JSONResponse:
    """A refused body as a 400 naming the first field at fault (never a 422). A field we do not
    declare (pydantic's ``extra_forbidden``) comes first and is said to be "not supported", so that
    the client learns the server cannot honour it, not that its value is malformed. A body that is
    not valid JSON, empty or not an object is refused as a whole, with ``param`` null (FastAPI's
    ``json_invalid`` error puts a character offset where the field would be)."""
    errors = sorted(e.errors(), key=lambda err: err["type"] != "extra_forbidden")  # stable: the rest keep their order
    first = errors[0]
    if first["type"] == "json_invalid":
        reason = (first.get("ctx") or {}).get("error", "")
        offset = first["loc"][-1] if len(first["loc"]) > 1 else None
        where = f" (at character {offset})" if isinstance(offset, int) else ""
        return _error(400, "the request body is not valid JSON" + (f": {reason}" if reason else "") + where)
    if len(first["loc"]) <= 1:
        return _error(400, _whole_body_problem(first["type"], e.body))

    def why(err: Any) -> str:
        return "not supported by this server" if err["type"] == "extra_forbidden" else str(err["msg"])

    params = [_param(err["loc"], e.body, err["type"] == "missing") for err in errors]
    def named(param: str | None, err: Any) -> str:
        if param is None and err["type"] == "extra_forbidden":
            return "'' (an empty field name)"  # the body's own key "", not the body
        return param or "body"

    told = [f"{named(param, err)}: {why(err)}" for param, err in zip(params, errors, strict=True)][:_MAX_ERRORS_TOLD]
    if len(errors) > _MAX_ERRORS_TOLD:
        told.append(f"and {len(errors) - _MAX_ERRORS_TOLD} more")
    return _error(400, "; ".join(told), params[0])


def _http_error(request: Request, e: StarletteHTTPException) -> Response:
    """Starlette's and FastAPI's HTTP errors (404 for an unknown path, 405 for a wrong method, 400
    for a body that cannot be decoded) in OpenAI's shape, keeping their headers (``Allow``)."""
    headers = dict(e.headers or {})
    if e.status_code in (204, 304):  # no body allowed
        return Response(status_code=e.status_code, headers=headers)
    kind = "invalid_request_error"
    if e.status_code == 404:
        message, kind = f"Invalid URL ({request.method} {request.url.path}): this server has no such path", \
            "not_found_error"
    elif e.status_code == 405:
        allowed = headers.get("allow") or headers.get("Allow")
        message = f"{request.method} is not allowed on {request.url.path}" + (f"; use {allowed}" if allowed else "")
    elif e.status_code == 400 and e.detail == "There was an error parsing the body":
        message = "the request body is not valid JSON (it cannot be decoded)"
    else:
        message = str(e.detail)
        if e.status_code >= 500:
            kind = "server_error"
    response = _error(e.status_code, message, kind=kind)
    response.headers.update(headers)
    return response


def build_app(
    engine: AsyncLLMEngine,
    model_name: str,
    *,
    allow_priority: bool = False,
    api_key: str | None = None,
    allowed_hosts: Collection[str] | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    shutdown_timeout_s: float = 0.0,
) -> FastAPI:
    """The FastAPI application serving ``engine`` under the name ``model_name``.

    ``allow_priority``: honour the body's ``priority`` (lower is served first). Off by default,
    as any client could otherwise starve the others; a nonzero priority is then a 400.
    ``api_key``: required as ``Authorization: Bearer <key>`` on ``/v1/*``.
    ``allowed_hosts``: the Host names answered (e.g. :data:`LOOPBACK_HOSTS`), any port; None: all.
    ``max_body_bytes``: larger request bodies get a 413 before they are read.
    ``shutdown_timeout_s``: on shutdown, how long requests in flight may take to finish
    before they are aborted (their streams end with an error event).
    """
    if max_body_bytes < 1:
        raise InvalidRequestError(f"max_body_bytes must be >= 1, got {max_body_bytes}", "max_body_bytes")
    max_prompt_chars = engine.max_model_len * MAX_PROMPT_CHARS_PER_TOKEN

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await engine.shutdown(timeout=shutdown_timeout_s)

    app = FastAPI(title="pagedkv", lifespan=lifespan)
    app.add_middleware(_Gate, api_key=api_key, allowed_hosts=allowed_hosts, max_body_bytes=max_body_bytes)
    created = int(time.time())
    metrics_page = MetricsPage((engine.ttft, engine.itl))  # this app's own registry

    @app.exception_handler(RequestValidationError)
    async def bad_body(request: Request, e: RequestValidationError) -> JSONResponse:
        return _validation_error(e)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> Response:
        return _http_error(request, e)

    @app.exception_handler(Exception)
    async def failed(request: Request, e: Exception) -> JSONResponse:  # logged by Starlette, which re-raises it
        return _error(500, "the server failed to handle this request", kind="server_error")

    @app.get("/health", response_model=None,
             responses=_responses(503, v1=False, api_key=api_key, allowed_hosts=allowed_hosts))
    async def health() -> JSONResponse | dict[str, str]:
        if not engine.is_running:
            return _error(503, ENGINE_STOPPED, kind="server_error")
        return {"status": "ok"}

    @app.get("/v1/models", response_model=None,
             responses=_responses(v1=True, api_key=api_key, allowed_hosts=allowed_hosts))
    async def models() -> dict[str, Any]:
        model = {"id": model_name, "object": "model", "created": created, "owned_by": "pagedkv"}
        return {"object": "list", "data": [model]}

    @app.get("/metrics", responses=_responses(v1=False, api_key=api_key, allowed_hosts=allowed_hosts))
    async def metrics() -> Response:
        # The stats are awaited between engine steps, then rendered without a further await.
        return Response(metrics_page.render(await engine.stats()), media_type=CONTENT_TYPE_LATEST)

    async def serve(
        request: Request, body: _Generation, prompt: str | list[int], chat: bool
    ) -> Response | dict[str, Any]:
        if body.model != model_name:
            return _error(400, f"unknown model {body.model!r}; this server serves {model_name!r}", "model")
        if body.priority and not allow_priority:
            return _error(400, "priority is not accepted by this server (start it with --allow-priority)",
                          "priority")
        if not isinstance(prompt, str) and len(prompt) > engine.max_model_len:  # before the engine's checks
            return _error(400, f"the prompt ({len(prompt)} tokens) is longer than max_model_len "
                               f"({engine.max_model_len})", "prompt")
        if isinstance(prompt, str):
            if len(prompt) > max_prompt_chars:  # certainly too many tokens: refused without tokenizing
                return _error(400, f"the prompt ({len(prompt)} characters) is longer than max_model_len "
                                   f"({engine.max_model_len} tokens) allows", "prompt")
            try:  # in a worker thread, so the loop serves others meanwhile
                prompt = await engine.tokenize(prompt)
            except InvalidRequestError as e:  # a chat prompt is the rendered messages: blame those
                return _error(400, str(e), "messages" if chat and e.param == "prompt" else e.param)
        kind = "chat.completion" if chat else "text_completion"
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        received = int(time.time())  # OpenAI's "created": when this request arrived
        # A chat reply without a budget may use the rest of what a request can hold (the context,
        # or the pool if smaller; as OpenAI-compatible servers do: 16 tokens would cut most
        # replies short); at least 1, so that a prompt that fills it is refused by the engine for
        # its length. Completions keep OpenAI's default of 16.
        default_max_tokens = max(1, engine.max_request_tokens - len(prompt)) if chat else None
        try:
            params = body.sampling_params(default_max_tokens)
            stream = engine.generate(prompt, params, request_id=rid, priority=body.priority)
            # Raises here, before any byte is sent, if the request is refused.
            first = await _unless_disconnected(request, anext(stream))
            if first is None:
                await stream.aclose()  # the client left while it waited: abort
                return _error(499, "client disconnected")
        except InvalidRequestError as e:
            return _error(400, str(e), e.param)
        except EngineBusyError as e:
            return _error(503, str(e), kind="server_error")
        except EngineDeadError:
            return _error(503, ENGINE_STOPPED, kind="server_error")
        except RequestFailedError as e:
            return _error(500, str(e), kind="server_error")
        if body.stream:
            events = _events(first, stream, rid, kind, model_name, chat, engine.tokenizer)
            return StreamingResponse(events, media_type="text/event-stream")
        try:
            final = await _unless_disconnected(request, _last(stream, first))
        except RequestFailedError as e:
            return _error(500, str(e), kind="server_error")
        except EngineDeadError:
            return _error(503, ENGINE_STOPPED, kind="server_error")
        if final is None:
            await stream.aclose()
            return _error(499, "client disconnected")
        return _whole(final, rid, kind, model_name, received, chat, engine.tokenizer)

    @app.post("/v1/completions", response_model=None,
              responses=_responses(400, 500, 503, v1=True, api_key=api_key, allowed_hosts=allowed_hosts))
    async def completions(request: Request, body: CompletionRequest) -> Response | dict[str, Any]:
        if (refused := body.unsupported()) is not None:
            return _error(400, refused[1], refused[0])
        return await serve(request, body, body.prompt, chat=False)

    @app.post("/v1/chat/completions", response_model=None,
               responses=_responses(400, 500, 503, v1=True, api_key=api_key, allowed_hosts=allowed_hosts))
    async def chat_completions(request: Request, body: ChatCompletionRequest) -> Response | dict[str, Any]:
        if (refused := body.unsupported()) is not None:
            return _error(400, refused[1], refused[0])
        tokenizer = engine.tokenizer
        if tokenizer is None or not tokenizer.chat_template:
            return _error(400, f"{model_name} has no chat template; use /v1/completions", "messages")
        try:
            messages = [m.for_template(i) for i, m in enumerate(body.messages)]
        except InvalidRequestError as e:
            return _error(400, str(e), e.param)
        if sum(len(m["content"]) for m in messages) > max_prompt_chars:
            return _error(400, f"the messages are longer than max_model_len "
                               f"({engine.max_model_len} tokens) allows", "messages")
        try:  # rendered in a worker thread: a large template render does not stall the event loop
            prompt = await asyncio.to_thread(tokenizer.apply_chat_template, messages)
        except Exception as e:  # the template refused these messages (e.g. roles out of order)
            return _error(400, f"the chat template cannot render these messages: {e}", "messages")
        return await serve(request, body, prompt, chat=True)

    return app


async def _last(stream: AsyncIterator[RequestOutput], first: RequestOutput) -> RequestOutput:
    last = first
    async for out in stream:
        last = out
    return last


async def _unless_disconnected(request: Request, work: Awaitable[_T]) -> _T | None:
    """Await ``work``, or return ``None`` (cancelling it) if the client hangs up first:
    a plain endpoint is not cancelled on disconnect, so the request would run on."""
    task = asyncio.ensure_future(work)
    while True:
        done, _ = await asyncio.wait({task}, timeout=0.25)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()  # raises inside the stream, whose cleanup aborts the request
            with contextlib.suppress(asyncio.CancelledError):
                await task
            return None


def _usage(out: RequestOutput) -> dict:
    completion = sum(len(s.output_token_ids) for s in out.outputs)
    prompt = out.metrics.num_prompt_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class _TokenTexts:
    """Token ids as the text logprobs show them: what a fresh detokenizer makes of the id alone
    (the engine's Tokenizer protocol; a token holding part of a UTF-8 character shows as ""), or
    without a tokenizer ``"token_id:<id>"``. Each id is decoded once per response."""

    def __init__(self, tokenizer: Tokenizer | None) -> None:
        self.tokenizer = tokenizer
        self._texts: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._texts.get(token_id)
        if text is None:
            text = self._texts[token_id] = self._decode(token_id)
        return text

    def _decode(self, token_id: int) -> str:
        tokenizer = self.tokenizer
        if tokenizer is None:
            return f"token_id:{token_id}"
        return tokenizer.detokenizer().step(token_id)


def _finite(logprob: float) -> float:
    """JSON has no -inf: a token the model rules out shows vLLM's -9999.0."""
    return max(logprob, -9999.0)


def _completion_logprobs(token_ids: list[int], logprobs: list[TokenLogprobs], texts: _TokenTexts,
                         offset: int = 0) -> dict[str, Any]:
    """OpenAI's legacy completions ``logprobs``; ``offset``: where the first token's text begins."""
    tokens = [texts(t) for t in token_ids]
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    return {
        "tokens": tokens,
        "token_logprobs": [_finite(lp.logprob) for lp in logprobs],
        "top_logprobs": [{texts(t): _finite(v) for t, v in lp.top} for lp in logprobs],
        "text_offset": offsets,
    }


def _chat_logprobs(token_ids: list[int], logprobs: list[TokenLogprobs], texts: _TokenTexts) -> dict[str, Any]:
    """OpenAI's chat ``logprobs``: ``{"content": [{"token", "logprob", "bytes", "top_logprobs"}]}``."""

    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        text = texts(token_id)
        return {"token": text, "logprob": _finite(logprob), "bytes": list(text.encode("utf-8", "replace"))}

    return {"content": [entry(t, lp.logprob) | {"top_logprobs": [entry(i, v) for i, v in lp.top]}
                        for t, lp in zip(token_ids, logprobs, strict=True)]}


def _choice_logprobs(s: SequenceOutput, texts: _TokenTexts, chat: bool, new: bool,
                     offset: int = 0) -> dict[str, Any] | None:
    """A choice's ``logprobs``: of all its tokens, or (``new``) of its new ones; None when not asked for."""
    token_ids, logprobs = (s.new_token_ids, s.new_logprobs) if new else (s.output_token_ids, s.logprobs)
    if logprobs is None:
        return None
    if chat:
        return _chat_logprobs(token_ids, logprobs, texts)
    return _completion_logprobs(token_ids, logprobs, texts, offset)


def _whole(out: RequestOutput, rid: str, kind: str, model: str, created: int, chat: bool,
           tokenizer: Tokenizer | None = None) -> dict:
    choices = []
    texts = _TokenTexts(tokenizer)
    for s in out.outputs:
        reason = s.finish_reason.value if s.finish_reason else None  # set: the request has finished
        choice: dict[str, Any] = {"index": s.index, "finish_reason": reason, "token_ids": s.output_token_ids}
        if chat:
            choice["message"] = {"role": "assistant", "content": s.text}
            choice["logprobs"] = _choice_logprobs(s, texts, chat, new=False)
        else:
            choice |= {"text": s.text, "logprobs": _choice_logprobs(s, texts, chat, new=False)}
        choices.append(choice)
    return {"id": rid, "object": kind, "created": created, "model": model, "choices": choices, "usage": _usage(out)}


async def _events(first: RequestOutput, stream: AsyncGenerator[RequestOutput, None], rid: str, kind: str, model: str,
                  chat: bool, tokenizer: Tokenizer | None = None) -> AsyncIterator[str]:
    """Server-sent events: one chunk per output with the news of every sequence, then
    ``[DONE]``. A client that disconnects closes this generator, which aborts the request."""
    created, chunk_kind = int(time.time()), f"{kind}.chunk" if chat else kind
    started: set[int] = set()
    ended: set[int] = set()
    texts = _TokenTexts(tokenizer)
    offsets: dict[int, int] = {}  # per sequence: text_offset of its next token (completions logprobs)

    def chunk(out: RequestOutput) -> str:
        choices = []
        for s in out.outputs:
            if s.index in ended or not s.new_token_ids and not s.finished:
                continue  # nothing new, or its finish_reason was already sent
            if s.finished:
                ended.add(s.index)
            reason = s.finish_reason.value if s.finish_reason else None
            logprobs = _choice_logprobs(s, texts, chat, new=True, offset=offsets.get(s.index, 0))
            if logprobs is not None and not chat:
                offsets[s.index] = offsets.get(s.index, 0) + sum(map(len, logprobs["tokens"]))
            if chat:
                delta = {"content": s.new_text} | ({"role": "assistant"} if s.index not in started else {})
                choices.append({"index": s.index, "delta": delta, "token_ids": s.new_token_ids, "logprobs": logprobs,
                                "finish_reason": reason})
            else:
                choices.append({"index": s.index, "text": s.new_text, "token_ids": s.new_token_ids,
                                "logprobs": logprobs, "finish_reason": reason})
            started.add(s.index)
        body = {"id": rid, "object": chunk_kind, "created": created, "model": model, "choices": choices}
        if out.finished:
            body["usage"] = _usage(out)
        return f"data: {json.dumps(body)}\n\n"

    try:
        yield chunk(first)
        async for out in stream:
            yield chunk(out)
    except (RequestFailedError, EngineDeadError) as e:  # one error event, then [DONE]
        message = str(e) if isinstance(e, RequestFailedError) else ENGINE_STOPPED
        error = {"message": message, "type": "server_error", "param": None, "code": None}
        yield f"data: {json.dumps({'error': error})}\n\n"
    finally:
        await stream.aclose()  # aborts the request if it has not finished
    yield "data: [DONE]\n\n"
