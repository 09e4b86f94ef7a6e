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
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Collection
from contextlib import asynccontextmanager
from typing import Any, Literal, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pagedkv.errors import EngineBusyError, EngineDeadError, InvalidRequestError, RequestFailedError
from pagedkv.scheduler import RequestOutput, SamplingParams
from pagedkv.server.async_engine import AsyncLLMEngine
from pagedkv.server.metrics import MetricsPage

_T = TypeVar("_T")

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
ENGINE_STOPPED = "the engine has stopped"
"""What clients are told when the engine is gone; its internal error stays in the server's log."""
"""The largest request body accepted (413 beyond): generous for any prompt max_model_len allows."""
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "[::1]"})
"""The Host names a server bound to loopback answers to: a DNS-rebinding page sends its own."""
MAX_PROMPT_CHARS_PER_TOKEN = 32
"""A text longer than ``max_model_len`` times this is refused without tokenizing: no tokenizer
makes a token of more than a few dozen characters, so such a prompt is certainly too long."""


class _OpenAIBody(BaseModel):
    """A request body part: strictly typed, and every field not declared is refused (a 400
    naming it, "not supported by this server") rather than ignored, so that a client never
    gets a 200 that silently dropped what it asked for (tools, a response format, logprobs...).
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

    def sampling_params(self, default_max_tokens: int | None = None) -> SamplingParams:
        """The engine's parameters for this body; ``default_max_tokens`` is the budget when the
        client gave none (None: :class:`SamplingParams`' default)."""
        given = self.model_dump(include=set(SamplingParams.model_fields))
        given["max_tokens"] = self.requested_max_tokens()
        if given["max_tokens"] is None:
            given["max_tokens"] = default_max_tokens
        return SamplingParams(**{k: v for k, v in given.items() if v is not None})  # null: the default


class CompletionRequest(_Generation):
    """``/v1/completions``: a text or token-id prompt; ``max_tokens`` defaults to 16 (OpenAI's default)."""

    prompt: str | list[int]
    best_of: int | None = Field(None, ge=1)  # 1 only: we do not sample extra candidates to rank them
    echo: bool | None = None  # false only
    suffix: str | None = None  # empty only: no insertion (fill-in-the-middle) prompts
    logprobs: int | None = None  # null only: token logprobs are not computed yet

    def unsupported(self) -> tuple[str, str] | None:
        if self.best_of is not None and self.best_of > 1:
            return "best_of", "best_of > 1 is not supported by this server; use n"
        if self.echo:
            return "echo", "echo is not supported by this server"
        if self.suffix:
            return "suffix", "suffix (insertion prompts) is not supported by this server"
        if self.logprobs is not None:
            return "logprobs", "logprobs are not supported by this server yet"
        return super().unsupported()


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
            if part.type != "text" or part.text is None:
                raise InvalidRequestError(
                    f"messages[{index}].content[{i}]: content parts of type {part.type!r} are not supported "
                    "by this server; only {'type': 'text', 'text': ...}", "messages")
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
    logprobs: bool | None = None  # false only: token logprobs are not computed yet
    top_logprobs: int | None = None  # 0 only

    def unsupported(self) -> tuple[str, str] | None:
        if (self.max_completion_tokens is not None and self.max_tokens is not None
                and self.max_completion_tokens != self.max_tokens):
            return "max_completion_tokens", (
                f"max_completion_tokens ({self.max_completion_tokens}) and max_tokens ({self.max_tokens}) "
                "disagree; give one of them")
        if self.logprobs:
            return "logprobs", "logprobs are not supported by this server yet"
        if self.top_logprobs:
            return "top_logprobs", "top_logprobs are not supported by this server yet"
        return super().unsupported()

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
        return _error(413, f"the request body is larger than this server's limit of {self.max_body_bytes} bytes")


def _validation_error(e: RequestValidationError) -> JSONResponse:
    """A refused body as a 400 naming the first field at fault. A field we do not declare
    (pydantic's ``extra_forbidden``) comes first and is said to be "not supported", so that the
    client learns the server cannot honour it, not that its value is malformed."""
    errors = sorted(e.errors(), key=lambda err: err["type"] != "extra_forbidden")  # stable: the rest keep their order

    def where(err: Any) -> str:
        return ".".join(str(p) for p in err["loc"] if p != "body")

    def why(err: Any) -> str:
        return "not supported by this server" if err["type"] == "extra_forbidden" else str(err["msg"])

    message = "; ".join(f"{where(err) or 'body'}: {why(err)}" for err in errors)
    return _error(400, message, where(errors[0]) or None)


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

    @app.get("/health", response_model=None)
    async def health() -> JSONResponse | dict[str, str]:
        if not engine.is_running:
            return _error(503, ENGINE_STOPPED, kind="server_error")
        return {"status": "ok"}

    @app.get("/v1/models", response_model=None)
    async def models() -> dict[str, Any]:
        model = {"id": model_name, "object": "model", "created": created, "owned_by": "pagedkv"}
        return {"object": "list", "data": [model]}

    @app.get("/metrics")
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
        if isinstance(prompt, str):
            if len(prompt) > max_prompt_chars:  # certainly too many tokens: refused without tokenizing
                return _error(400, f"the prompt ({len(prompt)} characters) is longer than max_model_len "
                                   f"({engine.max_model_len} tokens) allows", "prompt")
            try:  # in a worker thread, so the loop serves others meanwhile
                prompt = await engine.tokenize(prompt)
            except InvalidRequestError as e:
                return _error(400, str(e), e.param)
        kind = "chat.completion" if chat else "text_completion"
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        received = int(time.time())  # OpenAI's "created": when this request arrived
        # A chat reply without a budget may use the rest of the context (as OpenAI-compatible
        # servers do: 16 tokens would cut most replies short); at least 1, so that a prompt
        # that fills the context is refused by the engine for its length. Completions keep
        # OpenAI's default of 16.
        default_max_tokens = max(1, engine.max_model_len - len(prompt)) if chat else None
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
            events = _events(first, stream, rid, kind, model_name, chat)
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
        return _whole(final, rid, kind, model_name, received, chat)

    @app.post("/v1/completions", response_model=None)
    async def completions(request: Request, body: CompletionRequest) -> Response | dict[str, Any]:
        if (refused := body.unsupported()) is not None:
            return _error(400, refused[1], refused[0])
        return await serve(request, body, body.prompt, chat=False)

    @app.post("/v1/chat/completions", response_model=None)
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


def _whole(out: RequestOutput, rid: str, kind: str, model: str, created: int, chat: bool) -> dict:
    choices = []
    for s in out.outputs:
        reason = s.finish_reason.value if s.finish_reason else None  # set: the request has finished
        choice: dict[str, Any] = {"index": s.index, "finish_reason": reason, "token_ids": s.output_token_ids}
        if chat:
            choice["message"] = {"role": "assistant", "content": s.text}
        else:
            choice |= {"text": s.text, "logprobs": None}
        choices.append(choice)
    return {"id": rid, "object": kind, "created": created, "model": model, "choices": choices, "usage": _usage(out)}


async def _events(first: RequestOutput, stream: AsyncGenerator[RequestOutput, None], rid: str, kind: str, model: str,
                  chat: bool) -> AsyncIterator[str]:
    """Server-sent events: one chunk per output with the news of every sequence, then
    ``[DONE]``. A client that disconnects closes this generator, which aborts the request."""
    created, chunk_kind = int(time.time()), f"{kind}.chunk" if chat else kind
    started: set[int] = set()
    ended: set[int] = set()

    def chunk(out: RequestOutput) -> str:
        choices = []
        for s in out.outputs:
            if s.index in ended or not s.new_token_ids and not s.finished:
                continue  # nothing new, or its finish_reason was already sent
            if s.finished:
                ended.add(s.index)
            reason = s.finish_reason.value if s.finish_reason else None
            if chat:
                delta = {"content": s.new_text} | ({"role": "assistant"} if s.index not in started else {})
                choices.append({"index": s.index, "delta": delta, "token_ids": s.new_token_ids,
                                "finish_reason": reason})
            else:
                choices.append({"index": s.index, "text": s.new_text, "token_ids": s.new_token_ids, "logprobs": None,
                                "finish_reason": reason})
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
