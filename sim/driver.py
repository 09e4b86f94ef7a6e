"""Drive a workload through the engine's scheduler and KV manager, simulated or for real.

The loop is the engine's step (schedule, execute, update) plus arrivals: requests enter
when the clock reaches their arrival time; an idle engine waits for the next one (a
virtual clock jumps, a wall clock sleeps). Closed-loop workloads send a client's next
request the moment its previous one finishes.

It records one :class:`RequestRecord` per finished request and, for every step, its
duration and how many token slots held K/V and how many the policy held back while it
ran, for the memory-waste series.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol, runtime_checkable

from pagedkv.errors import InvalidRequestError
from pagedkv.paged.kv_manager import KVCacheManager
from pagedkv.scheduler.config import EngineConfig
from pagedkv.scheduler.executor import Executor
from pagedkv.scheduler.outputs import EngineStats
from pagedkv.scheduler.request import Request
from pagedkv.scheduler.sampling_params import SamplingParams
from pagedkv.scheduler.scheduler import Scheduler
from pagedkv.sim.policies import Policy, admission_policy, reserved_slots, reserved_slots_during
from pagedkv.sim.workload import RequestSpec


class Clock(Protocol):
    """Seconds since the run started (``pagedkv.sim.executor.VirtualClock`` or ``WallClock``)."""

    def __call__(self) -> float: ...

    def wait_until(self, t: float) -> None:
        """Return at ``t`` or later (a virtual clock jumps there)."""


@runtime_checkable
class DecodeFastForward(Protocol):
    """An executor that prices a run of pure decode steps from its size alone
    (``pagedkv.sim.executor.SimulatedExecutor``), so that the driver can take them in bulk."""

    decode_token: int

    def execute_decodes(self, num_seqs: int, context: int, max_steps: int, until: float) -> list[float]:
        """The clock at the end of each step taken, up to ``max_steps``, stopping before a
        step that would start at or after ``until``."""


class RequestRecord(NamedTuple):
    arrival: float
    first_scheduled: float
    first_token: float | None  # None if it failed before its first token (NaN in the summaries)
    finish: float
    prompt_len: int
    output_len: int
    preemptions: int


@dataclass
class RunResult:
    policy: str
    block_size: int
    capacity_slots: int
    records: list[RequestRecord] = field(default_factory=list)
    rejected: int = 0
    step_times: list[float] = field(default_factory=list)  # clock when each step ended
    step_durations: list[float] = field(default_factory=list)
    stored_slots: list[int] = field(default_factory=list)  # slots holding K/V during each step
    reserved_slots: list[int] = field(default_factory=list)  # slots held back during each step
    stats: EngineStats | None = None


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

    With ``fast_forward`` (and the simulated executor), runs of pure decode steps are
    taken in bulk (``pagedkv.scheduler.decode_run``), with the same result to the last bit:
    ``False`` is there to check that."""
    max_model_len = config.resolve_max_model_len(executor.max_model_len)
    layout = executor.initialize_cache(config)
    num_blocks = layout.num_blocks
    block_size = config.block_size
    if policy != "paged":  # reservations are counted in slots: 1-token blocks
        num_blocks, block_size = num_blocks * block_size, 1
    kv = KVCacheManager(num_blocks, block_size, config.enable_prefix_caching and policy == "paged",
                        num_swap_blocks=layout.num_swap_blocks if policy == "paged" else 0)
    scheduler = Scheduler(config, kv, max_model_len, None, clock, admission_policy(policy))
    result = RunResult(policy, block_size, num_blocks * block_size)
    params: dict[int, SamplingParams] = {}
    ids = itertools.count()

    def arrive(spec: RequestSpec, at: float) -> None:
        sp = params.get(spec.output_len) or params.setdefault(
            spec.output_len, SamplingParams(temperature=0.0, max_tokens=spec.output_len, ignore_eos=True)
        )
        i = next(ids)
        # Without token ids a prompt is its own token repeated: it shares no prefix with
        # any other request (so the prefix cache serves only its own preemptions).
        prompt = list(spec.prompt_token_ids) if spec.prompt_token_ids is not None else [i + 1] * spec.prompt_len
        try:
            scheduler.add_request(Request(str(i), prompt, sp, arrival_time=at, priority=spec.priority))
        except InvalidRequestError:
            result.rejected += 1

    pending = deque(specs)
    if concurrency is not None:  # closed loop: the first clients start together
        for _ in range(min(concurrency, len(pending))):
            arrive(pending.popleft(), clock())
    total = len(specs)
    # Bulk decode steps need an executor that prices a decode step from its size alone.
    bulk = executor if fast_forward and isinstance(executor, DecodeFastForward) else None

    while pending or scheduler.has_unfinished_requests():
        now = clock()
        while concurrency is None and pending and pending[0].arrival_time <= now:
            spec = pending.popleft()
            arrive(spec, spec.arrival_time)
        if not scheduler.has_unfinished_requests():
            if not pending:  # the last arrivals were all rejected
                break
            if concurrency is not None:  # every client was rejected: start the next ones
                arrive(pending.popleft(), now)
            else:
                clock.wait_until(pending[0].arrival_time)
            continue
        arrival = pending[0].arrival_time if concurrency is None and pending else float("inf")
        finished = _decode_run(scheduler, bulk, clock, result, arrival) if bulk is not None else None
        if finished is None:
            plan = scheduler.schedule()
            if plan.is_empty:
                raise RuntimeError("the scheduler scheduled nothing while requests wait")  # no policy should
            result.stored_slots.append(kv.num_stored_tokens)  # memory while this step runs
            result.reserved_slots.append(reserved_slots(scheduler))
            finished = [r for r in scheduler.update(plan, executor.execute(plan)) if r.finish_time is not None]
            result.step_times.append(clock())
            result.step_durations.append(result.step_times[-1] - now)
        for request in finished:
            result.records.append(done := record(request))
            if concurrency is not None and pending:
                arrive(pending.popleft(), done.finish)
            if progress is not None:
                progress(len(result.records) + result.rejected, total)
    result.stats = scheduler.stats()
    kv.check()
    return result


def _decode_run(
    scheduler: Scheduler, executor: DecodeFastForward, clock: Clock, result: RunResult, arrival: float
) -> list[Request] | None:
    """Take pure decode steps in bulk, up to the first that would not be one or would start
    at or after ``arrival``, recording them as the step loop would. Returns the requests
    that finished, or ``None`` if no step was taken."""
    run = scheduler.decode_run(executor.decode_token)
    if run is None:
        return None
    start, stored, reserved = clock(), scheduler.kv.num_stored_tokens, reserved_slots(scheduler)
    ends = executor.execute_decodes(run.num_seqs, run.context, run.max_steps, arrival)
    if not ends:
        return None
    finished = scheduler.take_decode_steps(run, len(ends))
    m = run.num_seqs
    result.stored_slots.extend(range(stored + m, stored + (len(ends) + 1) * m, m))
    result.reserved_slots.extend(reserved_slots_during(scheduler, reserved, run.blocks_used))
    result.step_durations.extend(end - begin for begin, end in itertools.pairwise([start, *ends]))
    result.step_times.extend(ends)
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
