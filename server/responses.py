"""OpenAI's response shapes for the engine's outputs: a whole completion, or server-sent
events that stream each step's news (token texts and logprobs included) and end in ``[DONE]``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from typing import Any, TypeVar

from fastapi import Request

from pagedkv.errors import EngineDeadError, RequestFailedError
from pagedkv.scheduler import RequestOutput, SequenceOutput, TokenLogprobs
from pagedkv.scheduler.prompts import Tokenizer

_T = TypeVar("_T")

ENGINE_STOPPED = "the engine has stopped"
"""What clients are told when the engine is gone; its internal error stays in the server's log."""


async def last_output(stream: AsyncIterator[RequestOutput], first: RequestOutput) -> RequestOutput:
    last = first
    async for out in stream:
        last = out
    return last


async def unless_disconnected(request: Request, work: Awaitable[_T]) -> _T | None:
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


def whole_response(out: RequestOutput, rid: str, kind: str, model: str, created: int, chat: bool,
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


async def events(first: RequestOutput, stream: AsyncGenerator[RequestOutput, None], rid: str, kind: str, model: str,
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
