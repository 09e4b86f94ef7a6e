"""The engine loop a serving program embeds: add requests, step, stream outputs, abort.

``LLMEngine`` wires a :class:`Scheduler` and a :class:`KVCacheManager` to an *executor*,
the thing that actually runs the model (``models.ModelRunner``) or pretends to (the
simulator's cost model). The engine validates every input before touching any state, so
a refused request leaves the queues, the pool and the other requests exactly as they were.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import NamedTuple

from pagedkv.errors import EngineBusyError, InvalidRequestError
from pagedkv.paged.block_pool import BlockPoolError
from pagedkv.paged.invariants import InvariantViolation, kv_violations, violations
from pagedkv.paged.kv_manager import KVCacheManager
from pagedkv.scheduler.admission import AdmissionPolicy
from pagedkv.scheduler.config import EngineConfig
from pagedkv.scheduler.decode_run import DecodeRun
from pagedkv.scheduler.executor import BulkDecodeExecutor, Executor
from pagedkv.scheduler.invariants import SCHEDULER_CHECKS
from pagedkv.scheduler.outputs import EngineStats, RequestOutput
from pagedkv.scheduler.plan import SchedulerOutput
from pagedkv.scheduler.prompts import Tokenizer, prompt_token_ids
from pagedkv.scheduler.request import FinishReason, Request
from pagedkv.scheduler.sampling_params import SamplingParams
from pagedkv.scheduler.scheduler import Scheduler
from pagedkv.scheduler.text_stream import RequestTexts


class EngineStep(NamedTuple):
    """What one step did, before any output is built."""

    plan: SchedulerOutput
    advanced: list[Request]
    """The sequences that got a token (their last one)."""
    failed: list[Request]
    """Requests (a sequence of each) that the step failed: a raising executor fails all
    it scheduled or swapped out, a failed row its own."""


class DecodeRunSteps(NamedTuple):
    """The steps a bulk decode run took."""

    ends: list[float]
    """The clock at the end of each step taken (none: the run took no step)."""
    finished: list[Request]
    """The sequences that finished in its last step."""


class ConcurrentStepError(EngineBusyError, RuntimeError):
    """``step()`` was entered while another call was still running (from another thread).
    An engine is driven by one thread at a time; the second call is refused, not run, so
    that two steps cannot schedule and update the same queues and blocks at once."""


class LLMEngine:
    def __init__(
        self,
        executor: Executor,
        config: EngineConfig | None = None,
        tokenizer: Tokenizer | None = None,
        clock: Callable[[], float] = time.monotonic,
        admission: AdmissionPolicy | None = None,
    ) -> None:
        """``clock``: the scheduler's time (the simulator's is virtual). ``admission``: who
        may start beyond the scheduler's own rules (the simulator's baselines; default
        :class:`~pagedkv.scheduler.admission.PagedAdmission`)."""
        self.config = config = config or EngineConfig()
        max_model_len = config.resolve_max_model_len(executor.max_model_len)
        self.executor = executor
        self.cache_layout = layout = executor.initialize_cache(config)
        self.kv_manager = KVCacheManager(
            layout.num_blocks, config.block_size, config.enable_prefix_caching,
            cache_salt=layout.cache_salt, num_swap_blocks=layout.num_swap_blocks,
        )
        self.scheduler = Scheduler(
            config,
            self.kv_manager,
            max_model_len=max_model_len,
            eos_token_id=executor.eos_token_id,
            clock=clock,
            admission=admission,
        )
        self.tokenizer = tokenizer
        self._texts = RequestTexts()  # of the requests added while a tokenizer is set
        self._aborted: list[RequestOutput] = []  # final outputs of aborts, for the next step()
        self._generate_ids = itertools.count()
        self._stepping = threading.Lock()  # held while step() runs; never waited for
        self._steps = 0  # steps taken, for the debug mode's checks

    def add_request(
        self,
        request_id: str,
        prompt: str | Sequence[int],
        sampling_params: SamplingParams | dict | None = None,
        priority: int = 0,
        arrival_time: float | None = None,
    ) -> None:
        """Queue a request whose prompt is text (needs a tokenizer) or token ids.
        ``priority``: lower is more urgent (see ``scheduler.Scheduler`` for the rule).
        ``arrival_time``: when it arrived on the engine's clock (default: now; the
        simulator gives the arrival it drew, which may fall inside the last step).

        Raises :class:`InvalidRequestError`, naming the refused field in ``param``, and
        changes nothing if the request is bad.
        """
        params = self._params(sampling_params)
        if not isinstance(request_id, str) or not request_id:
            raise InvalidRequestError(f"request_id must be a non-empty string, got {request_id!r}", "request_id")
        if type(priority) is not int or not -(2**31) <= priority < 2**31:
            raise InvalidRequestError(f"priority must be an integer in [-2**31, 2**31), got {priority!r}", "priority")
        if params.stop and self.tokenizer is None:
            raise InvalidRequestError("stop strings need an engine with a tokenizer; give stop_token_ids", "stop")
        prompt_token_ids = self.tokenize(prompt)
        top_stop = max(params.stop_token_ids, default=-1)  # each one is >= 0 (SamplingParams)
        if top_stop >= self.executor.vocab_size:
            raise InvalidRequestError(
                f"stop_token_ids: {top_stop} is outside the vocabulary [0, {self.executor.vocab_size})",
                "stop_token_ids",
            )
        if arrival_time is None:
            arrival_time = self.scheduler.clock()
        self.scheduler.add_request(Request(request_id, prompt_token_ids, params, arrival_time, priority=priority))
        if self.tokenizer is not None:
            self._texts.open(request_id)

    def step(self) -> list[RequestOutput]:
        """Run one scheduled step. Returns the outputs of requests that got a new token, and
        the final output (``finish_reason`` abort) of each request aborted since the last step.

        Raises :class:`ConcurrentStepError` (a ``RuntimeError``) if another thread is in
        ``step()`` right now: the engine is not thread-safe, and this refuses the misuse
        instead of letting it corrupt the queues."""
        with self._one_step():
            step = self._step()
        # request id -> (its sequences, indices of those that got a token)
        news: dict[str, tuple[list[Request], set[int]]] = {}
        for seq in step.advanced:
            news.setdefault(seq.request_id, (seq.group, set()))[1].add(seq.index)
        for request in step.failed:  # they end with no new token
            news.setdefault(request.request_id, (request.group, set()))
        outputs = [self._with_text(RequestOutput.of(group, indices)) for group, indices in news.values()]
        if self._aborted:
            outputs, self._aborted = self._aborted + outputs, []
        return outputs

    def step_sequences(self) -> EngineStep:
        """:meth:`step` without building outputs: the simulator's step, where 10^5 requests
        must cost seconds. Scheduling, execution, failure handling, stop checks and the
        idle leak check are the same; the final outputs of aborted requests wait for the
        next :meth:`step`."""
        with self._one_step():
            return self._step()

    def decode_run(self, executor: BulkDecodeExecutor) -> DecodeRun | None:
        """A run of pure decode steps that ``executor`` can take in bulk, if the next step
        is one (:mod:`pagedkv.scheduler.decode_run`); take it with :meth:`take_decode_run`."""
        if self.tokenizer is not None:
            return None  # stop strings need every token's text: no bulk steps
        return self.scheduler.decode_run(executor.decode_token)

    def take_decode_run(self, run: DecodeRun, executor: BulkDecodeExecutor, until: float) -> DecodeRunSteps:
        """Take the steps of ``run`` (from :meth:`decode_run`, nothing scheduled since) that
        ``executor`` runs before the clock reaches ``until``, exactly as that many
        :meth:`step_sequences` would."""
        with self._one_step():
            ends = executor.execute_decodes(run.num_seqs, run.context, run.max_steps, until)
            finished = self.scheduler.take_decode_steps(run, len(ends)) if ends else []
            self._check_invariants(len(ends))
            self._check_when_idle()
        return DecodeRunSteps(ends, finished)

    @contextmanager
    def _one_step(self) -> Iterator[None]:
        if not self._stepping.acquire(blocking=False):
            raise ConcurrentStepError(
                "step() is already running in another thread; drive an LLMEngine from one thread at a time"
            )
        try:
            yield
        finally:
            self._stepping.release()

    def _step(self) -> EngineStep:
        plan = self.scheduler.schedule()
        try:
            result = self.executor.execute(plan)
        except Exception as error:  # the step failed: fail its requests, keep serving the others
            step = EngineStep(plan, [], self.scheduler.fail_step(plan, error))
        else:
            advanced = self.scheduler.update(plan, result)
            if (tokenizer := self.tokenizer) is not None:
                for seq in advanced:
                    if seq.finish_reason not in (FinishReason.ABORT, FinishReason.ERROR):
                        if self._texts.stream(seq, tokenizer.detokenizer).add(seq.token_ids[-1]):  # a stop string
                            self.scheduler.finish_sequence(seq, FinishReason.STOP)
            step = EngineStep(plan, advanced, [plan.scheduled[row].request for row in result.failed_rows])
        self._check_invariants(1)
        self._check_when_idle()
        return step

    def _check_invariants(self, steps: int) -> None:
        """The debug mode: after every ``config.check_invariants`` steps (a bulk decode run
        counts its steps but is checked once, at its end), the whole catalogue."""
        every, before = self.config.check_invariants, self._steps
        self._steps += steps
        if every and self._steps // every > before // every:
            found = violations(SCHEDULER_CHECKS, self.scheduler) + kv_violations(self.kv_manager)
            if found:
                raise InvariantViolation(self._steps, found)

    def _check_when_idle(self) -> None:
        """Idle: prove nothing leaked, in O(1) (no table, block, stored token or swap block is
        held), since the simulator goes idle tens of thousands of times a run. The structural
        check, O(pool), is ``kv_manager.check()``: the tests' and the simulator's end of run."""
        if self.has_unfinished_requests():
            return
        kv = self.kv_manager
        held = (kv.num_tables(), kv.num_used_blocks, kv.num_stored_tokens, kv.swap.num_used)
        if any(held):
            raise BlockPoolError(f"idle, yet {held[0]} tables, {held[1]} blocks, {held[2]} stored tokens and "
                                 f"{held[3]} swap blocks are held: a leak")

    def abort(self, request_id: str) -> None:
        """End a request and free its blocks; valid in every state, unknown ids included.
        An unfinished request's final output comes with the next :meth:`step`."""
        request = self.scheduler.abort(request_id)
        if request is not None:
            self._aborted.append(self._with_text(RequestOutput.of(request.group)))

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def is_unfinished(self, request_id: str) -> bool:
        """Whether ``request_id`` names a request that has not ended (so :meth:`abort` would end it)."""
        return request_id in self.scheduler.requests

    @property
    def num_unfinished_requests(self) -> int:
        """Requests added that have not ended (waiting, running or swapped out)."""
        return len(self.scheduler.requests)

    @property
    def num_waiting_requests(self) -> int:
        """Sequences queued for admission (new, or preempted)."""
        return len(self.scheduler.waiting)

    def stats(self) -> EngineStats:
        return self.scheduler.stats()

    def generate(
        self,
        prompts: Sequence[str | Sequence[int]],
        sampling_params: SamplingParams | dict | Sequence[SamplingParams | dict] | None = None,
        on_output: Callable[[RequestOutput], None] | None = None,
        priority: Sequence[int] | None = None,
        request_ids: Sequence[str] | None = None,
    ) -> list[RequestOutput]:
        """Run ``prompts`` to completion, batched continuously; return their final outputs
        in prompt order. ``on_output`` sees every streamed output as it happens;
        ``priority`` gives each prompt's priority (lower is more urgent); ``request_ids``
        names the requests (default ``generate-N``), so that ``on_output`` can tell them apart."""
        if self.has_unfinished_requests():
            raise EngineBusyError(
                "generate() runs the engine to completion; finish or abort the requests in flight first"
            )
        per_prompt: Sequence[SamplingParams | dict | None]
        if sampling_params is None or isinstance(sampling_params, (SamplingParams, dict)):
            per_prompt = [sampling_params] * len(prompts)
        else:
            per_prompt = sampling_params
        if len(per_prompt) != len(prompts):
            raise InvalidRequestError(
                f"got {len(per_prompt)} sampling params for {len(prompts)} prompts", "sampling_params"
            )
        priority = [0] * len(prompts) if priority is None else list(priority)
        if len(priority) != len(prompts):
            raise InvalidRequestError(f"got {len(priority)} priorities for {len(prompts)} prompts", "priority")
        if request_ids is None:
            ids = [f"generate-{next(self._generate_ids)}" for _ in prompts]
        elif len(request_ids) != len(prompts) or len(set(request_ids)) != len(prompts):
            raise InvalidRequestError(
                f"got {len(request_ids)} request ids for {len(prompts)} prompts, or some twice", "request_ids"
            )
        else:
            ids = list(request_ids)
        try:
            for rid, prompt, params, p in zip(ids, prompts, per_prompt, priority, strict=True):
                self.add_request(rid, prompt, params, priority=p)
        except Exception:
            for rid in ids:
                self.abort(rid)
            raise
        final: dict[str, RequestOutput] = {}
        # An abort from on_output leaves its final output for the next step; when it ended
        # the last request there is no step to run, so the loop takes that output directly.
        while self.has_unfinished_requests() or self._aborted:
            if self.has_unfinished_requests():
                outputs = self.step()
            else:
                outputs, self._aborted = self._aborted, []
            for out in outputs:
                if on_output is not None:
                    on_output(out)
                if out.finished:
                    final[out.request_id] = out
        return [final[rid] for rid in ids]

    def _params(self, sampling_params: SamplingParams | dict | None) -> SamplingParams:
        """Validated parameters. A ``SamplingParams`` is validated again: ``model_copy(update=...)``
        and ``model_construct`` skip pydantic's checks, and the engine must not trust them."""
        if sampling_params is None:
            return SamplingParams()
        if isinstance(sampling_params, dict):
            return SamplingParams(**sampling_params)
        if not isinstance(sampling_params, SamplingParams):
            raise InvalidRequestError(
                f"sampling_params must be SamplingParams, got {type(sampling_params).__name__}", "sampling_params"
            )
        return type(sampling_params)(**sampling_params.model_dump())

    def _with_text(self, out: RequestOutput) -> RequestOutput:
        """``out`` with its sequences' text (as is, without a tokenizer)."""
        return self._texts.fill(out) if self.tokenizer is not None else out

    @property
    def max_model_len(self) -> int:
        """The longest prompt + output this engine serves."""
        return self.scheduler.max_model_len

    @property
    def max_request_tokens(self) -> int:
        """The longest prompt + output a request can have here: ``max_model_len``, or less when
        the pool is smaller (the last sampled token needs no slot)."""
        return min(self.max_model_len, self.kv_manager.num_blocks * self.config.block_size + 1)

    def tokenize(self, prompt: str | Sequence[int]) -> list[int]:
        """The prompt's token ids, checked as :meth:`add_request` checks them
        (:func:`~pagedkv.scheduler.prompts.prompt_token_ids`). It touches no engine state, so a
        server may run it in a worker thread."""
        return prompt_token_ids(prompt, self.tokenizer, self.executor.vocab_size)
