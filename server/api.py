"""The OpenAI-compatible HTTP server: ``/v1/completions`` and ``/v1/chat/completions``
(streamed as server-sent events, or whole), ``/v1/models``, ``/health`` and ``/metrics``.

Every error is a JSON body in OpenAI's shape, ``{"error": {"message", "type", "param",
"code"}}``: 400 for a bad body (naming the field), a field or value the server does not support
(never silently ignored), an unknown model or a prompt too long; 503 when too many requests
wait; 500 when the engine failed the request. Each choice also carries its ``token_ids`` (an
extension, like vLLM's), so that clients of models without a tokenizer get their output too.

Hostile clients are expected: every request passes :class:`~pagedkv.server.gate.Gate` (Host allow-list against DNS
rebinding, API key on ``/v1/*``, body size limit: 401/413/421 before the body is read), a
nonzero ``priority`` is refused unless the app allows it, and prompts are bounded by length and
tokenized in a worker thread, so that one large request cannot stall the event loop.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Collection
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from pagedkv.errors import EngineBusyError, EngineDeadError, InvalidRequestError, RequestFailedError
from pagedkv.server.async_engine import AsyncLLMEngine
from pagedkv.server.errors import ErrorBody, error_response, error_responses, http_error_response, validation_error
from pagedkv.server.gate import DEFAULT_MAX_BODY_BYTES, LOOPBACK_HOSTS, Gate
from pagedkv.server.metrics import MetricsPage
from pagedkv.server.protocol import ChatCompletionRequest, CompletionRequest, Generation
from pagedkv.server.responses import ENGINE_STOPPED, events, last_output, unless_disconnected, whole_response

__all__ = ["DEFAULT_MAX_BODY_BYTES", "ENGINE_STOPPED", "LOOPBACK_HOSTS", "ErrorBody", "build_app"]

MAX_PROMPT_CHARS_PER_TOKEN = 32
"""A text longer than ``max_model_len`` times this is refused without tokenizing: no tokenizer
makes a token of more than a few dozen characters, so such a prompt is certainly too long."""


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
    app.add_middleware(Gate, api_key=api_key, allowed_hosts=allowed_hosts, max_body_bytes=max_body_bytes)
    created = int(time.time())
    metrics_page = MetricsPage((engine.ttft, engine.itl))  # this app's own registry

    @app.exception_handler(RequestValidationError)
    async def bad_body(request: Request, e: RequestValidationError) -> JSONResponse:
        return validation_error(e)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> Response:
        return http_error_response(request, e)

    @app.exception_handler(Exception)
    async def failed(request: Request, e: Exception) -> JSONResponse:  # logged by Starlette, which re-raises it
        return error_response(500, "the server failed to handle this request", kind="server_error")

    @app.get("/health", response_model=None,
             responses=error_responses(503, v1=False, api_key=api_key, allowed_hosts=allowed_hosts))
    async def health() -> JSONResponse | dict[str, str]:
        if not engine.is_running:
            return error_response(503, ENGINE_STOPPED, kind="server_error")
        return {"status": "ok"}

    @app.get("/v1/models", response_model=None,
             responses=error_responses(v1=True, api_key=api_key, allowed_hosts=allowed_hosts))
    async def models() -> dict[str, Any]:
        model = {"id": model_name, "object": "model", "created": created, "owned_by": "pagedkv"}
        return {"object": "list", "data": [model]}

    @app.get("/metrics", responses=error_responses(v1=False, api_key=api_key, allowed_hosts=allowed_hosts))
    async def metrics() -> Response:
        # The stats are awaited between engine steps, then rendered without a further await.
        return Response(metrics_page.render(await engine.stats()), media_type=CONTENT_TYPE_LATEST)

    async def serve(
        request: Request, body: Generation, prompt: str | list[int], chat: bool
    ) -> Response | dict[str, Any]:
        if body.model != model_name:
            return error_response(400, f"unknown model {body.model!r}; this server serves {model_name!r}", "model")
        if body.priority and not allow_priority:
            return error_response(400, "priority is not accepted by this server (start it with --allow-priority)",
                          "priority")
        if not isinstance(prompt, str) and len(prompt) > engine.max_model_len:  # before the engine's checks
            return error_response(400, f"the prompt ({len(prompt)} tokens) is longer than max_model_len "
                               f"({engine.max_model_len})", "prompt")
        if isinstance(prompt, str):
            if len(prompt) > max_prompt_chars:  # certainly too many tokens: refused without tokenizing
                return error_response(400, f"the prompt ({len(prompt)} characters) is longer than max_model_len "
                                   f"({engine.max_model_len} tokens) allows", "prompt")
            try:  # in a worker thread, so the loop serves others meanwhile
                prompt = await engine.tokenize(prompt)
            except InvalidRequestError as e:  # a chat prompt is the rendered messages: blame those
                return error_response(400, str(e), "messages" if chat and e.param == "prompt" else e.param)
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
            first = await unless_disconnected(request, anext(stream))
            if first is None:
                await stream.aclose()  # the client left while it waited: abort
                return error_response(499, "client disconnected")
        except InvalidRequestError as e:
            return error_response(400, str(e), e.param)
        except EngineBusyError as e:
            return error_response(503, str(e), kind="server_error")
        except EngineDeadError:
            return error_response(503, ENGINE_STOPPED, kind="server_error")
        except RequestFailedError as e:
            return error_response(500, str(e), kind="server_error")
        if body.stream:
            sse = events(first, stream, rid, kind, model_name, chat, engine.tokenizer)
            return StreamingResponse(sse, media_type="text/event-stream")
        try:
            final = await unless_disconnected(request, last_output(stream, first))
        except RequestFailedError as e:
            return error_response(500, str(e), kind="server_error")
        except EngineDeadError:
            return error_response(503, ENGINE_STOPPED, kind="server_error")
        if final is None:
            await stream.aclose()
            return error_response(499, "client disconnected")
        return whole_response(final, rid, kind, model_name, received, chat, engine.tokenizer)

    @app.post("/v1/completions", response_model=None,
              responses=error_responses(400, 500, 503, v1=True, api_key=api_key, allowed_hosts=allowed_hosts))
    async def completions(request: Request, body: CompletionRequest) -> Response | dict[str, Any]:
        if (refused := body.unsupported()) is not None:
            return error_response(400, refused[1], refused[0])
        return await serve(request, body, body.prompt, chat=False)

    @app.post("/v1/chat/completions", response_model=None,
               responses=error_responses(400, 500, 503, v1=True, api_key=api_key, allowed_hosts=allowed_hosts))
    async def chat_completions(request: Request, body: ChatCompletionRequest) -> Response | dict[str, Any]:
        if (refused := body.unsupported()) is not None:
            return error_response(400, refused[1], refused[0])
        tokenizer = engine.tokenizer
        if tokenizer is None or not tokenizer.chat_template:
            return error_response(400, f"{model_name} has no chat template; use /v1/completions", "messages")
        try:
            messages = [m.for_template(i) for i, m in enumerate(body.messages)]
        except InvalidRequestError as e:
            return error_response(400, str(e), e.param)
        if sum(len(m["content"]) for m in messages) > max_prompt_chars:
            return error_response(400, f"the messages are longer than max_model_len "
                               f"({engine.max_model_len} tokens) allows", "messages")
        try:  # rendered in a worker thread: a large template render does not stall the event loop
            prompt = await asyncio.to_thread(tokenizer.apply_chat_template, messages)
        except Exception as e:  # the template refused these messages (e.g. roles out of order)
            return error_response(400, f"the chat template cannot render these messages: {e}", "messages")
        return await serve(request, body, prompt, chat=True)

    return app
