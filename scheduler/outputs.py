"""What the engine hands its users: each request's output after a step, and the engine's
stats. (A step's plan, for the executor, is :mod:`pagedkv.scheduler.plan`.)"""

from __future__ import annotations

from dataclasses import dataclass

from pagedkv.scheduler.logprobs import TokenLogprobs
from pagedkv.scheduler.request import FinishReason, Request


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
