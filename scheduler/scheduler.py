"""The continuous-batching scheduler: every step, who computes how many tokens.

Ranking. Every request gets a rank when it arrives: ``arrival_time + priority *
priority_aging_s`` (lower priority values are more urgent), ties broken by arrival order.
Both queues are kept sorted by rank, so with equal priorities everything is first come,
first served, and a request that waited ``priority_aging_s`` seconds per level outranks a
more urgent newcomer: aging, so nothing starves. A preempted request keeps its rank.

Each step (``enable_chunked_prefill``, the default):

1. If the best waiting request is more urgent (strictly lower priority value) than the
   worst running one, outranks it, and cannot be admitted for lack of ``max_num_seqs`` seats or blocks,
   running requests of lower priority are preempted, worst first, until it could be.
2. Running requests go first, best rank first, each asking for every token it has not
   computed, cut to what is left of the token budget: decodes never wait behind a
   prefill (stall-free batching) and long prompts are prefilled in chunks, which may end
   mid-block.
3. When a running request cannot get a block, the worst-ranked running request is
   preempted (possibly itself): by swap (its blocks are copied to the CPU swap space and
   it keeps its progress) when ``preemption_mode="swap"`` and the swap space has room,
   else by recompute (its blocks are freed and it starts over). Either way it goes back
   to the waiting queue at its rank.
4. Unless this step had to preempt for memory, waiting requests are admitted in rank
   order while seats and budget last, each leaving ``kv_watermark`` of the pool free
   (unless nothing is running). A request whose blocks cannot be had is passed over, so
   that one long prompt does not block short ones behind it, but only for
   ``head_of_line_patience`` steps while it is at the head; then admission waits for it.

Without chunked prefill a step either prefills whole prompts (admission only) or, when
no waiting request can be admitted, decodes every running request (vLLM v0's policy).

Progress: every accepted request fits the pool alone (checked when it is added), the
watermark is waived when nothing runs, and a running request only preempts others before
itself, so some request is scheduled in every step while any is unfinished.

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

import itertools
import time
from bisect import insort
from collections.abc import Callable
from operator import attrgetter

from paged.kv_manager import KVCacheManager
from paged.prefix import NO_HIT
from scheduler.outputs import EngineStats, SchedulerOutput
from scheduler.params import EngineConfig
from scheduler.request import FinishReason, InvalidRequestError, Request, RequestStatus

_rank = attrgetter("rank")
MAX_PASSED_OVER = 16
"""Waiting requests admission looks past in one step when earlier ones do not fit."""


class Scheduler:
    def __init__(
        self,
        config: EngineConfig,
        kv: KVCacheManager,
        max_model_len: int,
        eos_token_id: int | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not config.enable_chunked_prefill and config.max_num_batched_tokens < max_model_len:
            raise ValueError(
                f"max_num_batched_tokens ({config.max_num_batched_tokens}) must be >= max_model_len ({max_model_len}) "
                "when enable_chunked_prefill is False: every prompt is prefilled in one step"
            )
        self.config = config
        self.kv = kv
        self.max_model_len = max_model_len
        self.eos_token_id = eos_token_id
        self.clock = clock
        self.waiting: list[Request] = []  # sorted by rank
        self.running: list[Request] = []  # sorted by rank
        self.requests: dict[str, Request] = {}  # every unfinished request (its first sequence), by id
        self._finished_ids: list = []  # sequence ids
        self._fork_seats = 0  # seats held for the future forks of running, unforked requests
        self._order = itertools.count()
        self._watermark = int(config.kv_watermark * kv.num_blocks)
        self._head: Request | None = None  # the waiting request at the head in the last step
        self._head_passed_over = 0  # steps in which it did not fit at the head
        self.num_preemptions = 0
        self.num_swapped_out = 0
        self.num_recomputed = 0
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
        request.rank = (request.arrival_time + request.priority * self.config.priority_aging_s, next(self._order))
        self.requests[request.request_id] = request
        insort(self.waiting, request, key=_rank)

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

    @property
    def num_seats_taken(self) -> int:
        """Running sequences, and the forks that running, unforked requests will make."""
        return len(self.running) + self._fork_seats

    # ---- one step ------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        plan = SchedulerOutput(finished_seq_ids=self._finished_ids)
        self._finished_ids = []
        budget = self.config.max_num_batched_tokens
        if not self.config.enable_chunked_prefill:
            budget = self._admit(plan, budget, whole=True)
            if not plan.scheduled:
                self._run(plan, budget)
        else:
            if self.waiting and self.running:
                self._preempt_for_priority(plan)
            preempted = len(plan.preempted)
            budget = self._run(plan, budget)
            if len(plan.preempted) == preempted:  # admitting now would only thrash
                self._admit(plan, budget, whole=False)
        self.peak_blocks_used = max(self.peak_blocks_used, self.kv.num_used_blocks)
        return plan

    def _run(self, plan: SchedulerOutput, budget: int) -> int:
        """Schedule the running sequences, best rank first, preempting the worst when
        memory runs out; return the budget left."""
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            n = self._try_schedule(request, budget, plan)
            while not n and self._preempt_lowest(plan) is not request:
                n = self._try_schedule(request, budget, plan)
            if not n:
                break  # the request was the lowest-ranked and preempted itself
            budget -= n
            i += 1
        return budget

    def _admit(self, plan: SchedulerOutput, budget: int, whole: bool) -> int:
        """Admit waiting requests in rank order (whole prompts only when ``whole``);
        return the budget left. See the module docstring for the head-of-line rule."""
        if not self._admission_open(plan):
            return budget
        i = passed_over = 0
        while i < len(self.waiting) and budget > 0:
            request = self.waiting[i]
            if self.num_seats_taken + request.params.n > self.config.max_num_seqs:
                break
            reserve = self._watermark if self.running else 0
            n = self._try_schedule(request, budget, plan, reserve, whole)
            if n:
                del self.waiting[i]
                if request is self._head:
                    self._head = None
                request.status = RequestStatus.RUNNING
                if request.first_scheduled_time is None:
                    request.first_scheduled_time = self.clock()
                    self.num_prompt_tokens += request.num_prompt_tokens
                insort(self.running, request, key=_rank)
                self._fork_seats += request.params.n - 1
                budget -= n
                continue
            if whole and request.num_tokens - request.num_computed_tokens > budget:
                break  # no room left in this step's budget; not a memory problem
            if i == 0 and not self._may_pass(request) or passed_over == MAX_PASSED_OVER:
                break
            i += 1
            passed_over += 1
        return budget

    def _may_pass(self, head: Request) -> bool:
        """Whether requests behind ``head`` (which cannot get its blocks) may go first
        in this step: yes for ``head_of_line_patience`` steps of it being at the head."""
        if head is not self._head:
            self._head, self._head_passed_over = head, 0
        self._head_passed_over += 1
        return self._head_passed_over <= self.config.head_of_line_patience

    def _admission_open(self, plan: SchedulerOutput) -> bool:
        """Whether waiting requests may be admitted now. Baseline policies in the
        simulator narrow this further."""
        return True

    def _preempt_for_priority(self, plan: SchedulerOutput) -> None:
        """Make room for the best waiting request by preempting less urgent running ones."""
        head = self.waiting[0]
        first_chunk = min(head.num_tokens, head.num_computed_tokens + self.config.max_num_batched_tokens)
        need = self.kv.blocks_for(first_chunk) + self._watermark
        # Only victims the head outranks too: an aged victim would win its seat straight back.
        while self.running and self.running[-1].priority > head.priority and self.running[-1].rank > head.rank:
            short_of_seats = self.num_seats_taken + head.params.n > self.config.max_num_seqs
            if not short_of_seats and need <= self.kv.num_free_blocks:
                return
            self._preempt_lowest(plan)

    def _try_schedule(
        self, request: Request, budget: int, plan: SchedulerOutput, reserve: int = 0, whole: bool = False
    ) -> int:
        """Give ``request`` its next chunk (all it has left, cut to ``budget``; all or
        nothing when ``whole``) if the blocks for it can be had with ``reserve`` blocks
        to spare; return the chunk's size, or 0. A chunk that reaches the end samples
        ``params.n`` tokens (n > 1 only before the fork)."""
        start, total = request.num_computed_tokens, len(request.token_ids)
        seq_id = request.seq_id
        prefix = NO_HIT
        if start == 0 and self.kv.prefix_caching and not self.kv.has(seq_id):
            prefix = self.kv.find_prefix(request.token_ids, request.block_keys)
            start = len(prefix.blocks) * self.kv.block_size
        n = total - start if total - start < budget else budget
        if whole and start + n < total:
            return 0
        if request.swapped:
            swap_in = self.kv.swap_in(seq_id, start + n, reserve)
            if swap_in is None:
                return 0
            request.swapped = False
            plan.swap_in.extend(swap_in)
            self.kv.cache_full_blocks(seq_id, request.token_ids, start + n)  # fresh blocks: re-register
        else:
            allocation = self.kv.allocate_slots(seq_id, start + n, prefix, reserve)
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
        as it ``samples``, none for chunks that do not reach the end), or an exception when
        the executor failed that row alone (its request fails, see :meth:`fail`).

        Returns the sequences that received a token (their last one). Building
        user-facing outputs is the engine's job; the simulator needs none, and skipping
        them keeps a simulated step cheap."""
        if len(sampled) != len(plan.scheduled):
            raise ValueError(f"got {len(sampled)} sampled tokens for {len(plan.scheduled)} scheduled requests")
        now = self.clock()
        advanced = []
        finished = False
        failed = False
        for (request, _, n, _, _), tokens in zip(plan.scheduled, sampled):
            request.num_computed_tokens += n
            if not tokens or failed and request.status is not RequestStatus.RUNNING:
                continue  # (a sibling's failure ended this sequence earlier in the loop)
            if tokens.__class__ is not tuple:  # the executor failed this row: an exception
                self.fail(request, tokens, now)
                finished = failed = True
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
            num_swapped_out=self.num_swapped_out,
            num_recomputed=self.num_recomputed,
            swap_blocks_used=kv.swap.num_used,
            swap_blocks_total=kv.swap.num_blocks,
        )

    # ---- internals -----------------------------------------------------------------

    def fail(self, request: Request, error: BaseException, now: float | None = None) -> None:
        """End every unfinished sequence of ``request``'s group because the engine failed
        it. Their blocks leave the prefix cache first: what they hold cannot be trusted."""
        now = self.clock() if now is None else now
        for seq in request.group:
            if seq.status is RequestStatus.FINISHED:
                continue
            if seq.status is RequestStatus.RUNNING:
                self.running.remove(seq)
                self._fork_seats -= seq.params.n - 1
            else:
                self.waiting.remove(seq)
            self.kv.forget_cached(seq.seq_id)
            seq.error = f"{type(error).__name__}: {error}"
            self._finish(seq, FinishReason.ERROR, now)

    def fail_step(self, plan: SchedulerOutput, error: BaseException) -> list[Request]:
        """The executor raised on ``plan``: fail every request it scheduled, and those it
        swapped out (their copies may not have happened). Returns the failed requests."""
        swapped_out = set(plan.preempted)
        victims = [s.request for s in plan.scheduled]
        victims += [r for r in self.waiting if r.swapped and r.seq_id in swapped_out]
        for request in victims:
            self.fail(request, error)
        self.num_steps += 1
        return list({id(r.group[0]): r.group[0] for r in victims}.values())

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
            child.priority, child.rank = parent.priority, parent.rank
            child.group = parent.group
            parent.group.append(child)
            self.kv.fork(parent.seq_id, child.seq_id)
            insort(self.running, child, key=_rank)  # after its equals: the parent and older siblings
        return parent.group

    def _preempt_lowest(self, plan: SchedulerOutput) -> Request:
        """Preempt the worst-ranked running sequence, by swap if configured and there is
        room, else by recompute; return it."""
        request = self.running.pop()
        self._fork_seats -= request.params.n - 1
        plan.preempted.append(request.seq_id)
        swap_out = self.kv.swap_out(request.seq_id) if self.config.preemption_mode == "swap" else None
        if swap_out is not None:
            plan.swap_out.extend(swap_out)
            request.swapped = True
            self.num_swapped_out += 1
        else:
            self.kv.free(request.seq_id)
            request.num_computed_tokens = 0
            self.num_recomputed += 1
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.num_preemptions += 1
        insort(self.waiting, request, key=_rank)
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
