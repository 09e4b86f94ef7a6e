"""The small result types that cross layer boundaries: a step's plan, a request's output,
and the engine's stats."""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from typing import NamedTuple, TypeAlias

from pagedkv.scheduler.request import FinishReason, Request


class TokenLogprobs(NamedTuple):
    """The log-probabilities of one generated token (``SamplingParams.logprobs``)."""

    logprob: float
    """The sampled token's log-probability."""
    top: tuple[tuple[int, float], ...]
    """The ``SamplingParams.logprobs`` most likely tokens as ``(token id, logprob)``, most
    likely first."""


class SampledTokens(tuple[int, ...]):
    """A row's sampled tokens (a tuple of ints, so it is a :data:`SampledRow`) with the
    log-probabilities of each, for the rows whose request asked for them. Executors that
    compute none (the simulator, test fakes) return plain tuples."""

    logprobs: tuple[TokenLogprobs, ...]

    def __new__(cls, tokens: Iterable[int], logprobs: Iterable[TokenLogprobs]) -> SampledTokens:
        row = super().__new__(cls, tokens)
        row.logprobs = tuple(logprobs)
        if len(row.logprobs) != len(row):
            raise ValueError(f"{len(row.logprobs)} logprobs for {len(row)} tokens")
        return row


SampledRow: TypeAlias = "tuple[int, ...] | BaseException"
"""What an executor returns for one scheduled sequence of a step: the tokens it sampled
(as many as its ``samples``; a :class:`SampledTokens` when they come with logprobs), or an
exception instance if its row failed alone."""


class ScheduledRequest(NamedTuple):
    """``request`` (one sequence) computes tokens ``[start, start + num_new_tokens)`` this
    step, into the slots of ``block_ids`` (its block table as it stands for this step).
    ``samples`` is how many tokens to draw from the chunk's last logits: 0 when the chunk
    stops short of the end of the sequence's tokens, 1 usually, ``n`` when a request
    with ``n > 1`` finishes its prompt and forks. Values, not views: the plan stays true
    after later steps. (A NamedTuple because the simulator builds millions of them.)"""

    request: Request
    start: int
    num_new_tokens: int
    block_ids: tuple[int, ...]
    samples: int


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
        # tuple.__new__ skips the NamedTuple's Python-level constructor: the simulator
        # builds one of these per request per step, millions per run.
        self.scheduled.append(_new_scheduled(ScheduledRequest, (request, start, n, block_ids, samples)))
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


@dataclass(frozen=True)
class RequestMetrics:
    """Timestamps on the scheduler's clock (seconds), and how often the request's
    sequences were preempted. A request finishes when its last sequence does."""

    arrival_time: float
    first_scheduled_time: float | None
    first_token_time: float | None
    finish_time: float | None
    num_prompt_tokens: int
    num_preemptions: int

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def queueing_delay(self) -> float | None:
        """Arrival to first admission."""
        return None if self.first_scheduled_time is None else self.first_scheduled_time - self.arrival_time

    @classmethod
    def of(cls, group: list[Request]) -> RequestMetrics:
        first = group[0]
        ends = [s.finish_time for s in group if s.finish_time is not None]
        return cls(
            arrival_time=first.arrival_time,
            first_scheduled_time=first.first_scheduled_time,
            first_token_time=first.first_token_time,
            finish_time=max(ends) if len(ends) == len(group) else None,
            num_prompt_tokens=first.num_prompt_tokens,
            num_preemptions=sum(s.num_preemptions for s in group),
        )


