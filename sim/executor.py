"""Clocks, and the executor that stands in for the model.

The scheduler cannot tell a :class:`SimulatedExecutor` from ``models.ModelRunner``: it
receives the same plan and answers with one token per sampling sequence. Instead of
running a model it advances a virtual clock by the cost model's estimate of the step.
"""

from __future__ import annotations

import itertools
import math
import time

from pagedkv.errors import InvalidRequestError
from pagedkv.scheduler.config import EngineConfig
from pagedkv.scheduler.executor import CacheLayout, StepResult
from pagedkv.scheduler.plan import SchedulerOutput
from pagedkv.sim.cost_model import IDLE_WAIT_S, CostModel
from pagedkv.sim.noise import StepNoise

DUMMY_TOKEN = 0
_ONE = (DUMMY_TOKEN,)  # one row's sample; `_ONE * k` is k of them (and `_ONE * 1` is _ONE itself)


class VirtualClock:
    """Simulated seconds: advanced by the executor, jumped forward when the engine is idle."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def wait_until(self, t: float) -> None:
        self.now = max(self.now, t)


class WallClock:
    """Real seconds since the run started, that is since its first reading; waiting really
    sleeps. Not since it was made: a run's engine is built (and its model runner warms up, a
    second or more) between the two, and requests arriving at 0 would wait for it."""

    def __init__(self) -> None:
        self._start: float | None = None

    def __call__(self) -> float:
        now = time.monotonic()
        if self._start is None:
            self._start = now
        return now - self._start

    def wait_until(self, t: float) -> None:
        delay = t - self()
        if delay > 0:
            time.sleep(delay)


class SimulatedExecutor:
    """Implements ``scheduler.BulkDecodeExecutor`` with a cost model and a virtual clock.

    Runs of pure decode steps reach :meth:`execute_decodes`, not :meth:`execute` (see
    ``pagedkv.sim.driver.run_workload``): a subclass that watches every plan must run with
    ``fast_forward=False``."""

    eos_token_id = None
    vocab_size = 2**31  # any token id a workload uses is valid

    def __init__(self, cost: CostModel, clock: VirtualClock, noise_seed: int | None = None) -> None:
        """With ``noise_seed``, every step's time is the cost model's times a multiplier drawn
        from the profile's recorded residuals, and the whole run's times one factor drawn from
        its run-level noise where it records one (:class:`~pagedkv.sim.noise.StepNoise`)."""
        self.cost = cost
        self.clock = clock
        if noise_seed is not None and not cost.step_noise:
            raise InvalidRequestError(f"profile {cost.name!r} records no step noise (recalibrate it)", "noise_seed")
        self._noise = (StepNoise(cost.step_noise, noise_seed, cost.run_noise, cost.noise_slow_share, cost.noise_corr_s)
                       if noise_seed is not None else None)
        self.max_model_len = cost.max_model_len
        self.busy_seconds = 0.0
        self._block_bytes = 0
        self._last_end: float | None = None  # when the previous step ended: what came after it was idle
        self._light_until = -math.inf  # steps that start before this run under a light load

    def initialize_cache(self, config: EngineConfig) -> CacheLayout:
        """As many blocks as the engine would get for this config on the profiled model."""
        self._block_bytes = self.cost.kv_bytes_per_token * config.block_size
        swap = config.swap_space_bytes // self._block_bytes if config.preemption_mode == "swap" else 0
        return CacheLayout(self._num_blocks(config), swap, block_bytes=self._block_bytes)

    def _num_blocks(self, config: EngineConfig) -> int:
        if config.num_blocks is not None:
            return config.num_blocks
        if config.pool_memory_bytes is None:
            raise InvalidRequestError(
                "a simulated pool needs num_blocks or kv_cache_memory_bytes", "kv_cache_memory_bytes"
            )
        blocks = config.pool_memory_bytes // (self.cost.kv_bytes_per_token * config.block_size)
        if blocks < 1:
            raise InvalidRequestError(
                f"kv_cache_memory_bytes: a budget of {config.pool_memory_bytes} bytes holds no block",
                "kv_cache_memory_bytes",
            )
        return blocks

    def execute(self, plan: SchedulerOutput) -> StepResult:
        swapped = len(plan.swap_out) + len(plan.swap_in)
        if plan.is_empty and not swapped:
            return StepResult([])
        seconds = 0.0
        if not plan.is_empty:
            seconds = self.cost.step_time(plan, self._woke())
            if self.clock.now < self._light_until:
                seconds *= 1.0 + self.cost.light_load_slowdown
        if swapped:
            seconds += swapped * self._block_bytes / self.cost.swap_bytes_per_s
        self._spend(seconds)
        return StepResult([_ONE * s.samples for s in plan.scheduled])

    decode_token = DUMMY_TOKEN
    """What :meth:`execute` samples for every row: the token of bulk decode steps."""

    def execute_decodes(self, num_seqs: int, context: int, max_steps: int, until: float) -> list[float]:
        """Price up to ``max_steps`` consecutive steps that each decode one token of
        ``num_seqs`` sequences (a ``scheduler.DecodeRun``; the first attends ``context``
        keys), stopping before the first that would start at or after ``until``; advance
        the clock by each, as :meth:`execute` of their plans would. Returns the clock at
        the end of each step taken."""
        ends: list[float] = []
        noise, now, busy = self._noise, self.clock.now, self.busy_seconds
        times = self.cost.decode_times(num_seqs, context, max_steps)
        if wake := self.cost.wake_time(self._woke()):  # a run follows a step, so 0.0 from the driver
            times = itertools.chain([next(times) + wake], times)  # the first step's, as execute prices it
        light_until, light = self._light_until, 1.0 + self.cost.light_load_slowdown
        for seconds in times:  # execute's and _spend's sums, inline
            if now >= until:
                break
            if now < light_until:
                seconds *= light
            if noise is not None:
                seconds *= noise(now)
            busy += seconds
            now += seconds
            ends.append(now)
        self.busy_seconds = busy
        self.clock.wait_until(now)
        if ends:
            self._last_end = now
        return ends

    def _woke(self) -> float:
        """How long the clock moved since the previous step ended: the engine waited for a
        request (the driver jumps the clock only then). 0.0 before the first step. A wait
        starts the cost model's light-load window."""
        idle = self.clock.now - self._last_end if self._last_end is not None else 0.0
        if idle > IDLE_WAIT_S and self.cost.light_load_slowdown:
            self._light_until = self.clock.now + self.cost.light_load_window_s
        return idle

    def _spend(self, seconds: float) -> None:
        if self._noise is not None:
            seconds *= self._noise(self.clock.now)
        self.busy_seconds += seconds
        self.clock.advance(seconds)
        self._last_end = self.clock.now
