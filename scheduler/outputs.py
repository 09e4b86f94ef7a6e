"""The small result types that cross layer boundaries: a step's plan, a request's output,
and the engine's stats."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from scheduler.request import FinishReason, Request


class ScheduledRequest(NamedTuple):
    """``request`` computes tokens ``[start, start + num_new_tokens)`` this step, into the
    slots of ``block_ids`` (its block table as it stands for this step). ``samples`` is
    True when the chunk reaches the end of the request's tokens, so its last logits pick
    the next token. Values, not views: the plan stays true after later steps. (A
    NamedTuple because the simulator builds millions of them.)"""

    request: Request
    start: int
    num_new_tokens: int
    block_ids: tuple[int, ...]
    samples: bool


_new_scheduled = tuple.__new__


@dataclass
class SchedulerOutput:
    """One step's plan: who runs and for how many tokens, and what memory moves first.

    The totals are kept by the scheduler as it adds each request, so that a cost model
    (the simulator's) reads a step's size without walking the plan.
    """

    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    finished_request_ids: list[str] = field(default_factory=list)
    """Requests that ended since the previous plan; the executor drops their state."""
    num_batched_tokens: int = 0
    num_single_token_seqs: int = 0
    """Sequences computing exactly one token: decodes, mostly."""
    num_single_token_context: int = 0
    """Keys those sequences attend to (their context lengths, summed)."""
    num_chunk_attended: int = 0
    """Query-key pairs of the multi-token chunks (an upper bound: causal chunks see fewer)."""

    def add(self, request: Request, start: int, n: int, block_ids: tuple[int, ...], samples: bool) -> None:
        """Schedule ``n`` tokens of ``request`` from ``start``; keep the totals current."""
        # tuple.__new__ skips the NamedTuple's Python-level constructor: the simulator
        # builds one of these per request per step, millions per run.
        self.scheduled.append(_new_scheduled(ScheduledRequest, (request, start, n, block_ids, samples)))
        self.num_batched_tokens += n
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
    """Timestamps on the scheduler's clock (seconds), and how often the request was preempted."""

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


@dataclass(frozen=True)
class RequestOutput:
    """What one step produced for one request: the new tokens, and all of them so far."""

    request_id: str
    new_token_ids: list[int]
    output_token_ids: list[int]
    finished: bool
    finish_reason: FinishReason | None
    metrics: RequestMetrics
    new_text: str = ""
    """Text of ``new_token_ids``; empty when the engine has no tokenizer, or while a
    multi-byte character is still incomplete."""
    text: str = ""
    """All the output text so far."""

    @classmethod
    def of(cls, request: Request, new_token_ids: list[int]) -> RequestOutput:
        return cls(
            request_id=request.request_id,
            new_token_ids=new_token_ids,
            output_token_ids=request.output_token_ids,
            finished=request.finished,
            finish_reason=request.finish_reason,
            metrics=RequestMetrics(
                arrival_time=request.arrival_time,
                first_scheduled_time=request.first_scheduled_time,
                first_token_time=request.first_token_time,
                finish_time=request.finish_time,
                num_prompt_tokens=request.num_prompt_tokens,
                num_preemptions=request.num_preemptions,
            ),
        )


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

    @property
    def prefix_hit_rate(self) -> float:
        return self.num_prefix_hit_tokens / self.num_prompt_tokens if self.num_prompt_tokens else 0.0