@dataclass(frozen=True)
class SequenceOutput:
    """One of a request's sequences (one unless ``n > 1``): its new tokens this step and
    all its tokens so far."""

    index: int
    new_token_ids: list[int]
    output_token_ids: list[int]
    finish_reason: FinishReason | None
    new_text: str = ""
    """The text streamed now: that of ``new_token_ids``, except what is held back while it
    could still be the start of a stop string (``SamplingParams.stop``; released when it
    cannot, or when the sequence ends). Empty when the engine has no tokenizer, or while a
    multi-byte character is still incomplete."""
    text: str = ""
    """All the output text streamed so far: the ``new_text`` of the sequence's outputs add
    up to it. A sequence ended by a stop string ends right before it."""
    error: str | None = None
    """What went wrong, when ``finish_reason`` is error."""
    new_logprobs: list[TokenLogprobs] | None = None
    """The log-probabilities of ``new_token_ids``, one per token (``SamplingParams.logprobs``);
    None when the request asked for none."""
    logprobs: list[TokenLogprobs] | None = None
    """Those of all of ``output_token_ids``; None when the request asked for none."""

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class RequestOutput:
    """What one step produced for one request: every sequence of it (vLLM's shape:
    ``outputs[i]`` is sequence ``i``), with the new tokens of those that advanced.

    For the usual single-sequence request the sequence's fields are also here
    (``out.text`` for ``out.outputs[0].text``); with ``n > 1`` those raise, because
    there is no single answer.
    """

    request_id: str
    outputs: tuple[SequenceOutput, ...]
    finished: bool
    """Every sequence has ended."""
    metrics: RequestMetrics

    @classmethod
    def of(cls, group: list[Request], advanced: frozenset[int] | set[int] = frozenset()) -> RequestOutput:
        """The output of the request whose sequences are ``group``; those whose index is
        in ``advanced`` got one token this step (their last)."""
        return cls(
            request_id=group[0].request_id,
            outputs=tuple(
                SequenceOutput(s.index, s.token_ids[-1:] if s.index in advanced else [], s.output_token_ids,
                               s.finish_reason, error=s.error,
                               new_logprobs=None if s.logprobs is None else s.logprobs[-1:] if s.index in advanced
                               else [],
                               logprobs=None if s.logprobs is None else list(s.logprobs))
                for s in group
            ),
            finished=all(s.finished for s in group),
            metrics=RequestMetrics.of(group),
        )

    @property
    def sole(self) -> SequenceOutput:
        """The request's only sequence."""
        if len(self.outputs) != 1:
            raise ValueError(f"request {self.request_id!r} has {len(self.outputs)} sequences; read them from .outputs")
        return self.outputs[0]

    @property
    def error(self) -> str | None:
        """The first failed sequence's error: a request fails as a whole."""
        return next((s.error for s in self.outputs if s.error), None)

    @property
    def new_token_ids(self) -> list[int]:
        return self.sole.new_token_ids

    @property
    def output_token_ids(self) -> list[int]:
        return self.sole.output_token_ids

    @property
    def finish_reason(self) -> FinishReason | None:
        return self.sole.finish_reason

    @property
    def new_text(self) -> str:
        return self.sole.new_text

    @property
    def text(self) -> str:
        return self.sole.text


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's load and memory."""

    num_running: int
    num_waiting: int
    kv_blocks_used: int
    kv_blocks_free: int
    kv_blocks_total: int
    kv_blocks_peak: int
    num_preemptions: int
    num_steps: int
    num_tokens_computed: int
    num_generated_tokens: int
    num_prompt_tokens: int
    """Prompt tokens of every request admitted so far (each counted once)."""
    num_prefix_hit_tokens: int
    """Of those, tokens whose K/V came from the prefix cache instead of being computed."""
    kv_blocks_cached: int = 0
    """Blocks in the prefix cache, held or not (a subset of used + free)."""
    kv_blocks_evictable: int = 0
    """Cached blocks nobody holds: free, but kept until a new block is needed."""
    num_swapped_out: int = 0
    """Preemptions that copied the victim's blocks to the swap space."""
    num_recomputed: int = 0
    """Preemptions that dropped the victim's K/V, to be recomputed."""
    swap_blocks_used: int = 0
    swap_blocks_total: int = 0

    @property
    def prefix_hit_rate(self) -> float:
        return self.num_prefix_hit_tokens / self.num_prompt_tokens if self.num_prompt_tokens else 0.0
