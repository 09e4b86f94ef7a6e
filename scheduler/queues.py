"""The scheduler's queues: the requests it holds and how each one lives: added (checked to
fit), given its sampled tokens after every step (forking, stopping), finished, aborted or
failed; and the counters behind ``stats()``. :class:`pagedkv.scheduler.scheduler.Scheduler`
extends this with the policy that decides each step.

A :class:`~pagedkv.scheduler.request.Request` object is one *sequence*: a request with
``n = 1`` is one, and one with ``n > 1`` becomes ``n`` after its prompt (its ``group``).
The name stays ``Request`` because that is what users and vLLM call the usual case.

Parallel sampling (``n > 1``): the scheduler runs a request as one sequence until the
step that computes the last prompt token, which samples n tokens from its logits; then
the request forks into n sequences that share the prompt's blocks (the last, partly
filled one is copied on write by each sequence that writes into it while it is shared).
From then on each sequence is scheduled, preempted and finished on its own; the request
ends when all of them have. An unforked request holds n of the ``max_num_seqs`` seats,
so that forking never exceeds it.

Pure Python and torch-free.
"""

from __future__ import annotations

import itertools
import time
from bisect import insort
from collections.abc import Callable, Hashable, Sequence
from operator import attrgetter

from pagedkv.errors import InvalidRequestError
from pagedkv.paged.kv_manager import KVCacheManager
from pagedkv.scheduler.admission import AdmissionPolicy, PagedAdmission
from pagedkv.scheduler.config import EngineConfig
from pagedkv.scheduler.executor import SampledTokens, StepResult
from pagedkv.scheduler.outputs import EngineStats
from pagedkv.scheduler.plan import ScheduledRequest, SchedulerOutput
from pagedkv.scheduler.request import FinishReason, Request, RequestStatus

by_rank = attrgetter("rank")  # the sort key of both queues


