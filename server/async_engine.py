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
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import replace

from pagedkv.errors import EngineBusyError, EngineDeadError, InvalidRequestError, RequestFailedError
from pagedkv.scheduler import EngineStats, LLMEngine, RequestOutput, SamplingParams, TokenLogprobs
from pagedkv.scheduler.prompts import Tokenizer
from pagedkv.server.metrics import latency_histograms


class _Stream:
    """One request's outputs on their way to its consumer, holding at most one of them.

    Every output the engine hands back carries a fresh copy of all the sequence's tokens
    and text so far, so a queue of them, for a consumer that stops reading, would hold
    O(output²) tokens. Instead an output that arrives while an earlier one still waits
    is merged with it: the waiting news (new tokens, their logprobs and new text) is kept as pieces, the
    rest (``output_token_ids``, ``text``, ``finish_reason``, ``metrics``) is the newest
    output's. The consumer then reads one output whose news is all it missed: the news of
    the outputs read, concatenated, is the whole, and a stalled stream holds O(output).
    """

    def __init__(self) -> None:
        self._latest: RequestOutput | None = None
        self._merged = 0  # outputs merged into the waiting one
        self._tokens: dict[int, list[int]] = {}  # per sequence index: the news since the last read
        self._texts: dict[int, list[str]] = {}
        self._logprobs: dict[int, list[TokenLogprobs]] = {}  # (only for requests that asked for them)
        self._error: BaseException | None = None
        self._ready = asyncio.Event()

    def put(self, out: RequestOutput) -> None:
        for s in out.outputs:
            self._tokens.setdefault(s.index, []).extend(s.new_token_ids)
            self._texts.setdefault(s.index, []).append(s.new_text)
            if s.new_logprobs is not None:
                self._logprobs.setdefault(s.index, []).extend(s.new_logprobs)
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
                replace(s, new_token_ids=self._tokens.get(s.index, []), new_text="".join(self._texts.get(s.index, [])),
                        new_logprobs=None if s.new_logprobs is None else self._logprobs.get(s.index, []))
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
        self._latest, self._merged, self._tokens, self._texts, self._logprobs = None, 0, {}, {}, {}
        return out


