"""The small result types that cross layer boundaries: a step's plan, a request's output,
and the engine's stats."""

from __future__ import annotations

from dataclasses import dataclass, field

from scheduler.request import FinishReason, Request


@dataclass(frozen=True)
class ScheduledRequest:
    """``request`` computes tokens ``[start, start + num_new_tokens)`` this step, into the
    slots of ``block_ids`` (its block table as it stands for this step). ``samples`` is
    True when the chunk reaches the end of the request's tokens, so its last logits pick
    the next token. Values, not views: the plan stays true after later steps."""

    request: Request
    start: int
    num_new_tokens: int
    block_ids: tuple[int, ...]
    samples: bool


@dataclass
class SchedulerOutput:
    """One step's plan: who runs and for how many tokens, and what memory moves first."""

    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    finished_request_ids: list[str] = field(default_factory=list)
    """Requests that ended since the previous plan; the executor drops their state."""

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass(frozen=True)
class RequestMetrics:
    """Timestamps on the scheduler's clock (seconds), and how often the request was preempted."""

    arrival_time: float
    first_token_time: float | None
    finish_time: float | None
    num_prompt_tokens: int
    num_preemptions: int

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time


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
