"""A request's state as the scheduler sees it: tokens, one progress counter, timestamps."""

from __future__ import annotations

import enum
from collections.abc import Hashable
from dataclasses import dataclass, field

from pagedkv.scheduler.logprobs import TokenLogprobs
from pagedkv.scheduler.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    """Why a request ended; the values are OpenAI's ``finish_reason`` strings."""

    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"
    ERROR = "error"
    """The engine failed this request (its step raised, or its logits were not finite)."""


def sequence_id(request_id: str, index: int) -> Hashable:
    """The key of sequence ``index`` of a request in the KV manager and the sampler: the
    request id itself for the first (and usually only) one, a pair for the forks, so
    that no user-chosen id can collide with a fork's."""
    return request_id if index == 0 else (request_id, index)


@dataclass(slots=True)
class Request:
    """One sequence of a generation request.

    ``token_ids`` is the prompt followed by every token generated so far. The single
    progress counter ``num_computed_tokens`` says how many of them already have K/V in
    the cache; each step moves it forward by the tokens scheduled. A fresh prompt is far
    behind (prefill), a decoding request is one behind, a preempted one drops to zero.
    There is no separate prefill or decode phase.

    A request with ``params.n > 1`` is one sequence until its prompt is computed; the
    scheduler then forks it into ``n`` (the first keeps ``index`` 0). ``group`` is the
    list of a request's sequences, shared by all of them.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    token_ids: list[int] = field(init=False)
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    error: str | None = None
    """Why the engine failed the request (``finish_reason`` error)."""
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    num_preemptions: int = 0
    index: int = 0
    priority: int = 0
    """Lower is more urgent (vLLM's convention)."""
    swapped: bool = False
    """Preempted by swap: waiting with its K/V in the swap space and its progress kept."""
    rank: tuple[float, int] = (0.0, 0)
    """The scheduler's ordering key (smaller first), set when the request is added."""
    block_keys: tuple[bytes, ...] = field(default=(), repr=False)
    """Prefix-cache keys of its leading full blocks, computed once (``find_prefix``)."""
    logprobs: list[TokenLogprobs] | None = field(init=False, repr=False)
    """Those of each generated token, when ``params.logprobs`` asks for them and the executor
    computes them (None otherwise)."""

    num_prompt_tokens: int = field(init=False)
    stop_ids: frozenset[int] = field(init=False, repr=False)
    """``params.stop_token_ids`` as a set, built once here: the stop check runs for every
    generated token, and scanning a long tuple there would make each token cost as much
    as the list is long."""
    seq_id: Hashable = field(init=False)
    group: list[Request] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)
        self.num_prompt_tokens = len(self.prompt_token_ids)
        self.stop_ids = frozenset(self.params.stop_token_ids)
        self.seq_id = sequence_id(self.request_id, self.index)
        self.group = [self]
        self.logprobs = None if self.params.logprobs is None else []

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids) :]

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED
