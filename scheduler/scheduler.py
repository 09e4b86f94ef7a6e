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

The requests themselves, and how each one lives (added, advanced, forked, finished,
aborted, failed), are :class:`pagedkv.scheduler.queues.RequestQueues`, which this class
extends with the policy. Pure Python and torch-free, so the simulator drives this very
class.

Extension points, all public: an :class:`~pagedkv.scheduler.admission.AdmissionPolicy`
(who may start; the simulator's reservation baselines are such policies), :meth:`victim`
(who is preempted when memory runs out), and finishing through
:meth:`~pagedkv.scheduler.queues.RequestQueues.finish_sequence` and
:meth:`~pagedkv.scheduler.queues.RequestQueues.finish_running`.
"""

from __future__ import annotations

import time
from bisect import insort
from collections.abc import Callable

from pagedkv.errors import InvalidRequestError
from pagedkv.paged.kv_manager import KVCacheManager
from pagedkv.paged.prefix import NO_HIT
from pagedkv.scheduler.admission import AdmissionPolicy
from pagedkv.scheduler.config import EngineConfig
from pagedkv.scheduler.decode_run import DecodeRun
from pagedkv.scheduler.plan import SchedulerOutput
from pagedkv.scheduler.queues import RequestQueues, by_rank
from pagedkv.scheduler.request import FinishReason, Request, RequestStatus

MAX_PASSED_OVER = 16
"""Waiting requests admission looks past in one step when earlier ones do not fit."""


class Scheduler(RequestQueues):
    def __init__(
        self,
        config: EngineConfig,
        kv: KVCacheManager,
        max_model_len: int,
        eos_token_id: int | None,
        clock: Callable[[], float] = time.monotonic,
        admission: AdmissionPolicy | None = None,
    ) -> None:
        """``admission``: who may start, beyond the scheduler's own rules (default
        :class:`~pagedkv.scheduler.admission.PagedAdmission`: nobody else is asked)."""
        super().__init__(config, kv, max_model_len, eos_token_id, clock, admission)
        config = self.config
        if not config.enable_chunked_prefill and config.max_num_batched_tokens < self.max_model_len:
            raise InvalidRequestError(
                f"max_num_batched_tokens ({config.max_num_batched_tokens}) must be >= max_model_len "
                f"({self.max_model_len}) when enable_chunked_prefill is False: every prompt is prefilled in one step",
                "max_num_batched_tokens",
            )
        self._watermark = int(config.kv_watermark * self.kv.num_blocks)
        self._head: Request | None = None  # the waiting request at the head in the last step
        self._head_passed_over = 0  # steps in which it did not fit at the head

    # ---- one step ------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        self.admission.begin_step(self.running)
        plan = SchedulerOutput(finished_seq_ids=self.take_finished_seq_ids())
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
        self.admission.end_step(plan, self.running)
        return plan

    def decode_run(self, token: int) -> DecodeRun | None:
        """Bulk decode steps (:mod:`pagedkv.scheduler.decode_run`), if the next step decodes one
        token of every running sequence, sampling ``token`` for each, and admits nothing."""
        if self.waiting or not self.running or len(self.running) > self.config.max_num_batched_tokens:
            return None
        if not self.admission.takes_decode_runs:
            return None
        return DecodeRun.start(self.running, self.kv, self.eos_token_id, token)

    def take_decode_steps(self, run: DecodeRun, steps: int) -> list[Request]:
        """Take the first ``steps`` steps of ``run`` (from :meth:`decode_run`, with nothing
        scheduled since), with the effects ``steps`` rounds of :meth:`schedule` and
        :meth:`update` would have; return the sequences that finished in the last one."""
        done = run.advance(steps)
        # Each of those schedule() calls would have handed these to the executor, which
        # prices a decode run from its size alone and keeps no state to drop.
        self.take_finished_seq_ids()
        tokens = steps * run.num_seqs
        self.peak_blocks_used = max(self.peak_blocks_used, run.blocks_used[-1])
        self.num_tokens_computed += tokens
        self.num_generated_tokens += tokens
        self.num_steps += steps
        if done:
            self.finish_running(done, FinishReason.LENGTH)
        return done

    def _run(self, plan: SchedulerOutput, budget: int) -> int:
        """Schedule the running sequences, best rank first, preempting the worst when
        memory runs out; return the budget left."""
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            n = self._try_schedule(request, budget, plan)
            while not n and self.preempt(self.victim(), plan) is not request:
                n = self._try_schedule(request, budget, plan)
            if not n:
                break  # the request was the lowest-ranked and preempted itself
            budget -= n
            i += 1
        return budget

    def _admit(self, plan: SchedulerOutput, budget: int, whole: bool) -> int:
        """Admit waiting requests in rank order (whole prompts only when ``whole``);
        return the budget left. See the module docstring for the head-of-line rule."""
        if not self.admission.admission_open():
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
                insort(self.running, request, key=by_rank)
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
            self.preempt(self.victim(), plan)

    def _try_schedule(
        self, request: Request, budget: int, plan: SchedulerOutput, reserve: int = 0, whole: bool = False
    ) -> int:
        """Give ``request`` its next chunk (all it has left, cut to ``budget``; all or
        nothing when ``whole``) if the blocks for it can be had with ``reserve`` blocks
        to spare; return the chunk's size, or 0. A chunk that reaches the end samples
        ``params.n`` tokens (n > 1 only before the fork). The admission policy is asked
        first, and a fresh admission that fails gives back what it claimed."""
        if not self.admission.claim(request):
            return 0
        n = self._schedule_chunk(request, budget, plan, reserve, whole)
        if not n and not self.kv.has(request.seq_id):
            self.admission.release(request)
        return n

    def _schedule_chunk(self, request: Request, budget: int, plan: SchedulerOutput, reserve: int, whole: bool) -> int:
        start, total = request.num_computed_tokens, len(request.token_ids)
        seq_id = request.seq_id
        prefix = NO_HIT
        if start == 0 and self.kv.prefix_caching and not self.kv.has(seq_id):
            prefix = self.kv.find_prefix(request.token_ids, request.block_keys)
            request.block_keys = prefix.keys
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

    def victim(self) -> Request:
        """The running sequence to preempt when memory or seats run out: the worst-ranked.
        An extension point, with one rule: the scheduler walks the running queue best rank
        first, so the victim must come after every sequence already given a chunk in this
        step (the worst-ranked always does)."""
        return self.running[-1]

    def preempt(self, request: Request, plan: SchedulerOutput) -> Request:
        """Preempt running ``request``, by swap if configured and there is room, else by
        recompute; record it in ``plan``; return it."""
        if self.running[-1] is request:  # the usual victim: no search
            self.running.pop()
        else:
            self.running.remove(request)
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
        insort(self.waiting, request, key=by_rank)
        self.admission.release(request)
        return request
