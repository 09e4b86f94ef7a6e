"""Drive a workload through the engine, simulated or for real.

The driver builds an :class:`~pagedkv.scheduler.engine.LLMEngine` on the workload's
executor and clock and steps it (:meth:`~pagedkv.scheduler.engine.LLMEngine.step_sequences`,
the step without user outputs), so the scheduler, the KV manager, failed-step handling,
stats and the idle leak check are the engine's own. Around it, arrivals: requests enter
when the clock reaches their arrival time; an idle engine waits for the next one (a
virtual clock jumps, a wall clock sleeps). Closed-loop workloads send a client's next
request the moment its previous one finishes. With a
:class:`~pagedkv.scheduler.executor.BulkDecodeExecutor` (the simulator's), runs of pure
decode steps are taken in bulk through the engine's declared decode-run methods.

It records one :class:`RequestRecord` per finished request and one :class:`StepRecords`
entry per step: when it ended, how long it took, and how many token slots held K/V and
how many the policy held back while it ran, for the memory-waste series.
"""

from __future__ import annotations

import itertools
import operator
from array import array
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from pagedkv.errors import InvalidRequestError
from pagedkv.scheduler.config import EngineConfig
from pagedkv.scheduler.engine import LLMEngine
from pagedkv.scheduler.executor import BulkDecodeExecutor, CacheLayout, Executor, StepResult
from pagedkv.scheduler.outputs import EngineStats
from pagedkv.scheduler.plan import SchedulerOutput
from pagedkv.scheduler.request import Request
from pagedkv.scheduler.sampling_params import SamplingParams
from pagedkv.sim.executor import SimulatedExecutor
from pagedkv.sim.policies import Policy, admission_policy, reserved_slots, reserved_slots_during
from pagedkv.sim.workload import RequestSpec


class Clock(Protocol):
    """Seconds since the run started (``pagedkv.sim.executor.VirtualClock`` or ``WallClock``)."""

    def __call__(self) -> float: ...

    def wait_until(self, t: float) -> None:
        """Return at ``t`` or later (a virtual clock jumps there)."""


class RequestRecord(NamedTuple):
    arrival: float
    first_scheduled: float
    first_token: float | None  # None if it failed before its first token (NaN in the summaries)
    finish: float
    prompt_len: int
    output_len: int
    preemptions: int


class StepRecord(NamedTuple):
    end: float
    """The clock when the step ended."""
    duration: float
    stored_slots: int
    """Token slots holding K/V while it ran."""
    reserved_slots: int
    """Token slots the policy held back while it ran."""


@dataclass
class StepRecords:
    """One :class:`StepRecord` per step, kept as named columns of machine numbers: a
    simulated run has tens of millions of steps (8 bytes a value here, 32 as Python
    objects in a list), and the summaries read whole columns (numpy reads each as one buffer)."""

    end: array[float] = field(default_factory=lambda: array("d"))
    duration: array[float] = field(default_factory=lambda: array("d"))
    stored_slots: array[int] = field(default_factory=lambda: array("q"))
    reserved_slots: array[int] = field(default_factory=lambda: array("q"))

    def append(self, step: StepRecord) -> None:
        self.end.append(step.end)
        self.duration.append(step.duration)
        self.stored_slots.append(step.stored_slots)
        self.reserved_slots.append(step.reserved_slots)

    def __len__(self) -> int:
        return len(self.end)

    def __iter__(self) -> Iterator[StepRecord]:
        return map(StepRecord, self.end, self.duration, self.stored_slots, self.reserved_slots)


@dataclass
class RunResult:
    policy: str
    block_size: int
    capacity_slots: int
    records: list[RequestRecord] = field(default_factory=list)
    rejected: int = 0
    steps: StepRecords = field(default_factory=StepRecords)
    stats: EngineStats | None = None


