"""``pagedkv sim calibrate``: time the real engine step by step and fit the cost model.

The calibration workloads cover the regimes a simulation meets: offline bursts (chunked
prefills mixed with large decode batches that shrink as requests finish) of short and of
long requests, a small closed loop (batches of a few sequences), light Poisson loads
(single short prefills joining running decodes) and a sparse one (steps after the engine
idled). Every model step is timed with a wall clock and paired with its features;
:func:`pagedkv.sim.fit.fit` turns the pairs into a profile.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import numpy as np
import torch

from pagedkv.errors import InvalidRequestError
from pagedkv.loader import load_model
from pagedkv.models.base import PagedLM
from pagedkv.models.runner import ModelRunner
from pagedkv.scheduler.config import EngineConfig
from pagedkv.scheduler.executor import CacheLayout, StepResult
from pagedkv.scheduler.plan import SchedulerOutput
from pagedkv.sim.cost_model import (
    IDLE_WAIT_S,
    LIGHT_LOAD_WINDOW_S,
    WAKE_KNOTS_S,
    CostModel,
    Features,
    power_of_two_knots,
    step_features,
)
from pagedkv.sim.driver import run_workload
from pagedkv.sim.executor import WallClock
from pagedkv.sim.fit import fit
from pagedkv.sim.workload import LengthDist, WorkloadConfig, generate

logger = logging.getLogger(__name__)


class TimedExecutor:
    """Wraps a real executor; appends each step's features and how long it took to ``samples``.

    The wall time since the previous step ended is either the engine's bookkeeping between two
    steps (scheduling, handling outputs: 0.1-0.4 ms here, about 1% of a step) or, over
    IDLE_WAIT_S, the wait for a request when it had none. Bookkeeping is counted in the step
    after it, as the simulator's clock moves only by steps: left out, a simulation ran 1% fast.
    A wait is the step's idle time (0 otherwise, and for the first step)."""

    def __init__(self, inner: ModelRunner, samples: list[tuple[Features, float]] | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.inner, self.clock = inner, clock
        self.vocab_size, self.max_model_len, self.eos_token_id = inner.vocab_size, inner.max_model_len, None
        self.samples = [] if samples is None else samples
        self._last_end: float | None = None

    def initialize_cache(self, config: EngineConfig) -> CacheLayout:
        return self.inner.initialize_cache(config)

    def execute(self, plan: SchedulerOutput) -> StepResult:
        start = self.clock()
        tokens = self.inner.execute(plan)
        end = self.clock()
        gap = start - self._last_end if self._last_end is not None else 0.0
        waited = gap > IDLE_WAIT_S
        self.samples.append((step_features(plan, gap if waited else 0.0), end - start + (0.0 if waited else gap)))
        self._last_end = end
        return tokens


def calibration_workloads(
    max_model_len: int, seed: int, part: int = 0, parts: int = 1
) -> list[tuple[WorkloadConfig, int | None]]:
    """(workload, closed-loop concurrency) pairs that vary batch size and context length
    independently, so that the fit can tell the cost of a sequence from that of its context:
    big batches of short requests, big batches of long ones, a small closed loop, short
    prompts arriving one by one into running batches (what TTFT under light load is made
    of), a stream of them fast enough that steps prefill several prompts at once, a burst of
    very short requests (full steps of many short prompts: many tokens, few attended pairs,
    which tells the price of a token from that of a pair), and a sparse stream of tiny requests
    that leaves the engine idle between them for 10 ms to a second or two (the wake-up cost).

    ``part`` of ``parts``: a share of the calibration, to be taken in turns with other work
    (see :func:`collect_samples`). Each stream (Poisson, closed loop) runs with 1/parts of
    its requests; each burst runs whole in every part (its batch shapes are what it is there
    for). Each burst used to run in one part only, so the minute it ran in priced every large
    batch: in one sitting (2026-12-02 09:48) a burst's steps ran 18% slower than the fit while
    the streams of its part ran 4-9% faster, and the real bursts ran at 0.72-0.86 of that fit.
    Timed in every part, a burst's speed in each is measured against its own median part
    (:func:`pagedkv.sim.fit.fit`)."""

    def uniform(low: int, high: int) -> LengthDist:
        return LengthDist(kind="uniform", low=low, high=high)

    workload = partial(WorkloadConfig, preset=None, max_model_len=max_model_len, seed=seed)
    workloads = [
        (workload(num_requests=48, arrival="offline", prompt=uniform(8, 64), output=uniform(16, 128)), None),
        (workload(num_requests=32, arrival="offline", prompt=uniform(200, 600), output=uniform(16, 96)), None),
        (workload(num_requests=12, arrival="closed", concurrency=3, prompt=uniform(16, 400),
                  output=uniform(8, 160)), 3),
        (workload(num_requests=40, arrival="poisson", rate=1.5, prompt=uniform(8, 96), output=uniform(16, 96)), None),
        (workload(num_requests=96, arrival="poisson", rate=6.0, prompt=uniform(4, 160), output=uniform(1, 12)), None),
        (workload(num_requests=192, arrival="offline", prompt=uniform(4, 40), output=uniform(1, 4)), None),
        (workload(num_requests=90, arrival="poisson", rate=4.0, prompt=uniform(4, 64), output=uniform(1, 6)), None),
    ]
    def share(w: WorkloadConfig) -> WorkloadConfig:
        return w.model_copy(update={"num_requests": max(round(w.num_requests / parts), 1)})

    return [(w if w.arrival == "offline" else share(w), c) for w, c in workloads]


class Timed(NamedTuple):
    """Timed steps: their features [n, k], seconds [n], and which calibration workload each
    came from [n] (a label shared by that workload's slices in every part)."""

    features: np.ndarray
    seconds: np.ndarray
    workloads: np.ndarray


def collect_samples(
    model: PagedLM, block_size: int = 16, budget: int = 1024, seed: int = 0, part: int = 0, parts: int = 1
) -> Timed:
    """Run the calibration workloads on ``model`` for real; return their timed steps.

    This machine's speed drifts by 10-20% over minutes, so a profile fitted at one time
    prices the steps of another. To compare a simulation with a real run, collect the
    calibration in parts (``part=0, 1, 2`` of ``parts=3``, seed = part) taken in turns with
    the real runs, and fit on them all: both then see the same mix of fast and slow minutes.
    """
    samples: list[tuple[Features, float]] = []
    labels: list[str] = []
    for workload, concurrency in calibration_workloads(model.max_model_len, seed, part, parts):
        config = EngineConfig(block_size=block_size, max_num_batched_tokens=budget, seed=seed)
        specs = generate(workload)
        logger.info("calibrating on %d requests (%s) ...", len(specs), workload.arrival)
        run_workload(specs, config, TimedExecutor(ModelRunner(model), samples), WallClock(), concurrency=concurrency)
        kind = f"{workload.arrival} {workload.rate} {concurrency} {workload.prompt} {workload.output}"
        labels += [kind] * (len(samples) - len(labels))
    return Timed(*as_arrays(samples), np.array(labels))


def as_arrays(samples: list[tuple[Features, float]]) -> tuple[np.ndarray, np.ndarray]:
    """Timed steps as the features [n, k] and seconds [n] that :func:`fit_profile` takes."""
    return np.array([f for f, _ in samples], dtype=float), np.array([s for _, s in samples])


def fit_profile(model: PagedLM, name: str, features: np.ndarray, seconds: np.ndarray, budget: int,
                parts: np.ndarray | None = None, workloads: np.ndarray | None = None) -> CostModel:
    """The cost-model profile of ``model`` fitted to timed steps of it (knots up to ``budget``
    tokens); ``parts`` and ``workloads`` label the steps with the calibration part and workload
    each was timed in, for the run-level noise (:func:`pagedkv.sim.fit.fit`)."""
    knots = power_of_two_knots(budget)
    result = fit(features, seconds, knots, parts, workloads)
    return CostModel(
        name=name,
        token_knots=knots,
        token_costs_s=result.token_costs_s,
        per_decode_context_token_s=result.per_decode_context_token_s,
        per_prefill_attended_pair_s=result.per_prefill_attended_pair_s,
        per_sampled_token_s=result.per_sampled_token_s,
        wake_knots_s=list(WAKE_KNOTS_S),
        wake_costs_s=result.wake_costs_s,
        kv_bytes_per_token=model.kv_cache_spec().bytes_per_block(1),
        max_model_len=model.max_model_len,
        fit_note=f"fitted on {len(seconds)} timed steps; median relative error {result.median_relative_error:.1%}",
        step_noise=result.step_noise,
        run_noise=result.run_noise,
        noise_slow_share=result.slow_share,
        noise_corr_s=result.corr_s,
        light_load_slowdown=result.light_load_slowdown,
        light_load_window_s=LIGHT_LOAD_WINDOW_S,
    )


def fit_parts(model: PagedLM, name: str, timed: list[Timed], budget: int) -> CostModel:
    """The profile fitted to calibration parts timed one after another (``timed[i]`` is part
    i), with the run-level noise they show."""
    features, seconds, workloads = (np.concatenate(arrays) for arrays in zip(*timed, strict=True))
    parts = np.concatenate([np.full(len(t.seconds), part) for part, t in enumerate(timed)])
    return fit_profile(model, name, features, seconds, budget, parts, workloads)


def profile_name(model_name: str, dtype: torch.dtype) -> str:
    """What a profile describes: the model, the threads and the precision it was timed with."""
    return f"{model_name} on {torch.get_num_threads()} CPU threads, {str(dtype).removeprefix('torch.')}"


def calibrate(
    model_name: str, dtype: str | torch.dtype = "float32", block_size: int = 16, budget: int = 1024, seed: int = 0,
    parts: int = 1,
) -> CostModel:
    """Time the calibration workloads on the real model and fit a profile. With ``parts`` of 2
    or more they run as that many slices one after another, and the fit records how the
    machine's speed moved between them (``run_noise``)."""
    if parts < 1:
        raise InvalidRequestError(f"parts must be at least 1, got {parts}", "parts")
    model, _ = load_model(model_name, dtype=dtype, device="cpu")
    timed = [collect_samples(model, block_size, budget, seed + part, part, parts) for part in range(parts)]
    return fit_parts(model, profile_name(model_name, model.dtype), timed, budget)
