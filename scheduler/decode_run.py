"""Runs of pure decode steps, taken in bulk: what lets the simulator reach 10^5 requests.

Most steps of a simulated workload are alike: nothing waits, every running sequence
decodes one token, none finishes. Through ``schedule()`` and ``update()`` such a step
costs microseconds per sequence (a plan row, a block-table check, a stop check), and a
100,000-request run has tens of millions of them. A :class:`DecodeRun` takes those steps
with exactly the effects that ``schedule()`` then ``update()``, with the same token
sampled for every sequence, would have on the scheduler and the KV manager: the same
blocks taken in the same order (so the same block ids and the same evictions), the same
blocks registered in the prefix cache, the same tokens, counters and peak. It builds no
plan: the simulator's executor prices a decode step from its size alone.

:meth:`scheduler.Scheduler.decode_run` starts one only when the next step is such a step;
:meth:`DecodeRun.step` refuses the first step at which one would need a block that is not
free (the scheduler would preempt) or would finish (``update`` would stop it). Anything
else that would change the next step comes from outside, and the caller stops for it: an
arrival. The differential tests run every workload both ways and compare every record.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from scheduler.request import Request

if TYPE_CHECKING:
    from scheduler.scheduler import Scheduler


class DecodeRun:
    """Consecutive decode steps of one unchanging set of running sequences."""

    def __init__(self, scheduler: Scheduler, token: int, max_steps: int) -> None:
        kv = scheduler.kv
        self.scheduler = scheduler
        self.token = token
        self.max_steps = max_steps
        self.seqs: list[Request] = list(scheduler.running)  # rank order, as the scheduler goes
        self.num_seqs = len(self.seqs)
        self.steps = 0
        self._tables = [kv.table(s.seq_id) for s in self.seqs]
        self._token_ids = [s.token_ids for s in self.seqs]
        self._context = sum(s.num_computed_tokens + 1 for s in self.seqs)  # keys the next step attends
        # A sequence needs a new block at the steps where its table is full: how many do,
        # by step number modulo the block size.
        bs = kv.block_size
        self._new_blocks = [0] * bs
        for s in self.seqs:
            self._new_blocks[-s.num_computed_tokens % bs] += 1

    @classmethod
    def start(cls, scheduler: Scheduler, token: int) -> DecodeRun | None:
        """A run if the next step decodes one token of every running sequence, each
        sampling one (``token``) that does not finish it, with no copy on write; else
        ``None``. The caller has checked that nothing waits."""
        kv = scheduler.kv
        eos = scheduler.eos_token_id
        max_steps = None
        for seq in scheduler.running:
            params = seq.params
            computed = seq.num_computed_tokens
            if computed != len(seq.token_ids) - 1 or computed < seq.num_prompt_tokens or params.n != 1:
                return None  # a prefill chunk, or the prompt's last token (it may fork)
            if token == eos and not params.ignore_eos or params.stop_token_ids and token in params.stop_token_ids:
                return None
            if kv.needs_copy_on_write(seq.seq_id):
                return None
            left = params.max_tokens - (computed + 1 - seq.num_prompt_tokens) - 1  # steps before its last
            max_steps = left if max_steps is None or left < max_steps else max_steps
        if not max_steps:
            return None
        return cls(scheduler, token, max_steps)

    def step(self) -> int | None:
        """Take the next step; return the keys it attended (the plan's
        ``num_single_token_context``), or ``None``, changing nothing, if the step would
        not be a plain decode step."""
        scheduler, kv = self.scheduler, self.scheduler.kv
        if self.steps == self.max_steps or self._new_blocks[self.steps % kv.block_size] > kv.num_free_blocks:
            return None
        if self.steps == 0:
            scheduler._finished_ids = []  # schedule() hands these to the executor, which has none to drop
        kv.append_slot_each(self._tables, self._token_ids)
        token = self.token
        for seq in self.seqs:
            seq.num_computed_tokens += 1
            seq.token_ids.append(token)
        m = self.num_seqs
        scheduler.peak_blocks_used = max(scheduler.peak_blocks_used, kv.num_used_blocks)
        scheduler.num_tokens_computed += m
        scheduler.num_generated_tokens += m
        scheduler.num_steps += 1
        self.steps += 1
        context, self._context = self._context, self._context + m
        return context