class AsyncLLMEngine:
    """Serves one :class:`LLMEngine` to the coroutines of one event loop at a time.

    The background loop starts on first use in the running event loop. If that event loop
    ends (``asyncio.run`` returns), the loop is cancelled: its open streams end with
    :class:`EngineDeadError`, their requests are aborted, and the next use, in a new event
    loop, starts a fresh loop there. Using it from a second event loop while the first
    still runs raises ``RuntimeError``: the lock that keeps steps and adds apart belongs
    to one event loop. Only :meth:`shutdown`, or a bug in the loop, stops it for good.
    """

    def __init__(self, engine: LLMEngine, max_waiting: int = 256) -> None:
        self.engine = engine
        self.max_waiting = max_waiting
        self._streams: dict[str, _Stream] = {}
        self._to_abort: set[str] = set()  # applied by the loop before its next step
        self._superseded: set[str] = set()  # aborted for nobody: drop their final output
        self._lock: asyncio.Lock | None = None  # these three belong to the current event loop
        self._work: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._dead: EngineDeadError | None = None
        self._closing = False  # shutdown() has begun: new requests are refused
        self._stopping = False  # the loop is to end after the step in progress
        # The model steps in this thread, so that a step's future tells when it is over even
        # if the loop awaiting it was cancelled (a step that had not started never runs).
        self._stepper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pagedkv-step")
        self._step: Future[list[RequestOutput]] | None = None
        self.num_cancelled = 0  # requests whose consumer stopped listening before the end
        self._last_token: dict[str, float] = {}
        self._ids = itertools.count()
        self.ttft, self.itl = latency_histograms()  # served by each app's /metrics (server.metrics)

    @property
    def tokenizer(self) -> Tokenizer | None:
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def max_request_tokens(self) -> int:
        return self.engine.max_request_tokens

    async def tokenize(self, prompt: str | Sequence[int]) -> list[int]:
        """:meth:`LLMEngine.tokenize` in a worker thread, so that a long text does not hold up
        the event loop (it touches no engine state, so it needs no lock)."""
        return await asyncio.to_thread(self.engine.tokenize, prompt)

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    @property
    def is_running(self) -> bool:
        """False once :meth:`shutdown` has begun or the loop died."""
        return self._dead is None and not self._closing

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
        ``break`` closes it only then). Its ``request_id`` is free again as soon as it is closed.

        A consumer that reads slower than the engine generates gets fewer, merged outputs
        (see :class:`_Stream`): concatenating ``new_token_ids`` and ``new_text`` still gives
        the whole, and the last output carries all of it."""
        lock, work = self._start()
        request_id = request_id or f"async-{next(self._ids)}"
        stream = _Stream()
        async with lock:
            self._check_serving()
            if self.engine.num_waiting_requests >= self.max_waiting:
                raise EngineBusyError(f"{self.max_waiting} requests are already waiting; try again later")
            if request_id in self._streams:
                raise InvalidRequestError(f"request_id {request_id!r} is already streaming", "request_id")
            if request_id in self._to_abort:  # its last stream closed; abort that request now, not next step
                self._to_abort.discard(request_id)
                self._abort_now(request_id)
            self.engine.add_request(request_id, prompt, sampling_params, priority=priority)
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
            if not finished and self._streams.get(request_id) is stream:  # the consumer went away
                self.num_cancelled += 1
                del self._streams[request_id]
                self._to_abort.add(request_id)  # applied before the next step
                self._wake()

    def abort(self, request_id: str) -> None:
        """Abort the request of an open stream, before the next step: the stream ends with a
        finished output whose ``finish_reason`` is abort. Other ids are ignored."""
        if request_id in self._streams:
            self._to_abort.add(request_id)
            self._wake()

    async def shutdown(self, timeout: float = 0.0) -> None:
        """Stop for good. New requests are refused at once; those in flight get ``timeout``
        seconds to finish (0: none), then the loop stops after the step in progress, what
        is left is aborted and its streams end with :class:`EngineDeadError`. Idempotent,
        and fine before first use."""
        if self._dead is not None:
            return
        self._closing = True
        task = self._task if self._task is not None and not self._task.done() else None
        if task is not None and task.get_loop() is not asyncio.get_running_loop():
            raise RuntimeError(self._OTHER_LOOP)
        deadline = time.monotonic() + timeout
        while task is not None and self._streams and time.monotonic() < deadline and not task.done():
            await asyncio.sleep(0.01)  # polled: one shutdown needs no event of its own
        if task is not None and not task.done():
            self._stopping = True  # the loop ends after the step in progress, never inside it
            self._started()[1].set()
            await task
        if self._dead is None:  # else the loop died meanwhile, and said why
            self._fail_all(EngineDeadError("the engine was shut down"), dead=True)

    # ---- the background loop -----------------------------------------------------

    _OTHER_LOOP = ("this AsyncLLMEngine is running in another event loop, which is still running; "
                   "an engine serves one event loop at a time (it moves to a new one once the old one ended)")

    def _check_serving(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(f"the engine has stopped: {self._dead}")
        if self._closing:
            raise EngineDeadError("the engine is shutting down")

    def _start(self) -> tuple[asyncio.Lock, asyncio.Event]:
        """Start the background loop in the running event loop on first use, or after the
        event loop it ran in ended (the lock and the work event are made anew: they belong
        to one event loop); return them."""
        self._check_serving()
        loop, task = asyncio.get_running_loop(), self._task
        if task is not None and task.get_loop() is not loop and not task.done() and not task.get_loop().is_closed():
            raise RuntimeError(self._OTHER_LOOP)
        if task is not None and not task.done() and task.get_loop().is_closed():  # closed under it: no cleanup ran
            self._fail_all(EngineDeadError("the engine's event loop was closed"), dead=False)
        if task is None or task.done() or task.get_loop() is not loop:
            self._lock, self._work = asyncio.Lock(), asyncio.Event()
            if self._to_abort:  # closed streams of the previous event loop
                self._work.set()
            self._task = loop.create_task(self._loop(), name="pagedkv-engine")
        return self._started()

    def _started(self) -> tuple[asyncio.Lock, asyncio.Event]:
        """The lock and the work event, which exist once :meth:`_start` has run."""
        if self._lock is None or self._work is None:
            raise RuntimeError("the engine loop has not been started")
        return self._lock, self._work

    def _wake(self) -> None:
        if self._work is not None:
            self._work.set()

    async def _loop(self) -> None:
        try:
            lock, work = self._started()
            while True:
                await work.wait()
                if self._stopping:
                    return
                async with lock:
                    for rid in self._to_abort:
                        self.engine.abort(rid)  # an open stream's (abort()) gets the final output
                        self._last_token.pop(rid, None)
                    self._to_abort.clear()
                    if not self.engine.has_unfinished_requests():
                        outputs = self.engine.step()  # just the final outputs of the aborts
                        work.clear()
                    else:
                        self._step = self._stepper.submit(self.engine.step)
                        outputs = await asyncio.wrap_future(self._step)
                self._deliver(outputs)
        except asyncio.CancelledError:  # its event loop is ending (or someone cancelled it)
            self._fail_all(EngineDeadError("the engine's event loop stopped; the engine restarts in the next one"),
                           dead=False)
            raise
        except BaseException as e:  # a bug: failed steps fail only their requests
            error = EngineDeadError(f"the engine loop failed: {e!r}")
            error.__cause__ = e
            self._fail_all(error, dead=True)
            raise

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        now = time.monotonic()
        for out in outputs:
            rid = out.request_id
            if rid in self._superseded and out.finished:  # a step hands aborted outputs back first
                self._superseded.discard(rid)
                continue
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

    def _abort_now(self, rid: str) -> None:
        """Abort ``rid`` between steps (the lock held, or no loop running); its final
        output, which the next step hands back, is for nobody."""
        if self.engine.is_unfinished(rid):
            self.engine.abort(rid)
            self._superseded.add(rid)
        self._last_token.pop(rid, None)

    def _fail_all(self, error: EngineDeadError, dead: bool) -> None:
        """End every open stream with ``error`` first, then abort their requests and the
        pending aborts; ``dead``: the engine stops for good."""
        if dead:
            self._dead = error
            self._stepper.shutdown(wait=False)
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream.fail(error)
        self._to_abort.update(streams)
        if self._step is not None:  # the loop was cancelled inside a step: let it end (one step's time)
            wait([self._step])
        for rid in self._to_abort:
            try:
                self._abort_now(rid)
            except Exception:  # the engine may be inconsistent after an unexpected error
                pass
        self._to_abort.clear()

    async def stats(self) -> EngineStats:
        """The engine's stats, read between steps (never while a step mutates it)."""
        task = self._task
        if self._lock is None or task is None or task.done() or task.get_loop() is not asyncio.get_running_loop():
            return self.engine.stats()  # no loop steps it from here
        async with self._lock:
            return self.engine.stats()
