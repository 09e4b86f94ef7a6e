"""The contract between the engine and whatever computes the tokens: the model runner
(``models.ModelRunner``), the simulator's cost model (``sim.executor.SimulatedExecutor``), or
a test fake.

Everything the engine reads from an executor is declared here and typed: the cache it set
up (:class:`CacheLayout`), and per step the tokens of every row and which rows failed
(:class:`StepResult`). Bulk decode steps, which only a cost model can price without
running them, are a separate capability (:class:`BulkDecodeExecutor`) that the simulator
asks for by type, never by probing attributes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import NamedTuple, Protocol

from pagedkv.scheduler.config import EngineConfig
from pagedkv.scheduler.logprobs import TokenLogprobs
from pagedkv.scheduler.plan import SchedulerOutput


class CacheLayout(NamedTuple):
    """The K/V cache an executor set up for an engine."""

    num_blocks: int
    """Device blocks in the pool."""
    num_swap_blocks: int = 0
    """Blocks of CPU swap space (``preemption_mode="swap"``); none: preemption recomputes."""
    cache_salt: bytes = b""
    """What changes the K/V a token gets (the model, its dtype), folded into the prefix
    cache's keys."""
    block_bytes: int = 0
    """The size of one block, for reports (0 when it has no meaning, as in test fakes)."""


class SampledTokens(tuple[int, ...]):
    """A row's sampled tokens (a tuple of ints) with the log-probabilities of each, for the
    rows whose request asked for them. Executors that compute none (the simulator, test
    fakes) return plain tuples."""

    logprobs: tuple[TokenLogprobs, ...]

    def __new__(cls, tokens: Iterable[int], logprobs: Iterable[TokenLogprobs]) -> SampledTokens:
        row = super().__new__(cls, tokens)
        row.logprobs = tuple(logprobs)
        if len(row.logprobs) != len(row):
            raise ValueError(f"{len(row.logprobs)} logprobs for {len(row)} tokens")
        return row


NO_FAILURES: Mapping[int, str] = MappingProxyType({})


class StepResult(NamedTuple):
    """What one step computed, aligned with ``plan.scheduled``."""

    tokens: Sequence[tuple[int, ...]]
    """Per row, the tokens it sampled: as many as its ``samples`` (none when its chunk stops
    short of the end, n when it forks; a :class:`SampledTokens` when they come with
    logprobs). A failed row's entry is ignored."""
    failed_rows: Mapping[int, str] = NO_FAILURES
    """Rows that failed alone (non-finite logits), by index, with what went wrong: their
    requests fail, the others go on."""


class Executor(Protocol):
    """What the engine needs from whatever computes the tokens. The engine only reads the
    three sizes, so plain attributes of narrower types (``eos_token_id = None``) do."""

    @property
    def vocab_size(self) -> int: ...

    @property
    def max_model_len(self) -> int: ...

    @property
    def eos_token_id(self) -> int | None: ...

    def initialize_cache(self, config: EngineConfig) -> CacheLayout:
        """Allocate the K/V pool (and swap space) as ``config`` asks; say what it is."""

    def execute(self, plan: SchedulerOutput) -> StepResult:
        """Run one step. Also drop any per-sequence state of ``plan.finished_seq_ids``,
        even when nothing is scheduled. Raising fails every request of the step."""


class BulkDecodeExecutor(Executor, Protocol):
    """An executor that prices a run of pure decode steps from its size alone (the
    simulator's), so that they can be taken in bulk (:mod:`pagedkv.scheduler.decode_run`)."""

    @property
    def decode_token(self) -> int:
        """What :meth:`execute` samples for every row: the token of bulk decode steps."""

    def execute_decodes(self, num_seqs: int, context: int, max_steps: int, until: float) -> list[float]:
        """Take up to ``max_steps`` steps that each decode one token of ``num_seqs``
        sequences (the first attends ``context`` keys), stopping before the first that
        would start at or after ``until``; return the clock at the end of each step taken."""
