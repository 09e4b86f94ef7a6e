"""The OpenAI-compatible HTTP server: ``/v1/completions`` and ``/v1/chat/completions``
(streamed as server-sent events, or whole), ``/v1/models``, ``/health`` and ``/metrics``.

Every error is a JSON body in OpenAI's shape, ``{"error": {"message", "type", "param",
"code"}}``: 400 for a bad body (naming the field), an unknown model or a prompt too long;
503 when too many requests wait; 500 when the engine failed the request. Each choice also
carries its ``token_ids`` (an extension, like vLLM's), so that clients of models without a
tokenizer get their output too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Any, Literal, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field

from pagedkv.errors import EngineBusyError, EngineDeadError, InvalidRequestError, RequestFailedError
from pagedkv.scheduler import RequestOutput, SamplingParams
from pagedkv.server.async_engine import AsyncLLMEngine
from pagedkv.server.metrics import MetricsPage

_T = TypeVar("_T")


class _Generation(BaseModel):
    """The fields both endpoints share. Unknown fields are ignored, as OpenAI clients send
    some we do not use; known ones are strictly typed. Sampling fields left out (or null)
    take :class:`SamplingParams`' defaults; it also checks their ranges."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str
    stream: bool = False
    stop: str | list[str] | None = None  # OpenAI's stop strings: refused (400) rather than ignored
    priority: int = 0
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    n: int | None = None
    seed: int | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None

    def sampling_params(self) -> SamplingParams:
        given = self.model_dump(include=set(SamplingParams.model_fields))
        return SamplingParams(**{k: v for k, v in given.items() if v is not None})  # null: the default


class CompletionRequest(_Generation):
    prompt: str | list[int]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["system", "user", "assistant"]
    content: str


class ChatCompletionRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1)


def _error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status_code=status)


def _validation_error(e: RequestValidationError) -> JSONResponse:
    first = e.errors()[0]
    loc = [str(p) for p in first["loc"] if p != "body"]
    field = ".".join(loc) or None
    message = "; ".join(f"{'.'.join(str(p) for p in err['loc'] if p != 'body') or 'body'}: {err['msg']}"
                        for err in e.errors())
    return _error(400, message, field)


def build_app(engine: AsyncLLMEngine, model_name: str) -> FastAPI:
    """The FastAPI application serving ``engine`` under the name ``model_name``."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await engine.shutdown()

    app = FastAPI(title="pagedkv", lifespan=lifespan)
    created = int(time.time())
    metrics_page = MetricsPage((engine.ttft, engine.itl))  # this app's own registry

    @app.exception_handler(RequestValidationError)
    async def bad_body(request: Request, e: RequestValidationError) -> JSONResponse:
        return _validation_error(e)

    @app.get("/health", response_model=None)
    async def health() -> JSONResponse | dict[str, str]:
        if not engine.is_running:
            return _error(503, "the engine has stopped", kind="server_error")
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
        if body.stop:
            return _error(400, "stop strings are not supported; give stop_token_ids", "stop")
        kind = "chat.completion" if chat else "text_completion"
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        try:
            stream = engine.generate(prompt, body.sampling_params(), request_id=rid, priority=body.priority)
            # Raises here, before any byte is sent, if the request is refused.
            first = await _unless_disconnected(request, anext(stream))
            if first is None:
                await stream.aclose()  # the client left while it waited: abort
                return _error(499, "client disconnected")
        except InvalidRequestError as e:
            return _error(400, str(e), e.param)
        except (EngineBusyError, EngineDeadError) as e:
            return _error(503, str(e), kind="server_error")
        except RequestFailedError as e:
            return _error(500, str(e), kind="server_error")
        if body.stream:
            events = _events(first, stream, rid, kind, model_name, chat)
            return StreamingResponse(events, media_type="text/event-stream")
        try:
            final = await _unless_disconnected(request, _last(stream, first))
        except RequestFailedError as e:
            return _error(500, str(e), kind="server_error")
        if final is None:
            await stream.aclose()
            return _error(499, "client disconnected")
        return _whole(final, rid, kind, model_name, created, chat)

    @app.post("/v1/completions", response_model=None)
    async def completions(request: Request, body: CompletionRequest) -> Response | dict[str, Any]:
        return await serve(request, body, body.prompt, chat=False)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request, body: ChatCompletionRequest) -> Response | dict[str, Any]:
        tokenizer = engine.tokenizer
        if tokenizer is None or not tokenizer.chat_template:
            return _error(400, f"{model_name} has no chat template; use /v1/completions", "messages")
        try:
            prompt = tokenizer.apply_chat_template([m.model_dump() for m in body.messages])
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
    except RequestFailedError as e:
        error = {"message": str(e), "type": "server_error", "param": None, "code": None}
        yield f"data: {json.dumps({'error': error})}\n\n"
    finally:
        await stream.aclose()  # aborts the request if it has not finished
    yield "data: [DONE]\n\n"
