"""``pagedkv sim calibrate``: time the real engine step by step and fit the cost model.

The calibration workload covers the regimes a simulation meets: an offline burst (chunked
prefills mixed with large decode batches that shrink as requests finish) and a small
closed loop (batches of a few sequences). Every model step is timed with a wall clock and
paired with its features; :func:`sim.cost_model.fit` turns the pairs into a profile.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch

from models.registry import load_model
from models.runner import ModelRunner
from scheduler.outputs import SchedulerOutput
from scheduler.params import EngineConfig
from sim.cost_model import CostModel, fit, step_features
from sim.driver import run_workload
from sim.executor import WallClock
from sim.workload import LengthDist, WorkloadConfig, generate


class TimedExecutor:
    """Wraps a real executor; records each step's features and how long it took."""

    def __init__(self, inner: ModelRunner) -> None:
        self.inner = inner
        self.vocab_size, self.max_model_len, self.eos_token_id = inner.vocab_size, inner.max_model_len, None
        self.samples: list[tuple[tuple[int, int, int, int], float]] = []

    def initialize_cache(self, config: EngineConfig) -> int:
        return self.inner.initialize_cache(config)

    def execute(self, plan: SchedulerOutput) -> list[int | None]:
        start = time.perf_counter()
        tokens = self.inner.execute(plan)
        self.samples.append((step_features(plan), time.perf_counter() - start))
        return tokens


def calibration_workloads(max_model_len: int, seed: int) -> list[tuple[WorkloadConfig, int | None]]:
    """(workload, closed-loop concurrency) pairs that together cover small and large batches."""
    lengths = dict(prompt=LengthDist(kind="uniform", low=16, high=400), output=LengthDist(kind="uniform", low=8, high=160))
    common = dict(preset=None, max_model_len=max_model_len, seed=seed, **lengths)
    return [
        (WorkloadConfig(num_requests=48, arrival="offline", **common), None),
        (WorkloadConfig(num_requests=12, arrival="closed", concurrency=3, **common), 3),
    ]


def calibrate(model_name: str, dtype: torch.dtype, block_size: int = 16, budget: int = 1024, seed: int = 0) -> CostModel:
    model, _ = load_model(model_name, dtype=dtype, device="cpu")
    samples = []
    for workload, concurrency in calibration_workloads(model.max_model_len, seed):
        executor = TimedExecutor(ModelRunner(model))
        config = EngineConfig(block_size=block_size, max_num_batched_tokens=budget, seed=seed)
        specs = generate(workload)
        print(f"calibrating on {len(specs)} requests ({workload.arrival}) ...", file=sys.stderr, flush=True)
        run_workload(specs, config, executor, WallClock(), concurrency=concurrency)
        samples += executor.samples[2:]  # the first steps pay one-time warm-up costs
    features = np.array([f for f, _ in samples], dtype=float)
    seconds = np.array([s for _, s in samples])
    coef, error = fit(features, seconds)
    return CostModel(
        name=f"{model_name} on {torch.get_num_threads()} CPU threads, {str(dtype).removeprefix('torch.')}",
        overhead_s=coef[0],
        per_prefill_token_s=coef[1],
        per_decode_seq_s=coef[2],
        per_attended_token_s=coef[3],
        kv_bytes_per_token=model.kv_cache_spec().bytes_per_block(1),
        max_model_len=model.max_model_len,
        fit_note=f"fitted on {len(samples)} timed steps; median relative error {error:.1%}",
    )
