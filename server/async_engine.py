"""The engine for asyncio programs: a background task steps it while there is work, and
each request streams its outputs to its own consumer.

    engine = AsyncLLMEngine(load_engine("smollm2-135m"))
    async with contextlib.aclosing(engine.generate(prompt, SamplingParams(max_tokens=64))) as stream:
        async for out in stream:
            print(out.new_text, end="")
    await engine.shutdown()

The model step runs in a worker thread, so the event loop stays responsive. The
``LLMEngine`` is touched only under one asyncio lock: adds happen between steps, and
aborts (a consumer that stops listening) are queued and applied before the next step,
never between a step's schedule and its update.

Each stream holds at most one output for its consumer (:class:`_Stream`): outputs that
arrive while the consumer is behind merge into it, so a client that stops reading costs
memory linear in its output, not quadratic.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncGenerator, Sequence
from dataclasses import replace

from pagedkv.errors import EngineBusyError, EngineDeadError, InvalidRequestError, RequestFailedError
from pagedkv.scheduler import EngineStats, LLMEngine, RequestOutput, SamplingParams
from pagedkv.scheduler.engine import Tokenizer
from pagedkv.server.metrics import latency_histograms


class _Stream:
    """One request's outputs on their way to its consumer, holding at most one of them.

    Every output the engine hands back carries a fresh copy of all the sequence's tokens
    and text so far, so a queue of them, for a consumer that stops reading, would hold
    O(output²) tokens. Instead an output that arrives while an earlier one still waits
    is merged with it: the waiting news (new tokens and new text) is kept as pieces, the
    rest (``output_token_ids``, ``text``, ``finish_reason``, ``metrics``) is the newest
    output's. The consumer then reads one output whose news is all it missed: the news of
    the outputs read, concatenated, is the whole, and a stalled stream holds O(output).
    """

    def __init__(self) -> None:
        self._latest: RequestOutput | None = None
        self._merged = 0  # outputs merged into the waiting one
        self._tokens: dict[int, list[int]] = {}  # per sequence index: the news since the last read
        self._texts: dict[int, list[str]] = {}
        self._error: BaseException | None = None
        self._ready = asyncio.Event()

    def put(self, out: RequestOutput) -> None:
        for s in out.outputs:
            self._tokens.setdefault(s.index, []).extend(s.new_token_ids)
            self._texts.setdefault(s.index, []).append(s.new_text)
        self._latest = out
        self._merged += 1
        self._ready.set()

    def fail(self, error: BaseException) -> None:
        """End the stream with ``error``, raised once the waiting output is read."""
        self._error = error
        self._ready.set()

    @property
    def failed(self) -> bool:
        return self._error is not None

    def held(self) -> list[RequestOutput]:
        """The output waiting to be read, if any (the merge of all that came since the last read)."""
        if self._latest is None:
            return []
        out = self._latest
        if self._merged > 1:
            out = replace(out, outputs=tuple(
                replace(s, new_token_ids=self._tokens.get(s.index, []), new_text="".join(self._texts.get(s.index, [])))
                for s in out.outputs))
        return [out]

    async def get(self) -> RequestOutput:
        """The next (merged) output; the error, once every output has been read."""
        while self._latest is None and self._error is None:
            self._ready.clear()
            await self._ready.wait()
        if self._latest is None:
            assert self._error is not None
            raise self._error
        (out,) = self.held()
        self._latest, self._merged, self._tokens, self._texts = None, 0, {}, {}
        return out


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine, max_waiting: int = 256) -> None:
        self.engine = engine
        self.max_waiting = max_waiting
        self._streams: dict[str, _Stream] = {}
        self._to_abort: set[str] = set()
        self._lock: asyncio.Lock | None = None
        self._work: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._dead: BaseException | None = None
        self._stopping = False
        self._stepping = False  # a step is running in the worker thread
        self.num_cancelled = 0  # requests whose consumer stopped listening before the end
        self._last_token: dict[str, float] = {}
        self._ids = itertools.count()
        self.ttft, self.itl = latency_histograms()  # served by each app's /metrics (server.metrics)

    @property
    def tokenizer(self) -> Tokenizer | None:
        return self.engine.tokenizer

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    @property
    def is_running(self) -> bool:
        return self._dead is None

    async def generate(
        self,
        prompt: str | Sequence[int],
        sampling_params: SamplingParams | dict | None = None,
        request_id: str | None = None,
        priority: int = 0,
    ) -> AsyncGenerator[RequestOutput, None]:
        """Stream ``prompt``'s outputs as they are produced, ending with the finished one.
        Invalid input raises :class:`InvalidRequestError` before anything is queued, a full
        queue raises :class:`EngineBusyError`, a
        request the engine failed raises :class:`RequestFailedError`. Closing the stream
        early aborts the request: leaving ``async with contextlib.aclosing(...)``, the
        consuming task being cancelled, or the generator being garbage-collected (a plain
        ``break`` closes it only then)."""
        lock, work = self._start()
        request_id = request_id or f"async-{next(self._ids)}"
        stream = _Stream()
        async with lock:
            if self._dead is not None:
                raise EngineDeadError(f"the engine has stopped: {self._dead!r}")
            if len(self.engine.scheduler.waiting) >= self.max_waiting:
                raise EngineBusyError(f"{self.max_waiting} requests are already waiting; try again later")
            if request_id in self._streams:
                raise InvalidRequestError(f"request_id {request_id!r} is already streaming", "request_id")
            self.engine.add_request(request_id, prompt, sampling_params, priority=priority)
            self._to_abort.discard(request_id)  # an earlier stream's pending abort is not for this one
            self._streams[request_id] = stream
            work.set()
        finished = False
        try:
            while not finished:
                try:
                    item = await stream.get()
                except BaseException:
                    finished = stream.failed  # else the consumer was cancelled while it waited
                    raise
                finished = item.finished
                if item.finished and item.error:
                    raise RequestFailedError(f"request {request_id!r} failed: {item.error}")
                yield item
        finally:
            if not finished:  # the consumer went away: abort before the next step
                self.num_cancelled += 1
                self._streams.pop(request_id, None)
                self._to_abort.add(request_id)
                work.set()

    async def shutdown(self) -> None:
        """Stop the background loop, abort what is in flight and end every stream with
        :class:`EngineDeadError`."""
        if self._task is None or self._task.done():
            return
        self._stopping = True  # the loop ends after the step in progress, never inside it
        self._started()[1].set()
        await self._task
        self._fail_all(EngineDeadError("the engine was shut down"))

    # ---- the background loop -----------------------------------------------------

    def _start(self) -> tuple[asyncio.Lock, asyncio.Event]:
        """Start the background loop on first use (inside the running event loop, where the
        lock and the work event must be created); return them."""
        if self._task is None:
            self._lock, self._work = asyncio.Lock(), asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="pagedkv-engine")
        return self._started()

    def _started(self) -> tuple[asyncio.Lock, asyncio.Event]:
        """The lock and the work event, which exist once :meth:`_start` has run."""
        if self._lock is None or self._work is None:
            raise RuntimeError("the engine loop has not been started")
        return self._lock, self._work

    async def _loop(self) -> None:
        try:
            lock, work = self._started()
            while True:
                await work.wait()
                if self._stopping:
                    return
                async with lock:
                    for rid in self._to_abort:
                        self.engine.abort(rid)
                        self._last_token.pop(rid, None)
                    self._to_abort.clear()
                    if not self.engine.has_unfinished_requests():
                        self.engine.step()  # hands back the final outputs of the aborts; nobody listens
                        work.clear()
                        continue
                    self._stepping = True
                    outputs = await asyncio.to_thread(self.engine.step)
                    self._stepping = False
                self._deliver(outputs)
        except BaseException as e:  # a bug (failed steps fail only their requests), or cancellation
            self._fail_all(e if isinstance(e, Exception) else EngineDeadError("the engine loop was cancelled"))
            raise

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        now = time.monotonic()
        for out in outputs:
            rid = out.request_id
            if any(s.new_token_ids for s in out.outputs):
                last = self._last_token.get(rid)
                if last is None:
                    ttft = out.metrics.ttft
                    if ttft is not None:
                        self.ttft.observe(ttft)
                else:
                    self.itl.observe(now - last)
                self._last_token[rid] = now
            stream = self._streams.get(rid)
            if out.finished:
                self._streams.pop(rid, None)
                self._last_token.pop(rid, None)
            if stream is not None:
                stream.put(out)

    def _fail_all(self, error: BaseException) -> None:
        """End every stream with ``error`` first, then try to free their requests."""
        self._dead = error
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream.fail(error)
        if self._stepping:  # cancelled while a step still runs in its thread: leave the engine alone
            return
        for rid in streams:
            try:
                self.engine.abort(rid)
            except Exception:  # the engine may be inconsistent after an unexpected error
                pass

    async def stats(self) -> EngineStats:
        """The engine's stats, read between steps (never while a step mutates it)."""
        if self._lock is None:
            return self.engine.stats()
        async with self._lock:
            return self.engine.stats()
