"""Runs of pure decode steps, taken in bulk: what lets the simulator reach 10^5 requests.

Most steps of a simulated workload are alike: nothing waits, every running sequence
decodes one token. Through ``schedule()`` and ``update()`` such a step costs microseconds
per sequence (a plan row, a block-table check, a stop check), and a 100,000-request run
has tens of millions of them. A :class:`DecodeRun` takes k such steps at once with
exactly the effects that k rounds of ``schedule()`` then ``update()``, sampling the same
token for every sequence, would have on the scheduler and the KV manager: the same
blocks taken in the same order (so the same block ids and the same evictions), the same
blocks registered in the prefix cache, the same tokens, counters, peak and finishes. It
builds no plan: the simulator's executor prices a decode step from its size alone.

:meth:`pagedkv.scheduler.scheduler.Scheduler.decode_run` offers a run only when the next
step is such a step, and :meth:`~pagedkv.scheduler.scheduler.Scheduler.take_decode_steps`
takes it: this module knows the sequences and the KV manager, not the scheduler (which
keeps the counters and finishes the sequences). The run is as long as nothing changes the
batch from inside: up to the step in which the first sequences sample their last token
(they finish, and the run ends), and short of the first step that would need more blocks
than are free (the scheduler would preempt). The caller cuts it shorter for what comes
from outside: an arrival. The differential tests take every run both ways and compare all
state after every step.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import repeat

from pagedkv.paged.kv_manager import KVCacheManager
from pagedkv.scheduler.request import Request


class DecodeRun:
    """Up to ``max_steps`` decode steps of the running sequences, as they stand."""

    def __init__(self, seqs: Sequence[Request], kv: KVCacheManager, token: int, steps_to_finish: int) -> None:
        self.kv = kv
        self.token = token
        self.seqs: list[Request] = list(seqs)  # rank order, as the scheduler goes
        self.num_seqs = len(self.seqs)
        self._seq_ids = [s.seq_id for s in self.seqs]
        self.context = sum(s.num_computed_tokens + 1 for s in self.seqs)
        """Keys the first step attends (its plan's ``num_single_token_context``); each
        step after it attends ``num_seqs`` more."""
        self._steps_to_finish = steps_to_finish
        self.max_steps = min(steps_to_finish, kv.decode_steps_affordable(self._seq_ids))
        self.blocks_used: list[int] = []
        """The pool's blocks in use during each step taken (after its allocations)."""

    @classmethod
    def start(
        cls, running: Sequence[Request], kv: KVCacheManager, eos_token_id: int | None, token: int
    ) -> DecodeRun | None:
        """A run if the next step decodes one token of every ``running`` sequence, each
        sampling one (``token``) that stops none early, with no copy on write; else
        ``None``. The caller has checked that nothing waits and the budget covers all."""
        eos = eos_token_id
        steps_to_finish = None
        for seq in running:
            params = seq.params
            computed = seq.num_computed_tokens
            if computed != len(seq.token_ids) - 1 or computed < seq.num_prompt_tokens or params.n != 1:
                return None  # a prefill chunk, or the prompt's last token (it may fork)
            if token == eos and not params.ignore_eos or token in seq.stop_ids:
                return None
            if kv.needs_copy_on_write(seq.seq_id):
                return None
            left = params.max_tokens - (computed + 1 - seq.num_prompt_tokens)  # the step that samples its last
            steps_to_finish = left if steps_to_finish is None or left < steps_to_finish else steps_to_finish
        if steps_to_finish is None:  # nothing runs
            return None
        run = cls(running, kv, token, steps_to_finish)
        return run if run.max_steps else None

    def advance(self, steps: int) -> list[Request]:
        """Give every sequence the tokens and blocks of the first ``steps`` (1 to
        ``max_steps``) steps; return those that sampled their last token in the last one
        (none unless it is the run's last possible step), for the scheduler to finish."""
        if not 1 <= steps <= self.max_steps:
            raise ValueError(f"a run of {self.max_steps} steps cannot take {steps}")
        for seq in self.seqs:  # the tokens first: a block's prefix-cache key needs all of them
            seq.token_ids.extend(repeat(self.token, steps))
            seq.num_computed_tokens += steps
        self.blocks_used = self.kv.decode_steps(self._seq_ids, [s.token_ids for s in self.seqs], steps)
        if steps < self._steps_to_finish:
            return []
        return [s for s in self.seqs if len(s.token_ids) - s.num_prompt_tokens >= s.params.max_tokens]
