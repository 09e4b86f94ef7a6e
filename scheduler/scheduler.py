"""The continuous-batching scheduler: every step, who computes how many tokens.

Policy (first-come, first-served, recompute preemption):

1. Running requests go first, in admission order, each asking for every token it has not
   computed yet, cut to what is left of the step's token budget. Decodes therefore never
   wait behind a prefill, and a long prompt is prefilled in chunks across steps.
2. When a running request cannot get the blocks it needs, the most recently admitted
   request is preempted: its blocks are freed, its progress counter drops to zero, and it
   goes back to the *front* of the waiting queue, keeping its place in line. A request
   may have to preempt itself when it is the newest one.
3. If nobody was preempted, waiting requests are admitted in arrival order while the
   budget, ``max_num_seqs`` and the free blocks allow. The first that does not fit stops
   admission (strict FCFS).

Every request that is accepted fits in the pool on its own (checked at ``add_request``),
so with nothing running the head of the queue can always be admitted: no deadlock.

Parallel sampling (``n > 1``): the scheduler runs a request as one sequence until the
step that computes the last prompt token, which samples n tokens from its logits; then
the request forks into n sequences that share the prompt's blocks (the last, partly
filled one is copied on write by each sequence that writes into it while it is shared).
From then on each sequence is scheduled, preempted and finished on its own; the request
ends when all of them have. An unforked request holds n of the ``max_num_seqs`` seats,
so that forking never exceeds it.
Pure Python and torch-free, so the simulator drives this very class.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from paged.kv_manager import KVCacheManager
from paged.prefix import NO_HIT
from scheduler.outputs import EngineStats, SchedulerOutput
from scheduler.params import EngineConfig
from scheduler.request import FinishReason, InvalidRequestError, Request, RequestStatus


class Scheduler:
    def __init__(
        self,
        config: EngineConfig,
        kv: KVCacheManager,
        max_model_len: int,
        eos_token_id: int | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.kv = kv
        self.max_model_len = max_model_len
        self.eos_token_id = eos_token_id
        self.clock = clock
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}  # every unfinished request (its first sequence), by id
        self._finished_ids: list = []  # sequence ids
        self._fork_seats = 0  # seats held for the future forks of running, unforked requests
        self.num_preemptions = 0
        self.num_steps = 0
        self.num_tokens_computed = 0
        self.num_generated_tokens = 0
        self.num_prompt_tokens = 0
        self.num_prefix_hit_tokens = 0
        self.peak_blocks_used = 0

    # ---- requests in and out -------------------------------------------------------

    def check_fits(self, request_id: str, num_prompt_tokens: int, max_tokens: int) -> None:
        """Raise :class:`InvalidRequestError` if a request of this size could never run."""
        if request_id in self.requests:
            raise InvalidRequestError(f"request_id {request_id!r} is already in use by an unfinished request")
        total = num_prompt_tokens + max_tokens
        if total > self.max_model_len:
            raise InvalidRequestError(
                f"prompt ({num_prompt_tokens} tokens) + max_tokens ({max_tokens}) = {total} "
                f"exceeds max_model_len ({self.max_model_len})"
            )
        # The last sampled token is never fed back, so it needs no slot.
        blocks = self.kv.blocks_for(total - 1)
        if blocks > self.kv.num_blocks:
            raise InvalidRequestError(
                f"prompt ({num_prompt_tokens} tokens) + max_tokens ({max_tokens}) needs {blocks} KV blocks "
                f"at its longest but the pool has only {self.kv.num_blocks}"
            )

    def add_request(self, request: Request) -> None:
        if request.params.n > self.config.max_num_seqs:
            raise InvalidRequestError(
                f"n ({request.params.n}) exceeds max_num_seqs ({self.config.max_num_seqs}): its sequences could never run together"
            )
        self.check_fits(request.request_id, request.num_prompt_tokens, request.params.max_tokens)
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def abort(self, request_id: str) -> Request | None:
        """End every sequence of a request, in any state, and free their blocks;
        idempotent. Returns the request's first sequence (its ``group`` holds them all),
        or ``None`` if the request was already over or unknown."""
        request = self.requests.get(request_id)
        if request is None:
            return None
        now = self.clock()
        for seq in list(request.group):
            if seq.status is RequestStatus.WAITING:
                self.waiting.remove(seq)
            elif seq.status is RequestStatus.RUNNING:
                self.running.remove(seq)
                self._fork_seats -= seq.params.n - 1
            else:
                continue
            self._finish(seq, FinishReason.ABORT, now)
        return request

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # ---- one step ------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        plan = SchedulerOutput(finished_seq_ids=self._finished_ids)
        self._finished_ids = []
        budget = self.config.max_num_batched_tokens

        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            n = self._try_schedule(request, budget, plan)
            while not n and self._preempt_newest(plan) is not request:
                n = self._try_schedule(request, budget, plan)
            if not n:
                break  # the request was the newest and preempted itself
            budget -= n
            i += 1

        while self._admission_open(plan) and self.waiting and budget > 0:
            request = self.waiting[0]
            if len(self.running) + self._fork_seats + request.params.n > self.config.max_num_seqs:
                break
            n = self._try_schedule(request, budget, plan)
            if not n:
                break
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            if request.first_scheduled_time is None:
                request.first_scheduled_time = self.clock()
                self.num_prompt_tokens += request.num_prompt_tokens
            self.running.append(request)
            self._fork_seats += request.params.n - 1
            budget -= n

        self.peak_blocks_used = max(self.peak_blocks_used, self.kv.num_used_blocks)
        return plan

    def _admission_open(self, plan: SchedulerOutput) -> bool:
        """Whether waiting requests may be admitted now: not in a step that had to preempt
        (it would only thrash). Baseline policies in the simulator narrow this further."""
        return not plan.preempted

    def _try_schedule(self, request: Request, budget: int, plan: SchedulerOutput) -> int:
        """Give ``request`` its next chunk (all it has left, cut to ``budget``) if the blocks
        for it can be had; return the chunk's size, or 0 when memory says no. A chunk
        that reaches the end samples ``params.n`` tokens (n > 1 only before the fork)."""
        start, total = request.num_computed_tokens, len(request.token_ids)
        seq_id = request.seq_id
        prefix = NO_HIT
        if start == 0 and self.kv.prefix_caching and not self.kv.has(seq_id):
            prefix = self.kv.find_prefix(request.token_ids)
            start = len(prefix.blocks) * self.kv.block_size
        n = total - start if total - start < budget else budget
        allocation = self.kv.allocate_slots(seq_id, start + n, prefix)
        if allocation is None:
            return 0
        if prefix.blocks:
            request.num_computed_tokens = start
            if not request.num_preemptions:  # the hit rate is over prompts, each counted once
                self.num_prefix_hit_tokens += start
        if allocation.copies:
            plan.block_copies.extend(allocation.copies)
        if (start + n) % self.kv.block_size < n and self.kv.prefix_caching:
            # Blocks this chunk fills are registered now, before they are computed, so that
            # requests admitted later in this same step share them: the forward pass writes
            # every new K/V of a layer before any attention of that layer reads the cache.
            self.kv.cache_full_blocks(seq_id, request.token_ids, start + n)
        plan.add(request, start, n, self.kv.block_ids(seq_id), request.params.n if start + n == total else 0)
        return n

    def update(self, plan: SchedulerOutput, sampled: list[tuple[int, ...]]) -> list[Request]:
        """Advance every scheduled sequence by its chunk; append sampled tokens; fork the
        requests that sampled n > 1; stop the sequences that are done and free their
        blocks. ``sampled`` is aligned with ``plan.scheduled``: each row's tokens (as many
        as it ``samples``, none for chunks that do not reach the end).

        Returns the sequences that received a token (their last one). Building
        user-facing outputs is the engine's job; the simulator needs none, and skipping
        them keeps a simulated step cheap."""
        if len(sampled) != len(plan.scheduled):
            raise ValueError(f"got {len(sampled)} sampled tokens for {len(plan.scheduled)} scheduled requests")
        now = self.clock()
        advanced = []
        finished = False
        for (request, _, n, _, _), tokens in zip(plan.scheduled, sampled):
            request.num_computed_tokens += n
            if not tokens:
                continue
            for seq, token in zip(self._fork(request, len(tokens)) if len(tokens) > 1 else (request,), tokens):
                seq.token_ids.append(token)
                if seq.first_token_time is None:
                    seq.first_token_time = now
                reason = self._stop_reason(seq, token)
                if reason is not None:
                    self._finish(seq, reason, now)
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
        )

    # ---- internals -----------------------------------------------------------------

    def _stop_reason(self, request: Request, token: int) -> FinishReason | None:
        params = request.params
        if token == self.eos_token_id and not params.ignore_eos:
            return FinishReason.STOP
        if params.stop_token_ids and token in params.stop_token_ids:
            return FinishReason.STOP
        if len(request.token_ids) - request.num_prompt_tokens >= params.max_tokens:
            return FinishReason.LENGTH
        return None

    def _fork(self, parent: Request, n: int) -> list[Request]:
        """Split ``parent``, whose prompt is now computed, into its ``n`` sequences; the
        new ones share every block of its table. Returns all n, ``parent`` first."""
        params = parent.params
        parent.params = params.for_sequence(0)
        self._fork_seats -= n - 1
        for i in range(1, n):
            child = Request(parent.request_id, parent.prompt_token_ids, params.for_sequence(i), parent.arrival_time, index=i)
            child.num_computed_tokens = parent.num_computed_tokens
            child.status = RequestStatus.RUNNING
            child.first_scheduled_time = parent.first_scheduled_time
            child.group = parent.group
            parent.group.append(child)
            self.kv.fork(parent.seq_id, child.seq_id)
            self.running.append(child)
        return parent.group

    def _preempt_newest(self, plan: SchedulerOutput) -> Request:
        """Preempt the most recently admitted running sequence; return it."""
        request = self.running.pop()
        self._fork_seats -= request.params.n - 1
        plan.preempted.append(request.seq_id)
        self.kv.free(request.seq_id)
        request.status = RequestStatus.WAITING
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)
        return request

    def _finish(self, request: Request, reason: FinishReason, now: float) -> None:
        """End one sequence; the request is over when its last sequence is."""
        self.kv.free(request.seq_id)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        request.finish_time = now
        self._finished_ids.append(request.seq_id)
        group = request.group
        if len(group) == 1 or all(s.status is RequestStatus.FINISHED for s in group):
            del self.requests[request.request_id]