class _Metered:
    """The workload's executor as the engine sees it. It notes the memory held while each
    step runs (after the plan took its blocks, before finished requests free theirs), and
    for the reservation baselines it shows the pool as 1-token blocks (slots) without swap
    space: reservations are counted in slots."""

    def __init__(self, inner: Executor, config: EngineConfig, slot_pool: bool) -> None:
        self.inner, self.config, self.slot_pool = inner, config, slot_pool
        self.vocab_size, self.max_model_len, self.eos_token_id = inner.vocab_size, inner.max_model_len, None
        self.engine: LLMEngine | None = None
        self.stored = self.reserved = 0

    def initialize_cache(self, config: EngineConfig) -> CacheLayout:
        layout = self.inner.initialize_cache(self.config)  # the workload's config, whatever the engine's
        if not self.slot_pool:
            return layout
        bs = self.config.block_size
        return CacheLayout(layout.num_blocks * bs, 0, layout.cache_salt, layout.block_bytes // bs)

    def execute(self, plan: SchedulerOutput) -> StepResult:
        if self.engine is not None:
            self.stored = self.engine.kv_manager.num_stored_tokens
            self.reserved = reserved_slots(self.engine.scheduler)
        return self.inner.execute(plan)


def _build_engine(config: EngineConfig, executor: Executor, clock: Clock, policy: Policy) -> tuple[LLMEngine, _Metered]:
    """The engine a workload runs on: ``executor`` (wrapped to meter memory), ``clock``, and
    ``policy``'s admission; the reservation baselines count their pool in 1-token slots and
    share no prefixes."""
    slot_pool = policy != "paged"
    metered = _Metered(executor, config, slot_pool)
    engine_config = config.model_copy(update={"block_size": 1, "enable_prefix_caching": False}) if slot_pool else config
    engine = LLMEngine(metered, engine_config, clock=clock, admission=admission_policy(policy))
    metered.engine = engine
    return engine, metered


class Replica:
    """One engine of a run, on its executor and clock: the requests routed to it and their
    records. :func:`run_workload` drives one; :func:`pagedkv.sim.fleet.run_fleet`, several
    behind a router, each on its own clock."""

    def __init__(self, config: EngineConfig, executor: Executor, clock: Clock, policy: Policy = "paged",
                 fast_forward: bool = True) -> None:
        self.engine, self.metered = _build_engine(config, executor, clock, policy)
        self.clock = clock
        kv = self.engine.kv_manager
        self.result = RunResult(policy, kv.block_size, kv.num_blocks * kv.block_size)
        # Bulk decode steps need an executor that prices a decode step from its size alone.
        self.bulk = executor if fast_forward and isinstance(executor, SimulatedExecutor) else None
        self.arrived = 0
        self._params: dict[int, SamplingParams] = {}

    @property
    def busy(self) -> bool:
        return self.engine.has_unfinished_requests()

    @property
    def outstanding(self) -> int:
        """Requests given to it that have not finished."""
        return self.engine.num_unfinished_requests

    def arrive(self, index: int, spec: RequestSpec, at: float) -> None:
        """Add the workload's ``index``-th request, arrived at ``at``; counted as rejected if
        it can never fit."""
        sp = self._params.get(spec.output_len) or self._params.setdefault(
            spec.output_len, SamplingParams(temperature=0.0, max_tokens=spec.output_len, ignore_eos=True)
        )
        # Without token ids a prompt is its own token repeated: it shares no prefix with
        # any other request (so the prefix cache serves only its own preemptions).
        prompt = list(spec.prompt_token_ids) if spec.prompt_token_ids is not None else [index + 1] * spec.prompt_len
        self.arrived += 1
        try:
            self.engine.add_request(str(index), prompt, sp, priority=spec.priority, arrival_time=at)
        except InvalidRequestError:
            self.result.rejected += 1

    def step(self, next_arrival: float) -> list[RequestRecord]:
        """One step, or a run of pure decode steps in bulk up to the first that would start at
        or after ``next_arrival``; the records of the requests that finished."""
        now = self.clock()
        finished = _decode_run(self.engine, self.bulk, self.clock, self.result, next_arrival) if self.bulk else None
        if finished is None:
            step = self.engine.step_sequences()
            if step.plan.is_empty:
                raise RuntimeError("the scheduler scheduled nothing while requests wait")  # no policy should
            end = self.clock()
            self.result.steps.append(StepRecord(end, end - now, self.metered.stored, self.metered.reserved))
            finished = [r for r in step.advanced if r.finish_time is not None]
        records = [record(request) for request in finished]
        self.result.records.extend(records)
        return records

    def finish(self) -> RunResult:
        """The run's result, once every request is done; checks the books balance."""
        self.result.stats = self.engine.stats()
        self.engine.kv_manager.check()
        if self.arrived != len(self.result.records) + self.result.rejected:
            raise RuntimeError(f"{self.arrived} requests arrived but {len(self.result.records)} finished and "
                               f"{self.result.rejected} were rejected")
        return self.result


def run_workload(
    specs: list[RequestSpec],
    config: EngineConfig,
    executor: Executor,
    clock: Clock,
    policy: Policy = "paged",
    concurrency: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    fast_forward: bool = True,
) -> RunResult:
    """Run ``specs`` (in arrival order) to completion; ``concurrency`` makes it closed-loop.

    With ``fast_forward`` and the simulated executor, runs of pure decode steps are taken
    in bulk (``pagedkv.scheduler.decode_run``), with the same result to the last bit:
    ``False`` is there to check that, and for a subclass that watches every plan."""
    replica = Replica(config, executor, clock, policy, fast_forward)
    ids = itertools.count()

    def arrive(spec: RequestSpec, at: float) -> None:
        replica.arrive(next(ids), spec, at)

    pending = deque(specs)
    if concurrency is not None:  # closed loop: the first clients start together
        for _ in range(min(concurrency, len(pending))):
            arrive(pending.popleft(), clock())
    total = len(specs)
    while pending or replica.busy:
        now = clock()
        while concurrency is None and pending and pending[0].arrival_time <= now:
            spec = pending.popleft()
            arrive(spec, spec.arrival_time)
        if not replica.busy:
            if not pending:  # the last arrivals were all rejected
                break
            if concurrency is not None:  # every client was rejected: start the next ones
                arrive(pending.popleft(), now)
            else:
                clock.wait_until(pending[0].arrival_time)
            continue
        arrival = pending[0].arrival_time if concurrency is None and pending else float("inf")
        for done in replica.step(arrival):
            if concurrency is not None and pending:
                arrive(pending.popleft(), done.finish)
            if progress is not None:
                progress(len(replica.result.records) + replica.result.rejected, total)
    return replica.finish()


def _decode_run(
    engine: LLMEngine, executor: BulkDecodeExecutor, clock: Clock, result: RunResult, arrival: float
) -> list[Request] | None:
    """Take pure decode steps in bulk, up to the first that would not be one or would start
    at or after ``arrival``, recording them as the step loop would. Returns the requests
    that finished, or ``None`` if no step was taken."""
    run = engine.decode_run(executor)
    if run is None:
        return None
    start, stored, reserved = clock(), engine.kv_manager.num_stored_tokens, reserved_slots(engine.scheduler)
    ends, finished = engine.take_decode_run(run, executor, arrival)
    if not ends:
        return None
    m = run.num_seqs
    steps = result.steps
    steps.stored_slots.extend(range(stored + m, stored + (len(ends) + 1) * m, m))
    steps.reserved_slots.extend(reserved_slots_during(engine.scheduler, reserved, run.blocks_used))
    steps.duration.extend(map(operator.sub, ends, itertools.chain([start], ends)))
    steps.end.extend(ends)
    return finished


def record(request: Request) -> RequestRecord:
    """The record of a finished request (one that was scheduled: the simulator aborts none)."""
    scheduled, finish = request.first_scheduled_time, request.finish_time
    if scheduled is None or finish is None:
        raise ValueError(f"request {request.request_id!r} has not run to its end")
    return RequestRecord(
        request.arrival_time,
        scheduled,
        request.first_token_time,
        finish,
        request.num_prompt_tokens,
        request.num_output_tokens,
        request.num_preemptions,
    )