class RequestQueues:
    """The waiting and running queues (sequences, sorted by rank), every unfinished
    request by id, and the counters; everything here but the policy."""

    def __init__(
        self,
        config: EngineConfig,
        kv: KVCacheManager,
        max_model_len: int,
        eos_token_id: int | None,
        clock: Callable[[], float] = time.monotonic,
        admission: AdmissionPolicy | None = None,
    ) -> None:
        self.config = config
        self.kv = kv
        self.admission: AdmissionPolicy = PagedAdmission() if admission is None else admission
        self.admission.bind(kv, max_model_len)
        self.max_model_len = max_model_len
        self.eos_token_id = eos_token_id
        self.clock = clock
        self.waiting: list[Request] = []  # sorted by rank
        self.running: list[Request] = []  # sorted by rank
        self.requests: dict[str, Request] = {}  # every unfinished request (its first sequence), by id
        self._ended_seq_ids: list[Hashable] = []  # sequence ids
        self._fork_seats = 0  # seats held for the future forks of running, unforked requests
        self._order = itertools.count()
        self.num_preemptions = 0
        self.num_swapped_out = 0
        self.num_recomputed = 0
        self.num_steps = 0
        self.num_tokens_computed = 0
        self.num_generated_tokens = 0
        self.num_prompt_tokens = 0
        self.num_prefix_hit_tokens = 0
        self.peak_blocks_used = 0

    def check_fits(self, request_id: str, num_prompt_tokens: int, max_tokens: int) -> None:
        """Raise :class:`InvalidRequestError` if a request of this size could never run."""
        if request_id in self.requests:
            raise InvalidRequestError(
                f"request_id {request_id!r} is already in use by an unfinished request", "request_id"
            )
        total = num_prompt_tokens + max_tokens
        if total > self.max_model_len:  # blame the prompt only if it leaves no room for one token
            raise InvalidRequestError(
                f"prompt ({num_prompt_tokens} tokens) + max_tokens ({max_tokens}) = {total} "
                f"exceeds max_model_len ({self.max_model_len})",
                "prompt" if num_prompt_tokens >= self.max_model_len else "max_tokens",
            )
        # The last sampled token is never fed back, so it needs no slot.
        blocks = self.kv.blocks_for(total - 1)
        if blocks > self.kv.num_blocks:
            raise InvalidRequestError(
                f"prompt ({num_prompt_tokens} tokens) + max_tokens ({max_tokens}) needs {blocks} KV blocks "
                f"at its longest but the pool has only {self.kv.num_blocks}",
                "max_tokens",
            )
        self.admission.check_fits(num_prompt_tokens, max_tokens)

    def add_request(self, request: Request) -> None:
        if request.params.n > self.config.max_num_seqs:
            raise InvalidRequestError(
                f"n ({request.params.n}) exceeds max_num_seqs ({self.config.max_num_seqs}): "
                "its sequences could never run together",
                "n",
            )
        self.check_fits(request.request_id, request.num_prompt_tokens, request.params.max_tokens)
        request.rank = (request.arrival_time + request.priority * self.config.priority_aging_s, next(self._order))
        self.requests[request.request_id] = request
        insort(self.waiting, request, key=by_rank)

    def abort(self, request_id: str) -> Request | None:
        """End every sequence of a request, in any state, and free their blocks;
        idempotent. Returns the request's first sequence (its ``group`` holds them all),
        or ``None`` if the request was already over or unknown."""
        request = self.requests.get(request_id)
        if request is None:
            return None
        now = self.clock()
        for seq in list(request.group):
            if seq.status is not RequestStatus.FINISHED:
                self._leave_queue(seq)
                self._end_sequence(seq, FinishReason.ABORT, now)
        return request

    def finish_sequence(self, seq: Request, reason: FinishReason) -> None:
        """End one sequence for ``reason`` and free its blocks; its siblings (``n > 1``) go
        on, and the request is over when its last sequence is. The engine calls this for
        stop strings, which only it can see (they need the text). A sequence that already
        ended in this step's :meth:`update` for stop or length (its last token also reached
        ``max_tokens``) takes ``reason`` instead; one aborted or failed keeps its reason."""
        if seq.status is RequestStatus.FINISHED:
            if seq.finish_reason in (FinishReason.STOP, FinishReason.LENGTH):
                seq.finish_reason = reason
            return
        self._leave_queue(seq)
        self._end_sequence(seq, reason, self.clock())

    def finish_running(self, seqs: Sequence[Request], reason: FinishReason) -> None:
        """End running sequences that are done (a bulk decode run's, which reached
        ``max_tokens``) and free their blocks; like :meth:`finish_sequence` for each, with
        the running queue filtered once."""
        now = self.clock()
        for seq in seqs:
            self._end_sequence(seq, reason, now)
        self.running = [s for s in self.running if s.status is RequestStatus.RUNNING]

    def take_finished_seq_ids(self) -> list[Hashable]:
        """The sequences that ended since the last call, for the executor to drop their
        state (``SchedulerOutput.finished_seq_ids``)."""
        ids, self._ended_seq_ids = self._ended_seq_ids, []
        return ids

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    @property
    def num_seats_taken(self) -> int:
        """Running sequences, and the forks that running, unforked requests will make."""
        return len(self.running) + self._fork_seats

    def update(self, plan: SchedulerOutput, result: StepResult) -> list[Request]:
        """Advance every scheduled sequence by its chunk; append sampled tokens; fork the
        requests that sampled n > 1; stop the sequences that are done and free their
        blocks. ``result.tokens`` is aligned with ``plan.scheduled``: each row's tokens (as
        many as it ``samples``, none for chunks that do not reach the end); a row in
        ``result.failed_rows`` fails its request (see :meth:`fail`).

        Returns the sequences that received a token (their last one). Building
        user-facing outputs is the engine's job; the simulator needs none, and skipping
        them keeps a simulated step cheap."""
        sampled, failed_rows = result.tokens, result.failed_rows
        if len(sampled) != len(plan.scheduled):
            raise ValueError(f"got {len(sampled)} sampled tokens for {len(plan.scheduled)} scheduled requests")
        now = self.clock()
        advanced = []
        finished = False
        failed = False
        for i, (row, tokens) in enumerate(zip(plan.scheduled, sampled, strict=True)):
            request = row.request
            request.num_computed_tokens += row.num_new_tokens
            if failed_rows and i in failed_rows:  # the executor failed this row
                if request.status is RequestStatus.RUNNING:
                    self.fail(request, failed_rows[i], now)
                    self._ended_seq_ids.extend(row.sample_seq_ids[1:])  # forks that never were: drop their state
                    finished = failed = True
                continue
            if not tokens or failed and request.status is not RequestStatus.RUNNING:
                continue  # (a sibling's failure ended this sequence earlier in the loop)
            seqs = self._fork(request, row) if len(tokens) > 1 else (request,)
            logprobs = tokens.logprobs if isinstance(tokens, SampledTokens) else None
            for j, (seq, token) in enumerate(zip(seqs, tokens, strict=True)):
                seq.token_ids.append(token)
                if seq.logprobs is not None:  # asked for: kept while the executor computes them
                    if logprobs is None:
                        seq.logprobs = None
                    else:
                        seq.logprobs.append(logprobs[j])
                if seq.first_token_time is None:
                    seq.first_token_time = now
                reason = self._stop_reason(seq, token)
                if reason is not None:
                    self._end_sequence(seq, reason, now)
                    finished = True
                advanced.append(seq)
        if finished:
            self.running = [r for r in self.running if r.status is RequestStatus.RUNNING]
        self.num_tokens_computed += plan.num_batched_tokens
        self.num_generated_tokens += len(advanced)
        self.num_steps += 1
        return advanced

    def stats(self) -> EngineStats:
        kv = self.kv
        return EngineStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            kv_blocks_used=kv.num_used_blocks,
            kv_blocks_free=kv.num_free_blocks,
            kv_blocks_total=kv.num_blocks,
            kv_blocks_peak=self.peak_blocks_used,
            num_preemptions=self.num_preemptions,
            num_steps=self.num_steps,
            num_tokens_computed=self.num_tokens_computed,
            num_generated_tokens=self.num_generated_tokens,
            num_prompt_tokens=self.num_prompt_tokens,
            num_prefix_hit_tokens=self.num_prefix_hit_tokens,
            kv_blocks_cached=kv.num_cached_blocks,
            kv_blocks_evictable=kv.num_evictable_blocks,
            num_swapped_out=self.num_swapped_out,
            num_recomputed=self.num_recomputed,
            swap_blocks_used=kv.swap.num_used,
            swap_blocks_total=kv.swap.num_blocks,
        )

    # ---- internals -----------------------------------------------------------------

    def _leave_queue(self, seq: Request) -> None:
        """Take an unfinished sequence out of its queue; a running one gives back the seats
        held for its request's forks."""
        if seq.status is RequestStatus.RUNNING:
            self.running.remove(seq)
            self._fork_seats -= seq.params.n - 1
        else:
            self.waiting.remove(seq)

    def fail(self, request: Request, error: str, now: float | None = None) -> None:
        """End every unfinished sequence of ``request``'s group because the engine failed
        it (``error`` says how). Their blocks leave the prefix cache first: what they hold
        cannot be trusted."""
        now = self.clock() if now is None else now
        for seq in request.group:
            if seq.status is RequestStatus.FINISHED:
                continue
            self._leave_queue(seq)
            self.kv.forget_cached(seq.seq_id)
            seq.error = error
            self._end_sequence(seq, FinishReason.ERROR, now)

    def fail_step(self, plan: SchedulerOutput, error: BaseException) -> list[Request]:
        """The executor raised on ``plan``: fail every request it scheduled, and those it
        swapped out (their copies may not have happened). Returns the failed requests."""
        swapped_out = set(plan.preempted)
        victims = [s.request for s in plan.scheduled]
        victims += [r for r in self.waiting if r.swapped and r.seq_id in swapped_out]
        message = f"{type(error).__name__}: {error}"
        for request in victims:
            self.fail(request, message)
        self.num_steps += 1
        return list({id(r.group[0]): r.group[0] for r in victims}.values())

    def _stop_reason(self, request: Request, token: int) -> FinishReason | None:
        params = request.params
        if token == self.eos_token_id and not params.ignore_eos:
            return FinishReason.STOP
        if token in request.stop_ids:  # a set: the check costs the same however many ids
            return FinishReason.STOP
        if len(request.token_ids) - request.num_prompt_tokens >= params.max_tokens:
            return FinishReason.LENGTH
        return None

    def _fork(self, parent: Request, row: ScheduledRequest) -> list[Request]:
        """Split ``parent``, whose prompt is now computed, into the sequences its plan row
        sampled as (``row.sample_params``); the new ones share every block of its table.
        Returns them all, ``parent`` first."""
        params = row.sample_params
        parent.params = params[0]
        self._fork_seats -= len(params) - 1
        for i in range(1, len(params)):
            child = Request(parent.request_id, parent.prompt_token_ids, params[i], parent.arrival_time, index=i)
            child.num_computed_tokens = parent.num_computed_tokens
            child.status = RequestStatus.RUNNING
            child.first_scheduled_time = parent.first_scheduled_time
            child.priority, child.rank = parent.priority, parent.rank
            child.group = parent.group
            parent.group.append(child)
            self.kv.fork(parent.seq_id, child.seq_id)
            insort(self.running, child, key=by_rank)  # after its equals: the parent and older siblings
        return parent.group

    def _end_sequence(self, request: Request, reason: FinishReason, now: float) -> None:
        """End one sequence; the request is over when its last sequence is."""
        self.admission.release(request)
        self.kv.free(request.seq_id)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        request.finish_time = now
        self._ended_seq_ids.append(request.seq_id)
        group = request.group
        if len(group) == 1 or all(s.status is RequestStatus.FINISHED for s in group):
            del self.requests[request.request_id]
