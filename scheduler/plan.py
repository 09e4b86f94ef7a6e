"""A step's plan, as the scheduler hands it to the executor: who computes which tokens,
into which blocks, how many tokens each samples and as which sequences, and what memory
moves first."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import NamedTuple

from pagedkv.scheduler.request import Request, sequence_id
from pagedkv.scheduler.sampling_params import SamplingParams


class ScheduledRequest(NamedTuple):
    """``request`` (one sequence) computes tokens ``[start, start + num_new_tokens)`` this
    step, into the slots of ``block_ids`` (its block table as it stands for this step).
    ``samples`` is how many tokens to draw from the chunk's last logits: 0 when the chunk
    stops short of the end of the sequence's tokens, 1 usually, ``n`` when a request
    with ``n > 1`` finishes its prompt and forks. Values, not views: the plan stays true
    after later steps. (A NamedTuple because the simulator builds millions of them.)

    A request is one sequence until it forks, and each sample is drawn as the sequence
    it starts: ``sample_seq_ids`` and ``sample_params`` give, per sample, that sequence's
    id and parameters (``n = 1``, ``seed + i``). The scheduler forks into exactly these."""

    request: Request
    start: int
    num_new_tokens: int
    block_ids: tuple[int, ...]
    samples: int
    sample_seq_ids: tuple[Hashable, ...]
    sample_params: tuple[SamplingParams, ...]

    @classmethod
    def of(cls, request: Request, start: int, n: int, block_ids: tuple[int, ...], samples: int) -> ScheduledRequest:
        """The row of ``request`` computing ``n`` tokens from ``start`` and drawing ``samples``."""
        if samples == 0:
            seq_ids: tuple[Hashable, ...] = ()
            params: tuple[SamplingParams, ...] = ()
        elif samples == 1:
            seq_ids, params = (request.seq_id,), (request.params,)
        else:  # the fork: sequence i samples with its own parameters (seed + i)
            seq_ids = tuple(sequence_id(request.request_id, i) for i in range(samples))
            params = tuple(request.params.for_sequence(i) for i in range(samples))
        # tuple.__new__ skips the NamedTuple's Python-level constructor: the simulator
        # builds one of these per request per step, millions per run.
        return _new_scheduled(cls, (request, start, n, block_ids, samples, seq_ids, params))


_new_scheduled = tuple.__new__


@dataclass
class SchedulerOutput:
    """One step's plan: who runs and for how many tokens, and what memory moves first.

    The totals are kept by the scheduler as it adds each request, so that a cost model
    (the simulator's) reads a step's size without walking the plan.
    """

    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Hashable] = field(default_factory=list)
    """Sequence ids (``Request.seq_id``) preempted while building this plan."""
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    """``(src, dst)`` device blocks to copy (copy-on-write), after the swaps."""
    swap_out: list[tuple[int, int]] = field(default_factory=list)
    """``(device, cpu)`` blocks of sequences preempted by swap: copy first (their device
    blocks may be handed to others in this very step)."""
    swap_in: list[tuple[int, int]] = field(default_factory=list)
    """``(cpu, device)`` blocks of swapped sequences resuming: copy after ``swap_out``."""
    finished_seq_ids: list[Hashable] = field(default_factory=list)
    """Sequences that ended since the previous plan; the executor drops their state."""
    num_batched_tokens: int = 0
    num_single_token_seqs: int = 0
    """Sequences computing exactly one token: decodes, mostly."""
    num_single_token_context: int = 0
    """Keys those sequences attend to (their context lengths, summed)."""
    num_samples: int = 0
    """Tokens to sample: rows of logits to compute."""
    num_chunk_attended: int = 0
    """Query-key pairs of the multi-token chunks (an upper bound: causal chunks see fewer)."""

    def add(self, request: Request, start: int, n: int, block_ids: tuple[int, ...], samples: int) -> None:
        """Schedule ``n`` tokens of ``request`` from ``start``; keep the totals current."""
        self.scheduled.append(ScheduledRequest.of(request, start, n, block_ids, samples))
        self.num_batched_tokens += n
        self.num_samples += samples
        if n == 1:
            self.num_single_token_seqs += 1
            self.num_single_token_context += start + 1
        else:
            self.num_chunk_attended += n * (start + n)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled
